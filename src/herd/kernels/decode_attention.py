"""The decode step's attention over the preallocated cache as Triton kernels (flash decoding).

One new query per row attends over every slot of the cache. Written as two batched matmuls and
a softmax, that is three kernels per layer, each tiny at batch 1. Here the slots are split
into `splits` ranges: one program per (row, kv head, range) reads its keys and values once for
all the query heads that share them (grouped-query attention without copying the cache) and
keeps a running softmax; a second kernel merges the ranges. With a single range the first
kernel writes the output itself.

`attend(...)` runs the kernels for CUDA tensors when Triton is installed and the head size is a
power of two of at least 16, and otherwise the same arithmetic in torch (`torch_attend`). Rounding
follows the torch version where it matters: scores are rounded to the cache dtype before the
scaling, as a bf16 matmul's output would be. The softmax weights are not normalised before the
product with the values (they are divided out at the end), which moves bf16 results by a unit
in the last place at most.

FP8 caches (the FP8 KV cache, cache.fp8_quantize): keys/values float8_e4m3fn with a float32 scale
per (row, kv head, slot), `key_scales`/`value_scales` (batch, kv_heads, slots). With a 16-bit
query the e4m3 values go to the tensor cores as float16 (exact) and the scales apply per slot,
not per value (`_attend_block`): a key's scale to its score, a value's to its softmax weight.
Multiplying every value by its scale in float32 and rounding it back (the plain cache's
`fp8_dequantize`) made the kernel slower than with a bf16 cache despite half the bytes; per slot
it is 21% faster (the paged kernel at the 8B server's 256 rows: 264 -> 209 us), still slower than
bf16 (148 us; bench/paged_attention_sweep.py, bench/RESULTS.md 2026-12-01). The query is rounded
to float16 for the product (queries beyond float16's range would overflow: attention queries are
far inside it). A float32 query keeps the dequantizing arithmetic, rounded as `fp8_dequantize`
rounds.
"""

from __future__ import annotations

import torch

from ..cache import FP8_KV_DTYPE, fp8_dequantize
from . import programmatic_launch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_SLOTS = 64  # keys read per loop step (32 for heads of at most 64 dimensions: `plan_block`)
TARGET_PROGRAMS = 128  # about one program per SM: ranges are added until the grid is this large
# Long caches: ranges of at least LONG_RANGE_SLOTS slots, up to LONG_CONTEXT_PROGRAMS programs (several
# per SM keep more reads in flight; bench/RESULTS.md, 2026-11-30 third session: at 120k slots 64-128
# ranges read 3.75 TB/s where 16 read 2.5; eighth session: ranges of 512 rather than 1024 slots took
# the 8B's step at 16k from 5.71-5.88 to 5.16-5.21 ms, at 32k from 5.79-5.86 to 5.60-5.71)
LONG_RANGE_SLOTS = 512
LONG_CONTEXT_PROGRAMS = 512
ORDINARY_LAUNCH_PROGRAMS = 256  # larger grids of long ranges launch after the previous kernel (`plan_programmatic`)
# FP8 values with a 16-bit query: each slot's softmax weight times its value scale, times this
# power of two, is what multiplies the e4m3 values in float16: weights near 1 times scales of
# amax / 448 land mid-range instead of among float16's subnormals (divided out exactly at the end)
VALUE_LIFT = 256.0


def plan_block(dim: int) -> int:
    """Keys per loop step. Shorter blocks make more, shorter ranges; what pays is the latency of
    each program (this kernel waits for q/k/v and o waits for it). Measured on whole steps
    (bench/RESULTS.md): heads of 64 dimensions gain from blocks of 32, heads of 128 lose."""
    return BLOCK_SLOTS // 2 if dim <= 64 else BLOCK_SLOTS


def plan_splits(batch: int, kv_heads: int, slots: int, block: int = BLOCK_SLOTS) -> int:
    """How many slot ranges: enough programs to keep the SMs reading, but no range shorter than a
    block; for long caches more (up to LONG_CONTEXT_PROGRAMS), each range still LONG_RANGE_SLOTS
    long. (The operator is opaque to the compiler: another count for another cache length is
    another Triton specialisation, not a recompiled step.)"""
    rows = max(1, batch * kv_heads)
    splits = max(1, min(TARGET_PROGRAMS // rows, -(-slots // block)))
    longer = min(LONG_CONTEXT_PROGRAMS // rows, slots // LONG_RANGE_SLOTS)
    if longer > splits:  # a power of two: few kernel variants as the cache grows
        splits = 1 << (longer.bit_length() - 1)
    return splits


def plan_programmatic(batch: int, kv_heads: int, splits: int, slots: int) -> bool:
    """Whether the range kernel is compiled and launched for programmatic dependent launch (where
    the device has it): not for grids beyond ORDINARY_LAUNCH_PROGRAMS whose ranges are long
    (LONG_RANGE_SLOTS+). With it such a grid read its cache at 3.1 TB/s, without it at 4.1 (120k
    slots at batch 1, 161 against 123 µs a layer; 16 rows of 4096 slots, 91 against 70). Short
    ranges keep it: 64 rows of 192 slots took 5.46-5.63 ms a step with it, 5.64-5.74 without
    (bench/RESULTS.md, 2026-11-30 sixth session). The merge keeps it."""
    long_ranges = slots // splits >= LONG_RANGE_SLOTS
    return batch * kv_heads * splits <= ORDINARY_LAUNCH_PROGRAMS or not long_ranges


def applies(query: torch.Tensor, keys: torch.Tensor, key_scales: torch.Tensor | None = None) -> bool:
    dim = keys.shape[-1]
    stored_as = FP8_KV_DTYPE if key_scales is not None else query.dtype
    return (
        triton is not None
        and query.is_cuda
        and dim & (dim - 1) == 0
        and dim >= 16  # the tensor-core products need 16 along the reduced dimension
        and keys.dtype == stored_as
        and query.dtype in (torch.float32, torch.float16, torch.bfloat16)
    )


def torch_attend(query, keys, values, allowed, scaling: float, key_scales=None, value_scales=None) -> torch.Tensor:
    """The arithmetic the kernels replace. The query heads that share a kv head are rows of one
    matmul, so grouped-query attention never copies the cache. An FP8 cache is dequantized first
    (to the query's dtype, as the plain cache reads it)."""
    if key_scales is not None:
        keys = fp8_dequantize(keys, key_scales[..., None], query.dtype)
        values = fp8_dequantize(values, value_scales[..., None], query.dtype)
    batch, heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # (batch, kv_heads, group, dim)
    scores = torch.matmul(grouped, keys.transpose(2, 3)).float() * scaling  # (batch, kv_heads, group, slots)
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    weights = torch.nn.functional.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(weights, values).reshape(batch, heads * dim)


def attend(query, keys, values, allowed, new_slot, scaling: float, key_scales=None, value_scales=None) -> torch.Tensor:
    """One query per row over a preallocated cache, reading each cached key/value once.

    query (batch, heads, 1, dim); keys/values (batch, kv_heads, slots, dim); allowed (batch, slots),
    at least one slot allowed per row; new_slot (1,): the slot this step's key/value were just
    written to (the kernel reads the others before the previous kernel ends; any slot where
    nothing was written this step). An FP8 cache comes with key_scales/value_scales (batch,
    kv_heads, slots) float32. Returns (batch, heads * dim).
    """
    if not applies(query, keys, key_scales):
        return torch_attend(query, keys, values, allowed, scaling, key_scales, value_scales)
    batch, heads, _, dim = query.shape
    return torch.ops.herd.decode_attention(query.reshape(batch, heads * dim), keys, values, allowed, new_slot, scaling,
                                           key_scales, value_scales)


if triton is not None:
    _LIFT = tl.constexpr(VALUE_LIFT)  # what the kernels read (a global of a jit function is a constexpr)

    @triton.jit
    def _attend_block(query, key, value, visible, running_max, running_sum, acc, scaling, dtype: tl.constexpr,
                      PRECISION: tl.constexpr, key_scale, value_scale, SCALED: tl.constexpr):
        """One block of slots into the running softmax: query (GROUP_PAD, DIM), key/value (BLOCK, DIM),
        visible (BLOCK,). Returns the new running max and sum (GROUP_PAD,) and acc (GROUP_PAD, DIM).
        SCALED: key/value are e4m3 values as float16 with a scale per slot, key_scale/value_scale
        (BLOCK,); acc then holds VALUE_LIFT times the sums (the kernel divides it out at the end)."""
        scores = tl.dot(query, tl.trans(key), input_precision=PRECISION)  # (GROUP_PAD, BLOCK)
        if SCALED:
            scores = scores * key_scale[None, :]
        scores = (scores.to(dtype).to(tl.float32) * scaling).to(tl.float32)  # compile passes floats as float64
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a range with nothing visible yet
        weights = tl.exp(scores - shift[:, None])
        rescale = tl.exp(running_max - shift)
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        if SCALED:  # a slot nobody sees adds nothing, whatever its scale holds
            lift = tl.where(visible, value_scale, 0.0) * _LIFT
            products = tl.dot((weights * lift[None, :]).to(tl.float16), value, input_precision=PRECISION)
        else:
            products = tl.dot(weights.to(dtype), value, input_precision=PRECISION)
        acc = acc * rescale[:, None] + products
        return new_max, running_sum, acc

    @triton.jit
    def _load_slots(ptr, scale_ptr, offsets, scale_offsets, slot_ok, dtype: tl.constexpr, FP8: tl.constexpr,
                    SCALED: tl.constexpr, first: tl.constexpr):
        """(BLOCK, DIM) keys or values of the slots whose offsets are given, zero where not slot_ok
        (BLOCK,), and their scales (BLOCK,) (FP8; else slot_ok, unread). FP8 and SCALED: the e4m3
        values as float16, the scales apart (`_attend_block`); FP8 alone: the bytes times each
        slot's scale (at scale_offsets), rounded to dtype as fp8_dequantize rounds. `first`: read
        once (evicted first), else a re-read of the newest slot."""
        if first:
            stored = tl.load(ptr + offsets, mask=slot_ok[:, None], other=0.0, eviction_policy="evict_first")
        else:
            stored = tl.load(ptr + offsets, mask=slot_ok[:, None], other=0.0)
        scale = slot_ok
        if FP8:
            scale = tl.load(scale_ptr + scale_offsets, mask=slot_ok, other=0.0)  # (BLOCK,)
            if SCALED:
                stored = stored.to(tl.float16)  # exact
            else:
                stored = (stored.to(tl.float32) * scale[:, None]).to(dtype)
        return stored, scale

    @triton.jit
    def _attend_range_kernel(
        q_ptr,  # (batch, heads * DIM)
        k_ptr,  # (batch, kv_heads, slots, DIM)
        v_ptr,
        k_scale_ptr,  # with FP8: (batch, kv_heads, slots) float32 each (else any pointer, unread)
        v_scale_ptr,
        allowed_ptr,  # (batch, slots), bool
        new_slot_ptr,  # (1,): the slot the previous kernel wrote this step's key/value into
        out_ptr,  # (batch, heads * DIM) when SPLITS == 1
        part_out_ptr,  # (batch, heads, SPLITS, DIM) float32: unnormalised sums of weights * values
        part_max_ptr,  # (batch, heads, SPLITS) float32: the range's largest score
        part_sum_ptr,  # (batch, heads, SPLITS) float32: the range's sum of exp(score - max)
        kv_heads,
        slots,
        slots_per_split,
        scaling,
        GROUP: tl.constexpr,  # query heads per kv head
        GROUP_PAD: tl.constexpr,  # at least 16: the rows of a tensor-core product
        DIM: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK: tl.constexpr,
        PRECISION: tl.constexpr,
        PDL: tl.constexpr,  # launched as a programmatic dependent of the previous kernel
        FP8: tl.constexpr = False,  # keys/values float8_e4m3fn with a float32 scale per slot
        SCALED: tl.constexpr = False,  # FP8 with a 16-bit query: float16 products, scales per slot (`_attend_block`)
    ):
        dtype = q_ptr.dtype.element_ty  # the cache's dtype, or with FP8 what it dequantizes to
        if PDL:  # the next kernel may launch now: it only reads what this one writes after its own gdc_wait
            tl.extra.cuda.gdc_launch_dependents()
        row_head = tl.program_id(0)  # row * kv_heads + kv head
        split = tl.program_id(1)
        row = row_head // kv_heads
        kv_head = row_head % kv_heads
        heads = kv_heads * GROUP
        d = tl.arange(0, DIM)
        cache_base = row_head.to(tl.int64) * slots * DIM
        start = split * slots_per_split
        end = tl.minimum(start + slots_per_split, slots)

        # The range's first block of keys and values was written by earlier steps, all but the
        # newest slot: with PDL it is read while the previous kernel (q/k/v) still runs, and the
        # newest slot read again once that kernel is done.
        s = start + tl.arange(0, BLOCK)
        s_ok = s < end
        kv_offsets = cache_base + s[:, None] * DIM + d[None, :]
        scale_offsets = row_head.to(tl.int64) * slots + s
        key, key_scale = _load_slots(k_ptr, k_scale_ptr, kv_offsets, scale_offsets, s_ok, dtype, FP8, SCALED,
                                     True)  # (BLOCK, DIM), (BLOCK,)
        value, value_scale = _load_slots(v_ptr, v_scale_ptr, kv_offsets, scale_offsets, s_ok, dtype, FP8, SCALED, True)
        if PDL:
            tl.extra.cuda.gdc_wait()
        newest = (s == tl.load(new_slot_ptr)) & s_ok
        new_key, new_key_scale = _load_slots(k_ptr, k_scale_ptr, kv_offsets, scale_offsets, newest, dtype, FP8, SCALED,
                                             False)
        new_value, new_value_scale = _load_slots(v_ptr, v_scale_ptr, kv_offsets, scale_offsets, newest, dtype, FP8,
                                                 SCALED, False)
        key = tl.where(newest[:, None], new_key, key)
        value = tl.where(newest[:, None], new_value, value)
        if FP8:
            key_scale = tl.where(newest, new_key_scale, key_scale)
            value_scale = tl.where(newest, new_value_scale, value_scale)

        g = tl.arange(0, GROUP_PAD)
        g_ok = g < GROUP
        q_offsets = (row * heads + kv_head * GROUP + g)[:, None] * DIM + d[None, :]
        query = tl.load(q_ptr + q_offsets, mask=g_ok[:, None], other=0.0)  # (GROUP_PAD, DIM)
        if SCALED:
            query = query.to(tl.float16)
        visible = tl.load(allowed_ptr + row * slots + s, mask=s_ok, other=0) != 0
        running_max, running_sum, acc = _attend_block(
            query, key, value, visible, tl.full((GROUP_PAD,), float("-inf"), tl.float32),
            tl.zeros((GROUP_PAD,), tl.float32), tl.zeros((GROUP_PAD, DIM), tl.float32), scaling, dtype, PRECISION,
            key_scale, value_scale, SCALED)
        for block_start in range(start + BLOCK, end, BLOCK):
            s = block_start + tl.arange(0, BLOCK)
            s_ok = s < end
            kv_offsets = cache_base + s[:, None] * DIM + d[None, :]
            scale_offsets = row_head.to(tl.int64) * slots + s
            key, key_scale = _load_slots(k_ptr, k_scale_ptr, kv_offsets, scale_offsets, s_ok, dtype, FP8, SCALED, True)
            value, value_scale = _load_slots(v_ptr, v_scale_ptr, kv_offsets, scale_offsets, s_ok, dtype, FP8, SCALED,
                                             True)
            visible = tl.load(allowed_ptr + row * slots + s, mask=s_ok, other=0) != 0
            running_max, running_sum, acc = _attend_block(query, key, value, visible, running_max, running_sum, acc,
                                                          scaling, dtype, PRECISION, key_scale, value_scale, SCALED)
        if SCALED:
            acc = acc * (1.0 / _LIFT)

        head = kv_head * GROUP + g  # (GROUP_PAD,)
        if SPLITS == 1:
            out = acc / running_sum[:, None]
            tl.store(out_ptr + q_offsets, out.to(dtype), mask=g_ok[:, None])
        else:
            part = (row * heads + head) * SPLITS + split  # (GROUP_PAD,)
            tl.store(part_out_ptr + part[:, None] * DIM + d[None, :], acc, mask=g_ok[:, None])
            tl.store(part_max_ptr + part, running_max, mask=g_ok)
            tl.store(part_sum_ptr + part, running_sum, mask=g_ok)

    @triton.jit
    def _merge_ranges_kernel(
        part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr,
        SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, DIM: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:  # the next kernel may launch now: it only reads what this one writes after its own gdc_wait
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row_head = tl.program_id(0)  # row * heads + head
        p = tl.arange(0, SPLITS_PAD)
        p_ok = p < SPLITS
        d = tl.arange(0, DIM)
        range_max = tl.load(part_max_ptr + row_head * SPLITS + p, mask=p_ok, other=float("-inf"))
        overall = tl.max(range_max, axis=0)
        scale = tl.where(range_max == float("-inf"), 0.0, tl.exp(range_max - overall))  # (SPLITS_PAD,)
        total = tl.sum(tl.load(part_sum_ptr + row_head * SPLITS + p, mask=p_ok, other=0.0) * scale, axis=0)
        parts = tl.load(part_out_ptr + (row_head * SPLITS + p)[:, None] * DIM + d[None, :], mask=p_ok[:, None], other=0.0)
        out = tl.sum(parts * scale[:, None], axis=0) / total  # (DIM,)
        tl.store(out_ptr + row_head * DIM + d, out.to(out_ptr.dtype.element_ty))

    def launch(query, keys, values, allowed, new_slot, scaling: float, splits: int | None = None, pdl: bool | None = None,
               key_scales=None, value_scales=None, block: int | None = None, num_warps: int = 4, num_stages: int = 2,
               programmatic: bool | None = None):
        """query (batch, heads * dim) -> (batch, heads * dim); also runs in Triton's interpreter
        (the CPU tests). `pdl`: programmatic dependent launch, by default where the device has it.
        key_scales/value_scales (batch, kv_heads, slots) float32: the scales of an FP8 cache.
        `programmatic`: with pdl, whether the range kernel itself takes part (by default
        `plan_programmatic`); the merge does."""
        pdl = programmatic_launch(query) if pdl is None else pdl
        batch, kv_heads, slots, dim = keys.shape
        heads = query.shape[1] // dim
        group = heads // kv_heads
        block = block or plan_block(dim)
        splits = splits or plan_splits(batch, kv_heads, slots, block)
        if programmatic is None:
            programmatic = plan_programmatic(batch, kv_heads, splits, slots)
        range_pdl = pdl and programmatic
        slots_per_split = (slots + splits * block - 1) // (splits * block) * block
        out = torch.empty_like(query)
        part_out = query.new_empty((batch, heads, splits, dim), dtype=torch.float32)
        part_max = query.new_empty((batch, heads, splits), dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
        fp8 = key_scales is not None
        _attend_range_kernel[(batch * kv_heads, splits)](
            query, keys, values, key_scales if fp8 else keys, value_scales if fp8 else values, allowed, new_slot, out,
            part_out, part_max, part_sum,
            kv_heads, slots, slots_per_split, scaling,
            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim, SPLITS=splits, BLOCK=block,
            PRECISION="ieee" if query.dtype == torch.float32 else "tf32", PDL=range_pdl, FP8=fp8,
            SCALED=fp8 and query.dtype != torch.float32, num_warps=num_warps, num_stages=num_stages, launch_pdl=range_pdl,
        )  # fmt: skip
        if splits > 1:
            _merge_ranges_kernel[(batch * heads,)](
                part_out, part_max, part_sum, out,
                SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), DIM=dim, PDL=pdl, num_warps=4,
                launch_pdl=pdl,
            )  # fmt: skip
        return out

    # an opaque operator, as kernels/gemv.py's: Triton's launcher keeps the programmatic-launch attribute
    @torch.library.custom_op("herd::decode_attention", mutates_args=())
    def _decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                          new_slot: torch.Tensor, scaling: float, key_scales: torch.Tensor | None = None,
                          value_scales: torch.Tensor | None = None) -> torch.Tensor:
        return launch(query.contiguous(), keys, values, allowed, new_slot, scaling, key_scales=key_scales,
                      value_scales=value_scales)

    @_decode_attention.register_fake
    def _(query, keys, values, allowed, new_slot, scaling, key_scales=None, value_scales=None):
        return torch.empty_like(query, memory_format=torch.contiguous_format)
