"""Linear layers that read one input run as one matmul (q/k/v, gate/up), without extra memory.

`fuse_linears` copies the layers' weights into one (sum of out features, in) tensor and points
each layer's weight at its block of it, so the model still has q_proj, k_proj, ... with their
checkpoint names and the fused weight costs nothing. `fused_linear` uses the fused weight while
it is still what the layers hold (a later `.to()` or a load replaces their storage; then it
falls back to one matmul per layer until fused again).
"""

from __future__ import annotations

import torch
from torch import nn

_ATTRIBUTE = "_fused_with_following"


def is_fused(*linears: nn.Linear) -> bool:
    """True while the layers' weights are still the blocks of one fused tensor."""
    fused = getattr(linears[0], _ATTRIBUTE, None)
    if fused is None:
        return False
    weight, _, pointers = fused
    return pointers == tuple(layer.weight.data_ptr() for layer in linears) and weight.data_ptr() == pointers[0]


@torch.no_grad()
def fuse_linears(*linears: nn.Linear) -> None:
    if is_fused(*linears):
        return
    in_features = {layer.in_features for layer in linears}
    has_bias = {layer.bias is not None for layer in linears}
    dtypes = {layer.weight.dtype for layer in linears}
    if len(in_features) != 1 or len(has_bias) != 1 or len(dtypes) != 1:
        return  # nothing to fuse: mixed shapes or formats
    weight = torch.cat([layer.weight for layer in linears], dim=0)  # (sum of out features, in)
    bias = torch.cat([layer.bias for layer in linears], dim=0) if linears[0].bias is not None else None
    start = 0
    for layer in linears:
        rows = layer.out_features
        layer.weight.data = weight[start : start + rows]
        if bias is not None:
            layer.bias.data = bias[start : start + rows]
        start += rows
    setattr(linears[0], _ATTRIBUTE, (weight, bias, tuple(layer.weight.data_ptr() for layer in linears)))


def fused_weight(*linears: nn.Linear) -> torch.Tensor | None:
    """The layers' weights as one (sum of out features, in) tensor, without copying: the fused
    weight, or the one layer's own weight. None when they are not fused."""
    if len(linears) == 1:
        return linears[0].weight
    fused = getattr(linears[0], _ATTRIBUTE, None)
    # Inside a compiled step the check ran just before (FastDecoder.start); pointers cannot be traced.
    if fused is not None and (torch.compiler.is_compiling() or is_fused(*linears)):
        return fused[0]
    return None


def fused_linear(x: torch.Tensor, *linears: nn.Linear) -> torch.Tensor:
    """x (..., in) -> the layers' outputs side by side (..., sum of out features)."""
    if len(linears) == 1:
        return linears[0](x)
    weight = fused_weight(*linears)
    if weight is not None:
        bias = getattr(linears[0], _ATTRIBUTE)[1]
        return nn.functional.linear(x, weight, bias)
    return torch.cat([layer(x) for layer in linears], dim=-1)

