"""decoding/kv.py's paged store (the server's) with the FP8 KV cache: which pools are e4m3, and the
prefill's write (quantized per token and head) and read (dequantized as the plain FP8 cache reads)."""

from __future__ import annotations

import torch

from herd.cache import FP8_KV_DTYPE, StaticCache, fp8_quantize
from herd.decoding.kv import CHUNKED, FULL, PagedKV, PagedPrefillCache

KV_HEADS, HEAD_DIM, BLOCK = 2, 8, 4


def _store(cache_dtype=FP8_KV_DTYPE) -> PagedKV:
    """Layers 0 and 2 full, layer 1 chunked; 5 full blocks and 3 chunked ones of 4 slots."""
    return PagedKV({FULL: [0, 2], CHUNKED: [1]}, {FULL: 5, CHUNKED: 3}, BLOCK, KV_HEADS, HEAD_DIM, max_rows=4,
                   table_width=3, dtype=torch.float32, device="cpu", cache_dtype=cache_dtype)


def test_fp8_pools_are_the_full_layers():
    """The full layers' pools are e4m3 with float32 scales per (kv head, slot), handed to the plan
    with the layer; the chunked layers' windows stay in the model's dtype, as the plain FP8 cache
    keeps them. Without cache_dtype every pool is the model's dtype."""
    kv = _store()
    for layer in (0, 2):
        assert kv.keys[layer].dtype == kv.values[layer].dtype == FP8_KV_DTYPE
        assert kv.keys[layer].shape == (1, KV_HEADS, 5 * BLOCK, HEAD_DIM)
        assert kv.key_scales[layer].shape == kv.value_scales[layer].shape == (1, KV_HEADS, 5 * BLOCK)
        assert kv.key_scales[layer].dtype == torch.float32
        assert kv.layer(layer).key_scales is kv.key_scales[layer]
        assert kv.layer(layer).value_scales is kv.value_scales[layer]
    assert kv.keys[1].dtype == torch.float32 and 1 not in kv.key_scales
    assert kv.layer(1).key_scales is None and kv.layer(1).value_scales is None
    plain = _store(None)
    assert {t.dtype for t in (*plain.keys.values(), *plain.values.values())} == {torch.float32}
    assert not plain.key_scales and plain.layer(0).key_scales is None


def test_fp8_prefill_writes_quantized_and_reads_as_the_plain_fp8_cache():
    """Two rows' prompts in two chunks from the same positions, the second row right-padded to the
    first's chunk (its padding goes to slot 0 of block 0): the bytes and scales at each real
    position's slot are fp8_quantize's, no other slot but 0 changes, and what the chunk attends to
    is bit for bit what cache.StaticCache's FP8 path returns for each row alone."""
    generator = torch.Generator().manual_seed(0)
    kv = _store()
    before = [t.clone() for t in (kv.keys[0].view(torch.uint8), kv.key_scales[0])]
    slots = torch.tensor([[5, 6, 7, 9, 10], [13, 14, 15, 0, 0]])  # (rows, end): row 1 has 3 positions
    lengths = [5, 3]
    chunks = [(0, 2), (2, 5)]
    plain = [StaticCache(max_cache_len=5, dtype="fp8") for _ in lengths]
    written = {}
    for start, end in chunks:
        cache = PagedPrefillCache(kv, {FULL: slots, CHUNKED: slots}, start, {FULL: 0, CHUNKED: 0})
        keys, values = (3 * torch.randn(2, KV_HEADS, end - start, HEAD_DIM, generator=generator) for _ in range(2))
        seen_keys, seen_values = cache.update(keys, values, 0)
        assert seen_keys.shape == (2, KV_HEADS, end, HEAD_DIM) and seen_keys.dtype == torch.float32
        for row, length in enumerate(lengths):
            real = min(end, length) - start  # the row's real positions in this chunk
            if real <= 0:
                continue
            expected_keys, expected_values = plain[row].update(keys[row : row + 1, :, :real],
                                                               values[row : row + 1, :, :real], 0)
            # the positions the row has so far: as the plain FP8 cache returns them, bit for bit
            assert torch.equal(seen_keys[row, :, : start + real], expected_keys[0, :, : start + real])
            assert torch.equal(seen_values[row, :, : start + real], expected_values[0, :, : start + real])
            for position in range(start, start + real):
                written[int(slots[row, position])] = keys[row, :, position - start]
    for slot, key in written.items():  # (kv_heads, head_dim)
        quantized, scale = fp8_quantize(key[None, :, None])  # a token's scale per head
        assert torch.equal(kv.keys[0].view(torch.uint8)[0, :, slot], quantized.view(torch.uint8)[0, :, 0])
        assert torch.equal(kv.key_scales[0][0, :, slot], scale[0, :, 0, 0])
    untouched = [s for s in range(5 * BLOCK) if s not in written and s != 0]
    assert torch.equal(kv.keys[0].view(torch.uint8)[:, :, untouched], before[0][:, :, untouched])
    assert torch.equal(kv.key_scales[0][:, :, untouched], before[1][:, :, untouched])
