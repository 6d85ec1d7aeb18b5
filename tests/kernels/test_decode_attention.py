"""kernels/decode_attention.py: the split decode attention kernels against the torch arithmetic.

On CPU the kernels run in Triton's interpreter (float32 and float16: it has no bfloat16 products)."""

from __future__ import annotations

import pytest
import torch

from herd.cache import fp8_dequantize, fp8_quantize
from herd.kernels import decode_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(decode_attention.triton is None, reason="needs Triton")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _case(batch, heads, kv_heads, slots, dim, dtype, seed=0, visible=0.7):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, 1, dim, generator=generator)
    keys = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    values = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    allowed = torch.rand(batch, slots, generator=generator) < visible
    allowed[:, 0] = True  # every query sees at least its own slot
    to = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return to(query), to(keys), to(values), allowed.to(DEVICE)


def _slot(slot=0):
    return torch.tensor([slot], device=DEVICE)


def _torch_result(query, keys, values, allowed, scaling):
    return decode_attention.torch_attend(query, keys, values, allowed, scaling)


def _check(out, query, keys, values, allowed, scaling):
    expected = _torch_result(query, keys, values, allowed, scaling)
    if query.dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:  # weights rounded before normalising, partial sums in float32: within a few units in the last place
        exact = _torch_result(query.double(), keys.double(), values.double(), allowed, scaling)
        kernel_error = (out.double() - exact).abs().max().item()
        torch_error = (expected.double() - exact).abs().max().item()
        assert kernel_error <= 2 * torch_error + 2e-3, (kernel_error, torch_error)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch,heads,kv_heads,slots,dim,splits",
    [
        (1, 4, 1, 64, 16, 1),  # one range: the first kernel writes the output
        (2, 8, 2, 200, 32, 3),  # ranges of unequal fill, slots not a multiple of the block
        (1, 5, 1, 130, 16, 2),  # a group of 5 query heads (Llama 4 Scout's 40 / 8)
        (3, 6, 6, 64, 64, None),  # no grouping (Llama 2 7B)
        (1, 32, 8, 256, 64, None),  # Llama-3.2-1B's heads: 8 ranges of one block of 32
        (2, 8, 2, 300, 128, None),  # 128 dimensions: blocks of 64
        (2, 4, 2, 70, 16, 8),  # more ranges than blocks: the later ranges are empty
        (1, 8, 2, 300, 16, None),  # the default plan: 5 ranges of 64 slots, the last one part-filled
    ],
)
def test_matches_torch(dtype, batch, heads, kv_heads, slots, dim, splits):
    query, keys, values, allowed = _case(batch, heads, kv_heads, slots, dim, dtype)
    for new_slot in (0, slots // 2, slots - 1):  # the slot read again after the previous kernel: in the first block or not
        out = decode_attention.launch(query.reshape(batch, -1).contiguous(), keys, values, allowed, _slot(new_slot),
                                      dim**-0.5, splits=splits)
        assert out.shape == (batch, heads * dim)
        _check(out, query, keys, values, allowed, dim**-0.5)


@needs_triton
def test_a_grid_launched_as_an_ordinary_kernel_gives_the_same_output():
    """Grids of long ranges launch after the previous kernel (plan_programmatic), compiled without
    the programmatic launch's wait; forced here on a small case: the output is the programmatic
    launch's."""
    batch, heads, kv_heads, slots, dim = 16, 8, 2, 512, 16
    query, keys, values, allowed = _case(batch, heads, kv_heads, slots, dim, torch.float32)
    outs = [decode_attention.launch(query.reshape(batch, -1).contiguous(), keys, values, allowed, _slot(slots - 1),
                                    dim**-0.5, splits=16, programmatic=programmatic) for programmatic in (False, True)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    _check(outs[0], query, keys, values, allowed, dim**-0.5)


@needs_triton
def test_a_range_with_nothing_visible_does_not_poison_the_merge():
    """Only the first slots are visible: the later ranges hold no allowed key at all."""
    query, keys, values, allowed = _case(1, 4, 2, 256, 16, torch.float32)
    allowed[:, 10:] = False
    out = decode_attention.launch(query.reshape(1, -1).contiguous(), keys, values, allowed, _slot(3), 0.25, splits=4)
    assert torch.isfinite(out).all()
    _check(out, query, keys, values, allowed, 0.25)


@needs_triton
def test_masked_slots_are_ignored_whatever_they_hold():
    query, keys, values, allowed = _case(1, 4, 2, 128, 16, torch.float32)
    expected = decode_attention.launch(query.reshape(1, -1).contiguous(), keys, values, allowed, _slot(), 0.25)
    keys[:, :, ~allowed[0]] = 1e4
    values[:, :, ~allowed[0]] = -1e4
    out = decode_attention.launch(query.reshape(1, -1).contiguous(), keys, values, allowed, _slot(), 0.25)
    torch.testing.assert_close(out, expected)


@needs_triton
def test_plan_splits():
    assert decode_attention.plan_splits(1, 8, 4096) == 16  # about one program per SM
    assert decode_attention.plan_splits(1, 8, 256) == 4  # no range shorter than a block of 64 slots
    assert decode_attention.plan_splits(1, 8, 65) == 2
    assert decode_attention.plan_splits(4, 8, 4096) == 8  # 256 programs of 512 slots
    assert decode_attention.plan_splits(64, 8, 4096) == 1  # the batch fills the GPU already
    assert decode_attention.plan_splits(1, 8, 256, block=32) == 8
    # long caches: up to 512 programs, ranges of at least 512 slots, a power of two of them
    assert decode_attention.plan_splits(1, 8, 32768) == 64
    assert decode_attention.plan_splits(1, 8, 16384) == 32
    assert decode_attention.plan_splits(1, 8, 12288) == 16  # 24 ranges' worth: the power of two below
    assert decode_attention.plan_splits(1, 8, 122880) == 64
    assert decode_attention.plan_splits(1, 8, 8192) == 16
    assert decode_attention.plan_splits(4, 8, 32768) == 16
    assert decode_attention.plan_splits(64, 8, 131072) == 1  # 512 programs already


def test_plan_programmatic():
    """The range kernel is a programmatic dependent except in grids beyond 256 programs of ranges
    of 512+ slots."""
    def plan(batch, slots):
        return decode_attention.plan_programmatic(batch, 8, decode_attention.plan_splits(batch, 8, slots), slots)

    assert not plan(1, 122880)  # 512 programs of 1920 slots
    assert not plan(1, 32768)  # 512 programs of 512 slots
    assert plan(1, 16384)  # 256 programs
    assert plan(1, 4096) and plan(1, 8192)  # 128 programs (chunked rings)
    assert not plan(16, 4096)  # 512 programs of 1024 slots
    assert plan(64, 192)  # 512 programs of 192 slots


def test_plan_block():
    assert decode_attention.plan_block(64) == 32  # Llama-3.2-1B's heads: shorter blocks, more ranges
    assert decode_attention.plan_block(128) == 64


def test_applies():
    query, keys, _, _ = _case(1, 4, 2, 64, 16, torch.float32)
    assert decode_attention.applies(query, keys) == (decode_attention.triton is not None and DEVICE == "cuda")
    odd = torch.zeros(1, 2, 64, 24, device=DEVICE)
    assert not decode_attention.applies(torch.zeros(1, 4, 1, 24, device=DEVICE), odd)  # head size not a power of two
    small = torch.zeros(1, 2, 64, 8, device=DEVICE)
    assert not decode_attention.applies(torch.zeros(1, 4, 1, 8, device=DEVICE), small)  # below the products' 16


def test_attend_falls_back_to_the_torch_arithmetic():
    """Where the kernels do not apply (a head size of 24), attend is the softmax over allowed slots."""
    query, keys, values, allowed = (t.cpu().double() if t.is_floating_point() else t.cpu()
                                    for t in _case(2, 4, 2, 10, 24, torch.float32))
    out = decode_attention.attend(query, keys, values, allowed, torch.tensor([0]), 0.3)  # (2, 4 * 24)
    for row in range(2):
        for head in range(4):
            scores = (keys[row, head // 2] @ query[row, head, 0]) * 0.3  # (10,)
            weights = torch.softmax(scores.masked_fill(~allowed[row], float("-inf")), dim=0)
            torch.testing.assert_close(out[row, head * 24 : (head + 1) * 24], weights @ values[row, head // 2])


def _fp8_case(batch, heads, kv_heads, slots, dim, dtype):
    """An FP8 cache as the FP8 KV cache stores it (cache.fp8_quantize): e4m3 bytes and a float32
    scale per (row, kv head, slot)."""
    query, keys, values, allowed = _case(batch, heads, kv_heads, slots, dim, torch.float32)
    (keys, key_scales), (values, value_scales) = (fp8_quantize(t * 3) for t in (keys, values))
    return query.to(dtype), keys, values, allowed, key_scales[..., 0], value_scales[..., 0]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,heads,kv_heads,slots,dim,splits", [(1, 4, 1, 64, 16, 1), (2, 8, 2, 200, 32, 3),
                                                                    (1, 5, 1, 130, 16, None)])
def test_fp8_cache_matches_torch(dtype, batch, heads, kv_heads, slots, dim, splits):
    """e4m3 keys/values times each slot's scale after the load: as the torch fallback, which
    dequantizes the cache as the plain FP8 cache does."""
    query, keys, values, allowed, key_scales, value_scales = _fp8_case(batch, heads, kv_heads, slots, dim, dtype)
    expected = decode_attention.torch_attend(query, keys, values, allowed, dim**-0.5, key_scales, value_scales)
    dequantized = [fp8_dequantize(t, s[..., None], dtype) for t, s in ((keys, key_scales), (values, value_scales))]
    assert torch.equal(expected, decode_attention.torch_attend(query, *dequantized, allowed, dim**-0.5))
    for new_slot in (0, slots - 1):
        out = decode_attention.launch(query.reshape(batch, -1).contiguous(), keys, values, allowed, _slot(new_slot),
                                      dim**-0.5, splits=splits, key_scales=key_scales, value_scales=value_scales)
        _check(out, query, *dequantized, allowed, dim**-0.5)


@needs_triton
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
def test_fp8_slots_nobody_sees_change_nothing(dtype):
    """With a 16-bit query (scales applied per slot), masked slots of an FP8 cache may hold any
    scales, NaN included: the output is the one with those slots' scales zeroed."""
    query, keys, values, allowed, key_scales, value_scales = _fp8_case(2, 8, 2, 200, 32, dtype)
    run = lambda ks, vs: decode_attention.launch(query.reshape(2, -1).contiguous(), keys, values, allowed,  # noqa: E731
                                                 _slot(0), 32**-0.5, splits=3, key_scales=ks, value_scales=vs)
    hidden = ~allowed[:, None, :].expand_as(key_scales)
    zeroed = run(key_scales.masked_fill(hidden, 0.0), value_scales.masked_fill(hidden, 0.0))
    poisoned = run(key_scales.masked_fill(hidden, float("nan")), value_scales.masked_fill(hidden, float("nan")))
    assert torch.isfinite(zeroed).all()
    torch.testing.assert_close(poisoned, zeroed, rtol=0, atol=0)


def test_fp8_cache_scales_matter():
    """The torch fallback reads the scales: a slot's scale doubled doubles what its value contributes."""
    query, keys, values, allowed, key_scales, value_scales = _fp8_case(1, 2, 1, 8, 16, torch.float32)
    allowed[:] = False
    allowed[:, 3] = True  # one visible slot: the output is its value
    value_scales[:, :, 3] *= 2
    out = decode_attention.torch_attend(query, keys, values, allowed, 0.25, key_scales, value_scales)
    torch.testing.assert_close(out.view(2, 16), (values[0, 0, 3].float() * value_scales[0, 0, 3]).expand(2, 16))
