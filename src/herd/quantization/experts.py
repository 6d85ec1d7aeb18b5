"""Llama 4's routed experts with FP8 or int8 weights, one scale per expert and output column.

The tensors keep the checkpoint's layout (transformers' FbgemmFp8Llama4TextExperts names):
gate_up_proj (experts, hidden, 2 * intermediate) with gate_up_proj_scale (experts, 1, 2 * intermediate),
down_proj (experts, intermediate, hidden) with down_proj_scale (experts, 1, hidden). The routing
(which tokens go to which expert) is the model's own; only `expert_forward` changes.
"""

from __future__ import annotations

import torch
from torch import nn

from .formats import FP8, FP8_MAX, Scheme, quantize_activation_rows

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


class QuantizedExperts(nn.Module):
    def __init__(self, experts: nn.Module, scheme: Scheme):
        super().__init__()
        if scheme.format not in ("fp8", "int8"):
            raise ValueError(f"Llama 4 experts are stored as fp8 or int8, not {scheme.format}")
        self.scheme = scheme
        self.num_experts, self.hidden_size = experts.num_experts, experts.hidden_size
        self.intermediate_size, self.act_fn = experts.intermediate_size, experts.act_fn
        self._route = type(experts).forward  # the model's routing, calling expert_forward below
        data_dtype = FP8 if scheme.format == "fp8" else torch.int8
        for name in PROJECTIONS:
            shape = getattr(experts, name).shape
            self.register_buffer(name, torch.empty(shape, dtype=data_dtype, device="meta"))
            self.register_buffer(name + "_scale", torch.empty(shape[0], 1, shape[2], dtype=torch.float32, device="meta"))

    def forward(self, *args, **kwargs):
        return self._route(self, *args, **kwargs)

    def dequantized(self, name: str, expert, dtype: torch.dtype) -> torch.Tensor:
        """Expert(s) `expert` of projection `name` as float weights (in, out) in `dtype`."""
        return (getattr(self, name)[expert].float() * getattr(self, name + "_scale")[expert]).to(dtype)

    def _project(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        if self.scheme.activations == "dynamic":  # FBGEMM's rule: FP8 activations per token
            x_q, x_scale = quantize_activation_rows(x, self.scheme.activation_scale_ub)
            weight = getattr(self, name)[expert]
            product = x_q.float() @ weight.float()
            return (product * x_scale * getattr(self, name + "_scale")[expert]).to(x.dtype)
        return x @ self.dequantized(name, expert, x.dtype)

    def expert_forward(self, expert: int, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self._project(hidden_states, "gate_up_proj", expert).chunk(2, dim=-1)
        return self._project(up * self.act_fn(gate), "down_proj", expert)
