"""The `herd` command line: generate, chat, info, bench."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from .bench import add_arguments as add_bench_arguments
from .bench import main as run_bench_command
from .generation import TextStreamer


class _CollectingStreamer(TextStreamer):
    """Prints text as it comes and keeps it, so an answer cut short by Ctrl-C is not lost."""

    def __init__(self, tokenizer: Any, out=None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.text = ""
        self.out = out or sys.stdout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def _load(args: argparse.Namespace):
    from .auto import AutoModelForCausalLM
    from .tokenization import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype, device_map=args.device)
    return model, tokenizer


def _generate_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.temperature is not None:
        if args.temperature == 0:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=args.temperature)
    if args.top_p is not None:
        kwargs["top_p"] = args.top_p
    if args.seed is not None:
        torch.manual_seed(args.seed)
    return kwargs


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], device: torch.device) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return ids.to(device)


def _cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args)
    if args.chat or args.system:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        input_ids = _chat_ids(tokenizer, messages, model.device)
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"].to(model.device)
    streamer = _CollectingStreamer(tokenizer)
    if not args.chat and not args.system:
        sys.stdout.write(args.prompt)
    model.generate(input_ids, streamer=streamer, tokenizer=tokenizer, **_generate_kwargs(args))
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args)
    if getattr(tokenizer, "chat_template", None) is None:
        print(f"{args.model} has no chat template: use `herd generate` for plain text", file=sys.stderr)
        return 2
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    kwargs = _generate_kwargs(args)
    print("Chatting with", args.model, "- /reset clears the history, /exit quits, Ctrl-C stops an answer.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": line})
        input_ids = _chat_ids(tokenizer, system + history, model.device)
        streamer = _CollectingStreamer(tokenizer)
        try:
            model.generate(input_ids, streamer=streamer, tokenizer=tokenizer, **kwargs)
        except KeyboardInterrupt:
            print("\n(stopped)")
        history.append({"role": "assistant", "content": streamer.text.strip()})


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


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a model folder or Hugging Face Hub id")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cpu)")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=None, help="0 for greedy; default: the model's")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--system", default=None, help="a system prompt (uses the chat template)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herd", description="Run Llama-family models.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="continue a prompt, streaming the text")
    _add_model_options(generate)
    generate.add_argument("prompt")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    _add_generation_options(generate)
    generate.set_defaults(handler=_cmd_generate)

    chat = commands.add_parser("chat", help="talk with a chat model in the terminal")
    _add_model_options(chat)
    _add_generation_options(chat)
    chat.set_defaults(handler=_cmd_chat)

    info = commands.add_parser("info", help="load a checkpoint and describe it")
    _add_model_options(info)
    info.add_argument("--ids", default=None, help="comma-separated token ids to run one forward on")
    info.set_defaults(handler=_cmd_info)

    bench = commands.add_parser("bench", help="decode and prefill speed on the GPU, optionally against transformers")
    add_bench_arguments(bench)
    bench.set_defaults(handler=run_bench_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"herd: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
