"""Time the per-token mask of a JSON-schema grammar over a 128k Llama 3 vocabulary: llguidance vs xgrammar.

How herd chose the grammar library behind response_format (serving/structured.py). For each library:
the one-time cost (tokenizer preparation, schema compilation) and the time to compute the allowed-token
mask at each step while forcing a valid JSON document through the matcher token by token (the
serving cost: it runs once per generated token of a constrained request).

    python bench/grammar_mask.py [--tokenizer ../shared/data/tokenizers/llama3.1]

xgrammar's tokenizer info is built from transformers' tokenizer (xgrammar needs it); this script is a
measurement, the package never imports either here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib.metadata import version
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
                       "tags": ["math", "engines", "poetry"], "address": {"city": "London", "zip": "W1"},
                       "active": True})


def _percentiles(times_s: list[float]) -> str:
    ordered = sorted(times_s)
    p50 = ordered[len(ordered) // 2] * 1e6
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6
    return f"mean {statistics.mean(times_s) * 1e6:.0f} us, p50 {p50:.0f} us, p99 {p99:.0f} us, max {max(times_s) * 1e6:.0f} us"


def bench_llguidance(tokenizer_json: str, ids: list[int]) -> None:
    import llguidance

    start = time.perf_counter()
    lltokenizer = llguidance.LLTokenizer(tokenizer_json)
    prepared = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    matcher = llguidance.LLMatcher(lltokenizer, grammar)
    compiled = time.perf_counter()
    assert not matcher.is_error(), matcher.get_error()
    times = []
    for token in ids:
        t0 = time.perf_counter()
        mask = matcher.compute_bitmask()
        times.append(time.perf_counter() - t0)
        assert mask[token // 8] >> (token % 8) & 1, f"llguidance refused token {token}"
        assert matcher.consume_token(token), matcher.get_error()
    print(f"llguidance {version('llguidance')}: tokenizer {prepared - start:.2f} s, schema {compiled - prepared:.3f} s; "
          f"mask per token over {len(ids)} tokens: {_percentiles(times)}")


def bench_xgrammar(tokenizer_path: Path, ids: list[int]) -> None:
    import torch
    import transformers
    import xgrammar

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer)
    compiler = xgrammar.GrammarCompiler(info)
    prepared = time.perf_counter()
    compiled_grammar = compiler.compile_json_schema(json.dumps(SCHEMA))
    matcher = xgrammar.GrammarMatcher(compiled_grammar)
    compiled = time.perf_counter()
    bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for token in ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        times.append(time.perf_counter() - t0)
        word = int(bitmask[0, token // 32])
        assert (word >> (token % 32)) & 1, f"xgrammar refused token {token}"
        assert matcher.accept_token(token)
    print(f"xgrammar {version('xgrammar')}: tokenizer {prepared - start:.2f} s, schema {compiled - prepared:.3f} s; "
          f"mask per token over {len(ids)} tokens: {_percentiles(times)} (torch {torch.__version__})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/data/tokenizers/llama3.1")
    parser.add_argument("--libraries", default="llguidance,xgrammar")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    ids = tokenizer.encode(DOCUMENT, add_special_tokens=False).ids
    print(f"vocabulary {tokenizer.get_vocab_size()} tokens; document {len(ids)} tokens")
    for name in args.libraries.split(","):
        if name == "llguidance":
            bench_llguidance((args.tokenizer / "tokenizer.json").read_text(), ids)
        elif name == "xgrammar":
            bench_xgrammar(args.tokenizer, ids)


if __name__ == "__main__":
    main()
