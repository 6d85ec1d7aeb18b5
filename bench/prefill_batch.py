"""One prefill forward (the reference forward, no cache, the last token's logits) per shape: how
the prompt tokens per forward set the prefill rate (the serving engine's prefill batches).

    python bench/prefill_batch.py llama3.1-8b --shapes 1x512,1x1024,1x2048,1x4096,4x512,8x512

TFLOP/s counts the linears only: 2 * parameters of the decoder's matmuls (the head at one token
aside) per token.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from herd.bench import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="llama3.1-8b")
    parser.add_argument("--shapes", default="1x512,1x1024,1x2048,1x4096,4x512,8x512", help="BATCHxLENGTH,...")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = build_model(args.model, torch.bfloat16, torch.device("cuda"))
    head = model.get_output_embeddings().weight.numel()
    linear_parameters = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name) - head
    print("| batch x length | ms | prompt tokens/s | TFLOP/s (linears) |")
    print("|---|---|---|---|")
    for shape in args.shapes.split(","):
        batch, length = (int(value) for value in shape.split("x"))
        ids = torch.randint(10, model.config.vocab_size - 10, (batch, length), device="cuda")
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.repeats):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.repeats
        tokens = batch * length
        print(f"| {batch} x {length} | {1000 * seconds:.1f} | {tokens / seconds:.0f} | "
              f"{2 * linear_parameters * tokens / seconds / 1e12:.0f} |", flush=True)


if __name__ == "__main__":
    main()
