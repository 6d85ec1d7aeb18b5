"""A bounded load test on loopback, over the real engine and a tiny random Llama: 40 streaming
clients at once with random prompt and answer lengths, a quarter of them leaving mid-answer; every
finished answer whole and its own (equal to the same request sent alone afterwards), every
cancelled request's blocks freed (the metrics back to zero), 429 under overload, the server alive
throughout."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

import herd
from tests.conftest import SHARED_DATA, reference_llama, save_reference

from .conftest import engine_server, live

CLIENTS = 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_reference(reference_llama(max_position_embeddings=256), tmp_path_factory.mktemp("load") / "tiny")
    model = herd.AutoModelForCausalLM.from_pretrained(folder, progress=False).eval()
    # the Llama 3 tokenizer only turns the tiny vocabulary's ids (single bytes) into text
    tokenizer = herd.AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "llama3.1")
    return model, tokenizer


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def stream_one(client: httpx.AsyncClient, body: dict, leave_after: int | None) -> dict:
    """One streaming completion; with leave_after, the client disconnects after that many chunks."""
    text, ids, usage, finish, chunks = "", set(), None, None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            ids.add(chunk["id"])
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
                finish = chunk["choices"][0]["finish_reason"] or finish
                chunks += 1
            else:
                usage = chunk["usage"]
            if leave_after is not None and chunks >= leave_after:
                return {"left": True}
    return {"left": False, "text": text, "ids": ids, "usage": usage, "finish": finish}


def wait_idle(url: str) -> str:
    """/metrics once nothing runs (or after 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(url + "/metrics").text
        if metric(text, "herd_requests_running") == metric(text, "herd_kv_blocks_used") == 0 or \
                time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_many_streaming_clients_with_cancellations(tiny):
    model, tokenizer = tiny
    rng = random.Random(0)
    bodies, leaves = [], []
    for _ in range(CLIENTS):
        prompt = [rng.randrange(1, 128) for _ in range(rng.randrange(4, 60))]
        leave = rng.randrange(1, 4) if rng.random() < 0.25 else None
        # a client that leaves asked for all the room there is: only an abort stops its request early
        max_tokens = 255 - len(prompt) if leave else rng.randrange(4, 48)
        bodies.append({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}})
        leaves.append(leave)
    started = time.monotonic()
    server = engine_server(model, tokenizer, name="tiny", engine_kwargs={"max_batch": 16, "max_model_len": 256})
    with live(server) as running:
        async def run_all():
            async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
                alive = asyncio.create_task(watch_health(client))
                results = await asyncio.gather(*(stream_one(client, b, leave) for b, leave in zip(bodies, leaves)))
                alive.cancel()
                return results

        async def watch_health(client):
            while True:
                assert (await client.get("/health")).status_code == 200
                await asyncio.sleep(0.2)

        results = asyncio.run(run_all())
        finished = [(b, r) for b, r in zip(bodies, results) if not r["left"]]
        assert sum(r["left"] for r in results) == sum(leave is not None for leave in leaves) > 0
        for body, result in finished:
            assert len(result["ids"]) == 1 and result["finish"] == "length"
            assert result["usage"]["completion_tokens"] == body["max_tokens"]
            assert result["usage"]["prompt_tokens"] == len(body["prompt"])
        text = wait_idle(running.url)
        assert metric(text, "herd_requests_running") == 0 and metric(text, "herd_requests_waiting") == 0
        assert metric(text, "herd_kv_blocks_used") == 0
        assert metric(text, "herd_http_requests_in_flight") == 0
        # the cancelled requests stopped soon after their clients left, far from their hundreds of tokens
        cancelled = [b["max_tokens"] for b, leave in zip(bodies, leaves) if leave is not None]
        generated = metric(text, "herd_engine_generated_tokens_total")
        assert generated - sum(b["max_tokens"] for b, _ in finished) < 40 * len(cancelled) < sum(cancelled) / 4
        # each answer is its own: the same request alone gives the same text
        for body, result in finished:
            alone = httpx.post(running.url + "/v1/completions", timeout=60,
                               json={**body, "stream": False, "stream_options": None}).json()
            assert alone["choices"][0]["text"] == result["text"]
        assert metric(wait_idle(running.url), "herd_kv_blocks_used") == 0
    assert time.monotonic() - started < 60


def test_overload_gets_429_and_the_server_stays_up(tiny):
    model, tokenizer = tiny
    server = engine_server(model, tokenizer, name="tiny",
                           engine_kwargs={"max_batch": 1, "max_waiting": 1, "max_model_len": 256})
    body = {"prompt": [5, 6, 7], "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    with live(server) as running:
        async def burst():
            async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(8)))

        statuses = sorted(response.status_code for response in asyncio.run(burst()))
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}
        assert httpx.get(running.url + "/health").status_code == 200
        assert httpx.post(running.url + "/v1/completions", json=body, timeout=60).status_code == 200
