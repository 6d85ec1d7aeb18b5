"""Load an OpenAI-compatible server with N concurrent streaming clients; print output tokens/s and
time-to-first-token percentiles, per concurrency level.

Each client sends prompts of --prompt-tokens tokens (distinct random words, so no two requests
share a prefix beyond the template) and asks for exactly --new-tokens tokens: end of sequence is
ignored through the request's extra body, in the server's own terms (`--server herd`:
`ignore_eos: true`; `--server transformers`: a `generation_config` with min_new_tokens =
max_new_tokens, which is what `transformers serve` reads). Usage counts come from
stream_options.include_usage where the server gives them, else from the streamed chunks.

    herd serve meta-llama/Llama-3.1-8B-Instruct --dtype bfloat16 --port 8000 &
    python bench/serve_client.py --url http://127.0.0.1:8000 --concurrency 16,64,256 \\
        --tokenizer meta-llama/Llama-3.1-8B-Instruct

    transformers serve meta-llama/Llama-3.1-8B-Instruct --continuous-batching --dtype bfloat16 --port 8001 &
    python bench/serve_client.py --url http://127.0.0.1:8001 --server transformers --concurrency 16,64,256 \\
        --tokenizer meta-llama/Llama-3.1-8B-Instruct
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

WORDS = ["time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world", "school", "state", "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week", "company", "system", "program", "question", "work", "government", "number", "night", "point", "home", "water", "room", "mother", "area", "money", "story", "fact", "month", "lot", "right", "study", "book", "eye", "job", "word", "business", "issue", "side", "kind", "head", "house", "service", "friend", "father", "power", "hour", "game", "line", "end", "member", "law", "car", "city", "community", "name", "president", "team", "minute", "idea", "kid", "body", "information", "back", "parent", "face", "others", "level", "office", "door", "health", "person", "art", "war", "history", "party", "result", "change", "morning", "reason", "research", "girl", "guy", "moment", "air", "teacher", "force", "education"]


@dataclass
class Outcome:
    ttft_s: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Level:
    concurrency: int
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0


def make_prompts(count: int, prompt_tokens: int, tokenizer_name: str | None, seed: int) -> list[str]:
    rng = random.Random(seed)
    encode = None
    if tokenizer_name:
        from herd import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    prompts = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(prompt_tokens * 2)]
        text = " ".join(words)
        if encode is not None:  # exactly prompt_tokens tokens (the server may add BOS)
            ids = encode(text)[:prompt_tokens]
            text = tokenizer.decode(ids)
        else:  # about one token per English word
            text = " ".join(words[:prompt_tokens])
        prompts.append(text)
    return prompts


def extra_body(server: str, new_tokens: int) -> dict:
    if server == "herd":
        return {"ignore_eos": True}
    return {"generation_config": json.dumps({"max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                                             "do_sample": False})}


async def one_request(client, args, prompt: str) -> Outcome:
    outcome = Outcome()
    start = time.perf_counter()
    try:
        common = dict(model=args.model, max_tokens=args.new_tokens, temperature=0, stream=True,
                      stream_options={"include_usage": True}, extra_body=extra_body(args.server, args.new_tokens))
        if args.endpoint == "chat":
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
        else:
            stream = await client.completions.create(prompt=prompt, **common)
        chunks, usage = 0, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            text = choice.delta.content if args.endpoint == "chat" else choice.text
            if text:
                if outcome.ttft_s is None:
                    outcome.ttft_s = time.perf_counter() - start
                chunks += 1
        outcome.tokens = usage if usage is not None else chunks
    except Exception as error:  # noqa: BLE001 - counted and reported
        outcome.error = f"{type(error).__name__}: {error}"
    outcome.seconds = time.perf_counter() - start
    return outcome


async def run_level(args, concurrency: int, prompts: list[str]) -> Level:
    import openai

    client = openai.AsyncOpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key or "none",
                                max_retries=0, timeout=3600)
    level = Level(concurrency)
    queue = list(prompts[: concurrency * args.requests_per_client])

    async def worker():
        while queue:
            level.outcomes.append(await one_request(client, args, queue.pop()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    level.wall_s = time.perf_counter() - start
    await client.close()
    return level


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def report(level: Level, args) -> dict:
    done = [o for o in level.outcomes if o.error is None]
    ttfts = [o.ttft_s for o in done if o.ttft_s is not None]
    tokens = sum(o.tokens for o in done)
    row = {"server": args.server, "concurrency": level.concurrency, "requests": len(level.outcomes),
           "failed": len(level.outcomes) - len(done), "output_tokens": tokens, "wall_s": round(level.wall_s, 2),
           "output_tok_per_s": round(tokens / level.wall_s, 1) if level.wall_s else 0.0,
           "short_answers": sum(o.tokens < args.new_tokens for o in done)}
    if ttfts:
        row.update({f"ttft_p{int(q * 100)}_ms": round(percentile(ttfts, q) * 1000, 1) for q in (0.5, 0.9, 0.99)})
        row["ttft_mean_ms"] = round(statistics.mean(ttfts) * 1000, 1)
    errors = [o.error for o in level.outcomes if o.error]
    if errors:
        row["first_error"] = errors[0][:200]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--server", choices=("herd", "transformers"), default="herd",
                        help="how to ask the server to ignore end of sequence")
    parser.add_argument("--model", default=None, help="the model name to send (default: the server's first)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    parser.add_argument("--concurrency", default="16,64,256", help="comma-separated client counts, one run each")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer (folder or Hub id) for exact prompt lengths")
    parser.add_argument("--warmup", type=int, default=4, help="requests sent first and not counted")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.model is None:
        import httpx

        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        args.model = httpx.get(args.url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    levels = [int(n) for n in args.concurrency.split(",")]
    prompts = make_prompts(max(levels) * args.requests_per_client + args.warmup, args.prompt_tokens, args.tokenizer,
                           args.seed)
    print(json.dumps({"url": args.url, "server": args.server, "model": args.model, "endpoint": args.endpoint,
                      "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}), flush=True)
    if args.warmup:
        asyncio.run(run_level(args, args.warmup, prompts[-args.warmup:]))
    for concurrency in levels:
        level = asyncio.run(run_level(args, concurrency, prompts))
        print(json.dumps(report(level, args)), flush=True)


if __name__ == "__main__":
    main()
