"""The `herd` command line: generate, chat, info, bench, plan, serve.

Every error of the command line is one `herd: error: ...` line on stderr that says how to fix it,
with exit code 2 (never a traceback; HERD_DEBUG=1 shows the traceback of an unexpected error).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .bench import ARCHITECTURES as ARCHITECTURE_NAMES
from .bench import QUANTIZATIONS, dtype_name
from .bench import add_arguments as add_bench_arguments
from .bench import main as run_bench_command
from .generation import TextStreamer
from .serving.engine import DEFAULT_PREFILL_TOKENS


class CLIError(Exception):
    """A mistake on the command line or in its inputs: reported as one `herd: error:` line."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) that point to --help."""

    def error(self, message: str):
        sys.stderr.write(f"herd: error: {message}; see `{self.prog} --help`\n")
        sys.exit(2)


class _CollectingStreamer(TextStreamer):
    """Prints text as it comes and keeps it, so an answer cut short by Ctrl-C is not lost; notes when
    the first and last new tokens came (for --verbose)."""

    def __init__(self, tokenizer: Any, out=None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.text = ""
        self.out = out or sys.stdout
        self.prompt_seen = False
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.new_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self.prompt_seen:
            self.prompt_seen = True
        else:
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
            self.new_tokens += 1
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


# --- models: where they are, loading them ---------------------------------------------------------


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _download(name: str) -> Path:
    """The local folder of a Hub id (the cache first), or a CLIError saying what to do instead."""
    from huggingface_hub import errors as hub_errors

    from .hub import resolve

    no_network = (f"cannot download {name}: no network and it is not in the local Hugging Face cache; "
                  "pass a model folder or a .gguf file, or set HF_HUB_OFFLINE=1 to use only the cache")
    try:
        return resolve(name)
    except hub_errors.GatedRepoError:
        raise CLIError(f"{name} is gated: accept its license on huggingface.co and log in with `hf auth login`, "
                       "or pass a model folder or a .gguf file") from None
    except hub_errors.RepositoryNotFoundError:
        raise CLIError(f"{name} is not a repository on the Hugging Face Hub (or it is private: log in with "
                       "`hf auth login`); check the id, or pass a model folder or a .gguf file") from None
    except hub_errors.RevisionNotFoundError:
        raise CLIError(f"{name} has no such revision on the Hugging Face Hub; check the id") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, ConnectionError, TimeoutError):
        if _offline():
            raise CLIError(f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; "
                           "pass a model folder or a .gguf file, or unset HF_HUB_OFFLINE to download it") from None
        raise CLIError(no_network) from None
    except FileNotFoundError:  # herd's own: not a folder and not an id, or offline and not cached
        if _offline():
            raise CLIError(f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; "
                           "pass a model folder or a .gguf file, or unset HF_HUB_OFFLINE to download it") from None
        raise CLIError(f"{name} is neither an existing folder, a .gguf file nor a Hub id (org/name); "
                       "check the path") from None
    except Exception as error:
        if "connect" in type(error).__name__.lower() or "timeout" in type(error).__name__.lower():
            raise CLIError(no_network) from None
        raise


def _looks_like_a_path(name: str) -> bool:
    """A name that cannot be a Hub id: it starts like a path or has more than one separator."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _model_path(name: str) -> str:
    """A local folder holding config.json, or a .gguf file (left to its loader), for a model argument."""
    if name.lower().endswith(".gguf"):
        if not Path(name).expanduser().is_file():
            raise CLIError(f"{name}: no such file; check the path")
        return name
    path = Path(name).expanduser()
    if path.is_file():
        raise CLIError(f"{name} is a file; pass a model folder (config.json + weights), a .gguf file or a Hub id")
    if not path.exists() and _looks_like_a_path(name):  # never a Hub id (org/name): no cache or network to ask
        raise CLIError(f"{name}: no such folder; check the path (a model folder, a .gguf file or a Hub id org/name)")
    folder = path if path.is_dir() else _download(name)
    if not (folder / "config.json").is_file():
        raise CLIError(f"{name} has no config.json, so it is not a model folder; pass a folder holding config.json, "
                       "*.safetensors and tokenizer.json, a .gguf file or a Hub id")
    return str(folder)


def _device(args: argparse.Namespace) -> str | None:
    """--device, else the GPU where there is one (fast by default), else None: the CPU."""
    return args.device or ("cuda" if torch.cuda.is_available() else None)


def _load(args: argparse.Namespace):
    """(model, tokenizer): the model's folder is checked first (config.json), then the tokenizer
    (quick), then the weights (with a progress bar)."""
    from .auto import AutoModelForCausalLM
    from .tokenization import AutoTokenizer

    path = _model_path(args.model)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if getattr(args, "needs_chat_template", None) and getattr(tokenizer, "chat_template", None) is None:
        raise CLIError(f"{args.model} has no chat template, which {args.needs_chat_template} needs; "
                       + ("leave out --chat and --system to continue plain text" if args.command == "generate"
                          else "use `herd generate` for plain text"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, device_map=_device(args),
                                                 quantization_config=_quantization(args, path))
    if getattr(args, "verbose", False):
        print(f"herd: loaded {args.model} in {time.perf_counter() - start:.2f} s "
              f"({model.dtype}, {model.device})", file=sys.stderr, flush=True)
    return model, tokenizer


def _context_length(model) -> int | None:
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


# --- generation options ---------------------------------------------------------------------------

_SAMPLING_FLAGS = (("top_p", "--top-p"), ("top_k", "--top-k"), ("min_p", "--min-p"))


def _check_generation_options(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise CLIError("--max-new-tokens must be >= 1")
    if args.temperature is not None and args.temperature < 0:
        raise CLIError("--temperature must be >= 0; use --temperature 0 for greedy decoding")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CLIError("--top-p must be in (0, 1]; use --top-p 1 to turn it off")
    if args.top_k is not None and args.top_k < 0:
        raise CLIError("--top-k must be >= 0; use --top-k 0 to turn it off")
    if args.min_p is not None and not 0 <= args.min_p <= 1:
        raise CLIError("--min-p must be in [0, 1]; use --min-p 0 to turn it off")
    if args.seed is not None and not -(2**63) <= args.seed < 2**64:
        raise CLIError(f"--seed {args.seed} is out of range; use a number from 0 to 2**64 - 1")


def _generate_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """generate() keyword arguments: --temperature 0 is greedy; a sampling flag (--top-p, --top-k,
    --min-p) without --temperature samples (at the model's temperature); with --temperature 0 the
    sampling flags are ignored, and a note says so."""
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    given = [(name, flag) for name, flag in _SAMPLING_FLAGS if getattr(args, name, None) is not None]
    if args.temperature == 0:
        kwargs["do_sample"] = False
        if given:
            flags = ", ".join(flag for _, flag in given)
            print(f"herd: note: {flags} ignored: --temperature 0 means greedy decoding", file=sys.stderr, flush=True)
    else:
        if args.temperature is not None:
            kwargs.update(do_sample=True, temperature=args.temperature)
        if given:
            kwargs["do_sample"] = True
            kwargs.update({name: getattr(args, name) for name, _ in given})
    if args.seed is not None:
        torch.manual_seed(args.seed)
    return kwargs


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], device: torch.device) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return ids.to(device)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# --- commands -------------------------------------------------------------------------------------


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt argument, or with `-` the text on stdin (`- < prompt.txt`), its trailing newlines dropped."""
    if args.prompt != "-":
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise CLIError("the prompt `-` reads stdin, which is a terminal here; pipe the prompt in "
                       "(`herd generate MODEL - < prompt.txt`) or pass it as an argument")
    try:
        return sys.stdin.read().rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise CLIError(f"the prompt on stdin is not valid text ({error.reason}); pass UTF-8 text") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    _check_generation_options(args)
    kwargs = _generate_kwargs(args)
    args.prompt = _read_prompt(args)
    if args.chat or args.system:
        args.needs_chat_template = "--chat" if args.chat else "--system"
    model, tokenizer = _load(args)
    if args.chat or args.system:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        input_ids = _chat_ids(tokenizer, messages, model.device)
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"].to(model.device)
    context = _context_length(model)
    length = input_ids.shape[1]
    if length == 0:
        raise CLIError("the prompt is empty (no tokens, and this tokenizer adds no BOS token); give some text, "
                       "or use --chat to send it through the chat template")
    if context is not None and length >= context:
        raise CLIError(f"the prompt is {length} tokens, {length - context + 1} more than the model's context of "
                       f"{context} tokens leaves room for (one new token at least); shorten the prompt")
    if context is not None and length + args.max_new_tokens > context:
        # as generate() does: up to the context, said once
        print(f"herd: note: the prompt ({length} tokens) + --max-new-tokens {args.max_new_tokens} exceed the model's "
              f"context of {context} tokens; generating at most {context - length}", file=sys.stderr, flush=True)
        kwargs["max_new_tokens"] = context - length
    streamer = _CollectingStreamer(tokenizer)
    if not args.chat and not args.system:
        sys.stdout.write(args.prompt)
    start = time.perf_counter()
    model.generate(input_ids, streamer=streamer, tokenizer=tokenizer, **kwargs)
    if args.verbose and streamer.first_token_at is not None:
        prefill = streamer.first_token_at - start
        line = f"herd: prompt {length} tokens in {prefill:.3f} s ({length / prefill:.1f} tokens/s)"
        decode_tokens = streamer.new_tokens - 1
        if decode_tokens > 0:
            decode = streamer.last_token_at - streamer.first_token_at
            line += f"; decode {decode_tokens} tokens in {decode:.3f} s ({decode_tokens / decode:.1f} tokens/s)"
        print(line, file=sys.stderr, flush=True)
    return 0


def _line_editing() -> None:
    """Arrow keys and the session's history for input(), where the terminal allows; and Ctrl-C as
    KeyboardInterrupt even when the process was started with SIGINT ignored or blocked (a parent's
    disposition survives exec), since Ctrl-C is how an answer is stopped."""
    if not sys.stdin.isatty():
        return
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        import readline  # noqa: F401 - importing it is what makes input() edit lines
    except ImportError:  # Windows, or a Python built without it: plain input()
        pass


class _TooLong(Exception):
    pass


def _fit(tokenizer, system, history, message, context, max_new_tokens, device) -> tuple[torch.Tensor, int, int]:
    """(input ids, max new tokens, turns dropped): the oldest turns (user + assistant) go until the
    conversation and the answer fit the context; the system prompt always stays. _TooLong(n) when
    the message alone (with the system prompt) leaves no room for an answer; history is then untouched."""
    if context is None:
        return _chat_ids(tokenizer, system + history + [message], device), max_new_tokens, 0
    alone = _chat_ids(tokenizer, system + [message], device).shape[1]
    if alone >= context:
        raise _TooLong(alone)
    dropped = 0
    while True:
        ids = _chat_ids(tokenizer, system + history + [message], device)
        room = context - ids.shape[1]
        if room >= max_new_tokens or (not history and room > 0):
            return ids, min(max_new_tokens, room), dropped
        del history[:2]
        dropped += 1


def _cmd_chat(args: argparse.Namespace) -> int:
    if args.url:
        return _cmd_chat_remote(args)
    if not args.model:
        raise CLIError("herd chat needs a model (a folder, a .gguf file or a Hub id), or --url of a running server")
    _check_generation_options(args)
    kwargs = _generate_kwargs(args)
    args.needs_chat_template = "herd chat"
    model, tokenizer = _load(args)
    if getattr(tokenizer, "chat_template", None) is None:
        raise CLIError(f"{args.model} has no chat template; use `herd generate` for plain text")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    context = _context_length(model)
    for line in _user_lines(args.model, history):
        message = {"role": "user", "content": line}
        streamer = _CollectingStreamer(tokenizer)
        try:
            input_ids, max_new_tokens, dropped = _fit(tokenizer, system, history, message, context,
                                                      kwargs["max_new_tokens"], model.device)
            if dropped:
                kept = ", kept the system prompt" if system else ""
                print(f"(the conversation outgrew the context of {context} tokens: dropped the {dropped} oldest "
                      f"turn{'s' if dropped > 1 else ''}{kept})", flush=True)
            model.generate(input_ids, streamer=streamer, tokenizer=tokenizer, **dict(kwargs, max_new_tokens=max_new_tokens))
        except _TooLong as too_long:
            print(f"(that message is {too_long.args[0]} tokens with the chat template, no room in the context of "
                  f"{context} tokens: not sent; the conversation is kept)", flush=True)
            continue
        except KeyboardInterrupt:
            print("\n(stopped)", flush=True)
        except Exception as error:  # noqa: BLE001 - a failed answer must not end the session
            print(("\n" if streamer.text else "") + f"(generation failed: {_first_line(error)}; the message was not "
                  "added, the conversation is kept)", flush=True)
            continue
        history += [message, {"role": "assistant", "content": streamer.text.strip()}]
    return 0


def _user_lines(name: str, history: list):
    """The user's messages, read from the terminal: /reset clears `history`, /exit (or end of input)
    ends the chat, Ctrl-C at the prompt is ignored."""
    _line_editing()
    print("Chatting with", name, "- /reset clears the history, /exit quits, Ctrl-C stops an answer.", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history.clear()
            print("(history cleared)", flush=True)
            continue
        yield line


def _cmd_chat_remote(args: argparse.Namespace) -> int:
    """`herd chat --url`: the same conversation, answered by a running server (herd serve or any
    OpenAI-compatible one). A turn the server refuses for the context drops the oldest turns, as the
    local chat does."""
    from urllib.parse import urlsplit

    from .serving.client import ChatClient, ServerError

    _check_generation_options(args)
    if urlsplit(args.url).scheme not in ("http", "https") or not urlsplit(args.url).netloc:
        raise CLIError(f"--url {args.url} is not an http(s) URL; pass the server's address, e.g. --url http://127.0.0.1:8000")
    local = [flag for flag, given in (("--dtype", args.dtype != "auto"), ("--device", args.device is not None),
                                      ("--quantization", args.quantization is not None)) if given]
    if local:
        raise CLIError(f"{', '.join(local)} load{'s' if len(local) == 1 else ''} a local model and "
                       f"do{'es' if len(local) == 1 else ''} not go with --url (the server has loaded its model); "
                       f"leave {'it' if len(local) == 1 else 'them'} out, or leave out --url to chat with a local model")
    client = ChatClient(args.url, api_key=args.api_key or os.environ.get("HERD_API_KEY"))
    try:
        name = args.model or client.model_name()
    except ServerError as error:
        raise CLIError(f"the server at {args.url} refused to list its models ({error.status}: {error.message})"
                       + ("; pass --api-key" if error.status == 401 else "")) from None
    except OSError as error:
        raise CLIError(f"cannot reach a server at {args.url} ({getattr(error, 'reason', error)}); start one with "
                       "`herd serve MODEL` or check the URL") from None
    fields = {"max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "min_p": args.min_p, "seed": args.seed}
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    for line in _user_lines(f"{name} at {args.url}", history):
        message = {"role": "user", "content": line}
        text, dropped = "", 0
        while True:
            try:
                for piece in client.stream_chat(name, system + history + [message], **fields):
                    text += piece
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                print(flush=True)
            except KeyboardInterrupt:
                print("\n(stopped)", flush=True)
            except ServerError as error:
                if error.status == 400 and "context" in error.message and history and not text:
                    del history[:2]
                    dropped += 1
                    continue
                print(("\n" if text else "") + f"(the server refused: {error.message}; the message was not added, "
                      "the conversation is kept)", flush=True)
                break
            except OSError as error:
                print(("\n" if text else "") + f"(the connection failed: {getattr(error, 'reason', error)}; the "
                      "message was not added, the conversation is kept)", flush=True)
                break
            if dropped:
                print(f"(the conversation outgrew the context: dropped the {dropped} oldest turn"
                      f"{'s' if dropped > 1 else ''})", flush=True)
            history += [message, {"role": "assistant", "content": text.strip()}]
            break
    return 0


def _weight_formats(model) -> str:
    """How the weights are stored: the checkpoint's quantization and how many layers hold each format."""
    from collections import Counter

    from .quantization import quantized_modules

    quantization = getattr(model.config, "quantization_config", None)
    if not quantization:
        return f"{str(model.dtype).removeprefix('torch.')} (not quantized)"
    formats = Counter(
        module.scheme.format + (f" g{module.scheme.group_size}" if module.scheme.format == "int4" else "")
        for module in quantized_modules(model))
    counts = ", ".join(f"{count} {name}" for name, count in sorted(formats.items()))
    return f"{dict(quantization).get('quant_method')} quantization: {counts} layers; the rest {str(model.dtype).removeprefix('torch.')}"


def _parameter_count(model) -> int:
    """The model's parameters as published (quantized layers at their in x out entries)."""
    return model.num_parameters()


def _cmd_info(args: argparse.Namespace) -> int:
    from .auto import AutoConfig, AutoModelForCausalLM
    from .tokenization import AutoTokenizer

    ids = None
    if args.ids is not None:
        try:
            ids = [int(i) for i in args.ids.split(",") if i.strip()]
        except ValueError:
            ids = None
        if not ids:
            raise CLIError(f"--ids takes comma-separated token ids, e.g. --ids 1,2,3 (got {args.ids!r})")
    path = _model_path(args.model)
    config = AutoConfig.from_pretrained(path)
    text_config = config.get_text_config()
    if ids:  # before loading the weights
        vocab = text_config.vocab_size
        outside = [i for i in ids if not 0 <= i < vocab]
        if outside:
            raise CLIError(f"--ids {outside[0]} is outside the vocabulary; token ids go from 0 to {vocab - 1}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, device_map=_device(args),
                                                 quantization_config=_quantization(args, path))
    print(f"model_type:        {config.model_type}")
    print(f"class:             {type(model).__name__}")
    print(f"parameters:        {_parameter_count(model):,}")
    print(f"dtype / device:    {model.dtype} / {model.device}")
    print(f"layers x hidden:   {text_config.num_hidden_layers} x {text_config.hidden_size}")
    print(f"heads (kv heads):  {text_config.num_attention_heads} ({text_config.num_key_value_heads})")
    print(f"vocabulary:        {text_config.vocab_size}")
    print(f"context:           {getattr(text_config, 'max_position_embeddings', None)} tokens (max_position_embeddings)")
    print(f"rope:              {text_config.rope_parameters}")
    print(f"weights:           {_weight_formats(model)}")
    if ids:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (ValueError, OSError) as error:
            print(f"text:              (no tokenizer: {_first_line(error)})")
        else:
            print(f"text:              {tokenizer.decode(ids)!r}")
        tensor = torch.tensor([ids], device=model.device)
        with torch.inference_mode():
            logits = model(tensor, logits_to_keep=1).logits[0, -1].float()
        top = logits.topk(min(5, logits.numel()))
        pairs = ", ".join(f"{i}: {v:.3f}" for i, v in zip(top.indices.tolist(), top.values.tolist()))
        print(f"next-token top 5:  {pairs}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    """The memory plan of a model (its config only, never its weights), and whether it fits the first GPU."""
    from . import bench
    from .memory_plan import plan_memory, table

    for flag, value, least in (("--max-new-tokens", args.max_new_tokens, 0), ("--prompt-tokens", args.prompt_tokens, 0),
                               ("--batch-size", args.batch_size, 1), ("--tp", args.tp, 1)):
        if value < least:
            raise CLIError(f"{flag} must be >= {least}")
    if args.prefill_chunk_size is not None and args.prefill_chunk_size < 1:
        from .decoding.decoders import PREFILL_CHUNK

        raise CLIError(f"--prefill-chunk-size must be >= 1 (prompt tokens per prefill step); leave it out for {PREFILL_CHUNK}")
    if args.model in bench.ARCHITECTURES:
        config = bench.architecture_config(args.model, args.layers)
    else:
        if args.layers is not None:
            raise CLIError("--layers applies to a named architecture only; a checkpoint's config gives its layers")
        from .auto import AutoConfig

        config = AutoConfig.from_pretrained(_checkpoint_or_architecture(args.model))
    if args.tp > 1:  # as from_pretrained(tp_plan="auto") would refuse it
        from .parallel.tensor_parallel import check_sizes

        try:
            check_sizes(config.get_text_config(), args.tp)
        except ValueError as error:
            raise CLIError(str(error).replace("tp_size=", "--tp ").replace("use a tp_size in", "use --tp in")) from None
    if args.dtype == "auto":
        from .configuration import dtype_from_name

        dtype = (dtype_from_name(getattr(config, "dtype", None)) or dtype_from_name(config.get_text_config().dtype)
                 or torch.bfloat16)
    else:
        dtype = getattr(torch, args.dtype)
    plan = plan_memory(config, dtype=dtype, quantization=args.quantization, prompt_tokens=args.prompt_tokens,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, tp=args.tp,
                       kv_cache_dtype=args.kv_cache_dtype, prefill_chunk_size=args.prefill_chunk_size)
    print(f"{args.model}: {str(dtype).removeprefix('torch.')}"
          + (f", {args.quantization}" if args.quantization else "")
          + (f", {args.kv_cache_dtype} KV cache" if args.kv_cache_dtype else "")
          + f", batch {args.batch_size}, {args.prompt_tokens} prompt + {args.max_new_tokens} new tokens")
    print(table(plan))
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        print(f"GPU 0 ({free / 1e9:.1f} GB free): {plan.suggestion(free)}")
    return 0


# --- herd serve -----------------------------------------------------------------------------------


def _check_serve_options(args: argparse.Namespace) -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise CLIError(f"herd serve needs {error.name}: pip install 'herd[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {args.port}")
    for flag, value, least in (("--max-batch", args.max_batch, 1), ("--max-waiting", args.max_waiting, 0),
                               ("--tp", args.tp, 1), ("--max-num-batched-tokens", args.max_num_batched_tokens, 1)):
        if value < least:
            raise CLIError(f"{flag} must be >= {least}, got {value}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise CLIError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    if args.tp > 1 and args.device is not None:
        raise CLIError(f"--device does not go with --tp {args.tp}: each rank runs on its own GPU (cuda:LOCAL_RANK, "
                       "the CPU without CUDA); leave --device out")
    if args.allowed_local_media_path is not None and not Path(args.allowed_local_media_path).is_dir():
        raise CLIError(f"--allowed-local-media-path {args.allowed_local_media_path} is not a folder")


def _load_for_serving(path: str, args: argparse.Namespace):
    """(model, tokenizer, processor or None): the image-and-text class and its processor for Mllama and
    Llama 4 folders that hold a processor's files, the text model otherwise."""
    from .auto import (
        PROCESSOR_CLASSES,
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
    )
    from .tokenization import AutoTokenizer

    kwargs = dict(dtype=args.dtype, device_map=_device(args), quantization_config=_quantization(args, path))
    if args.tp > 1:  # this rank's slice, on its own device (herd.parallel.tensor_parallel)
        kwargs.update(device_map=None, tp_plan="auto", tp_size=args.tp)
    folder = Path(path)
    takes_images = folder.is_dir() and AutoConfig.from_pretrained(path).model_type in PROCESSOR_CLASSES and any(
        (folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))
    if takes_images:
        processor = AutoProcessor.from_pretrained(path)
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval(), processor.tokenizer, processor
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval(), AutoTokenizer.from_pretrained(path), None


def _sampling_defaults(model) -> dict[str, Any]:
    """The checkpoint's generation_config sampling values, for requests that leave them out (as vLLM does)."""
    config = getattr(model, "generation_config", None)
    if config is None or not getattr(config, "do_sample", False):
        return {}
    return {name: getattr(config, name) for name in ("temperature", "top_p", "top_k")
            if getattr(config, name, None) is not None}


def _torchrun_command(args: argparse.Namespace) -> list[str]:
    """`herd serve ... --tp N` started again under torchrun: N processes on this machine, one per GPU."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.tp}",
            "-m", "herd", *args.argv]


def _serving_engine(model, args: argparse.Namespace):
    """The engine (the same arguments on every rank under --tp: the same pools and batch sizes)."""
    from .serving.engine import Engine

    return Engine(model, max_batch=args.max_batch, max_model_len=args.max_model_len, max_waiting=args.max_waiting,
                  prefill_chunk=args.max_num_batched_tokens, kv_cache_dtype=args.kv_cache_dtype,
                  async_scheduling=False if args.no_async_scheduling else None)


def _follow(path: str, args: argparse.Namespace) -> int:
    """A rank other than 0 under --tp: load this rank's slice, then run rank 0's steps until it stops."""
    import signal

    from .serving.parallel import Follower

    model, _, _ = _load_for_serving(path, args)
    engine = _serving_engine(model, args)
    # Ctrl-C and torchrun's SIGTERM reach every rank: rank 0 drains its requests (which need this
    # rank's steps) and then sends the shutdown message; torchrun kills a rank that outlives its wait
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)
    steps = Follower(engine.runner).run()
    print(f"herd: rank {os.environ['RANK']} stopped with rank 0 ({steps} steps followed)", file=sys.stderr, flush=True)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """Answer 503 at once, load the model in the background, then serve; Ctrl-C / SIGTERM drains.
    With --tp N: started under torchrun (or starting it), rank 0 serves and the other ranks follow
    its steps (serving/parallel.py)."""
    import threading

    import uvicorn

    from .serving.media import MediaPolicy
    from .serving.server import ModelInfo, Server

    _check_serve_options(args)
    path = _model_path(args.model)
    if args.tp > 1 and "RANK" not in os.environ:
        command = _torchrun_command(args)
        print(f"herd: --tp {args.tp}: starting {' '.join(command[2:])}", file=sys.stderr, flush=True)
        os.execv(sys.executable, command)
    if args.tp > 1 and int(os.environ["RANK"]) != 0:
        return _follow(path, args)
    name = args.served_model_name or args.model
    media = MediaPolicy(allow_remote=not args.no_remote_media,
                        allowed_local_path=Path(args.allowed_local_media_path) if args.allowed_local_media_path else None)
    server = Server(model_name=name, api_key=args.api_key or os.environ.get("HERD_API_KEY") or None, media=media)
    failure: list[BaseException] = []
    leader = []  # under --tp: rank 0's Leader, to stop the followers once the server is down

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):
            server.state = "draining"  # new requests get 503 while the running ones finish
            super().handle_exit(sig, frame)

    web = _Uvicorn(uvicorn.Config(server.app, host=args.host, port=args.port, log_level="info",
                                  timeout_graceful_shutdown=30))

    def load() -> None:
        try:
            from .serving.engine import AsyncEngine
            from .serving.parallel import Leader

            model, tokenizer, processor = _load_for_serving(path, args)
            config = model.config.get_text_config()
            engine = _serving_engine(model, args)
            if args.tp > 1:
                engine.runner = Leader(engine.runner)
                leader.append(engine.runner)

            def captured(rows: int, index: int, count: int) -> None:
                print(f"herd: compiling and capturing the decode step for {rows} rows ({index + 1}/{count})",
                      file=sys.stderr, flush=True)

            engine.warm_up(captured)
            eos = getattr(model.generation_config, "eos_token_id", None)
            info = ModelInfo(tokenizer=tokenizer, processor=processor,
                             eos_token_ids=tuple([eos] if isinstance(eos, int) else eos or ()),
                             vocab_size=config.vocab_size, max_model_len=engine.max_model_len,
                             sampling_defaults=_sampling_defaults(model))
            while not web.started and not web.should_exit:
                time.sleep(0.05)
            server.attach_from_thread(AsyncEngine(engine), info)
            kv = f", {args.kv_cache_dtype} KV cache" if args.kv_cache_dtype else ""
            print(f"herd: serving {name} ({type(model).__name__}, {model.dtype}, {model.device}{kv}) at "
                  f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failure.append(error)
            web.should_exit = True

    threading.Thread(target=load, daemon=True, name="herd-load").start()
    try:
        web.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has drained and shut down: a normal stop
        pass
    finally:
        if leader:  # the engine thread has stopped with the server: no step runs beside this message
            leader[0].shutdown()
    if failure:
        raise failure[0]
    return 0


# --- the parser -----------------------------------------------------------------------------------


def _add_model_options(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    parser.add_argument("model", nargs="?" if optional else None, default=None,
                        help="a model folder, a .gguf file or a Hugging Face Hub id")
    parser.add_argument("--dtype", default="auto", type=dtype_name,
                        help="auto (the checkpoint's), float32/fp32, bfloat16/bf16 or float16/fp16")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N or auto (default: cuda where there is a GPU, else cpu)")
    parser.add_argument("--quantization", default=None, choices=("fp8", "int8", "int4"),
                        help="quantize the weights while loading: fp8 = FbgemmFp8Config(), int8 / int4 = "
                             "TorchAoConfig('int8_weight_only') / ('int4_weight_only', group_size=128; 64 or 32 "
                             "where 128 does not divide the layers)")


def _int4_group_size(path: str) -> int:
    """128, else the largest of 64 and 32 that divides every quantized layer's input features (SmolLM2's
    576 takes 64); 128 where none does (from_pretrained then names the layer)."""
    from .auto import AutoConfig

    text = AutoConfig.from_pretrained(path).get_text_config()
    heads = getattr(text, "num_attention_heads", None) or 1
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    features = [text.hidden_size, heads * head_dim] + [
        value for value in (getattr(text, "intermediate_size", None), getattr(text, "intermediate_size_mlp", None))
        if isinstance(value, int)]
    return next((size for size in (128, 64, 32) if all(f % size == 0 for f in features)), 128)


def _quantization(args: argparse.Namespace, path: str | None = None):
    """--quantization's config; int4's group size is 128 unless the model's layers need 64 or 32 (said on stderr)."""
    from .quantization import TorchAoConfig, config_from_name

    name = getattr(args, "quantization", None)
    if name == "int4" and path is not None:
        group_size = _int4_group_size(path)
        if group_size != 128:
            print(f"herd: note: --quantization int4 uses group_size {group_size}: 128 does not divide this model's "
                  "layers", file=sys.stderr, flush=True)
            return TorchAoConfig("int4_weight_only", group_size=group_size)
    return config_from_name(name)


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="new tokens per answer at most (default 256; fewer where the context ends)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 for greedy; default: the model's (a sampling flag without it samples)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling (implies sampling)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (implies sampling)")
    parser.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p x the top probability (implies sampling)")
    parser.add_argument("--seed", type=int, default=None, help="seed the sampling (the same seed, the same text)")
    parser.add_argument("--system", default=None, help="a system prompt (uses the chat template)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="herd", description="Run Llama-family models.")
    parser.add_argument("--version", action="version", version=f"herd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="continue a prompt, streaming the text")
    _add_model_options(generate)
    generate.add_argument("prompt", help="the text to continue (printed before the continuation), or the user "
                          "message with --chat / --system; - reads it from stdin (- < prompt.txt)")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    generate.add_argument("--verbose", action="store_true", help="print the load time and the prompt and decode speeds")
    _add_generation_options(generate)
    generate.set_defaults(handler=_cmd_generate)

    chat = commands.add_parser("chat", help="talk with a chat model in the terminal (or with a server: --url)")
    _add_model_options(chat, optional=True)
    _add_generation_options(chat)
    chat.add_argument("--url", default=None, help="talk to a running server instead (herd serve, or any "
                      "OpenAI-compatible one), e.g. http://127.0.0.1:8000; MODEL then picks its model")
    chat.add_argument("--api-key", default=None, help="the server's API key (default: $HERD_API_KEY)")
    chat.set_defaults(handler=_cmd_chat)

    info = commands.add_parser("info", help="load a checkpoint and describe it")
    _add_model_options(info)
    info.add_argument("--ids", default=None, help="comma-separated token ids: their text and one forward on them")
    info.set_defaults(handler=_cmd_info)

    bench = commands.add_parser("bench", help="decode and prefill speed (GPU, or CPU), optionally against transformers")
    add_bench_arguments(bench)
    bench.set_defaults(handler=_cmd_bench)

    plan = commands.add_parser("plan", help="the memory a model needs (weights, KV cache, activations), from its config")
    plan.add_argument("model", help="a model folder or Hub id (only config.json is read), or one of: "
                      + ", ".join(ARCHITECTURE_NAMES))
    plan.add_argument("--dtype", default="auto", type=dtype_name,
                      help="auto (the config's, else bfloat16), float32/fp32, bfloat16/bf16 or float16/fp16")
    plan.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS))
    plan.add_argument("--prompt-tokens", type=int, default=128)
    plan.add_argument("--max-new-tokens", type=int, default=256)
    plan.add_argument("--batch-size", type=int, default=1)
    plan.add_argument("--layers", type=int, default=None, help="override the number of layers of a named architecture")
    plan.add_argument("--tp", type=int, default=1, help="tensor parallel over this many GPUs (an even split)")
    plan.add_argument("--kv-cache-dtype", default=None, choices=["fp8"],
                      help="FP8 keys/values for the full-attention layers (generate's cache_config={'dtype': 'fp8'})")
    plan.add_argument("--prefill-chunk-size", type=int, default=None,
                      help="prefill this many prompt tokens at a time (activations; default: generate's, 16384)")
    plan.set_defaults(handler=_cmd_plan)

    serve = commands.add_parser("serve", help="an OpenAI-compatible server (chat, completions, images, tools, /metrics)")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--tp", type=int, default=1,
                       help="tensor parallel over this many GPUs: run under torchrun --nproc-per-node N, or herd "
                            "starts torchrun itself on this machine")
    serve.add_argument("--max-batch", type=int, default=256, help="requests decoded together at most")
    serve.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_PREFILL_TOKENS,
                       help="prompt tokens prefilled per step at most, across requests (vLLM's name; default "
                            f"{DEFAULT_PREFILL_TOKENS}): more raises throughput, fewer keeps running answers flowing")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="prompt + answer tokens per request at most (default: the model's context)")
    serve.add_argument("--max-waiting", type=int, default=1024,
                       help="requests waiting for a batch slot at most; beyond, requests get 429")
    serve.add_argument("--kv-cache-dtype", default=None, choices=["fp8"],
                       help="FP8 keys/values in the full-attention layers' KV pools (a float32 scale per head of "
                            "each token): about twice the requests fit, attention reads half the bytes")
    serve.add_argument("--no-async-scheduling", action="store_true",
                       help="wait for each step's tokens before preparing the next (by default on a GPU the host "
                            "prepares a step while the one before runs; never under --tp)")
    serve.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer ...); "
                       "default: $HERD_API_KEY, else none")
    serve.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL)")
    serve.add_argument("--allowed-local-media-path", default=None,
                       help="a folder whose images requests may name by path or file:// URL (default: none)")
    serve.add_argument("--no-remote-media", action="store_true", help="refuse http(s) image URLs (data: URLs only)")
    serve.set_defaults(handler=_cmd_serve)
    return parser


def _cmd_bench(args: argparse.Namespace) -> int:
    """`herd bench`: its numbers and model checked here (one-line errors naming the fix), then bench.main."""
    from .bench import REFERENCES

    if args.compare and args.compare not in REFERENCES:
        raise CLIError(f"--compare {args.compare}: no reference is registered and herd never imports other libraries; "
                       f"run `python bench/compare.py {args.model} --compare {args.compare} ...` from the repository")
    for flag, values in (("--batch-sizes", args.batch_sizes), ("--prefill-lengths", args.prefill_lengths),
                         ("--prompt-length", [args.prompt_length]), ("--layers", [args.layers])):
        bad = [value for value in values if value is not None and value < 1]
        if bad:
            raise CLIError(f"{flag} must be >= 1, got {bad[0]}")
    if args.model not in ARCHITECTURE_NAMES:
        if args.layers is not None:
            raise CLIError("--layers applies to a named architecture only; a checkpoint's config gives its layers")
        args.model = _checkpoint_or_architecture(args.model)
    return run_bench_command(args)


def _checkpoint_or_architecture(name: str) -> str:
    """_model_path for `herd plan` / `herd bench`, whose MODEL may also be a named architecture: a plain
    name that is no folder is most likely a mistyped one, and the error lists them."""
    try:
        return _model_path(name)
    except CLIError as error:
        if "/" in name or Path(name).expanduser().exists():
            raise
        raise CLIError(f"{name} is not a named architecture ({', '.join(ARCHITECTURE_NAMES)}), a model folder, "
                       f"a .gguf file or a Hub id in reach ({error}); check the name") from None


def _check_device(args: argparse.Namespace) -> None:
    device = getattr(args, "device", None)
    if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("CUDA is not available on this machine; use --device cpu")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # herd serve --tp starts itself again under torchrun
    try:
        _check_device(args)
        return args.handler(args)
    except KeyboardInterrupt:
        print("\nherd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `herd generate ... | head`: the reader has what it wanted; stop quietly, as SIGPIPE would
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush of stdout does not fail again
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass
        return 141
    except Exception as error:
        if os.environ.get("HERD_DEBUG"):
            raise
        if isinstance(error, (CLIError, ValueError, FileNotFoundError, NotImplementedError)):
            text = " ".join(str(error).split())
            if getattr(args, "quantization", None) == "int4" and "group_size" in text and "does not divide" in text:
                text += "; on the command line use --quantization int8 or fp8 for this model"
        else:
            text = " ".join(_first_line(error).split()) + " (HERD_DEBUG=1 shows the traceback)"
        print(f"herd: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
