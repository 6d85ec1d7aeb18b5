"""Llama 4's routed experts with FP8, int8 or int4 weights.

The tensors keep the checkpoint's orientation, (experts, in, out) (transformers'
FbgemmFp8Llama4TextExperts names): gate_up_proj (experts, hidden, 2 * intermediate) and down_proj
(experts, intermediate, hidden).
- FP8 / int8: one float32 scale per expert and output column, `<name>_scale` (experts, 1, out).
- int4: asymmetric in groups of `group_size` input rows, the rule of the int4 linears
  (formats.quantize_int4_groups): `<name>` packed (experts, in / 2, out) uint8 (input rows 2j and
  2j + 1 in the low and high nibble of row j), `<name>_scale` and `<name>_offset` (experts,
  in / group_size, out) in the model's dtype. Half of int8's bytes: Scout's experts in 4 bits
  leave room on one GPU for a long context.
The routing (which tokens go to which expert) is the model's own; only `expert_forward` changes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.routed_experts import dequantized_experts
from .formats import FP8, FP8_MAX, Scheme, quantize_activation_rows, quantize_int4_groups

PROJECTIONS = ("gate_up_proj", "down_proj")


def quantize_expert_columns(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts, in, out) -> data (experts, in, out), float32 scale (experts, 1, out): each output
    column of each expert scaled on its own (an expert's "row" in nn.Linear terms)."""
    w32 = weight.float()
    top = FP8_MAX if fmt == "fp8" else 127.0
    scale = (w32.abs().amax(dim=1, keepdim=True) / top).clamp(min=1e-12)
    if fmt == "fp8":
        return (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    return torch.round(w32 / scale).clamp(-127, 127).to(torch.int8), scale


def quantize_expert_groups(weight: torch.Tensor, group_size: int, dtype: torch.dtype
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(experts, in, out) -> packed uint8 (experts, in / 2, out), scale and offset (experts, in /
    group_size, out) in `dtype`: each expert's columns quantized as an int4 linear's rows are, one
    expert at a time (a float32 copy of one expert, not of all)."""
    parts = [quantize_int4_groups(expert.t(), group_size, dtype) for expert in weight]  # each (out, in / 2), (out, groups) x 2
    return tuple(torch.stack([part[i].t() for part in parts]) for i in range(3))


def quantize_experts(weight: torch.Tensor, scheme: Scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """(experts, in, out) float -> the stored tensors by suffix ("", "_scale"[, "_offset"])."""
    if scheme.format == "int4":
        data, scale, offset = quantize_expert_groups(weight, scheme.group_size, dtype)
        return {"": data, "_scale": scale, "_offset": offset}
    data, scale = quantize_expert_columns(weight, scheme.format)
    return {"": data, "_scale": scale}


class QuantizedExperts(nn.Module):
    def __init__(self, experts: nn.Module, scheme: Scheme, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if scheme.format not in ("fp8", "int8", "int4"):
            raise ValueError(f"Llama 4 experts are stored as fp8, int8 or int4, not {scheme.format}")
        self.scheme = scheme
        self.num_experts, self.hidden_size = experts.num_experts, experts.hidden_size
        self.intermediate_size, self.act_fn = experts.intermediate_size, experts.act_fn
        self._route = type(experts).forward  # the model's routing, calling expert_forward below
        # Set by tensor parallel (experts split along their intermediate size, so down_proj by its
        # input rows) with FP8 activations per token: the local amax (rows, 1) of down_proj's input
        # -> the whole rows' amax (a MAX across the ranks), the one-process scale.
        self.reduce_down_activation_amax = None
        for name in PROJECTIONS:
            experts_count, rows, columns = getattr(experts, name).shape
            if scheme.format == "int4":
                groups = rows // scheme.group_size
                self.register_buffer(name, torch.empty(experts_count, rows // 2, columns, dtype=torch.uint8, device="meta"))
                for suffix in ("_scale", "_offset"):
                    self.register_buffer(name + suffix, torch.empty(experts_count, groups, columns, dtype=dtype, device="meta"))
                continue
            data_dtype = FP8 if scheme.format == "fp8" else torch.int8
            self.register_buffer(name, torch.empty(experts_count, rows, columns, dtype=data_dtype, device="meta"))
            self.register_buffer(name + "_scale", torch.empty(experts_count, 1, columns, dtype=torch.float32, device="meta"))

    def stored(self, name: str) -> tuple[torch.Tensor, ...]:
        """Projection `name`'s stored tensors: (data, scale) or, for int4, (data, scale, offset)."""
        suffixes = ("", "_scale", "_offset") if self.scheme.format == "int4" else ("", "_scale")
        return tuple(getattr(self, name + suffix) for suffix in suffixes)

    def forward(self, *args, **kwargs):
        return self._route(self, *args, **kwargs)

    def dequantized(self, name: str, expert, dtype: torch.dtype) -> torch.Tensor:
        """Expert(s) `expert` of projection `name` as float weights (in, out) in `dtype`."""
        return dequantized_experts(*(tensor[expert] for tensor in self.stored(name)), dtype=dtype)

    def _project(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        if self.scheme.activations == "dynamic":  # FBGEMM's rule: FP8 activations per token
            reduce_amax = self.reduce_down_activation_amax if name == "down_proj" else None
            x_q, x_scale = quantize_activation_rows(x, self.scheme.activation_scale_ub, reduce_amax)
            weight = getattr(self, name)[expert]
            product = x_q.float() @ weight.float()
            return (product * x_scale * getattr(self, name + "_scale")[expert]).to(x.dtype)
        return x @ self.dequantized(name, expert, x.dtype)

    def expert_forward(self, expert: int, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self._project(hidden_states, "gate_up_proj", expert).chunk(2, dim=-1)
        return self._project(up * self.act_fn(gate), "down_proj", expert)
