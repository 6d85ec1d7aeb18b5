"""Caches: a prompt then one token at a time gives the logits of one forward over everything."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.cache import DynamicCache, StaticCache
from tests.conftest import max_abs_diff, reference_llama, save_reference

TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = reference_llama()
    folder = save_reference(reference, tmp_path_factory.mktemp("cache") / "ckpt")
    return reference, herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


def _run_incrementally(model, ids, cache, mask=None, prefill=5):
    logits = []
    out = model(ids[:, :prefill], attention_mask=None if mask is None else mask[:, :prefill],
                past_key_values=cache, use_cache=True)
    logits.append(out.logits)
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=None if mask is None else mask[:, : t + 1],
                    past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1), out.past_key_values


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_incremental_equals_full_forward(pair, attn, cache_kind):
    _, model = pair
    model.set_attn_implementation(attn)
    try:
        ids = torch.randint(1, 128, (2, 11), generator=torch.Generator().manual_seed(0))
        cache = DynamicCache() if cache_kind == "dynamic" else StaticCache(model.config, max_cache_len=16)
        with torch.no_grad():
            full = model(ids, use_cache=False).logits
            stepped, cache = _run_incrementally(model, ids, cache)
        assert max_abs_diff(stepped, full) < TOL
        assert cache.get_seq_length() == 11
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_incremental_left_padded_batch_matches_reference(pair, cache_kind):
    reference, model = pair
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[mask == 0] = 0
    cache = DynamicCache() if cache_kind == "dynamic" else StaticCache(model.config, max_cache_len=12)
    with torch.no_grad():
        expected, _ = _run_incrementally(reference, ids, None, mask)
        got, _ = _run_incrementally(model, ids, cache, mask)
    real = mask.bool()
    assert max_abs_diff(got[real], expected[real]) < TOL


def test_cache_shapes_and_legacy_format(pair):
    _, model = pair
    ids = torch.randint(1, 128, (1, 6))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, DynamicCache) and len(cache) == 2
    keys, values = cache[0]
    assert keys.shape == values.shape == (1, 2, 6, 8)  # (batch, kv_heads, seq, head_dim): not repeated to 4 heads
    legacy = cache.to_legacy_cache()
    with torch.no_grad():
        via_legacy = model(ids[:, -1:] * 0 + 7, past_key_values=legacy).logits
        via_cache = model(ids[:, -1:] * 0 + 7, past_key_values=DynamicCache.from_legacy_cache(legacy)).logits
    assert max_abs_diff(via_legacy, via_cache) == 0


def test_use_cache_false_returns_no_cache(pair):
    _, model = pair
    with torch.no_grad():
        assert model(torch.tensor([[1, 2]]), use_cache=False).past_key_values is None


def test_static_cache_is_preallocated_and_refuses_overflow(pair):
    _, model = pair
    cache = StaticCache(model.config, max_cache_len=4)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), past_key_values=cache)
        assert cache.key_cache[0].shape == (1, 2, 4, 8)
        with pytest.raises(ValueError, match="StaticCache is full"):
            model(torch.tensor([[4, 5]]), past_key_values=cache)
    with pytest.raises(ValueError, match="max_cache_len"):
        StaticCache(model.config)


def test_dynamic_cache_crop_and_reorder(pair):
    _, model = pair
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        cache.crop(5)
        assert cache.get_seq_length() == 5
        after_crop = model(ids[:, 5:6], past_key_values=cache).logits
        fresh = model(ids[:, :6], use_cache=False).logits[:, -1:]
        assert max_abs_diff(after_crop, fresh) < TOL
        cache.reorder_cache(torch.tensor([1, 0]))
        assert cache.get_seq_length() == 6
        swapped = model(ids[:, 6:7].flip(0), past_key_values=cache).logits
        assert max_abs_diff(swapped, model(ids[:, :7], use_cache=False).logits[:, -1:].flip(0)) < TOL
