"""Quantized weights: the formats a linear can hold, the configs that choose them, and the two
steps the loader runs for a quantized model.

1. `apply_quantization(model, config, dtype)` on the meta-device model: each nn.Linear the config
   picks becomes a `QuantizedLinear` of its format (and Llama 4's experts `QuantizedExperts`).
2. `tensor_converter(model, dtype)`: while loading, a float checkpoint tensor meant for a
   quantized module is quantized right there, tensor by tensor (never the whole float model in
   memory); a tensor already stored quantized is taken as it is.

`gguf`: llama.cpp's GGUF files (Llama architecture).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import (ALWAYS_KEPT, CompressedTensorsConfig, FbgemmFp8Config, HerdQuantConfig, Int4WeightOnlyConfig,
                     Int8WeightOnlyConfig, QuantizationConfig, TorchAoConfig, from_dict)
from .experts import PROJECTIONS, QuantizedExperts, quantize_experts
from .formats import QuantizedLinear, Scheme, quantize_weight

__all__ = [
    "CompressedTensorsConfig", "FbgemmFp8Config", "HerdQuantConfig", "Int4WeightOnlyConfig", "Int8WeightOnlyConfig",
    "QuantizationConfig", "QuantizedExperts", "QuantizedLinear", "Scheme", "TorchAoConfig", "apply_quantization",
    "config_from_name", "from_dict", "tensor_converter", "weight_tensors",
]


def _is_experts(module: nn.Module) -> bool:
    """Llama 4's routed experts: both projections stored as (experts, in, out) parameters."""
    return all(isinstance(getattr(module, name, None), nn.Parameter) and getattr(module, name).dim() == 3
               for name in PROJECTIONS)


def apply_quantization(model: nn.Module, config: QuantizationConfig, dtype: torch.dtype) -> int:
    """Swap the modules `config` picks for their quantized form (on the meta device, before
    loading). Returns how many were swapped."""
    swaps: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if type(module) is nn.Linear and path.rpartition(".")[2] not in config.always_kept:
            scheme = config.scheme_for(path)
            if scheme is not None:
                if scheme.format == "int4" and module.in_features % scheme.group_size:
                    raise ValueError(
                        f"int4 group_size {scheme.group_size} does not divide the {module.in_features} input "
                        f"features of {path}; choose a group size that does (32, 64, 128, 256), or list "
                        f"{path!r} in modules_to_not_convert")
                swaps.append((path, QuantizedLinear(module.in_features, module.out_features, module.bias is not None,
                                                    scheme, dtype=dtype, device="meta")))
        elif _is_experts(module):
            scheme = config.experts_scheme(path)
            if scheme is not None:
                if scheme.format == "int4" and any(getattr(module, name).shape[1] % scheme.group_size
                                                   for name in PROJECTIONS):
                    raise ValueError(
                        f"int4 group_size {scheme.group_size} does not divide the input width of {path} "
                        f"({', '.join(str(getattr(module, name).shape[1]) for name in PROJECTIONS)}); choose a group "
                        f"size that does (32, 64, 128, 256), or list {path!r} in modules_to_not_convert")
                swaps.append((path, QuantizedExperts(module, scheme, dtype=dtype)))
    for path, replacement in swaps:
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, replacement)
    return len(swaps)


def tensor_converter(model: nn.Module, dtype: torch.dtype) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """name, tensor (a checkpoint tensor already renamed to its module key) -> the tensors to
    assign, by module key, in their final dtypes; None for a tensor outside the quantized modules
    (the loader casts it as usual). Float weights are quantized on the tensor's device."""
    quantized = {path: module for path, module in model.named_modules()
                 if isinstance(module, (QuantizedLinear, QuantizedExperts))}

    def convert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        path, _, leaf = name.rpartition(".")
        module = quantized.get(path)
        if module is None:
            return None
        if isinstance(module, QuantizedExperts):
            if leaf in PROJECTIONS and tensor.is_floating_point() and tensor.dtype != getattr(module, leaf).dtype:
                return {name + suffix: value for suffix, value in quantize_experts(tensor, module.scheme, dtype).items()}
            return {name: tensor.to(getattr(module, leaf).dtype)}
        if leaf == "weight" and tensor.dtype != module.weight.dtype:
            if module.scheme.block is not None or module.scheme.activations == "static":
                raise ValueError(f"{name} is stored as {tensor.dtype}, but the checkpoint's quantization_config "
                                 "says it was quantized; the checkpoint and its config.json disagree")
            return {f"{path}.{key}": value for key, value in quantize_weight(tensor, module.scheme, dtype).items()}
        if leaf == "weight_scale" and module.scheme.format != "int4" and module.scheme.block is None \
                and tensor.numel() == 1:
            # a per-tensor scale (compressed-tensors' "tensor" strategy) is every row's scale
            return {name: tensor.float().reshape(1, 1).expand(module.out_features, 1).contiguous()}
        target = getattr(module, leaf, None)
        if target is not None and tensor.numel() == target.numel():
            tensor = tensor.to(target.dtype).reshape(target.shape)
        return {name: tensor}

    convert.owns = lambda name: name.rpartition(".")[0] in quantized  # shapes it checks after converting
    return convert


def quantized_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))]


def config_from_name(name: str | None) -> QuantizationConfig | None:
    """The command lines' --quantization fp8 / int8 / int4 -> the config object from_pretrained takes."""
    if name is None:
        return None
    if name == "fp8":
        return FbgemmFp8Config()
    if name == "int8":
        return TorchAoConfig("int8_weight_only")
    if name == "int4":
        return TorchAoConfig("int4_weight_only", group_size=128)
    raise ValueError(f"unknown quantization {name!r}; use fp8, int8 or int4")


def weight_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's parameters and its quantized modules' stored weights (buffers: data, scales)."""
    quantized = {path for path, module in model.named_modules() if isinstance(module, (QuantizedLinear, QuantizedExperts))}
    return [*model.named_parameters(),
            *[(name, buffer) for name, buffer in model.named_buffers() if name.rpartition(".")[0] in quantized]]
