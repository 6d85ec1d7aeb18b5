import torch
from torch import nn

from . import kernels
from .activations import get_activation
from .fused import fused_linear, is_fused


def activation_product(gate: torch.Tensor, up: torch.Tensor, act_fn) -> torch.Tensor:
    return act_fn(gate) * up


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the SwiGLU feed-forward of every Llama."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_fused(self.gate_proj, self.up_proj):  # the fast path fused them: one matmul
            gate, up = fused_linear(x, self.gate_proj, self.up_proj).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)  # (..., intermediate) each
        rows = gate.numel() // gate.shape[-1]
        product = kernels.fused(activation_product, (gate.reshape(rows, -1), up.reshape(rows, -1), self.act_fn),
                                dynamic=[(0,), (0,)])
        return self.down_proj(product.view(gate.shape))

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward() with gate and up as one matmul (once `fuse_linears(gate_proj, up_proj)` ran):
        the arithmetic the fast path's decode step compiles."""
        gate, up = fused_linear(x, self.gate_proj, self.up_proj).chunk(2, dim=-1)
        return self.down_proj(activation_product(gate, up, self.act_fn))
