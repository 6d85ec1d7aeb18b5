"""The decode step's attention over a paged key/value pool (the server's store, decoding/kv.PagedKV).

Keys and values of every request live in one pool per layer, (1, kv_heads, blocks * block_size,
head_dim): a request's position p is at flat slot block_table[row, p // block_size] * block_size
+ p % block_size. One new query per row attends to its positions [first_position, length): from
0 for full attention, from the start of its chunk for Llama 4's chunked layers. Positions outside
that range are never read (their blocks may belong to another request or be free).

The Triton kernel is decode_attention's split kernel with the slots read through the block
table: one program per (row, kv head, range of positions) reads each key/value once for the
query heads that share it, keeps a running softmax, and decode_attention's merge kernel joins
the ranges. `attend` runs it for CUDA tensors (Triton installed, a power-of-two head size of at
least 16) and otherwise the torch arithmetic (`torch_paged_attend`: the visible slots gathered,
then decode_attention.torch_attend).

FP8 pools (the FP8 KV cache, decoding/kv.PagedKV): keys/values float8_e4m3fn with a float32 scale
per (kv head, slot), key_scales/value_scales (1, kv_heads, slots). The kernel loads each slot's
bytes and scale through decode_attention's `_load_slots` and attends as decode_attention does
(with a 16-bit query: float16 products, the scales applied per slot); the torch arithmetic
gathers the bytes and scales and lets torch_attend dequantize them.
"""

from __future__ import annotations

import torch

from ..cache import FP8_KV_DTYPE
from .decode_attention import applies, plan_block, plan_splits, torch_attend

try:
    import triton
    import triton.language as tl

    from .decode_attention import _LIFT, _attend_block, _load_slots, _merge_ranges_kernel
except ImportError:
    triton = None


def gather_slots(block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """block_table (batch, blocks per row) -> the flat slot of every position (batch, blocks * block_size)."""
    offsets = torch.arange(block_size, device=block_table.device)
    return (block_table.long()[:, :, None] * block_size + offsets).flatten(1)


def gather_pool(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """pool (1, kv_heads, slots, ...) at slots (batch, positions) -> (batch, kv_heads, positions, ...);
    an FP8 pool through its bytes (float8 indexing is missing on some torch versions)."""
    if pool.dtype == FP8_KV_DTYPE:
        return gather_pool(pool.view(torch.uint8), slots).view(FP8_KV_DTYPE)
    return pool[0][:, slots].transpose(0, 1)


def torch_paged_attend(query, keys, values, block_table, first_position, lengths, block_size: int,
                       scaling: float, key_scales=None, value_scales=None) -> torch.Tensor:
    """The arithmetic the kernel replaces: each row's positions gathered from the pool, the
    invisible ones masked; an FP8 pool's with their scales, dequantized by torch_attend."""
    slots = gather_slots(block_table, block_size)  # (batch, positions)
    row_keys, row_values = gather_pool(keys, slots), gather_pool(values, slots)  # (batch, kv_heads, positions, dim)
    if key_scales is not None:  # (1, kv_heads, slots) -> (batch, kv_heads, positions)
        key_scales, value_scales = gather_pool(key_scales, slots), gather_pool(value_scales, slots)
    position = torch.arange(slots.shape[1], device=slots.device)
    allowed = (position >= first_position[:, None]) & (position < lengths[:, None])  # (batch, positions)
    return torch_attend(query, row_keys, row_values, allowed, scaling, key_scales, value_scales)


def attend(query, keys, values, block_table, first_position, lengths, block_size: int, scaling: float,
           key_scales=None, value_scales=None) -> torch.Tensor:
    """One query per row over its positions in a paged pool.

    query (batch, heads, 1, dim); keys/values (1, kv_heads, slots, dim); block_table (batch, blocks
    per row) int32; first_position, lengths (batch,): the row sees positions [first, length), at
    least one. An FP8 pool comes with key_scales/value_scales (1, kv_heads, slots) float32.
    Returns (batch, heads * dim)."""
    if not applies(query, keys, key_scales):
        return torch_paged_attend(query, keys, values, block_table, first_position, lengths, block_size, scaling,
                                  key_scales, value_scales)
    batch, heads, _, dim = query.shape
    return torch.ops.herd.paged_attention(query.reshape(batch, heads * dim), keys, values, block_table,
                                          first_position, lengths, block_size, scaling, key_scales, value_scales)


if triton is not None:

    @triton.jit
    def _paged_range_kernel(
        q_ptr,  # (batch, heads * DIM)
        k_ptr,  # (1, kv_heads, slots, DIM)
        v_ptr,
        k_scale_ptr,  # with FP8: (1, kv_heads, slots) float32 each (else any pointer, unread)
        v_scale_ptr,
        table_ptr,  # (batch, table_width) int32
        first_ptr,  # (batch,)
        length_ptr,  # (batch,)
        out_ptr,  # (batch, heads * DIM) when SPLITS == 1
        part_out_ptr,  # (batch, heads, SPLITS, DIM) float32
        part_max_ptr,  # (batch, heads, SPLITS) float32
        part_sum_ptr,  # (batch, heads, SPLITS) float32
        kv_heads,
        slots,
        table_width,
        block_size,
        scaling,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        DIM: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK: tl.constexpr,
        PRECISION: tl.constexpr,
        FP8: tl.constexpr = False,  # keys/values float8_e4m3fn with a float32 scale per slot
        SCALED: tl.constexpr = False,  # FP8 with a 16-bit query (decode_attention._attend_block)
    ):
        dtype = q_ptr.dtype.element_ty  # the pool's dtype, or with FP8 what it dequantizes to
        row_head = tl.program_id(0)  # row * kv_heads + kv head
        split = tl.program_id(1)
        row = row_head // kv_heads
        kv_head = row_head % kv_heads
        heads = kv_heads * GROUP
        d = tl.arange(0, DIM)
        first = tl.load(first_ptr + row).to(tl.int32)
        length = tl.load(length_ptr + row).to(tl.int32)
        # this row's positions split into SPLITS ranges of whole BLOCKs
        per_split = tl.cdiv(tl.cdiv(length - first, SPLITS), BLOCK) * BLOCK
        start = first + split * per_split
        end = tl.minimum(start + per_split, length)

        g = tl.arange(0, GROUP_PAD)
        g_ok = g < GROUP
        q_offsets = (row * heads + kv_head * GROUP + g)[:, None] * DIM + d[None, :]
        query = tl.load(q_ptr + q_offsets, mask=g_ok[:, None], other=0.0)  # (GROUP_PAD, DIM)
        if SCALED:
            query = query.to(tl.float16)
        running_max = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        running_sum = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, DIM), tl.float32)
        head_base = kv_head.to(tl.int64) * slots
        for block_start in range(start, end, BLOCK):
            p = block_start + tl.arange(0, BLOCK)  # (BLOCK,) positions of the row
            p_ok = p < end
            block = tl.load(table_ptr + row.to(tl.int64) * table_width + p // block_size, mask=p_ok, other=0)
            slot = block.to(tl.int64) * block_size + p % block_size
            kv_offsets = (head_base + slot)[:, None] * DIM + d[None, :]
            # (BLOCK, DIM) each; `first` False: the loads' default eviction, as this kernel always had
            key, key_scale = _load_slots(k_ptr, k_scale_ptr, kv_offsets, head_base + slot, p_ok, dtype, FP8, SCALED,
                                         False)
            value, value_scale = _load_slots(v_ptr, v_scale_ptr, kv_offsets, head_base + slot, p_ok, dtype, FP8,
                                             SCALED, False)
            running_max, running_sum, acc = _attend_block(query, key, value, p_ok, running_max, running_sum, acc,
                                                          scaling, dtype, PRECISION, key_scale, value_scale, SCALED)
        if SCALED:
            acc = acc * (1.0 / _LIFT)

        head = kv_head * GROUP + g
        if SPLITS == 1:
            out = acc / running_sum[:, None]
            tl.store(out_ptr + q_offsets, out.to(dtype), mask=g_ok[:, None])
        else:
            part = (row * heads + head) * SPLITS + split
            tl.store(part_out_ptr + part[:, None] * DIM + d[None, :], acc, mask=g_ok[:, None])
            tl.store(part_max_ptr + part, running_max, mask=g_ok)
            tl.store(part_sum_ptr + part, running_sum, mask=g_ok)

    def launch(query, keys, values, block_table, first_position, lengths, block_size: int, scaling: float,
               splits: int | None = None, key_scales=None, value_scales=None):
        """query (batch, heads * dim) -> (batch, heads * dim); also runs in Triton's interpreter.
        key_scales/value_scales (1, kv_heads, slots) float32: the scales of an FP8 pool."""
        batch = query.shape[0]
        _, kv_heads, slots, dim = keys.shape
        heads = query.shape[1] // dim
        group = heads // kv_heads
        block = plan_block(dim)
        scaled = key_scales is not None and query.dtype != torch.float32
        if scaled and dim > 64:
            # FP8 pools: blocks of 128 slots (the 8B server's 256 rows: 185 against 209 us with 64;
            # bench/paged_attention_sweep.py)
            block *= 2
        # ranges planned for the longest row the table can hold: a fixed grid, captured once per batch size
        splits = splits or plan_splits(batch, kv_heads, block_table.shape[1] * block_size, block)
        out = torch.empty_like(query)
        part_out = query.new_empty((batch, heads, splits, dim), dtype=torch.float32)
        part_max = query.new_empty((batch, heads, splits), dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
        fp8 = key_scales is not None
        _paged_range_kernel[(batch * kv_heads, splits)](
            query, keys, values, key_scales if fp8 else keys, value_scales if fp8 else values, block_table,
            first_position, lengths, out, part_out, part_max, part_sum,
            kv_heads, slots, block_table.shape[1], block_size, scaling,
            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim, SPLITS=splits, BLOCK=block,
            PRECISION="ieee" if query.dtype == torch.float32 else "tf32", FP8=fp8,
            SCALED=scaled, num_warps=4, num_stages=2,
        )  # fmt: skip
        if splits > 1:
            _merge_ranges_kernel[(batch * heads,)](
                part_out, part_max, part_sum, out,
                SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), DIM=dim, PDL=False, num_warps=4,
            )  # fmt: skip
        return out

    @torch.library.custom_op("herd::paged_attention", mutates_args=())
    def _paged_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_table: torch.Tensor,
                         first_position: torch.Tensor, lengths: torch.Tensor, block_size: int,
                         scaling: float, key_scales: torch.Tensor | None = None,
                         value_scales: torch.Tensor | None = None) -> torch.Tensor:
        return launch(query.contiguous(), keys, values, block_table.contiguous(), first_position.contiguous(),
                      lengths.contiguous(), block_size, scaling, key_scales=key_scales, value_scales=value_scales)

    @_paged_attention.register_fake
    def _(query, keys, values, block_table, first_position, lengths, block_size, scaling, key_scales=None,
          value_scales=None):
        return torch.empty_like(query, memory_format=torch.contiguous_format)
