"""The few-row kernel (kernels/gemv.py) at one row, as a decode step runs it: copies of each of a
model's four projections launched back to back in one CUDA graph (norm fused into q/k/v and
gate/up, SwiGLU into gate/up, the residual add into o and down), µs per launch and the weight
bytes' TB/s. Timed this way a kernel pays its launch and its last wave, as inside a step; one
launch per graph of one weight reads it from L2 after the first replay and misleads.

    python bench/few_row_chain.py --model 8b --formats bf16,int8,fp8,int4,int4-tinygemm
    python bench/few_row_chain.py --model scout --formats fp8 --configs "4,1024,4,1,4096;4,4096,4,1,4096"
    python bench/few_row_chain.py --formats int8 --int8-conversion i2f

`int8-exact` / `int4-exact`: the kernel converting each weight exactly instead of multiplying it
as a float in [1, 2) (`gemv.FRACTION_PRODUCTS`).
`--configs`: GemvConfig fields (block_n, block_k, warps, stages, first_k) tried beside the plan's.
`int4-tinygemm`: torch's `_weight_int4pack_mm` on the same shapes (no norm, activation or
residual), the path herd takes for int4 on CUDA. `--int8-conversion`: how int8 weights become
floats inside the kernel: `magic` (herd's: the byte in the mantissa of 2**23), `i2f` (Triton's
conversion instruction), `prmt` (the byte permute in inline assembly, four weights a word).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from herd.kernels import gemv  # noqa: E402
from herd.quantization.formats import quantize_fp8_rows, quantize_int4_groups, quantize_int8_rows  # noqa: E402

# (name, out features, in features, gated, residual)
SHAPES = {"8b": [("qkv", 6144, 4096, False, False), ("o", 4096, 4096, False, True),
                 ("gate_up", 14336, 4096, True, False), ("down", 4096, 14336, False, True)],
          "scout": [("qkv", 7168, 5120, False, False), ("o", 5120, 5120, False, True),
                    ("gate_up", 8192, 5120, True, False), ("down", 5120, 8192, False, True)]}

BYTE_PERMUTE = tl.constexpr("""{
.reg .b32 u, magic;
xor.b32 u, $4, 0x80808080;
mov.b32 magic, 0x4B000000;
prmt.b32 $0, u, magic, 0x7440;
prmt.b32 $1, u, magic, 0x7441;
prmt.b32 $2, u, magic, 0x7442;
prmt.b32 $3, u, magic, 0x7443;
}""")


HERDS_AS_FLOAT = gemv._as_float  # other formats than int8 keep herd's conversion


@triton.jit
def _as_float_permuted(w):
    if w.dtype == tl.int8:  # 0x4B0000 and the byte of w + 128: the float 2**23 + w + 128
        f = tl.inline_asm_elementwise(BYTE_PERMUTE, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True,
                                      pack=4) - 8388736.0
    else:
        f = HERDS_AS_FLOAT(w)
    return f


@triton.jit
def _as_float_converted(w):
    if w.dtype == tl.int8:
        f = w.to(tl.float32)
    else:
        f = HERDS_AS_FLOAT(w)
    return f


def timed_chain(calls) -> float:
    """Median µs per call of calls replayed back to back from one CUDA graph."""
    import triton.testing

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):
            for call in calls:
                call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=200, return_mode="median") * 1000 / len(calls)


def _weight(weight: torch.Tensor, fmt: str):
    fmt = fmt.removesuffix("-exact")
    if fmt == "bf16":
        return weight
    if fmt in ("int4", "int4-tinygemm"):
        data, scale, offset = quantize_int4_groups(weight, 128, torch.bfloat16)
        return gemv.int4_tiles(data, scale, offset) if fmt == "int4-tinygemm" else gemv.QuantizedWeight(data, scale, offset)
    data, scale = (quantize_int8_rows if fmt == "int8" else quantize_fp8_rows)(weight)
    return gemv.QuantizedWeight(data, scale.view(-1))


def _reference(x, norm, weight, residual, gated, normed):
    """What the launch computes, in torch (the dequantized weight)."""
    if normed:
        x = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=1e-5).to(x.dtype)
    y = gemv.torch_linear(x, weight)
    if gated:
        gate, up = y.float().chunk(2, dim=-1)
        return torch.nn.functional.silu(gate.to(x.dtype).float()) * up
    return y.float() + residual.float() if residual is not None else y.float()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--formats", default="bf16,int8,fp8")
    parser.add_argument("--configs", default="", help="semicolon-separated block_n,block_k,warps,stages,first_k")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--int8-conversion", default="magic", choices=("magic", "i2f", "prmt"))
    args = parser.parse_args()
    if args.int8_conversion != "magic":  # before the kernel's first compilation in this process
        gemv._as_float = _as_float_converted if args.int8_conversion == "i2f" else _as_float_permuted
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}, "
          f"int8 conversion {args.int8_conversion}", flush=True)
    configs = [None] + [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";") if c]
    layer = {}
    for fmt in args.formats.split(","):
        gemv.FRACTION_PRODUCTS = not fmt.endswith("-exact")  # read at launch: each graph keeps its own
        for name, out_features, in_features, gated, has_residual in SHAPES[args.model]:
            weights = [_weight(torch.randn(out_features * (2 if gated else 1), in_features, device="cuda",
                                           dtype=torch.bfloat16) * 0.02, fmt) for _ in range(args.copies)]
            x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
            if fmt == "int4-tinygemm":
                us = timed_chain([lambda w=w: torch._weight_int4pack_mm(x, w[0], 128, w[1]) for w in weights])
                layer[fmt] = layer.get(fmt, 0.0) + us
                print(f"{fmt} {name}: {us:.1f} us (no norm, activation or residual)", flush=True)
                continue
            norm = torch.ones(in_features, device="cuda", dtype=torch.bfloat16)
            residual = torch.randn(1, out_features, device="cuda", dtype=torch.bfloat16) if has_residual else None
            out = x.new_empty(1, out_features)
            nbytes = weights[0].numel() * 2 if fmt == "bf16" else weights[0].data.numel()  # int4: 2 a byte
            expected = _reference(x, norm, weights[0], residual, gated, normed=not has_residual)
            for config in configs:
                options = dict(norm_weight=None if has_residual else norm, eps=0.0 if has_residual else 1e-5,
                               residual=residual, gated=gated, config=config)
                error = (gemv.launch(x, weights[0], out, **options).float() - expected).abs().max().item()
                us = timed_chain([lambda w=w: gemv.launch(x, w, out, **options) for w in weights])
                if config is None:
                    layer[fmt] = layer.get(fmt, 0.0) + us
                print(f"{fmt} {name} config {config or 'plan'}: {us:.1f} us ({nbytes / us / 1e6:.2f} TB/s), "
                      f"largest difference from torch {error:.3g}", flush=True)
            del weights
            torch.cuda.empty_cache()
    print("µs a layer (the four projections, the plan's configurations): "
          + ", ".join(f"{fmt} {us:.1f}" for fmt, us in layer.items()), flush=True)


if __name__ == "__main__":
    main()
