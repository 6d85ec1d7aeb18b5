"""Decode speed of one architecture in bf16 and in each quantized format, side by side in one process.

Random weights at the published widths, built quantized on the device (`herd bench --quantization`
one after another, the previous model freed first), so that the formats share the process, the
GPU's state and the bandwidth measurement.

    python bench/quantized.py llama3.1-8b --batch-sizes 1,64 --formats bf16,int8,int4,fp8

`fp8-scaled-mm`: FP8 with `_scaled_mm` at every row count past the few-row kernel's (the path before
kernels/fp8_matmul.py); `fp8-precise`: that kernel adding its FP8 sums to float32 every 32 input
columns (`fp8_matmul.PRECISE_COLUMNS`) instead of FBGEMM's sums over the whole input.
`int8-exact` / `int4-exact`: the few-row kernel converting each weight exactly instead of
multiplying it as a float in [1, 2) (`gemv.FRACTION_PRODUCTS`); `int4-kernel`: int4 through the
few-row kernel instead of torch's tinygemm (`gemv.INT4_TINYGEMM`).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from herd import bench  # noqa: E402
from herd.kernels import fp8_matmul, gemv  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    parser.add_argument("--formats", default="bf16,int8,int4,fp8")
    args = parser.parse_args()
    device = torch.device(args.device or "cuda")
    args.dtype = args.dtype or "bfloat16"
    args.new_tokens = args.new_tokens or 128
    bandwidth = bench.copy_bandwidth(device)
    max_rows, precise_columns = fp8_matmul.MAX_ROWS, fp8_matmul.PRECISE_COLUMNS
    for name in args.formats.split(","):
        args.quantization = None if name == "bf16" else name.split("-")[0]
        gemv.FRACTION_PRODUCTS = not name.endswith("-exact")
        gemv.INT4_TINYGEMM = not name.endswith("-kernel")
        fp8_matmul.MAX_ROWS = 0 if name.endswith("-scaled-mm") else max_rows
        fp8_matmul.PRECISE_COLUMNS = 32 if name.endswith("-precise") else precise_columns
        model = bench.build_model(args.model, getattr(torch, args.dtype), device, args.layers, args.quantization)
        print(bench.bench_model(args, model, bandwidth), flush=True)
        if device.type == "cuda":
            print(f"- peak memory {torch.cuda.max_memory_allocated(device) / 1e9:.1f} GB", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


if __name__ == "__main__":
    main()
