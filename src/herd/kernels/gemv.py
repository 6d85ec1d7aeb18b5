"""The decode step's matmuls of a few rows, each one Triton kernel with its neighbours fused in.

At batch 1 a decode step reads every weight once, so its matmuls are matrix-vector products
bound by memory bandwidth. What keeps them from the floor is what happens around them: the
RMSNorm before q/k/v and gate/up, the SwiGLU activation between gate/up and down, the residual
add after o and down. A compiler fuses those into its own reduction kernels, but the
configurations it picks vary from process to process, and an activation recomputed in every
output block costs reads.

Here each projection is one kernel with a fixed, measured configuration (`_config`):

- `norm_linear`: weight @ rms_norm(x), the norm computed inside (q/k/v side by side; the head);
- `norm_qkv_rotary`: q/k/v of rms_norm(x) with rotary applied to q and k, k and v written into
  the cache at the new token's slot (one kernel instead of two per layer);
- `norm_swiglu`: silu(gate(n)) * up(n) with n = rms_norm(x), what down reads;
- `linear` and `linear_add`: weight @ x, and residual + weight @ x (o and down).

Weights are (out features, in features) tensors, several projections that read the same input
stacked along the rows (q/k/v; gate then up). A configuration may make the kernel persistent: a
few programs per SM, each looping over its share of the weight's row blocks and requesting the
next block's weights before the products of the current one, with x read and normed once per
program.

Each function runs its kernel for CUDA tensors of at most `MAX_ROWS` rows when Triton is
installed, there is no bias and the dtypes agree; otherwise it runs the same arithmetic in
torch (`torch_*`), rounded at the same points. The kernels accumulate in float32 and round where
the torch code rounds: after the norm, after its weight, after each matmul, after the activation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import multiprocessors, programmatic_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton: the torch arithmetic runs instead
    triton = None

MAX_ROWS = 4  # beyond a few rows the weight tile is reused enough for the library matmul to win


def kernel_applies(x: torch.Tensor, *tensors: torch.Tensor | None, bias: torch.Tensor | None = None) -> bool:
    """The kernel handles x (rows <= MAX_ROWS, hidden) on CUDA with weights (and norm weights) of
    x's dtype and no bias."""
    return (
        triton is not None
        and x.is_cuda
        and x.dim() == 2
        and x.shape[0] <= MAX_ROWS
        and bias is None
        and all(tensor is None or tensor.dtype == x.dtype for tensor in tensors)
    )


# --- the torch arithmetic each kernel replaces -------------------------------------------------------


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As the reference RMSNorm: normalised in float32, cast back, then times the weight."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def torch_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin: dimension d turns with d + head_dim / 2."""
    low, high = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-high, low), dim=-1) * sin


def torch_norm_qkv_rotary(x, norm_weight, eps, weight, bias, cos, sin, keys, values, slot):
    rows, head_dim, kv_heads = x.shape[0], keys.shape[-1], keys.shape[1]
    qkv = nn.functional.linear(torch_rms_norm(x, norm_weight, eps), weight, bias)  # (rows, (heads + 2 kv_heads) * head_dim)
    # -> query (rows, heads, head_dim), key/value (rows, kv_heads, head_dim)
    query, key, value = qkv.view(rows, -1, head_dim).split([qkv.shape[1] // head_dim - 2 * kv_heads, kv_heads, kv_heads], 1)
    cos, sin = cos.view(rows, 1, head_dim), sin.view(rows, 1, head_dim)
    query, key = torch_rotate(query, cos, sin), torch_rotate(key, cos, sin)
    keys[:, :, slot] = key[:, :, None].to(keys.dtype)
    values[:, :, slot] = value[:, :, None].to(values.dtype)
    return query.reshape(rows, -1)


# --- public functions: kernel where it applies, torch otherwise ----------------------------------


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (rows, in) -> weight @ rms_norm(x) (rows, out), in out_dtype (x's unless given: the head
    asks for float32)."""
    if kernel_applies(x, norm_weight, weight, bias=bias):
        return torch.ops.herd.norm_linear(x, norm_weight, eps, weight, out_dtype or x.dtype)
    out = nn.functional.linear(torch_rms_norm(x, norm_weight, eps), weight, bias)
    return out if out_dtype is None else out.to(out_dtype)


def norm_qkv_rotary(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                    values: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """The attention input of one new token per row: x (rows, hidden) -> query (rows, heads * head_dim),
    rotated; the rotated key and the value go into keys/values (rows, kv_heads, slots, head_dim) at
    slot (1,). weight: q, k and v stacked ((heads + 2 kv_heads) * head_dim, hidden). cos/sin
    (rows, head_dim): Llama's rotary tables (dimension d turns with d + head_dim/2)."""
    if (
        kernel_applies(x, norm_weight, weight, cos, sin, keys, values, bias=bias)
        and keys.is_contiguous()
        and values.is_contiguous()
        and keys.shape[-1] % 2 == 0
    ):
        rows, head_dim = x.shape[0], keys.shape[-1]
        return torch.ops.herd.norm_qkv_rotary(x, norm_weight, eps, weight, cos.reshape(rows, head_dim),
                                              sin.reshape(rows, head_dim), keys, values, slot)
    return torch_norm_qkv_rotary(x, norm_weight, eps, weight, bias, cos, sin, keys, values, slot)


def norm_gated_activation(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up_weight: torch.Tensor,
                          activation, bias: torch.Tensor | None = None) -> torch.Tensor:
    """act(gate(n)) * up(n) with n = rms_norm(x): x (rows, hidden) -> (rows, intermediate);
    gate_up_weight (2 * intermediate, hidden), gate rows first. One kernel for SiLU (every Llama)."""
    if activation is nn.functional.silu and kernel_applies(x, norm_weight, gate_up_weight, bias=bias):
        return torch.ops.herd.norm_swiglu(x, norm_weight, eps, gate_up_weight)
    gate, up = nn.functional.linear(torch_rms_norm(x, norm_weight, eps), gate_up_weight, bias).chunk(2, dim=-1)
    return activation(gate) * up


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """weight @ x: x (rows, in) -> (rows, out)."""
    if kernel_applies(x, weight, bias=bias):
        return torch.ops.herd.linear(x, weight)
    return nn.functional.linear(x, weight, bias)


def linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """residual (rows, out) + weight @ x (rows, in)."""
    if kernel_applies(x, weight, residual, bias=bias):
        return torch.ops.herd.linear_add(x, weight, residual)
    return residual + nn.functional.linear(x, weight, bias)


# --- kernels ---------------------------------------------------------------------------------------


class GemvConfig(NamedTuple):
    block_n: int  # rows of the weight per program
    block_k: int  # columns per loop step
    warps: int = 4
    stages: int = 1
    first_k: int | None = None  # columns read in one go before the loop (block_k if None): more bytes in flight
    programs_per_sm: int = 0  # > 0: this many programs per SM loop over the blocks (whole rows in the first read)


def _config(out_features: int, in_features: int, gated: bool) -> GemvConfig:
    """The configuration for a weight shape, chosen by measurement (bench/gemv_sweep.py for one
    kernel, bench/profile_decode.py for whole steps; numbers in bench/RESULTS.md). What matters most
    is having every load of a program in flight at once: a whole row (up to 4096 columns) in the
    first read, 2048 columns per step for longer rows. Short rows with many outputs (the 1B's MLP)
    leave most programs idle in the last wave; persistent programs that read their next block
    while computing one close that gap. Elsewhere persistence measured equal or slower."""
    if triton is None:
        return GemvConfig(4, 1024)
    row = triton.next_power_of_2(in_features)
    if gated and row <= 2048:
        # gate/up of short rows (the 1B: 2 x 8192 x 2048): two persistent programs per SM, 4 gate
        # and 4 up rows per block
        return GemvConfig(4, 2048, 8, 1, row, 2)
    if 4096 < row <= 8192 and not gated and out_features <= 2048:
        # down of long rows into few outputs (the 1B: 2048 x 8192): two persistent programs per
        # SM, each reading 2 whole rows per loop step while it computes the 2 before
        return GemvConfig(2, 2048, 8, 1, row, 2)
    first_k = row if row <= 4096 else None
    block_n = 2 if gated else 4
    # about 64 weight elements per thread in the first read: 8 warps for 4 rows of 4096
    warps = 8 if first_k is not None and not gated and block_n * first_k >= 16384 else 4
    return GemvConfig(block_n, 2048 if row > 4096 else min(1024, row), warps, 1, first_k)


if triton is not None:

    @triton.jit
    def _load_x(x_ptr, r, r_ok, k, k_ok, K):
        """(ROWS, width): columns k of x's rows. Every program reads x: kept in L2 (the weight streams through)."""
        return tl.load(x_ptr + r[:, None] * K + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0,
                       eviction_policy="evict_last")

    @triton.jit
    def _normed(xv, norm_w_ptr, inv_rms, k, k_ok, NORM: tl.constexpr, dtype: tl.constexpr):
        """(ROWS, 1, width) float32: x's columns k, normed and rounded as the torch norm rounds when NORM."""
        if NORM:
            norm_w = tl.load(norm_w_ptr + k, mask=k_ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
            xv = (xv.to(tl.float32) * inv_rms[:, None]).to(dtype)
            xv = (xv.to(tl.float32) * norm_w[None, :]).to(dtype)
        return xv.to(tl.float32)[:, None, :]

    @triton.jit
    def _block_rows(block, ROTARY: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        """(BLOCK_N,) the weight rows (output features) of a block: BLOCK_N consecutive rows, or with
        ROTARY BLOCK_N // 2 rotary pairs, rows d and d + HEAD_DIM // 2 of one head side by side."""
        j = tl.arange(0, BLOCK_N)
        if ROTARY:
            pair = block * (BLOCK_N // 2) + j // 2
            return (pair // (HEAD_DIM // 2)) * HEAD_DIM + pair % (HEAD_DIM // 2) + (j % 2) * (HEAD_DIM // 2)
        return block * BLOCK_N + j

    @triton.jit
    def _load_rows(w_ptr, n, n_ok, N, K, cols, GATED: tl.constexpr):
        """(BLOCK_N, width) each: columns cols of weight rows n (and of the up rows n + N when GATED),
        zeros where not n_ok."""
        mask = n_ok[:, None] & (cols < K)[None, :]
        rows = n.to(tl.int64) * K
        w = tl.load(w_ptr + rows[:, None] + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        w_up = w
        if GATED:
            w_up = tl.load(w_ptr + N * K + rows[:, None] + cols[None, :], mask=mask, other=0.0,
                           eviction_policy="evict_first")
        return w, w_up

    @triton.jit
    def _rounded(v, dtype: tl.constexpr):
        return v.to(dtype).to(tl.float32)

    @triton.jit
    def _store_query_or_cache(y, r, r_ok, n, out_ptr, keys_ptr, values_ptr, slot, q_rows, kv_rows, slots,
                              HEAD_DIM: tl.constexpr):
        """y (ROWS, P) of rows n (P,): query rows to out (rows, q_rows), key and value rows into the
        caches (rows, kv_rows // HEAD_DIM, slots, HEAD_DIM) at slot."""
        is_query = n < q_rows
        is_key = (n >= q_rows) & (n < q_rows + kv_rows)
        is_value = (n >= q_rows + kv_rows) & (n < q_rows + 2 * kv_rows)
        in_cache = tl.where(is_key, n - q_rows, n - q_rows - kv_rows)  # kv head * HEAD_DIM + d
        kv_head = in_cache // HEAD_DIM
        cache_offsets = ((r[:, None].to(tl.int64) * (kv_rows // HEAD_DIM) + kv_head[None, :]) * slots + slot) * HEAD_DIM \
            + (in_cache % HEAD_DIM)[None, :]
        tl.store(out_ptr + r[:, None] * q_rows + n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & is_query[None, :])
        tl.store(keys_ptr + cache_offsets, y.to(keys_ptr.dtype.element_ty), mask=r_ok[:, None] & is_key[None, :])
        tl.store(values_ptr + cache_offsets, y.to(values_ptr.dtype.element_ty), mask=r_ok[:, None] & is_value[None, :])

    @triton.jit
    def _rotary_epilogue(y, r, r_ok, n, out_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, slot_ptr, q_rows, kv_rows,
                         slots, dtype: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        """y (ROWS, BLOCK_N) of the rotary pairs n (`_program_rows`): rotate the query and key rows as
        torch does in y's dtype (q * cos + rotate_half(q) * sin, each product rounded), then store."""
        low, high = tl.split(tl.reshape(y, (ROWS, BLOCK_N // 2, 2)))  # (ROWS, BLOCK_N // 2) each
        n_low, n_high = tl.split(tl.reshape(n, (BLOCK_N // 2, 2)))
        d_low = n_low % HEAD_DIM  # (BLOCK_N // 2,) below HEAD_DIM // 2
        table = r[:, None] * HEAD_DIM + d_low[None, :]
        cos_low = tl.load(cos_ptr + table, mask=r_ok[:, None], other=0.0).to(tl.float32)
        sin_low = tl.load(sin_ptr + table, mask=r_ok[:, None], other=0.0).to(tl.float32)
        cos_high = tl.load(cos_ptr + table + HEAD_DIM // 2, mask=r_ok[:, None], other=0.0).to(tl.float32)
        sin_high = tl.load(sin_ptr + table + HEAD_DIM // 2, mask=r_ok[:, None], other=0.0).to(tl.float32)
        rotated = (n_low < q_rows + kv_rows)[None, :]  # query and key rows; value rows pass through
        new_low = _rounded(_rounded(low * cos_low, dtype) - _rounded(high * sin_low, dtype), dtype)
        new_high = _rounded(_rounded(high * cos_high, dtype) + _rounded(low * sin_high, dtype), dtype)
        slot = tl.load(slot_ptr)
        _store_query_or_cache(tl.where(rotated, new_low, low), r, r_ok, n_low, out_ptr, keys_ptr, values_ptr, slot,
                              q_rows, kv_rows, slots, HEAD_DIM)
        _store_query_or_cache(tl.where(rotated, new_high, high), r, r_ok, n_high, out_ptr, keys_ptr, values_ptr, slot,
                              q_rows, kv_rows, slots, HEAD_DIM)

    @triton.jit
    def _block_output(block, w_first, w_up_first, x_first, x_ptr, w_ptr, out_ptr, residual_ptr, norm_w_ptr, inv_rms,
                      cos_ptr, sin_ptr, keys_ptr, values_ptr, slot_ptr, r, r_ok, N, K, q_rows, kv_rows, slots,
                      dtype: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
                      ROTARY: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, FIRST_K: tl.constexpr):
        """The outputs of one block of weight rows: w_first/w_up_first (BLOCK_N, FIRST_K) its first
        columns, already read; x_first (ROWS, 1, FIRST_K) x's first columns, normed, float32."""
        n = _block_rows(block, ROTARY, BLOCK_N, HEAD_DIM)  # (BLOCK_N,) output features
        n_ok = n < N
        acc = tl.sum(x_first * w_first.to(tl.float32)[None, :, :], axis=2)  # (ROWS, BLOCK_N)
        acc_up = acc
        if GATED:
            acc_up = tl.sum(x_first * w_up_first.to(tl.float32)[None, :, :], axis=2)
        for start in range(FIRST_K, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            k_ok = k < K
            xf = _normed(_load_x(x_ptr, r, r_ok, k, k_ok, K), norm_w_ptr, inv_rms, k, k_ok, NORM, dtype)
            w, w_up = _load_rows(w_ptr, n, n_ok, N, K, k, GATED)
            acc += tl.sum(xf * w.to(tl.float32)[None, :, :], axis=2)
            if GATED:
                acc_up += tl.sum(xf * w_up.to(tl.float32)[None, :, :], axis=2)

        y = _rounded(acc, dtype)  # (ROWS, BLOCK_N), rounded as the matmul's output
        if GATED:
            up = _rounded(acc_up, dtype)
            activated = _rounded(y * tl.sigmoid(y), dtype)
            y = activated * up
        if ROTARY:
            _rotary_epilogue(y, r, r_ok, n, out_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, slot_ptr, q_rows, kv_rows,
                             slots, dtype, ROWS, BLOCK_N, HEAD_DIM)
        else:
            out_offsets = r[:, None] * N + n[None, :]
            out_mask = r_ok[:, None] & n_ok[None, :]
            if RESIDUAL:
                y = _rounded(y, dtype) + tl.load(residual_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + out_offsets, y.to(dtype).to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _few_row_linear_kernel(
        x_ptr,  # (rows, K)
        w_ptr,  # (N, K), or (2N, K) gate rows then up rows when GATED
        out_ptr,  # (rows, N); with ROTARY the query (rows, q_rows)
        residual_ptr,  # (rows, N) when RESIDUAL
        norm_w_ptr,  # (K,) when NORM
        cos_ptr,  # with ROTARY: (rows, HEAD_DIM) each
        sin_ptr,
        keys_ptr,  # with ROTARY: (rows, kv_rows // HEAD_DIM, slots, HEAD_DIM) each
        values_ptr,
        slot_ptr,  # with ROTARY: (1,) the new token's cache slot
        rows,
        N,
        K,
        eps,
        q_rows,  # with ROTARY: the query's rows of the weight, then kv_rows of key and kv_rows of value
        kv_rows,
        slots,
        NORM: tl.constexpr,
        GATED: tl.constexpr,
        RESIDUAL: tl.constexpr,
        ROTARY: tl.constexpr,  # q/k/v: rotary on query and key, key and value stored into the cache
        HEAD_DIM: tl.constexpr,
        PDL: tl.constexpr,  # launched as a programmatic dependent of the previous kernel
        ROWS: tl.constexpr,  # rows rounded up to a power of two
        PERSISTENT: tl.constexpr,  # fewer programs than blocks, each looping over its share (FIRST_K >= K)
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FIRST_K: tl.constexpr,  # columns read in one load, before waiting for the previous kernel (a power of two)
    ):
        dtype = w_ptr.dtype.element_ty
        if PDL:  # the next kernel may launch now: it only reads what this one writes after its own gdc_wait
            tl.extra.cuda.gdc_launch_dependents()
        program = tl.program_id(0)
        r = tl.arange(0, ROWS)
        r_ok = r < rows

        # The first FIRST_K columns of the weight do not depend on the previous kernel: with PDL
        # they are requested while that kernel's last programs run, and only then does this
        # program wait for it.
        first_cols = tl.arange(0, FIRST_K)
        n = _block_rows(program, ROTARY, BLOCK_N, HEAD_DIM)
        w_first, w_up_first = _load_rows(w_ptr, n, n < N, N, K, first_cols, GATED)  # (BLOCK_N, FIRST_K) each
        if PDL:
            tl.extra.cuda.gdc_wait()  # everything below may read what the previous kernel wrote
        first_k_ok = first_cols < K
        x_first = _load_x(x_ptr, r, r_ok, first_cols, first_k_ok, K)  # (ROWS, FIRST_K)
        inv_rms = tl.zeros((ROWS,), tl.float32)
        if NORM:  # the statistics from the first read of x, and (rows longer than FIRST_K) one more pass
            x_float = x_first.to(tl.float32)
            square_sum = tl.sum(x_float * x_float, axis=1)  # (ROWS,)
            for start in range(FIRST_K, K, BLOCK_K):
                k = start + tl.arange(0, BLOCK_K)
                x_chunk = _load_x(x_ptr, r, r_ok, k, k < K, K).to(tl.float32)
                square_sum += tl.sum(x_chunk * x_chunk, axis=1)
            inv_rms = tl.rsqrt((square_sum / K + eps).to(tl.float32))  # the cast: compile passes floats as float64
        x_first = _normed(x_first, norm_w_ptr, inv_rms, first_cols, first_k_ok, NORM, dtype)  # (ROWS, 1, FIRST_K)

        if PERSISTENT:
            # A program per few SMs' worth of blocks, each taking every num_programs-th block: the
            # next block's weights are requested before this one's products, and x is read and
            # normed once per program (rows no longer than FIRST_K only).
            blocks = tl.cdiv(N, BLOCK_N)
            step = tl.num_programs(0)
            for block in range(program, blocks, step):
                following = block + step
                n_next = _block_rows(following, ROTARY, BLOCK_N, HEAD_DIM)
                next_ok = (n_next < N) & (tl.full((BLOCK_N,), following, tl.int32) < blocks)
                w_next, w_up_next = _load_rows(w_ptr, n_next, next_ok, N, K, first_cols, GATED)
                _block_output(block, w_first, w_up_first, x_first, x_ptr, w_ptr, out_ptr, residual_ptr, norm_w_ptr,
                              inv_rms, cos_ptr, sin_ptr, keys_ptr, values_ptr, slot_ptr, r, r_ok, N, K, q_rows, kv_rows,
                              slots, dtype, GATED, NORM, RESIDUAL, ROTARY, HEAD_DIM, ROWS, BLOCK_N, BLOCK_K, FIRST_K)
                w_first, w_up_first = w_next, w_up_next
        else:
            _block_output(program, w_first, w_up_first, x_first, x_ptr, w_ptr, out_ptr, residual_ptr, norm_w_ptr,
                          inv_rms, cos_ptr, sin_ptr, keys_ptr, values_ptr, slot_ptr, r, r_ok, N, K, q_rows, kv_rows,
                          slots, dtype, GATED, NORM, RESIDUAL, ROTARY, HEAD_DIM, ROWS, BLOCK_N, BLOCK_K, FIRST_K)

    def launch(x, weight, out, *, norm_weight=None, eps=0.0, residual=None, gated=False, rotary=None, config=None,
               pdl=None):
        """out (rows, N) from x (rows, K) and weight ((2 if gated else 1) * N, K); also runs in
        Triton's interpreter (the CPU tests). `rotary`: (cos, sin, keys, values, slot) for q/k/v
        (`norm_qkv_rotary`): out is then the query alone, key and value go into the cache. `pdl`:
        programmatic dependent launch, by default where the device has it (kernels.programmatic_launch)."""
        rows, in_features = x.shape[0], weight.shape[1]
        out_features = weight.shape[0] // 2 if gated else weight.shape[0]
        block_n, block_k, warps, stages, first_k, programs_per_sm = GemvConfig(
            *(config or _config(out_features, in_features, gated)))
        first_k = min(first_k or block_k, triton.next_power_of_2(in_features))
        blocks = triton.cdiv(out_features, block_n)
        programs = blocks
        if programs_per_sm and first_k >= in_features:  # the persistent loop reads whole rows only
            programs = min(blocks, programs_per_sm * multiprocessors(x.device))
        pdl = programmatic_launch(x) if pdl is None else pdl
        cos, sin, keys, values, slot = rotary if rotary is not None else (x,) * 5
        _, kv_heads, slots, head_dim = keys.shape if rotary is not None else (0, 0, 0, 2)
        if rotary is not None and block_n < 2:
            raise ValueError("the rotary epilogue pairs rows: block_n must be at least 2")
        _few_row_linear_kernel[(programs,)](
            x, weight, out, residual if residual is not None else out, norm_weight if norm_weight is not None else x,
            cos, sin, keys, values, slot,
            rows, out_features, in_features, eps, out_features - 2 * kv_heads * head_dim, kv_heads * head_dim, slots,
            NORM=norm_weight is not None, GATED=gated, RESIDUAL=residual is not None, ROTARY=rotary is not None,
            HEAD_DIM=head_dim, PDL=pdl, ROWS=triton.next_power_of_2(rows), PERSISTENT=programs < blocks,
            BLOCK_N=block_n, BLOCK_K=block_k,
            FIRST_K=first_k, num_warps=warps, num_stages=stages, launch_pdl=pdl,
        )  # fmt: skip
        return out

    # Opaque operators (not triton_op): the compiled step calls them, and they launch through
    # Triton's own launcher, which keeps the programmatic-launch attribute (inductor's inlined
    # launch of a user kernel drops it). Captured into the CUDA graph like any kernel.
    @torch.library.custom_op("herd::norm_linear", mutates_args=())
    def _norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                     out_dtype: torch.dtype) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)
        return launch(x, weight, out, norm_weight=norm_weight, eps=eps)

    @_norm_linear.register_fake
    def _(x, norm_weight, eps, weight, out_dtype):
        return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)

    @torch.library.custom_op("herd::norm_qkv_rotary", mutates_args=("keys", "values"))
    def _norm_qkv_rotary(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         slot: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((x.shape[0], _query_rows(weight, keys)))
        return launch(x, weight, out, norm_weight=norm_weight, eps=eps,
                      rotary=(cos.contiguous(), sin.contiguous(), keys, values, slot))

    @_norm_qkv_rotary.register_fake
    def _(x, norm_weight, eps, weight, cos, sin, keys, values, slot):
        return x.new_empty((x.shape[0], _query_rows(weight, keys)))

    def _query_rows(weight, keys):
        return weight.shape[0] - 2 * keys.shape[1] * keys.shape[3]

    @torch.library.custom_op("herd::norm_swiglu", mutates_args=())
    def _norm_swiglu(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((x.shape[0], weight.shape[0] // 2))
        return launch(x, weight, out, norm_weight=norm_weight, eps=eps, gated=True)

    @_norm_swiglu.register_fake
    def _(x, norm_weight, eps, weight):
        return x.new_empty((x.shape[0], weight.shape[0] // 2))

    @torch.library.custom_op("herd::linear_add", mutates_args=())
    def _linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x, residual = x.contiguous(), residual.contiguous()
        return launch(x, weight, torch.empty_like(residual), residual=residual)

    @_linear_add.register_fake
    def _(x, weight, residual):
        return torch.empty_like(residual)

    @torch.library.custom_op("herd::linear", mutates_args=())
    def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        return launch(x, weight, x.new_empty((x.shape[0], weight.shape[0])))

    @_linear.register_fake
    def _(x, weight):
        return x.new_empty((x.shape[0], weight.shape[0]))
