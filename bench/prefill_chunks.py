"""Where a long prompt's prefill time goes: time to first token per prefill chunk size, the
kernels of one prefill, and (--parts) the attention and matmul rates of one layer's shapes.

    python bench/prefill_chunks.py llama3.1-8b --context 122880 --chunks 16384,32768,61440 --profile-chunk 16384
    python bench/prefill_chunks.py llama3.1-8b --parts

Random weights at the architecture's widths (as `herd bench` builds them), batch 1, greedy,
generate(max_new_tokens=1, prefill_chunk_size=N) timed from the call to its return after a warm-up
prompt of two chunks (cuDNN's plans and Triton's kernels built outside the timed run). The kernel
table groups torch.profiler's CUDA kernels of one whole prefill by name.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from herd.bench import build_model, prompt_inputs  # noqa: E402
from herd.layers.attention import after_cache_in_two_parts, cudnn_part  # noqa: E402
from profile_decode import kernel_table  # noqa: E402


def time_to_first_token(model, chunk: int, length: int) -> float:
    inputs = prompt_inputs(model, 1, length, seed=length)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False, eos_token_id=None,
                       pad_token_id=0, prefill_chunk_size=chunk)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def cuda_ms(fn, repeats: int = 5) -> float:
    fn()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / repeats


def layer_parts(config, device) -> None:
    """cuDNN's two-part attention (a chunk of queries after a cache) and the linears at chunk rows."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    for queries, cached in ((16384, 0), (16384, 49152), (16384, 106496), (32768, 90112)):
        query = torch.randn(1, heads, queries, dim, device=device, dtype=torch.bfloat16)
        key = torch.randn(1, kv_heads, cached + queries, dim, device=device, dtype=torch.bfloat16)
        value = torch.randn_like(key)
        flops = 4 * heads * dim * queries * (queries / 2 + cached)
        ms = cuda_ms(lambda: after_cache_in_two_parts(query, key, value, dim**-0.5, cudnn_part))
        print(f"attention: {queries} queries after {cached} cached keys: {ms:.2f} ms ({flops / ms / 1e9:.0f} TFLOP/s)")
    hidden, intermediate = config.hidden_size, config.intermediate_size
    q_features = heads * dim
    shapes = ((q_features + 2 * kv_heads * dim, hidden), (hidden, q_features), (2 * intermediate, hidden),
              (hidden, intermediate))
    for rows in (8192, 16384, 32768):
        total = 0.0
        for out_features, in_features in shapes:
            x = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
            weight = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16)
            ms = cuda_ms(lambda: x @ weight.t())
            total += ms
            print(f"linear {rows} x {in_features} -> {out_features}: {ms:.3f} ms "
                  f"({2 * rows * in_features * out_features / ms / 1e9:.0f} TFLOP/s)")
        print(f"{rows} rows: a layer's linears {total:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="llama3.1-8b")
    parser.add_argument("--context", type=int, default=122880)
    parser.add_argument("--chunks", default="16384,32768,61440", help="comma-separated prefill chunk sizes")
    parser.add_argument("--profile-chunk", type=int, default=None, help="then the kernels of one prefill at this size")
    parser.add_argument("--parts", action="store_true", help="only the attention and matmul rates of one layer")
    args = parser.parse_args()
    device = torch.device("cuda")
    model = build_model(args.model, torch.bfloat16, device)
    print(f"{args.model} on {torch.cuda.get_device_name(device)}, torch {torch.__version__}, prompt of {args.context}")
    if args.parts:
        layer_parts(model.config.get_text_config(), device)
        return
    for chunk in [int(c) for c in args.chunks.split(",")]:
        time_to_first_token(model, chunk, min(args.context, 2 * chunk))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        seconds = time_to_first_token(model, chunk, args.context)
        print(f"chunk {chunk}: time to first token {seconds:.3f} s, peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB",
              flush=True)
    if args.profile_chunk:
        time_to_first_token(model, args.profile_chunk, min(args.context, 2 * args.profile_chunk))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            seconds = time_to_first_token(model, args.profile_chunk, args.context)
        print(f"kernels of one prefill in chunks of {args.profile_chunk} ({seconds:.3f} s with the profiler):")
        print(kernel_table(prof, 1, limit=20))


if __name__ == "__main__":
    main()
