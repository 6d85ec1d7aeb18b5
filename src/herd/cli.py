"""The `herd` command line."""

from __future__ import annotations

import argparse
import sys

import torch


def _cmd_info(args: argparse.Namespace) -> int:
    from .auto import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype, device_map=args.device)
    text_config = config.get_text_config()
    print(f"model_type:        {config.model_type}")
    print(f"class:             {type(model).__name__}")
    print(f"parameters:        {model.num_parameters():,}")
    print(f"dtype / device:    {model.dtype} / {model.device}")
    print(f"layers x hidden:   {text_config.num_hidden_layers} x {text_config.hidden_size}")
    print(f"heads (kv heads):  {text_config.num_attention_heads} ({text_config.num_key_value_heads})")
    print(f"vocabulary:        {text_config.vocab_size}")
    print(f"rope:              {text_config.rope_parameters}")
    if args.ids:
        ids = torch.tensor([[int(i) for i in args.ids.split(",")]], device=model.device)
        with torch.inference_mode():
            logits = model(ids, logits_to_keep=1).logits[0, -1].float()
        top = logits.topk(min(5, logits.numel()))
        pairs = ", ".join(f"{i}: {v:.3f}" for i, v in zip(top.indices.tolist(), top.values.tolist()))
        print(f"next-token top 5:  {pairs}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herd", description="Run Llama-family models.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="load a checkpoint and describe it")
    info.add_argument("model", help="a model folder or Hugging Face Hub id")
    info.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    info.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto")
    info.add_argument("--ids", default=None, help="comma-separated token ids to run one forward on")
    info.set_defaults(handler=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
