"""Measure layers/gemv.py's kernel at the Llama widths over a grid of configurations (CUDA).

    python bench/gemv_sweep.py [--archs llama3.2-1b,llama3.1-8b] [--rows 1] [--top 5]

For each projection (q/k/v with the norm, gate/up with the norm and SwiGLU, o and down with the
residual, the head) it times every configuration (rows of the weight per program, columns per
step, warps, stages) the way a decode step meets it: one launch per layer over as many distinct
weight copies as the model has layers, captured in a CUDA graph, so the weights come from HBM
and not from L2. Prints GB/s per configuration (best first) and the one `_config` picks today.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from herd.layers import gemv  # noqa: E402

ARCHS = {  # hidden, intermediate, heads, kv heads, head dim, vocab, layers
    "llama3.2-1b": (2048, 8192, 32, 8, 64, 128256, 16),
    "llama3.1-8b": (4096, 14336, 32, 8, 128, 128256, 32),
    "llama4-scout": (5120, 8192, 40, 8, 128, 202048, 8),
}
TILES = [(1, 1024), (1, 2048), (1, 4096), (2, 1024), (2, 2048), (2, 4096), (4, 512), (4, 1024), (4, 2048), (8, 512)]
WARPS = [4, 8, 16]
STAGES = [1]


def projections(arch: str):
    hidden, inter, heads, kv_heads, dim, vocab, layers = ARCHS[arch]
    yield "qkv", (heads + 2 * kv_heads) * dim, hidden, "norm", layers
    yield "o", hidden, heads * dim, "residual", layers
    yield "gate_up", inter, hidden, "gated", layers
    yield "down", hidden, inter, "residual", layers
    yield "head", vocab, hidden, "head", 1


def time_config(x, weights, outs, norm_weight, residual, mode, config, reps=20) -> float:
    def step():
        for weight, out in zip(weights, outs):
            gemv.launch(x, weight, out, norm_weight=norm_weight if mode in ("norm", "gated") else None, eps=1e-5,
                        residual=residual if mode == "residual" else None, gated=mode == "gated", config=config)

    step()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / len(weights) * 1e3  # us per launch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", default="llama3.2-1b,llama3.1-8b")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--top", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16
    for arch in args.archs.split(","):
        for name, out_features, in_features, mode, layers in projections(arch):
            copies = max(layers, -(-400_000_000 // (out_features * in_features * 2)))  # over 50 MB of L2
            copies = min(copies, 64)
            weight_rows = out_features * (2 if mode == "gated" else 1)
            weights = [torch.randn(weight_rows, in_features, device="cuda", dtype=dtype) * 0.02 for _ in range(copies)]
            out_dtype = torch.float32 if mode == "head" else dtype
            outs = [torch.empty(args.rows, out_features, device="cuda", dtype=out_dtype) for _ in range(copies)]
            x = torch.randn(args.rows, in_features, device="cuda", dtype=dtype)
            norm_weight = torch.randn(in_features, device="cuda", dtype=dtype)
            residual = torch.randn(args.rows, out_features, device="cuda", dtype=dtype)
            kind = "gated" if mode == "gated" else ("norm" if mode in ("norm", "head") else "residual")
            nbytes = weight_rows * in_features * 2
            results = []
            for (block_n, block_k), warps, stages in itertools.product(TILES, WARPS, STAGES):
                config = (block_n, block_k, warps, stages)
                try:
                    us = time_config(x, weights, outs, norm_weight, residual, kind, config)
                except Exception as error:  # a configuration the compiler refuses (registers, shared memory)
                    print(f"  {config}: {type(error).__name__}")
                    continue
                results.append((us, config))
            results.sort()
            chosen = gemv._config(out_features, in_features, mode == "gated")
            chosen_us = next((us for us, config in results if config == chosen), float("nan"))
            print(f"{arch} {name} ({weight_rows}x{in_features}, {nbytes / 1e6:.1f} MB, rows {args.rows}): "
                  f"default {chosen} {chosen_us:.1f} us = {nbytes / chosen_us / 1e3:.0f} GB/s")
            for us, config in results[: args.top]:
                print(f"    {config}: {us:.1f} us = {nbytes / us / 1e3:.0f} GB/s")
            del weights, outs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
