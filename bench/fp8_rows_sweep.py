"""FP8 rows times FP8 weights at 5-64 rows: kernels/fp8_matmul.py's configurations against `_scaled_mm`.

Llama-3.1-8B's four projections, each weight in 8 copies timed back to back in one CUDA graph (no
copy is still in L2 when it is read again, as in a decode step), activations already in FP8.
Prints, per (shape, rows), `_scaled_mm`, the module's configuration and the five fastest of the
grid, in µs per matmul and weight TB/s; then checks the module's configuration against
`_scaled_mm`'s result.

    python bench/fp8_rows_sweep.py [--rows 16,64] [--quick]
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

from herd.kernels import fp8_matmul  # noqa: E402
from herd.quantization.formats import quantize_fp8_rows  # noqa: E402

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
GRID = dict(block_n=(32, 64, 128), block_k=(128, 256), stages=(3, 5), warps=(4,), programs_per_sm=(1, 2, 4))
COPIES = 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="16,64")
    parser.add_argument("--quick", action="store_true", help="the module's configuration and _scaled_mm only")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} copies {COPIES}")
    print("| shape | rows | _scaled_mm µs (TB/s) | module µs (TB/s) | module, float32 sums every 128 columns µs "
          "| module without PDL µs | best of grid µs (config) |")
    print("|---|---|---|---|---|---|---|")
    for (name, out_features, in_features), rows in itertools.product(SHAPES, [int(r) for r in args.rows.split(",")]):
        weights = [quantize_fp8_rows(torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02)
                   for _ in range(COPIES)]
        x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
        x_scale = x.float().abs().amax(-1, keepdim=True) / 448
        x_q = (x.float() / x_scale).to(torch.float8_e4m3fn)
        gb = out_features * in_features / 1e9

        def scaled_mm():
            for data, scale in weights:
                torch._scaled_mm(x_q, data.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=torch.bfloat16)

        def ours(**config):
            def run():
                for data, _ in weights:
                    fp8_matmul.launch(x_q, data, **config)
            return run

        reference = timed(scaled_mm, 60) / COPIES
        module = timed(ours(), 60) / COPIES
        every_128 = timed(ours(precise_columns=128), 60) / COPIES
        no_pdl = timed(ours(pdl=False), 60) / COPIES
        results = []
        if not args.quick:
            for values in itertools.product(*GRID.values()):
                config = dict(zip(GRID, values))
                if in_features % config["block_k"]:
                    continue
                try:
                    results.append((timed(ours(**config), 60) / COPIES, config))
                except Exception as error:  # a configuration that does not fit the shared memory
                    print(f"  {config}: {type(error).__name__}", file=sys.stderr)
        results.sort(key=lambda item: item[0])
        best = "; ".join(f"{us:.1f} ({c['block_n']}, {c['block_k']}, {c['stages']} st, {c['programs_per_sm']}/SM)"
                         for us, c in results[:5])
        print(f"| {name} {out_features}x{in_features} | {rows} | {reference:.1f} ({gb / reference * 1e3:.2f}) "
              f"| {module:.1f} ({gb / module * 1e3:.2f}) | {every_128:.1f} | {no_pdl:.1f} | {best} |", flush=True)
        data, scale = weights[0]
        expected = torch._scaled_mm(x_q, data.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=torch.bfloat16)
        got = (fp8_matmul.launch(x_q, data).sum(0) * x_scale * scale.view(1, -1)).to(torch.bfloat16)
        error = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
        if error > 2**-7:
            print(f"  MISMATCH {name} rows {rows}: max error {error:.2e} of the largest value", flush=True)


if __name__ == "__main__":
    main()
