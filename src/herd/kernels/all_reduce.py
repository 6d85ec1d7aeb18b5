"""Tensor parallel's small sums as one Triton kernel over symmetric memory: every rank writes its
values straight into every peer's buffer, and each element carries its own "arrived" flag.

A decode step at batch 1 of Llama-3.1-8B under tp 2 sums 8 KB across the ranks 65 times, and what
each sum costs is latency: torch's one-shot kernel (parallel/symmetric.py) copies its input into
its own buffer, waits at a barrier for the peers to have done the same, reads every peer's
buffer, and waits at a second barrier before the buffers may be reused. Here a sum is one trip
across NVLink and no barrier:

- Each rank's buffer holds three generations (`PHASES`) of `WORLD` slots, one per source rank,
  every element initialised to the bit pattern of -0.0 (`EMPTY`: "not written yet").
- Rank r writes its values (any -0.0 turned into +0.0, so no value reads as empty) into slot r of
  the current generation of every peer's buffer, then reads the slots of its own buffer, each
  element again until it is no longer empty: when all are, every peer's values have arrived.
  Ranks are summed in rank order in float32 (every rank gets the same bits), rounded to the
  dtype, and optionally added to `residual` (rounded again: the bits of `residual + sum`).
- The generation before this one is reset to empty here, as far as the call that used it wrote
  (sums differ in size from call to call: a reader must never meet an older, larger call's
  values). That is safe with three: no rank can
  write a generation again until every rank has finished the call after it, so a peer writes
  generation g + 3 only after this rank has read g + 1 and g + 2 (the scheme of a "Lamport"
  all-reduce, as TensorRT-LLM's and vLLM's custom all-reduces use for small messages).
- The generation to use lives on the device (`state`: [generation, programs finished, then the
  elements each generation's last call wrote]: `STATE_LENGTH`), so the
  kernel runs unchanged inside a CUDA graph; the last of a call's programs to finish advances it.
  Every rank makes the same calls in the same order (it is a collective), so the ranks' counters
  agree.

With programmatic dependent launch the next kernel (the next matmul, which reads its weights
before it waits) may launch as soon as this one starts; this one touches nothing before its own
`gdc_wait` (an earlier call of itself may still be running then).

`launch_norm` is the same sum for the residual stream of a decoder layer: residual + the sum,
and that RMSNorm'd for the next projection, in one kernel (a program holds whole rows). At batch
64 under tp 2 a separate norm kernel after every sum is about 65 launches a step.

`launch` takes the peers' buffers as a tensor of their addresses (`pointers`, int64, this rank's
own at `rank`); parallel/symmetric.py allocates them over torch's symmetric memory and calls it.
It also runs in Triton's interpreter (the CPU tests: the peers' writes are made by the test).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

PHASES = 3  # generations of each buffer (see the module docstring)
STATE_LENGTH = 2 + PHASES
BLOCK = 1024  # elements per program
WARPS = 4
NORM_ELEMENTS = 4096  # elements per program of the kernel that also normalises (whole rows)
NORM_WARPS = 8
_EMPTY_BITS = {16: -(1 << 15), 32: -(1 << 31)}  # -0.0 as a signed integer of the dtype's width


def buffer_elements(world: int, slot_elements: int) -> int:
    """The length of each rank's buffer: PHASES generations of `world` slots."""
    return PHASES * world * slot_elements


if triton is not None:

    @triton.jit
    def _exchange(x_ptr, pointers_ptr, generation, offsets, ok, slot, rank, WORLD: tl.constexpr,
                  BITS: tl.constexpr, EMPTY: tl.constexpr):
        """This rank's values at `offsets` into every peer's buffer, then the ranks' values there
        summed in rank order once all have arrived: float32, the shape of offsets."""
        dtype = x_ptr.dtype.element_ty
        bits_type = tl.int16 if BITS == 16 else tl.int32
        mine = tl.load(x_ptr + offsets, mask=ok, other=0.0)
        mine = tl.where(mine.to(bits_type, bitcast=True) == EMPTY, 0.0, mine).to(dtype)  # -0.0 -> +0.0
        own = tl.load(pointers_ptr + rank).to(tl.pointer_type(dtype))
        for peer in tl.static_range(WORLD):
            if peer != rank:
                base = tl.load(pointers_ptr + peer).to(tl.pointer_type(dtype))
                tl.store(base + (generation * WORLD + rank) * slot + offsets, mine, mask=ok)

        total = tl.zeros(offsets.shape, tl.float32)
        for source in tl.static_range(WORLD):
            if source == rank:
                total += mine.to(tl.float32)
            else:
                where = own + (generation * WORLD + source) * slot + offsets
                arrived = tl.load(where, mask=ok, other=0.0, volatile=True)
                waiting = tl.sum(((arrived.to(bits_type, bitcast=True) == EMPTY) & ok).to(tl.int32), axis=0)
                while waiting > 0:
                    arrived = tl.load(where, mask=ok, other=0.0, volatile=True)
                    waiting = tl.sum(((arrived.to(bits_type, bitcast=True) == EMPTY) & ok).to(tl.int32), axis=0)
                total += arrived.to(tl.float32)
        return total

    @triton.jit
    def _finish(pointers_ptr, state_ptr, generation, n, slot, rank, dtype: tl.constexpr, WORLD: tl.constexpr,
                BITS: tl.constexpr, EMPTY: tl.constexpr, BLOCK: tl.constexpr, PHASES: tl.constexpr):
        """Empty the previous generation (read by everyone), as far as its call wrote, for its next
        use three calls on (the programs share that range, whatever its length, BLOCK elements at a
        time); the call's last program to get here records this call's length and advances the
        generation."""
        bits_type = tl.int16 if BITS == 16 else tl.int32
        own = tl.load(pointers_ptr + rank).to(tl.pointer_type(dtype))
        previous = (generation + PHASES - 1) % PHASES
        previous_written = tl.load(state_ptr + 2 + previous)
        empty = tl.full((BLOCK,), EMPTY, bits_type).to(dtype, bitcast=True)
        for start in range(tl.program_id(0) * BLOCK, previous_written, tl.num_programs(0) * BLOCK):
            stale = start + tl.arange(0, BLOCK)
            for source in tl.static_range(WORLD):
                if source != rank:
                    tl.store(own + (previous * WORLD + source) * slot + stale, empty, mask=stale < previous_written)
        finished = tl.atomic_add(state_ptr + 1, 1, sem="acq_rel")
        if finished == tl.num_programs(0) - 1:  # the call's last program: every program has read the state
            tl.store(state_ptr + 2 + generation, n)
            tl.store(state_ptr + 1, 0)
            tl.store(state_ptr, (generation + 1) % PHASES)

    @triton.jit
    def _all_reduce_kernel(
        x_ptr,  # (n,): this rank's values
        residual_ptr,  # (n,) with RESIDUAL (else any pointer, unread)
        out_ptr,  # (n,)
        pointers_ptr,  # (WORLD,) int64: each rank's buffer, PHASES x WORLD slots of `slot` elements
        state_ptr,  # (STATE_LENGTH,) int32: [generation, programs of this call finished, elements written per generation]
        n,
        slot,
        rank,
        WORLD: tl.constexpr,
        BITS: tl.constexpr,  # the dtype's width: 16 or 32
        EMPTY: tl.constexpr,  # -0.0's bits as a signed integer of that width
        RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
        PHASES: tl.constexpr,
    ):
        dtype = x_ptr.dtype.element_ty
        if PDL:  # the next kernel may launch now: it only reads what this one writes after its own gdc_wait
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        generation = tl.load(state_ptr)
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offsets < n
        total = _exchange(x_ptr, pointers_ptr, generation, offsets, ok, slot, rank, WORLD, BITS, EMPTY)
        out = total.to(dtype)
        if RESIDUAL:
            out = (tl.load(residual_ptr + offsets, mask=ok, other=0.0).to(tl.float32) + out.to(tl.float32)).to(dtype)
        tl.store(out_ptr + offsets, out, mask=ok)
        _finish(pointers_ptr, state_ptr, generation, n, slot, rank, dtype, WORLD, BITS, EMPTY, BLOCK, PHASES)

    @triton.jit
    def _all_reduce_norm_kernel(
        x_ptr,  # (rows, width): this rank's values
        residual_ptr,  # (rows, width)
        norm_weight_ptr,  # (width,)
        out_ptr,  # (rows, width): residual + the sum
        normed_ptr,  # (rows, width): RMSNorm of out
        pointers_ptr,
        state_ptr,
        rows,
        width,
        eps,
        slot,
        rank,
        WORLD: tl.constexpr,
        BITS: tl.constexpr,
        EMPTY: tl.constexpr,
        ROWS: tl.constexpr,  # rows per program
        BLOCK_W: tl.constexpr,  # width rounded up to a power of two
        PDL: tl.constexpr,
        PHASES: tl.constexpr,
    ):
        """`_all_reduce_kernel` with the residual, then the reference RMSNorm of each summed row
        (normalised in float32, rounded, times the weight), whole rows per program."""
        dtype = x_ptr.dtype.element_ty
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        generation = tl.load(state_ptr)
        index = tl.arange(0, ROWS * BLOCK_W)
        row = tl.program_id(0) * ROWS + index // BLOCK_W
        column = index % BLOCK_W
        ok = (row < rows) & (column < width)
        offsets = row * width + column
        total = _exchange(x_ptr, pointers_ptr, generation, offsets, ok, slot, rank, WORLD, BITS, EMPTY)
        residual = tl.load(residual_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        out = (residual + total.to(dtype).to(tl.float32)).to(dtype)
        tl.store(out_ptr + offsets, out, mask=ok)
        summed = tl.reshape(out.to(tl.float32), (ROWS, BLOCK_W))
        inv_rms = tl.rsqrt((tl.sum(summed * summed, axis=1) / width + eps).to(tl.float32))  # (ROWS,); compile passes eps as float64
        scaled = (summed * inv_rms[:, None]).to(dtype).to(tl.float32)
        weight = tl.load(norm_weight_ptr + column, mask=column < width, other=0.0).to(tl.float32)
        normed = scaled * tl.reshape(weight, (ROWS, BLOCK_W))
        tl.store(normed_ptr + offsets, tl.reshape(normed, (ROWS * BLOCK_W,)).to(dtype), mask=ok)
        _finish(pointers_ptr, state_ptr, generation, rows * width, slot, rank, dtype, WORLD, BITS, EMPTY,
                ROWS * BLOCK_W, PHASES)


def launch(tensor: torch.Tensor, pointers: torch.Tensor, state: torch.Tensor, rank: int, world: int, slot: int,
           residual: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """The sum of `tensor` over the ranks (plus `residual`), a fresh tensor of its shape. Every
    rank calls it with the same shape and dtype; `pointers`/`state`/`slot` as described above,
    `tensor.numel() <= slot`."""
    x = tensor.contiguous()
    n = x.numel()
    if n > slot:
        raise ValueError(f"{n} elements do not fit the all-reduce's slots of {slot}")
    out = torch.empty_like(x)
    if n == 0:
        return out
    bits = x.element_size() * 8
    res = residual.contiguous() if residual is not None else x
    _all_reduce_kernel[(triton.cdiv(n, BLOCK),)](
        x, res, out, pointers, state, n, slot, rank,
        WORLD=world, BITS=bits, EMPTY=_EMPTY_BITS[bits], RESIDUAL=residual is not None, BLOCK=BLOCK, PDL=pdl, PHASES=PHASES,
        num_warps=WARPS, launch_pdl=pdl,
    )  # fmt: skip
    return out


def launch_norm(tensor: torch.Tensor, pointers: torch.Tensor, state: torch.Tensor, rank: int, world: int, slot: int,
                residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + the sum of `tensor` (rows, width) over the ranks, that RMSNorm'd by
    `norm_weight` (width,)): the next layer's residual and its normalised input from one kernel
    (`launch`, then the reference RMSNorm of the result: normalised in float32, rounded to the
    dtype, times the weight). Whole rows per program."""
    x = tensor.contiguous()
    rows, width = x.shape
    if x.numel() > slot:
        raise ValueError(f"{x.numel()} elements do not fit the all-reduce's slots of {slot}")
    out, normed = torch.empty_like(x), torch.empty_like(x)
    if x.numel() == 0:
        return out, normed
    bits = x.element_size() * 8
    block_w = triton.next_power_of_2(width)
    per_program = max(1, NORM_ELEMENTS // block_w)  # whole rows, about NORM_ELEMENTS elements (one row at least)
    _all_reduce_norm_kernel[(triton.cdiv(rows, per_program),)](
        x, residual.contiguous(), norm_weight, out, normed, pointers, state, rows, width, eps, slot, rank,
        WORLD=world, BITS=bits, EMPTY=_EMPTY_BITS[bits], ROWS=per_program, BLOCK_W=block_w,
        PDL=pdl, PHASES=PHASES, num_warps=NORM_WARPS, launch_pdl=pdl,
    )  # fmt: skip
    return out, normed
