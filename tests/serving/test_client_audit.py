"""Requests real OpenAI clients send that the other API tests leave out: n choices streamed with
logprobs and usage, choices started together, cancellations of n streams at once, and malformed or
unsupported fields that must be a 4xx naming the field (never a 500, never silently ignored).

The scripted-engine half reuses test_server.py's Llama 3.1 script; the real-model half runs
SmolLM2-135M-Instruct over the real engine with the official openai client."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from herd.serving.server import ModelInfo, Server

from .conftest import Recording, engine_server, live
from .fake_engine import FakeAsyncEngine, FakeEngine
from .test_server import EOS_IDS, TOOLS, assert_error, post, say, scripted, tokenizer  # noqa: F401 - a fixture

openai = pytest.importorskip("openai")


class OrderLog(Recording):
    """An AsyncEngine that notes, in order, each generate() call and each event it hands out."""

    def __init__(self, inner):
        super().__init__(inner)
        self.log: list[tuple[str, str]] = []

    def generate(self, request):
        self.log.append(("generate", request.request_id))
        stream, log = self.inner.generate(request), self.log

        async def events():
            try:
                async for event in stream:
                    log.append(("event", request.request_id))
                    yield event
            finally:
                await stream.aclose()

        return events()


@pytest.fixture(scope="module")
def ordered(tokenizer):  # noqa: F811 - test_server's fixture
    fake = FakeEngine(script=scripted(tokenizer))
    fake.eos_token_ids = EOS_IDS
    engine = OrderLog(FakeAsyncEngine(fake))
    model = ModelInfo(tokenizer=tokenizer, eos_token_ids=EOS_IDS, vocab_size=128256, max_model_len=512)
    with live(Server(model_name="llama", engine=engine, model=model)) as server:
        server.log = engine.log
        yield server


@pytest.mark.parametrize("path, body, requests", [
    ("/v1/chat/completions", say("one two three", n=3), 3),
    ("/v1/completions", {"prompt": ["SAY:one", "SAY:two"], "n": 2, "max_tokens": 3}, 4),
])
def test_all_choices_reach_the_engine_before_any_first_token_is_awaited(ordered, path, body, requests):
    """n choices (and the prompts of a list) are queued together and prefilled in one batch; queued one
    at a time, each behind the previous one's first token, n=8 took 2.6x as long on SmolLM2."""
    ordered.log.clear()
    assert post(ordered, path, body).status_code == 200
    kinds = [kind for kind, _ in ordered.log]
    assert kinds[:requests] == ["generate"] * requests and kinds.count("generate") == requests


@pytest.mark.parametrize("path, body, param", [
    # a function given as a bare name instead of {"name": ...}: was a 500 (AttributeError)
    ("/v1/chat/completions", say("x", tools=TOOLS, tool_choice={"type": "function", "function": "get_weather"}),
     "tool_choice"),
    # best_of other than n was silently ignored (n samples came back, not the best n of best_of)
    ("/v1/completions", {"prompt": "SAY:x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "SAY:x", "best_of": 1, "n": 2}, "best_of"),
    ("/v1/completions", {"prompt": "SAY:x", "best_of": 0}, "best_of"),
])
def test_malformed_or_unsupported_fields_are_400s_naming_them(ordered, path, body, param):
    assert_error(post(ordered, path, body), 400, param, param)


def test_deeply_nested_json_is_a_400(ordered):
    """Arrays nested past Python's recursion limit were a 500 (RecursionError) instead of a 400."""
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert_error(post(ordered, path, b"[" * 100_000), 400, None, "nested")


def test_what_vllm_accepts_is_accepted(ordered):
    """best_of equal to n (LangChain's OpenAI LLM sends best_of 1), top_logprobs 0 without logprobs."""
    answer = post(ordered, "/v1/completions", {"prompt": "SAY:x", "best_of": 2, "n": 2, "max_tokens": 3})
    assert answer.status_code == 200 and len(answer.json()["choices"]) == 2
    answer = post(ordered, "/v1/chat/completions", say("ok", top_logprobs=0))
    assert answer.status_code == 200 and answer.json()["choices"][0]["logprobs"] is None


# --- the real model through the official client ---------------------------------------------------

QUESTION = [{"role": "user", "content": "Tell me a story about a dragon."}]


@pytest.fixture(scope="module")
def real(smollm2):
    model, smol_tokenizer = smollm2
    with live(engine_server(model, smol_tokenizer, name="smollm2")) as server:
        yield server


@pytest.fixture(scope="module")
def client(real):
    return openai.OpenAI(base_url=real.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_n_streamed_choices_each_finish_once_with_their_logprobs_and_the_whole_usage(client):
    """stream, n=3, logprobs, include_usage: each index has one role chunk first and one finish last;
    its pieces and logprob tokens are the non-streamed choice's; one usage chunk with the totals."""
    options = {"model": "smollm2", "messages": QUESTION, "n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 6,
               "logprobs": True, "top_logprobs": 2}
    whole = client.chat.completions.create(**options)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **options))
    assert all(len(chunk.choices) == 1 and chunk.usage is None for chunk in chunks[:-1])
    for choice in whole.choices:
        mine = [chunk.choices[0] for chunk in chunks[:-1] if chunk.choices[0].index == choice.index]
        assert [c.delta.role for c in mine] == ["assistant"] + [None] * (len(mine) - 1)
        assert [c.finish_reason is not None for c in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].finish_reason == choice.finish_reason
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        entries = [e for c in mine if c.logprobs for e in c.logprobs.content]
        assert [e.token for e in entries] == [e.token for e in choice.logprobs.content]
        assert all(len(e.top_logprobs) == 2 for e in entries)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert usage.completion_tokens == sum(len(c.logprobs.content) for c in whole.choices)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_cancelled_n_streams_free_the_engine(real, client):
    """Several n=3 streams (and non-streamed requests) dropped at once mid-answer: the engine ends
    every request, and the next request is answered."""
    body = {"model": "smollm2", "messages": QUESTION, "n": 3, "max_tokens": 400, "ignore_eos": True}

    async def leave(i):
        async with httpx.AsyncClient(timeout=60) as http:
            if i % 2:
                with pytest.raises(httpx.ReadTimeout):
                    await http.post(real.url + "/v1/chat/completions", json=body, timeout=0.5)
                return
            async with http.stream("POST", real.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                lines = 0
                async for _ in r.aiter_lines():
                    lines += 1
                    if lines > 8:
                        return

    async def main():
        await asyncio.gather(*(leave(i) for i in range(4)))

    engine = real.server.engine.engine
    before = engine.stats()["generated_tokens"]
    asyncio.run(main())
    deadline = time.monotonic() + 20
    while (engine.stats()["running"] or engine.stats()["waiting"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
    # they ended early: together less than one of them run to max_tokens
    assert engine.stats()["generated_tokens"] - before < 3 * 400
    answer = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=2, temperature=0)
    assert answer.choices[0].finish_reason == "length"


def test_a_request_of_more_choices_than_the_waiting_queue_holds_is_answered(smollm2):
    """Its choices queued at once would overflow a waiting queue of 2: the rest wait for earlier ones
    to start instead of answering the request with a 429 that no retry could ever get past."""
    model, smol_tokenizer = smollm2
    with live(engine_server(model, smol_tokenizer, name="smollm2", engine_kwargs={"max_waiting": 2})) as server:
        http = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        answer = http.chat.completions.create(model="smollm2", messages=QUESTION, n=5, max_tokens=1, temperature=0)
        assert [c.index for c in answer.choices] == list(range(5)) and answer.usage.completion_tokens == 5
        prompts = [f"Story number {i} is about" for i in range(5)]
        answer = http.completions.create(model="smollm2", prompt=prompts, max_tokens=2, temperature=0)
        assert len(answer.choices) == 5 and all(c.finish_reason == "length" for c in answer.choices)


FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_extreme_sampling_values_are_answered_without_failing_the_batch(real, client):
    """A top_k or repetition_penalty past 64 bits reached the sampler as a Python int and failed the
    engine's step: a 500 for that request and for every request decoded beside it. A temperature of
    1e-300 divided the logits into infinities and drew garbage; below 1e-5 it is greedy (as vLLM)."""
    greedy = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=8, temperature=0)
    beside = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=16, temperature=0,
                                            stream=True)  # started first, decoding while the others come
    for extreme in ({"top_k": 10**30, "temperature": 1.0}, {"repetition_penalty": 10**30, "temperature": 1.0}):
        answer = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=2,
                                                extra_body=extreme)
        assert answer.choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in beside if c.choices)
    tiny = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=8, temperature=1e-300)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content
