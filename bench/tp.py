"""Decode speed under tensor parallel: one process per GPU, started by torchrun.

    torchrun --nproc-per-node 2 bench/tp.py llama3.1-8b --batch-sizes 1,64 --tp-sizes 1,2
    torchrun --nproc-per-node 2 bench/tp.py llama3.1-8b --batch-sizes 1,64 --allreduce all
    torchrun --nproc-per-node 2 bench/tp.py llama4-scout-slice --layers 48 --batch-sizes 1,4 --tp-sizes 2
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 bench/tp.py ...

Random weights at the published widths (`herd bench`'s architectures), built directly on each
rank's GPU at its split shapes (`bench.random_model` with the tensor-parallel pass applied to the
meta model first), so a model that fits only split (Scout's 48 layers in bf16, 218 GB) is never
whole anywhere. Each tp size of `--tp-sizes` runs on the first that many ranks (the others wait),
one after another in the same launch, so TP 1 and TP 2 share the machine's state. Decode
ms/step as `herd bench` measures it (greedy, fast path: compiled, CUDA-graph captured with the
all-reduces inside the graph), timed on rank 0; the floor is one rank's weight + KV bytes over
the copy bandwidth (the all-reduces' time is not in it).

`--allreduce nccl|oneshot|lamport|all` (comma-separated; default: all three on GPUs; also
`lamport-unfused`: herd's kernel without the next RMSNorm in its sums) runs each tp
size above 1 once per kind of all-reduce, a row each: `nccl` every sum through NCCL, `oneshot` the
sums of up to 512 KB through torch's one-shot kernel over symmetric memory, `lamport` through
herd's (kernels/all_reduce.py; parallel/symmetric.py chooses). The kind is $HERD_TP_ALLREDUCE, set
before the model of that kind is built and set up (`TensorParallel.finish`); a kind that does not
apply is reported and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from herd import bench  # noqa: E402
from herd.decoding.decoders import fast_decoder  # noqa: E402
from herd.parallel import symmetric, tensor_parallel  # noqa: E402

from profile_decode import kernel_table  # noqa: E402


UNFUSED = "lamport-unfused"


def build(args, size: int, group, device: torch.device):
    """The random model at tp `size` on this rank (size 1: the whole model, no collectives)."""
    config = bench.architecture_config(args.model, args.layers)
    dtype = getattr(torch, args.dtype)
    if size == 1:
        return bench.random_model(config, dtype, device, args.quantization)
    parallel = tensor_parallel.TensorParallel(group=group, rank=dist.get_rank(group), size=size, device=device)
    model = bench.random_model(config, dtype, device, args.quantization,
                               before_allocating=lambda meta_model: parallel.split_model(meta_model, "auto", None))
    parallel.finish(model)
    return model


def measure(args, model, batch: int, device: torch.device) -> tuple[float, float]:
    """(decode ms/step, floor ms) for `batch` rows."""

    def generate(inputs, n):
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)

    inputs = bench.prompt_inputs(model, batch, args.prompt_length, seed=batch)  # the same prompts on every rank
    step, _ = bench.measure_decode(generate, inputs, args.new_tokens, device)
    weight_bytes, kv_bytes = bench.decode_bytes(model, batch, args.prompt_length + args.new_tokens // 2)
    return step * 1e3, (weight_bytes + kv_bytes) / args.bandwidth * 1e3


def profile_step(args, model, rank: int, steps: int = 10) -> str | None:
    """The kernels of the last measured batch's captured step (greedy graph), replayed `steps`
    times on every rank (its all-reduces need them all), recorded on rank 0."""
    from torch.profiler import ProfilerActivity, profile

    entry = fast_decoder(model).entry
    graph = next(captured for (greedy, _), captured in entry.graphs.items() if greedy)
    entry.positions.fill_(args.prompt_length)  # each replay moves the positions on: start from the prompt's end
    entry.cache_position.fill_(args.prompt_length)
    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) if rank == 0 else contextlib.nullcontext() as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    dist.barrier()
    return kernel_table(prof, steps, limit=25) if rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    parser.add_argument("--tp-sizes", type=bench._int_list, default=None, help="comma-separated (default: 1 and the world size)")
    parser.add_argument("--allreduce", default=None,
                        help="the all-reduce of tp sizes above 1, comma-separated: nccl, oneshot (torch's kernel over "
                             "symmetric memory for sums up to 512 KB), lamport (herd's), or all (default: all on GPUs, "
                             "nccl on CPUs)")
    parser.add_argument("--profile", action="store_true",
                        help="after each tp size above 1, the kernels of its last batch's step (torch.profiler)")
    args = parser.parse_args()
    args.dtype = args.dtype or "bfloat16"
    args.new_tokens = args.new_tokens or 128
    if not dist.is_initialized():
        tensor_parallel._init_from_environment()
    world, rank = dist.get_world_size(), dist.get_rank()
    device = tensor_parallel._device_for(dist.get_backend())
    sizes = args.tp_sizes or sorted({1, world})
    every = ["nccl", "oneshot", "lamport"]
    asked = args.allreduce or ("all" if device.type == "cuda" else "nccl")
    kinds = every if asked == "all" else asked.split(",")
    if set(kinds) - {*every, UNFUSED}:
        raise ValueError(f"--allreduce {asked}: use nccl, oneshot, lamport, {UNFUSED} (comma-separated) or all")
    fuses_norm = symmetric.fuses_norm
    args.bandwidth = bench.copy_bandwidth(device)
    rows, baseline = [], {}
    for size in sizes:
        if world % size or size > world:
            raise ValueError(f"--tp-sizes {size}: it must divide the {world} processes torchrun started")
        group = dist.new_group(list(range(size))) if size > 1 else None  # every rank takes part in new_group
        for kind in kinds if size > 1 else ["-"]:  # tp 1 has no all-reduce
            if rank >= size:
                continue
            if size > 1:  # read when the model is set up (TensorParallel.finish)
                os.environ[symmetric.ENV] = "lamport" if kind == UNFUSED else kind
            # UNFUSED: the lamport kernel without the RMSNorm in its sums (the step before they took it)
            symmetric.fuses_norm = (lambda tensor, group_name: False) if kind == UNFUSED else fuses_norm
            model = build(args, size, group, device)
            skip = kind in ("oneshot", "lamport", UNFUSED) and symmetric.kernel(group.group_name) != kind.split("-")[0]
            if skip and rank == 0:
                print(f"tp {size}: no {kind} all-reduce ({symmetric.why_off(group.group_name)}); skipped", flush=True)
            gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
            for batch in [] if skip else args.batch_sizes:
                ms, floor = measure(args, model, batch, device)
                if size == 1:
                    baseline[batch] = ms
                speedup = f"{baseline[batch] / ms:.2f}x" if batch in baseline else "-"
                rows.append(f"| {args.model} ({args.layers or 'all'} layers) | {size} | {kind} | {batch} | {ms:.2f} | "
                            f"{batch / ms * 1e3:,.0f} | {floor:.2f} | {speedup} | {gib:.1f} |")
                if rank == 0:
                    print(rows[-1], flush=True)
            if args.profile and size > 1 and not skip and device.type == "cuda":
                table = profile_step(args, model, rank)
                if rank == 0:
                    print(f"tp {size}, {kind}, batch {args.batch_sizes[-1]}: {table}", flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier()
    if rank == 0:
        print(f"\n{args.model}, {args.dtype}{', ' + args.quantization if args.quantization else ''}, prompt "
              f"{args.prompt_length}, {args.new_tokens} new tokens, copy bandwidth {args.bandwidth / 1e9:.0f} GB/s, "
              f"{world} processes on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}\n")
        print("| model | tp | all-reduce | batch | ms/step | tok/s | floor ms (one rank) | speedup vs tp 1 | GiB per rank |")
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(rows), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
