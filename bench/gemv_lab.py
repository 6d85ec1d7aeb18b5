"""Few-row matmuls of quantized weights on the tensor cores: which dequantization and tiling reach
the bandwidth floor (a measurement lab; the winner goes into herd.kernels).

herd's few-row kernel multiplies on the CUDA cores: each weight is converted to float32 and
multiplied in its own instruction, so a 1-byte weight costs about as many instructions as a
2-byte one while it brings half the bytes. Here the weight tile is dequantized to bf16 (a few
integer instructions per pair of weights, `inline asm`, or Triton's own conversions) and x, its
rows padded to 16, multiplies it in `tl.dot` (the MMA does the products and the sums).

Variants per format: bf16 (the plain weight, for scale), int8 (builtin conversion, asm), FP8
weight-only (builtin, asm), FP8 with per-row FP8 activations (FBGEMM's rule, an FP8 x FP8 dot),
int4 in groups of 128 (Triton arithmetic, asm). Each is checked against torch before timing.

    python bench/gemv_lab.py [--rows 1] [--shapes gate_up,down,qkv,o] [--variants ...]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantized_gemv import timed  # noqa: E402

from herd.kernels import expert_gemv, gemv  # noqa: E402
from herd.quantization.formats import quantize_fp8_rows, quantize_int4_groups, quantize_int8_rows  # noqa: E402

BF16, INT8, FP8, FP8_ACT, INT4 = 0, 1, 2, 3, 4

# int8 (4 per register) -> bf16: each byte made unsigned (xor 0x80) becomes the low byte of the
# float 2**23 + u (prmt), minus 2**23 + 128 leaves the integer exactly, whose upper half is its bf16
INT8_ASM = tl.constexpr("""{
.reg .b32 u, f0, f1, f2, f3, magic;
xor.b32 u, $2, 0x80808080;
mov.b32 magic, 0x4B000000;
prmt.b32 f0, u, magic, 0x7540;
prmt.b32 f1, u, magic, 0x7541;
prmt.b32 f2, u, magic, 0x7542;
prmt.b32 f3, u, magic, 0x7543;
sub.f32 f0, f0, 0f4B000080;
sub.f32 f1, f1, 0f4B000080;
sub.f32 f2, f2, 0f4B000080;
sub.f32 f3, f3, 0f4B000080;
prmt.b32 $0, f0, f1, 0x7632;
prmt.b32 $1, f2, f3, 0x7632;
}""")

# e4m3 -> bf16: herd's own conversion (kernels/expert_gemv.py)
FP8_ASM = expert_gemv._FP8_TO_BF16

# int4 (bytes: low nibble the even column, high the odd; 4 bytes per register) with a bf16 scale
# and offset per byte -> the even columns' and the odd columns' bf16 weights: a nibble q in the
# low bits of the bf16 128 is 128 + q (lop3), minus 128 is q, times scale plus offset (one fma)
INT4_ASM = tl.constexpr("""{
.reg .b32 t, t4, t8, t12, a, b, c, d, mask, magic, zero;
mov.b32 zero, 0;
mov.b32 mask, 0x000F000F;
mov.b32 magic, 0x43004300;
prmt.b32 t, $4, zero, 0x3120;
shr.b32 t4, t, 4;
shr.b32 t8, t, 8;
shr.b32 t12, t, 12;
lop3.b32 a, t, mask, magic, 0xEA;
lop3.b32 b, t8, mask, magic, 0xEA;
lop3.b32 c, t4, mask, magic, 0xEA;
lop3.b32 d, t12, mask, magic, 0xEA;
sub.rn.bf16x2 a, a, magic;
sub.rn.bf16x2 b, b, magic;
sub.rn.bf16x2 c, c, magic;
sub.rn.bf16x2 d, d, magic;
fma.rn.bf16x2 $0, a, $5, $7;
fma.rn.bf16x2 $1, b, $6, $8;
fma.rn.bf16x2 $2, c, $5, $7;
fma.rn.bf16x2 $3, d, $6, $8;
}""")


@triton.jit
def _load_weight(w_ptr, n, n_ok, start, K, FORMAT: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K) weights as stored (int4: the (BLOCK_N, BLOCK_K // 2) bytes)."""
    if FORMAT == 4:
        cols = start // 2 + tl.arange(0, BLOCK_K // 2)
        row = K // 2
    else:
        cols = start + tl.arange(0, BLOCK_K)
        row = K
    return tl.load(w_ptr + n.to(tl.int64)[:, None] * row + cols[None, :], mask=n_ok[:, None] & (cols < row)[None, :],
                   other=0.0, eviction_policy="evict_first")


@triton.jit
def _lab_kernel(x_ptr, w_ptr, scale_ptr, offset_ptr, out_ptr, rows, N, K, scale_ub,
                FORMAT: tl.constexpr, ASM: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, M: tl.constexpr):
    program = tl.program_id(0)
    n = program * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    m = tl.arange(0, M)
    m_ok = m < rows
    acc = tl.zeros((M, BLOCK_N), tl.float32)
    x_scale = tl.full((M,), 1.0, tl.float32)
    if FORMAT == 3:  # FBGEMM's activation rule: each row's amax (at most scale_ub) maps to 448
        amax = tl.zeros((M,), tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(xv.to(tl.float32)), axis=1))
        amax = tl.minimum(amax, scale_ub)
        x_scale = tl.maximum(amax / 448.0, 1.0 / (448.0 * 512.0))
    w_next = _load_weight(w_ptr, n, n_ok, 0, K, FORMAT, BLOCK_K)
    for start in range(0, K, BLOCK_K):
        if PREFETCH:
            w = w_next
            w_next = _load_weight(w_ptr, n, n_ok, start + BLOCK_K, K, FORMAT, BLOCK_K)
        else:
            w = _load_weight(w_ptr, n, n_ok, start, K, FORMAT, BLOCK_K)
        if FORMAT == 4:
            half = start // 2 + tl.arange(0, BLOCK_K // 2)
            x_even = tl.load(x_ptr + m[:, None] * K + 2 * half[None, :], mask=m_ok[:, None] & (2 * half < K)[None, :],
                             other=0.0, eviction_policy="evict_last")
            x_odd = tl.load(x_ptr + m[:, None] * K + 2 * half[None, :] + 1,
                            mask=m_ok[:, None] & (2 * half < K)[None, :], other=0.0, eviction_policy="evict_last")
            g = start // GROUP + tl.arange(0, BLOCK_K // GROUP)
            at = n.to(tl.int64)[:, None] * (K // GROUP) + g[None, :]
            mask = n_ok[:, None] & (g < K // GROUP)[None, :]
            s = tl.load(scale_ptr + at, mask=mask, other=0.0)  # (BLOCK_N, BLOCK_K // GROUP)
            o = tl.load(offset_ptr + at, mask=mask, other=0.0)
            s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_K // GROUP, GROUP // 2)), (BLOCK_N, BLOCK_K // 2))
            o = tl.reshape(tl.broadcast_to(o[:, :, None], (BLOCK_N, BLOCK_K // GROUP, GROUP // 2)), (BLOCK_N, BLOCK_K // 2))
            if ASM:
                low, high = tl.inline_asm_elementwise(INT4_ASM, "=r,=r,=r,=r,r,r,r,r,r", [w, s, o],
                                                      dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
            else:
                low = ((w & 0xF).to(tl.float32) * s.to(tl.float32) + o.to(tl.float32)).to(tl.bfloat16)
                high = ((w >> 4).to(tl.float32) * s.to(tl.float32) + o.to(tl.float32)).to(tl.bfloat16)
            acc += tl.dot(x_even, tl.trans(low))
            acc += tl.dot(x_odd, tl.trans(high))
        else:
            k = start + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0,
                         eviction_policy="evict_last")
            if FORMAT == 3:
                xq = tl.clamp(xv.to(tl.float32) / x_scale[:, None], -448.0, 448.0).to(tl.float8e4nv)
                acc += tl.dot(xq, tl.trans(w))
            else:
                if FORMAT == 0:
                    wb = w
                elif ASM and FORMAT == 1:
                    wb = tl.inline_asm_elementwise(INT8_ASM, "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4)
                elif ASM and FORMAT == 2:
                    wb = tl.inline_asm_elementwise(FP8_ASM, "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4)
                else:
                    wb = w.to(tl.bfloat16)
                acc += tl.dot(xv, tl.trans(wb))
    if FORMAT == 1 or FORMAT == 2 or FORMAT == 3:
        acc = acc * tl.load(scale_ptr + n, mask=n_ok, other=0.0)[None, :]
    if FORMAT == 3:
        acc = acc * x_scale[:, None]
    tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def lab_linear(x, data, scale, offset, out, fmt, asm, block_n, block_k, prefetch, warps, stages, group=128):
    rows, in_features = x.shape
    n = data.shape[0]
    _lab_kernel[(triton.cdiv(n, block_n),)](
        x, data, scale if scale is not None else x, offset if offset is not None else x, out, rows, n, in_features,
        1200.0, FORMAT=fmt, ASM=asm, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, PREFETCH=prefetch, M=16,
        num_warps=warps, num_stages=stages)
    return out


SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096), "o": (4096, 4096)}
VARIANTS = {"bf16": (BF16, 0), "int8": (INT8, 0), "int8-asm": (INT8, 1), "fp8": (FP8, 0), "fp8-asm": (FP8, 1),
            "fp8-act": (FP8_ACT, 0), "int4": (INT4, 0), "int4-asm": (INT4, 1)}
GRID = dict(block_n=(16, 32, 64), block_k=(256, 512), schedule=((1, 1), (0, 3)))  # (prefetch, stages)


def timed_chain(calls) -> float:
    """Microseconds per call of calls run back to back in one CUDA graph (each on its own copy of
    the weight, so none is served from L2): what a kernel costs inside a decode step, where the
    launches and the ramp-up of one overlap the tail of the one before (PDL)."""
    return timed(lambda: [call() for call in calls], repeats=50) / len(calls)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--warps", default="4")
    parser.add_argument("--chain", type=int, default=8, help="copies of the weight timed back to back")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    began = time.time()
    for name in args.shapes.split(","):
        out_features, in_features = SHAPES[name]
        copies = []
        for _ in range(args.chain):
            weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
            int8, int8_scale = quantize_int8_rows(weight)
            fp8, fp8_scale = quantize_fp8_rows(weight)
            int4, int4_scale, int4_offset = quantize_int4_groups(weight, 128, torch.bfloat16)
            tiles, scales_and_zeros = gemv.int4_tiles(int4, int4_scale, int4_offset)
            copies.append({BF16: (weight, None, None), INT8: (int8, int8_scale.view(-1), None),
                           FP8: (fp8, fp8_scale.view(-1), None), FP8_ACT: (fp8, fp8_scale.view(-1), None),
                           INT4: (int4, int4_scale, int4_offset), "tiles": (tiles, scales_and_zeros)})
        widths = {BF16: 2.0, INT8: 1.0, FP8: 1.0, FP8_ACT: 1.0, INT4: 0.5}
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
            out = x.new_empty(rows, out_features)
            elements = out_features * in_features
            baselines = {
                "bf16 herd gemv": (lambda c: lambda: gemv.linear(x, c[BF16][0]), 2.0),
                "int8 herd gemv": (lambda c: lambda: gemv.linear(x, gemv.QuantizedWeight(*c[INT8])), 1.0),
                "fp8 herd gemv": (lambda c: lambda: gemv.linear(x, gemv.QuantizedWeight(*c[FP8])), 1.0),
                "int4 tinygemm": (lambda c: lambda: torch._weight_int4pack_mm(x, c["tiles"][0], 128, c["tiles"][1]), 0.5),
            }
            for label, (make, width) in baselines.items():
                alone = timed(make(copies[0]), repeats=50)
                chained = timed_chain([make(c) for c in copies])
                print(f"{name} rows {rows} {label}: alone {alone:.1f} us ({elements * width / alone / 1e6:.2f} TB/s), "
                      f"chained {chained:.1f} us ({elements * width / chained / 1e6:.2f} TB/s)", flush=True)
            for variant in args.variants.split(","):
                fmt, asm = VARIANTS[variant]
                data, scale, offset = copies[0][fmt]
                width = widths[fmt]
                if fmt == FP8_ACT:
                    x_q, x_scale = gemv.fp8_activation_rows(x, 1200.0)
                    expected = (x_q.float() * x_scale) @ (data.float() * scale[:, None]).t()
                elif fmt == BF16:
                    expected = x.float() @ data.float().t()
                else:
                    expected = x.float() @ gemv.dequantize(gemv.QuantizedWeight(data, scale, offset), torch.bfloat16).float().t()
                results = []
                for block_n, block_k, (prefetch, stages) in itertools.product(*GRID.values()):
                    for warps in (int(w) for w in args.warps.split(",")):
                        def make(c, config=(block_n, block_k, prefetch, warps, stages)):
                            return lambda: lab_linear(x, *c[fmt], out, fmt, asm, *config)
                        config = (block_n, block_k, prefetch, stages, warps)
                        try:
                            make(copies[0])()
                            torch.cuda.synchronize()
                            error = (out.float() - expected).abs().max().item() / expected.abs().max().item()
                            if error > 0.02:
                                print(f"  {variant} {config}: WRONG (relative error {error:.3g})", flush=True)
                                continue
                            us = timed_chain([make(c) for c in copies])
                        except Exception as failure:  # noqa: BLE001 - a configuration that fails is reported
                            print(f"  {variant} {config}: failed {type(failure).__name__}: "
                                  f"{str(failure)[:300] if str(failure) else ''}", flush=True)
                            continue
                        results.append((us, config))
                best = sorted(results)[:4]
                print(f"{name} rows {rows} {variant} (chained): " + "; ".join(
                    f"{us:.1f} us ({elements * width / us / 1e6:.2f} TB/s) {c}" for us, c in best)
                    + f"  [{time.time() - began:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
