"""The paged attention kernel (kernels/paged_attention.py) at a server's decode step: bf16 against
FP8 pools, launch configurations, and the decode attention kernel over one long cache.

    python bench/paged_attention_sweep.py
    python bench/paged_attention_sweep.py --rows 64 --positions 2048 --configs "64,4,2;128,4,2"

Pools as the 8B's (8 kv heads, 32 query heads, head_dim 128), each of `--rows` rows at
`--positions` positions in blocks of 16 scattered over the pool, one range per (row, kv head) as
the server plans it at these rows. µs per launch with 8 launches (8 queries, one pool larger than
L2) replayed back to back from one CUDA graph, and the TB/s of the keys and values read (with FP8:
the bytes and their float32 scales). `--configs`: (block, warps, stages) tried for each format
beside the launch's own; `--long`: caches of one row (generate()'s FP8 cache), the launch's plan.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import triton  # noqa: E402
from few_row_chain import timed_chain as graph_time  # noqa: E402  (µs per call, replayed from one graph)

from herd.cache import fp8_quantize  # noqa: E402
from herd.kernels import decode_attention, paged_attention  # noqa: E402

KV_HEADS, HEADS, DIM, BLOCK_SIZE = 8, 32, 128, 16


def pools(rows: int, positions: int):
    """bf16 and FP8 pools of rows x positions in scattered blocks, their table and lengths."""
    per_row = positions // BLOCK_SIZE
    blocks = rows * per_row + 1  # block 0 stays free, as the server keeps it
    table = (torch.randperm(blocks - 1, device="cuda")[: rows * per_row] + 1).view(rows, per_row).to(torch.int32)
    keys = torch.randn(1, KV_HEADS, blocks * BLOCK_SIZE, DIM, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    (fp8_keys, key_scales), (fp8_values, value_scales) = fp8_quantize(keys), fp8_quantize(values)
    lengths = torch.full((rows,), per_row * BLOCK_SIZE, device="cuda", dtype=torch.long)
    first = torch.zeros_like(lengths)
    return {"bf16": (keys, values, None, None),
            "fp8": (fp8_keys, fp8_values, key_scales[..., 0].contiguous(), value_scales[..., 0].contiguous())}, \
        table, first, lengths


def launch_with(config, query, keys, values, key_scales, value_scales, table, first, lengths):
    """The range kernel alone with (block, warps, stages), one range per (row, kv head)."""
    block, warps, stages = config
    out = torch.empty_like(query)
    fp8 = key_scales is not None
    paged_attention._paged_range_kernel[(query.shape[0] * KV_HEADS, 1)](
        query, keys, values, key_scales if fp8 else keys, value_scales if fp8 else values, table, first, lengths,
        out, out, out, out, KV_HEADS, keys.shape[2], table.shape[1], BLOCK_SIZE, DIM**-0.5,
        GROUP=HEADS // KV_HEADS, GROUP_PAD=16, DIM=DIM, SPLITS=1, BLOCK=block, PRECISION="tf32", FP8=fp8,
        SCALED=fp8, num_warps=warps, num_stages=stages)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--positions", type=int, default=576, help="positions a row (a multiple of 16)")
    parser.add_argument("--configs", default="64,4,2;128,4,2;64,8,2;64,4,3")
    parser.add_argument("--long", default="32768,122880", help="one-row caches for decode_attention ('' to skip)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; {args.rows} rows x "
          f"{args.positions} positions, {KV_HEADS} kv heads, {HEADS} heads, head_dim {DIM}", flush=True)
    formats, table, first, lengths = pools(args.rows, args.positions)
    queries = [torch.randn(args.rows, HEADS * DIM, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
    elements = args.rows * args.positions * KV_HEADS * 2  # keys and values
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";") if c]
    for name, (keys, values, key_scales, value_scales) in formats.items():
        read = elements * (DIM * (2 if key_scales is None else 1) + (0 if key_scales is None else 4))
        planned = graph_time([lambda q=q: paged_attention.launch(q, keys, values, table, first, lengths, BLOCK_SIZE,
                                                                 DIM**-0.5, key_scales=key_scales,
                                                                 value_scales=value_scales) for q in queries])
        print(f"{name} the launch's plan: {planned:.1f} us ({read / planned / 1e6:.2f} TB/s)", flush=True)
        for config in configs:
            us = graph_time([lambda q=q: launch_with(config, q, keys, values, key_scales, value_scales, table, first,
                                                     lengths) for q in queries])
            print(f"{name} block, warps, stages {config}: {us:.1f} us ({read / us / 1e6:.2f} TB/s)", flush=True)
    del formats
    for slots in [int(s) for s in args.long.split(",") if s]:
        query = torch.randn(1, HEADS * DIM, device="cuda", dtype=torch.bfloat16)
        keys = torch.randn(1, KV_HEADS, slots, DIM, device="cuda", dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        (fp8_keys, key_scales), (fp8_values, value_scales) = fp8_quantize(keys), fp8_quantize(values)
        allowed = torch.ones(1, slots, device="cuda", dtype=torch.bool)
        new_slot = torch.zeros(1, device="cuda", dtype=torch.long)
        for name, cache in (("bf16", (keys, values, None, None)),
                            ("fp8", (fp8_keys, fp8_values, key_scales[..., 0], value_scales[..., 0]))):
            us = graph_time([lambda c=cache: decode_attention.launch(query, c[0], c[1], allowed, new_slot, DIM**-0.5,
                                                                     key_scales=c[2], value_scales=c[3])] * 8)
            print(f"decode_attention one row x {slots} slots, {name}: {us:.1f} us", flush=True)
        del keys, values, fp8_keys, fp8_values


if __name__ == "__main__":
    main()
