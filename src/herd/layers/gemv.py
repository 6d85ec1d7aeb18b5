"""The decode step's matmuls of a few rows, each one Triton kernel with its neighbours fused in.

At batch 1 a decode step reads every weight once, so its matmuls are matrix-vector products
bound by memory bandwidth. What keeps them from the floor is what happens around them: the
RMSNorm before q/k/v and gate/up, the SwiGLU activation between gate/up and down, the residual
add after o and down. The compiler fuses those into its own reduction kernels, but the
configurations it then picks vary from process to process (the 8B's down projection took 43 to
55 us for the same 117 MB), and an activation recomputed in every output block costs reads.

Here each projection is one kernel with a fixed, measured configuration (`_config`):

- `norm_linear`: linears(rms_norm(x)), the norm computed inside (q/k/v side by side; the head);
- `norm_gated_activation`: silu(gate(n)) * up(n) with n = rms_norm(x), what down reads;
- `linear_add`: residual + linear(x) (o and down).

Each function runs its kernel for CUDA tensors of at most `MAX_ROWS` rows when Triton is
installed, the layers have no bias and the dtypes agree; otherwise it runs the same arithmetic in
torch, rounded at the same points (the CPU path, larger batches, `generate(disable_compile=True)`,
and HERD_DISABLE_FUSED_KERNELS=1). The kernels accumulate in float32 and round where the torch
code rounds: after the norm, after its weight, after each matmul, after the activation.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .fused import fused_linear, fused_weight
from .mlp import GatedMLP, activation_product
from .norm import RMSNorm, rms_norm

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton: the torch arithmetic runs instead
    triton = None

MAX_ROWS = 4  # beyond a few rows the weight tile is reused enough for the library matmul to win


def _kernel_applies(x: torch.Tensor, norm: RMSNorm | None, *linears: nn.Linear) -> bool:
    return (
        triton is not None
        and x.is_cuda
        and x.dim() == 2
        and x.shape[0] <= MAX_ROWS
        and kernels.enabled()
        and all(layer.bias is None and layer.weight.dtype == x.dtype for layer in linears)
        and (norm is None or norm.weight.dtype == x.dtype)
    )


# --- public functions: kernel where it applies, torch otherwise ----------------------------------


def norm_linear(x: torch.Tensor, norm: RMSNorm, *linears: nn.Linear, out_dtype: torch.dtype | None = None):
    """x (rows, in) -> the layers' outputs of norm(x) side by side (rows, sum of out features),
    in out_dtype (the layers' dtype unless given: the head asks for float32)."""
    weight = fused_weight(*linears)
    if weight is not None and _kernel_applies(x, norm, *linears):
        return torch.ops.herd.norm_linear(x, norm.weight, norm.eps, weight, out_dtype or x.dtype)
    out = fused_linear(rms_norm(x, norm.weight, norm.eps), *linears)
    return out if out_dtype is None else out.to(out_dtype)


def norm_mlp_add(x: torch.Tensor, norm: RMSNorm, mlp: GatedMLP) -> torch.Tensor:
    """x + mlp(norm(x)) for x (rows, hidden): two kernels for SiLU (every Llama), the SwiGLU product
    formed in gate/up's (measured against forming it in down's from gate/up's output: equal within
    1 us at the 8B's widths; bench/gemv_sweep.py)."""
    weight = fused_weight(mlp.gate_proj, mlp.up_proj)
    if weight is not None and mlp.act_fn is nn.functional.silu and _kernel_applies(x, norm, *mlp_linears(mlp)):
        activated = torch.ops.herd.norm_swiglu(x, norm.weight, norm.eps, weight)  # (rows, intermediate)
        return torch.ops.herd.linear_add(activated, mlp.down_proj.weight, x)
    gate, up = fused_linear(rms_norm(x, norm.weight, norm.eps), mlp.gate_proj, mlp.up_proj).chunk(2, dim=-1)
    return x + mlp.down_proj(activation_product(gate, up, mlp.act_fn))


def mlp_linears(mlp: GatedMLP) -> tuple[nn.Linear, ...]:
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj


def linear_add(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """residual (rows, out) + linear(x (rows, in))."""
    if _kernel_applies(x, None, linear):
        return torch.ops.herd.linear_add(x, linear.weight, residual)
    return residual + linear(x)


# --- kernels ---------------------------------------------------------------------------------------


def _config(out_features: int, in_features: int, gated: bool) -> tuple[int, int, int, int]:
    """(rows of the weight per program, columns per loop step, warps, pipeline stages).

    Measured on an H100 with bench/gemv_sweep.py at the Llama widths (1B to 70B, Scout): enough
    programs to keep every SM's loads in flight, rows long enough to read in wide vectors."""
    if triton is None:
        return 4, 1024, 4, 1
    block_k = min(1024, triton.next_power_of_2(in_features))
    return (2 if gated or out_features <= 2048 else 4), block_k, 4, 1


if triton is not None:

    @triton.jit
    def _few_row_linear_kernel(
        x_ptr,  # (rows, K)
        w_ptr,  # (N, K), or (2N, K) gate rows then up rows when GATED
        out_ptr,  # (rows, N)
        residual_ptr,  # (rows, N) when RESIDUAL
        norm_w_ptr,  # (K,) when NORM
        rows,
        N,
        K,
        eps,
        NORM: tl.constexpr,
        GATED: tl.constexpr,
        RESIDUAL: tl.constexpr,
        ROWS: tl.constexpr,  # rows rounded up to a power of two
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        dtype = w_ptr.dtype.element_ty
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
        n_ok = n < N
        w_rows = n.to(tl.int64) * K
        r = tl.arange(0, ROWS)
        r_ok = r < rows
        cols = tl.arange(0, BLOCK_K)

        if NORM:  # every program reads its rows of x once more for the norm's statistics
            square_sums = tl.zeros((ROWS, BLOCK_K), tl.float32)
            for start in range(0, K, BLOCK_K):
                k = start + cols
                xv = tl.load(x_ptr + r[:, None] * K + k[None, :], mask=r_ok[:, None] & (k < K)[None, :], other=0.0,
                             eviction_policy="evict_last")
                xf = xv.to(tl.float32)
                square_sums += xf * xf
            # (ROWS,); the cast: torch.compile passes Python floats as float64
            inv_rms = tl.rsqrt((tl.sum(square_sums, axis=1) / K + eps).to(tl.float32))

        # per-column products summed once at the end: (ROWS, BLOCK_N, BLOCK_K)
        acc = tl.zeros((ROWS, BLOCK_N, BLOCK_K), tl.float32)
        if GATED:
            acc_up = tl.zeros((ROWS, BLOCK_N, BLOCK_K), tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + cols
            k_ok = k < K
            # x and the norm's weight are read by every program: kept in L2; the weight streams through
            xv = tl.load(x_ptr + r[:, None] * K + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0,
                         eviction_policy="evict_last")
            if NORM:
                norm_w = tl.load(norm_w_ptr + k, mask=k_ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
                xv = (xv.to(tl.float32) * inv_rms[:, None]).to(dtype)
                xv = (xv.to(tl.float32) * norm_w[None, :]).to(dtype)
            xf = xv.to(tl.float32)[:, None, :]
            w_mask = n_ok[:, None] & k_ok[None, :]
            w = tl.load(w_ptr + w_rows[:, None] + k[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
            acc += xf * w.to(tl.float32)[None, :, :]
            if GATED:
                w_up = tl.load(w_ptr + N * K + w_rows[:, None] + k[None, :], mask=w_mask, other=0.0,
                               eviction_policy="evict_first")
                acc_up += xf * w_up.to(tl.float32)[None, :, :]

        y = tl.sum(acc, axis=2).to(dtype).to(tl.float32)  # (ROWS, BLOCK_N), rounded as the matmul's output
        if GATED:
            up = tl.sum(acc_up, axis=2).to(dtype).to(tl.float32)
            activated = (y * tl.sigmoid(y)).to(dtype).to(tl.float32)
            y = activated * up
        out_offsets = r[:, None] * N + n[None, :]
        out_mask = r_ok[:, None] & n_ok[None, :]
        if RESIDUAL:
            y = y.to(dtype).to(tl.float32) + tl.load(residual_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_offsets, y.to(dtype).to(out_ptr.dtype.element_ty), mask=out_mask)

    def launch(x, weight, out, *, norm_weight=None, eps=0.0, residual=None, gated=False, config=None, wrap=False):
        """out (rows, N) from x (rows, K) and weight ((2 if gated else 1) * N, K). `wrap` lets
        torch.compile place the kernel in its graph (and so in the CUDA graph); unwrapped, it also
        runs in Triton's interpreter (the CPU tests use that)."""
        rows, in_features = x.shape[0], weight.shape[1]
        out_features = out.shape[1]
        block_n, block_k, warps, stages = config or _config(out_features, in_features, gated)
        kernel = torch.library.wrap_triton(_few_row_linear_kernel) if wrap else _few_row_linear_kernel
        kernel[(triton.cdiv(out_features, block_n),)](
            x, weight, out, residual if residual is not None else out, norm_weight if norm_weight is not None else x,
            rows, out_features, in_features, eps,
            NORM=norm_weight is not None, GATED=gated, RESIDUAL=residual is not None,
            ROWS=triton.next_power_of_2(rows), BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
        return out

    @torch.library.triton_op("herd::norm_linear", mutates_args=())
    def _norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                     out_dtype: torch.dtype) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)
        return launch(x, weight, out, norm_weight=norm_weight, eps=eps, wrap=True)

    @torch.library.triton_op("herd::norm_swiglu", mutates_args=())
    def _norm_swiglu(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((x.shape[0], weight.shape[0] // 2))
        return launch(x, weight, out, norm_weight=norm_weight, eps=eps, gated=True, wrap=True)

    @torch.library.triton_op("herd::linear_add", mutates_args=())
    def _linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x, residual = x.contiguous(), residual.contiguous()
        out = torch.empty_like(residual)
        return launch(x, weight, out, residual=residual, wrap=True)
