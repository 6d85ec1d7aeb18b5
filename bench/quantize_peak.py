"""Peak GPU memory while from_pretrained quantizes a bf16 checkpoint on the fly, against the
quantized model's size and its largest float tensor.

A random model at the published widths is written as a bf16 checkpoint to a temporary folder,
freed, then loaded with each quantization config; the loader quantizes tensor by tensor on the
GPU, so the peak should stay near the quantized size plus one float tensor (and its float32 copy).

    python bench/quantize_peak.py llama3.2-1b [--formats fp8,int8,int4]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import herd  # noqa: E402
from herd import bench  # noqa: E402
from herd.quantization import config_from_name, weight_tensors  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--formats", default="fp8,int8,int4")
    args = parser.parse_args()
    device = torch.device("cuda")
    with tempfile.TemporaryDirectory() as folder:
        model = bench.build_model(args.model, torch.bfloat16, device)
        largest = max(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(folder)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        print(f"{args.model}: largest bf16 tensor {largest / 1e9:.2f} GB")
        for name in args.formats.split(","):
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            model = herd.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda",
                                                              quantization_config=config_from_name(name),
                                                              progress=False)
            size = sum(t.numel() * t.element_size() for _, t in weight_tensors(model))
            peak = torch.cuda.max_memory_allocated(device) - start
            print(f"| {name} | quantized size {size / 1e9:.2f} GB | peak while loading {peak / 1e9:.2f} GB | "
                  f"peak - size {(peak - size) / 1e9:.2f} GB |", flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
