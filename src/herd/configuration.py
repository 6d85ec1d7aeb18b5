"""The config base class: reading and writing config.json as transformers does.

Each model family's config subclasses `PretrainedConfig`, declares its own fields in `__init__`
with the reference's names and defaults, and passes the rest here. Keys we do not know are kept
as attributes and written back, so a config survives a load/save round trip unchanged.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from . import hub

# Fields every config has, with the reference's defaults.
_COMMON_DEFAULTS: dict[str, Any] = {
    "return_dict": True,
    "output_hidden_states": False,
    "output_attentions": False,
    "dtype": None,
    "architectures": None,
    "problem_type": None,
    "tie_word_embeddings": True,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
    # transformers keeps these two on every config (and in config.json); user code reads them.
    "is_encoder_decoder": False,
    "chunk_size_feed_forward": 0,
}
# Common keys that transformers 5 leaves to each model's config (not its base class's): to_diff_dict keeps them.
_MODEL_OWN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")
# Keys of config.json that describe the file, not the model.
_IGNORED_KEYS = {"transformers_version", "herd_version", "_name_or_path", "_commit_hash", "model_type"}
# Keyword arguments of from_dict/from_pretrained that always reach the config (transformers' list).
_ALWAYS_CONFIG_KWARGS = ("num_labels", "attn_implementation", "output_attentions", "torch_dtype", "dtype", "name_or_path")
_VALID_PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


def dtype_from_name(value: str | torch.dtype | None) -> torch.dtype | None:
    """"bfloat16" / "torch.bfloat16" / torch.bfloat16 -> torch.bfloat16."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}; use e.g. 'float32', 'bfloat16' or 'float16'")
    return dtype


class PretrainedConfig(hub.PushToHubMixin):
    model_type: str = ""
    # Sub-configs (name -> class) for composite models such as Mllama and Llama 4.
    sub_configs: dict[str, type[PretrainedConfig]] = {}
    # For a sub-config class: its key in the composite config ("text_config", "vision_config").
    base_config_key: str = ""

    def __init__(self, **kwargs: Any):
        # `torch_dtype` is the pre-5.0 spelling of `dtype`.
        if "torch_dtype" in kwargs:
            torch_dtype = kwargs.pop("torch_dtype")
            kwargs.setdefault("dtype", torch_dtype)
        for key, default in _COMMON_DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).removeprefix("torch.")

        id2label = kwargs.pop("id2label", None)
        label2id = kwargs.pop("label2id", None)
        num_labels = kwargs.pop("num_labels", None)
        if id2label is None:
            id2label = {i: f"LABEL_{i}" for i in range(num_labels if num_labels is not None else 2)}
        elif num_labels is not None and num_labels != len(id2label):
            raise ValueError(f"num_labels={num_labels} disagrees with id2label, which has {len(id2label)} labels")
        self.id2label = {int(k): v for k, v in id2label.items()}
        self.label2id = dict(label2id) if label2id is not None else {v: k for k, v in self.id2label.items()}
        if self.problem_type not in _VALID_PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {_VALID_PROBLEM_TYPES}, got {self.problem_type!r}")
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            # a cross entropy over one class is always 0: nothing would train (refused as in the reference)
            raise ValueError('problem_type="single_label_classification" needs num_labels > 1: use num_labels=2 for '
                             'a binary classifier, or problem_type="regression" for one output')

        # Which attention backend the model runs; chosen at load, never saved.
        self._attn_implementation = kwargs.pop("attn_implementation", None)
        self.name_or_path = kwargs.pop("_name_or_path", kwargs.pop("name_or_path", ""))
        for key in _IGNORED_KEYS:
            kwargs.pop(key, None)
        # Unknown keys: kept for the round trip.
        self._extra_keys = sorted(kwargs)
        for key, value in kwargs.items():
            setattr(self, key, value)

    # --- labels -----------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        if value != len(self.id2label):
            self.id2label = {i: f"LABEL_{i}" for i in range(value)}
            self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def torch_dtype(self):
        return self.dtype

    @property
    def use_return_dict(self) -> bool:
        # Deprecated in transformers in favour of `return_dict`, but still read by user code.
        return self.return_dict

    def update(self, config_dict: dict[str, Any]) -> None:
        """Set each key of `config_dict` as an attribute, as transformers' `PretrainedConfig.update`."""
        for key, value in config_dict.items():
            setattr(self, key, value)

    # --- composite configs ---------------------------------------------------------------------
    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        # transformers' arguments: `encoder=True` alone asks for a text *encoder* config, which
        # none of the Llama family has, so the config itself comes back, as there.
        if encoder and not decoder:
            return self
        return getattr(self, "text_config", None) or self

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if key.startswith("_") or key == "name_or_path":
                continue
            if isinstance(value, PretrainedConfig):
                value = value.to_dict()
            elif isinstance(value, torch.dtype):
                value = str(value).removeprefix("torch.")
            out[key] = copy.deepcopy(value)
        # int keys, as transformers' to_dict; JSON writes them as strings.
        out["id2label"] = dict(self.id2label)
        out["model_type"] = self.model_type
        from . import __version__

        out["herd_version"] = __version__
        return dict(sorted(out.items()))

    def to_diff_dict(self) -> dict[str, Any]:
        """to_dict() less what a config need not say, as transformers' to_diff_dict: a key of the
        base class stays when its value differs from the base's default or this class's default;
        the class's own keys always stay; a part (text_config, ...) keeps what differs from its
        class's defaults, and its model_type."""
        full = self.to_dict()
        base = {k: v for k, v in PretrainedConfig().to_dict().items() if k not in _MODEL_OWN_KEYS}
        own = _default_dict(type(self))
        out: dict[str, Any] = {}
        for key, value in full.items():
            part = getattr(self, key, None)
            if isinstance(part, PretrainedConfig) and isinstance(own.get(key), dict):
                out[key] = _diff_part(value, base, part)
                if "model_type" in value:
                    out[key]["model_type"] = value["model_type"]
            elif key not in base or key == "herd_version" or value != base[key] or value != own.get(key, value):
                out[key] = value
        return out

    def to_json_string(self, use_diff: bool = True) -> str:
        # transformers' default is use_diff=True, as here; herd's save_pretrained writes the full
        # dict (transformers' writes the diff: the same config once read back, fewer keys).
        data = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps({str(k): v for k, v in data.items()}, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        Path(json_file_path).write_text(self.to_json_string(use_diff=use_diff))

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> PretrainedConfig:
        return cls(**json.loads(Path(json_file).read_text()))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"save_pretrained needs a folder, but {folder} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        push = hub.push_request(folder, kwargs)
        self.to_json_file(folder / hub.CONFIG_NAME, use_diff=False)
        if push is not None:
            push.upload(self)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> PretrainedConfig:
        """The config of `config_dict`, as transformers' from_dict: keyword arguments naming a field
        of the config (or num_labels, attn_implementation, dtype, name_or_path) override it; the
        others are left out, and returned as a dict beside the config when return_unused_kwargs=True."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        for key in ("_from_auto", "_from_pipeline"):
            kwargs.pop(key, None)
        merged = dict(config_dict)
        model_type = merged.get("model_type")
        if cls.base_config_key and model_type != cls.model_type and isinstance(merged.get(cls.base_config_key), dict):
            # A composite config.json (llama4, mllama) loaded for one of its parts: take that part.
            part = dict(merged[cls.base_config_key])
            part.setdefault("_name_or_path", merged.get("_name_or_path", ""))
            merged, model_type = part, part.get("model_type")
        if cls.model_type and model_type and model_type != cls.model_type:
            # Loading a composite checkpoint's text part (e.g. llama4 -> llama4_text) is the
            # subclass's job; anything else is a user error worth naming.
            raise ValueError(
                f"config has model_type {model_type!r}, but {cls.__name__} expects {cls.model_type!r}"
            )
        if "num_labels" in kwargs and "id2label" not in kwargs and merged.get("id2label") is not None \
                and len(merged["id2label"]) != kwargs["num_labels"]:
            # another number of labels than the file's (a head to fine-tune anew): fresh LABEL_i names,
            # as the reference's num_labels setter gives
            merged.pop("id2label")
            merged.pop("label2id", None)
        plain = cls(**merged)
        used, unused = {}, {}
        for key, value in kwargs.items():
            if key in ("dtype", "torch_dtype") and value == "auto":
                continue  # "auto" keeps the file's dtype
            if key in _ALWAYS_CONFIG_KWARGS or hasattr(plain, key):
                current = getattr(plain, key, None)
                if isinstance(current, PretrainedConfig) and isinstance(value, dict):
                    value = {**current.to_dict(), **value}  # a part given as a dict updates that part
                used["dtype" if key == "torch_dtype" else "_name_or_path" if key == "name_or_path" else key] = value
            else:
                unused[key] = value
        config = cls(**{**merged, **used}) if used else plain
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any) -> dict[str, Any]:
        folder = hub.resolve(pretrained_model_name_or_path, **hub_kwargs)
        path = folder / hub.CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no {hub.CONFIG_NAME} in {folder}: a Hugging Face model folder needs one "
                "(it names the architecture and its sizes)"
            )
        try:
            config_dict = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(config_dict, dict):
            raise ValueError(f"{path} must hold a JSON object, found {type(config_dict).__name__}")
        config_dict.setdefault("_name_or_path", str(pretrained_model_name_or_path))
        return config_dict

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> PretrainedConfig:
        hub_kwargs = pop_hub_kwargs(kwargs)
        config_dict = cls.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
        return cls.from_dict(config_dict, **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PretrainedConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


def _default_dict(config_class: type[PretrainedConfig]) -> dict[str, Any]:
    try:
        return config_class().to_dict()
    except Exception:  # a config class that cannot be built without arguments
        return {}


def _diff_part(values: dict[str, Any], base: dict[str, Any], part: PretrainedConfig) -> dict[str, Any]:
    """A part's entries that differ from its class's defaults (those the base class lacks always stay)."""
    defaults = _default_dict(type(part))
    diff = {}
    for key, value in values.items():
        inner = getattr(part, key, None)
        if isinstance(inner, PretrainedConfig) and isinstance(base.get(key), dict):
            diff[key] = _diff_part(value, base[key], inner)
        elif key not in base or key not in defaults or value != defaults[key]:
            diff[key] = value
    return diff


def check_attention_sizes(config: Any, size_fields: tuple[str, ...]) -> None:
    """Positive integer sizes, and attention heads that split evenly into key/value groups."""
    for name in size_fields:
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({config.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({config.num_key_value_heads})"
        )
    if config.head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {config.head_dim}")


def sub_config(config_class: type[PretrainedConfig], value: Any) -> PretrainedConfig:
    """A composite config's part (text_config, vision_config) from None (defaults), a dict or a config."""
    if value is None:
        return config_class()
    if isinstance(value, dict):
        return config_class(**{k: v for k, v in value.items() if k != "model_type"})
    if isinstance(value, config_class):
        return value
    raise TypeError(f"expected a {config_class.__name__} or a dict, got {type(value).__name__}")


# transformers 5 spells the base class with a capital C; both names work.
PreTrainedConfig = PretrainedConfig

HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder")


def pop_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the arguments meant for hub.resolve out of a from_pretrained call's kwargs."""
    hub_kwargs = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
    # Accepted for compatibility; huggingface_hub decides these itself.
    for key in ("force_download", "proxies", "trust_remote_code", "use_safetensors", "resume_download"):
        kwargs.pop(key, None)
    return hub_kwargs
