"""Causal attention of one long prefill through each of torch's sdpa backends (flash, cuDNN,
memory-efficient): ms and TFLOP/s, and each output's largest difference from the first's.

    python bench/sdpa_backends.py --lengths 16384,32768
    python bench/sdpa_backends.py --chunk 4096 --lengths 32768,122880

With --chunk C, each length L is a cache: the last C queries of an L-token prompt (a prefill
chunk after the cache, what generate() runs for every chunk past the first), through
- flash with torch's lower-right causal bias (what herd runs today),
- cuDNN in two parts, the C x (L - C) rectangle before the chunk (no mask) and the C x C causal
  square, merged by their log-sum-exps (cuDNN's sdpa takes only top-left causal masks),
- the same two parts through flash, for comparison.
FLOPs counted: 4 * heads * dim * C * (L - C + C / 2).

Queries (1, heads, L, dim) over kv_heads keys/values (Llama-3.1-8B's 32 over 8, 128 dimensions,
bf16), is_causal; grouped-query heads as sdpa's enable_gqa, or the keys/values repeated per query
head ("expanded") for backends that refuse enable_gqa. FLOPs counted: 4 * heads * dim * L^2 / 2.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CASES = (("flash", SDPBackend.FLASH_ATTENTION, True), ("cudnn", SDPBackend.CUDNN_ATTENTION, True),
         ("cudnn expanded", SDPBackend.CUDNN_ATTENTION, False),
         ("memory-efficient expanded", SDPBackend.EFFICIENT_ATTENTION, False))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=0, help="time a chunk of this many queries after a cache")
    args = parser.parse_args()
    if args.chunk:
        return chunk_after_cache(args)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| L | backend | ms | TFLOP/s | max difference |")
    print("|---|---|---|---|---|")
    for length in (int(value) for value in args.lengths.split(",")):
        shape = (1, args.heads, length, args.head_dim)
        query = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        key, value = (torch.randn(1, args.kv_heads, length, args.head_dim, device="cuda", dtype=torch.bfloat16)
                      for _ in range(2))
        groups = args.heads // args.kv_heads
        expanded = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        flops = 4 * args.heads * args.head_dim * length * length / 2
        first = None
        for name, backend, grouped in CASES:
            keys, values = (key, value) if grouped else expanded

            def run(keys=keys, values=values, backend=backend, grouped=grouped):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=grouped)

            first = measured_row(length, name, run, args.repeats, flops, first)


def measured_row(length: int, name: str, run, repeats: int, flops: float, first):
    """Times run and prints its row; returns the first output of the table (the others' reference)."""
    try:
        output, seconds = timed(run, repeats)
    except RuntimeError as error:  # a backend that refuses these inputs
        print(f"| {length} | {name} | refused: {str(error)[:80]} | | |")
        return first
    first = output if first is None else first
    difference = (output.float() - first.float()).abs().max().item()
    print(f"| {length} | {name} | {1000 * seconds:.1f} | {flops / seconds / 1e12:.0f} | {difference:.3g} |", flush=True)
    return first


def timed(run, repeats: int):
    """(the first output, seconds per call of the next `repeats`)."""
    output = run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    torch.cuda.synchronize()
    return output, (time.perf_counter() - start) / repeats


def merged(parts) -> torch.Tensor:
    """Attention outputs over disjoint key ranges, each with its log-sum-exp (B, H, Lq), as one."""
    outputs = [output.float() for output, _ in parts]
    lses = [lse.float().reshape(*output.shape[:3], 1) for output, lse in parts]
    top = torch.maximum(*lses)
    weights = [torch.exp(lse - top) for lse in lses]
    return (sum(w * o for w, o in zip(weights, outputs)) / sum(weights)).to(parts[0][0].dtype)


def chunk_after_cache(args) -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; chunk of {args.chunk} queries after a cache")
    print("| L | path | ms | TFLOP/s | max difference |")
    print("|---|---|---|---|---|")
    from torch.nn.attention.bias import causal_lower_right

    for length in (int(value) for value in args.lengths.split(",")):
        chunk = args.chunk
        query = torch.randn(1, args.heads, chunk, args.head_dim, device="cuda", dtype=torch.bfloat16)
        key, value = (torch.randn(1, args.kv_heads, length, args.head_dim, device="cuda", dtype=torch.bfloat16)
                      for _ in range(2))
        groups = args.heads // args.kv_heads
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)  # the private ops take no GQA
        before, own = slice(0, length - chunk), slice(length - chunk, length)
        flops = 4 * args.heads * args.head_dim * chunk * (length - chunk + chunk / 2)

        def lower_right():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(query, key, value, attn_mask=causal_lower_right(chunk, length))

        def two_parts(op):
            def run():
                parts = []
                for keys, causal in ((before, False), (own, True)):
                    out = op(query, key[:, :, keys], value[:, :, keys], causal)
                    parts.append((out[0], out[1]))
                return merged(parts)
            return run

        def cudnn(q, k, v, causal):
            return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)

        def flash(q, k, v, causal):
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)

        first = None
        for name, run in (("flash, lower-right bias", lower_right), ("cuDNN, two parts merged", two_parts(cudnn)),
                          ("flash, two parts merged", two_parts(flash))):
            first = measured_row(length, name, run, args.repeats, flops, first)


if __name__ == "__main__":
    main()
