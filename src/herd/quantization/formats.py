"""The weight formats a linear layer can hold, and how each one multiplies.

A quantized model keeps its module tree: the loading step swaps each `nn.Linear` that the
quantization config picks for a `QuantizedLinear` of one format, and the reference forward calls
it like any Linear. Formats (weights are (out features, in features), as nn.Linear's):

- "fp8":  `weight` float8_e4m3fn, `weight_scale` float32 (out, 1): w = weight * scale per row.
          Activations are quantized per token at run time (`activation_scale_ub` bounds the scale),
          per group of `activation_group_size` columns of a token, or with one stored
          `input_scale`, or left alone (weight-only), as the config says.
          Block-scaled checkpoints keep `weight_scale` (ceil(out / block), ceil(in / block)).
- "int8": `weight` int8, `weight_scale` float32 (out, 1): symmetric per row, weight-only.
- "int4": `weight` uint8 (out, in / 2) two values a byte (column 2j in the low nibble of byte j),
          `weight_scale` and `weight_offset` (out, in / group) in the model's dtype:
          w = q * scale + offset with q in 0..15 (asymmetric, the min/max form: GGUF Q4_1 exactly;
          torchao's float zero point is offset + 8 * scale). A scheme's `scale_dtype` can keep the
          scales and offsets in another dtype: GGUF's Q4 blocks keep their float16 ones in a bf16
          model, since bf16 would round them (quantization/gguf.py).

Which kernel multiplies: on a GPU with FP8 (compute capability >= 8.9) FP8 runs `_scaled_mm`
with row-wise scales (the decode step at 5-64 rows: kernels/fp8_matmul.py); int8 and int4 run torch's weight-only CPU kernels on the CPU (with bf16
activations: 5-8x faster than a float32 matmul on two cores, see bench/RESULTS.md); elsewhere the
weight is dequantized to the activations' dtype for the matmul. The decode step's few-row
kernels (kernels/gemv.py) read `kernel_weight()` and dequantize inside their loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # the largest float8_e4m3fn value
INT4_GROUP_SIZES = (32, 64, 128, 256)
SCALE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Scheme:
    """How one linear's weight is stored and its activations treated."""

    format: str  # "fp8" | "int8" | "int4"
    group_size: int = 0  # int4: columns per scale/offset group
    # fp8: "dynamic" (per token, or per group) | "static" (stored input_scale) | None (weight-only)
    activations: str | None = None
    activation_scale_ub: float | None = None  # fp8 dynamic: upper bound of an activation row's amax
    block: tuple[int, int] | None = None  # fp8 block-scaled checkpoints: (rows, columns) per scale
    scale_dtype: str | None = None  # int4: the dtype of scales and offsets ("float16"); None: the model's
    activation_group_size: int = 0  # fp8 dynamic: columns per activation scale (0: one scale per token)

    def __post_init__(self):
        if self.format not in ("fp8", "int8", "int4"):
            raise ValueError(f"unknown weight format {self.format!r}; herd has fp8, int8 and int4")
        if self.format == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")
        if self.scale_dtype is not None and (self.format != "int4" or self.scale_dtype not in SCALE_DTYPES):
            raise ValueError(f"scale_dtype {self.scale_dtype!r}: int4 scales and offsets can be kept in "
                             f"{', '.join(SCALE_DTYPES)} (other formats keep float32 scales)")

    @property
    def scales_activation_rows(self) -> bool:
        """FP8 activations quantized at run time with one scale per token (per row), the row's amax
        over all its columns: the scale that a split by input features must reduce across ranks."""
        return self.format == "fp8" and self.activations == "dynamic" and not self.activation_group_size


# --- quantizers: a float weight -> its stored tensors ----------------------------------------------


def quantize_fp8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> float8_e4m3fn (out, in), float32 scale (out, 1); each row's amax maps to 448."""
    w32 = weight.float()
    scale = (w32.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> int8 (out, in), float32 scale (out, 1); symmetric, each row's amax maps to 127."""
    w32 = weight.float()
    scale = (w32.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
    return torch.round(w32 / scale).clamp(-127, 127).to(torch.int8), scale


def quantize_int4_groups(weight: torch.Tensor, group_size: int, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) -> packed uint8 (out, in / 2), scale and offset (out, in / group) in `dtype`:
    each group's min maps to 0 and its max to 15."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (out, groups)
    # The stored (rounded) scale and offset are the ones that dequantize, so q is computed from them.
    scale = ((high - low) / 15.0).clamp(min=1e-8).to(dtype)
    offset = low.to(dtype)
    q = torch.round((groups - offset.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
    return pack_int4(q.reshape(out_features, in_features).to(torch.uint8)), scale, offset


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values 0..15 -> (out, in / 2) uint8, column 2j low, 2j + 1 high."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in / 2) uint8 -> (out, in) uint8 values 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def quantize_activation_rows(x: torch.Tensor, scale_ub: float | None,
                             reduce_amax: Callable[[torch.Tensor], torch.Tensor] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, in) -> FP8 rows and their float32 scales (rows, 1), FBGEMM's rule: the kernels' own
    (`reduce_amax`: the whole rows' amax from a slice's, under tensor parallel)."""
    from ..kernels.gemv import fp8_activation_rows

    return fp8_activation_rows(x, scale_ub, reduce_amax)


def quantize_activation_groups(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, in) -> float8_e4m3fn (rows, in), float32 scale (rows, in / group_size): the per-row
    rule on each group of `group_size` columns (compressed-tensors' dynamic "group" activations)."""
    rows, columns = x.shape
    data, scale = quantize_activation_rows(x.reshape(rows * (columns // group_size), group_size), None)
    return data.reshape(rows, columns), scale.reshape(rows, columns // group_size)


def has_fp8_matmul(device: torch.device) -> bool:
    """`_scaled_mm` with FP8 inputs needs compute capability 8.9 (Ada) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class QuantizedLinear(nn.Module):
    """nn.Linear's interface over a quantized weight (see the module docstring for the formats)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: Scheme,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        # The activations' dtype: int4's scales and offsets are kept in it (unless the scheme names another).
        self.compute_dtype = dtype
        empty = dict(device=device)
        if scheme.format == "int4":
            if in_features % scheme.group_size:
                raise ValueError(f"int4 group_size {scheme.group_size} does not divide in_features {in_features}")
            groups = in_features // scheme.group_size
            scale_dtype = getattr(torch, scheme.scale_dtype) if scheme.scale_dtype else dtype
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, **empty))
            self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=scale_dtype, **empty))
            self.register_buffer("weight_offset", torch.empty(out_features, groups, dtype=scale_dtype, **empty))
        else:
            if scheme.activation_group_size and in_features % scheme.activation_group_size:
                raise ValueError(f"activation group size {scheme.activation_group_size} does not divide "
                                 f"in_features {in_features}")
            data_dtype = FP8 if scheme.format == "fp8" else torch.int8
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=data_dtype, **empty))
            if scheme.block is not None:
                rows, cols = scheme.block
                scale_shape = (-(-out_features // rows), -(-in_features // cols))
            else:
                scale_shape = (out_features, 1)
            self.register_buffer("weight_scale", torch.empty(scale_shape, dtype=torch.float32, **empty))
            if scheme.activations == "static":
                self.register_buffer("input_scale", torch.empty((), dtype=torch.float32, **empty))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, **empty)) if bias else None
        # Set by tensor parallel on a linear split by its input features whose activations are
        # scaled per token: (rows, 1) local amax -> the whole rows' amax (a MAX across the ranks),
        # so each rank quantizes its slice with the one-process scale.
        self.reduce_activation_amax: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._packed: tuple | None = None  # the CPU kernels' own layout, made on first use
        self._kernel_weight: tuple | None = None  # (storage, gemv.QuantizedWeight), made on first use

    def extra_repr(self) -> str:
        group = f", group_size={self.scheme.group_size}" if self.scheme.format == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.scheme.format}{group}")

    # --- what the weight is ------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a float (out, in) tensor (float32 unless `dtype`)."""
        fmt = self.scheme.format
        if fmt == "int4":
            group = self.scheme.group_size
            q = unpack_int4(self.weight).float()
            scale = self.weight_scale.float().repeat_interleave(group, dim=1)
            offset = self.weight_offset.float().repeat_interleave(group, dim=1)
            weight = q * scale + offset
        elif self.scheme.block is not None:
            rows, cols = self.scheme.block
            scale = self.weight_scale.repeat_interleave(rows, 0)[: self.out_features]
            scale = scale.repeat_interleave(cols, 1)[:, : self.in_features]
            weight = self.weight.float() * scale
        else:
            weight = self.weight.float() * self.weight_scale
        return weight if dtype is None else weight.to(dtype)

    def kernel_weight(self):
        """The weight as the decode kernels take it (kernels/gemv.py `QuantizedWeight`), or None for
        a format they do not read (block-scaled FP8). Made once per storage (int4 on CUDA adds
        torch's tinygemm layout, as many bytes again)."""
        if self.scheme.block is not None:
            return None
        key = self.weight.data_ptr()
        if self._kernel_weight is None or self._kernel_weight[0] != key:
            offset = self.weight_offset if self.scheme.format == "int4" else None
            self._kernel_weight = (key, kernel_weight_of(self.weight, self.weight_scale, offset, self.scheme,
                                                         self.reduce_activation_amax))
        return self._kernel_weight[1]

    # --- the reference arithmetic ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        fmt = self.scheme.format
        if fmt == "fp8" and self.scheme.activations is not None and self.scheme.block is None \
                and not self.scheme.activation_group_size:
            out = self._fp8_matmul(rows)
        elif fmt == "fp8" and self.scheme.activations is not None:
            # Block-scaled weights or per-group activation scales: no kernel here takes these scales,
            # so the activations are rounded to FP8 as the checkpoint says and meet the float weight.
            x_q, x_scale = self._quantized_activations(rows)
            if self.scheme.activation_group_size:
                x_scale = x_scale.repeat_interleave(self.scheme.activation_group_size, dim=1)
            out = nn.functional.linear((x_q.float() * x_scale).to(rows.dtype), self.dequantize(rows.dtype))
        elif fmt in ("int8", "int4") and rows.device.type == "cpu" and self.out_features % 16 == 0:
            # (torch's int4 CPU packing takes multiples of 16 rows; smaller layers dequantize)
            out = self._cpu_weight_only(rows)
        else:
            out = nn.functional.linear(rows, self.dequantize(rows.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def _quantized_activations(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The FP8 activations and their float32 scales: (rows, 1), or (rows, groups) per group."""
        if self.scheme.activations == "static":
            x_scale = self.input_scale.float().reshape(1, 1).expand(rows.shape[0], 1)
            return (rows.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), x_scale
        if self.scheme.activation_group_size:
            return quantize_activation_groups(rows, self.scheme.activation_group_size)
        return quantize_activation_rows(rows, self.scheme.activation_scale_ub, self.reduce_activation_amax)

    def _fp8_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """FP8 activations times FP8 weights, accumulated in float32, scaled per row and column."""
        x_q, x_scale = self._quantized_activations(rows)
        if has_fp8_matmul(rows.device) and rows.dtype in (torch.bfloat16, torch.float16, torch.float32):
            return torch._scaled_mm(x_q, self.weight.t(), scale_a=x_scale.contiguous(),
                                    scale_b=self.weight_scale.t().contiguous(), out_dtype=rows.dtype)
        product = x_q.float() @ self.weight.float().t()  # exact inputs, float32 sums, as _scaled_mm
        return (product * x_scale * self.weight_scale.t()).to(rows.dtype)

    def _cpu_weight_only(self, rows: torch.Tensor) -> torch.Tensor:
        """torch's weight-only CPU kernels, which are fast with bf16 activations (float32 ones take a
        slow path): the activations are rounded to bf16 and the result cast back."""
        x = rows.to(torch.bfloat16).contiguous()
        packed = self._cpu_packed()
        if self.scheme.format == "int8":
            out = torch._weight_int8pack_mm(x, self.weight, packed)
        else:
            out = torch._weight_int4pack_mm_for_cpu(x, packed[0], self.scheme.group_size, packed[1])
        return out.to(rows.dtype)

    def _cpu_packed(self):
        if self.weight.data_ptr() % 64:
            # torch's int8 CPU kernel reads past a row start that is not 64-byte aligned (it crashes
            # for tensors mapped from a safetensors file at an odd offset): an aligned copy
            self.weight = self.weight.clone()
        key = (self.weight.data_ptr(), self.weight_scale.data_ptr())
        if self._packed is None or self._packed[0] != key:
            if self.scheme.format == "int8":
                packed = self.weight_scale.view(-1).to(torch.bfloat16)
            else:
                # torch's int4 layout: w = (q - 8) * scale + zero, scale and zero (groups, out, 2)
                q = unpack_int4(self.weight).to(torch.int32)
                zero = self.weight_offset.float() + 8.0 * self.weight_scale.float()
                scales_and_zeros = torch.stack([self.weight_scale.float().t(), zero.t()], dim=-1)
                packed = (torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros.to(torch.bfloat16).contiguous())
            self._packed = (key, packed)
        return self._packed[1]


def kernel_weight_of(data: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, scheme: Scheme,
                     reduce_activation_amax: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """A (possibly fused) quantized weight's tensors as the decode kernels take them
    (`reduce_activation_amax`: QuantizedLinear's, under tensor parallel)."""
    from ..kernels.gemv import QuantizedWeight, int4_tiles

    if scheme.format == "int4":
        return QuantizedWeight(data, scale, offset, *int4_tiles(data, scale, offset))
    return QuantizedWeight(data, scale.view(-1), fp8_activations=scheme.scales_activation_rows,
                           activation_scale_ub=scheme.activation_scale_ub,
                           reduce_activation_amax=reduce_activation_amax)


def quantize_weight(weight: torch.Tensor, scheme: Scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A float weight (out, in) -> the tensors a QuantizedLinear of `scheme` stores, by buffer name."""
    if scheme.format == "fp8":
        data, scale = quantize_fp8_rows(weight)
        return {"weight": data, "weight_scale": scale}
    if scheme.format == "int8":
        data, scale = quantize_int8_rows(weight)
        return {"weight": data, "weight_scale": scale}
    data, scale, offset = quantize_int4_groups(weight, scheme.group_size, dtype)
    return {"weight": data, "weight_scale": scale, "weight_offset": offset}
