"""FP8 activations times FP8 weights for a few rows (5 to 64), on the tensor cores.

`fp8_rows_partials(x_q, data)`: x_q (rows, in) float8_e4m3fn, data (out, in) float8_e4m3fn ->
float32 partial sums (split, rows, out) whose sum over the first dimension is x_q @ data.T, from the
exact FP8 products, summed as the tensor cores sum them (`PRECISE_COLUMNS`). The caller applies the row and
column scales (and the cast) in torch, where the compiled step fuses them, with the sum of the
partials, into whatever follows (the residual add, the activation): what `_scaled_mm` with
row-wise scales computes, `(x_q @ data.T) * x_scale * w_scale`, rounded once.

Why not `_scaled_mm` at these rows: its tiles span 128 output columns and every input column, so
a 4096-column output (the o and down projections of Llama-3.1-8B) is 32 programs on a 132-SM GPU,
and most of the weight bandwidth goes unused. Here a program takes BLOCK_N output columns and one
of `split` ranges of the input columns, and the grid is sized to the device (`PROGRAMS_PER_SM`).

Runs for CUDA tensors when Triton is installed (`kernel_applies`); `torch_fp8_rows_partials`
computes the same in torch. In Triton's interpreter (the CPU tests) the tiles multiply in
float32: it has no FP8 products.
"""

from __future__ import annotations

import torch

from . import interpreted, multiprocessors, programmatic_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton: the torch arithmetic runs instead
    triton = None

MIN_ROWS = 5  # up to 4 rows the few-row kernel (gemv.py) reads FP8 weights with its fused neighbours
MAX_ROWS = 64  # beyond, the weight tile is reused enough for `_scaled_mm`'s large tiles
BLOCK_N = 64
BLOCK_K = 128
WARPS = 4
STAGES = 3
# Hopper's FP8 tensor-core sums keep about 14 bits. FBGEMM's row-wise FP8 matmul, which transformers
# runs for FbgemmFp8Config (`use_fast_accum=True`), lets them run over the whole input, and so does
# this kernel by default (0). A positive count adds the sums of that many input columns to a float32
# accumulator instead, as `_scaled_mm` without fast accumulation does: 5% slower at 64 rows on
# Llama-3.1-8B (bench/RESULTS.md).
PRECISE_COLUMNS = 0
PROGRAMS_PER_SM = 2  # input-column ranges are added until the grid has about this many programs per SM
MAX_SPLIT = 8


def kernel_applies(x_q: torch.Tensor, data: torch.Tensor) -> bool:
    """FP8 rows (MIN_ROWS to MAX_ROWS) and a contiguous FP8 (out, in) weight on CUDA, in whole BLOCK_K steps."""
    return (triton is not None and x_q.is_cuda and x_q.dim() == 2 and data.dim() == 2
            and x_q.dtype == data.dtype == torch.float8_e4m3fn and MIN_ROWS <= x_q.shape[0] <= MAX_ROWS
            and x_q.shape[1] == data.shape[1] and x_q.shape[1] % BLOCK_K == 0 and data.is_contiguous())


def split_for(out_features: int, in_features: int, device: torch.device, block_n: int = BLOCK_N,
              block_k: int = BLOCK_K, programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """How many input-column ranges: doubled while the grid has fewer than programs_per_sm programs
    per SM and each range keeps whole BLOCK_K steps."""
    column_blocks = -(-out_features // block_n)
    wanted = programs_per_sm * multiprocessors(device)
    split = 1
    while (column_blocks * split * 2 <= wanted and split * 2 <= MAX_SPLIT
           and in_features % (split * 2 * block_k) == 0):
        split *= 2
    return split


def torch_fp8_rows_partials(x_q: torch.Tensor, data: torch.Tensor, split: int = 1) -> torch.Tensor:
    """The same partial sums in torch: float32 products of the exact FP8 inputs."""
    x_parts = x_q.float().reshape(x_q.shape[0], split, -1).transpose(0, 1)  # (split, rows, in / split)
    w_parts = data.float().reshape(data.shape[0], split, -1).transpose(0, 1)  # (split, out, in / split)
    return torch.bmm(x_parts, w_parts.transpose(1, 2))  # (split, rows, out)


if triton is not None:

    @triton.jit
    def _accumulate(acc, x, w, PRECISE_COLUMNS: tl.constexpr, INTERPRETED: tl.constexpr):
        """acc + x @ w.T: x (BLOCK_M, BLOCK_K), w (BLOCK_N, BLOCK_K) FP8, acc float32."""
        if INTERPRETED:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
        elif PRECISE_COLUMNS == 0:
            acc = tl.dot(x, tl.trans(w), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc, max_num_imprecise_acc=PRECISE_COLUMNS)
        return acc

    @triton.jit
    def _fp8_rows_kernel(x_ptr, w_ptr, partial_ptr, rows, N, K, K_PER_SPLIT,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISE_COLUMNS: tl.constexpr, PDL: tl.constexpr, INTERPRETED: tl.constexpr):
        if PDL:  # the next kernel may launch now: it only reads what this one writes after its own gdc_wait
            tl.extra.cuda.gdc_launch_dependents()
        column_block = tl.program_id(0)
        split = tl.program_id(1)
        m = tl.arange(0, BLOCK_M)
        n = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = m < rows
        n_ok = n < N
        k = split * K_PER_SPLIT + tl.arange(0, BLOCK_K)
        x_at = x_ptr + m[:, None] * K + k[None, :]  # (BLOCK_M, BLOCK_K)
        w_at = w_ptr + n.to(tl.int64)[:, None] * K + k[None, :]  # (BLOCK_N, BLOCK_K)
        if PDL:  # with PDL only the launch overlaps the previous kernel: reading the first weight tile
            tl.extra.cuda.gdc_wait()  # before this wait took the loop out of Triton's pipelining
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K_PER_SPLIT, BLOCK_K):
            w = tl.load(w_at, mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_at, mask=m_ok[:, None], other=0.0)
            acc = _accumulate(acc, x, w, PRECISE_COLUMNS, INTERPRETED)
            x_at += BLOCK_K
            w_at += BLOCK_K
        out_at = partial_ptr + (split * rows + m[:, None]) * N + n[None, :]
        tl.store(out_at, acc, mask=m_ok[:, None] & n_ok[None, :])

    def launch(x_q: torch.Tensor, data: torch.Tensor, split: int | None = None, block_n: int = BLOCK_N,
               block_k: int = BLOCK_K, warps: int = WARPS, stages: int = STAGES,
               programs_per_sm: int = PROGRAMS_PER_SM, precise_columns: int | None = None,
               pdl: bool | None = None) -> torch.Tensor:
        """The partials (the module docstring); split None: `split_for`; pdl None: where the device
        has programmatic dependent launch (kernels.programmatic_launch)."""
        rows, in_features = x_q.shape
        out_features = data.shape[0]
        if split is None:
            split = split_for(out_features, in_features, x_q.device, block_n, block_k, programs_per_sm)
        if in_features % (split * block_k):
            raise ValueError(f"{in_features} input columns do not split into {split} ranges of whole {block_k}-column steps")
        pdl = programmatic_launch(x_q) if pdl is None else pdl
        precise_columns = PRECISE_COLUMNS if precise_columns is None else precise_columns
        partials = torch.empty((split, rows, out_features), device=x_q.device, dtype=torch.float32)
        grid = (triton.cdiv(out_features, block_n), split)
        _fp8_rows_kernel[grid](x_q, data, partials, rows, out_features, in_features, in_features // split,
                               BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=block_n, BLOCK_K=block_k,
                               PRECISE_COLUMNS=min(precise_columns, block_k), PDL=pdl, INTERPRETED=interpreted(),
                               num_warps=warps, num_stages=stages, launch_pdl=pdl)
        return partials

    # An opaque operator: the compiled step calls it (as gemv.py's), and fuses the partials' sum and
    # the scales into the next kernel. It launches through Triton's own launcher, which keeps the
    # programmatic-launch attribute. The split is planned here, outside the traced code.
    @torch.library.custom_op("herd::fp8_rows_partials", mutates_args=())
    def _fp8_rows_partials(x_q: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        return launch(x_q.contiguous(), data)

    @_fp8_rows_partials.register_fake
    def _(x_q, data):
        split = split_for(data.shape[0], data.shape[1], x_q.device)
        return x_q.new_empty((split, x_q.shape[0], data.shape[0]), dtype=torch.float32)


def fp8_rows_partials(x_q: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """(split, rows, out) float32 partial sums of x_q @ data.T (the module docstring)."""
    if kernel_applies(x_q, data):
        return torch.ops.herd.fp8_rows_partials(x_q, data)
    return torch_fp8_rows_partials(x_q, data)
