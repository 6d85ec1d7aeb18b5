"""The quantization configs users pass to from_pretrained and checkpoints carry in config.json.

Each config answers one question for the loading step: which format (formats.Scheme) a linear
layer with this module path gets, or None to keep it as it is. `from_dict` reads the
`quantization_config` entry of a config.json; `to_dict` writes it back.

- FbgemmFp8Config (transformers' spelling): FP8 weights per row, activations per token at run time.
- TorchAoConfig: int4 weight-only (grouped, asymmetric) or int8 weight-only (per row), in the
  seed's string form `TorchAoConfig("int4_weight_only", group_size=128)` or with a config object
  (`Int4WeightOnlyConfig(group_size=128)`: herd's own, or torchao's, read by its fields).
- CompressedTensorsConfig: pre-quantized LLM-Compressor checkpoints in the float-quantized
  format (FP8 weights per channel, tensor or block; activations dynamic per token or per group, or
  static).
- HerdQuantConfig: what herd writes for int8/int4 models it quantized (its own layout), and what a
  GGUF file's Q4_0/Q4_1 linears load as in a 16-bit model (int4, group 32, float16 scales).
"""

from __future__ import annotations

import re
from typing import Any

from .formats import INT4_GROUP_SIZES, Scheme

# Linear layers no config quantizes: the output head (as transformers' quantizers) and Llama 4's
# router (its scores pick experts: an error there changes the route, not just a number).
ALWAYS_KEPT = ("lm_head",)


def _matches(path: str, patterns: list[str] | None) -> bool:
    """Whether a module path is named by one of `patterns`, as transformers' quantizers read
    modules_to_not_convert (a regular expression matching the path's start, or the path's end); a
    pattern that is one whole component of the path ("self_attn") names everything under it too
    (herd's addition). `re:` + a regular expression is read too."""
    for pattern in patterns or ():
        if pattern.startswith("re:"):
            if re.match(pattern[3:], path):
                return True
        elif re.match(pattern, path) or path.endswith(pattern) or pattern in path.split("."):
            return True
    return False


def _compressed_matches(path: str, names: list[str]) -> bool:
    """Whether compressed-tensors' `ignore` or `targets` name the Linear at `path`: `re:` + a regular
    expression matching the path's start, the class name "Linear", or a module's name, which names
    that module only (compressed-tensors matches names whole: "model.layers.1" is not a Linear and
    names none of layer 1's or layer 10's linears). A name may carry a prefix the model's path does
    not, or the reverse (`language_model.lm_head` / `lm_head`: herd renames some checkpoint prefixes),
    so one ending with the other at a dot counts as the same module."""
    for name in names:
        if name.startswith("re:"):
            if re.match(name[3:], path):
                return True
        elif name == "Linear" or name == path or path.endswith("." + name) or name.endswith("." + path):
            return True
    return False


class QuantizationConfig:
    quant_method: str = ""
    prequantized = False  # the checkpoint already holds quantized tensors
    always_kept: tuple[str, ...] = ALWAYS_KEPT  # layer names kept in float whatever the config says

    def scheme_for(self, path: str) -> Scheme | None:
        raise NotImplementedError

    def experts_scheme(self, path: str) -> Scheme | None:
        """The format for Llama 4's expert tensors at `path` (None: kept as they are)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"

    def to_json_string(self, use_diff: bool = True) -> str:
        """The config as transformers writes it: JSON, keys sorted, indent 2, a final newline."""
        import json

        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str) -> None:
        with open(json_file_path, "w", encoding="utf-8") as file:
            file.write(self.to_json_string())

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """`cls(**config_dict)`, as transformers' from_dict: keyword arguments naming an attribute
        set it; the others are returned with return_unused_kwargs=True. A `quant_method` naming
        another config is an error naming both."""
        config_dict = dict(config_dict)
        method = config_dict.pop("quant_method", cls.quant_method)
        if method != cls.quant_method:
            raise ValueError(f"{cls.__name__}.from_dict: quant_method {method!r} is not {cls.quant_method!r}; "
                             "read a checkpoint's quantization_config with herd.quantization.from_dict")
        config = cls(**config_dict)
        unused = {}
        for key, value in kwargs.items():
            if hasattr(config, key):
                setattr(config, key, value)
            else:
                unused[key] = value
        return (config, unused) if return_unused_kwargs else config


class FbgemmFp8Config(QuantizationConfig):
    """FP8 (e4m3) weights with one scale per output row, quantized while loading; activations
    quantized per token at run time, each token's scale bounded by activation_scale_ub."""

    quant_method = "fbgemm_fp8"

    def __init__(self, activation_scale_ub: float = 1200.0, modules_to_not_convert: list[str] | None = None, **kwargs):
        self.activation_scale_ub = float(activation_scale_ub)
        self.modules_to_not_convert = modules_to_not_convert
        self.prequantized = bool(kwargs.pop("_prequantized", False))

    def _scheme(self) -> Scheme:
        return Scheme("fp8", activations="dynamic", activation_scale_ub=self.activation_scale_ub)

    def scheme_for(self, path: str) -> Scheme | None:
        return None if _matches(path, self.modules_to_not_convert) else self._scheme()

    def experts_scheme(self, path: str) -> Scheme | None:
        return self.scheme_for(path)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "activation_scale_ub": self.activation_scale_ub,
                "modules_to_not_convert": self.modules_to_not_convert}


class Int4WeightOnlyConfig:
    """torchao's name: int4 weights, asymmetric, one scale and offset per `group_size` columns."""

    def __init__(self, group_size: int = 128, **kwargs):
        self.group_size = group_size


class Int8WeightOnlyConfig:
    """torchao's name: int8 weights, symmetric, one scale per output row."""

    def __init__(self, **kwargs):
        pass


_TORCHAO_STRINGS = {"int4_weight_only": "int4", "int8_weight_only": "int8"}


class TorchAoConfig(QuantizationConfig):
    """Weight-only int4 or int8, quantized while loading: `TorchAoConfig("int4_weight_only",
    group_size=128)`, `TorchAoConfig("int8_weight_only")` or `TorchAoConfig(Int4WeightOnlyConfig(...))`."""

    quant_method = "torchao"

    def __init__(self, quant_type: Any, modules_to_not_convert: list[str] | None = None,
                 include_input_output_embeddings: bool = False, untie_embedding_weights: bool = False, **kwargs):
        self.modules_to_not_convert = modules_to_not_convert
        if include_input_output_embeddings:
            # transformers then quantizes the embeddings and lm_head too; herd keeps them in float
            raise ValueError("TorchAoConfig(include_input_output_embeddings=True): herd never quantizes the "
                             "embeddings or lm_head; leave it False (the default)")
        self.include_input_output_embeddings = False
        self.untie_embedding_weights = bool(untie_embedding_weights)
        if isinstance(quant_type, str):
            if quant_type not in _TORCHAO_STRINGS:
                raise ValueError(f"TorchAoConfig({quant_type!r}): herd runs {', '.join(_TORCHAO_STRINGS)}")
            self.format = _TORCHAO_STRINGS[quant_type]
            self.group_size = int(kwargs.pop("group_size", 128)) if self.format == "int4" else 0
        else:
            name = type(quant_type).__name__
            if name == "Int4WeightOnlyConfig":
                self.format, self.group_size = "int4", int(getattr(quant_type, "group_size", 128))
            elif name == "Int8WeightOnlyConfig":
                self.format, self.group_size = "int8", 0
            else:
                raise ValueError(f"TorchAoConfig({name}): herd runs Int4WeightOnlyConfig and Int8WeightOnlyConfig")
        kwargs.pop("quant_type_kwargs", None)
        if self.format == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"TorchAoConfig: int4 group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")
        self.quant_type = quant_type if isinstance(quant_type, str) else f"{self.format}_weight_only"

    def scheme_for(self, path: str) -> Scheme | None:
        if _matches(path, self.modules_to_not_convert):
            return None
        return Scheme(self.format, group_size=self.group_size)

    def experts_scheme(self, path: str) -> Scheme | None:
        # Llama 4's experts hold almost all of its weights: without them the model does not shrink.
        return self.scheme_for(path)

    def to_dict(self) -> dict[str, Any]:
        out = {"quant_method": self.quant_method, "quant_type": f"{self.format}_weight_only",
               "modules_to_not_convert": self.modules_to_not_convert,
               "include_input_output_embeddings": self.include_input_output_embeddings,
               "untie_embedding_weights": self.untie_embedding_weights}
        if self.format == "int4":
            out["group_size"] = self.group_size
        return out


class HerdQuantConfig(QuantizationConfig):
    """A checkpoint herd wrote from a model it quantized while loading (int8/int4, and FP8 from a
    config other than FBGEMM's): tensors in herd's layout (formats.py), loaded as stored."""

    quant_method = "herd"
    prequantized = True

    def __init__(self, format: str, group_size: int = 0, modules_to_not_convert: list[str] | None = None,
                 activations: str | None = None, activation_scale_ub: float | None = None,
                 scale_dtype: str | None = None, **kwargs):
        self.scheme = Scheme(format, group_size=group_size, activations=activations,
                             activation_scale_ub=activation_scale_ub, scale_dtype=scale_dtype)
        self.modules_to_not_convert = modules_to_not_convert

    def scheme_for(self, path: str) -> Scheme | None:
        return None if _matches(path, self.modules_to_not_convert) else self.scheme

    def experts_scheme(self, path: str) -> Scheme | None:
        return self.scheme_for(path)

    def to_dict(self) -> dict[str, Any]:
        out = {"quant_method": self.quant_method, "format": self.scheme.format,
               "group_size": self.scheme.group_size, "activations": self.scheme.activations,
               "activation_scale_ub": self.scheme.activation_scale_ub,
               "modules_to_not_convert": self.modules_to_not_convert}
        if self.scheme.scale_dtype is not None:  # int4 scales kept apart from the model's dtype (GGUF's float16)
            out["scale_dtype"] = self.scheme.scale_dtype
        return out


class CompressedTensorsConfig(QuantizationConfig):
    """LLM-Compressor's `compressed-tensors` checkpoints, float-quantized (FP8) format: each
    config group targets Linear layers; `ignore` lists names and `re:` patterns."""

    quant_method = "compressed-tensors"
    prequantized = True
    always_kept = ()  # the checkpoint's `ignore` says which layers are float, lm_head included

    def __init__(self, config_groups: dict[str, Any] | None = None, format: str | None = None,
                 ignore: list[str] | None = None, **kwargs):
        self.raw = {"config_groups": config_groups, "format": format, "ignore": ignore, **kwargs}
        self.ignore = ignore or []
        # Parts of a checkpoint that change the arithmetic beyond the linears' weights: loading
        # without them would run a different model, so they are refused by name.
        for key, what in (("kv_cache_scheme", "an FP8 KV cache (k_scale / v_scale)"),
                          ("transform_config", "rotations of the weights and activations")):
            if kwargs.get(key):
                raise ValueError(f"compressed-tensors {key} ({what}) is not supported by herd; "
                                 "it loads float-quantized (FP8) linear weights only")
        self.groups: list[tuple[list[str], Scheme]] = []
        for name, group in (config_groups or {}).items():
            group_format = group.get("format") or format
            if group_format not in ("float-quantized", "naive-quantized"):
                raise ValueError(
                    f"compressed-tensors format {group_format!r} (config group {name}) is not supported by herd; "
                    "it loads float-quantized (FP8) checkpoints")
            self.groups.append((group.get("targets") or ["Linear"], _compressed_scheme(name, group)))

    def scheme_for(self, path: str) -> Scheme | None:
        if _compressed_matches(path, self.ignore):
            return None
        for targets, scheme in self.groups:
            if _compressed_matches(path, targets):
                return scheme
        return None

    def experts_scheme(self, path: str) -> Scheme | None:
        """Llama 4's experts: LLM-Compressor writes them one Linear per expert and projection
        (`<path>.<e>.gate_proj`, ...; loading.StackedExperts reads them stacked), so the targets and
        `ignore` of the first expert's gate_proj say their format. herd's stacked experts take FP8
        with a scale per row (or per tensor) and per-token or no activation scales."""
        scheme = self.scheme_for(f"{path}.0.gate_proj")
        if scheme is not None and (scheme.block is not None or scheme.activations == "static"
                                   or scheme.activation_group_size):
            what = ("block scales" if scheme.block is not None else "static input scales"
                    if scheme.activations == "static" else "activation scales per group")
            raise ValueError(f"compressed-tensors: the Llama 4 experts at {path} are quantized with {what}, which "
                             "herd's experts do not run (they take FP8 with channel or tensor weight scales and "
                             "per-token or no activation quantization)")
        return scheme

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, **self.raw}


def _compressed_scheme(name: str, group: dict[str, Any]) -> Scheme:
    weights = group.get("weights") or {}
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise ValueError(f"compressed-tensors config group {name}: herd loads 8-bit float weights, "
                         f"got {weights.get('num_bits')}-bit {weights.get('type')}")
    strategy = weights.get("strategy")
    block = None
    if strategy == "block":
        block = tuple(weights.get("block_structure") or (128, 128))
    elif strategy not in ("channel", "tensor"):
        raise ValueError(f"compressed-tensors config group {name}: weight strategy {strategy!r} is not supported "
                         "(herd loads channel, tensor and block)")
    if group.get("output_activations"):
        raise ValueError(f"compressed-tensors config group {name}: quantized output activations are not supported "
                         "by herd")
    inputs = group.get("input_activations")
    activations, group_size = None, 0
    if inputs:
        if inputs.get("type") != "float" or inputs.get("num_bits") != 8:
            raise ValueError(f"compressed-tensors config group {name}: herd quantizes input activations to 8-bit "
                             f"float, got {inputs.get('num_bits')}-bit {inputs.get('type')}")
        activations = "dynamic" if inputs.get("dynamic") else "static"
        in_strategy = inputs.get("strategy")
        if activations == "static" and in_strategy != "tensor":
            raise ValueError(f"compressed-tensors config group {name}: static input activations must be per tensor")
        if activations == "dynamic" and in_strategy == "group" and inputs.get("group_size"):
            group_size = int(inputs["group_size"])
        elif activations == "dynamic" and (in_strategy != "token" or inputs.get("dynamic") is not True):
            raise ValueError(f"compressed-tensors config group {name}: dynamic input activations with strategy "
                             f"{in_strategy!r} are not supported (herd quantizes them per token or per group)")
    return Scheme("fp8", activations=activations, block=block, activation_group_size=group_size)


_CONFIG_CLASSES = {cls.quant_method: cls for cls in (FbgemmFp8Config, TorchAoConfig, HerdQuantConfig, CompressedTensorsConfig)}


def from_dict(entry: dict[str, Any] | QuantizationConfig, prequantized: bool = True) -> QuantizationConfig:
    """A config.json `quantization_config` entry -> its config object; an unknown method is an error
    naming it (never a silent bf16 load of quantized tensors)."""
    if isinstance(entry, QuantizationConfig):
        return entry
    entry = dict(entry)
    method = entry.pop("quant_method", None)
    cls = _CONFIG_CLASSES.get(method)
    if cls is None:
        raise ValueError(
            f"this checkpoint's quantization_config has quant_method {method!r}, which herd does not load; "
            f"herd loads {', '.join(sorted(_CONFIG_CLASSES))} checkpoints")
    if cls is TorchAoConfig:
        raise ValueError("this checkpoint was quantized by torchao (tensor subclasses in torchao's safetensors "
                         "layout), which herd does not read; load the unquantized checkpoint with "
                         "quantization_config=TorchAoConfig(...) instead")
    if cls is FbgemmFp8Config:
        entry["_prequantized"] = prequantized
    return cls(**entry)
