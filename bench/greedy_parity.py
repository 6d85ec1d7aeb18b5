"""Greedy tokens of the fast path against the plain path (the reference forward) at real widths.

    python bench/greedy_parity.py llama3.2-11b-vision [--new-tokens 32] [--batch 1] [--dtype float32]

Builds the named architecture with random weights, as `herd bench` does (Mllama: one image of all
tiles first in the prompt), generates greedily on both paths and prints how many new tokens agree,
where they first differ, and the largest difference of the first decode step's logits.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from herd.bench import build_model, prompt_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both paths
    model = build_model(args.model, getattr(torch, args.dtype), torch.device("cuda"))
    inputs = prompt_inputs(model, args.batch, args.prompt_length, seed=0)
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        fast = model.generate(**inputs, **kwargs)
        plain = model.generate(**inputs, disable_compile=True, **kwargs)
    new_fast, new_plain = fast.sequences[:, args.prompt_length :], plain.sequences[:, args.prompt_length :]
    same = (new_fast == new_plain).all(dim=0)
    first_difference = int((~same).nonzero()[0]) if not bool(same.all()) else None
    step_diff = (fast.logits[1] - plain.logits[1]).abs().max().item()
    print(f"{args.model} {args.dtype} batch {args.batch}: {int(same.sum())}/{args.new_tokens} new tokens equal, first difference at "
          f"{first_difference}; first decode step's logits differ by at most {step_diff:.4f} "
          f"(largest |logit| {plain.logits[1].abs().max().item():.3f})")


if __name__ == "__main__":
    main()
