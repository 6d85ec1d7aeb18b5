"""Rotary frequencies against hand-computed values and the reference's functions."""

from __future__ import annotations

import math

import pytest
import torch

from herd.layers.rope import RotaryEmbedding, apply_rotary, compute_inv_freq, standardize_rope_parameters
from tests.models.llama.test_modeling_llama import ROPE_CASES


def test_default_frequencies_by_hand():
    params = standardize_rope_parameters(None, rope_theta=100.0, max_position_embeddings=8)
    inv_freq, scaling = compute_inv_freq(params, head_dim=4, max_position_embeddings=8)
    assert scaling == 1.0
    assert torch.allclose(inv_freq, torch.tensor([1.0, 100.0 ** -0.5]))


def test_rotation_by_hand():
    # head_dim 2: one frequency; position p rotates (x, y) by p * inv_freq radians.
    params = standardize_rope_parameters(None, max_position_embeddings=8)
    rope = RotaryEmbedding(params, head_dim=2, max_position_embeddings=8)
    cos, sin = rope(torch.tensor([[0, 1, 2]]), torch.float32)
    vector = torch.tensor([1.0, 0.0]).expand(1, 1, 3, 2)
    rotated, _ = apply_rotary(vector, vector, cos, sin)
    expected = torch.tensor([[1.0, 0.0], [math.cos(1), math.sin(1)], [math.cos(2), math.sin(2)]])
    assert torch.allclose(rotated[0, 0], expected, atol=1e-6)


@pytest.mark.parametrize("case", list(ROPE_CASES))
@pytest.mark.parametrize("seq_len", [None, 100])
def test_inverse_frequencies_match_reference(case, seq_len):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, max_position_embeddings=32,
                                      **ROPE_CASES[case])
    ours_params = standardize_rope_parameters(ROPE_CASES[case]["rope_parameters"], max_position_embeddings=32, head_dim=8)
    ours, ours_scaling = compute_inv_freq(ours_params, 8, 32, seq_len)
    rope_type = ours_params["rope_type"]
    if rope_type == "default":
        expected = 1.0 / (ours_params["rope_theta"] ** (torch.arange(0, 8, 2).float() / 8))
        expected_scaling = 1.0
    else:
        expected, expected_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    assert torch.equal(ours, expected.float())
    assert ours_scaling == pytest.approx(expected_scaling)


def test_legacy_type_key_and_top_level_original_length():
    params = standardize_rope_parameters(None, rope_scaling={"type": "yarn", "factor": 2.0}, rope_theta=5.0,
                                         max_position_embeddings=64, original_max_position_embeddings=16)
    assert params == {"rope_type": "yarn", "factor": 2.0, "rope_theta": 5.0, "original_max_position_embeddings": 16}


def test_frequencies_never_sized_from_max_position_embeddings():
    # Llama 4 configs say 10M positions: nothing proportional to that may be allocated.
    params = standardize_rope_parameters(None, max_position_embeddings=10_485_760)
    rope = RotaryEmbedding(params, head_dim=128, max_position_embeddings=10_485_760)
    assert sum(b.numel() for b in rope.buffers()) == 64


def test_dynamic_rope_is_stateless_across_calls_where_the_reference_is_not(tmp_path):
    """herd: a call's output does not depend on an earlier, longer one. transformers keeps the
    frequencies of the longest sequence seen (until a call shorter than max_position_embeddings),
    so its output for the same input changes after a long call."""
    import herd
    from tests.conftest import max_abs_diff, reference_llama, save_reference

    def fresh_reference():
        # a large factor and a long call far past max_position_embeddings: a visible difference
        return reference_llama(max_position_embeddings=16, rope_parameters={
            "rope_type": "dynamic", "factor": 8.0, "rope_theta": 10000.0})

    reference = fresh_reference()
    ours = herd.LlamaForCausalLM.from_pretrained(save_reference(reference, tmp_path / "ckpt"), progress=False)
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # 24 tokens: past max_position_embeddings, shorter than the long call; 16: exactly at it
        for length in (24, 16):
            short = ids[:, :length]
            fresh = fresh_reference()(short).logits
            ours_before = ours(short).logits
            ours(ids)
            reference(ids)
            ours_after, reference_after = ours(short).logits, reference(short).logits
            assert torch.equal(ours_before, ours_after), length
            assert max_abs_diff(ours_after, fresh) < 1e-6, length
            # herd equals a fresh reference (to rounding); the used one is off by far more than that
            assert max_abs_diff(reference_after, fresh) > 1e-4, length  # it remembers the long call
        # a call shorter than max_position_embeddings resets the reference: both agree again
        assert max_abs_diff(reference(ids[:, :8]).logits, ours(ids[:, :8]).logits) < 1e-4
