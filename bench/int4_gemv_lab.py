"""int4 matrix-vector products on the CUDA cores, reading the packed weight as 32-bit words (a lab:
the winner goes into herd.kernels.gemv).

herd's few-row kernel reads int4 weights as bytes and regroups each tile by its scale groups
(reshapes that cost more than the products), reaching 0.5-0.6 TB/s where torch's tinygemm
reaches 1.3-1.5 (bench/RESULTS.md, 2026-11-30). Here a program reads BLOCK_N rows, BLOCK_K
columns a step, as words of 8 columns each (herd's layout: word j holds columns 8j .. 8j + 7,
column 8j + i in bits 4i .. 4i + 3). Each nibble becomes a float without a conversion instruction
(or-ed into the mantissa of 2**23, minus 2**23), and multiplies x's column 8j + i. The scale and
offset apply per group to the sums: w = q * scale + offset, so a group adds
scale * sum(q * x) + offset * sum(x).

- REDUCE: each step's word sums are summed per group (a reshape, one reduction) and scaled;
- otherwise each word's sum is scaled by its group's scale, loaded per word (L1), and the
  row sums reduced once at the end.

    python bench/int4_gemv_lab.py [--shapes gate_up,down,qkv,o,scout_gate_up,...] [--chain 8]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv_lab import timed_chain  # noqa: E402

from herd.kernels import gemv  # noqa: E402
from herd.quantization.formats import quantize_int4_groups, quantize_int8_rows  # noqa: E402


@triton.jit
def _int4_words_kernel(x_ptr, w_ptr, scale_ptr, offset_ptr, out_ptr, N, K,
                       GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       REDUCE: tl.constexpr):
    WORDS: tl.constexpr = BLOCK_K // 8
    STEP_GROUPS: tl.constexpr = BLOCK_K // GROUP
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    words = K // 8
    groups = K // GROUP
    j = tl.arange(0, WORDS)
    row_words = n.to(tl.int64)[:, None] * words
    row_groups = n.to(tl.int64)[:, None] * groups
    acc = tl.zeros((BLOCK_N,), tl.float32)
    acc_words = tl.zeros((BLOCK_N, WORDS), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = tl.load(w_ptr + row_words + (k0 // 8 + j)[None, :], mask=n_ok[:, None], other=0,
                    eviction_policy="evict_first")  # (BLOCK_N, WORDS) int32
        sums = tl.zeros((BLOCK_N, WORDS), tl.float32)  # sum over each word's 8 columns of q * x
        x_sums = tl.zeros((WORDS,), tl.float32)
        for i in tl.static_range(8):
            x_i = tl.load(x_ptr + k0 + 8 * j + i, eviction_policy="evict_last").to(tl.float32)  # (WORDS,)
            q_i = (((w >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            sums += q_i * x_i[None, :]
            x_sums += x_i
        if REDUCE:
            group_sums = tl.sum(tl.reshape(sums, (BLOCK_N, STEP_GROUPS, WORDS // STEP_GROUPS)), axis=2)
            group_x = tl.sum(tl.reshape(x_sums, (STEP_GROUPS, WORDS // STEP_GROUPS)), axis=1)
            g = k0 // GROUP + tl.arange(0, STEP_GROUPS)
            scale = tl.load(scale_ptr + row_groups + g[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
            offset = tl.load(offset_ptr + row_groups + g[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
            acc += tl.sum(group_sums * scale + offset * group_x[None, :], axis=1)
        else:
            g = (k0 + 8 * j) // GROUP  # (WORDS,) each word's group
            scale = tl.load(scale_ptr + row_groups + g[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
            offset = tl.load(offset_ptr + row_groups + g[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
            acc_words += sums * scale + offset * x_sums[None, :]
    if not REDUCE:
        acc = tl.sum(acc_words, axis=1)
    tl.store(out_ptr + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def int4_words_linear(x, data, scale, offset, out, block_n, block_k, warps, stages, reduce):
    """x (1, K) bf16, data (N, K // 2) uint8 (herd's int4 layout), scale/offset (N, K // group)."""
    n, half = data.shape
    k = 2 * half
    group = k // scale.shape[1]
    _int4_words_kernel[(triton.cdiv(n, block_n),)](
        x, data.view(torch.int32), scale, offset, out, n, k, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k,
        REDUCE=reduce, num_warps=warps, num_stages=stages)
    return out


SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096), "o": (4096, 4096),
          "scout_gate_up": (16384, 5120), "scout_down": (5120, 8192), "scout_qkv": (7168, 5120),
          "scout_o": (5120, 5120)}
GRID = dict(block_n=(8, 16, 32, 64), block_k=(256, 512, 1024), warps=(4, 8), stages=(1, 3), reduce=(True, False))


def check_on_cpu() -> None:
    """The kernel in Triton's interpreter against dequantize (TRITON_INTERPRET=1, no GPU)."""
    torch.manual_seed(0)
    for (n, k, group), block_k, reduce in itertools.product(((24, 512, 128), (16, 256, 32)), (256, 512), (True, False)):
        if k % block_k:
            continue
        weight = torch.randn(n, k) * 0.02
        data, scale, offset = quantize_int4_groups(weight, group, torch.bfloat16)
        x = torch.randn(1, k, dtype=torch.bfloat16)
        out = torch.empty(1, n, dtype=torch.bfloat16)
        int4_words_linear(x, data, scale, offset, out, 16, block_k, 4, 1, reduce)
        expected = x.float() @ gemv.dequantize(gemv.QuantizedWeight(data, scale, offset), torch.float32).t()
        error = (out.float() - expected).abs().max().item()
        print(f"n {n} k {k} group {group} block_k {block_k} reduce {reduce}: max error {error:.3g}")
        assert error < 2e-2 * expected.abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--chain", type=int, default=8)
    parser.add_argument("--check-on-cpu", action="store_true")
    args = parser.parse_args()
    if args.check_on_cpu:
        check_on_cpu()
        return
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    began = time.time()
    for name in args.shapes.split(","):
        out_features, in_features = SHAPES[name]
        copies = []
        for _ in range(args.chain):
            weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
            data, scale, offset = quantize_int4_groups(weight, 128, torch.bfloat16)
            tiles, scales_and_zeros = gemv.int4_tiles(data, scale, offset)
            int8, int8_scale = quantize_int8_rows(weight)
            copies.append(dict(bf16=weight, int4=(data, scale, offset), tiles=(tiles, scales_and_zeros),
                               int8=(int8, int8_scale.view(-1))))
        x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
        out = x.new_empty(1, out_features)
        elements = out_features * in_features
        baselines = {
            "bf16 herd gemv": (lambda c: lambda: gemv.linear(x, c["bf16"]), 2.0),
            "int8 herd gemv": (lambda c: lambda: gemv.linear(x, gemv.QuantizedWeight(*c["int8"])), 1.0),
            "int4 herd gemv (bytes)": (lambda c: lambda: gemv.linear(x, gemv.QuantizedWeight(*c["int4"])), 0.5),
            "int4 tinygemm": (lambda c: lambda: torch._weight_int4pack_mm(x, c["tiles"][0], 128, c["tiles"][1]), 0.5),
        }
        for label, (make, width) in baselines.items():
            chained = timed_chain([make(c) for c in copies])
            print(f"{name} {label}: chained {chained:.1f} us ({elements * width / chained / 1e6:.2f} TB/s)", flush=True)
        expected = x.float() @ gemv.dequantize(gemv.QuantizedWeight(*copies[0]["int4"]), torch.float32).t()
        results = []
        for config in itertools.product(*GRID.values()):
            block_n, block_k, warps, stages, reduce = config
            if in_features % block_k:
                continue

            def make(c, config=config):
                return lambda: int4_words_linear(x, *c["int4"], out, *config)
            try:
                make(copies[0])()
                torch.cuda.synchronize()
                error = (out.float() - expected).abs().max().item() / expected.abs().max().item()
                if error > 0.02:
                    print(f"  {config}: WRONG (relative error {error:.3g})", flush=True)
                    continue
                results.append((timed_chain([make(c) for c in copies]), config))
            except Exception as failure:  # noqa: BLE001 - a configuration that fails is reported
                print(f"  {config}: failed {type(failure).__name__}: {str(failure)[:200]}", flush=True)
        for us, config in sorted(results)[:5]:
            print(f"{name} int4 words {config} (block_n, block_k, warps, stages, reduce): chained {us:.1f} us "
                  f"({elements * 0.5 / us / 1e6:.2f} TB/s)  [{time.time() - began:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
