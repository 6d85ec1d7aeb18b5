"""The decode step's attention kernel (kernels/decode_attention.py) alone, at long context: µs and
the bandwidth it reaches per launch configuration (ranges, keys per loop step, warps, stages).

    python bench/attention_sweep.py --contexts 4096,32768,122880 --batch-sizes 1
    python bench/attention_sweep.py --contexts 32768,122880 --chain 32
    python bench/attention_sweep.py --contexts 32768 --chain 32 --chain-splits 48,64 --chain-launches 64:4:2,32:4:3

With --chain L: the plan's configuration over L layers' caches (each its own tensors, as in a
step), launched back to back in one CUDA graph, with and without programmatic dependent launch,
the range kernel itself programmatic or as `plan_programmatic` says, and with an
o-projection-sized few-row matmul after each (what follows attention in the step):
µs per layer, to compare with the kernel alone.

Llama-3.1-8B's attention shape by default (32 query heads, 8 kv heads, 128 dimensions, bf16). A
row per configuration; the plan's own choice (plan_splits, plan_block, 4 warps, 2 stages) is
marked. Bytes = the keys and values read (every slot of the cache) and the bool visibility row.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from herd.kernels import decode_attention  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", default="4096,32768,122880")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--splits", default="16,32,64,128,256,512")
    parser.add_argument("--blocks", default="64,128")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2,3,4")
    parser.add_argument("--chain", type=int, default=0, help="layers' caches timed back to back in one graph")
    parser.add_argument("--chain-splits", default="", help="with --chain: these range counts (comma-separated) "
                        "instead of the plan's, each with PDL as plan_programmatic says and without")
    parser.add_argument("--chain-launches", default="", help="with --chain: keys per loop step, warps and stages as "
                        "block:warps:stages (comma-separated) instead of the plan's; only the planned launch, "
                        "with the o matmul after each layer")
    args = parser.parse_args()
    if args.chain:
        launches = [tuple(int(v) for v in item.split(":")) for item in args.chain_launches.split(",") if item]
        for batch, context in itertools.product(map(int, args.batch_sizes.split(",")), map(int, args.contexts.split(","))):
            for splits in [int(n) for n in args.chain_splits.split(",") if n] or [None]:
                if launches:
                    for block, warps, stages in launches:
                        chained(batch, context, args.chain, args.heads, args.kv_heads, args.head_dim, splits,
                                launch=dict(block=block, num_warps=warps, num_stages=stages))
                else:
                    chained(batch, context, args.chain, args.heads, args.kv_heads, args.head_dim, splits)
        return
    import triton.testing

    device = torch.device("cuda")
    dim, heads, kv_heads = args.head_dim, args.heads, args.kv_heads
    print(f"| batch | context | splits | block | warps | stages | µs | GB/s | plan's |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, context in itertools.product(map(int, args.batch_sizes.split(",")), map(int, args.contexts.split(","))):
        keys = torch.randn(batch, kv_heads, context, dim, device=device, dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        query = torch.randn(batch, heads * dim, device=device, dtype=torch.bfloat16)
        allowed = torch.ones(batch, context, dtype=torch.bool, device=device)
        new_slot = torch.tensor([context - 1], device=device)
        scaling = dim ** -0.5
        nbytes = 2 * keys.numel() * keys.element_size() + allowed.numel()
        reference = decode_attention.launch(query, keys, values, allowed, new_slot, scaling)
        plan = (decode_attention.plan_splits(batch, kv_heads, context, decode_attention.plan_block(dim)),
                decode_attention.plan_block(dim), 4, 2)
        results = []
        for splits, block, warps, stages in itertools.product(*(map(int, getattr(args, name).split(","))
                                                               for name in ("splits", "blocks", "warps", "stages"))):
            if splits * block > context:
                continue
            def run():
                return decode_attention.launch(query, keys, values, allowed, new_slot, scaling, splits=splits,
                                               block=block, num_warps=warps, num_stages=stages, pdl=False)
            try:
                out = run()
                torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)
                microseconds = 1000 * triton.testing.do_bench(run, warmup=20, rep=100)
            except Exception as error:  # a configuration that does not compile (shared memory) is reported
                print(f"| {batch} | {context} | {splits} | {block} | {warps} | {stages} | failed: {type(error).__name__} | | |")
                continue
            results.append((microseconds, splits, block, warps, stages))
            marker = "plan" if (splits, block, warps, stages) == plan else ""
            print(f"| {batch} | {context} | {splits} | {block} | {warps} | {stages} | {microseconds:.1f} | "
                  f"{nbytes / microseconds / 1e3:.0f} | {marker} |", flush=True)
        best = min(results)
        print(f"best at batch {batch}, context {context}: splits {best[1]}, block {best[2]}, warps {best[3]}, "
              f"stages {best[4]}: {best[0]:.1f} µs ({nbytes / best[0] / 1e3:.0f} GB/s)", flush=True)


def chained(batch: int, context: int, layers: int, heads: int, kv_heads: int, dim: int, splits: int | None = None,
            launch: dict | None = None) -> None:
    """µs per layer of the plan's attention (or `splits` ranges) over `layers` separate caches in one graph.
    `launch`: block, num_warps and num_stages for decode_attention.launch; then only the planned
    launch with the o matmul after each layer is timed."""
    import triton.testing

    from herd.kernels import gemv

    device = torch.device("cuda")
    caches = [(torch.randn(batch, kv_heads, context, dim, device=device, dtype=torch.bfloat16),
               torch.randn(batch, kv_heads, context, dim, device=device, dtype=torch.bfloat16)) for _ in range(layers)]
    projections = [torch.randn(heads * dim, heads * dim, device=device, dtype=torch.bfloat16) * 0.02
                   for _ in range(layers)]
    query = torch.randn(batch, heads * dim, device=device, dtype=torch.bfloat16)
    allowed = torch.ones(batch, context, dtype=torch.bool, device=device)
    new_slot = torch.tensor([context - 1], device=device)
    nbytes = 2 * caches[0][0].numel() * 2

    def step(pdl: bool, programmatic: bool | None, with_matmul: bool):
        x = query
        for layer in range(layers):
            keys, values = caches[layer]
            x = decode_attention.launch(x, keys, values, allowed, new_slot, dim ** -0.5, pdl=pdl,
                                        programmatic=programmatic, splits=splits, **(launch or {}))
            if with_matmul:
                x = gemv.launch(x, projections[layer], torch.empty_like(x), pdl=pdl) if batch == 1 \
                    else x @ projections[layer].t()
        return x

    # PDL everywhere; the plan's (the range kernel an ordinary launch for large grids); no PDL
    variants = itertools.product(((True, True), (True, None), (False, False)), (False, True))
    if launch:
        variants = [((True, None), True)]
    for (pdl, programmatic), with_matmul in variants:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            step(pdl, programmatic, with_matmul)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(pdl, programmatic, with_matmul)
        microseconds = triton.testing.do_bench(graph.replay, warmup=5, rep=200, return_mode="median") * 1000 / layers
        print(f"batch {batch}, context {context}, {splits or 'plan'} ranges, launch {launch or 'plan'}, {layers} layers chained, pdl {pdl}, range kernel programmatic "
              f"{'as planned' if programmatic is None else programmatic}, "
              f"o matmul after each {with_matmul}: {microseconds:.1f} µs a layer "
              f"(attention bytes at {nbytes / microseconds / 1e3:.0f} GB/s)", flush=True)


if __name__ == "__main__":
    main()
