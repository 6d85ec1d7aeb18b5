"""Decode speed of herd's plain (uncompiled) generate() against transformers, same weights, same run.

A model of a real architecture's widths with random bf16 weights (no download) is saved once and
loaded by both libraries. Decode step = (t(N new tokens) - t(2 new tokens)) / (N - 2), greedy,
so prefill is excluded. Prefill = t(1 new token).

    python bench/decode_eager.py --arch llama3.2-1b --batch 1 --prompt 128 --new 128
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

ARCHS = {
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}
ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="llama3.2-1b", choices=list(ARCHS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import transformers

    import herd

    config = transformers.LlamaConfig(**ARCHS[args.arch], rope_parameters=ROPE, max_position_embeddings=131072,
                                      bos_token_id=128000, eos_token_id=128001)
    folder = tempfile.mkdtemp()
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    ids = torch.randint(0, 128000, (args.batch, args.prompt), device="cuda")
    results = {}
    for name, loader in (("transformers", transformers.LlamaForCausalLM), ("herd", herd.LlamaForCausalLM)):
        kwargs = {"progress": False} if name == "herd" else {}
        model = loader.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda", **kwargs).eval()

        def run(new_tokens):
            # eos_token_id=None: every run generates exactly new_tokens tokens
            return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)

        run(4)  # warm-up
        prefill = _timed(lambda: run(1), args.repeats)
        short = _timed(lambda: run(2), args.repeats)
        long = _timed(lambda: run(args.new), args.repeats)
        step = (long - short) / (args.new - 2)
        results[name] = {"prefill_ms": prefill * 1e3, "decode_ms_per_step": step * 1e3,
                         "decode_tok_s": args.batch / step, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    print(json.dumps({"arch": args.arch, "batch": args.batch, "prompt": args.prompt, "new": args.new,
                      "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "transformers": transformers.__version__, "herd": herd.__version__, **results}, indent=1))
    print(f"| {args.arch} | {args.batch} | {results['transformers']['decode_ms_per_step']:.2f} ms | "
          f"{results['herd']['decode_ms_per_step']:.2f} ms | {results['transformers']['prefill_ms']:.1f} ms | "
          f"{results['herd']['prefill_ms']:.1f} ms |")


if __name__ == "__main__":
    main()
