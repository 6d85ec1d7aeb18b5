"""Causal attention of one long prefill through each of torch's sdpa backends (flash, cuDNN,
memory-efficient): ms and TFLOP/s, and each output's largest difference from the first's.

    python bench/sdpa_backends.py --lengths 16384,32768

Queries (1, heads, L, dim) over kv_heads keys/values (Llama-3.1-8B's 32 over 8, 128 dimensions,
bf16), is_causal; grouped-query heads as sdpa's enable_gqa, or the keys/values repeated per query
head ("expanded") for backends that refuse enable_gqa. FLOPs counted: 4 * heads * dim * L^2 / 2.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CASES = (("flash", SDPBackend.FLASH_ATTENTION, True), ("cudnn", SDPBackend.CUDNN_ATTENTION, True),
         ("cudnn expanded", SDPBackend.CUDNN_ATTENTION, False),
         ("memory-efficient expanded", SDPBackend.EFFICIENT_ATTENTION, False))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| L | backend | ms | TFLOP/s | max difference |")
    print("|---|---|---|---|---|")
    for length in (int(value) for value in args.lengths.split(",")):
        shape = (1, args.heads, length, args.head_dim)
        query = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        key, value = (torch.randn(1, args.kv_heads, length, args.head_dim, device="cuda", dtype=torch.bfloat16)
                      for _ in range(2))
        groups = args.heads // args.kv_heads
        expanded = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        flops = 4 * args.heads * args.head_dim * length * length / 2
        first = None
        for name, backend, grouped in CASES:
            keys, values = (key, value) if grouped else expanded

            def run():
                return F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=grouped)

            try:
                with sdpa_kernel([backend]):
                    output = run()
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(args.repeats):
                        run()
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - start) / args.repeats
            except RuntimeError as error:  # a backend that refuses these inputs
                print(f"| {length} | {name} | refused: {str(error)[:80]} | | |")
                continue
            first = output if first is None else first
            difference = (output.float() - first.float()).abs().max().item()
            print(f"| {length} | {name} | {1000 * seconds:.1f} | {flops / seconds / 1e12:.0f} | {difference:.3g} |",
                  flush=True)


if __name__ == "__main__":
    main()
