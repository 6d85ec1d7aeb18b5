"""Offloaded decoding on one GPU against the PCIe floor.

    python bench/offload.py llama                   # Llama-3.1-8B widths, half the layers in CPU memory
    python bench/offload.py llama --on-host 8       # 8 of the 32 layers in CPU memory
    python bench/offload.py scout --layers 4        # Llama-4-Scout widths, 4 layers, routed experts in CPU memory

Random bf16 weights (herd.bench.build_model), placed by an explicit device map
(herd.parallel.offload.dispatch_model): the last `--on-host` layers in pinned CPU memory, streamed
to the GPU on a side stream; or, for Scout, every layer on the GPU and its routed experts
(`feed_forward.experts`) in CPU memory, computed on the CPU or copied per use, whichever the
selector measures faster (both are timed too, forced).

Host-to-device bandwidth is measured here with a pinned 1 GiB copy. The floor of one decode step
is the bytes that cross per token over that bandwidth: the offloaded layers whole, or for Scout
the num_experts_per_tok routed experts of each layer. Prints decode tokens/s (greedy, batch 1,
plain decoder: the fast path refuses a split model), the floor's tokens/s, their ratio, and
generate()'s own estimate (offload.expected_tokens_per_second, at 25 GB/s).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from herd.bench import build_model
from herd.parallel import offload


def host_to_device_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a pinned host -> device copy (the median of 10)."""
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target.copy_(source, non_blocking=True)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        target.copy_(source, non_blocking=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return nbytes / sorted(times)[len(times) // 2]


def decode_tokens_per_second(model, prompt_length: int, new_tokens: int) -> float:
    ids = torch.randint(3, model.config.get_text_config().vocab_size, (1, prompt_length), device="cuda")
    settings = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    model.generate(ids, max_new_tokens=2, **settings)  # warm-up (and the experts' selector)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **settings)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens + 1, **settings)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start - prefill)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=["llama", "scout"])
    parser.add_argument("--on-host", type=int, default=None, help="llama: layers in CPU memory (default: half)")
    parser.add_argument("--layers", type=int, default=4, help="scout: decoder layers built")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    bandwidth = host_to_device_bandwidth(device)
    print(f"pinned host -> device copy: {bandwidth / 1e9:.1f} GB/s")

    if args.model == "llama":
        model = build_model("llama3.1-8b", torch.bfloat16, device)
        layers = model.config.num_hidden_layers
        on_host = layers // 2 if args.on_host is None else args.on_host
        device_map = {"": 0, **{f"model.layers.{i}": "cpu" for i in range(layers - on_host, layers)}}
        offload.dispatch_model(model, device_map)
        crossing = model._offload.streamed_bytes
        label = f"Llama-3.1-8B widths, {on_host}/{layers} layers in CPU memory"
        runs = [("streamed", None)]
    else:
        model = build_model("llama4-scout-slice", torch.bfloat16, device, num_layers=args.layers)
        device_map = {"": 0, **{f"model.layers.{i}.feed_forward.experts": "cpu" for i in range(args.layers)}}
        offload.dispatch_model(model, device_map)
        crossing = model._offload.routed_bytes
        label = f"Llama-4-Scout widths, {args.layers} layers, routed experts in CPU memory"
        runs = [("selector", None), *((f"forced {name}", name) for name in offload.RoutedExpertsOffload.STRATEGIES)]
    torch.cuda.empty_cache()
    floor = bandwidth / crossing
    estimate = offload.expected_tokens_per_second(model._offload)
    print(f"{label}: {crossing / 1e9:.2f} GB cross per token; floor {floor:.2f} tok/s at the measured bandwidth, "
          f"generate()'s estimate {estimate:.2f} tok/s")
    for name, forced in runs:
        if model._offload.selector is not None:
            model._offload.selector.forced = forced
        rate = decode_tokens_per_second(model, args.prompt_length, args.new_tokens)
        print(f"  {name:<14} decode {rate:7.2f} tok/s = {rate / floor:.0%} of the floor "
              f"(peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB)")
    if model._offload.selector is not None and model._offload.selector.timings:
        print(f"  selector chose {model._offload.selector.chosen} from {model._offload.selector.timings}")


if __name__ == "__main__":
    main()
