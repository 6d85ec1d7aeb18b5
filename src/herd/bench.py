"""`herd bench`: decode and prefill speed of a real architecture, against the bandwidth floor and,
optionally, against transformers on the same weights in the same process.

    herd bench llama3.1-8b --batch-sizes 1,16,64
    python bench/compare.py llama3.1-8b --batch-sizes 1,16,64 --compare transformers

A named architecture is built at its real widths with random bf16 weights (no download; slices
keep the first few layers of models too large for one GPU); a path loads that checkpoint.

Measured as in the issue that set the targets:
- decode ms/step = (t(N new tokens) - t(2 new tokens)) / (N - 2), greedy, every row forced to
  run N tokens, so the prompt's prefill cancels out;
- prefill = one forward over the prompt (logits of the last token only); time to first token =
  generate() of one token;
- first call = the first generate() of a shape, compile and graph capture included;
- floor = (weight bytes one decode step reads + KV bytes it reads) / copy bandwidth measured
  here (bytes read + written by a device-to-device copy).
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

# name -> (family, config fields). Slices keep `num_hidden_layers` of the real model's layers.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                                  rope_parameters=dict(LLAMA3_ROPE, factor=32.0), max_position_embeddings=131072)),
    "llama3.2-3b": ("llama", dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                  num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                                  rope_parameters=dict(LLAMA3_ROPE, factor=32.0), max_position_embeddings=131072)),
    "llama3.1-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                                  rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072)),
    "llama3.1-70b-slice": ("llama", dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=8,
                                         num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False,
                                         rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072)),
    "llama4-scout-slice": ("llama4", dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192,
                                          intermediate_size_mlp=16384, num_hidden_layers=8, num_attention_heads=40,
                                          num_key_value_heads=8, head_dim=128, num_local_experts=16, num_experts_per_tok=1,
                                          interleave_moe_layer_step=1, attention_chunk_size=8192,
                                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                          max_position_embeddings=262144)),
    "llama4-maverick-slice": ("llama4", dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192,
                                             intermediate_size_mlp=16384, num_hidden_layers=4, num_attention_heads=40,
                                             num_key_value_heads=8, head_dim=128, num_local_experts=128,
                                             num_experts_per_tok=1, interleave_moe_layer_step=2,
                                             attention_chunk_size=8192,
                                             rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                             max_position_embeddings=262144)),
}


def build_model(name: str, dtype: torch.dtype, device: torch.device, num_layers: int | None = None):
    """A herd model of a named architecture with random weights (normal, std 0.02; norms 1)."""
    family, fields = ARCHITECTURES[name]
    fields = dict(fields)
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    if family == "llama":
        from .models.llama import LlamaConfig, LlamaForCausalLM

        config, cls = LlamaConfig(**fields), LlamaForCausalLM
    else:
        from .models.llama4 import Llama4ForCausalLM, Llama4TextConfig

        config, cls = Llama4TextConfig(**fields), Llama4ForCausalLM
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype).to_empty(device=device)  # allocated once, in the final dtype
    model.tie_weights()  # to_empty gives tied weights separate storage
    if device.type == "meta":  # shapes only (sizes, byte counts)
        return model.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for module in model.modules():  # buffers derived from the config (rotary frequencies)
            if hasattr(module, "inv_freq"):
                module.__init__(module.rope_parameters, module.head_dim, module.max_position_embeddings)
                module.to(device)
    return model.eval()


# Reference libraries that `--compare NAME` can run, registered by the benchmark scripts outside
# the package (bench/compare.py registers transformers): herd itself never imports them.
# NAME -> (build(model, dtype) -> a model sharing herd's weights, version() -> str)
REFERENCES: dict[str, tuple[Any, Any]] = {}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    source = torch.empty(1 << 29, dtype=torch.float16, device=device).normal_()
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / sorted(times)[len(times) // 2]


def decode_bytes(model, batch: int, context: int) -> tuple[float, float]:
    """(weight bytes, KV bytes) one decode step must read at this batch and context length."""
    config = model.config
    total = 0
    for name, param in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            if getattr(config, "tie_word_embeddings", False):
                total += param.numel() * param.element_size()  # read as the output head
            continue  # otherwise only `batch` rows are read
        if ".experts." in name:
            experts = param.shape[0]
            routed = min(experts, batch * config.num_experts_per_tok)
            total += param.numel() * param.element_size() * routed // experts
            continue
        total += param.numel() * param.element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    window = getattr(config, "attention_chunk_size", None)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    kv = 0
    for kind in layer_types:
        seen = min(context, window) if kind == "chunked_attention" and window else context
        kv += 2 * batch * config.num_key_value_heads * head_dim * seen * model.dtype.itemsize
    return float(total), float(kv)


def _timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@dataclass
class Row:
    library: str
    batch: int
    decode_ms: float
    tokens_per_s: float
    floor_ms: float
    first_call_s: float | None = None
    peak_gib: float | None = None


def measure_decode(generate, batch: int, prompt_length: int, new_tokens: int, vocab: int, device) -> tuple[float, float]:
    """(decode s/step, first-call s) for generate(input_ids, max_new_tokens=...)."""
    generator = torch.Generator(device="cpu").manual_seed(batch)
    prompt = torch.randint(0, vocab, (batch, prompt_length), generator=generator).to(device)
    mask = torch.ones_like(prompt)

    def run(n: int):
        return generate(prompt, mask, n)

    torch.cuda.synchronize()
    start = time.perf_counter()
    run(2)
    torch.cuda.synchronize()
    first_call = time.perf_counter() - start
    run(new_tokens)  # warm (a longer run may use another cache bucket)
    short = _timed(lambda: run(2))
    long = _timed(lambda: run(new_tokens))
    return (long - short) / (new_tokens - 2), first_call


def measure_prefill(model, prompt_length: int, vocab: int, device) -> tuple[float, float]:
    """(prefill s, time-to-first-token s) for one prompt of prompt_length tokens."""
    prompt = torch.randint(0, vocab, (1, prompt_length)).to(device)
    with torch.no_grad():
        model(prompt, logits_to_keep=1)
        prefill = _timed(lambda: model(prompt, logits_to_keep=1))
    model.generate(prompt, max_new_tokens=1, do_sample=False)
    ttft = _timed(lambda: model.generate(prompt, max_new_tokens=1, do_sample=False))
    return prefill, ttft


def run_bench(args: argparse.Namespace) -> str:
    import herd

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.model in ARCHITECTURES:
        model = build_model(args.model, dtype, device, args.layers)
    else:
        model = herd.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=str(device)).eval()
    vocab = model.config.get_text_config().vocab_size
    bandwidth = copy_bandwidth(device)
    libraries = {"herd": model}
    if args.compare:
        build, _ = REFERENCES[args.compare]
        libraries[args.compare] = build(model, dtype)

    def generate_with(lib_model, plain: bool):
        def generate(prompt, mask, n):
            kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            if plain:
                kwargs["disable_compile"] = True
            with torch.no_grad():
                return lib_model.generate(prompt, attention_mask=mask, **kwargs)
        return generate

    rows: list[Row] = []
    for batch in args.batch_sizes:
        context = args.prompt_length + args.new_tokens // 2
        weight_bytes, kv_bytes = decode_bytes(model, batch, context)
        floor = (weight_bytes + kv_bytes) / bandwidth
        for library, lib_model in libraries.items():
            plain = library == "herd" and args.plain
            torch.cuda.reset_peak_memory_stats(device)
            step, first_call = measure_decode(generate_with(lib_model, plain), batch, args.prompt_length,
                                              args.new_tokens, vocab, device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            rows.append(Row(library, batch, step * 1e3, batch / step, floor * 1e3, first_call, peak))
            print(f"  {library} batch {batch}: {step * 1e3:.2f} ms/step", flush=True)
    prefill_rows = []
    for length in args.prefill_lengths:
        for library, lib_model in libraries.items():
            prefill, ttft = measure_prefill(lib_model, length, vocab, device)
            prefill_rows.append((library, length, prefill * 1e3, length / prefill, ttft * 1e3))
            print(f"  {library} prefill {length}: {prefill * 1e3:.1f} ms", flush=True)
    return report(args, model, bandwidth, rows, prefill_rows)


def report(args, model, bandwidth, rows, prefill_rows) -> str:
    import herd

    reference_version = f"{args.compare} {REFERENCES[args.compare][1]()}, " if args.compare else ""
    weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    lines = [
        f"### `{args.model}` ({'plain path' if args.plain else 'fast path'}), {args.dtype}, prompt {args.prompt_length}, "
        f"{args.new_tokens} new tokens",
        "",
        f"- device: {torch.cuda.get_device_name()} ({bandwidth / 1e9:.0f} GB/s copy bandwidth measured), "
        f"torch {torch.__version__}, herd {herd.__version__}, {reference_version}python {platform.python_version()}",
        f"- weights {weight_gb:.2f} GB; layers {model.config.num_hidden_layers}",
        "",
        "| library | batch | decode ms/step | tokens/s | floor ms | share of floor | first call s | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    herd_steps = {row.batch: row.decode_ms for row in rows if row.library == "herd"}
    for row in rows:
        share = row.floor_ms / row.decode_ms
        lines.append(
            f"| {row.library} | {row.batch} | {row.decode_ms:.2f} | {row.tokens_per_s:.0f} | {row.floor_ms:.2f} | "
            f"{share:.0%} | {row.first_call_s:.1f} | {row.peak_gib:.1f} |"
        )
    ratios = [f"batch {row.batch}: {row.decode_ms / herd_steps[row.batch]:.2f}x" for row in rows if row.library != "herd"]
    if ratios:
        lines += ["", "herd speed-up over the reference (its ms / herd's ms): " + ", ".join(ratios)]
    if prefill_rows:
        lines += ["", "| library | prompt | prefill ms | prefill tokens/s | time to first token ms |", "|---|---|---|---|---|"]
        for library, length, ms, tps, ttft in prefill_rows:
            lines.append(f"| {library} | {length} | {ms:.1f} | {tps:.0f} | {ttft:.1f} |")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"a checkpoint path or Hub id, or one of: {', '.join(ARCHITECTURES)}")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1], help="comma-separated (default 1)")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-lengths", type=_int_list, default=[], help="comma-separated prompt lengths to time prefill on")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers of a named architecture")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compare", default=None,
                        help="also run a reference library on the same weights (python bench/compare.py ... --compare transformers)")
    parser.add_argument("--plain", action="store_true", help="herd's plain path (disable_compile=True) instead of the fast path")


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("herd bench measures GPU speed and needs CUDA", flush=True)
        return 2
    if args.compare and args.compare not in REFERENCES:
        print(f"herd bench: no reference {args.compare!r} is registered; herd never imports other libraries: run "
              f"`python bench/compare.py {args.model} --compare {args.compare} ...` from the repository instead", flush=True)
        return 2
    if args.new_tokens < 4:
        raise SystemExit("--new-tokens must be at least 4")
    print(run_bench(args), flush=True)
    return 0

