"""Linear layers that read one input, run as one matmul (q/k/v, gate/up), without extra memory.

`fuse` copies the layers' weights into one (sum of out features, in) tensor and points each
layer's weight at its block of it, so the model keeps q_proj, k_proj, ... with their checkpoint
names, its reference forward is unchanged, and the fused weight costs nothing. A later `.to()`
or load replaces the layers' storage: `fuse` notices (the blocks no longer sit in the fused
tensor) and fuses again.

Quantized linears (quantization/formats.py) of one format fuse the same way: their data, scales
and offsets are all per output row, so each is stacked along the rows, and the fused weight is
the kernels' `QuantizedWeight`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn


class Fused(NamedTuple):
    weight: torch.Tensor | Any  # (sum of out features, in); for quantized linears a gemv.QuantizedWeight
    bias: torch.Tensor | None
    pointers: tuple[int, ...]  # where each layer's weight started when fused


def still_fused(fused: Fused | None, linears: tuple[nn.Linear, ...]) -> bool:
    if fused is None:
        return False
    data = fused.weight if isinstance(fused.weight, torch.Tensor) else fused.weight.data
    return fused.pointers == tuple(layer.weight.data_ptr() for layer in linears) and data.data_ptr() == fused.pointers[0]


@torch.no_grad()
def fuse(*linears: nn.Module, previous: Fused | None = None) -> Fused:
    """The layers' weights (and biases) as one tensor, the layers pointing into it. `previous`: the
    result of an earlier call on the same layers, returned as is while it still holds."""
    if still_fused(previous, linears):
        return previous
    if len({(layer.in_features, layer.weight.dtype, layer.bias is None, getattr(layer, "scheme", None))
            for layer in linears}) != 1:
        raise ValueError("only linears of one input size, dtype, format and bias setting can be fused")
    stored = kernel_tensor_names(linears[0])
    fused = {name: _stack_rows(linears, name) for name in stored}
    bias = _stack_rows(linears, "bias") if linears[0].bias is not None else None
    if stored == ("weight",):
        weight = fused["weight"]
    else:
        from ..quantization.formats import kernel_weight_of

        weight = kernel_weight_of(fused["weight"], fused["weight_scale"], fused.get("weight_offset"), linears[0].scheme)
    return Fused(weight, bias, tuple(layer.weight.data_ptr() for layer in linears))


def kernel_weight(linear: nn.Module):
    """What the decode kernels multiply by for one linear: an nn.Linear's weight tensor, or a
    quantized linear's gemv.QuantizedWeight."""
    return linear.weight if isinstance(linear, nn.Linear) else linear.kernel_weight()


def kernel_tensor_names(linear: nn.Module) -> tuple[str, ...]:
    """The per-row tensors a linear's weight is made of: an nn.Linear's weight, or a quantized
    linear's data, scales (and offsets)."""
    if isinstance(linear, nn.Linear):
        return ("weight",)
    if linear.scheme.block is not None:  # asked of the scheme: kernel_weight() would build the kernels' copy
        raise ValueError(f"{type(linear).__name__} holds a weight format the decode kernels do not read")
    return tuple(name for name in ("weight", "weight_scale", "weight_offset") if hasattr(linear, name))


def _stack_rows(linears, name: str) -> torch.Tensor:
    """One tensor with every layer's `name` stacked along the rows; each layer's `name` becomes
    its block of it (a view: no extra memory once the old tensors are freed)."""
    stacked = torch.cat([getattr(layer, name) for layer in linears], dim=0)
    start = 0
    for layer in linears:
        rows = getattr(layer, name).shape[0]
        block = stacked[start : start + rows]
        if isinstance(getattr(layer, name), nn.Parameter):
            getattr(layer, name).data = block
        else:
            setattr(layer, name, block)
        start += rows
    return stacked
