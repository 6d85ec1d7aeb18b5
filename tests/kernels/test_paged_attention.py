"""kernels/paged_attention.py: attention through a block table, kernel (Triton's interpreter on CPU)
against a torch reference written here (each row's positions copied out of the pool one by one);
FP8 pools (the FP8 KV cache) against the torch arithmetic on the dequantized pool."""

from __future__ import annotations

import pytest
import torch

from herd.cache import fp8_dequantize, fp8_quantize
from herd.kernels import paged_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(paged_attention.triton is None, reason="needs Triton")


def _case(batch, heads, kv_heads, dim, block_size, blocks, width, seed=0, windowed=False):
    """A pool of `blocks` blocks, each row a random table of distinct blocks and a random length
    (and, windowed, a first visible position inside it)."""
    generator = torch.Generator().manual_seed(seed)
    slots = blocks * block_size
    query = torch.randn(batch, heads, 1, dim, generator=generator)
    keys = torch.randn(1, kv_heads, slots, dim, generator=generator)
    values = torch.randn(1, kv_heads, slots, dim, generator=generator)
    table = torch.stack([torch.randperm(blocks, generator=generator)[:width] for _ in range(batch)]).int()
    lengths = torch.randint(1, width * block_size + 1, (batch,), generator=generator)
    first = torch.zeros(batch, dtype=torch.long)
    if windowed:
        first = (torch.rand(batch, generator=generator) * lengths).long()  # below each length
    return query, keys, values, table, first, lengths


def _reference(query, keys, values, table, first, lengths, block_size, scaling):
    """Row by row: the visible positions' keys/values looked up in the pool, softmax in float64."""
    batch, heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    out = torch.zeros(batch, heads * dim, dtype=torch.float64)
    for row in range(batch):
        positions = range(int(first[row]), int(lengths[row]))
        slots = [int(table[row, p // block_size]) * block_size + p % block_size for p in positions]
        for head in range(heads):
            kv_head = head // (heads // kv_heads)
            row_keys, row_values = keys[0, kv_head, slots].double(), values[0, kv_head, slots].double()
            weights = torch.softmax(row_keys @ query[row, head, 0].double() * scaling, dim=0)
            out[row, head * dim : (head + 1) * dim] = weights @ row_values
    return out


@pytest.mark.parametrize("windowed", [False, True])
def test_torch_fallback_matches_the_reference(windowed):
    case = _case(3, 4, 2, 24, 4, 12, 5, windowed=windowed)  # head size 24: the kernel does not apply
    out = paged_attention.attend(*case, 4, 0.3)
    torch.testing.assert_close(out.double(), _reference(*case, 4, 0.3), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize(
    "batch,heads,kv_heads,dim,block_size,blocks,width,splits,windowed",
    [
        (1, 4, 1, 16, 16, 8, 4, 1, False),  # one range: the first kernel writes the output
        (4, 8, 2, 32, 4, 40, 16, None, False),  # small pages, the default split plan
        (3, 5, 1, 16, 8, 30, 9, 3, True),  # a group of 5 query heads, windows (chunked layers)
        (5, 4, 4, 64, 16, 20, 6, 4, True),  # no grouping, more ranges than some rows' blocks
    ],
)
def test_kernel_matches_the_reference(batch, heads, kv_heads, dim, block_size, blocks, width, splits, windowed):
    query, keys, values, table, first, lengths = (t.to(DEVICE) for t in _case(batch, heads, kv_heads, dim, block_size,
                                                                               blocks, width, windowed=windowed))
    out = paged_attention.launch(query.reshape(batch, -1).contiguous(), keys, values, table, first, lengths,
                                 block_size, dim**-0.5, splits=splits)
    expected = _reference(query.cpu(), keys.cpu(), values.cpu(), table.cpu(), first.cpu(), lengths.cpu(), block_size,
                          dim**-0.5)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-4, atol=1e-4)


@needs_triton
def test_positions_outside_the_window_are_never_read():
    """Blocks past a row's length or before its first position may hold anything (another request's
    keys, NaN in a freed block): the output does not change."""
    query, keys, values, table, first, lengths = (t.to(DEVICE) for t in _case(2, 4, 2, 16, 4, 16, 6, windowed=True,
                                                                               seed=3))
    expected = paged_attention.launch(query.reshape(2, -1).contiguous(), keys, values, table, first, lengths, 4, 0.25)
    for row in range(2):
        for p in [*range(int(first[row])), *range(int(lengths[row]), 6 * 4)]:
            slot = int(table[row, p // 4]) * 4 + p % 4
            visible_elsewhere = any(
                int(table[other, q // 4]) * 4 + q % 4 == slot
                for other in range(2) for q in range(int(first[other]), int(lengths[other])))
            if not visible_elsewhere:
                keys[0, :, slot] = float("nan")
                values[0, :, slot] = float("nan")
    out = paged_attention.launch(query.reshape(2, -1).contiguous(), keys, values, table, first, lengths, 4, 0.25)
    torch.testing.assert_close(out, expected)


def _fp8_pool(keys, values):
    """The pool as the FP8 KV cache stores it (cache.fp8_quantize): e4m3 bytes and a float32 scale
    per (kv head, slot), (1, kv_heads, slots); and the pool dequantized to float32."""
    (keys, key_scales), (values, value_scales) = (fp8_quantize(t * 3) for t in (keys, values))
    dequantized = [fp8_dequantize(t, s, torch.float32) for t, s in ((keys, key_scales), (values, value_scales))]
    return (keys, values, key_scales[..., 0], value_scales[..., 0]), dequantized


def _seen_slots(table, first, lengths, block_size):
    """The slots some row sees."""
    return {int(table[row, p // block_size]) * block_size + p % block_size
            for row in range(table.shape[0]) for p in range(int(first[row]), int(lengths[row]))}


def test_fp8_torch_path_is_the_dequantized_pools():
    """The torch arithmetic (here a head size of 24, which the kernel does not take) gathers the
    bytes and their scales, and attends to them dequantized as the plain FP8 cache reads them."""
    query, keys, values, table, first, lengths = _case(3, 4, 2, 24, 4, 12, 5, windowed=True)
    fp8, dequantized = _fp8_pool(keys, values)
    out = paged_attention.attend(query, fp8[0], fp8[1], table, first, lengths, 4, 0.3, *fp8[2:])
    assert torch.equal(out, paged_attention.torch_paged_attend(query, *dequantized, table, first, lengths, 4, 0.3))
    torch.testing.assert_close(out.double(), _reference(query, *dequantized, table, first, lengths, 4, 0.3),
                               rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize(
    "batch,heads,kv_heads,dim,block_size,blocks,width,splits,windowed,dtype",
    [
        (1, 4, 1, 16, 16, 8, 4, 1, False, torch.float32),  # one range: the first kernel writes the output
        (4, 8, 2, 32, 4, 40, 16, 4, False, torch.float32),  # ragged rows over small pages, several ranges
        (3, 5, 1, 16, 8, 30, 9, 3, True, torch.float32),  # windows (chunked layers): first position > 0
        (3, 4, 2, 16, 4, 20, 6, 2, True, torch.float16),  # float16 products, the scales per slot
        (2, 8, 2, 128, 16, 24, 10, 1, False, torch.float16),  # heads of 128: blocks of 128 slots for FP8 pools
    ],
)
def test_fp8_kernel_matches_torch_on_the_dequantized_pool(batch, heads, kv_heads, dim, block_size, blocks, width,
                                                         splits, windowed, dtype):
    """e4m3 keys/values times each slot's scale after the load: the torch arithmetic on the pool
    dequantized to the query's dtype. Slots no row sees are never read (NaN scales there change
    nothing)."""
    query, keys, values, table, first, lengths = _case(batch, heads, kv_heads, dim, block_size, blocks, width,
                                                       windowed=windowed)
    query = query.to(dtype)
    (keys, values, key_scales, value_scales), _ = _fp8_pool(keys, values)
    dequantized = [fp8_dequantize(t, s[..., None], dtype) for t, s in ((keys, key_scales), (values, value_scales))]
    expected = paged_attention.torch_paged_attend(query, *dequantized, table, first, lengths, block_size, dim**-0.5)
    exact_pools = [fp8_dequantize(t, s[..., None], torch.float64) for t, s in ((keys, key_scales), (values, value_scales))]
    exact = paged_attention.torch_paged_attend(query.double(), *exact_pools, table, first, lengths, block_size,
                                               dim**-0.5)
    unseen = sorted(set(range(blocks * block_size)) - _seen_slots(table, first, lengths, block_size))
    key_scales[:, :, unseen] = float("nan")
    value_scales[:, :, unseen] = float("nan")
    query, keys, values, table, first, lengths, key_scales, value_scales = (
        t.to(DEVICE) for t in (query, keys, values, table, first, lengths, key_scales, value_scales))
    out = paged_attention.launch(query.reshape(batch, -1).contiguous(), keys, values, table, first, lengths,
                                 block_size, dim**-0.5, splits=splits, key_scales=key_scales,
                                 value_scales=value_scales)
    if dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)
    else:  # a 16-bit query multiplies the e4m3 values with the scales per slot (decode_attention): as
        # close to the exact result as torch on the dequantized pool, which rounds each value first
        kernel_error = (out.cpu().double() - exact).abs().max().item()
        torch_error = (expected.double() - exact).abs().max().item()
        assert kernel_error <= 1.5 * torch_error + 1e-3, (kernel_error, torch_error)
