"""generate(prefill_chunk_size=N): the prompt prefilled N tokens at a time, on the plain and the fast
path, gives transformers' greedy tokens, for Llama and for Llama 4 with chunks smaller and larger
than its attention chunk and not multiples of it. The reference prefills Llama in chunks too; for
Llama 4 its chunked prefill fails in transformers 5.17 (create_chunked_causal_mask() gets an
unexpected block_sequence_ids), so its whole-prompt tokens are the reference there (chunking
must not change them)."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.decoding import decoders
from tests.conftest import left_padded_prompts, reference_llama, save_reference
from tests.models.llama4.test_modeling_llama4 import reference_llama4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefill-chunks")
    llama = reference_llama(max_position_embeddings=256)
    llama4 = reference_llama4(attention_chunk_size=8, interleave_moe_layer_step=2)
    return {"llama": (save_reference(llama, root / "llama"), llama, herd.LlamaForCausalLM),
            "llama4": (save_reference(llama4, root / "llama4"), llama4, herd.Llama4ForCausalLM)}


@pytest.mark.parametrize("family", ["llama", "llama4"])
@pytest.mark.parametrize("chunk", [3, 5, 8, 13, 64])
@pytest.mark.parametrize("fast", [False, True])
def test_chunked_prefill_gives_the_reference_tokens(folders, monkeypatch, family, chunk, fast):
    folder, reference, cls = folders[family]
    if fast:
        monkeypatch.setattr(decoders, "FAST_DEVICES", ("cuda", "cpu"))
    model = cls.from_pretrained(folder, progress=False)
    ids, mask = left_padded_prompts((23, 17, 9), vocab=128, seed=chunk)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    reference_chunk = dict(prefill_chunk_size=chunk, cache_implementation="static") if family == "llama" else {}
    expected = reference.generate(ids, **reference_chunk, **kwargs)
    calls = []
    real_forward = decoders.forward_tokens
    monkeypatch.setattr(decoders, "forward_tokens", lambda m, t, *a, **k: calls.append(t.shape[1]) or real_forward(m, t, *a, **k))
    got = model.generate(ids, prefill_chunk_size=chunk, disable_compile=not fast, **kwargs)
    assert torch.equal(got, expected)
    assert calls[: -(-23 // chunk)] == [min(chunk, 23 - start) for start in range(0, 23, chunk)]  # the prompt in pieces
    assert (decoders.fast_decoder(model).entry is not None) == fast


def test_a_bad_prefill_chunk_size_is_refused(folders):
    folder, _, cls = folders["llama"]
    model = cls.from_pretrained(folder, progress=False)
    with pytest.raises(ValueError, match="prefill_chunk_size must be a positive integer"):
        model.generate(torch.ones(1, 4, dtype=torch.long), prefill_chunk_size=0, max_new_tokens=2)


@pytest.mark.parametrize("chunk", [3, 8, 13, 64])
@pytest.mark.parametrize("fast", [False, True])
def test_chunked_prefill_with_the_hybrid_cache_gives_the_reference_tokens(folders, monkeypatch, chunk, fast):
    """cache_implementation="hybrid" (static full layers, chunked layers bounded to their window:
    a StaticCache on the plain path, the ring on the fast path), prefill chunks smaller and larger
    than Llama 4's attention chunk of 8, against transformers' whole-prompt tokens."""
    from herd.cache import StaticCache

    folder, reference, cls = folders["llama4"]
    if fast:
        monkeypatch.setattr(decoders, "FAST_DEVICES", ("cuda", "cpu"))
    model = cls.from_pretrained(folder, progress=False)
    ids, mask = left_padded_prompts((23, 17, 9), vocab=128, seed=chunk)
    kwargs = dict(attention_mask=mask, max_new_tokens=11, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = reference.generate(ids, **kwargs)
    caches = []
    real_forward = decoders.forward_tokens
    monkeypatch.setattr(decoders, "forward_tokens", lambda m, t, a, cache, **k: caches.append(cache) or real_forward(m, t, a, cache, **k))
    got = model.generate(ids, prefill_chunk_size=chunk, cache_implementation="hybrid", disable_compile=not fast, **kwargs)
    assert torch.equal(got, expected)
    if not fast:
        cache = caches[0]
        assert isinstance(cache, StaticCache)
        windowed = [layer for layer, kind in enumerate(model.config.layer_types) if kind == "chunked_attention"]
        assert windowed and all(cache._windowed.stored_length(layer) <= 8 for layer in windowed)  # bounded
    assert (decoders.fast_decoder(model).entry is not None) == fast
