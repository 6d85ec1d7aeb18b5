"""Routed experts in a decode step: each (token, expert) pair's row times its expert's weights,
read as stored (two bytes, a byte or half a byte a weight), on the tensor cores.

`expert_gemv(x, expert_ids, data, scale, offset=None)`: x (pairs, in) in bf16/fp16/fp32,
expert_ids (pairs,) int64 (or int32) on x's device, the experts as checkpoints store them
(quantization/experts.py, (experts, in, out), contiguous along out) -> out (pairs, out) in x's dtype:

- float (bf16 / fp16 / fp32, x's dtype): data (experts, in, out), scale None;
- int8 / FP8: data (experts, in, out), scale float32 (experts, 1, out), one per expert and
  output column: out[p, n] = (sum_k x[p, k] * data[e_p, k, n]) * scale[e_p, 0, n];
- int4: data (experts, in / 2, out) uint8, input rows 2j and 2j + 1 in the low and high nibble
  of row j; scale and offset (experts, in / G, out): w[k, n] = q[k, n] * scale[k // G, n] +
  offset[k // G, n], and out[p, n] = sum over groups of scale * (x . q) + offset * sum(x), so the
  nibbles go to the product as they are (small integers, exact in any float dtype).

e_p = expert_ids[p]. Accumulated in float32 and rounded once; the weights are exact, not rounded
to x's dtype first as the dequantizing path rounds them.

A decode step reads the picked experts' bytes once per pair that picked them, with no
dequantized copy written, and the expert ids stay on the device (the step is captured in a CUDA
graph). One row of the picked expert is too little work for few programs, so the input rows are
split too: a program per (BLOCK_N output columns, range of input rows, pair) multiplies its
pair's x (padded to 16 rows for the tensor cores' smallest product) by the expert's (BLOCK_K,
BLOCK_N) tiles as bf16 (FP8 through a few integer instructions per pair of weights: `_FP8_TO_BF16`),
and writes a float32 partial sum; the ranges' partials are summed in torch, where the compiled
step fuses the sum into what follows (the activation, the cast).

The kernel runs for CUDA tensors when Triton is installed and the dtypes fit (`kernel_applies`);
otherwise `torch_expert_gemv` computes the same in torch. In Triton's interpreter (the CPU
tests) the tiles multiply in float32: it has no bf16 products.
"""

from __future__ import annotations

import torch

from . import interpreted, multiprocessors

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton: the torch arithmetic runs instead
    triton = None

# Measured on the H200 (bench/expert_gemv_sweep.py, 11-30: Scout's experts at one pair, FP8 and
# int4 in groups of 128; numbers in bench/RESULTS.md): 64 columns, 128 input rows a step (int4: a
# group), 3 stages and about 8 programs per SM were within 5% of the best of 162 configurations
# for every projection and format, 6-15% faster than the first guess (64, 256, 4 per SM).
BLOCK_N = 64
BLOCK_K = 128
WARPS = 4
STAGES = 3
INT4_STAGES = 3
PROGRAMS_PER_SM = 8  # input-row ranges are added until the grid has about this many programs per SM
MIN_GROUP = 32  # int4 groups the kernel takes (a product of 16 input rows per nibble at least)

X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _shapes_fit(x, expert_ids, data, scale, offset) -> bool:
    experts, rows, out_features = data.shape
    in_features = 2 * rows if offset is not None else rows
    if x.dim() != 2 or x.shape[1] != in_features or expert_ids.shape != (x.shape[0],):
        return False
    if scale is None:
        return offset is None
    if offset is None:
        return tuple(scale.shape) == (experts, 1, out_features)
    groups = scale.shape[1]
    group = in_features // max(groups, 1)
    return (tuple(scale.shape) == tuple(offset.shape) == (experts, groups, out_features) and groups * group == in_features
            and group >= MIN_GROUP and group & (group - 1) == 0)


def _formats_fit(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None, offset: torch.Tensor | None) -> bool:
    """Float data in x's dtype (no scale), int8 or FP8 data with float32 scales, or int4 pairs with
    scales and offsets of one float dtype."""
    if scale is None:
        return data.dtype == x.dtype
    if offset is not None:
        return data.dtype == torch.uint8 and scale.is_floating_point() and offset.dtype == scale.dtype
    return data.dtype in (torch.int8, torch.float8_e4m3fn) and scale.dtype == torch.float32


def kernel_applies(x: torch.Tensor, expert_ids: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None = None,
                   offset: torch.Tensor | None = None) -> bool:
    """The kernel handles CUDA tensors with x in bf16/fp16/fp32, integer expert ids, float data in
    x's dtype, int8 or FP8 data with float32 scales, or int4 pairs with scales and offsets in groups
    of a power of two of at least MIN_GROUP input rows, when Triton is installed."""
    return (
        triton is not None
        and x.is_cuda
        and x.dtype in X_DTYPES
        and expert_ids.dtype in (torch.int64, torch.int32)
        and data.dim() == 3
        and data.device == x.device
        and _formats_fit(x, data, scale, offset)
        and _shapes_fit(x, expert_ids, data, scale, offset)
    )


def torch_expert_gemv(x: torch.Tensor, expert_ids: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None = None,
                      offset: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's arithmetic in torch: each pair's expert gathered and read in float32, the sum
    over in in float32 (int4: the weights dequantized in float32), times the expert's scale row
    (if any), rounded once to x's dtype."""
    if offset is not None:
        from .routed_experts import dequantized_experts

        weights = dequantized_experts(data[expert_ids], scale[expert_ids], offset[expert_ids], dtype=torch.float32)
        return torch.bmm(x.float()[:, None, :], weights).squeeze(1).to(x.dtype)
    sums = torch.bmm(x.float()[:, None, :], data[expert_ids].float())  # (pairs, 1, out)
    if scale is not None:
        sums = sums * scale[expert_ids]
    return sums.squeeze(1).to(x.dtype)


def expert_gemv(x: torch.Tensor, expert_ids: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None = None,
                offset: torch.Tensor | None = None) -> torch.Tensor:
    """out (pairs, out) = x (pairs, in) through each pair's expert (see the module docstring)."""
    if kernel_applies(x, expert_ids, data, scale, offset):
        partials = torch.ops.herd.expert_gemv(x, expert_ids, data, scale, offset)  # (ranges, pairs, out) float32
        return partials.sum(0).to(x.dtype)
    return torch_expert_gemv(x, expert_ids, data, scale, offset)


def _input_steps(data: torch.Tensor, scale: torch.Tensor | None, int4: bool, block_k: int | None = None
                 ) -> tuple[int, int, int, int]:
    """(in features, int4 group (1 otherwise), input rows a step, steps) of stored experts: int4
    steps one group at a time."""
    in_features = data.shape[1] * (2 if int4 else 1)
    group = in_features // scale.shape[1] if int4 else 1
    block_k = group if int4 else (block_k or BLOCK_K)
    return in_features, group, block_k, -(-in_features // block_k)


def plan_ranges(pairs: int, out_features: int, steps: int, multiprocessors_count: int,
                block_n: int = BLOCK_N) -> tuple[int, int]:
    """(ranges, steps per range): input rows split into ranges of whole steps until the grid has
    about PROGRAMS_PER_SM programs per SM (Scout's down_proj, 5120 columns, is 80 blocks of 64)."""
    blocks = -(-out_features // block_n) * max(pairs, 1)
    wanted = max(1, min(steps, PROGRAMS_PER_SM * multiprocessors_count // blocks))
    per_range = -(-steps // wanted)
    return -(-steps // per_range), per_range


if triton is not None:
    from .gemv import _as_float

    # e4m3 (4 per register) -> bf16: the byte s eeee mmm moved to bf16 bits s000 0eee emmm 0000 is
    # the same number times 2**-120 (subnormals too), so one multiply by 2**120 finishes a pair.
    # Triton's own conversion goes through float16; the two have not been timed side by side yet
    # (bench/expert_gemv_sweep.py's fp8_asm variant)
    _FP8_TO_BF16 = tl.constexpr("""{
    .reg .b32 t0, t1, s0, s1, zero, scale;
    mov.b32 zero, 0;
    mov.b32 scale, 0x7B807B80;
    prmt.b32 t0, $2, zero, 0x1404;
    prmt.b32 t1, $2, zero, 0x3424;
    shr.b32 s0, t0, 4;
    shr.b32 s1, t1, 4;
    and.b32 s0, s0, 0x07F007F0;
    and.b32 s1, s1, 0x07F007F0;
    and.b32 t0, t0, 0x80008000;
    and.b32 t1, t1, 0x80008000;
    or.b32 s0, s0, t0;
    or.b32 s1, s1, t1;
    mul.rn.bf16x2 $0, s0, scale;
    mul.rn.bf16x2 $1, s1, scale;
    }""")

    @triton.jit
    def _as_operand(w, dtype: tl.constexpr, FP8_ASM: tl.constexpr):
        """Stored weights (or int4 nibbles) as the product's dtype: exact for int8, e4m3 and nibbles."""
        if FP8_ASM:
            return tl.inline_asm_elementwise(_FP8_TO_BF16, "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4)
        return w.to(dtype)

    @triton.jit
    def _expert_gemv_kernel(x_ptr, ids_ptr, data_ptr, scale_ptr, offset_ptr, partial_ptr, pairs, K, N, steps_per_range,
                            INT4: tl.constexpr, SCALED: tl.constexpr, GROUP: tl.constexpr, FP8_ASM: tl.constexpr,
                            PRECISION: tl.constexpr,
                            TENSOR_CORES: tl.constexpr, SUMS_BY_DOT: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, M: tl.constexpr):
        """partial[range, pair, n] for BLOCK_N columns n: the range's input rows of x[pair] through
        the pair's expert. int4: BLOCK_K == GROUP, one group a step. x's row sits in row 0 of an
        (M, BLOCK_K) operand, zeros below."""
        block = tl.program_id(0)
        input_range = tl.program_id(1)
        pair = tl.program_id(2)
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        # int64: experts * in * out passes 2^31 (Scout's gate/up: 16 x 5120 x 16384)
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        x_row = x_ptr + pair.to(tl.int64) * K
        first_row = (tl.arange(0, M) == 0)[:, None]  # (M, 1)
        dtype = x_ptr.dtype.element_ty
        if PRECISION == "ieee":  # float32 products: float32 rows, or the interpreter
            dtype = tl.float32
        acc = tl.zeros((M, BLOCK_N), tl.float32)
        # int8 / FP8 without the tensor cores: each weight converted to float32 and multiplied on
        # the CUDA cores, summed over the rows of the tile once at the end
        products = tl.zeros((1 if TENSOR_CORES else BLOCK_K, BLOCK_N), tl.float32)
        first = input_range * steps_per_range
        for step in range(first, first + steps_per_range):
            start = step * BLOCK_K
            if INT4:
                half = start // 2 + tl.arange(0, BLOCK_K // 2)  # packed rows: input rows 2j (low) and 2j + 1 (high)
                half_ok = half < K // 2
                w = tl.load(data_ptr + expert * (K // 2) * N + half[:, None] * N + n[None, :],
                            mask=half_ok[:, None] & n_ok[None, :], other=0)  # (BLOCK_K // 2, BLOCK_N)
                x_even = tl.load(x_row + 2 * half, mask=half_ok, other=0.0)
                x_odd = tl.load(x_row + 2 * half + 1, mask=half_ok, other=0.0)
                even = tl.where(first_row, x_even[None, :], 0.0).to(dtype)  # (M, BLOCK_K // 2)
                odd = tl.where(first_row, x_odd[None, :], 0.0).to(dtype)
                product = tl.dot(even, _as_operand(w & 0xF, dtype, False), input_precision=PRECISION)
                product = tl.dot(odd, _as_operand(w >> 4, dtype, False), product, input_precision=PRECISION)
                group = start // GROUP
                at = expert * (K // GROUP) * N + group * N + n
                group_ok = n_ok & (tl.zeros((BLOCK_N,), tl.int32) + group < K // GROUP)  # the last range may run past K
                scale = tl.load(scale_ptr + at, mask=group_ok, other=0.0).to(tl.float32)
                offset = tl.load(offset_ptr + at, mask=group_ok, other=0.0).to(tl.float32)
                if SUMS_BY_DOT:  # the group's sum of x in every column, from the tensor cores: no reduction across threads
                    ones = tl.full((BLOCK_K // 2, BLOCK_N), 1.0, dtype)
                    x_sums = tl.dot(odd, ones, tl.dot(even, ones, input_precision=PRECISION), input_precision=PRECISION)
                else:
                    x_sums = tl.where(first_row, tl.sum(x_even.to(tl.float32) + x_odd.to(tl.float32)), 0.0)
                acc += product * scale[None, :] + x_sums * offset[None, :]  # the group's offset multiplies the sum
            else:
                k = start + tl.arange(0, BLOCK_K)
                k_ok = k < K
                w = tl.load(data_ptr + expert * K * N + k[:, None] * N + n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                            other=0.0)  # (BLOCK_K, BLOCK_N), contiguous along n
                xv = tl.load(x_row + k, mask=k_ok, other=0.0)
                if TENSOR_CORES:
                    rows = tl.where(first_row, xv[None, :], 0.0).to(dtype)  # (M, BLOCK_K)
                    acc = tl.dot(rows, _as_operand(w, dtype, FP8_ASM), acc, input_precision=PRECISION)
                else:
                    products += _as_float(w) * xv.to(tl.float32)[:, None]
        if TENSOR_CORES:
            total = tl.sum(acc, axis=0)  # (BLOCK_N,): row 0, the others are zeros
        else:
            total = tl.sum(products, axis=0)
        if SCALED and not INT4:
            total = total * tl.load(scale_ptr + expert * N + n, mask=n_ok, other=0.0)
        tl.store(partial_ptr + (input_range * pairs + pair).to(tl.int64) * N + n, total, mask=n_ok)

    def launch(x, expert_ids, data, scale=None, offset=None, *, block_n=BLOCK_N, block_k=None, warps=WARPS, stages=None,
               ranges=None, tensor_cores=True, fp8_asm=None, sums_by_dot=False):
        """(ranges, pairs, out) float32 partial sums from contiguous tensors; also runs in Triton's
        interpreter (the CPU tests). `ranges`: how many input-row ranges (`plan_ranges` if None).
        Variants for bench/expert_gemv_sweep.py to measure: `tensor_cores=False` (int8 / FP8) the
        products on the CUDA cores; `fp8_asm=False` Triton's own FP8 conversion; `sums_by_dot`
        (int4) each group's sum of x from the tensor cores."""
        pairs = x.shape[0]
        int4 = offset is not None
        out_features = data.shape[2]
        in_features, group, block_k, steps = _input_steps(data, scale, int4, block_k)
        if ranges is None:
            ranges, per_range = plan_ranges(pairs, out_features, steps, multiprocessors(x.device), block_n)
        else:
            per_range = triton.cdiv(steps, ranges)
            ranges = triton.cdiv(steps, per_range)
        partials = torch.empty((ranges, pairs, out_features), dtype=torch.float32, device=x.device)
        in_interpreter = interpreted()
        precision = "ieee" if in_interpreter or x.dtype == torch.float32 else "tf32"  # tf32: unused by 16-bit products
        fp8_asm = (fp8_asm is not False) and not in_interpreter and data.dtype == torch.float8_e4m3fn \
            and x.dtype == torch.bfloat16
        if pairs:
            _expert_gemv_kernel[(triton.cdiv(out_features, block_n), ranges, pairs)](
                x, expert_ids, data, data if scale is None else scale, offset if int4 else data, partials, pairs,
                in_features, out_features, per_range, INT4=int4, SCALED=scale is not None, GROUP=group,
                FP8_ASM=fp8_asm, PRECISION=precision, TENSOR_CORES=tensor_cores or int4, SUMS_BY_DOT=sums_by_dot,
                BLOCK_N=block_n,
                BLOCK_K=block_k, M=16, num_warps=warps, num_stages=stages or (INT4_STAGES if int4 else STAGES),
            )
        return partials

    # An opaque operator, as gemv's: the compiled step calls it and it is captured into the CUDA graph.
    @torch.library.custom_op("herd::expert_gemv", mutates_args=())
    def _expert_gemv(x: torch.Tensor, expert_ids: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None = None,
                     offset: torch.Tensor | None = None) -> torch.Tensor:
        scale, offset = (t.contiguous() if t is not None else None for t in (scale, offset))
        return launch(x.contiguous(), expert_ids.contiguous(), data.contiguous(), scale, offset)

    @_expert_gemv.register_fake
    def _(x, expert_ids, data, scale=None, offset=None):
        steps = _input_steps(data, scale, offset is not None)[3]
        ranges, _ = plan_ranges(x.shape[0], data.shape[2], steps, multiprocessors(x.device))
        return x.new_empty((ranges, x.shape[0], data.shape[2]), dtype=torch.float32)
