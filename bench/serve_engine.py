"""Offline throughput of the serving engine (serving/engine.py), no HTTP: N requests at once.

    python bench/serve_engine.py llama3.1-8b --concurrency 16,64,256 --prompt-length 512 --new-tokens 256
    python bench/serve_engine.py llama3.1-8b --concurrency 64,256 --kv-cache-dtype fp8   # the FP8 KV cache
    python bench/serve_engine.py llama3.1-8b --scheduling async,sync   # with and without async scheduling

Builds the named architecture with random weights (as `herd bench` does; bf16 on the GPU), and for
each concurrency C runs C requests of `--prompt-length` random tokens and `--new-tokens` new
tokens each (greedy, eos ignored), all queued at once, through one Engine whose max_batch is the
largest C (a server's: its KV pool from the free memory, its graphs captured once). A warm-up pass
first compiles and captures every batch bucket up to the largest C. Each level's prompts are its
own (no prefix-cache hits across levels). Prints per C: output
tokens/s (all generated tokens / wall time from the first add to the last token), time to
first token (mean, p50, p99), decode steps and their mean time, preemptions.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))  # compare.py: the transformers model on herd's weights

from herd.bench import build_model, dtype_name  # noqa: E402
from herd.serving.engine import DEFAULT_PREFILL_TOKENS, Engine, EngineRequest, SamplingParams  # noqa: E402


def _requests(count: int, prompt_length: int, new_tokens, vocab: int, seed: int, tag: str):
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        prompt = torch.randint(10, vocab - 10, (prompt_length,), generator=generator).tolist()
        new = new_tokens(index) if callable(new_tokens) else new_tokens
        yield EngineRequest(f"{tag}{index}", prompt, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_engine(model, max_batch: int, args) -> Engine:
    engine = Engine(model, max_batch=max_batch, max_model_len=args.prompt_length + args.new_tokens + 16,
                    block_size=args.block_size, prefill_chunk=args.prefill_chunk, max_waiting=10 * max_batch,
                    num_blocks=args.num_blocks, kv_cache_dtype=args.kv_cache_dtype)
    engine.warm_up()  # every batch bucket compiled and captured, as herd serve does before answering
    # then short prompts through the prefill and decode paths
    for request in _requests(max_batch, 16, lambda i: i + 2, engine.vocab_size, seed=1, tag="warm"):
        engine.add_request(request)
    engine.run_to_completion()
    # and prompts of the measured length (the prefill's first batches of that shape)
    for request in _requests(8, args.prompt_length, 2, engine.vocab_size, seed=0, tag="warm-long"):
        engine.add_request(request)
    engine.run_to_completion()
    _sync(model.device)
    return engine


def run_level(engine: Engine, concurrency: int, args, run: int = 0) -> dict:
    """One level's requests (prompts of their own: `run` tells apart repeated levels, so that no
    prompt is a prefix-cache hit)."""
    model, vocab = engine.model, engine.vocab_size
    preempted_before = engine.stats()["preemptions"]
    added, first_token = {}, {}
    start = time.perf_counter()
    for request in _requests(concurrency, args.prompt_length, args.new_tokens, vocab, seed=2 + concurrency + 1000 * run,
                             tag=f"r{run}-{concurrency}-"):
        engine.add_request(request)
        added[request.request_id] = time.perf_counter()
    steps, generated = 0, 0
    decode_only = []  # (rows, seconds) of the steps without prompt work
    while engine.has_work():
        scheduler = engine.scheduler
        prompt_work = bool(engine.stats()["waiting"] or any(s.in_prefill for s in scheduler.running))
        rows = len(scheduler.running)
        before = time.perf_counter()
        events = engine.step()
        now = time.perf_counter()
        steps += 1
        if not prompt_work:
            decode_only.append((rows, now - before))
        for request_id, event in events:
            generated += event.token_id is not None
            first_token.setdefault(request_id, now)
    _sync(model.device)
    elapsed = time.perf_counter() - start
    ttft = sorted(first_token[r] - added[r] for r in added)
    stats = engine.stats()
    return {
        "concurrency": concurrency,
        "tok_s": generated / elapsed,
        "elapsed": elapsed,
        "ttft_mean": statistics.mean(ttft),
        "ttft_p50": ttft[len(ttft) // 2],
        "ttft_p99": ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))],
        "steps": steps,
        "step_ms": 1000 * elapsed / max(steps, 1),
        # steps without prompt work: how many, their share of the wall time, ms each at the most rows
        "decode_only": len(decode_only),
        "decode_only_s": sum(t for _, t in decode_only),
        "full_step_ms": 1000 * statistics.median([t for r, t in decode_only if r == concurrency] or [0.0]),
        "preemptions": stats["preemptions"] - preempted_before,
        "blocks": stats["kv_blocks_total"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="llama3.1-8b")
    parser.add_argument("--concurrency", default="16,64,256")
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dtype", type=dtype_name, default="bfloat16")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the architecture (a quick run)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prefill-chunk", default=str(DEFAULT_PREFILL_TOKENS),
                        help="prompt tokens per step (the engine's prefill_chunk, herd serve's --max-num-batched-tokens); "
                             "comma-separated: every level at each, one engine built for the largest")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: from free GPU memory)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=["fp8"],
                        help="the FP8 KV cache in the engine's pools (herd serve --kv-cache-dtype)")
    parser.add_argument("--scheduling", default="async",
                        help="async (the engine's default on a GPU: the host prepares a step while the one before "
                             "runs) and/or sync (herd serve --no-async-scheduling); comma-separated: every level at "
                             "each, on one engine")
    parser.add_argument("--step-times", action="store_true",
                        help="then the captured decode step alone per batch bucket, rows at the mean context")
    parser.add_argument("--compare", choices=["transformers"], default=None,
                        help="then transformers' continuous batching (generate_batch) on the same weights and requests")
    args = parser.parse_args()
    budgets = [int(c) for c in args.prefill_chunk.split(",")]
    args.prefill_chunk = max(budgets)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.model, getattr(torch, args.dtype), device, num_layers=args.layers)
    kv = f", {args.kv_cache_dtype} KV cache" if args.kv_cache_dtype else ""
    print(f"{args.model} ({args.layers or 'all'} layers, {args.dtype}{kv}) on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}: "
          f"prompts of {args.prompt_length}, {args.new_tokens} new tokens, greedy, eos ignored")
    schedulings = args.scheduling.split(",")
    if not set(schedulings) <= {"async", "sync"}:
        parser.error(f"--scheduling takes async and/or sync, got {args.scheduling!r}")
    print("| prompt tokens a step | scheduling | concurrent | output tok/s | wall s | TTFT mean s | TTFT p50 s | TTFT p99 s | steps | "
          "ms/step | decode-only steps (s) | ms/step at all rows | preemptions | KV blocks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    levels = [int(c) for c in args.concurrency.split(",")]
    start = time.perf_counter()
    engine = make_engine(model, max(levels), args)
    print(f"(engine built and warmed up, every bucket up to {max(levels)} rows: {time.perf_counter() - start:.1f} s)")
    herd_rates = {}
    runs = ((budget, scheduling, level) for budget in budgets for scheduling in schedulings for level in levels)
    for run, (budget, scheduling, concurrency) in enumerate(runs):
        engine.scheduler.prefill_chunk = budget
        engine.async_scheduling = scheduling == "async"  # between levels nothing is in flight
        row = run_level(engine, concurrency, args, run)
        herd_rates[concurrency] = row["tok_s"]
        print(f"| {budget} | {scheduling} | {row['concurrency']} | {row['tok_s']:.0f} | {row['elapsed']:.2f} | {row['ttft_mean']:.3f} | "
              f"{row['ttft_p50']:.3f} | {row['ttft_p99']:.3f} | {row['steps']} | {row['step_ms']:.2f} | "
              f"{row['decode_only']} ({row['decode_only_s']:.2f}) | {row['full_step_ms']:.2f} | "
              f"{row['preemptions']} | {row['blocks']} |", flush=True)
    if args.step_times:
        step_times(engine, args.prompt_length + args.new_tokens // 2)
    if args.compare == "transformers":
        del engine  # its KV pool (most of the free memory) before the reference sizes its own
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        compare_transformers(model, levels, args, herd_rates)


def step_times(engine: Engine, context: int, repeats: int = 20) -> None:
    """The captured decode step alone, per batch bucket, every row at `context` positions (the
    tables point at arbitrary blocks: the keys/values are garbage, the work is real)."""
    kv, runner = engine.runner.kv, engine.runner
    print(f"\ndecode step alone (the captured graph replayed), rows at context {context}:")
    print("| rows | ms/step |")
    print("|---|---|")
    blocks = -(-context // engine.block_size)
    for (rows, with_images), graph in sorted(runner.graphs.items()):
        if with_images:
            continue
        kv.lengths[:rows] = context
        kv.positions[:rows] = context - 1
        for kind in kv.tables:
            kv.first[kind][:rows] = 0
            kv.slots[kind][:rows] = 0  # block 0: no request's
            table = torch.arange(rows * blocks, device=kv.lengths.device).view(rows, blocks)
            kv.tables[kind][:rows, :blocks] = (table % (kv.keys[next(iter(kv.keys))].shape[2] // engine.block_size - 1)
                                               + 1).int()
        graph.replay()
        _sync(kv.lengths.device)
        start = time.perf_counter()
        for _ in range(repeats):
            graph.replay()
        _sync(kv.lengths.device)
        print(f"| {rows} | {1000 * (time.perf_counter() - start) / repeats:.2f} |", flush=True)


def compare_transformers(model, levels: list[int], args, herd_rates: dict[int, float]) -> None:
    """transformers' continuous batching (`generate_batch`, the engine behind `transformers serve
    --continuous-batching`) on the same weights and the same requests, in its default mode (it picks
    its paged attention and CUDA graphs itself); a small warm-up call first, then one timed call per
    level (wall time of the whole call)."""
    import transformers

    from compare import transformers_reference

    reference = transformers_reference(model, model.dtype)
    config = transformers.GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                           pad_token_id=0)
    vocab = model.config.get_text_config().vocab_size
    warm = [request.prompt_ids for request in _requests(8, 16, 4, vocab, seed=1, tag="w")]
    reference.generate_batch(warm, generation_config=transformers.GenerationConfig(
        max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0))
    print(f"\ntransformers {transformers.__version__} generate_batch (continuous batching), same weights and requests:")
    print("| concurrent | output tok/s | wall s | herd / transformers |")
    print("|---|---|---|---|")
    for concurrency in levels:
        prompts = [request.prompt_ids for request in _requests(concurrency, args.prompt_length, args.new_tokens, vocab,
                                                               seed=2 + concurrency, tag="t")]
        _sync(model.device)
        start = time.perf_counter()
        outputs = reference.generate_batch(prompts, generation_config=config)
        _sync(model.device)
        elapsed = time.perf_counter() - start
        generated = sum(len(output.generated_tokens) for output in outputs.values())
        rate = generated / elapsed
        print(f"| {concurrency} | {rate:.0f} | {elapsed:.2f} | {herd_rates[concurrency] / rate:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
