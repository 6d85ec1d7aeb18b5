"""The mask description and the three backends realising it."""

from __future__ import annotations

import pytest
import torch

from herd.layers.attention import AttentionMask, attention, build_attention_mask


def test_causal_mask_with_offset_and_padding_by_hand():
    padding = torch.tensor([[0, 1, 1, 1, 1]])
    mask = build_attention_mask(padding, batch_size=1, query_length=2, past_length=3, kv_length=5)
    expected = torch.tensor([[False, True, True, True, False], [False, True, True, True, True]])
    assert torch.equal(mask.boolean(torch.device("cpu"))[0, 0], expected)


def test_static_cache_columns_beyond_written_are_hidden():
    mask = build_attention_mask(torch.ones(1, 3), batch_size=1, query_length=1, past_length=2, kv_length=6)
    assert torch.equal(mask.boolean(torch.device("cpu"))[0, 0, 0], torch.tensor([True, True, True, False, False, False]))
    no_padding = build_attention_mask(None, batch_size=1, query_length=1, past_length=2, kv_length=6)
    assert not no_padding.is_plain_causal  # kv_length > seen: sdpa must get a mask


def test_plain_causal_needs_no_tensor():
    mask = build_attention_mask(torch.ones(2, 4), batch_size=2, query_length=4, past_length=0, kv_length=4)
    assert mask.is_plain_causal and mask.padding_mask is None


def test_packed_sequences_by_hand():
    position_ids = torch.tensor([[0, 1, 0, 1, 2]])
    mask = build_attention_mask(None, batch_size=1, query_length=5, past_length=0, kv_length=5, position_ids=position_ids)
    allowed = mask.boolean(torch.device("cpu"))[0, 0]
    assert allowed[3].tolist() == [False, False, True, True, False]
    assert allowed[1].tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("query_length,past", [(6, 0), (1, 5), (3, 4)])
def test_backends_agree_with_padding_and_gqa(query_length, past):
    torch.manual_seed(0)
    batch, heads, kv_heads, dim = 2, 4, 2, 8
    kv_length = past + query_length
    query = torch.randn(batch, heads, query_length, dim)
    key, value = torch.randn(batch, kv_heads, kv_length, dim), torch.randn(batch, kv_heads, kv_length, dim)
    padding = torch.ones(batch, kv_length, dtype=torch.long)
    padding[1, :2] = 0
    outputs = {}
    for backend in ("eager", "sdpa", "flex_attention"):
        mask = build_attention_mask(padding, batch_size=batch, query_length=query_length, past_length=past, kv_length=kv_length)
        outputs[backend], _ = attention(backend, query, key, value, mask, dim**-0.5)
    real_rows = slice(None) if past >= 2 else slice(2, None)
    for backend in ("sdpa", "flex_attention"):
        assert (outputs[backend][:, real_rows] - outputs["eager"][:, real_rows]).abs().max() < 1e-5, backend
    # by hand for row 0, last query: softmax over every visible key, head h reads kv head h // 2
    for head in range(heads):
        keys, values = key[0, head // 2], value[0, head // 2]  # (kv_length, dim)
        weights = (keys @ query[0, head, -1] * dim**-0.5).softmax(-1)
        assert (outputs["eager"][0, -1, head] - weights @ values).abs().max() < 1e-5


def test_output_attentions_falls_back_to_weights():
    query = key = value = torch.randn(1, 2, 3, 4)
    mask = AttentionMask(3, 3)
    _, weights = attention("sdpa", query, key, value, mask, 0.5, output_attentions=True)
    assert weights.shape == (1, 2, 3, 3)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 2, 3))
    assert weights[0, 0, 0, 1:].abs().max() == 0


def test_custom_4d_mask_is_used_as_is():
    custom = torch.ones(1, 1, 3, 3, dtype=torch.bool)  # bidirectional
    mask = build_attention_mask(custom, batch_size=1, query_length=3, past_length=0, kv_length=3)
    query = key = value = torch.randn(1, 2, 3, 4)
    out, weights = attention("eager", query, key, value, mask, 0.5, output_attentions=True)
    assert (weights[0, 0, 0] > 0).all()
    with pytest.raises(ValueError, match="4D attention_mask"):
        build_attention_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), batch_size=1, query_length=3, past_length=0, kv_length=3)
