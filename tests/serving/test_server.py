"""The HTTP API's contract with a scripted engine (no model): error bodies and statuses, tool calls
in each format through the whole server, states, keys, limits, metrics, disconnects.

The scripted engine answers a chat whose last user message is `SAY:<text>` with the tokens of
<text> followed by <|eot_id|> (Llama 3.1's tokenizer and chat template), so that the server's
text handling meets exactly the answer a test wants."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image

from herd.serving.engine import EngineRequest
from herd.serving.server import ModelInfo, Server
from tests.conftest import SHARED_DATA

from .conftest import live
from .fake_engine import FakeAsyncEngine, FakeEngine

EOT, EOM = 128009, 128008
EOS_IDS = (EOT, EOM, 128001)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tokenizer():
    import herd

    return herd.AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "llama3.1")


def scripted(tokenizer):
    def script(request: EngineRequest) -> list[int]:
        prompt = tokenizer.decode(request.prompt_ids, skip_special_tokens=False)
        said = prompt.rpartition("SAY:")[2].partition("<|eot")[0]
        ids = tokenizer.encode(said, add_special_tokens=False)
        return ids + ([] if said.endswith("<|eom_id|>") else [EOT])
    return script


def make_server(tokenizer, *, engine=None, **kwargs) -> Server:
    engine = engine or FakeEngine(script=scripted(tokenizer))
    engine.eos_token_ids = EOS_IDS
    model = ModelInfo(tokenizer=tokenizer, eos_token_ids=EOS_IDS, vocab_size=128256, max_model_len=512)
    return Server(model_name="llama", engine=FakeAsyncEngine(engine), model=model, **kwargs)


@pytest.fixture(scope="module")
def served(tokenizer):
    engine = FakeEngine(script=scripted(tokenizer))
    with live(make_server(tokenizer, engine=engine)) as server:
        server.engine = engine
        yield server


@pytest.fixture(scope="module")
def tools_template_tokenizer():
    """Llama 3.1's vocabulary with a chat template that renders tools and tool calls (Llama 4's, from transformers)."""
    from transformers.models.llama4 import processing_llama4

    import herd

    tokenizer = herd.AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "llama3.1")
    tokenizer.chat_template = processing_llama4.chat_template
    return tokenizer


def post(server, path, body, **kwargs):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json",
                                                                   **kwargs.pop("headers", {})},
                      timeout=kwargs.pop("timeout", 30), **kwargs)


def say(text, **fields):
    return {"model": "llama", "messages": [{"role": "user", "content": f"SAY:{text}"}], "max_tokens": 200, **fields}


def sse(response) -> list:
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def assert_error(response, status, param, *words):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]
    return error


# --- tool calls through the server ---------------------------------------------------------------


@pytest.mark.parametrize("answer, content, calls", [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>brave_search.call(query="herd")<|eom_id|>', None, [("brave_search", {"query": "herd"})]),
    ('[get_weather(city="Paris"), get_time()]', None, [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ('Checking. [get_weather(city="Rome")]', "Checking.", [("get_weather", {"city": "Rome"})]),
    ('<|python_start|>[get_time(zone="CET")]<|python_end|>', None, [("get_time", {"zone": "CET"})]),
    ('[get_weather(city="Par', '[get_weather(city="Par', []),  # malformed: content, never a 500
    ('{"name": "Alice", "age": 3}', '{"name": "Alice", "age": 3}', []),  # JSON data, not a call
    ("It is sunny.", "It is sunny.", []),
])
@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_in_each_format(served, answer, content, calls, stream):
    response = post(served, "/v1/chat/completions", say(answer, tools=TOOLS, stream=stream))
    assert response.status_code == 200, response.text
    if stream:
        chunks = sse(response)
        deltas = [c["choices"][0]["delta"] for c in chunks]
        got_content = "".join(d.get("content") or "" for d in deltas) or None
        got_calls = [call for d in deltas for call in d.get("tool_calls", [])]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
        assert [call["index"] for call in got_calls] == list(range(len(calls)))
    else:
        choice = response.json()["choices"][0]
        got_content, got_calls, finish = choice["message"]["content"], choice["message"].get("tool_calls") or [], \
            [choice["finish_reason"]]
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got_calls)
    assert finish == ["tool_calls" if calls else "stop"]


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_false_keeps_the_first_call(served, stream):
    body = say('[get_weather(city="Paris"), get_time()]', tools=TOOLS, stream=stream, parallel_tool_calls=False)
    response = post(served, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    if stream:
        calls = [call for c in sse(response) for call in c["choices"][0]["delta"].get("tool_calls", [])]
    else:
        calls = response.json()["choices"][0]["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"})]
    assert_error(post(served, "/v1/chat/completions", say("x", tools=TOOLS, parallel_tool_calls="no")), 400,
                 "parallel_tool_calls")


@pytest.mark.parametrize("answer", ["  The weather today is sunny and warm in Paris.  ", "Checking the weather. [get_weather(city=\"Rome\")]",
                                    "a <| b and more words here"])
def test_with_tools_content_streams_before_the_end(served, answer):
    """With tools, content is streamed as it comes up to where a call may start (not held to the
    end); the streamed content equals the non-streamed one, white space and all."""
    whole = post(served, "/v1/chat/completions", say(answer, tools=TOOLS)).json()["choices"][0]["message"]
    chunks = sse(post(served, "/v1/chat/completions", say(answer, tools=TOOLS, stream=True)))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    pieces = [d["content"] for d in deltas if d.get("content")]
    assert "".join(pieces) == (whole["content"] or "")
    finish_at = next(i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["finish_reason"])
    first_text = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert len(pieces) > 1 and first_text < finish_at - 1  # several pieces, the first well before the end
    assert [d.get("tool_calls") is not None for d in deltas].count(True) == (1 if whole.get("tool_calls") else 0)


def test_tool_choice_none_keeps_calls_as_text(served):
    answer = '[get_weather(city="Paris")]'
    body = post(served, "/v1/chat/completions", say(answer, tools=TOOLS, tool_choice="none")).json()
    assert body["choices"][0]["message"]["content"] == answer and "tool_calls" not in body["choices"][0]["message"]


def test_tool_history_reaches_the_template(tools_template_tokenizer):
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "user", "content": "SAY:It is sunny."}]
    engine = FakeEngine(script=scripted(tools_template_tokenizer))
    with live(make_server(tools_template_tokenizer, engine=engine)) as server:
        response = post(server, "/v1/chat/completions", {"model": "llama", "messages": messages, "tools": TOOLS})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "It is sunny."
    text = tools_template_tokenizer.decode(engine.requests_seen[-1].prompt_ids, skip_special_tokens=False)
    # the tools, the earlier call (arguments as an object, not a JSON string) and its result are in the prompt
    assert '"name": "get_weather"' in text and '"parameters": {"city": "Paris"}' in text
    assert "sunny" in text and '"required": [' in text


# --- what reaches the engine ----------------------------------------------------------------------


def test_sampling_fields_reach_the_engine(served):
    body = say("ok", n=2, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, seed=3, presence_penalty=0.5,
               frequency_penalty=-0.5, repetition_penalty=1.2, max_completion_tokens=7, max_tokens=99,
               logprobs=True, top_logprobs=2, ignore_eos=True, stop_token_ids=[13])
    assert post(served, "/v1/chat/completions", body).status_code == 200
    first, second = (request.sampling for request in served.engine.requests_seen[-2:])
    assert (first.max_tokens, first.temperature, first.top_p, first.top_k, first.min_p) == (7, 0.7, 0.9, 5, 0.05)
    assert (first.presence_penalty, first.frequency_penalty, first.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (first.logprobs, first.ignore_eos, first.stop_token_ids) == (2, True, (13,))
    assert first.seed == 3 and second.seed not in (None, 3)  # each choice its own seed, derived from the request's
    body = post(served, "/v1/chat/completions", say("ok", top_k=-1)).json()
    assert served.engine.requests_seen[-1].sampling.top_k == 0 and body["choices"][0]["message"]["content"] == "ok"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_on_the_last_token_finishes_with_stop(served, path, stream):
    """"Hello world" is two tokens: with max_tokens 2 the stop string ends the answer on the token
    that also reaches the limit, and finish_reason is "stop" (the stop string), not "length"."""
    body = say("Hello world", stop="world", max_tokens=2, stream=stream)
    if path == "/v1/completions":
        body = {"prompt": "SAY:Hello world", "stop": "world", "max_tokens": 2, "stream": stream}
    response = post(served, path, body)
    assert response.status_code == 200, response.text
    choices = [c for chunk in sse(response) for c in chunk["choices"]] if stream else response.json()["choices"]
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["stop"]
    texts = [c.get("text") or (c.get("delta") or c.get("message") or {}).get("content") or "" for c in choices]
    assert "".join(texts) == "Hello "


def test_max_tokens_defaults_to_the_room_left(served):
    post(served, "/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": "SAY:x"}]})
    request = served.engine.requests_seen[-1]
    assert request.sampling.max_tokens == 512 - len(request.prompt_ids)


def test_completion_max_tokens_defaults_to_16(served):
    """OpenAI's /v1/completions gives 16 new tokens when max_tokens is left out (not the whole context)."""
    assert post(served, "/v1/completions", {"prompt": "hi"}).status_code == 200
    assert served.engine.requests_seen[-1].sampling.max_tokens == 16
    post(served, "/v1/completions", {"prompt": "hi", "max_tokens": 40})
    assert served.engine.requests_seen[-1].sampling.max_tokens == 40


@pytest.mark.parametrize("stream", [False, True])
def test_completion_usage_counts_every_prompt(served, tokenizer, stream):
    """A list of prompts is several prompts: usage.prompt_tokens is their sum (each counted once, whatever n)."""
    prompts = ["one two", "three four five six"]
    body = {"prompt": prompts, "n": 2, "max_tokens": 3, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    response = post(served, "/v1/completions", body)
    usage = sse(response)[-1]["usage"] if stream else response.json()["usage"]
    assert usage["prompt_tokens"] == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert usage["completion_tokens"] == 4 * 3 and usage["total_tokens"] == usage["prompt_tokens"] + 12


@pytest.mark.parametrize("stream", [False, True])
def test_completion_echo_puts_the_prompt_before_the_text(served, tokenizer, stream):
    """OpenAI's echo: each choice's text starts with its prompt (a token-id prompt decoded)."""
    ids = tokenizer("SAY:one two")["input_ids"]

    def texts(body):
        response = post(served, "/v1/completions", {**body, "max_tokens": 4, "temperature": 0, "stream": stream})
        assert response.status_code == 200, response.text
        if not stream:
            return [c["text"] for c in response.json()["choices"]]
        joined = {}
        for chunk in sse(response):
            for choice in chunk["choices"]:
                joined[choice["index"]] = joined.get(choice["index"], "") + choice["text"]
        return [joined[i] for i in sorted(joined)]

    prompts = ["SAY:hello there", ids]
    plain, echoed = texts({"prompt": prompts}), texts({"prompt": prompts, "echo": True})
    assert echoed == ["SAY:hello there" + plain[0], tokenizer.decode(ids) + plain[1]]
    assert all(plain)  # answers there, so the echo is checked before something


# --- logprobs: stop strings, echo -----------------------------------------------------------------
# (the scripted engine's made-up logprobs: the n-th generated token's is -n/8, and with
# prompt_logprobs the n-th prompt token's after the first is -n/8, each alone in its top list)


def _one_choice(served, path, body, stream):
    """(text, logprob tokens, text offsets or None, finish_reason) of the answer's one choice, the
    chunks of a stream joined."""
    response = post(served, path, {**body, "stream": stream})
    assert response.status_code == 200, response.text
    choices = [c for chunk in sse(response) for c in chunk["choices"]] if stream else response.json()["choices"]
    text, tokens, offsets, finish = "", [], [], None
    for choice in choices:
        finish = choice["finish_reason"] or finish
        if path == "/v1/completions":
            text += choice["text"]
            if choice["logprobs"]:
                tokens += choice["logprobs"]["tokens"]
                offsets += choice["logprobs"]["text_offset"]
        else:
            text += (choice.get("delta") or choice.get("message") or {}).get("content") or ""
            tokens += [entry["token"] for entry in (choice["logprobs"] or {}).get("content") or []]
    return text, tokens, offsets if path == "/v1/completions" else None, finish


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(("stop", "text", "tokens"), [
    (", how", "Hello world", ["Hello", " world"]),  # the cut between two tokens: the tokens join into the text
    ("orld", "Hello w", ["Hello", " world"]),  # the cut inside " world": its entry stays, whole
    ("Hello", "", []),
    ("never", "Hello world, how are you", ["Hello", " world", ",", " how", " are", " you", "<|eot_id|>"]),
])
def test_logprobs_end_where_a_stop_string_cuts_the_text(served, path, stream, stop, text, tokens):
    """The answer "Hello world, how are you" (6 tokens, then <|eot_id|>): after a stop string's cut no
    token that begins at or after the cut has an entry, streamed or not (a stream holds an entry
    back with its token's text); text_offset is where each token begins in the text."""
    if path == "/v1/completions":
        body = {"prompt": "SAY:Hello world, how are you", "logprobs": 1, "stop": stop, "max_tokens": 50}
    else:
        body = say("Hello world, how are you", logprobs=True, top_logprobs=1, stop=stop)
    got_text, got_tokens, offsets, finish = _one_choice(served, path, body, stream)
    assert (got_text, got_tokens, finish) == (text, tokens, "stop")
    if stop == ", how":
        assert "".join(got_tokens) == got_text
    if offsets is not None:
        starts = [len("".join(tokens[:i])) for i in range(len(tokens))]
        assert offsets == starts and all(offset < len(text) for offset in offsets[:2])


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_gives_the_prompt_tokens_first(served, tokenizer, stream):
    """echo + logprobs: the prompt's tokens (the first with null logprob and top_logprobs: nothing
    comes before it), then the generated ones; text_offset counts in the returned text (<|begin_of_text|>
    is not in it: the token after it starts at 0 too). Asked of the engine once per prompt, whatever n."""
    body = {"prompt": "SAY:Hello world", "logprobs": 1, "echo": True, "max_tokens": 50, "n": 2, "stream": stream}
    response = post(served, "/v1/completions", body)
    assert response.status_code == 200, response.text
    first, second = served.engine.requests_seen[-2:]
    assert (first.sampling.prompt_logprobs, second.sampling.prompt_logprobs) == (1, None)
    choices = [c for chunk in sse(response) for c in chunk["choices"]] if stream else response.json()["choices"]
    for index in (0, 1):
        mine = [c for c in choices if c["index"] == index]
        text = "".join(c["text"] for c in mine)
        lists = {key: [v for c in mine if c["logprobs"] for v in c["logprobs"][key]]
                 for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        assert text == "SAY:Hello worldHello world"
        assert lists["tokens"] == ["<|begin_of_text|>", "S", "AY", ":", "Hello", " world", "Hello", " world",
                                   "<|eot_id|>"]
        assert lists["token_logprobs"] == [None, -1 / 8, -2 / 8, -3 / 8, -4 / 8, -5 / 8, -1 / 8, -2 / 8, -3 / 8]
        assert lists["top_logprobs"][0] is None and lists["top_logprobs"][1] == {"S": -1 / 8}
        assert lists["top_logprobs"][7] == {" world": -2 / 8}
        assert lists["text_offset"] == [0, 0, 1, 3, 4, 9, 15, 20, 26]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_answers_the_prompt_alone(served, stream):
    """vLLM's echo without generation: the prompt alone (its logprobs when asked), finish_reason
    "length", no completion tokens counted; without echo, max_tokens 0 is refused (above)."""
    body = {"prompt": "SAY:Hello world", "echo": True, "max_tokens": 0, "stream": stream}
    for logprobs in (None, 2):
        if stream:
            body["stream_options"] = {"include_usage": True}
        response = post(served, "/v1/completions", {**body, "logprobs": logprobs})
        assert response.status_code == 200, response.text
        chunks = sse(response) if stream else [response.json()]
        choices = [c for chunk in chunks for c in chunk["choices"]]
        assert "".join(c["text"] for c in choices) == "SAY:Hello world"
        assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["length"]
        assert chunks[-1]["usage"]["completion_tokens"] == 0
        tokens = [t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]]
        values = [v for c in choices if c["logprobs"] for v in c["logprobs"]["token_logprobs"]]
        if logprobs is None:
            assert all(c["logprobs"] is None for c in choices)
        else:
            assert tokens == ["<|begin_of_text|>", "S", "AY", ":", "Hello", " world"]
            assert values == [None, -1 / 8, -2 / 8, -3 / 8, -4 / 8, -5 / 8]


# --- errors ---------------------------------------------------------------------------------------


def tiny_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, ["not valid JSON"]),
    ([1, 2], 400, None, ["JSON object"]),
    ({"model": "llama", "messages": []}, 400, "messages", ["non-empty"]),
    ({"model": "llama"}, 400, "messages", []),
    (say("x", max_tokens=-1), 400, "max_tokens", [">= 1"]),
    (say("x", max_tokens=0), 400, "max_tokens", [">= 1"]),
    (say("x", max_tokens="ten"), 400, "max_tokens", ["integer"]),
    (say("x", max_completion_tokens=1.5), 400, "max_completion_tokens", ["integer"]),
    (say("x", max_tokens=100_000), 400, "max_tokens", ["context of 512", "at most"]),
    (say("x", max_completion_tokens=100_000), 400, "max_completion_tokens", ["context of 512", "at most"]),
    (say("x", seed=2**64), 400, "seed", ["<= "]),
    (say("x", logit_bias={"hello": 5}), 400, "logit_bias", ["token ids"]),
    (say("x", logit_bias={"5": 101}), 400, "logit_bias", ["[-100, 100]"]),
    (say("x", logit_bias=[5]), 400, "logit_bias", ["object"]),
    (say("x", logit_bias={"999999": 1}), 400, "logit_bias", ["vocabulary"]),
    (say("x", temperature=-0.1), 400, "temperature", [">= 0"]),
    (say("x", temperature=5), 400, "temperature", ["<= 2"]),
    (say("x", top_p=0), 400, "top_p", ["> 0"]),
    (say("x", n=0), 400, "n", [">= 1"]),
    (say("x", stop=["ok", ""]), 400, "stop", ["empty"]),
    (say("x", stop=7), 400, "stop", ["string"]),
    (say("x", top_logprobs=3), 400, "top_logprobs", ["logprobs: true"]),
    (say("x", logprobs=True, top_logprobs=50), 400, "top_logprobs", ["<= 20"]),
    (say("x", stream_options={"include_usage": True}), 400, "stream_options", ["stream: true"]),
    (say("x", presence_penalty=3), 400, "presence_penalty", ["<= 2"]),
    (say("x", response_format={"type": "yaml"}), 400, "response_format", []),
    (say("x", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}),
     400, "response_format.json_schema.schema", []),
    (say("x", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), 400, "tool_choice",
     ["nope"]),
    (say("x", tool_choice="required"), 400, "tool_choice", ["needs tools"]),
    (say("x", tool_choice="auto"), 400, "tool_choice", ["needs tools"]),  # vLLM's and OpenAI's answer
    (say("x", tools=[{"type": "function"}]), 400, "tools[0]", []),
    ({"model": "llama", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", ["robot"]),
    ({"model": "llama", "messages": [{"role": "user"}]}, 400, "messages[0].content", ["missing"]),
    ({"model": "llama", "messages": [{"role": "user", "content": []}]}, 400, "messages[0].content", ["empty list"]),
    ({"model": "llama", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400,
     "messages[0].content[0]", []),
    ({"model": "llama", "messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]}, 400,
     "messages[0].content[0]", []),  # a refusal is an assistant's

    ({"model": "llama", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": tiny_png()}}]}]},
     400, "messages[0].content[1]", ["takes no images"]),
    ({"model": "llama", "messages": [{"role": "user", "content": "x " * 600}]}, 400, "messages",
     ["no room", "context of 512"]),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", ["gpt-4", "llama"]),
])
def test_chat_errors_name_the_field(served, body, status, param, words):
    assert_error(post(served, "/v1/chat/completions", body), status, param, *words)


@pytest.mark.parametrize("assistant", [
    {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]},
    {"role": "assistant", "content": None, "refusal": "I can't help with that."},
])
def test_a_replayed_refusal_is_the_assistant_turn_text(served, assistant):
    """OpenAI's refusals, as clients replay the history: a refusal content part, or content null with
    the refusal beside it. Both render as that text (the same prompt as a plain text answer)."""
    def history(answer):
        return {"model": "llama", "max_tokens": 5, "messages": [
            {"role": "user", "content": "SAY:one"}, answer, {"role": "user", "content": "SAY:two"}]}

    replayed = post(served, "/v1/chat/completions", history(assistant))
    plain = post(served, "/v1/chat/completions", history({"role": "assistant", "content": "I can't help with that."}))
    assert replayed.status_code == plain.status_code == 200, replayed.text
    assert replayed.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("body, status, param", [
    ({"model": "llama", "prompt": ""}, 400, "prompt"),
    ({"model": "llama", "prompt": 3}, 400, "prompt"),
    ({"model": "llama", "prompt": [1, 2, 999_999]}, 400, "prompt"),
    ({"model": "llama", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),  # 0 only with echo
    ({"model": "llama", "prompt": "hi", "echo": "yes"}, 400, "echo"),
    ({"model": "llama", "prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ({"model": "other", "prompt": "hi"}, 404, "model"),
])
def test_completion_errors_name_the_field(served, body, status, param):
    assert_error(post(served, "/v1/completions", body), status, param)


def test_unknown_route_and_method_use_the_error_body(served):
    assert httpx.get(served.url + "/v1/nothing").json()["error"]["message"]
    assert httpx.get(served.url + "/v1/chat/completions").status_code == 405


def test_a_failed_request_leaves_the_others_going(served):
    assert post(served, "/v1/chat/completions", say("x", temperature=9)).status_code == 400
    assert post(served, "/v1/chat/completions", say("still here")).json()["choices"][0]["message"]["content"] == \
        "still here"


# --- keys, states, limits -------------------------------------------------------------------------


def test_api_key(tokenizer):
    with live(make_server(tokenizer, api_key="sesame")) as server:
        assert_error(post(server, "/v1/chat/completions", say("x")), 401, None, "API key")
        assert_error(post(server, "/v1/chat/completions", say("x"), headers={"authorization": "Bearer wrong"}), 401,
                     None)
        assert httpx.get(server.url + "/v1/models").status_code == 401
        ok = post(server, "/v1/chat/completions", say("x"), headers={"authorization": "Bearer sesame"})
        assert ok.status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open


def test_503_while_loading_then_ready(tokenizer):
    server = Server(model_name="llama")
    with live(server) as running:
        assert httpx.get(running.url + "/health").status_code == 503
        assert_error(post(running, "/v1/chat/completions", say("x")), 503, None, "loading")
        ready = make_server(tokenizer)
        server.attach_from_thread(*ready._pending)
        assert httpx.get(running.url + "/health").status_code == 200
        assert post(running, "/v1/chat/completions", say("ready")).status_code == 200
        server.state = "draining"
        assert_error(post(running, "/v1/chat/completions", say("x")), 503, None, "shutting down")


def test_429_when_the_queue_is_full(tokenizer):
    engine = FakeEngine(script=scripted(tokenizer), max_waiting=0)
    with live(make_server(tokenizer, engine=engine)) as server:
        for stream in (False, True):
            error = assert_error(post(server, "/v1/chat/completions", say("x", stream=stream)), 429, None, "busy")
            assert error["code"] == "queue_full"
        assert httpx.get(server.url + "/health").status_code == 200


def test_disconnect_aborts_the_request(tokenizer):
    # one token per 50 ms: the client leaves after a few tokens, the engine must forget the request
    engine = FakeEngine(script=lambda request: [1] * 400, step_delay_s=0.05)
    with live(make_server(tokenizer, engine=engine)) as server:
        def in_flight():
            return metric(httpx.get(server.url + "/metrics").text, "herd_http_requests_in_flight")

        with httpx.stream("POST", server.url + "/v1/chat/completions", json=say("x", stream=True, max_tokens=400),
                          timeout=30) as response:
            lines = response.iter_lines()
            for _ in range(4):
                next(lines)
            assert in_flight() == 1  # the gauge was never set: always 0
        deadline = time.monotonic() + 10
        while (engine.stats()["running"] or in_flight()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["running"] == 0 and engine.stats()["kv_blocks_used"] == 0 and in_flight() == 0
        assert engine.generated_tokens < 200
        # and a non-streaming client that gives up
        with pytest.raises(httpx.ReadTimeout):
            post(server, "/v1/chat/completions", say("x", max_tokens=400), timeout=0.5)
        deadline = time.monotonic() + 10
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["running"] == 0


def test_metrics(served):
    post(served, "/v1/chat/completions", say("counted"))
    post(served, "/v1/chat/completions", {"messages": []})  # a 400 of its own (not one left by other tests)
    text = httpx.get(served.url + "/metrics").text
    for name in ("herd_requests_running", "herd_requests_waiting", "herd_kv_blocks_used",
                 "herd_prefix_cache_hits_total", "herd_time_to_first_token_seconds_bucket",
                 "herd_generation_tokens_total", "herd_generation_tokens_per_second"):
        assert f"\n{name}" in text, name
    assert "# TYPE herd_requests_running gauge" in text
    assert 'herd_http_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'status="400"' in text
    # paths a client makes up share one label (a label each would grow /metrics without bound)
    for path in ("/v1/made-up-1", "/v1/models/made-up-2"):
        httpx.get(served.url + path)
    text = httpx.get(served.url + "/metrics").text
    assert "made-up" not in text
    assert 'endpoint="other",status="404"' in text and 'endpoint="/v1/models/{model}",status="404"' in text


def metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, name
    return values[0]


def test_an_engine_failure_mid_stream_is_an_error_event(tokenizer):
    class Exploding(FakeAsyncEngine):  # as the real AsyncEngine raises on each stream when a step fails
        async def generate(self, request):
            count = 0
            async for event in super().generate(request):
                count += 1
                if count > 2:
                    raise RuntimeError("the GPU fell off")
                yield event

    server = make_server(tokenizer, engine=FakeEngine(script=lambda request: [1] * 50))
    server._pending = (Exploding(server._pending[0].engine), server._pending[1])
    with live(server) as running:
        response = post(running, "/v1/chat/completions", say("x", stream=True))
        events = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "the GPU fell off" in json.loads(events[-2])["error"]["message"]
        assert_error(post(running, "/v1/chat/completions", say("x")), 500, None, "the GPU fell off")
        assert httpx.get(running.url + "/health").status_code == 200


def test_a_prompt_the_engine_refuses_is_a_400_on_its_field(tokenizer):
    engine = FakeEngine(script=scripted(tokenizer), max_model_len=5)  # stricter than the server's own check
    with live(make_server(tokenizer, engine=engine)) as server:
        assert_error(post(server, "/v1/completions", {"prompt": "one two three four five six"}), 400, "prompt",
                     "max_model_len")
        assert_error(post(server, "/v1/chat/completions", say("hello")), 400, "messages", "max_model_len")


class _AllAtOnce:
    """A request's events all waiting already (a server behind its engine): `ready()` says so, as
    the AsyncEngine's RequestStream does."""

    def __init__(self, inner):
        self._inner, self._events = inner, None

    def ready(self):
        return bool(self._events)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._events is None:  # the whole answer first, then one event at a time
            self._events = [event async for event in self._inner]
        if not self._events:
            raise StopAsyncIteration
        return self._events.pop(0)

    async def aclose(self):
        self._events = []


def test_tokens_already_waiting_go_out_in_one_chunk(tokenizer):
    """When a stream's next tokens are already there, they leave together: one content chunk with
    every token's text and logprob entry, the same answer as without streaming."""
    class Behind(FakeAsyncEngine):
        def generate(self, request):
            return _AllAtOnce(super().generate(request))

    server = make_server(tokenizer)
    server._pending = (Behind(server._pending[0].engine), server._pending[1])
    with live(server) as running:
        whole = post(running, "/v1/chat/completions", say("one two three four", logprobs=True)).json()
        response = post(running, "/v1/chat/completions", say("one two three four", stream=True, logprobs=True))
        chunks = [json.loads(line[len("data: "):]) for line in response.text.split("\n\n")
                  if line.startswith("data: {")]
    content = [c["choices"][0] for c in chunks if c["choices"][0]["delta"].get("content")]
    assert len(content) == 1 and content[0]["delta"]["content"] == whole["choices"][0]["message"]["content"]
    assert content[0]["logprobs"]["content"] == whole["choices"][0]["logprobs"]["content"]
    assert len(whole["choices"][0]["logprobs"]["content"]) > 3
