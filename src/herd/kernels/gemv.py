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

Each function runs its kernel for CUDA tensors of one row (`PLAIN_MAX_ROWS`; quantized weights:
up to `MAX_ROWS`) when Triton is installed, there is no bias and the dtypes agree; otherwise it runs the same arithmetic in
torch (`torch_*`), rounded at the same points. The kernels accumulate in float32 and round where
the torch code rounds: after the norm, after its weight, after each matmul, after the activation.

A weight may also be a `QuantizedWeight` (int8 or FP8 rows with a float32 scale per row; int4 in
groups of columns with a scale and an offset per group), which the kernel reads as stored, a
byte or half a byte per weight instead of two, and dequantizes in its loop (`dequantize` is the
arithmetic; the torch fallback multiplies by its result).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from ..cache import fp8_quantize
from . import fp8_matmul, multiprocessors, programmatic_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton: the torch arithmetic runs instead
    triton = None

MAX_ROWS = 4  # beyond a few rows the weight tile is reused enough for the library matmul to win
# Weights in x's dtype: one row only. The configurations were measured at one row; at 2 and 4 rows
# the captured 8B step took 5.90 and 8.54 ms where the library matmul's 8-row step took 5.07
# (bench/RESULTS.md, 2026-11-30 third session; likely cause, not profiled: a row's whole x sits in
# registers, times the rows).
# Quantized weights keep the kernel up to MAX_ROWS: the library matmul would need them dequantized.
PLAIN_MAX_ROWS = 1
# int8 and int4 weights with 16-bit x: multiplied as floats in [1, 2) (`_tile_product`), fewer
# instructions a weight than the exact conversion; False for the exact conversion (bench labs)
FRACTION_PRODUCTS = True


class QuantizedWeight(NamedTuple):
    """A weight (out, in) in fewer bits; what it means is `dequantize`.

    - row-scaled (data int8 or float8_e4m3fn (out, in), scale float32 (out,)): w[n, k] = data[n, k] * scale[n];
    - int4 in groups of G = in // scale.shape[1] columns (data uint8 (out, in // 2), column 2j in the
      low nibble of byte j and 2j + 1 in the high one; scale and offset (out, in // G) in x's dtype):
      w[n, k] = nibble[n, k] * scale[n, k // G] + offset[n, k // G], nibbles unsigned (0..15).

    Projections stacked along the rows (q/k/v; gate then up) stack data, scale and offset alike."""

    data: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None = None
    # int4 on CUDA: the same weight in torch's tinygemm layout (`int4_tiles`), which its library
    # matmul reads faster than this module's kernel does (bench/quantized_gemv.py): used instead.
    tiles: torch.Tensor | None = None
    scales_and_zeros: torch.Tensor | None = None
    # FP8: the model rounds activations to FP8 per row (FBGEMM's rule, bounded by the ub) where a
    # library FP8 matmul takes more rows than the kernel; the kernel itself is weight-only.
    fp8_activations: bool = False
    activation_scale_ub: float | None = None
    # Tensor parallel, a weight split by its input features: each rank holds a slice of every
    # activation row, so the rows' amax is reduced (MAX) across the ranks before scaling, giving the
    # one-process scale (set from the linear's `reduce_activation_amax`).
    reduce_activation_amax: Callable[[torch.Tensor], torch.Tensor] | None = None


TINYGEMM_INNER_K_TILES = 8
# tinygemm is made for a few rows: at 64 it took 32.7 ms for an 8B step where dequantizing each weight
# for the library matmul costs a few (H200, 11-30, bench/quantized.py)
TINYGEMM_ROWS = 16
# int4 on CUDA through tinygemm (`int4_tiles`); False: the few-row kernel reads herd's own layout
INT4_TINYGEMM = True


def int4_tiles(data: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
    """(tiles, scales_and_zeros) of an int4 weight for `torch._weight_int4pack_mm` (CUDA, bf16), or
    (None, None) where its shape rules (rows a multiple of 8, columns of 128) leave it out.
    tinygemm computes (q - 8) * scale + zero, so zero = offset + 8 * scale; its packing takes the
    even column in the high nibble."""
    out_features, half = data.shape
    if not INT4_TINYGEMM or not data.is_cuda or out_features % 8 or (2 * half) % (16 * TINYGEMM_INNER_K_TILES):
        return None, None
    swapped = (data << 4) | (data >> 4)  # herd keeps the even column low
    tiles = torch._convert_weight_to_int4pack(swapped.contiguous(), TINYGEMM_INNER_K_TILES)
    zero = offset.float() + 8.0 * scale.float()
    scales_and_zeros = torch.stack([scale.float().t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return tiles, scales_and_zeros


# How the kernel reads a weight (its QUANT): in x's dtype, int8/FP8 with a scale per row, int4 in groups
PLAIN, ROW_SCALED, INT4 = 0, 1, 2


def _format(weight: torch.Tensor | QuantizedWeight) -> int:
    """How the kernel reads the weight: PLAIN, ROW_SCALED or INT4."""
    if not isinstance(weight, QuantizedWeight):
        return PLAIN
    return INT4 if weight.data.dtype == torch.uint8 else ROW_SCALED


def dequantize(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in dtype: computed in float32 (or dtype if wider), rounded once to dtype."""
    data, scale, offset = weight[:3]
    compute = torch.promote_types(dtype, torch.float32)
    if _format(weight) == INT4:
        out_features, half = data.shape
        nibbles = torch.stack((data & 0xF, data >> 4), dim=-1).reshape(out_features, 2 * half)  # low nibble first
        group = 2 * half // scale.shape[1]
        scale = scale.to(compute).repeat_interleave(group, dim=1)
        offset = offset.to(compute).repeat_interleave(group, dim=1)
        return (nibbles.to(compute) * scale + offset).to(dtype)
    return (data.to(compute) * scale.to(compute)[:, None]).to(dtype)


def fp8_activation_rows(x: torch.Tensor, scale_ub: float | None,
                        reduce_amax: Callable[[torch.Tensor], torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, in) -> float8_e4m3fn (rows, in), float32 scale (rows, 1): FBGEMM's per-row rule, each
    row's amax (at most scale_ub) maps to 448, the largest e4m3 value. `reduce_amax`: where x holds
    only some columns of each row (tensor parallel), the amax (rows, 1) of the whole rows from the
    local one."""
    amax = x.float().abs().amax(dim=-1, keepdim=True)  # (rows, 1)
    if reduce_amax is not None:
        amax = reduce_amax(amax)
    if scale_ub is not None:
        amax = amax.clamp(max=scale_ub)
    scale = (amax / 448.0).clamp(min=1.0 / (448.0 * 512.0))
    return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def torch_linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (rows, in) @ weight.T (+ bias) in torch, where the kernel does not run: a plain weight
    through the library matmul; int4 through torch's tinygemm where the weight carries its tiles;
    FP8 through `_scaled_mm` with FP8 activations where the model rounds them and the GPU has FP8;
    otherwise the weight dequantized to x's dtype."""
    if isinstance(weight, QuantizedWeight):
        if weight.tiles is not None and x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] <= TINYGEMM_ROWS:
            group = 2 * weight.data.shape[1] // weight.scale.shape[1]
            out = torch._weight_int4pack_mm(x.contiguous(), weight.tiles, group, weight.scales_and_zeros)
            return out if bias is None else out + bias
        if weight.fp8_activations and x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9) \
                and x.shape[1] % 16 == 0 and weight.data.shape[0] % 16 == 0:
            x_q, x_scale = fp8_activation_rows(x, weight.activation_scale_ub, weight.reduce_activation_amax)
            if fp8_matmul.kernel_applies(x_q, weight.data):  # 5-64 rows: the tiles of _scaled_mm idle most SMs
                product = fp8_matmul.fp8_rows_partials(x_q, weight.data).sum(0)  # (rows, out) float32
                out = (product * x_scale * weight.scale[None, :]).to(x.dtype)
            else:
                out = torch._scaled_mm(x_q, weight.data.t(), scale_a=x_scale, scale_b=weight.scale[None, :],
                                       out_dtype=x.dtype)
            return out if bias is None else out + bias
    return nn.functional.linear(x, _dense(weight, x.dtype), bias)


def _dense(weight: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """What the torch arithmetic multiplies by: the weight, dequantized to dtype if it is quantized."""
    return dequantize(weight, dtype) if isinstance(weight, QuantizedWeight) else weight


def _op_weight(weight: torch.Tensor | QuantizedWeight) -> tuple:
    """The ops' weight arguments: data, scale, offset (scale and offset None for a plain weight)."""
    return tuple(weight[:3]) if isinstance(weight, QuantizedWeight) else (weight, None, None)


def _readable(x: torch.Tensor, tensor: torch.Tensor | QuantizedWeight | None) -> bool:
    """A tensor in x's dtype, or a QuantizedWeight the kernel reads: int8/FP8 with float32 row
    scales, or int4 with scale and offset (of one float dtype), in groups of a power of two columns."""
    if tensor is None:
        return True
    if not isinstance(tensor, QuantizedWeight):
        return tensor.dtype == x.dtype
    data, scale, offset = tensor[:3]
    if _format(tensor) == INT4:
        if tensor.tiles is not None and x.dtype == torch.bfloat16:
            return False  # tinygemm reads it faster (torch_linear)
        in_features, groups = 2 * data.shape[1], scale.shape[-1]
        group = in_features // max(groups, 1)
        powers_of_two = groups * group == in_features and group >= 2 and group & (group - 1) == 0
        # scales and offsets are read as float32: any float dtype (GGUF's float16 ones in a bf16 model)
        return scale.is_floating_point() and offset is not None and offset.dtype == scale.dtype and powers_of_two
    return data.dtype in (torch.int8, torch.float8_e4m3fn) and scale.dtype == torch.float32 and offset is None


def kernel_applies(x: torch.Tensor, *tensors: torch.Tensor | QuantizedWeight | None,
                   bias: torch.Tensor | None = None) -> bool:
    """The kernel handles x (rows, hidden) on CUDA with weights (and norm weights) of x's dtype
    (one row: PLAIN_MAX_ROWS) or quantized (`_readable`; up to MAX_ROWS rows), and no bias."""
    quantized = any(isinstance(tensor, QuantizedWeight) for tensor in tensors)
    return (
        triton is not None
        and x.is_cuda
        and x.dim() == 2
        and x.shape[0] <= (MAX_ROWS if quantized else PLAIN_MAX_ROWS)
        and bias is None
        and all(_readable(x, tensor) for tensor in tensors)
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


def torch_norm_qkv_rotary(x, norm_weight, eps, weight, bias, cos, sin, keys, values, slot, key_scales=None,
                          value_scales=None, normed=None):
    rows, head_dim, kv_heads = x.shape[0], keys.shape[-1], keys.shape[1]
    qkv = torch_linear(torch_rms_norm(x, norm_weight, eps) if normed is None else normed, weight, bias)  # (rows, (heads + 2 kv_heads) * head_dim)
    # -> query (rows, heads, head_dim), key/value (rows, kv_heads, head_dim)
    query, key, value = qkv.view(rows, -1, head_dim).split([qkv.shape[1] // head_dim - 2 * kv_heads, kv_heads, kv_heads], 1)
    cos, sin = cos.view(rows, 1, head_dim), sin.view(rows, 1, head_dim)
    query, key = torch_rotate(query, cos, sin), torch_rotate(key, cos, sin)
    store_key_value(keys, values, slot, key, value, key_scales, value_scales)
    return query.reshape(rows, -1)


def store_key_value(keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, key_scales: torch.Tensor | None = None,
                    value_scales: torch.Tensor | None = None) -> None:
    """key/value (rows, kv_heads, head_dim) into the caches: at slot (1,) of every row of
    (rows, kv_heads, slots, head_dim) caches, or at slot (rows,), one flat slot per row, of a paged
    pool (1, kv_heads, slots, head_dim) (decoding/kv.PagedKV). (At one row both are the same write.)

    An FP8 cache (float8_e4m3fn, with key_scales/value_scales (rows, kv_heads, slots) float32, a
    pool's (1, kv_heads, slots)) gets them quantized by the plain FP8 cache's rule
    (cache.fp8_quantize: a scale per head of the token). Its bytes are written through a uint8
    view of the whole cache (float8 has no index_put on some torch versions)."""
    paged = keys.shape[0] != key.shape[0]
    if key_scales is not None:
        # quantized here (the compiled step fuses it); written by an opaque op (`_store_fp8_slots`)
        for stored, scales, states in ((keys, key_scales, key), (values, value_scales, value)):
            quantized, scale = fp8_quantize(states)  # (rows, kv_heads, head_dim), (rows, kv_heads, 1)
            torch.ops.herd.store_fp8_slots(stored, scales, slot, quantized, scale)
        return
    if not paged:
        keys[:, :, slot] = key[:, :, None].to(keys.dtype)
        values[:, :, slot] = value[:, :, None].to(values.dtype)
    else:  # (1, kv_heads, slots, head_dim) pool, written at each row's slot
        # on the pool itself, not a view of it: compiled, an index_copy_ into `keys[0]` becomes a
        # copy of the whole pool (every layer, every step)
        keys.index_copy_(2, slot, key.transpose(0, 1)[None].to(keys.dtype))
        values.index_copy_(2, slot, value.transpose(0, 1)[None].to(values.dtype))


@torch.library.custom_op("herd::store_fp8_slots", mutates_args=("stored", "scales"))
def _store_fp8_slots(stored: torch.Tensor, scales: torch.Tensor, slot: torch.Tensor, quantized: torch.Tensor,
                     scale: torch.Tensor) -> None:
    """quantized (rows, kv_heads, head_dim) e4m3 and scale (rows, kv_heads, 1) (cache.fp8_quantize's)
    into an FP8 cache and its scales (`store_key_value`): a cache (rows, kv_heads, slots, head_dim)
    with scales (rows, kv_heads, slots) at slot (1,), or a paged pool (1, ...) at one flat slot
    (rows,) per row.

    An operator the compiler does not look into, as the bf16 caches' rotary kernel is: traced, the
    pool's index_copy_ through a uint8 view (float8 has no index_copy) became a copy of the whole
    pool every layer and step on the GPU (120 ms a step for the 8B at 64 rows, H200,
    bench/serve_engine.py --kv-cache-dtype fp8, 11-30). generate()'s FP8 cache writes through the
    same kind of view, so it takes the operator too. Only the write is opaque: the quantization
    before it stays in the compiled code, fused with what computes the keys and values."""
    if stored.shape[0] != quantized.shape[0]:  # a paged pool, one flat slot per row
        stored.view(torch.uint8).index_copy_(2, slot, quantized.view(torch.uint8).transpose(0, 1)[None])
        scales.index_copy_(2, slot, scale[..., 0].transpose(0, 1)[None])
    else:
        stored.view(torch.uint8)[:, :, slot] = quantized.view(torch.uint8)[:, :, None]
        scales[:, :, slot] = scale


@_store_fp8_slots.register_fake
def _(stored, scales, slot, quantized, scale):
    return None


# --- public functions: kernel where it applies, torch otherwise ----------------------------------


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor | QuantizedWeight,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                normed: torch.Tensor | None = None) -> torch.Tensor:
    """x (rows, in) -> weight @ rms_norm(x) (rows, out), in out_dtype (x's unless given: the head
    asks for float32). `normed`: rms_norm(x) when already computed (by the sum that made x:
    decoding/plans/llama.project_add_norm), then the library matmul."""
    if normed is None and kernel_applies(x, norm_weight, weight, bias=bias):
        data, scale, offset = _op_weight(weight)
        return torch.ops.herd.norm_linear(x, norm_weight, eps, data, out_dtype or x.dtype, scale, offset)
    out = torch_linear(torch_rms_norm(x, norm_weight, eps) if normed is None else normed, weight, bias)
    return out if out_dtype is None else out.to(out_dtype)


def norm_qkv_rotary(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor | QuantizedWeight,
                    bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                    values: torch.Tensor, slot: torch.Tensor, key_scales: torch.Tensor | None = None,
                    value_scales: torch.Tensor | None = None, normed: torch.Tensor | None = None) -> torch.Tensor:
    """The attention input of one new token per row: x (rows, hidden) -> query (rows, heads * head_dim),
    rotated; the rotated key and the value go into keys/values (rows, kv_heads, slots, head_dim) at
    slot (1,), or into a paged pool (1, kv_heads, slots, head_dim) at slot (rows,) (`store_key_value`). weight: q, k and v stacked ((heads + 2 kv_heads) * head_dim, hidden). cos/sin
    (rows, head_dim): Llama's rotary tables (dimension d turns with d + head_dim/2).

    An FP8 cache (key_scales/value_scales given, `store_key_value`): the kernel writes the rotated
    key and the value into a one-slot staging cache in x's dtype, and the quantization into the
    cache follows as torch arithmetic (which the compiled step fuses into one small kernel): a
    token's scale is the largest |value| of a whole head, which one kernel program does not hold
    (its block of rows covers part of a head)."""
    fp8 = key_scales is not None
    if (
        normed is None
        and kernel_applies(x, norm_weight, weight, cos, sin, *((keys, values) if not fp8 else ()), bias=bias)
        and keys.is_contiguous()
        and values.is_contiguous()
        and keys.shape[-1] % 2 == 0
    ):
        rows, kv_heads, head_dim = x.shape[0], keys.shape[1], keys.shape[-1]
        data, scale, offset = _op_weight(weight)
        kernel_keys, kernel_values, kernel_slot = keys, values, slot
        if fp8:  # (rows, kv_heads, 1 slot, head_dim) each, written at slot 0
            kernel_keys = x.new_empty((rows, kv_heads, 1, head_dim))
            kernel_values = x.new_empty((rows, kv_heads, 1, head_dim))
            kernel_slot = torch.zeros(1, dtype=torch.long, device=x.device)
        query = torch.ops.herd.norm_qkv_rotary(x, norm_weight, eps, data, cos.reshape(rows, head_dim),
                                               sin.reshape(rows, head_dim), kernel_keys, kernel_values, kernel_slot,
                                               scale, offset)
        if fp8:
            store_key_value(keys, values, slot, kernel_keys[:, :, 0], kernel_values[:, :, 0], key_scales, value_scales)
        return query
    return torch_norm_qkv_rotary(x, norm_weight, eps, weight, bias, cos, sin, keys, values, slot, key_scales,
                                 value_scales, normed)


def norm_gated_activation(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                          gate_up_weight: torch.Tensor | QuantizedWeight, activation,
                          bias: torch.Tensor | None = None, normed: torch.Tensor | None = None) -> torch.Tensor:
    """act(gate(n)) * up(n) with n = rms_norm(x): x (rows, hidden) -> (rows, intermediate);
    gate_up_weight (2 * intermediate, hidden), gate rows first. One kernel for SiLU (every Llama).
    `normed`: n when already computed (as `norm_linear`'s)."""
    if normed is None and activation is nn.functional.silu and kernel_applies(x, norm_weight, gate_up_weight, bias=bias):
        data, scale, offset = _op_weight(gate_up_weight)
        return torch.ops.herd.norm_swiglu(x, norm_weight, eps, data, scale, offset)
    gate_up = torch_linear(torch_rms_norm(x, norm_weight, eps) if normed is None else normed, gate_up_weight, bias)
    gate, up = gate_up.chunk(2, dim=-1)
    return activation(gate) * up


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """weight @ x: x (rows, in) -> (rows, out)."""
    if kernel_applies(x, weight, bias=bias):
        data, scale, offset = _op_weight(weight)
        return torch.ops.herd.linear(x, data, scale, offset)
    return torch_linear(x, weight, bias)


def linear_add(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, residual: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """residual (rows, out) + weight @ x (rows, in)."""
    if kernel_applies(x, weight, residual, bias=bias):
        data, scale, offset = _op_weight(weight)
        return torch.ops.herd.linear_add(x, data, residual, scale, offset)
    return residual + torch_linear(x, weight, bias)


# --- kernels ---------------------------------------------------------------------------------------


class GemvConfig(NamedTuple):
    block_n: int  # rows of the weight per program
    block_k: int  # columns per loop step
    warps: int = 4
    stages: int = 1
    first_k: int | None = None  # columns read in one go before the loop (block_k if None): more bytes in flight
    programs_per_sm: int = 0  # > 0: this many programs per SM loop over the blocks (whole rows in the first read)


def _config(out_features: int, in_features: int, gated: bool, weight_bits: int = 16) -> GemvConfig:
    """The configuration for a weight shape (of weight_bits per weight: 8 or 4 are quantized ones,
    `_quantized_config`), chosen by measurement (bench/gemv_sweep.py for one
    kernel, bench/profile_decode.py for whole steps; numbers in bench/RESULTS.md). What matters most
    is having every load of a program in flight at once: a whole row (up to 4096 columns) in the
    first read, 2048 columns per step for longer rows. Short rows with many outputs (the 1B's MLP)
    leave most programs idle in the last wave; persistent programs that read their next block
    while computing one close that gap. Elsewhere persistence measured equal or slower."""
    if triton is None:
        return GemvConfig(4, 1024)
    if weight_bits < 16:
        return _quantized_config(out_features, in_features, gated, weight_bits)
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


# Quantized weights: 1-byte ones measured (`_quantized_config`); int4's reasoned from the bf16
# measurements above (on CUDA int4 runs through tinygemm where its shapes allow: measured faster). bf16's lesson is to have a program's whole first read in flight:
# 4 rows of 4096 columns, 32 KiB. Fewer bytes per weight put more weights in those bytes, but x's
# normed float32 columns sit in registers (ROWS x first read columns over the program's threads,
# 128 per thread for 4 rows of 8192 at 8 warps), so rows are read whole only up to
# QUANTIZED_WHOLE_ROW columns, and the bytes come from more rows per block instead (int4: twice
# the 1-byte rows). Small matrices keep at least QUANTIZED_MIN_BLOCKS blocks (4 per SM of an
# H100/H200), as bf16's 4-row blocks of the 1B's 2048 outputs do.
QUANTIZED_WHOLE_ROW = 8192  # columns of a row read in the first read (whole rows up to this)
QUANTIZED_STEP = 4096  # columns per read of longer rows (the first one too)
QUANTIZED_READ = 32768  # bytes of weight per program's first read
QUANTIZED_MAX_BLOCK_N = 16
QUANTIZED_MIN_BLOCKS = 512


def _quantized_config(out_features: int, in_features: int, gated: bool, weight_bits: int) -> GemvConfig:
    row = triton.next_power_of_2(in_features)
    if weight_bits == 8:
        # measured (bench/quantized_gemv_sweep.py, H200, 11-30, Llama-3.1-8B's shapes at one row):
        # 4-row blocks at 4 warps were fastest for every shape, a whole row in the first read up to
        # 4096 columns (7-15% over the reasoned configuration below). Longer rows step by the
        # largest power of two from 1024 to 4096 that divides them: 14336 by 2048 (the 8B's down),
        # 8192 by 4096, and 5120 (Scout's rows) reads 4096 first, then 1024, so no step is half
        # masked (Scout FP8, 6 copies chained: qkv 21.6 -> 18.5 us, o 13.7 -> 12.9, gate_up 38.9 ->
        # 36.4, down 18.1 -> 16.3; bench/RESULTS.md, 2026-11-30 tenth session)
        if row <= 4096:
            return GemvConfig(4, row, 4, 1, row)
        step = min(max(in_features & -in_features, 1024), 4096)
        return GemvConfig(4, step, 4, 1, 4096 if step < 2048 else step)
    first_k = row if row <= QUANTIZED_WHOLE_ROW else QUANTIZED_STEP
    matrices = 2 if gated else 1
    row_bytes = first_k * weight_bits // 8
    block_n = min(max(QUANTIZED_READ // (row_bytes * matrices), 2), QUANTIZED_MAX_BLOCK_N)
    # at least QUANTIZED_MIN_BLOCKS blocks where the outputs allow (2 rows at least: rotary pairs them)
    block_n = max(min(block_n, _power_of_two_below(out_features // QUANTIZED_MIN_BLOCKS)), 2)
    warps = 8 if block_n * matrices * row_bytes >= QUANTIZED_READ else 4
    # persistent where bf16 measured it faster: gate/up of short rows, down of long rows into few outputs
    persistent = (gated and row <= 2048) or (4096 < row <= QUANTIZED_WHOLE_ROW and not gated and out_features <= 2048)
    return GemvConfig(block_n, min(QUANTIZED_STEP, row), warps, 1, first_k, 2 if persistent else 0)


def _power_of_two_below(n: int) -> int:
    """The largest power of two <= n (1 for n < 1)."""
    return 1 << max(n, 1).bit_length() - 1


if triton is not None:

    @triton.jit
    def _load_x(x_ptr, r, r_ok, k, k_ok, K):
        """(ROWS, width): columns k of x's rows. Every program reads x: kept in L2 (the weight streams through)."""
        return tl.load(x_ptr + r[:, None] * K + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0,
                       eviction_policy="evict_last")

    @triton.jit
    def _normed(xv, norm_w_ptr, inv_rms, k, k_ok, NORM: tl.constexpr, dtype: tl.constexpr):
        """(ROWS, width) float32: x's columns k, normed and rounded as the torch norm rounds when NORM."""
        if NORM:
            norm_w = tl.load(norm_w_ptr + k, mask=k_ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
            xv = (xv.to(tl.float32) * inv_rms[:, None]).to(dtype)
            xv = (xv.to(tl.float32) * norm_w[None, :]).to(dtype)
        return xv.to(tl.float32)

    @triton.jit
    def _x_columns(xf, QUANT: tl.constexpr):
        """xf (ROWS, width) -> what multiplies a weight tile (`_tile_product`): xf twice, or for int4
        its even and odd columns (ROWS, width // 2), the low and high nibbles'. Several rows get a
        middle axis, (ROWS, 1, width), to broadcast against the tile's rows. One row stays 2-D:
        without the broadcast axis the products need fewer layout conversions (8B at one row, 4
        projections chained: FP8 84.8 -> 69.6 us a layer, int8 82.9 -> 77.2, bf16 120.4 -> 116.6;
        bench/RESULTS.md, 2026-11-30 tenth session)."""
        low = xf
        high = xf
        if QUANT == 2:
            low, high = tl.split(tl.reshape(xf, (xf.shape[0], xf.shape[1] // 2, 2)))
        if xf.shape[0] > 1:
            low = low[:, None, :]
            high = high[:, None, :]
        return low, high

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
    def _load_tile(w_ptr, scale_ptr, offset_ptr, n, n_ok, K, start, WIDTH: tl.constexpr, QUANT: tl.constexpr,
                   GROUP: tl.constexpr, ROW_SCALE: tl.constexpr):
        """Columns start .. start + WIDTH of weight rows n (BLOCK_N,) as stored, zeros where not n_ok,
        with what dequantizes them: a tuple (w, scale, offset). w: (BLOCK_N, WIDTH), for int4 the
        (BLOCK_N, WIDTH // 2) bytes that hold them. scale: row-scaled (BLOCK_N,) when ROW_SCALE (a
        block's first tile: the sum takes it at the end); int4 (BLOCK_N, groups of the tile), offset
        alike. Those unused are w. int4 tiles start on a group boundary or lie inside one group."""
        row_length = K
        cols = start + tl.arange(0, WIDTH)
        if QUANT == 2:
            row_length = K // 2
            cols = start // 2 + tl.arange(0, WIDTH // 2)
        w = tl.load(w_ptr + n.to(tl.int64)[:, None] * row_length + cols[None, :],
                    mask=n_ok[:, None] & (cols < row_length)[None, :], other=0.0, eviction_policy="evict_first")
        scale = w
        offset = w
        if QUANT == 1 and ROW_SCALE:
            scale = tl.load(scale_ptr + n, mask=n_ok, other=0.0)
        if QUANT == 2:
            groups = K // GROUP
            g = start // GROUP + tl.arange(0, WIDTH // GROUP if WIDTH >= GROUP else 1)
            at = n.to(tl.int64)[:, None] * groups + g[None, :]
            mask = n_ok[:, None] & (g < groups)[None, :]
            scale = tl.load(scale_ptr + at, mask=mask, other=0.0)
            offset = tl.load(offset_ptr + at, mask=mask, other=0.0)
        return w, scale, offset

    @triton.jit
    def _load_rows(w_ptr, scale_ptr, offset_ptr, n, n_ok, N, K, start, WIDTH: tl.constexpr, GATED: tl.constexpr,
                   QUANT: tl.constexpr, GROUP: tl.constexpr, ROW_SCALE: tl.constexpr):
        """The tiles (`_load_tile`) of rows n and, when GATED, of the up rows n + N (else the same)."""
        tile = _load_tile(w_ptr, scale_ptr, offset_ptr, n, n_ok, K, start, WIDTH, QUANT, GROUP, ROW_SCALE)
        tile_up = tile
        if GATED:
            tile_up = _load_tile(w_ptr, scale_ptr, offset_ptr, n + N, n_ok, K, start, WIDTH, QUANT, GROUP, ROW_SCALE)
        return tile, tile_up

    @triton.jit
    def _as_float(w):
        """A tile's stored weights as float32. int8 and int4 nibbles (uint8 below 16) without a
        conversion instruction (NVIDIA GPUs run those at a quarter of the float rate, below what
        reading 1 or 0.5 bytes per weight needs): an integer 0 <= m < 2**23 in the mantissa of the
        float 2**23 makes the float 2**23 + m, and the subtraction leaves m, exactly."""
        if w.dtype == tl.int8:  # m = w + 128
            f = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        elif w.dtype == tl.uint8:
            f = (w.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        else:
            f = w.to(tl.float32)
        return f

    @triton.jit
    def _byte_fraction(b):
        """A signed byte b as the float 1 + (b + 128) / 256 (`_tile_product`): its bits are
        (b << 15) + base, base being 1.0's bits plus 128 units of bit 15, so b + 128 lands in
        mantissa bits 15-22. One shift-and-add instruction, no conversion and no subtraction."""
        return ((b.to(tl.int32) << 15) + 0x3FC00000).to(tl.float32, bitcast=True)

    @triton.jit
    def _nibble_fraction(byte, shift: tl.constexpr):
        """The nibble of a byte that `byte << shift` puts in mantissa bits 19-22 (19: the low one,
        15: the high one) as the float 1 + q / 16 (`_tile_product`): masked and or-ed into 1.0's bits
        (measured faster than masking the nibble first and adding)."""
        return (((byte.to(tl.int32) << shift) & 0x00780000) ^ 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _grouped(q, scale, offset):
        """q (BLOCK_N, B) float32 nibbles, scale and offset (BLOCK_N, G) of G groups of B // G
        columns -> q * scale + offset of their group, float32 (the exact weight: not rounded to
        x's dtype as `dequantize` rounds, which would take another conversion per weight)."""
        block_n: tl.constexpr = q.shape[0]
        width: tl.constexpr = q.shape[1]
        groups: tl.constexpr = scale.shape[1]
        w = tl.reshape(q, (block_n, groups, width // groups)) * scale.to(tl.float32)[:, :, None] \
            + offset.to(tl.float32)[:, :, None]
        return tl.reshape(w, (block_n, width))

    @triton.jit
    def _tile_product(x_low, x_high, tile, QUANT: tl.constexpr, FRACTIONS: tl.constexpr):
        """(ROWS, BLOCK_N) float32: the tile's columns of x (`_x_columns`: (1, width) for one row,
        (ROWS, 1, width) for more) times the weight (row-scaled: before the scale).

        FRACTIONS (int8 and int4 with 16-bit x): each weight is multiplied as a float in [1, 2)
        (`_byte_fraction`, `_nibble_fraction`): int8 b as 1 + (b + 128) / 256, a nibble q as
        1 + q / 16, and the sums correct for it: sum(b x) = 256 (sum(f x) - sum(x)) - 128 sum(x),
        sum(q x) = 16 (sum(f x) - sum(x)). That saves the exact conversion's float subtraction
        (`_as_float`) a weight (8B's four projections at one row, µs a layer: int8 77.8 -> 76.2,
        int4 116.0 -> 91.7; bench/RESULTS.md, 2026-12-01). The products are exact for bf16 x (9 or 5
        bits times 8) and the sums lose about 2**-16 of their size, far below x's rounding.
        float32 x keeps the exact conversion."""
        w, scale, offset = tile
        if QUANT == 2 and FRACTIONS:
            low = _nibble_fraction(w, 19)  # (BLOCK_N, width // 2): 1 + q / 16
            high = _nibble_fraction(w, 15)
            groups: tl.constexpr = scale.shape[1]
            block_n: tl.constexpr = w.shape[0]
            width: tl.constexpr = w.shape[1]
            if len(x_low.shape) == 2:  # one row: (BLOCK_N, width // 2) products, (1, groups) x sums
                sums = tl.sum(tl.reshape(x_low * low + x_high * high, (block_n, groups, width // groups)), axis=2)
                x_sums = tl.sum(tl.reshape(x_low + x_high, (1, groups, width // groups)), axis=2)
                q_sums = 16.0 * (sums - x_sums)  # (BLOCK_N, groups): sum(q x) per group
                product = tl.sum(q_sums * scale.to(tl.float32) + offset.to(tl.float32) * x_sums, axis=1)[None, :]
            else:  # (ROWS, BLOCK_N, width // 2) products
                rows: tl.constexpr = x_low.shape[0]
                sums = tl.sum(tl.reshape(x_low * low[None, :, :] + x_high * high[None, :, :],
                                         (rows, block_n, groups, width // groups)), axis=3)
                x_sums = tl.sum(tl.reshape(x_low + x_high, (rows, 1, groups, width // groups)), axis=3)
                q_sums = 16.0 * (sums - x_sums)  # (ROWS, BLOCK_N, groups)
                product = tl.sum(q_sums * scale.to(tl.float32)[None, :, :] + offset.to(tl.float32)[None, :, :] * x_sums,
                                 axis=2)
        elif QUANT == 2:
            low = _grouped(_as_float(w & 0xF), scale, offset)
            high = _grouped(_as_float(w >> 4), scale, offset)
            if len(x_low.shape) == 2:
                product = tl.sum(x_low * low + x_high * high, axis=1)[None, :]
            else:
                product = tl.sum(x_low * low[None, :, :] + x_high * high[None, :, :], axis=2)
        elif QUANT == 1 and FRACTIONS and w.dtype == tl.int8:
            f = _byte_fraction(w)  # 1 + (b + 128) / 256
            if len(x_low.shape) == 2:
                x_sum = tl.sum(x_low, axis=1)  # (1,)
                product = (256.0 * (tl.sum(x_low * f, axis=1) - x_sum) - 128.0 * x_sum)[None, :]
            else:
                x_sum = tl.sum(x_low, axis=2)  # (ROWS, 1)
                product = 256.0 * (tl.sum(x_low * f[None, :, :], axis=2) - x_sum) - 128.0 * x_sum
        elif len(x_low.shape) == 2:
            product = tl.sum(x_low * _as_float(w), axis=1)[None, :]
        else:
            product = tl.sum(x_low * _as_float(w)[None, :, :], axis=2)
        return product

    @triton.jit
    def _rounded(v, dtype: tl.constexpr):
        return v.to(dtype).to(tl.float32)

    @triton.jit
    def _store_query_or_cache(y, r, r_ok, n, out_ptr, keys_ptr, values_ptr, cache_row, slot, q_rows, kv_rows, slots,
                              HEAD_DIM: tl.constexpr):
        """y (ROWS, P) of rows n (P,): query rows to out (rows, q_rows), key and value rows into the
        caches (cache rows, kv_rows // HEAD_DIM, slots, HEAD_DIM) at row cache_row (ROWS,), slot (ROWS,)."""
        is_query = n < q_rows
        is_key = (n >= q_rows) & (n < q_rows + kv_rows)
        is_value = (n >= q_rows + kv_rows) & (n < q_rows + 2 * kv_rows)
        in_cache = tl.where(is_key, n - q_rows, n - q_rows - kv_rows)  # kv head * HEAD_DIM + d
        kv_head = in_cache // HEAD_DIM
        cache_offsets = ((cache_row[:, None].to(tl.int64) * (kv_rows // HEAD_DIM) + kv_head[None, :]) * slots
                         + slot[:, None]) * HEAD_DIM \
            + (in_cache % HEAD_DIM)[None, :]
        tl.store(out_ptr + r[:, None] * q_rows + n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & is_query[None, :])
        tl.store(keys_ptr + cache_offsets, y.to(keys_ptr.dtype.element_ty), mask=r_ok[:, None] & is_key[None, :])
        tl.store(values_ptr + cache_offsets, y.to(values_ptr.dtype.element_ty), mask=r_ok[:, None] & is_value[None, :])

    @triton.jit
    def _rotary_epilogue(y, r, r_ok, n, out_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, slot_ptr, per_row_slot, q_rows,
                         kv_rows, slots, dtype: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
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
        # one slot shared by every row of (rows, ...) caches, or (per_row_slot) a flat slot per row of
        # a paged pool (1, ...)
        slot = tl.load(slot_ptr + r * per_row_slot, mask=r_ok, other=0)  # (ROWS,)
        cache_row = r * (1 - per_row_slot)
        _store_query_or_cache(tl.where(rotated, new_low, low), r, r_ok, n_low, out_ptr, keys_ptr, values_ptr, cache_row,
                              slot, q_rows, kv_rows, slots, HEAD_DIM)
        _store_query_or_cache(tl.where(rotated, new_high, high), r, r_ok, n_high, out_ptr, keys_ptr, values_ptr,
                              cache_row, slot, q_rows, kv_rows, slots, HEAD_DIM)

    @triton.jit
    def _block_output(block, first, first_up, x_low, x_high, x_ptr, w_ptr, scale_ptr, offset_ptr, out_ptr,
                      residual_ptr, norm_w_ptr, inv_rms, cos_ptr, sin_ptr, keys_ptr, values_ptr, slot_ptr, per_row_slot,
                      r, r_ok, N, K, q_rows, kv_rows, slots, dtype: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
                      RESIDUAL: tl.constexpr, ROTARY: tl.constexpr, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr,
                      GROUP: tl.constexpr, FRACTIONS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, FIRST_K: tl.constexpr):
        """The outputs of one block of weight rows: first/first_up its tiles (`_load_tile`) of the
        first FIRST_K columns, already read; x_low/x_high x's first columns, normed, float32
        (`_x_columns`)."""
        n = _block_rows(block, ROTARY, BLOCK_N, HEAD_DIM)  # (BLOCK_N,) output features
        n_ok = n < N
        acc = _tile_product(x_low, x_high, first, QUANT, FRACTIONS)  # (ROWS, BLOCK_N)
        acc_up = acc
        if GATED:
            acc_up = _tile_product(x_low, x_high, first_up, QUANT, FRACTIONS)
        for start in range(FIRST_K, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            k_ok = k < K
            step_low, step_high = _x_columns(_normed(_load_x(x_ptr, r, r_ok, k, k_ok, K), norm_w_ptr, inv_rms, k, k_ok,
                                                     NORM, dtype), QUANT)
            tile, tile_up = _load_rows(w_ptr, scale_ptr, offset_ptr, n, n_ok, N, K, start, BLOCK_K, GATED, QUANT, GROUP,
                                       False)
            acc += _tile_product(step_low, step_high, tile, QUANT, FRACTIONS)
            if GATED:
                acc_up += _tile_product(step_low, step_high, tile_up, QUANT, FRACTIONS)
        if QUANT == 1:  # row-scaled: each row's sum times its scale
            acc = acc * first[1][None, :]
            if GATED:
                acc_up = acc_up * first_up[1][None, :]

        y = _rounded(acc, dtype)  # (ROWS, BLOCK_N), rounded as the matmul's output
        if GATED:
            up = _rounded(acc_up, dtype)
            activated = _rounded(y * tl.sigmoid(y), dtype)
            y = activated * up
        if ROTARY:
            _rotary_epilogue(y, r, r_ok, n, out_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, slot_ptr, per_row_slot, q_rows,
                             kv_rows, slots, dtype, ROWS, BLOCK_N, HEAD_DIM)
        else:
            out_offsets = r[:, None] * N + n[None, :]
            out_mask = r_ok[:, None] & n_ok[None, :]
            if RESIDUAL:
                y = _rounded(y, dtype) + tl.load(residual_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + out_offsets, y.to(dtype).to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _few_row_linear_kernel(
        x_ptr,  # (rows, K)
        w_ptr,  # (N, K), or (2N, K) gate rows then up rows when GATED; int4: (N or 2N, K // 2) bytes
        scale_ptr,  # row-scaled: (N or 2N,) float32; int4: (N or 2N, K // GROUP) in x's dtype
        offset_ptr,  # int4: as scale
        out_ptr,  # (rows, N); with ROTARY the query (rows, q_rows)
        residual_ptr,  # (rows, N) when RESIDUAL
        norm_w_ptr,  # (K,) when NORM
        cos_ptr,  # with ROTARY: (rows, HEAD_DIM) each
        sin_ptr,
        keys_ptr,  # with ROTARY: (rows, kv_rows // HEAD_DIM, slots, HEAD_DIM) each
        values_ptr,
        slot_ptr,  # with ROTARY: (1,) the new token's cache slot, or (rows,) a flat slot per row of a paged pool
        per_row_slot,  # 1: slot_ptr holds a slot per row and keys/values are one pool (1, kv_heads, slots, HEAD_DIM)
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
        QUANT: tl.constexpr,  # PLAIN (w in x's dtype), ROW_SCALED (int8/FP8 times a scale per row), INT4 (in groups)
        GROUP: tl.constexpr,  # int4: columns per scale and offset (a power of two)
        FRACTIONS: tl.constexpr,  # int8/int4 weights multiplied as floats in [1, 2) (`_tile_product`)
        PDL: tl.constexpr,  # launched as a programmatic dependent of the previous kernel
        ROWS: tl.constexpr,  # rows rounded up to a power of two
        PERSISTENT: tl.constexpr,  # fewer programs than blocks, each looping over its share (FIRST_K >= K)
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FIRST_K: tl.constexpr,  # columns read in one load, before waiting for the previous kernel (a power of two)
    ):
        dtype = x_ptr.dtype.element_ty
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
        first, first_up = _load_rows(w_ptr, scale_ptr, offset_ptr, n, n < N, N, K, 0, FIRST_K, GATED, QUANT, GROUP,
                                     True)  # the tiles of (BLOCK_N, FIRST_K) weights
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
        x_low, x_high = _x_columns(_normed(x_first, norm_w_ptr, inv_rms, first_cols, first_k_ok, NORM, dtype), QUANT)

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
                following_tiles = _load_rows(w_ptr, scale_ptr, offset_ptr, n_next, next_ok, N, K, 0, FIRST_K, GATED,
                                             QUANT, GROUP, True)
                _block_output(block, first, first_up, x_low, x_high, x_ptr, w_ptr, scale_ptr, offset_ptr, out_ptr,
                              residual_ptr, norm_w_ptr, inv_rms, cos_ptr, sin_ptr, keys_ptr, values_ptr, slot_ptr,
                              per_row_slot, r, r_ok, N, K, q_rows, kv_rows, slots, dtype, GATED, NORM, RESIDUAL, ROTARY, HEAD_DIM, QUANT,
                              GROUP, FRACTIONS, ROWS, BLOCK_N, BLOCK_K, FIRST_K)
                first, first_up = following_tiles
        else:
            _block_output(program, first, first_up, x_low, x_high, x_ptr, w_ptr, scale_ptr, offset_ptr, out_ptr,
                          residual_ptr, norm_w_ptr, inv_rms, cos_ptr, sin_ptr, keys_ptr, values_ptr, slot_ptr,
                          per_row_slot, r, r_ok, N, K, q_rows, kv_rows, slots, dtype, GATED, NORM, RESIDUAL, ROTARY, HEAD_DIM, QUANT, GROUP,
                          FRACTIONS, ROWS, BLOCK_N, BLOCK_K, FIRST_K)

    def launch(x, weight, out, *, norm_weight=None, eps=0.0, residual=None, gated=False, rotary=None, config=None,
               pdl=None):
        """out (rows, N) from x (rows, K) and weight ((2 if gated else 1) * N, K), a tensor or a
        QuantizedWeight; also runs in Triton's interpreter (the CPU tests). `rotary`: (cos, sin,
        keys, values, slot) for q/k/v (`norm_qkv_rotary`): out is then the query alone, key and
        value go into the cache. `pdl`: programmatic dependent launch, by default where the device
        has it (kernels.programmatic_launch)."""
        quant = _format(weight)
        data, scale, offset = _op_weight(weight)
        rows, in_features = x.shape[0], data.shape[1] * (2 if quant == INT4 else 1)
        group = in_features // scale.shape[1] if quant == INT4 else 1
        out_features = data.shape[0] // 2 if gated else data.shape[0]
        weight_bits = {PLAIN: 16, ROW_SCALED: 8, INT4: 4}[quant]
        block_n, block_k, warps, stages, first_k, programs_per_sm = GemvConfig(
            *(config or _config(out_features, in_features, gated, weight_bits)))
        row = triton.next_power_of_2(in_features)
        first_k = min(first_k or block_k, row)
        if quant == INT4:  # a first read of whole steps: every tile starts on a group boundary or lies in one group
            first_k = max(first_k, min(block_k, row))
        blocks = triton.cdiv(out_features, block_n)
        programs = blocks
        if programs_per_sm and first_k >= in_features:  # the persistent loop reads whole rows only
            programs = min(blocks, programs_per_sm * multiprocessors(x.device))
        pdl = programmatic_launch(x) if pdl is None else pdl
        cos, sin, keys, values, slot = rotary if rotary is not None else (x,) * 5
        _, kv_heads, slots, head_dim = keys.shape if rotary is not None else (0, 0, 0, 2)
        if rotary is not None and block_n < 2:
            raise ValueError("the rotary epilogue pairs rows: block_n must be at least 2")
        per_row_slot = int(rotary is not None and keys.shape[0] != rows)  # a paged pool: one flat slot per row
        _few_row_linear_kernel[(programs,)](
            x, data, scale if scale is not None else x, offset if offset is not None else x,
            out, residual if residual is not None else out, norm_weight if norm_weight is not None else x,
            cos, sin, keys, values, slot, per_row_slot,
            rows, out_features, in_features, eps, out_features - 2 * kv_heads * head_dim, kv_heads * head_dim, slots,
            NORM=norm_weight is not None, GATED=gated, RESIDUAL=residual is not None, ROTARY=rotary is not None,
            HEAD_DIM=head_dim, QUANT=quant, GROUP=group,
            FRACTIONS=FRACTION_PRODUCTS and x.dtype != torch.float32, PDL=pdl, ROWS=triton.next_power_of_2(rows),
            PERSISTENT=programs < blocks, BLOCK_N=block_n, BLOCK_K=block_k,
            FIRST_K=first_k, num_warps=warps, num_stages=stages, launch_pdl=pdl,
        )  # fmt: skip
        return out

    # Opaque operators (not triton_op): the compiled step calls them, and they launch through
    # Triton's own launcher, which keeps the programmatic-launch attribute (inductor's inlined
    # launch of a user kernel drops it). Captured into the CUDA graph like any kernel. A quantized
    # weight comes as its parts: weight is then its data, with scale (and for int4 offset).
    def _weight(weight, scale, offset):
        return weight if scale is None else QuantizedWeight(weight, scale, offset)

    @torch.library.custom_op("herd::norm_linear", mutates_args=())
    def _norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                     out_dtype: torch.dtype, scale: torch.Tensor | None = None,
                     offset: torch.Tensor | None = None) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)
        return launch(x, _weight(weight, scale, offset), out, norm_weight=norm_weight, eps=eps)

    @_norm_linear.register_fake
    def _(x, norm_weight, eps, weight, out_dtype, scale=None, offset=None):
        return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)

    @torch.library.custom_op("herd::norm_qkv_rotary", mutates_args=("keys", "values"))
    def _norm_qkv_rotary(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         slot: torch.Tensor, scale: torch.Tensor | None = None,
                         offset: torch.Tensor | None = None) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((x.shape[0], _query_rows(weight, keys)))
        return launch(x, _weight(weight, scale, offset), out, norm_weight=norm_weight, eps=eps,
                      rotary=(cos.contiguous(), sin.contiguous(), keys, values, slot))

    @_norm_qkv_rotary.register_fake
    def _(x, norm_weight, eps, weight, cos, sin, keys, values, slot, scale=None, offset=None):
        return x.new_empty((x.shape[0], _query_rows(weight, keys)))

    def _query_rows(weight, keys):
        return weight.shape[0] - 2 * keys.shape[1] * keys.shape[3]

    @torch.library.custom_op("herd::norm_swiglu", mutates_args=())
    def _norm_swiglu(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                     scale: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((x.shape[0], weight.shape[0] // 2))
        return launch(x, _weight(weight, scale, offset), out, norm_weight=norm_weight, eps=eps, gated=True)

    @_norm_swiglu.register_fake
    def _(x, norm_weight, eps, weight, scale=None, offset=None):
        return x.new_empty((x.shape[0], weight.shape[0] // 2))

    @torch.library.custom_op("herd::linear_add", mutates_args=())
    def _linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                    scale: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
        x, residual = x.contiguous(), residual.contiguous()
        return launch(x, _weight(weight, scale, offset), torch.empty_like(residual), residual=residual)

    @_linear_add.register_fake
    def _(x, weight, residual, scale=None, offset=None):
        return torch.empty_like(residual)

    @torch.library.custom_op("herd::linear", mutates_args=())
    def _linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                offset: torch.Tensor | None = None) -> torch.Tensor:
        x = x.contiguous()
        return launch(x, _weight(weight, scale, offset), x.new_empty((x.shape[0], weight.shape[0])))

    @_linear.register_fake
    def _(x, weight, scale=None, offset=None):
        return x.new_empty((x.shape[0], weight.shape[0]))
