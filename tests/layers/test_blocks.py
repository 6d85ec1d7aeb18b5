"""The reference blocks' arithmetic, by hand: RMSNorm, SwiGLU, rotary."""

from __future__ import annotations

import torch

from herd.layers.mlp import GatedMLP
from herd.layers.norm import RMSNorm, rms_norm
from herd.layers.rope import apply_rotary


def test_rms_norm_by_hand():
    x = torch.tensor([[3.0, 4.0]])
    # mean of squares 12.5: each value over sqrt(12.5), times the weight
    expected = torch.tensor([[3.0, 4.0]]) / 12.5**0.5 * torch.tensor([2.0, 0.5])
    assert torch.allclose(rms_norm(x, torch.tensor([2.0, 0.5]), 0.0), expected)
    norm = RMSNorm(2, eps=0.0)
    norm.weight.data = torch.tensor([2.0, 0.5])
    assert torch.allclose(norm(x.view(1, 1, 2)), expected.view(1, 1, 2))


def test_rms_norm_rounds_before_the_weight_in_bf16():
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    weight = torch.randn(64, dtype=torch.bfloat16)
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(rms_norm(x, weight, 1e-5), weight * normed)


def test_gated_mlp_and_rotary_match_their_definitions():
    mlp = GatedMLP(4, 6)
    x = torch.randn(3, 4)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    assert torch.allclose(mlp(x), mlp.down_proj(gate * torch.sigmoid(gate) * up))
    query, key = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    cos, sin = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    q, k = apply_rotary(query, key, cos, sin)
    # dimension i turns with i + head_dim/2: (x0, x1, x2, x3) -> x*cos + (-x2, -x3, x0, x1)*sin
    turned = torch.cat([-query[..., 2:], query[..., :2]], dim=-1)
    assert torch.allclose(q, query * cos[:, None] + turned * sin[:, None])
    turned_key = torch.cat([-key[..., 2:], key[..., :2]], dim=-1)
    assert torch.allclose(k, key * cos[:, None] + turned_key * sin[:, None])
