"""Quantized routed experts in a decode step: each (token, expert) pair's row times its expert's
weights, read as stored, one byte a weight.

`expert_gemv(x, expert_ids, data, scale)`: x (pairs, in) in bf16/fp16/fp32, expert_ids (pairs,)
int64 (or int32) on x's device, data (experts, in, out) int8 or float8_e4m3fn as checkpoints
store it (row-major, contiguous along out), scale float32 (experts, 1, out), one per expert and
output column -> out (pairs, out) in x's dtype:

    out[p, n] = (sum_k x[p, k] * float(data[e_p, k, n])) * scale[e_p, 0, n],  e_p = expert_ids[p]

accumulated in float32 and rounded once. The kernel reads each pair's expert in place, so a
decode step reads the picked experts' bytes once per pair that picked them, and no dequantized
copy is written; the expert ids are read on the device (the step is captured in a CUDA graph).

One program per (pair, BLOCK_N output columns): it loads its pair's expert id, walks in in
BLOCK_K steps, each a (BLOCK_K, BLOCK_N) tile of the expert (contiguous along out: coalesced)
and BLOCK_K values of x, sums over k into BLOCK_N float32 columns, then applies the scale row.

The kernel runs for CUDA tensors when Triton is installed and the dtypes fit (`kernel_applies`);
otherwise `torch_expert_gemv` computes the same in torch: the picked experts gathered in float32,
a batched matmul, the scale, rounded once.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton: the torch arithmetic runs instead
    triton = None

# Not measured yet: a first guess (8 KiB of 1-byte weights per tile and loop step).
BLOCK_N = 128
BLOCK_K = 64
WARPS = 4
STAGES = 3

X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DATA_DTYPES = (torch.int8, torch.float8_e4m3fn)


def _shapes_fit(x: torch.Tensor, expert_ids: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> bool:
    experts, in_features, out_features = data.shape
    return (x.dim() == 2 and x.shape[1] == in_features and expert_ids.shape == (x.shape[0],)
            and tuple(scale.shape) == (experts, 1, out_features))


def kernel_applies(x: torch.Tensor, expert_ids: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> bool:
    """The kernel handles CUDA tensors with x in bf16/fp16/fp32, integer expert ids, int8 or FP8
    data and float32 scales, when Triton is installed."""
    return (
        triton is not None
        and x.is_cuda
        and x.dtype in X_DTYPES
        and expert_ids.dtype in (torch.int64, torch.int32)
        and data.dim() == 3
        and data.dtype in DATA_DTYPES
        and scale.dtype == torch.float32
        and _shapes_fit(x, expert_ids, data, scale)
    )


def torch_expert_gemv(x: torch.Tensor, expert_ids: torch.Tensor, data: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in torch: each pair's expert gathered and read in float32, the sum
    over in in float32, times the expert's scale row, rounded once to x's dtype."""
    sums = torch.bmm(x.float()[:, None, :], data[expert_ids].float())  # (pairs, 1, out)
    return (sums * scale[expert_ids]).squeeze(1).to(x.dtype)


def expert_gemv(x: torch.Tensor, expert_ids: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """out (pairs, out) = x (pairs, in) through each pair's quantized expert (see the module docstring)."""
    if kernel_applies(x, expert_ids, data, scale):
        return torch.ops.herd.expert_gemv(x, expert_ids, data, scale)
    return torch_expert_gemv(x, expert_ids, data, scale)


if triton is not None:

    @triton.jit
    def _expert_gemv_kernel(x_ptr, ids_ptr, data_ptr, scale_ptr, out_ptr, K, N,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pair = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        # int64: experts * in * out passes 2^31 (Scout's gate/up: 16 x 5120 x 16384); one expert's fits int32
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        expert_data = data_ptr + expert * K * N
        x_row = x_ptr + pair.to(tl.int64) * K
        total = tl.zeros((BLOCK_N,), tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            k_ok = k < K
            xv = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)  # (BLOCK_K,)
            tile = tl.load(expert_data + k[:, None] * N + n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                           other=0.0)  # (BLOCK_K, BLOCK_N), contiguous along n
            total += tl.sum(tile.to(tl.float32) * xv[:, None], axis=0)
        scale = tl.load(scale_ptr + expert * N + n, mask=n_ok, other=0.0)
        tl.store(out_ptr + pair.to(tl.int64) * N + n, (total * scale).to(out_ptr.dtype.element_ty), mask=n_ok)

    def launch(x, expert_ids, data, scale, out, *, block_n=BLOCK_N, block_k=BLOCK_K, warps=WARPS, stages=STAGES):
        """out (pairs, out) from contiguous tensors; also runs in Triton's interpreter (the CPU tests)."""
        pairs, in_features = x.shape
        out_features = data.shape[2]
        if pairs:
            _expert_gemv_kernel[(pairs, triton.cdiv(out_features, block_n))](
                x, expert_ids, data, scale, out, in_features, out_features,
                BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
            )
        return out

    # An opaque operator, as gemv's: the compiled step calls it and it is captured into the CUDA graph.
    @torch.library.custom_op("herd::expert_gemv", mutates_args=())
    def _expert_gemv(x: torch.Tensor, expert_ids: torch.Tensor, data: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
        x, expert_ids, data, scale = x.contiguous(), expert_ids.contiguous(), data.contiguous(), scale.contiguous()
        return launch(x, expert_ids, data, scale, x.new_empty((x.shape[0], data.shape[2])))

    @_expert_gemv.register_fake
    def _(x, expert_ids, data, scale):
        return x.new_empty((x.shape[0], data.shape[2]))
