"""Linear layers that read one input, run as one matmul (q/k/v, gate/up), without extra memory.

`fuse` copies the layers' weights into one (sum of out features, in) tensor and points each
layer's weight at its block of it, so the model keeps q_proj, k_proj, ... with their checkpoint
names, its reference forward is unchanged, and the fused weight costs nothing. A later `.to()`
or load replaces the layers' storage: `fuse` notices (the blocks no longer sit in the fused
tensor) and fuses again.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Fused(NamedTuple):
    weight: torch.Tensor  # (sum of out features, in)
    bias: torch.Tensor | None
    pointers: tuple[int, ...]  # where each layer's weight started when fused


def still_fused(fused: Fused | None, linears: tuple[nn.Linear, ...]) -> bool:
    return fused is not None and fused.pointers == tuple(layer.weight.data_ptr() for layer in linears) \
        and fused.weight.data_ptr() == fused.pointers[0]


@torch.no_grad()
def fuse(*linears: nn.Linear, previous: Fused | None = None) -> Fused:
    """The layers' weights (and biases) as one tensor, the layers pointing into it. `previous`: the
    result of an earlier call on the same layers, returned as is while it still holds."""
    if still_fused(previous, linears):
        return previous
    if len({(layer.in_features, layer.weight.dtype, layer.bias is None) for layer in linears}) != 1:
        raise ValueError("only linears of one input size, dtype and bias setting can be fused")
    weight = torch.cat([layer.weight for layer in linears], dim=0)
    bias = torch.cat([layer.bias for layer in linears], dim=0) if linears[0].bias is not None else None
    start = 0
    for layer in linears:
        rows = layer.out_features
        layer.weight.data = weight[start : start + rows]
        if bias is not None:
            layer.bias.data = bias[start : start + rows]
        start += rows
    return Fused(weight, bias, tuple(layer.weight.data_ptr() for layer in linears))
