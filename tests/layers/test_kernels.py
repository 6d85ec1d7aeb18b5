"""layers/kernels.py: when the prefill's elementwise work is compiled, and that the functions it
compiles compute what the eager code does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from herd.layers import kernels
from herd.layers.mlp import activation_product
from herd.layers.norm import RMSNorm, rms_norm
from herd.layers.rope import _rotate, apply_rotary


def _fake_cuda(rows: int, width: int = 8):
    return SimpleNamespace(is_cuda=True, shape=(rows, width))


def test_compiled_only_for_cuda_inputs_with_enough_rows(monkeypatch):
    monkeypatch.delenv("HERD_DISABLE_FUSED_KERNELS", raising=False)
    rows = kernels.MIN_ROWS
    assert kernels._wants_compiled([_fake_cuda(rows)], [(0,)])
    assert not kernels._wants_compiled([_fake_cuda(rows - 1)], [(0,)])  # decode-sized: launches dominate
    assert not kernels._wants_compiled([torch.zeros(rows, 8)], [(0,)])  # CPU
    # every dynamic dimension must be long enough (query and key of a short prompt)
    assert not kernels._wants_compiled([_fake_cuda(rows), _fake_cuda(3)], [(0,), (0,)])
    with kernels.disabled():
        assert not kernels._wants_compiled([_fake_cuda(rows)], [(0,)])
    assert kernels._wants_compiled([_fake_cuda(rows)], [(0,)])
    monkeypatch.setenv("HERD_DISABLE_FUSED_KERNELS", "1")
    assert not kernels._wants_compiled([_fake_cuda(rows)], [(0,)])


def test_eager_where_not_compiled(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("nothing is compiled on the CPU")

    monkeypatch.setattr(torch, "compile", refuse)
    x = torch.randn(100, 16)
    assert torch.equal(kernels.fused(rms_norm, (x, torch.ones(16), 1e-6), dynamic=[(0,)]), rms_norm(x, torch.ones(16), 1e-6))


def test_generate_with_disable_compile_turns_the_kernels_off(monkeypatch, tmp_path):
    import herd
    from tests.conftest import reference_llama, save_reference

    seen = []
    original = kernels._wants_compiled
    def spy(args, dynamic):
        seen.append(kernels._disabled_depth)
        return original(args, dynamic)

    monkeypatch.setattr(kernels, "_wants_compiled", spy)
    folder = save_reference(reference_llama(num_hidden_layers=1), tmp_path / "llama")
    model = herd.LlamaForCausalLM.from_pretrained(folder, progress=False)
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, disable_compile=True)
    assert seen and all(depth == 1 for depth in seen)
    seen.clear()
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    assert seen and all(depth == 0 for depth in seen)


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


def test_activation_product_and_rotary_match_their_definitions():
    gate, up = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(activation_product(gate, up, torch.nn.functional.silu), gate * torch.sigmoid(gate) * up)
    query, key = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    cos, sin = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    q, k = apply_rotary(query, key, cos, sin)
    # dimension i turns with i + head_dim/2: (x0, x1, x2, x3) -> x*cos + (-x2, -x3, x0, x1)*sin
    turned = torch.cat([-query[..., 2:], query[..., :2]], dim=-1)
    assert torch.allclose(q, query * cos[:, None] + turned * sin[:, None])
    assert all(torch.equal(a, b) for a, b in zip(_rotate(query, key, cos, sin), (q, k)))
