"""A long prompt's elementwise steps around the matmuls, each one Triton kernel over many rows.

A prefill of 16k tokens (Llama-3.1-8B on an H200) spends about 15% of its time in unfused torch
elementwise ops between its matmuls: each reads and writes whole activations, several times a
layer. Here each group of them is one pass over memory:

- `add_rms_norm`: the residual add and the RMSNorm after it (`summed`, `rms_norm(summed)`);
- `rotary`: rotary embeddings on query and key straight from the projection's output, read
  through its strides (no copy of the q/k/v split);
- `silu_mul`: SwiGLU's silu(gate) * up;
- `merge_attention_parts`: two attentions of the same queries over disjoint keys, merged by
  their log-sum-exps, written in the (batch, q, heads, dim) layout the o projection reads.

Rounding rule: each kernel computes in float32 and rounds to the activation dtype exactly where
the torch code it replaces rounds (after each elementwise op: the add, every product, silu, the
cast after the norm), so float16 and bfloat16 results equal torch's bit for bit where the
arithmetic is the same. What can differ: the norm's mean of squares (summation order) and the
transcendental functions (exp, rsqrt). On the GPU the kernels call libdevice's exp and rsqrt
(the CUDA math library's expf and rsqrtf, which torch's CUDA kernels are compiled with; Triton's
own tl.exp is the approximate ex2 instruction), divide with IEEE rounding (`div_rn`: Triton's `/`
is an approximate division) and compile without fusing a product and a sum into one FMA (torch
rounds the product first). In Triton's interpreter (the CPU tests) exp is NumPy's, a few float32
units in the last place from torch's CPU exp: a 16-bit result may move by one unit.

Each public function runs its kernel for CUDA tensors when Triton is installed and the dtypes
and shapes are ones it handles (also for CPU tensors under Triton's interpreter, float32 and
float16 only: the tests), and otherwise the torch arithmetic it replaces (`torch_*`).
"""

from __future__ import annotations

import struct

import torch

from . import interpreted

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU builds of torch ship without Triton: the torch arithmetic runs instead
    triton = None

# CPU tensors go through the kernels under Triton's interpreter only where a test asks for it
# (tests/kernels/test_prefill.py): a prompt's every row through the interpreter takes seconds, and the
# other CPU tests (the server's, generate()'s) prefill through the prompt pass with the torch arithmetic
INTERPRET_ON_CPU = False
MAX_NORM_WIDTH = 16384  # a row is held whole in registers (one masked block of the next power of two)
SILU_BLOCK = 1024  # elements of a row per program
ROTARY_ELEMENTS = 2048  # up to this many elements (heads * head_dim) per rotary program
MERGE_ELEMENTS = 2048  # and per merge program


def _kernel_runs(*tensors: torch.Tensor | None) -> bool:
    """Whether the Triton kernel may take these tensors: Triton installed, all on one CUDA device
    (or on the CPU under the interpreter, which has no bfloat16 arithmetic), in a dtype it handles,
    no gradient to record (the kernels have no backward: torch's ops record theirs)."""
    present = [t for t in tensors if t is not None]
    first = present[0]
    if triton is None or any(t.device != first.device for t in present):
        return False
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in present):
        return False  # a subclass (an AsyncCollectiveTensor's data may not be there yet): torch's ops
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    if first.is_cuda:
        dtypes = (torch.float32, torch.float16, torch.bfloat16)
    elif first.device.type == "cpu" and interpreted() and INTERPRET_ON_CPU:
        dtypes = (torch.float32, torch.float16)
    else:
        return False
    return all(t.dtype in dtypes for t in present)


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """x (..., width) as a (rows, width) view with unit column stride, or None where no view has them."""
    try:
        rows = x.view(-1, x.shape[-1])
    except RuntimeError:
        return None
    return rows if rows.shape[1] == 1 or rows.stride(1) == 1 else None


def _warps(elements: int) -> int:
    """Warps for a program over this many elements: 8 to 16 elements (16-32 bytes) per thread."""
    return max(1, min(16, elements // 256))


# --- residual add + RMSNorm ----------------------------------------------------------------------


def torch_add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(summed, normed): summed = hidden + delta (hidden itself without delta), normed =
    `layers.norm.rms_norm(summed, weight, eps)`: in float32, rounded to summed's dtype, times weight."""
    summed = hidden if delta is None else hidden + delta
    summed32 = summed.float()
    normed = summed32 * torch.rsqrt(summed32.pow(2).mean(-1, keepdim=True) + eps)
    return summed, weight * normed.to(summed.dtype)


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(summed, normed) of `torch_add_rms_norm`: hidden and delta (..., H) of one dtype (delta may be
    None: summed is then hidden itself), weight (H,). The kernel runs where weight has hidden's
    dtype (otherwise torch promotes the product: the torch code runs) and H <= MAX_NORM_WIDTH."""
    width = hidden.shape[-1]
    rows = _rows(hidden)
    delta_rows = _rows(delta) if delta is not None else None
    if not (
        _kernel_runs(hidden, delta, weight)
        and rows is not None
        and hidden.numel() > 0
        and 0 < width <= MAX_NORM_WIDTH
        and (delta is None or (delta_rows is not None and delta.shape == hidden.shape and delta.dtype == hidden.dtype))
        and weight.dtype == hidden.dtype
        and weight.shape == (width,)
        and (width == 1 or weight.stride(0) == 1)
    ):
        return torch_add_rms_norm(hidden, delta, weight, eps)
    normed = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    summed = hidden if delta is None else torch.empty_like(normed)
    block = triton.next_power_of_2(width)
    _add_rms_norm_kernel[(rows.shape[0],)](
        rows, delta_rows if delta is not None else rows, weight, summed, normed,
        width, rows.stride(0), delta_rows.stride(0) if delta is not None else 0,
        _float32(1.0 / width), _float32(eps),
        HAS_DELTA=delta is not None, PRECISE=hidden.is_cuda, BLOCK=block,
        num_warps=_warps(block), enable_fp_fusion=False,
    )  # fmt: skip
    return summed, normed


def _float32(value: float) -> float:
    """value rounded to float32, as torch rounds a Python scalar added to a float32 tensor (the
    kernel's scalar argument may be widened: a float32 value stays exact)."""
    return struct.unpack("f", struct.pack("f", value))[0]


# --- rotary --------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def torch_rotary(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """`layers.rope.apply_rotary(query.transpose(1, 2), key.transpose(1, 2), cos, sin)`: query/key
    (batch, seq, heads, head_dim), cos/sin (batch or 1, seq, head_dim); results (batch, heads, seq,
    head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin


def rotary(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(query_out, key_out) of `torch_rotary`, equal bit for bit: x * cos + rotate_half(x) * sin,
    each product rounded to the dtype, then the sum. query (batch, seq, q_heads, head_dim) and key
    (batch, seq, kv_heads, head_dim) may be strided views (a fused q/k/v output split) with unit
    stride along head_dim. The results are (batch, heads, seq, head_dim) laid out (batch, seq,
    heads, head_dim) contiguous, the layout torch's elementwise ops give for that input. The kernel
    runs for head_dim a power of two of at least 16, cos/sin in query's dtype."""
    if query.dim() != 4:
        return torch_rotary(query, key, cos, sin)
    batch, seq, q_heads, head_dim = query.shape
    if not (
        _kernel_runs(query, key, cos, sin)
        and query.numel() > 0
        and key.dim() == 4 and key.shape[:2] == (batch, seq) and key.shape[3] == head_dim
        and key.dtype == cos.dtype == sin.dtype == query.dtype
        and head_dim >= 16 and head_dim & (head_dim - 1) == 0
        and all(t.dim() == 3 and t.shape[0] in (1, batch) and t.shape[1:] == (seq, head_dim) for t in (cos, sin))
        and all(t.stride(-1) == 1 for t in (query, key, cos, sin))
    ):
        return torch_rotary(query, key, cos, sin)
    kv_heads = key.shape[2]
    query_out = torch.empty((batch, seq, q_heads, head_dim), dtype=query.dtype, device=query.device)
    key_out = torch.empty((batch, seq, kv_heads, head_dim), dtype=query.dtype, device=query.device)
    # Heads per program: no more than the key has (its block is then whole), within ROTARY_ELEMENTS
    block_h = min(triton.next_power_of_2(min(q_heads, kv_heads)), max(1, ROTARY_ELEMENTS // head_dim))
    q_blocks, k_blocks = triton.cdiv(q_heads, block_h), triton.cdiv(kv_heads, block_h)

    def batch_stride(t):  # broadcast cos/sin over the batch
        return t.stride(0) if t.shape[0] > 1 else 0

    _rotary_kernel[(batch * seq, q_blocks + k_blocks)](
        query, key, cos, sin, query_out, key_out, seq, q_heads, kv_heads, q_blocks,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        batch_stride(cos), cos.stride(1), batch_stride(sin), sin.stride(1),
        BLOCK_H=block_h, HALF=head_dim // 2, num_warps=_warps(block_h * head_dim // 2),  # sized by a half's load
        enable_fp_fusion=False,
    )  # fmt: skip
    return query_out.transpose(1, 2), key_out.transpose(1, 2)


# --- SwiGLU ----------------------------------------------------------------------------------------


def torch_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, silu rounded to the dtype before the product (two torch ops)."""
    return torch.nn.functional.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`torch_silu_mul(gate, up)`, a contiguous tensor of gate's shape. gate and up (..., width) of
    one shape and dtype, each viewable as rows with unit column stride (contiguous, or the two
    halves of a fused gate/up output)."""
    gate_rows, up_rows = _rows(gate), _rows(up)
    if not (
        _kernel_runs(gate, up)
        and gate.shape == up.shape and gate.dtype == up.dtype
        and gate.numel() > 0
        and gate_rows is not None and up_rows is not None
    ):
        return torch_silu_mul(gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    rows, width = gate_rows.shape
    block = min(SILU_BLOCK, triton.next_power_of_2(width))
    _silu_mul_kernel[(rows, triton.cdiv(width, block))](
        gate_rows, up_rows, out, width, gate_rows.stride(0), up_rows.stride(0),
        PRECISE=gate.is_cuda, BLOCK=block, num_warps=_warps(block), enable_fp_fusion=False,
    )  # fmt: skip
    return out


# --- merging two attentions by their log-sum-exps ------------------------------------------------


def torch_merge_attention_parts(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                                lse_b: torch.Tensor) -> torch.Tensor:
    """(batch, q, heads, dim) contiguous: the float32 merge of `layers.attention.after_cache_in_two_parts`
    (out_* (batch, heads, q, dim), lse_* (batch, heads, q) natural-log log-sum-exps), cast to out_a's
    dtype, transposed."""
    lse_a, lse_b = (lse.float().reshape(*out_a.shape[:3], 1) for lse in (lse_a, lse_b))
    top = torch.maximum(lse_a, lse_b)
    weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)  # (batch, heads, q, 1)
    merged = (weight_a * out_a.float() + weight_b * out_b.float()) / (weight_a + weight_b)
    return merged.to(out_a.dtype).transpose(1, 2).contiguous()


def merge_attention_parts(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                          lse_b: torch.Tensor) -> torch.Tensor:
    """Two attentions of the same queries over disjoint key sets as one: out_* (batch, heads, q,
    dim) of one dtype, any strides (cuDNN's are laid out (batch, q, heads, dim)); lse_* (batch,
    heads, q) float32, any strides (or (batch, heads, q, 1)). Returns `torch_merge_attention_parts`'s
    (batch, q, heads, dim) contiguous tensor (what the o projection reads, no transpose copy after)."""
    lse_a, lse_b = (lse[..., 0] if lse.dim() == 4 and lse.shape[-1] == 1 else lse for lse in (lse_a, lse_b))
    if not (
        _kernel_runs(out_a, out_b)
        and out_a.dim() == 4 and out_a.shape == out_b.shape and out_a.dtype == out_b.dtype
        and out_a.numel() > 0
        and lse_a.dtype == lse_b.dtype == torch.float32
        and lse_a.shape == lse_b.shape == out_a.shape[:3]
        and lse_a.device == lse_b.device == out_a.device
    ):
        return torch_merge_attention_parts(out_a, lse_a, out_b, lse_b)
    batch, heads, queries, dim = out_a.shape
    merged = torch.empty((batch, queries, heads, dim), dtype=out_a.dtype, device=out_a.device)
    block_d = triton.next_power_of_2(dim)
    block_h = min(triton.next_power_of_2(heads), max(1, MERGE_ELEMENTS // block_d))
    _merge_kernel[(batch * queries, triton.cdiv(heads, block_h))](
        out_a, lse_a, out_b, lse_b, merged, queries, heads, dim,
        out_a.stride(0), out_a.stride(1), out_a.stride(2), out_a.stride(3),
        out_b.stride(0), out_b.stride(1), out_b.stride(2), out_b.stride(3),
        lse_a.stride(0), lse_a.stride(1), lse_a.stride(2), lse_b.stride(0), lse_b.stride(1), lse_b.stride(2),
        PRECISE=out_a.is_cuda, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=_warps(block_h * block_d),
        enable_fp_fusion=False,
    )  # fmt: skip
    return merged


if triton is not None:

    @triton.jit
    def _exp(x, PRECISE: tl.constexpr):
        """exp in float32: libdevice's on the GPU (the module docstring says why), NumPy's in the
        interpreter (it has no libdevice)."""
        if PRECISE:
            return libdevice.exp(x)
        else:
            return tl.exp(x)

    @triton.jit
    def _round(x, dtype: tl.constexpr):
        """x (float32) rounded to dtype, as a torch op's result, and widened again for the next op."""
        return x.to(dtype).to(tl.float32)

    @triton.jit
    def _add_rms_norm_kernel(hidden_ptr, delta_ptr, weight_ptr, summed_ptr, normed_ptr, width, hidden_stride,
                             delta_stride, inv_width, eps, HAS_DELTA: tl.constexpr, PRECISE: tl.constexpr,
                             BLOCK: tl.constexpr):
        """One row per program (summed and normed contiguous)."""
        row = tl.program_id(0).to(tl.int64)  # rows * width passes 2**31 in long prompts
        dtype = normed_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)
        ok = cols < width
        x = tl.load(hidden_ptr + row * hidden_stride + cols, mask=ok, other=0.0)
        if HAS_DELTA:  # the sum rounded to the dtype, as torch's add: the norm reads the rounded value
            delta = tl.load(delta_ptr + row * delta_stride + cols, mask=ok, other=0.0)
            x = (x.to(tl.float32) + delta.to(tl.float32)).to(dtype)
            tl.store(summed_ptr + row * width + cols, x, mask=ok)
        x32 = x.to(tl.float32)
        # mean as torch's CUDA reduction takes it (sum times 1/width); masked columns add zeros
        mean = tl.sum(x32 * x32, axis=0) * inv_width
        if PRECISE:
            inv_rms = libdevice.rsqrt(mean + eps)  # the rsqrtf of torch's CUDA rsqrt
        else:
            inv_rms = tl.math.rsqrt(mean + eps)
        normed = (x32 * inv_rms).to(dtype)
        weight = tl.load(weight_ptr + cols, mask=ok, other=0.0)
        # the weight multiplies after the cast, in the dtype (its product rounded), as rms_norm does
        tl.store(normed_ptr + row * width + cols, (weight.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=ok)

    @triton.jit
    def _rotate_heads(x_ptr, out_ptr, first_head, heads, head_stride, cos_first, cos_second, sin_first, sin_second,
                      BLOCK_H: tl.constexpr, HALF: tl.constexpr):
        """Heads first_head.. of one token: x_ptr at its first head, out_ptr at its contiguous row."""
        dtype = out_ptr.dtype.element_ty
        h = first_head + tl.arange(0, BLOCK_H)
        d = tl.arange(0, HALF)
        ok = (h < heads)[:, None]
        src = x_ptr + h[:, None] * head_stride + d[None, :]
        first = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        second = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
        # rotate_half(x) = (-second, first); every product rounded to the dtype, then the sum
        out_first = _round(first * cos_first[None, :], dtype) + _round(-second * sin_first[None, :], dtype)
        out_second = _round(second * cos_second[None, :], dtype) + _round(first * sin_second[None, :], dtype)
        dst = out_ptr + h[:, None] * (2 * HALF) + d[None, :]
        tl.store(dst, out_first.to(dtype), mask=ok)
        tl.store(dst + HALF, out_second.to(dtype), mask=ok)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, seq, q_heads, k_heads, q_blocks,
                       q_stride_b, q_stride_s, q_stride_h, k_stride_b, k_stride_s, k_stride_h,
                       cos_stride_b, cos_stride_s, sin_stride_b, sin_stride_s,
                       BLOCK_H: tl.constexpr, HALF: tl.constexpr):
        """Program (token, block): query heads of block < q_blocks, key heads of the rest; the token's
        cos/sin are read by each of its programs (from the cache after the first)."""
        token = tl.program_id(0).to(tl.int64)  # batch * seq + position
        block = tl.program_id(1)
        b = token // seq
        s = token % seq
        d = tl.arange(0, HALF)
        cos_row = cos_ptr + b * cos_stride_b + s * cos_stride_s
        sin_row = sin_ptr + b * sin_stride_b + s * sin_stride_s
        cos_first = tl.load(cos_row + d).to(tl.float32)
        cos_second = tl.load(cos_row + HALF + d).to(tl.float32)
        sin_first = tl.load(sin_row + d).to(tl.float32)
        sin_second = tl.load(sin_row + HALF + d).to(tl.float32)
        if block < q_blocks:
            _rotate_heads(q_ptr + b * q_stride_b + s * q_stride_s, q_out_ptr + token * q_heads * (2 * HALF),
                          block * BLOCK_H, q_heads, q_stride_h, cos_first, cos_second, sin_first, sin_second,
                          BLOCK_H, HALF)
        else:
            _rotate_heads(k_ptr + b * k_stride_b + s * k_stride_s, k_out_ptr + token * k_heads * (2 * HALF),
                          (block - q_blocks) * BLOCK_H, k_heads, k_stride_h, cos_first, cos_second, sin_first,
                          sin_second, BLOCK_H, HALF)

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, width, gate_stride, up_stride, PRECISE: tl.constexpr,
                         BLOCK: tl.constexpr):
        """Program (row, block of columns); out contiguous."""
        row = tl.program_id(0).to(tl.int64)
        dtype = out_ptr.dtype.element_ty
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < width
        gate = tl.load(gate_ptr + row * gate_stride + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row * up_stride + cols, mask=ok, other=0.0).to(tl.float32)
        # torch's silu: x / (1 + exp(-x)) in float32 with an IEEE division, rounded before the product
        silu = tl.math.div_rn(gate, 1.0 + _exp(-gate, PRECISE)).to(dtype)
        tl.store(out_ptr + row * width + cols, (silu.to(tl.float32) * up).to(dtype), mask=ok)

    @triton.jit
    def _merge_kernel(a_ptr, lse_a_ptr, b_ptr, lse_b_ptr, out_ptr, queries, heads, dim,
                      a_stride_b, a_stride_h, a_stride_q, a_stride_d, b_stride_b, b_stride_h, b_stride_q, b_stride_d,
                      lse_a_stride_b, lse_a_stride_h, lse_a_stride_q, lse_b_stride_b, lse_b_stride_h, lse_b_stride_q,
                      PRECISE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (batch * queries + query, block of heads); out (batch, queries, heads, dim) contiguous."""
        row = tl.program_id(0).to(tl.int64)
        n = row // queries
        i = row % queries
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        h_ok = h < heads
        ok = h_ok[:, None] & (d < dim)[None, :]
        lse_a = tl.load(lse_a_ptr + n * lse_a_stride_b + h * lse_a_stride_h + i * lse_a_stride_q, mask=h_ok, other=0.0)
        lse_b = tl.load(lse_b_ptr + n * lse_b_stride_b + h * lse_b_stride_h + i * lse_b_stride_q, mask=h_ok, other=0.0)
        top = tl.maximum(lse_a, lse_b, propagate_nan=tl.PropagateNan.ALL)  # a NaN wins, as in torch.maximum
        weight_a = _exp(lse_a - top, PRECISE)[:, None]
        weight_b = _exp(lse_b - top, PRECISE)[:, None]
        a = tl.load(a_ptr + n * a_stride_b + h[:, None] * a_stride_h + i * a_stride_q + d[None, :] * a_stride_d,
                    mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + n * b_stride_b + h[:, None] * b_stride_h + i * b_stride_q + d[None, :] * b_stride_d,
                    mask=ok, other=0.0).to(tl.float32)
        # torch's order: both products rounded, their sum, the weights' sum, an IEEE division
        merged = tl.math.div_rn(weight_a * a + weight_b * b, weight_a + weight_b)
        tl.store(out_ptr + (row * heads + h[:, None]) * dim + d[None, :], merged.to(out_ptr.dtype.element_ty), mask=ok)
