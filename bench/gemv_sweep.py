"""Measure kernels/gemv.py's kernel at the Llama widths over a grid of configurations (CUDA).

    python bench/gemv_sweep.py [--archs llama3.2-1b,llama3.1-8b] [--rows 1] [--top 5] [--tp 2]

For each projection (q/k/v with the norm, gate/up with the norm and SwiGLU, o and down with the
residual, the head) it times every configuration (rows of the weight per program, columns per
step, the first read's width, warps) the way a decode step meets it: one launch per layer over as many distinct
weight copies as the model has layers, captured in a CUDA graph, so the weights come from HBM
and not from L2. Prints GB/s per configuration (best first) and the one `_config` picks today.
`--tp N`: the shapes one rank of tensor parallel N holds (q/k/v and gate/up split by their
outputs, o and down by their inputs, the head by vocabulary), where small matrices make each
launch's fixed cost count more.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from herd.kernels import gemv  # noqa: E402

ARCHS = {  # hidden, intermediate, heads, kv heads, head dim, vocab, layers
    "llama3.2-1b": (2048, 8192, 32, 8, 64, 128256, 16),
    "llama3.1-8b": (4096, 14336, 32, 8, 128, 128256, 32),
    "llama4-scout": (5120, 8192, 40, 8, 128, 202048, 8),
}
BLOCK_N = [1, 2, 4]
BLOCK_K = [512, 1024, 2048]
FIRST_K = [None, 2048, 4096, 8192]  # None: the first read is one loop step
WARPS = [4, 8]


def candidate_configs(in_features: int) -> list[gemv.GemvConfig]:
    """Every combination, less those that read the same columns the same way."""
    widest = 1 << (in_features - 1).bit_length()
    configs = set()
    for block_n, block_k, first_k, warps in itertools.product(BLOCK_N, BLOCK_K, FIRST_K, WARPS):
        block_k = min(block_k, widest)
        first_k = None if first_k is None or min(first_k, widest) <= block_k else min(first_k, widest)
        configs.add(gemv.GemvConfig(block_n, block_k, warps, 1, first_k))
    return sorted(configs, key=lambda c: (c.block_n, c.block_k, c.first_k or 0, c.warps))


def projections(arch: str, tp: int = 1):
    """(name, out features, in features, mode, layers) of one rank of tensor parallel `tp`: mode
    says what the kernel fuses."""
    hidden, inter, heads, kv_heads, dim, vocab, layers = ARCHS[arch]
    yield "qkv", (heads + 2 * kv_heads) * dim // tp, hidden, "norm", layers
    yield "o", hidden, heads * dim // tp, "residual", layers
    yield "gate_up", inter // tp, hidden, "gated", layers
    yield "down", hidden, inter // tp, "residual", layers
    yield "head", -(-vocab // tp), hidden, "head", 1


def launch_arguments(mode: str, rows: int, out_features: int, in_features: int, copies: int, dtype=torch.bfloat16):
    """Weights (distinct copies, so that they come from HBM), outputs and keyword arguments for gemv.launch."""
    weight_rows = out_features * (2 if mode == "gated" else 1)
    weights = [torch.randn(weight_rows, in_features, device="cuda", dtype=dtype) * 0.02 for _ in range(copies)]
    outs = [torch.empty(rows, out_features, device="cuda", dtype=torch.float32 if mode == "head" else dtype)
            for _ in range(copies)]
    x = torch.randn(rows, in_features, device="cuda", dtype=dtype)
    kwargs = {"gated": mode == "gated"}
    if mode in ("norm", "gated", "head"):
        kwargs.update(norm_weight=torch.randn(in_features, device="cuda", dtype=dtype), eps=1e-5)
    if mode == "residual":
        kwargs["residual"] = torch.randn(rows, out_features, device="cuda", dtype=dtype)
    return x, weights, outs, kwargs, weight_rows * in_features * 2


def time_config(x, weights, outs, kwargs, config, reps=20) -> float:
    """Microseconds per launch, one launch per weight copy, replayed from a CUDA graph."""
    def step():
        for weight, out in zip(weights, outs):
            gemv.launch(x, weight, out, config=config, **kwargs)

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
    return start.elapsed_time(end) / reps / len(weights) * 1e3


def sweep(label: str, mode: str, rows: int, out_features: int, in_features: int, copies: int, configs, top: int):
    x, weights, outs, kwargs, nbytes = launch_arguments(mode, rows, out_features, in_features, copies)
    results = []
    for config in configs:
        try:
            results.append((time_config(x, weights, outs, kwargs, config), config))
        except Exception as error:  # a configuration the compiler refuses (registers, shared memory)
            print(f"  {config}: {type(error).__name__}")
    results.sort()
    chosen = gemv.GemvConfig(*gemv._config(out_features, in_features, mode == "gated"))
    chosen_us = next((us for us, config in results if config == chosen), float("nan"))
    print(f"{label} ({mode}, {out_features}x{in_features}, {nbytes / 1e6:.1f} MB, rows {rows}): "
          f"default {chosen} {chosen_us:.1f} us = {nbytes / chosen_us / 1e3:.0f} GB/s", flush=True)
    for us, config in results[:top]:
        print(f"    {config}: {us:.1f} us = {nbytes / us / 1e3:.0f} GB/s")
    del weights, outs
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", default="llama3.2-1b,llama3.1-8b")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--only", default="", help="comma-separated projections (qkv,o,gate_up,down,head)")
    parser.add_argument("--tp", type=int, default=1, help="the shapes of one rank of this tensor-parallel size")
    args = parser.parse_args()
    torch.manual_seed(0)
    for arch in args.archs.split(","):
        for name, out_features, in_features, mode, layers in projections(arch, args.tp):
            if args.only and name not in args.only.split(","):
                continue
            copies = min(64, max(layers, -(-400_000_000 // (out_features * in_features * 2))))  # over 50 MB of L2
            sweep(f"{arch}{f' tp {args.tp}' if args.tp > 1 else ''} {name}", mode, args.rows, out_features, in_features, copies,
                  candidate_configs(in_features), args.top)


if __name__ == "__main__":
    main()
