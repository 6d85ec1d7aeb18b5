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


# --- the FP8 KV cache ---------------------------------------------------------------------------


def test_fp8_quantize_by_hand():
    from herd.cache import FP8_MAX, fp8_dequantize, fp8_quantize

    states = torch.randn(2, 3, 7, 16) * torch.tensor([0.01, 1.0, 50.0]).view(1, 3, 1, 1)  # heads of very different sizes
    states[0, 0, 3] = 0.0  # an all-zero head of one token
    stored, scale = fp8_quantize(states)
    assert stored.dtype == torch.float8_e4m3fn and stored.shape == states.shape
    assert scale.shape == (2, 3, 7, 1)  # one per head of each token
    expected_scale = (states.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    assert torch.equal(scale, expected_scale)
    back = fp8_dequantize(stored, scale, torch.float32)
    # e4m3: 3 mantissa bits, so within 2^-4 of each value (relative) above its token's normal range
    normal = states.abs() > expected_scale * 2**-6
    assert ((back - states).abs()[normal] <= states.abs()[normal] * 2**-4).all()
    assert (back[0, 0, 3] == 0).all()
    # every token's largest value is exactly representable: 448 * scale
    assert torch.allclose(back.abs().amax(dim=-1), states.abs().amax(dim=-1))


@pytest.mark.parametrize("family", ["llama", "llama4"])
def test_fp8_cache_follows_the_float32_cache(tmp_path, family):
    """Teacher-forced: the same tokens through a float32 StaticCache and an FP8 one. Logits agree
    within 1% of their range (0.3% measured), the greedy choice at 90% of the steps at least (tiny random models
    have near ties); only the full-attention layers are stored in FP8, with a scale per token and head."""
    from tests.conftest import left_padded_prompts
    from tests.models.llama4.test_modeling_llama4 import reference_llama4

    if family == "llama":
        reference, cls = reference_llama(max_position_embeddings=256), herd.LlamaForCausalLM
    else:
        reference, cls = reference_llama4(interleave_moe_layer_step=2), herd.Llama4ForCausalLM
    model = cls.from_pretrained(save_reference(reference, tmp_path / "ckpt"), progress=False)
    ids, mask = left_padded_prompts((40, 31, 25), vocab=128, seed=2)
    caches = {kind: StaticCache(model.config, max_cache_len=48, dtype=dtype)
              for kind, dtype in (("float32", None), ("fp8", "float8_e4m3fn"))}
    with torch.no_grad():
        logits = {kind: _run_incrementally(model, ids, cache, mask, prefill=12)[0] for kind, cache in caches.items()}
    real = mask.bool()[:, 11:]
    expected, got = logits["float32"][:, 11:][real], logits["fp8"][:, 11:][real]
    assert max_abs_diff(got, expected) <= 0.01 * (expected.max() - expected.min())
    assert max_abs_diff(got, expected) > 0  # it is not the float32 cache
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    fp8 = caches["fp8"]
    full = [i for i, kind in enumerate(getattr(model.config, "layer_types", None) or ["full_attention"] * 2)
            if kind == "full_attention"]
    for layer in full:
        assert fp8.key_cache[layer].dtype == torch.float8_e4m3fn and fp8.value_cache[layer].dtype == torch.float8_e4m3fn
        assert fp8.key_scales[layer].shape == (3, model.config.num_key_value_heads, 48, 1)
    for layer in set(range(model.config.num_hidden_layers)) - set(full):  # chunked windows: the model's dtype
        assert fp8._windowed.key_cache[layer].dtype == torch.float32


def test_fp8_cache_through_generate(tmp_path, monkeypatch):
    """generate(cache_config={"dtype": "float8_e4m3fn"}): the plain decoder over an FP8 StaticCache
    (also beam search, whose reordering moves the scales with the rows); bad spellings are refused."""
    from herd.decoding import decoders

    model = herd.LlamaForCausalLM.from_pretrained(save_reference(reference_llama(), tmp_path / "ckpt"), progress=False)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    made = []
    real_start = decoders.PlainDecoder.start
    monkeypatch.setattr(decoders.PlainDecoder, "start", lambda self, *a: made.append(real_start(self, *a)) or made[-1])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    plain = model.generate(ids, **kwargs)
    fp8 = model.generate(ids, cache_config={"dtype": "fp8"}, **kwargs)
    assert isinstance(made[-1], StaticCache) and made[-1].is_fp8
    assert fp8.shape == plain.shape and (fp8 == plain).float().mean() >= 0.8
    beams = model.generate(ids, num_beams=3, cache_config={"dtype": "float8_e4m3fn"}, **kwargs)
    assert made[-1].is_fp8 and beams.shape == plain.shape
    with pytest.raises(ValueError, match="KV cache dtype 'int3' is not supported"):
        model.generate(ids, cache_config={"dtype": "int3"}, **kwargs)
    with pytest.raises(ValueError, match="use cache_implementation='static' or 'hybrid'"):
        model.generate(ids, cache_config={"dtype": "fp8"}, cache_implementation="dynamic", **kwargs)
    with pytest.raises(ValueError, match="cache_config takes"):
        model.generate(ids, cache_config={"nbits": 4}, **kwargs)
    # where the fast path runs, it runs with the FP8 cache too (tests/decoding/test_decoders.py compares them)
    monkeypatch.setattr(decoders, "FAST_DEVICES", ("cuda", "cpu"))
    assert decoders.why_not_fast(model, herd.GenerationConfig(cache_config={"dtype": "fp8"}), past_key_values=None,
                                 extra_outputs=False) is None


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_a_reset_cache_serves_another_sequence_as_a_new_one(pair, cache_kind):
    _, model = pair
    first, second = (torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(seed)) for seed in (1, 2))
    cache = DynamicCache() if cache_kind == "dynamic" else StaticCache(model.config, max_cache_len=16)
    with torch.no_grad():
        _run_incrementally(model, first, cache)
        cache.reset()
        assert cache.get_seq_length() == 0
        again, _ = _run_incrementally(model, second, cache)
        fresh = DynamicCache() if cache_kind == "dynamic" else StaticCache(model.config, max_cache_len=16)
        expected, _ = _run_incrementally(model, second, fresh)
    assert torch.equal(again, expected)
