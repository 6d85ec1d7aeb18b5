"""The model base class: building on the meta device, from_pretrained, save_pretrained.

A model family subclasses `PreTrainedModel`, sets `config_class` and `base_model_prefix`, and
writes its modules. Loading lives in `loading.py`; this file decides dtype, device and attention
backend, and which loading problems are errors.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub, loading
from .configuration import PretrainedConfig, dtype_from_name, pop_hub_kwargs
from .layers.attention import check_attn_implementation
from .layers.norm import RMSNorm

logger = logging.getLogger("herd")

# from_pretrained arguments of the reference that herd accepts and has no use for.
_IGNORED_LOAD_KWARGS = ("low_cpu_mem_usage", "offload_state_dict", "_fast_init", "use_flash_attention_2", "key_mapping",
                        "offload_buffers")
_UNSUPPORTED_LOAD_KWARGS = ("load_in_8bit", "load_in_4bit")
# Keys some older checkpoints carry that are derived from the config, never loaded.
_DERIVED_KEYS = re.compile(r".*\.rotary_emb\.inv_freq$")


def resolve_device(device_map: Any) -> torch.device:
    """device_map: None / "cpu" / "cuda" / "cuda:1" / "auto" / int / torch.device / {"": device}. A
    map that splits the model (parallel/device_map.py) resolves to where its offloaded parts compute."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        from .parallel.device_map import Placement, normalize_device

        devices = {normalize_device(value, f"device_map[{key!r}]") for key, value in device_map.items()}
        if len(devices) != 1 or devices == {"disk"}:
            return Placement({key: normalize_device(value, key) for key, value in device_map.items()}).compute_device
        return resolve_device(devices.pop())
    if isinstance(device_map, int):
        if device_map < 0:
            raise ValueError(f"device_map={device_map} is not a GPU index: use 0 or above, 'cpu' or 'auto'")
        return torch.device("cuda", device_map)
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device_map == "disk":
        return torch.device("cpu")
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map={device_map!r} is not a strategy or a device: use 'auto', 'balanced', "
                         "'balanced_low_0', 'sequential', a device ('cuda:0', 'cpu', 0) or a dict of module path -> "
                         "device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device_map={device_map!r} asks for CUDA, but torch sees no CUDA device")
    return device


def _set_attn_implementation(config: PretrainedConfig, name: str | None, only_unset: bool = False) -> None:
    """The backend for a config and its parts (text_config, vision_config): the parts' modules
    read their own config, so an attn_implementation asked of a composite model must reach them
    (as in the reference). only_unset: parts that name their own backend keep it."""
    config._attn_implementation = check_attn_implementation(name)
    for key in config.sub_configs:
        part = getattr(config, key, None)
        if part is not None and not (only_unset and part._attn_implementation is not None):
            part._attn_implementation = config._attn_implementation

class GradientCheckpointingLayer(nn.Module):
    """A layer that `PreTrainedModel.gradient_checkpointing_enable` can checkpoint (transformers'
    name): in training with grad on, its forward runs under torch.utils.checkpoint."""

    gradient_checkpointing = False

    def __call__(self, *args: Any, **kwargs: Any):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            options = getattr(self, "_gradient_checkpointing_kwargs", {"use_reentrant": True})
            # Keyword arguments ride in a partial: a reentrant checkpoint takes positional ones only.
            return checkpoint(functools.partial(super().__call__, **kwargs), *args, **options)
        return super().__call__(*args, **kwargs)


class PreTrainedModel(nn.Module, hub.PushToHubMixin):
    config_class: type[PretrainedConfig] = PretrainedConfig
    base_model_prefix = "model"
    # Parameter name -> the parameter it shares storage with when config.tie_word_embeddings.
    _tied_weights_keys: dict[str, str] = {}
    # Parameters of a task head: when a checkpoint lacks them (a causal-LM checkpoint loaded for
    # classification) they are initialised with a warning, as in the reference.
    _head_weights: tuple[str, ...] = ()
    # Tensor parallel (parallel/tensor_parallel.py): the ranks a loaded model is split across and its plan.
    tp_size: int | None = None
    tp_plan: dict[str, str] | None = None

    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any):
        super().__init__()
        if not isinstance(config, PretrainedConfig):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        _set_attn_implementation(config, config._attn_implementation, only_unset=True)
        self.config = config
        self.name_or_path = config.name_or_path
        # As transformers: a GenerationConfig on models that generate, None on the others.
        self.generation_config = None
        if self.can_generate():
            from .generation import GenerationConfig

            self.generation_config = GenerationConfig.from_model_config(config)

    # The argument `generate` and the pipelines read inputs from (transformers' name).
    main_input_name = "input_ids"
    # Every herd model's decoder/encoder layers are GradientCheckpointingLayer.
    supports_gradient_checkpointing = True

    @classmethod
    def can_generate(cls) -> bool:
        """True for the models with a `generate` (those that mix in GenerationMixin), as transformers."""
        from .generation import GenerationMixin

        return issubclass(cls, GenerationMixin)

    @property
    def base_model(self) -> nn.Module:
        """The backbone (`self.model` etc.), or the model itself when it is the backbone."""
        return getattr(self, self.base_model_prefix, self)

    def get_decoder(self) -> nn.Module:
        """The text decoder, found as transformers' `get_decoder` finds it (used by PEFT and user
        code): a `language_model` child, else the backbone's decoder, else the model itself."""
        if "language_model" in self._modules:
            return self.language_model
        base = self.base_model
        if base is not self and hasattr(base, "get_decoder"):
            return base.get_decoder()
        return self

    def set_decoder(self, decoder: nn.Module) -> None:
        if "language_model" in self._modules:
            self.language_model = decoder
            return
        base = self.base_model
        if base is self:
            raise NotImplementedError(f"{type(self).__name__} is itself the decoder; it has none to replace")
        if isinstance(base, PreTrainedModel) and base.get_decoder() is not base:
            base.set_decoder(decoder)
        else:
            setattr(self, self.base_model_prefix, decoder)

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (and buffers), as transformers' get_memory_footprint."""
        size = sum(p.nelement() * p.element_size() for p in self.parameters())
        if return_buffers:
            size += sum(b.nelement() * b.element_size() for b in self.buffers())
        return size

    # --- gradient checkpointing ------------------------------------------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each layer's activations in backward instead of keeping them (training only).
        The cache is switched off while checkpointing in training, as in transformers."""
        kwargs = {"use_reentrant": True} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
        kwargs.setdefault("use_reentrant", True)  # transformers' default
        for module in self.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.gradient_checkpointing = True
                module._gradient_checkpointing_kwargs = kwargs

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules()
                   if isinstance(m, GradientCheckpointingLayer))

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad (for adapters over frozen embeddings)."""
        def make_inputs_require_grads(module, inputs, output):
            output.requires_grad_(True)

        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(make_inputs_require_grads)

    def disable_input_require_grads(self) -> None:
        self._require_grads_hook.remove()
        self._require_grads_hook = None

    # --- basics -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        for parameter in self.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return torch.get_default_dtype()

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The parameters as published: a quantized layer's weight (packed bytes kept as a buffer, never
        trainable) counts as its in x out entries, as transformers counts quantized weights."""
        from .quantization import quantized_modules

        seen, total = set(), 0
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        for parameter in self.parameters():
            if id(parameter) in seen or id(parameter) in embeddings or (only_trainable and not parameter.requires_grad):
                continue
            seen.add(id(parameter))
            total += parameter.numel()
        if not only_trainable:
            for module in quantized_modules(self):
                if hasattr(module, "in_features"):  # QuantizedLinear
                    total += module.in_features * module.out_features
                else:  # QuantizedExperts: gate_up (hidden x 2 intermediate) and down (intermediate x hidden) per expert
                    total += module.num_experts * 3 * module.hidden_size * module.intermediate_size
        return total

    # A decoder's embeddings are its `embed_tokens`; a head model's are its backbone's. The output
    # embeddings are the `lm_head` of a model that has one.
    def get_input_embeddings(self) -> nn.Module:
        if "embed_tokens" in self._modules:
            return self.embed_tokens
        return getattr(self, self.base_model_prefix).get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        if "embed_tokens" in self._modules:
            self.embed_tokens = value
        else:
            getattr(self, self.base_model_prefix).set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self._modules.get("lm_head")

    # --- resizing the vocabulary -----------------------------------------------------------------
    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Grow or shrink the input embeddings (and a tied lm_head with them); new rows get the mean embedding."""
        old = self.get_input_embeddings()
        if new_num_tokens is None:
            new_num_tokens = old.num_embeddings
        if pad_to_multiple_of is not None:
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        new = self._get_resized_embeddings(old, new_num_tokens, mean_resizing=mean_resizing)
        self.set_input_embeddings(new)
        text_config = self.config.get_text_config()
        text_config.vocab_size = new_num_tokens
        if self.get_output_embeddings() is not None:  # tied or not, as transformers: the lm_head follows
            self.set_output_embeddings(self._get_resized_lm_head(self.get_output_embeddings(), new_num_tokens,
                                                                  mean_resizing=mean_resizing))
            self.tie_weights()
        if hasattr(self, "vocab_size"):
            self.vocab_size = new_num_tokens
        return new

    @staticmethod
    def _resized_rows(weight: torch.Tensor, new_rows: int, mean_resizing: bool) -> torch.Tensor:
        kept = min(weight.shape[0], new_rows)
        fill = weight.float().mean(0) if mean_resizing else torch.zeros(weight.shape[1])
        resized = fill.to(weight.dtype).to(weight.device).expand(new_rows, -1).clone()
        resized[:kept] = weight[:kept]
        return resized

    def _get_resized_embeddings(self, old: nn.Embedding, new_num_tokens: int, mean_resizing: bool = True) -> nn.Embedding:
        new = nn.Embedding(new_num_tokens, old.embedding_dim, old.padding_idx, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(self._resized_rows(old.weight, new_num_tokens, mean_resizing))
        return new

    def _get_resized_lm_head(self, old: nn.Linear, new_num_tokens: int | None = None, transposed: bool = False,
                             mean_resizing: bool = True) -> nn.Linear:
        """A new lm_head with `new_num_tokens` output rows; added rows get the mean row (as the reference's mean resizing)."""
        if new_num_tokens is None or new_num_tokens == old.out_features:
            return old
        new = nn.Linear(old.in_features, new_num_tokens, bias=old.bias is not None, device=old.weight.device,
                        dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(self._resized_rows(old.weight, new_num_tokens, mean_resizing))
            if old.bias is not None:
                new.bias.copy_(self._resized_rows(old.bias[:, None], new_num_tokens, mean_resizing)[:, 0])
        return new

    def set_output_embeddings(self, value: nn.Module) -> None:
        if "lm_head" not in self._modules:
            raise NotImplementedError(f"{type(self).__name__} has no output embeddings")
        self.lm_head = value

    def set_attn_implementation(self, attn_implementation: str) -> None:
        _set_attn_implementation(self.config, attn_implementation)

    # --- weights ------------------------------------------------------------------------------
    def post_init(self) -> None:
        """Initialise weights (unless built on the meta device, to be filled from a checkpoint) and tie."""
        if any(p.device.type != "meta" for p in self.parameters()):
            self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        with torch.no_grad():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def tie_weights(self) -> None:
        if not getattr(self.config.get_text_config(), "tie_word_embeddings", False):
            return
        for name, source in self._tied_weights_keys.items():
            owner_name, _, leaf = name.rpartition(".")
            setattr(self.get_submodule(owner_name), leaf, self.get_parameter(source))

    def _tied_names(self) -> set[str]:
        if not getattr(self.config.get_text_config(), "tie_word_embeddings", False):
            return set()
        return set(self._tied_weights_keys)

    # Checkpoint layouts that differ from the module tree: (checkpoint prefix, module prefix or
    # None to skip without reading), tried in order on load; `_save_key_renames` writes the
    # published layout back.
    _load_key_renames: tuple[tuple[str, str | None], ...] = ()
    _save_key_renames: tuple[tuple[str, str], ...] = ()

    def _checkpoint_key_to_module_key(self, key: str, module_keys: set[str]) -> str | None:
        """Map a checkpoint key to ours: renamed, exact, or with the base-model prefix added or removed."""
        if _DERIVED_KEYS.match(key):
            return None
        for old, new in self._load_key_renames:
            if key.startswith(old):
                if new is None:
                    return None
                key = new + key[len(old) :]
                break
        if key in module_keys:
            return key
        prefixed = f"{self.base_model_prefix}.{key}"
        if prefixed in module_keys:  # a bare base-model checkpoint loaded into a model with a head
            return prefixed
        for prefix in ("model.", "transformer."):  # a checkpoint with a head loaded into the bare model / another head
            if key.startswith(prefix):
                for candidate in (key[len(prefix):], f"{self.base_model_prefix}.{key[len(prefix):]}"):
                    if candidate in module_keys:
                        return candidate
        if self._is_other_head_key(key):
            return None
        return key

    @staticmethod
    def _is_other_head_key(key: str) -> bool:
        """Weights of another task head (lm_head, score, qa_outputs): not ours to load, not an error."""
        return key.split(".")[0] in ("lm_head", "score", "qa_outputs", "classifier")

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def _prepare_config(cls, config: PretrainedConfig, attn_implementation: str | None) -> PretrainedConfig:
        _set_attn_implementation(config, attn_implementation or config._attn_implementation,
                                 only_unset=attn_implementation is None)
        return config

    @classmethod
    def from_config(cls, config: PretrainedConfig, *, dtype: Any = None, attn_implementation: str | None = None, **kwargs):
        config = cls._prepare_config(config, attn_implementation or kwargs.pop("_attn_implementation", None))
        dtype = dtype_from_name(dtype or kwargs.pop("torch_dtype", None))
        if kwargs:
            raise TypeError(f"from_config got unexpected arguments: {', '.join(kwargs)}")
        model = cls(config)
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: PretrainedConfig | str | os.PathLike | None = None,
        dtype: Any = "auto",
        device_map: Any = None,
        attn_implementation: str | None = None,
        progress: bool = True,
        **kwargs: Any,
    ):
        if model_args:
            raise TypeError("from_pretrained takes no positional arguments besides the model folder or id")
        # as transformers: a GenerationConfig given here replaces the folder's generation_config.json (a model
        # that generates; the others have none)
        given_generation_config = kwargs.pop("generation_config", None)
        if "torch_dtype" in kwargs:
            dtype = kwargs.pop("torch_dtype")
        for key in _UNSUPPORTED_LOAD_KWARGS:
            if kwargs.get(key) is not None:
                hint = " (use quantization_config=TorchAoConfig('int8_weight_only') or ('int4_weight_only'))" \
                    if key.startswith("load_in") else ""
                raise NotImplementedError(f"from_pretrained({key}=...) is not supported by herd yet{hint}")
            kwargs.pop(key, None)
        for key in _IGNORED_LOAD_KWARGS:
            kwargs.pop(key, None)
        if "device" in kwargs and device_map is None:
            device_map = kwargs.pop("device")
        if kwargs.pop("use_safetensors", None) is False and kwargs.get("gguf_file") is None:
            raise ValueError("use_safetensors=False asks for pickle weights (pytorch_model.bin), which herd never loads: "
                             "drop the argument and load the model's safetensors files")
        # As transformers: return (model, {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}),
        # with missing weights initialised and unexpected ones left out (warned) instead of an error.
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        tensor_parallel = None
        if any(kwargs.get(key) is not None for key in ("tp_plan", "tp_size", "device_mesh")):
            from .parallel import tensor_parallel as tp

            tensor_parallel = tp.setup(kwargs.get("tp_plan"), kwargs.get("tp_size"), kwargs.get("device_mesh"), device_map)
        tp_plan = kwargs.pop("tp_plan", None) or "auto"
        for key in ("tp_size", "device_mesh"):
            kwargs.pop(key, None)
        hub_kwargs = pop_hub_kwargs(kwargs)
        asked_quantization = kwargs.pop("quantization_config", None)
        max_memory, offload_folder = kwargs.pop("max_memory", None), kwargs.pop("offload_folder", None)
        from .quantization.gguf import gguf_path, open_gguf

        gguf_file = gguf_path(pretrained_model_name_or_path, kwargs.pop("gguf_file", None))
        folder = gguf_file.parent if gguf_file else hub.resolve(pretrained_model_name_or_path, **hub_kwargs)

        # the caller's own sizes, perhaps fewer layers (not the folder's config an Auto class read)
        config_given = isinstance(config, PretrainedConfig) and not config.__dict__.pop("_from_auto", False)
        if gguf_file is not None and config is None:
            config = cls.config_class.from_dict(open_gguf(gguf_file).config_dict())
        elif config is None or isinstance(config, (str, os.PathLike)):
            config = cls.config_class.from_pretrained(config or folder)
        else:
            config = copy.deepcopy(config)  # the caller's config stays as it was, as in transformers
        if not isinstance(config, cls.config_class) and isinstance(config.get_text_config(), cls.config_class):
            outer = config
            config = config.get_text_config()  # e.g. the text model of a multimodal checkpoint
            if getattr(outer, "quantization_config", None) is not None:
                config.quantization_config = outer.quantization_config
        config.name_or_path = str(pretrained_model_name_or_path)
        overrides = set(kwargs)
        _apply_config_overrides(config, kwargs)
        config = cls._prepare_config(config, attn_implementation)

        files = [gguf_file] if gguf_file else loading.find_checkpoint_files(folder)
        if gguf_file is not None and (dtype == "auto" or dtype is None):
            torch_dtype = torch.float32  # dequantized weights, float32 unless asked (as transformers)
        elif dtype == "auto" or dtype is None:
            torch_dtype = dtype_from_name(config.dtype) or loading.checkpoint_dtype(files) or torch.float32
        else:
            torch_dtype = dtype_from_name(dtype)
        device = tensor_parallel.device if tensor_parallel is not None else resolve_device(device_map)
        if tensor_parallel is not None and gguf_file is not None:
            raise ValueError("tensor parallel reads safetensors checkpoints; write the GGUF model out first "
                             "(python scripts/make_smollm2_checkpoint.py shows how) and load that folder")
        gguf_quantization = None
        if gguf_file is not None and torch_dtype in (torch.bfloat16, torch.float16):
            # A GGUF file in a 16-bit model keeps its Q4_0/Q4_1 decoder linears 4-bit (herd's int4,
            # group 32, exactly the file's values); in float32 (the default) every weight is
            # dequantized. The rule and the mapping: quantization/gguf.py.
            reader = open_gguf(gguf_file)
            gguf_quantization = reader.quantization_config()  # None: no Q4_0/Q4_1 linear
            if gguf_quantization is not None:
                files = [reader.with_q4_kept()]

        with torch.device("meta"):
            model = cls(config)
        quantization = _quantization_config(config, asked_quantization, device, stored=gguf_quantization)
        convert = None
        if quantization is not None:
            from .quantization import apply_quantization, tensor_converter

            apply_quantization(model, quantization, torch_dtype)
            convert = tensor_converter(model, torch_dtype)
        shard = None
        if tensor_parallel is not None:  # each rank's shapes on the meta model, and the loader's slicing
            shard, convert = tensor_parallel.split_model(model, tp_plan, convert)
        module_keys = set(model.state_dict().keys())
        other_heads: set[str] = set()  # another task head's weights: left out, reported as unexpected

        def rename(key: str) -> str | None:
            name = model._checkpoint_key_to_module_key(key, module_keys)
            if name is None and model._is_other_head_key(key):
                other_heads.add(key)
            return name
        placement, one_device = _split_placement(model, device_map, max_memory, torch_dtype, config, quantization, files,
                                                 rename, gguf_file, offload_folder)
        if placement is None:
            device = one_device or device
            _check_weights_fit(model, config, quantization, torch_dtype, device)
        report = loading.load_checkpoint(
            model,
            files,
            rename=rename,
            dtype=torch_dtype,
            device=device,
            progress=progress,
            convert=convert,
            place=_placer(placement, offload_folder),
            shard=shard,
        )
        mismatched_names = {rename(key) for key, _, _ in report.mismatched}
        report.missing = [name for name in report.missing if name not in mismatched_names]  # named once, as mismatched
        model._settle_tied_weights(report)
        tied = model._tied_names()
        report.missing = [name for name in report.missing if name not in tied]
        init_device = device if placement is None else torch.device("cpu")
        info = {"missing_keys": set(report.missing), "unexpected_keys": set(report.unexpected) | other_heads,
                "mismatched_keys": {(key, torch.Size(found), torch.Size(wanted)) for key, wanted, found in report.mismatched},
                "error_msgs": []}
        if "num_hidden_layers" in overrides or config_given:  # layers a config made smaller leaves out: no error
            report.unexpected = _beyond_last_layer(report.unexpected, config.get_text_config().num_hidden_layers,
                                                   lambda key: rename(key) in module_keys)
        if ignore_mismatched_sizes and report.mismatched:
            logger.warning("%s: weights of another shape are newly initialised (ignore_mismatched_sizes=True): %s",
                           cls.__name__, ", ".join(f"{key} {list(found)} -> {list(wanted)}"
                                                  for key, wanted, found in report.mismatched))
            model._initialise_weights([rename(key) for key, _, _ in report.mismatched], init_device, torch_dtype)
            report.mismatched = []
        model._initialise_missing_heads(report, init_device, torch_dtype)
        if output_loading_info and (report.missing or report.unexpected) and not report.mismatched:
            logger.warning("%s: newly initialised weights (missing from the checkpoint): %s; weights left out "
                           "(unexpected): %s", cls.__name__, ", ".join(report.missing) or "none",
                           ", ".join(report.unexpected) or "none")
            model._initialise_weights(report.missing, init_device, torch_dtype)
            report.missing, report.unexpected = [], []
        report.raise_if_any(str(gguf_file or folder), cls.__name__, ignore_mismatched_hint=not ignore_mismatched_sizes)
        model.tie_weights()
        if placement is not None:  # each part where the map puts it, with the hooks that run it there
            from .parallel.offload import dispatch

            dispatch(model, placement)
        if tensor_parallel is not None:
            tensor_parallel.finish(model)
        # Buffers derived from the config (rotary frequencies) were built on the CPU in float32.
        for module in model.modules() if placement is None else ():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device != device:
                    module._buffers[name] = buffer.to(device)
        model.config.dtype = str(torch_dtype).removeprefix("torch.")
        if quantization is not None:
            model.config.quantization_config = _saved_quantization(quantization)
        model.eval()
        if gguf_file is None:  # a GGUF file's generation settings (bos/eos/pad) come with its config
            model._after_load(folder)
        if given_generation_config is not None and getattr(model, "generation_config", None) is not None:
            model.generation_config = copy.deepcopy(given_generation_config)
        return (model, info) if output_loading_info else model

    def _settle_tied_weights(self, report: loading.LoadReport) -> None:
        """Tied weights as transformers 5 reads them: a checkpoint holding only the tied copy
        (lm_head.weight, no embed_tokens.weight) fills both; one holding both with different values
        keeps them apart (warned: config.json should say tie_word_embeddings=False)."""
        missing = set(report.missing)
        for target, source in list(self._tied_names() and self._tied_weights_keys.items()):
            try:
                a, b = self.get_parameter(source), self.get_parameter(target)
            except AttributeError:  # a quantized head holds other tensors: tied as before
                continue
            if source in missing and target not in missing:
                owner, _, leaf = source.rpartition(".")
                self.get_submodule(owner)._parameters[leaf] = b
                report.missing = [name for name in report.missing if name != source]
            elif source not in missing and target not in missing:
                # (tensor-parallel shards of the two may differ in shape: those stay tied, as before)
                if a is b or "meta" in (a.device.type, b.device.type) or a.shape != b.shape or torch.equal(a, b):
                    continue
                logger.warning("the config ties %s to %s, but the checkpoint holds both with different values: they "
                               "are not tied (set tie_word_embeddings=False in config.json to silence this)", target, source)
                self._tied_weights_keys = {k: v for k, v in self._tied_weights_keys.items() if k != target}

    def _initialise_weights(self, names: list[str], device: torch.device, dtype: torch.dtype) -> None:
        """Fresh weights for `names` (missing or of another shape): each module's own initialisation,
        the loaded weights beside them kept."""
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        by_module: dict[str, list[str]] = {}
        for name in names:
            module_name, _, leaf = name.rpartition(".")
            by_module.setdefault(module_name, []).append(leaf)
        for module_name, leaves in by_module.items():
            module = self.get_submodule(module_name)
            kept = {k: v for k, v in module._parameters.items() if k not in leaves and v is not None}
            for leaf in leaves:
                old = module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]
                fresh = torch.empty(old.shape, device=device, dtype=dtype if old.is_floating_point() else old.dtype)
                with torch.no_grad():
                    fresh.normal_(0.0, std) if fresh.is_floating_point() else fresh.zero_()
                if leaf in module._parameters:
                    module._parameters[leaf] = nn.Parameter(fresh, requires_grad=old.requires_grad)
                else:
                    module._buffers[leaf] = fresh
            self._init_weights(module)
            module._parameters.update(kept)  # _init_weights resets a whole module: what was loaded stays

    def _after_load(self, folder: Path) -> None:
        """Read what a model keeps beside its weights: generation_config.json."""
        if getattr(self, "generation_config", None) is not None and (folder / hub.GENERATION_CONFIG_NAME).is_file():
            from .generation import GenerationConfig

            self.generation_config = GenerationConfig.from_pretrained(folder)

    def _initialise_missing_heads(self, report: loading.LoadReport, device: torch.device, dtype: torch.dtype) -> None:
        heads = [name for name in report.missing if name.split(".")[0] in self._head_weights]
        if not heads:
            return
        logger.warning(
            "%s: the checkpoint has no weights for the task head (%s); they are newly initialised "
            "and must be trained before the outputs mean anything.",
            type(self).__name__,
            ", ".join(heads),
        )
        for name in heads:
            module_name, _, leaf = name.rpartition(".")
            module = self.get_submodule(module_name)
            module._parameters[leaf] = nn.Parameter(torch.empty_like(module._parameters[leaf], device=device, dtype=dtype))
            self._init_weights(module) if leaf == "weight" else module._parameters[leaf].data.zero_()
        report.missing = [name for name in report.missing if name not in heads]

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        max_shard_size: int | str = "50GB",  # transformers 5's default
        safe_serialization: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        if not safe_serialization:
            raise ValueError("herd writes safetensors only (safe_serialization=False would write a pickle)")
        if (self.tp_size or 1) > 1:
            raise ValueError(f"this model is split across {self.tp_size} ranks (tp_plan): save_pretrained would write one "
                             "rank's slices; load it without tp_plan to save it")
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"save_pretrained needs a folder, but {folder} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        push = hub.push_request(folder, kwargs)
        if state_dict is None:
            tied = self._tied_names()
            state_dict = {k: v for k, v in self.state_dict().items() if k not in tied}
            state_dict = {_rename_prefix(k, self._save_key_renames): v for k, v in state_dict.items()}
        self.config.architectures = [type(self).__name__]
        self.config.dtype = str(self.dtype).removeprefix("torch.")
        self.config.save_pretrained(folder)
        generation_config = getattr(self, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(folder)
        loading.save_checkpoint(state_dict, folder, max_shard_size)
        if push is not None:
            push.upload(self, model_card=True)


def _split_placement(model, device_map, max_memory, dtype, config, quantization, files, rename, gguf_file,
                     offload_folder):
    """(Placement of a device_map that splits the model or offloads part of it, or None; the one
    device of a strategy whose map holds the whole model, or None). A Placement is checked against
    each device's memory, and for an offload folder where disk weights are converted."""
    from .parallel import device_map as placing

    if max_memory is not None and not (isinstance(device_map, str) and device_map in placing.STRATEGIES):
        raise ValueError("max_memory applies to device_map='auto', 'balanced', 'balanced_low_0' or 'sequential'")
    placement = placing.resolve_placement(model, device_map, max_memory, dtype)
    if placement is None:
        return None, None
    if not placement.is_split:
        return None, placement.single_device
    from .parallel.offload import check_offload_folder

    if gguf_file is not None:
        converts = "the weights of a GGUF file are converted"
    elif quantization is not None:
        converts = None if quantization.prequantized else "the weights are quantized while loading"
    else:
        converts = None
    if quantization is None or converts is not None:
        check_offload_folder(placement, files, rename, dtype, converts, offload_folder)
    placing.check_fits(model, placement, config, quantization, dtype)
    return placement, None


def _placer(placement, offload_folder):
    if placement is None:
        return None
    from .parallel.offload import DevicePlacer

    return DevicePlacer(placement, offload_folder)


def _check_weights_fit(model: nn.Module, config: PretrainedConfig, quantization, dtype: torch.dtype,
                       device: torch.device) -> None:
    """Before anything is allocated on a GPU: weights that cannot fit its free memory are refused
    with what would fit (memory_plan.py), instead of a CUDA out-of-memory error halfway through."""
    if device.type != "cuda":
        return
    from .quantization import weight_tensors

    tied = model._tied_names()
    needed = sum(t.numel() * t.element_size() for name, t in weight_tensors(model) if name not in tied)
    free, _ = torch.cuda.mem_get_info(device)
    if needed <= free:
        return
    from .memory_plan import plan_memory

    plan = plan_memory(config, dtype=dtype, quantization=quantization, prompt_tokens=0, max_new_tokens=0)
    raise torch.OutOfMemoryError(
        f"{type(model).__name__} needs {needed / 1e9:.1f} GB for its weights ({str(dtype).removeprefix('torch.')}"
        f"{', quantized' if quantization is not None else ''}) and {device} has {free / 1e9:.1f} GB free: "
        f"{plan.suggestion(free)} (`herd plan` shows the whole plan)")


def _quantization_config(config: PretrainedConfig, asked: Any, device: torch.device,
                         stored: dict[str, Any] | None = None):
    """The quantization a load runs: the checkpoint's own (config.json's quantization_config, or
    `stored`: a GGUF file's Q4 linears kept in a 16-bit model) wins over one asked for, as in
    transformers; None for a float model."""
    from .quantization import from_dict
    from .quantization.formats import has_fp8_matmul

    if stored is None:
        stored = getattr(config, "quantization_config", None)
    if stored is not None:
        if asked is not None:
            logger.warning("the checkpoint is already quantized (%s); the quantization_config passed to "
                           "from_pretrained is ignored", dict(stored).get("quant_method"))
        chosen = from_dict(stored)
    elif asked is not None:
        chosen = from_dict(asked, prequantized=False)
    else:
        return None
    uses_fp8 = getattr(chosen, "quant_method", "") in ("fbgemm_fp8", "compressed-tensors")
    if uses_fp8 and device.type == "cuda" and not has_fp8_matmul(device):
        logger.warning("this GPU has no FP8 matmul (compute capability below 8.9): FP8 weights are "
                       "dequantized to the activations' dtype for each matmul (same memory, slower)")
    elif uses_fp8 and device.type == "cpu":
        logger.warning("FP8 weights on the CPU are converted to float32 for each matmul while they stay there "
                       "(same memory, several times slower than bf16; a GPU with FP8 runs them as stored); int8 "
                       "weights run torch's CPU kernel: TorchAoConfig(\"int8_weight_only\") on a float checkpoint")
    return chosen


def _saved_quantization(quantization) -> dict[str, Any]:
    """What config.json records: a checkpoint read as stored keeps its entry; weights herd
    quantized while loading are written in herd's layout (FBGEMM's FP8 layout is transformers')."""
    from .quantization import HerdQuantConfig, TorchAoConfig

    if isinstance(quantization, TorchAoConfig):
        return HerdQuantConfig(quantization.format, quantization.group_size,
                               quantization.modules_to_not_convert).to_dict()
    return quantization.to_dict()


def _beyond_last_layer(keys: list[str], layers: int, expected: Any) -> list[str]:
    """`keys` less those of decoder layers past the last of `layers` (from_pretrained(...,
    num_hidden_layers=1)), known by the key their layer 0 would have (`expected`)."""
    kept = []
    for key in keys:
        match = re.search(r"(^|\.)layers\.(\d+)\.", key)
        if match and int(match[2]) >= layers and expected(key[:match.start(2)] + "0" + key[match.end(2):]):
            continue
        kept.append(key)
    if len(kept) < len(keys):
        logger.info("the checkpoint's layers past the first %d are not loaded (num_hidden_layers=%d)", layers, layers)
    return kept


def _rename_prefix(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _apply_config_overrides(config: PretrainedConfig, overrides: dict[str, Any]) -> None:
    """from_pretrained(..., num_labels=3, output_hidden_states=True): keyword arguments that name
    config fields update the config; anything else is a mistake worth naming."""
    unknown = []
    for key, value in overrides.items():
        if key == "num_labels" or hasattr(config, key):
            setattr(config, key, value)
        else:
            unknown.append(key)
    if unknown:
        raise TypeError(f"from_pretrained got arguments that are neither loading options nor config fields: {', '.join(unknown)}")


# --- helpers every model family's forward uses ------------------------------------------------------


@dataclass
class DecoderStep:
    """What a decoder's forward works with once its arguments are resolved."""

    inputs_embeds: torch.Tensor  # (batch, seq, hidden)
    past_key_values: Any  # a Cache, or None without caching
    past_length: int  # positions the cache has seen before this call
    cache_position: torch.Tensor  # (seq,) cache indices of this call's tokens
    position_ids: torch.Tensor  # (batch or 1, seq)
    use_cache: bool
    output_attentions: bool
    output_hidden_states: bool
    return_dict: bool

    @property
    def batch(self) -> int:
        return self.inputs_embeds.shape[0]

    @property
    def seq(self) -> int:
        return self.inputs_embeds.shape[1]

    def self_attention_mask(self, attention_mask: torch.Tensor | None, layer_idx: int = 0,
                            chunk_size: int | None = None):
        """The causal mask of this forward, as the cache holds layer `layer_idx`'s keys (a windowed
        layer's cache returns fewer): an AttentionMask description, realised by each backend."""
        from .layers.attention import build_attention_mask

        cache = self.past_key_values
        kv_length = cache.kv_length(layer_idx, self.seq) if cache is not None else self.seq
        return build_attention_mask(
            attention_mask, batch_size=self.batch, query_length=self.seq, past_length=self.past_length,
            kv_length=kv_length, kv_offset=cache.kv_offset(layer_idx) if cache is not None else 0,
            chunk_size=chunk_size, position_ids=self.position_ids, has_cache=cache is not None,
        )

    def collector(self) -> LayerOutputs:
        return LayerOutputs(self)


class LayerOutputs:
    """What a decoder's forward collects on its way through the layers, when asked: each layer's
    input hidden states (and the final normed ones), each layer's attention weights."""

    def __init__(self, step: DecoderStep):
        self.step = step
        self.hidden_states = [] if step.output_hidden_states else None
        self.attentions = [] if step.output_attentions else None

    def layer_input(self, hidden_states: torch.Tensor) -> None:
        if self.hidden_states is not None:
            self.hidden_states.append(hidden_states)

    def layer_weights(self, weights: torch.Tensor | None) -> None:
        if self.attentions is not None:
            self.attentions.append(weights)

    def output(self, last_hidden_state: torch.Tensor):
        """The BaseModelOutputWithPast (or its tuple form), last_hidden_state the normed output."""
        self.layer_input(last_hidden_state)
        return decoder_output(self.step, last_hidden_state, self.hidden_states, self.attentions)


def prepare_decoder_step(model: nn.Module, embed_tokens: nn.Embedding, *, input_ids, inputs_embeds, past_key_values,
                         use_cache, position_ids, cache_position, output_attentions, output_hidden_states,
                         return_dict) -> DecoderStep:
    """Resolve a text decoder's forward arguments: config defaults, input checks, embeddings,
    the cache (a DynamicCache when caching and none given), cache positions and position ids."""
    from .cache import DynamicCache, as_cache

    config = model.config
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        check_input_ids(input_ids, embed_tokens.num_embeddings)
        inputs_embeds = embed_tokens(input_ids)
    elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(f"inputs_embeds must be (batch, seq, {config.hidden_size}), got {tuple(inputs_embeds.shape)}")
    seq = inputs_embeds.shape[1]
    use_cache = flag(use_cache, config.use_cache)
    if use_cache and model.training and getattr(model, "is_gradient_checkpointing", False):
        # A checkpointed layer runs twice (forward, then again in backward): a cache would be
        # written twice. transformers switches it off the same way.
        logger.warning("use_cache=True is incompatible with gradient checkpointing; setting use_cache=False")
        use_cache = False
    past_key_values = as_cache(past_key_values)
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=config)
    past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
    if cache_position is None:
        cache_position = torch.arange(past_length, past_length + seq, device=inputs_embeds.device)
    if position_ids is None:
        position_ids = cache_position.unsqueeze(0)  # (1, seq)
    elif position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.shape[-1] != seq:
        raise ValueError(f"position_ids has {position_ids.shape[-1]} positions for {seq} tokens")
    return DecoderStep(
        inputs_embeds=inputs_embeds,
        past_key_values=past_key_values,
        past_length=past_length,
        cache_position=cache_position,
        position_ids=position_ids,
        use_cache=use_cache,
        output_attentions=flag(output_attentions, config.output_attentions),
        output_hidden_states=flag(output_hidden_states, config.output_hidden_states),
        return_dict=flag(return_dict, config.return_dict),
    )


def decoder_output(step: DecoderStep, last_hidden_state: torch.Tensor, hidden_states: list | None, attentions: list | None):
    """The BaseModelOutputWithPast of a decoder (or its tuple form)."""
    from .modeling_outputs import BaseModelOutputWithPast

    output = BaseModelOutputWithPast(
        last_hidden_state=last_hidden_state,
        past_key_values=step.past_key_values if step.use_cache else None,
        hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        attentions=tuple(attentions) if attentions is not None else None,
    )
    return output if step.return_dict else output.to_tuple()


def flag(value: bool | None, default: bool) -> bool:
    """A forward argument left as None takes the config's value."""
    return default if value is None else value


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: give at least one token")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"input_ids must hold integers, got {input_ids.dtype}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise IndexError(f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def reject_unknown_kwargs(kwargs: dict[str, Any]) -> None:
    """Only the loss's keyword arguments (which trainers pass: losses.CAUSAL_LM_LOSS_KWARGS) may be left
    in a forward's **kwargs; the language model heads take them (`language_model_output`)."""
    from .losses import CAUSAL_LM_LOSS_KWARGS

    unknown = [key for key in kwargs if key not in CAUSAL_LM_LOSS_KWARGS]
    if unknown:
        raise TypeError(f"forward() got unexpected arguments: {', '.join(unknown)}")


def backbone_call(model: PreTrainedModel, **kwargs: Any):
    """Run a head model's backbone (self.model / self.transformer), always as a ModelOutput."""
    kwargs["return_dict"] = True
    return getattr(model, model.base_model_prefix)(**kwargs)


def language_model_output(model: nn.Module, outputs: Any, labels: torch.Tensor | None, logits_to_keep: int | torch.Tensor,
                          return_dict: bool | None, *, float_logits: bool = False, ignore_labels_past_vocab: bool = False,
                          loss_kwargs: dict[str, Any] | None = None):
    """The lm_head over the kept positions, the next-token loss (with the trainer's `loss_kwargs`:
    losses.causal_lm_loss), and a CausalLMOutputWithPast."""
    from .losses import causal_lm_loss
    from .modeling_outputs import CausalLMOutputWithPast

    # Only the positions asked for go through the (large) vocabulary projection.
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    logits = model.lm_head(outputs.last_hidden_state[:, keep, :])  # (batch, kept, vocab)
    if float_logits:
        logits = logits.float()
    loss = None
    if labels is not None:
        if ignore_labels_past_vocab:  # Mllama: labels on image tokens (past the lm_head) are ignored
            labels = labels.masked_fill(labels >= logits.shape[-1], -100)
        loss = causal_lm_loss(logits, labels, **(loss_kwargs or {}))
    output = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                    hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return output if flag(return_dict, model.config.return_dict) else output.to_tuple()


class TextDecoderForward:
    """The forward of a text decoder (Llama's, Llama 4's) with transformers' arguments: resolved into
    a DecoderStep (`prepare_decoder_step`), then the model's own `forward_layers(step,
    attention_mask)`: its masks, position embeddings and layers."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs: Any,
    ):
        reject_unknown_kwargs(kwargs)
        step = prepare_decoder_step(
            self, self.embed_tokens, input_ids=input_ids, inputs_embeds=inputs_embeds, past_key_values=past_key_values,
            use_cache=use_cache, position_ids=position_ids, cache_position=cache_position,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
        )
        return self.forward_layers(step, attention_mask)


class CausalLMForward:
    """The forward of a causal language model over its text decoder (`self.model`), with
    transformers' arguments: the lm_head over the kept positions (`logits_to_keep`) and the
    next-token loss when labels are given."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ):
        reject_unknown_kwargs(kwargs)
        outputs = backbone_call(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, cache_position=cache_position,
        )
        return language_model_output(self, outputs, labels, logits_to_keep, return_dict, loss_kwargs=kwargs)
