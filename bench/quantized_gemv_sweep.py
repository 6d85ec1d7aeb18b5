"""Configurations of the few-row kernel for 1-byte weights (int8, FP8), swept on Llama-3.1-8B's shapes.

Each (shape, format, rows) times every configuration of a grid with CUDA-graph replays and prints
the five fastest against the configuration `_quantized_config` picks today; the chosen ones go
into gemv._quantized_config with the numbers in bench/RESULTS.md.

    python bench/quantized_gemv_sweep.py [--rows 1,4] [--formats int8,fp8] [--model llama4-scout]

`--model llama4-scout`: Scout's 5120-wide rows (attention and the shared expert), which the
configurations chosen on the 8B's 4096 and 14336 were never measured on.
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

from herd.kernels import gemv  # noqa: E402
from herd.quantization.formats import quantize_fp8_rows, quantize_int8_rows  # noqa: E402

# (name, out features, in features, gated, residual)
SHAPES = {
    "llama3.1-8b": [("qkv", 6144, 4096, False, False), ("o", 4096, 4096, False, True),
                    ("gate_up", 14336, 4096, True, False), ("down", 4096, 14336, False, True)],
    "llama4-scout": [("qkv", 7168, 5120, False, False), ("o", 5120, 5120, False, True),
                     ("gate_up", 8192, 5120, True, False), ("down", 5120, 8192, False, True)],
}
GRID = dict(block_n=(4, 8, 16), block_k=(1024, 2048, 4096), warps=(4, 8), first_whole_row=(False, True),
            programs_per_sm=(0,))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1")
    parser.add_argument("--formats", default="int8")
    parser.add_argument("--model", default="llama3.1-8b", choices=sorted(SHAPES))
    args = parser.parse_args()
    torch.manual_seed(0)
    for (name, out_features, in_features, gated, residual), fmt in itertools.product(SHAPES[args.model], args.formats.split(",")):
        weight = torch.randn(out_features * (2 if gated else 1), in_features, device="cuda", dtype=torch.bfloat16) * 0.02
        data, scale = (quantize_int8_rows if fmt == "int8" else quantize_fp8_rows)(weight)
        quantized = gemv.QuantizedWeight(data, scale.view(-1))
        norm = torch.ones(in_features, device="cuda", dtype=torch.bfloat16)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
            res = torch.randn(rows, out_features, device="cuda", dtype=torch.bfloat16) if residual else None
            out = x.new_empty(rows, out_features)
            expected = gemv.torch_linear(x, quantized)
            results = []
            configs = [None] + list(itertools.product(*GRID.values()))
            for config in configs:
                if config is not None:
                    block_n, block_k, warps, whole, per_sm = config
                    first_k = triton_next_power_of_2(in_features) if whole else None
                    if whole and first_k > 8192 or per_sm and not whole:
                        continue
                    config = gemv.GemvConfig(block_n, block_k, warps, 1, first_k, per_sm)
                kwargs = dict(norm_weight=None if residual else norm, residual=res, gated=gated, config=config)
                try:
                    us = timed(lambda: gemv.launch(x, quantized, out, **kwargs), repeats=60)
                except Exception as error:  # noqa: BLE001 - a configuration that does not compile is skipped
                    print(f"  skip {config}: {type(error).__name__}", file=sys.stderr)
                    continue
                if not gated and not residual:  # a check that the configuration computes the product
                    gemv.launch(x, quantized, out, config=config)
                    assert (out.float() - expected.float()).abs().max() < 0.05 * expected.float().abs().max() + 1e-2
                results.append((us, config))
            today = results[0][0]
            best = sorted(results[1:], key=lambda r: r[0])[:5]
            megabytes = data.numel() / 1e6
            print(f"{name} {tuple(data.shape)} {fmt} rows {rows}: today {today:.1f} us "
                  f"({megabytes / today:.2f} TB/s); best " +
                  "; ".join(f"{us:.1f} us ({megabytes / us:.2f} TB/s) {tuple(c)}" for us, c in best), flush=True)


def triton_next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


if __name__ == "__main__":
    main()
