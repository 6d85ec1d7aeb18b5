"""Configurations of kernels/expert_gemv.py on Llama-4-Scout's routed experts, one pair (batch 1).

For each projection (gate_up: 16 experts of 5120 x 16384; down: 16 of 8192 x 5120) and format
(bf16 as checkpoints store it, FP8, int4 in groups of 128), times every configuration of a grid (FP8 with the products on the
tensor cores or the CUDA cores, its bf16 conversion herd's or Triton's; int4 with each group's sum
of x reduced across threads or taken from the tensor cores), back to back over copies of
the experts (as the layers of a step follow each other, none served from L2), and prints the
five fastest against the module's defaults. bf16 also times the path the kernel replaced:
`torch.bmm(x, experts[ids])` compiled by Inductor (which reads the picked expert in place).

    python bench/expert_gemv_sweep.py [--formats bf16,fp8,int4] [--copies 4]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantized_gemv import timed  # noqa: E402

from herd.kernels import expert_gemv as module  # noqa: E402
from herd.quantization.experts import quantize_experts  # noqa: E402
from herd.quantization.formats import Scheme  # noqa: E402

SHAPES = {"gate_up": (16, 5120, 16384), "down": (16, 8192, 5120)}
GRID = dict(block_n=(32, 64, 128), block_k=(128, 256, 512), stages=(3, 4), warps=(4, 8), programs_per_sm=(4, 8),
            tensor_cores=(True, False), variant=("", "triton fp8 conversion", "int4 sums by dot"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", default="bf16,fp8,int4")
    parser.add_argument("--copies", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for (name, (experts, rows, columns)), fmt in itertools.product(SHAPES.items(), args.formats.split(",")):
        copies = []
        for _ in range(args.copies):
            weight = torch.randn(experts, rows, columns, device="cuda", dtype=torch.bfloat16) * 0.02
            if fmt == "bf16":
                copies.append((weight, None))
                continue
            scheme = Scheme(fmt, group_size=128 if fmt == "int4" else 0)
            copies.append(tuple(quantize_experts(weight, scheme, torch.bfloat16).values()))
            del weight
        x = torch.randn(1, rows, device="cuda", dtype=torch.bfloat16)
        ids = torch.tensor([5], device="cuda")
        stored_bytes = sum(t[5].numel() * t.element_size() for t in copies[0] if t is not None)
        expected = module.torch_expert_gemv(x, ids, *copies[0])
        results = []
        int4 = fmt == "int4"
        for block_n, block_k, stages, warps, per_sm, tensor_cores, variant in itertools.product(*GRID.values()):
            if int4 and (block_k != 128 or not tensor_cores or variant == "triton fp8 conversion"):
                continue
            if not int4 and (variant == "int4 sums by dot" or (variant and not tensor_cores)):
                continue
            if fmt == "bf16" and (variant or not tensor_cores):
                continue
            steps = -(-rows // block_k)
            blocks = -(-columns // block_n)
            wanted = max(1, min(steps, per_sm * sms // blocks))
            ranges = -(-steps // -(-steps // wanted))
            kwargs = dict(block_n=block_n, block_k=None if int4 else block_k, warps=warps, stages=stages, ranges=ranges,
                          tensor_cores=tensor_cores, fp8_asm=variant != "triton fp8 conversion",
                          sums_by_dot=variant == "int4 sums by dot")
            try:
                got = module.launch(x, ids, *copies[0], **kwargs).sum(0).to(x.dtype)
                error = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
                if error > 0.02:
                    print(f"  WRONG {kwargs}: {error:.3g}", flush=True)
                    continue
                us = timed(lambda: [module.launch(x, ids, *c, **kwargs) for c in copies], repeats=50) / len(copies)
            except Exception as failure:  # noqa: BLE001 - a configuration that fails is reported and skipped
                print(f"  failed {kwargs}: {type(failure).__name__}", flush=True)
                continue
            results.append((us, (block_n, block_k, stages, warps, per_sm, ranges, tensor_cores, variant)))
        default = timed(lambda: [module.launch(x, ids, *c) for c in copies], repeats=50) / len(copies)
        if fmt == "bf16":
            by_index = torch.compile(lambda x, ids, w: torch.bmm(x[:, None, :], w[ids]).squeeze(1))
            indexed = timed(lambda: [by_index(x, ids, c[0]) for c in copies], repeats=50) / len(copies)
            print(f"{name} bf16: compiled torch.bmm(x, experts[ids]) {indexed:.1f} us "
                  f"({stored_bytes / indexed / 1e6:.2f} TB/s)", flush=True)
        best = sorted(results)[:5]
        print(f"{name} {fmt} ({stored_bytes / 1e6:.0f} MB an expert): default {default:.1f} us "
              f"({stored_bytes / default / 1e6:.2f} TB/s); best " + "; ".join(
                  f"{us:.1f} us ({stored_bytes / us / 1e6:.2f} TB/s) (block_n, block_k, stages, warps, per_sm, ranges, tensor_cores, variant)={c}"
                  for us, c in best), flush=True)
        del copies


if __name__ == "__main__":
    main()
