"""Where a decode step's time goes: the captured graph's kernels, and the loop around it.

    python bench/profile_decode.py llama3.2-1b [--batch 1] [--prefill 2048] [--quantization int8] [--out DIR]
    python bench/profile_decode.py llama4-scout-slice --layers 48 --quantization int4 --context 131072

Prints, for one named architecture (random weights, as `herd bench` builds it):
- generate()'s decode ms/step (herd bench's protocol) and the captured graph's own replay time
  (CUDA events around back-to-back replays): the difference is the host loop around the graph;
- the kernels of one replay (torch.profiler), grouped by name, with count and time per step;
- with --prefill N, the kernels of one N-token prefill forward.

With --context N the prompt is N tokens (prefilled once, in chunks of --prefill-chunk-size), and
generate()'s own timing is skipped (each of its calls would prefill again): the graph's replay only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from herd.bench import build_model, copy_bandwidth, decode_bytes, measure_decode, prompt_inputs  # noqa: E402
from herd.decoding.decoders import fast_decoder  # noqa: E402


def kernel_table(prof, steps: int, limit: int = 45) -> str:
    rows = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name
        count, total = rows.get(name, (0, 0.0))
        rows[name] = (count + 1, total + event.device_time)
    total = sum(t for _, t in rows.values())
    lines = [f"total kernel time per step: {total / steps:.1f} us, kernels per step: "
             f"{sum(c for c, _ in rows.values()) / steps:.0f}"]
    for name, (count, time_us) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:limit]:
        lines.append(f"{time_us / steps:9.1f} us {count / steps:6.1f}x  {name[:150]}")
    return "\n".join(lines)


def kernel_sequence(prof, steps: int, first: int = 16, last: int = 6) -> str:
    """The kernels of one step in launch order, each position averaged over the steps: duration,
    and the gap from the previous kernel's end to its start (negative: they overlapped)."""
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    per_step = len(events) // steps
    lines = [f"one step in order ({per_step} kernels; first {first}, last {last}): duration, gap before"]
    for position in list(range(min(first, per_step))) + list(range(max(first, per_step - last), per_step)):
        durations, gaps = [], []
        for step in range(steps):
            index = step * per_step + position
            event = events[index]
            durations.append(event.time_range.end - event.time_range.start)
            if index > 0:
                gaps.append(event.time_range.start - events[index - 1].time_range.end)
        gap = sum(gaps) / len(gaps) if gaps else 0.0
        lines.append(f"  {position:4d} {sum(durations) / steps:7.2f} us  gap {gap:6.2f}  {events[position].name[:90]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--prefill", type=int, default=0)
    parser.add_argument("--out", default=".")
    parser.add_argument("--quantization", default=None, help="int8, int4 or fp8: weights built quantized")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens before the profiled steps")
    parser.add_argument("--prefill-chunk-size", type=int, default=16384)
    args = parser.parse_args()
    device = torch.device("cuda")
    model = build_model(args.model, torch.bfloat16, device, args.layers, args.quantization)
    bandwidth = copy_bandwidth(device)
    weights, kv = decode_bytes(model, args.batch, args.context + 64)
    floor_ms = (weights + kv) / bandwidth * 1e3

    def generate(inputs, n):
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=0, prefill_chunk_size=args.prefill_chunk_size)

    start = time.perf_counter()
    inputs = prompt_inputs(model, args.batch, args.context, seed=args.batch)
    if args.context == 128:
        step, first_call = measure_decode(generate, inputs, 128, device)
        print(f"{args.model} batch {args.batch}: generate {step * 1e3:.3f} ms/step (floor {floor_ms:.3f} ms, "
              f"{floor_ms / (step * 1e3):.0%}), first call {first_call:.1f} s, whole measurement "
              f"{time.perf_counter() - start:.0f} s")
    else:
        generate(inputs, 128)  # one prefill; the decode steps capture the graph (a cache of 128 more slots)
        step = None
        print(f"{args.model} batch {args.batch}, context {args.context}: prefill and 128 steps "
              f"{time.perf_counter() - start:.0f} s (floor {floor_ms:.3f} ms/step)")

    entry = fast_decoder(model).entry
    # greedy generate() replays the graph that also picks the token
    graph = next(captured for (greedy, _), captured in entry.graphs.items() if greedy)

    def rewind():  # each replay moves the positions on: start again from the prompt's end
        entry.positions.fill_(args.context)
        entry.cache_position.fill_(args.context)

    rewind()
    for _ in range(20):
        graph.replay()
    rewind()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays = 100  # stays inside the 256-position bucket
    begin.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    replay_ms = begin.elapsed_time(end) / replays
    print(f"graph replay alone: {replay_ms:.3f} ms/step ({floor_ms / replay_ms:.0%} of floor)"
          + (f"; host loop adds {step * 1e3 - replay_ms:.3f} ms/step" if step is not None else ""))

    steps = 10
    rewind()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    table = kernel_table(prof, steps) + "\n" + kernel_sequence(prof, steps)
    print(table)
    name = f"{args.model}-b{args.batch}"
    with open(os.path.join(args.out, f"{name}-decode-kernels.txt"), "w") as f:
        f.write(table + "\n")

    if args.prefill:
        prompt = torch.randint(0, model.config.get_text_config().vocab_size, (1, args.prefill), device=device)
        with torch.no_grad():
            for _ in range(3):
                model(prompt, logits_to_keep=1)
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                torch.cuda.synchronize()
                t = time.perf_counter()
                model(prompt, logits_to_keep=1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            print(f"prefill {args.prefill}: {sorted(times)[2] * 1e3:.1f} ms")
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(prompt, logits_to_keep=1)
                torch.cuda.synchronize()
        table = kernel_table(prof, 1, limit=30)
        print(table)
        with open(os.path.join(args.out, f"{name}-prefill-kernels.txt"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
