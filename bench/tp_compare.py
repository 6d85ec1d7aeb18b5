"""herd and transformers under tensor parallel, side by side, from one saved checkpoint.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
        torchrun --nproc-per-node 2 bench/tp_compare.py llama3.1-8b --folder /tmp/tp-8b --batch-sizes 1,64

Rank 0 writes random weights at the architecture's published widths as a checkpoint
(`save_pretrained`, safetensors) unless `--folder` already holds one; then every rank loads it
with `from_pretrained(folder, tp_plan="auto", dtype=bfloat16)`, herd first, then transformers, as
their users would (each library reads its own slices of the same files). Decode ms/step is
`herd bench`'s measure (greedy, t(new_tokens) - t(2) over the steps between), timed on rank 0.
transformers runs in two modes, as bench/compare.py does: generate() as it comes (eager, dynamic
cache) and its fastest documented mode (static cache, generate() compiling the forward); a mode
that raises is a row saying why.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import herd  # noqa: E402
from herd import bench  # noqa: E402
from herd.parallel import tensor_parallel  # noqa: E402

from compare import static_compiled  # noqa: E402


def write_checkpoint(args, device: torch.device) -> None:
    if (Path(args.folder) / "config.json").exists():
        return
    model = bench.build_model(args.model, torch.bfloat16, device, num_layers=args.layers)
    model.save_pretrained(args.folder)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def decode_rows(label: str, model, modes: dict, args, device: torch.device) -> list[str]:
    """A row per (mode, batch): ms/step and tokens/s, or why the mode failed."""
    rows = []
    for mode, mode_kwargs in modes.items():
        for batch in args.batch_sizes:
            inputs = bench.prompt_inputs(model, batch, args.prompt_length, seed=batch)  # the same on every rank
            max_length = args.prompt_length + args.new_tokens

            def generate(inputs, n):
                with torch.no_grad():
                    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          eos_token_id=None, pad_token_id=0, **mode_kwargs(model, max_length))

            try:
                step, first_call = bench.measure_decode(generate, inputs, args.new_tokens, device)
                row = f"| {label} | {mode} | {batch} | {step * 1e3:.2f} | {batch / step:,.0f} | {first_call:.1f} |"
            except Exception as error:  # noqa: BLE001 - one failing mode must not end the comparison
                row = f"| {label} | {mode} | {batch} | failed: {bench._why(error)} | | |"
            rows.append(row)
            if dist.get_rank() == 0:
                print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="an architecture of `herd bench` (e.g. llama3.1-8b)")
    parser.add_argument("--folder", required=True, help="the checkpoint (written by rank 0 when absent)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch-sizes", type=bench._int_list, default=[1, 64])
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=34)
    parser.add_argument("--skip", default="", help="comma-separated libraries not to run: herd, transformers")
    args = parser.parse_args()
    tensor_parallel._init_from_environment()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = tensor_parallel._device_for(dist.get_backend())
    if rank == 0:
        write_checkpoint(args, device)
    dist.barrier()
    skip = set(filter(None, args.skip.split(",")))
    rows = []
    if "herd" not in skip:
        model = herd.AutoModelForCausalLM.from_pretrained(args.folder, tp_plan="auto", dtype=torch.bfloat16)
        rows += decode_rows(f"herd {herd.__version__}", model, {"fast path (default)": lambda m, n: {}}, args, device)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dist.barrier()
    if "transformers" not in skip:
        import transformers

        reference = transformers.AutoModelForCausalLM.from_pretrained(args.folder, tp_plan="auto", dtype=torch.bfloat16)
        modes = {"eager, dynamic cache": lambda m, n: {}, "static cache, compiled": static_compiled}
        rows += decode_rows(f"transformers {transformers.__version__}", reference, modes, args, device)
    if rank == 0:
        machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"\n{args.model} ({args.layers or 'all'} layers), bf16, tp {world}, prompt {args.prompt_length}, "
              f"{args.new_tokens} new tokens, {machine}, torch {torch.__version__}\n")
        print("| library | mode | batch | ms/step | tok/s | first call s |\n|---|---|---|---|---|---|")
        print("\n".join(rows), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
