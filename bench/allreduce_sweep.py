"""Tensor parallel's all-reduce alone: µs per sum for each kind (parallel/symmetric.py), by size.

    torchrun --nproc-per-node 2 bench/allreduce_sweep.py --sizes 8192,65536,524288

Each kind (`nccl`, `oneshot`: torch's kernel over symmetric memory, `lamport`: herd's) sums a
bfloat16 tensor of each size (bytes) `--chain` times in a row inside one CUDA graph, as a decode
step's sums run; µs per sum on rank 0 (the same fixed number of replays on every rank: a
collective), and the same with the residual
add after each sum (fused into herd's kernel, a separate add for the others).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from herd.kernels import all_reduce  # noqa: E402
from herd.parallel import symmetric, tensor_parallel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="8192,65536,524288", help="bytes, comma-separated")
    parser.add_argument("--kinds", default="nccl,oneshot,lamport")
    parser.add_argument("--chain", type=int, default=64)
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--blocks", default=None, help="lamport: elements a program (and warps), e.g. 256:2,1024:4")
    args = parser.parse_args()
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=device)
    group = dist.group.WORLD
    if rank == 0:
        print(f"| kind | bytes | µs a sum | µs a sum + residual add |\n|---|---|---|---|", flush=True)
    kinds = args.kinds.split(",")
    if args.blocks:  # the lamport kernel's launch configurations, each a row
        kinds = [kind for kind in kinds if kind != "lamport"] + [f"lamport:{b}" for b in args.blocks.split(",")]
    for kind in kinds:
        if kind.startswith("lamport:"):
            block, warps = kind.split(":")[1:]
            all_reduce.BLOCK, all_reduce.WARPS = int(block), int(warps)
            kind = "lamport"
        label = kind if kind != "lamport" else f"lamport ({all_reduce.BLOCK} a program, {all_reduce.WARPS} warps)"
        os.environ[symmetric.ENV] = kind
        reason = symmetric.prepare(group, device, [torch.bfloat16])
        if kind != "nccl" and symmetric.kernel(group.group_name) != kind:
            if rank == 0:
                print(f"| {label} | - | not run: {reason} | |", flush=True)
            continue
        for size in map(int, args.sizes.split(",")):
            x = torch.randn(size // 2, device=device).to(torch.bfloat16) * 1e-3
            residual = torch.randn_like(x)
            times = []
            for with_residual in (False, True):
                def chain():
                    y = x
                    for _ in range(args.chain):
                        y = tensor_parallel.all_reduce(y, group.group_name, residual=residual if with_residual else None)
                    return y

                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    chain()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    chain()
                times.append(timed(graph, args.replays) / args.chain)
            if rank == 0:
                print(f"| {label} | {size:,} | {times[0]:.2f} | {times[1]:.2f} |", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def timed(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """µs a replay: every rank replays the same number of times (each replay is collective)."""
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / replays


if __name__ == "__main__":
    main()
