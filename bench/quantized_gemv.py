"""One decode matmul (batch 1 to 4) with quantized weights: herd's kernels against torch's own.

For Llama-3.1-8B's projection shapes, each format's time per matmul and the weight bytes it reads
per second, side by side in one process:

- bf16:  herd's gemv kernel, torch's linear (cuBLAS)
- int8:  herd's gemv (dequantized in its loop), gpt-fast's int8 (the weight cast and scaled under
         torch.compile), torch's `_weight_int8pack_mm` where it runs on CUDA
- int4:  herd's gemv (group 128), torch's `_weight_int4pack_mm` (tinygemm, what gpt-fast and
         torchao's int4 weight-only run on CUDA)
- fp8:   herd's gemv (weight-only), torch's `_scaled_mm` with per-token activation scales

    python bench/quantized_gemv.py [--rows 1,4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from herd.kernels import gemv  # noqa: E402
from herd.quantization.formats import (quantize_activation_rows, quantize_fp8_rows, quantize_int4_groups,  # noqa: E402
                                       quantize_int8_rows)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def timed(fn, repeats: int = 200) -> float:
    """Median microseconds of fn, replayed from a CUDA graph (launch gaps out of the number)."""
    import triton.testing

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=repeats, return_mode="median") * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,4")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    print("| shape | rows | variant | us | weight GB/s |")
    print("|---|---|---|---|---|")
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) * 0.02
        int8, int8_scale = quantize_int8_rows(weight)
        fp8, fp8_scale = quantize_fp8_rows(weight)
        int4, int4_scale, int4_offset = quantize_int4_groups(weight, 128, torch.bfloat16)
        tiles, scales_and_zeros = gemv.int4_tiles(int4, int4_scale, int4_offset)
        int8_bf16_scale = int8_scale.view(-1).to(torch.bfloat16)
        gpt_fast_int8 = torch.compile(lambda x: torch.nn.functional.linear(x, int8.to(x.dtype)) * int8_bf16_scale)
        elements = out_features * in_features
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
            variants = {
                ("bf16", "herd gemv"): (lambda: gemv.linear(x, weight), 2.0),
                ("bf16", "torch linear"): (lambda: torch.nn.functional.linear(x, weight), 2.0),
                ("int8", "herd gemv"): (lambda: gemv.linear(x, gemv.QuantizedWeight(int8, int8_scale.view(-1))), 1.0),
                ("int8", "gpt-fast (compiled cast)"): (lambda: gpt_fast_int8(x), 1.0),
                ("int4 g128", "herd gemv"): (lambda: gemv.linear(x, gemv.QuantizedWeight(int4, int4_scale, int4_offset)), 0.5),
                ("int4 g128", "torch tinygemm"): (lambda: torch._weight_int4pack_mm(x, tiles, 128, scales_and_zeros), 0.5),
                ("fp8", "herd gemv"): (lambda: gemv.linear(x, gemv.QuantizedWeight(fp8, fp8_scale.view(-1))), 1.0),
            }

            def scaled_mm():
                x_q, x_scale = quantize_activation_rows(x, 1200.0)
                return torch._scaled_mm(x_q, fp8.t(), scale_a=x_scale, scale_b=fp8_scale.t(), out_dtype=torch.bfloat16)

            variants[("fp8", "torch _scaled_mm + act quant")] = (scaled_mm, 1.0)
            for (fmt, variant), (fn, bytes_per_weight) in variants.items():
                try:
                    us = timed(fn)
                except Exception as error:  # noqa: BLE001 - a variant that does not run is a row that says so
                    print(f"| {name} {out_features}x{in_features} | {rows} | {fmt}: {variant} | failed: "
                          f"{type(error).__name__}: {str(error).splitlines()[0][:80]} | |")
                    continue
                print(f"| {name} {out_features}x{in_features} | {rows} | {fmt}: {variant} | {us:.1f} | "
                      f"{elements * bytes_per_weight / us / 1e3:.0f} |")


if __name__ == "__main__":
    main()
