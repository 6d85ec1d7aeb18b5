"""Conversations as OpenAI clients and agent frameworks send them, checked against transformers.

Each conversation goes through the server's own path (protocol.parse_chat_request, then
prompts.PromptBuilder with herd's tokenizer) and must give the ids transformers'
`apply_chat_template` gives for the same conversation converted the way vLLM hands OpenAI messages
to a template: tool-call arguments parsed from their JSON strings to objects (empty or null: {}),
content null as "", text parts joined with newlines, an empty tool_calls list dropped. herd also
maps OpenAI's `developer` role to `system` and the deprecated `function` role (and an assistant's
`function_call`) to the tool-call form, which the Llama templates know.

The templates: Llama 3.1's tokenizer with its own (Llama 3) template, and with Llama 4's template
from transformers, which renders tools, tool calls and tool results. The HTTP half uses the fake
engine of test_server.py: errors in OpenAI's shape naming the field, fields a server may ignore
accepted, fields that would change the answer and are not implemented refused.
"""

from __future__ import annotations

import asyncio
import copy
import json

import pytest

from herd.serving.prompts import PromptBuilder
from herd.serving.protocol import MAX_STOP_STRINGS, APIError, parse_chat_request, parse_completion_request
from tests.conftest import SHARED_DATA

from .test_server import assert_error, post, say, served, tokenizer  # noqa: F401 - fixtures

LLAMA31 = SHARED_DATA / "tokenizers" / "llama3.1"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "a city"},
        "options": {"type": "object", "properties": {
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "array", "items": {"type": "integer", "minimum": 1}}}}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, CLOCK]


def call(ident, name, arguments):
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": arguments}}


# --- the reference: transformers over the conversation as vLLM converts it ---------------------


def vllm_style(messages: list[dict]) -> list[dict]:
    """OpenAI messages as the template sees them in vLLM (plus herd's developer/function mapping)."""
    out = []
    for message in copy.deepcopy(messages):
        role = message["role"]
        if role == "developer":
            message["role"] = "system"
        if role == "function":
            message["role"] = "tool"
        content = message.get("content")
        if content is None:
            content = message.pop("refusal", None) or ""
        if isinstance(content, list):
            content = "\n".join(part["text"] for part in content)
        message["content"] = content
        if "function_call" in message:
            message["tool_calls"] = [{"id": None, "type": "function", "function": message.pop("function_call")}]
        calls = message.get("tool_calls")
        if calls == []:
            del message["tool_calls"]
        for item in calls or []:
            arguments = item["function"].get("arguments")
            item["function"]["arguments"] = json.loads(arguments) if arguments else {}
        out.append(message)
    return out


@pytest.fixture(scope="module")
def templates():
    """{name: (herd tokenizer, transformers tokenizer)} sharing one chat template."""
    import transformers
    from transformers.models.llama4 import processing_llama4

    import herd

    pairs = {}
    for name in ("llama3", "llama4"):
        mine, theirs = herd.AutoTokenizer.from_pretrained(LLAMA31), transformers.AutoTokenizer.from_pretrained(LLAMA31)
        if name == "llama4":
            mine.chat_template = theirs.chat_template = processing_llama4.chat_template
        assert mine.chat_template == theirs.chat_template
        pairs[name] = (mine, theirs)
    return pairs


def herd_prompt(tokenizer, body: dict) -> list[int]:
    request = parse_chat_request(body)
    ids, images = asyncio.run(PromptBuilder(tokenizer).chat(request.messages, request.tools))
    assert images is None
    return ids


def reference_prompt(tokenizer, messages: list[dict], tools=None) -> list[int]:
    text = tokenizer.apply_chat_template(vllm_style(messages), tools=tools, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


CONVERSATIONS = {
    "system, developer and several turns": [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?", "name": "alice"},
        {"role": "assistant", "content": "Paris."},
        {"role": "system", "content": "Now answer in two words."},
        {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}, {"type": "text", "text": "Thanks."}]},
    ],
    "a call with content null, its result, then a user turn": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_1", "get_weather", '{"city": "Paris"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "And tomorrow?"},
    ],
    "two calls with text, two results in a row": [
        {"role": "user", "content": "Weather in Paris and Rome, in fahrenheit?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": [
            call("a", "get_weather", '{"city": "Paris", "options": {"unit": "fahrenheit", "days": [1, 2]}}'),
            call("b", "get_weather", '{"city": "Rome"}')]},
        {"role": "tool", "tool_call_id": "a", "content": "70 F"},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "75 F"}], "name": "get_weather"},
    ],
    "a call with empty content and empty arguments": [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": "", "tool_calls": [call("t", "get_time", "")]},
        {"role": "tool", "tool_call_id": "t", "content": "12:00"},
    ],
    "an empty tool_calls list beside the text": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?", "tool_calls": []},
        {"role": "user", "content": "Weather in Oslo?"},
    ],
    "the deprecated function_call and function role": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"role": "function", "name": "get_weather", "content": "snow"},
    ],
    "a replayed refusal": [
        {"role": "user", "content": "Weather on Mars?"},
        {"role": "assistant", "content": None, "refusal": "I can't check Mars."},
        {"role": "user", "content": "Paris then."},
    ],
}


@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_tool_templates_render_what_transformers_renders(templates, name, with_tools):
    mine, theirs = templates["llama4"]
    messages = CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    body = {"messages": messages, **({"tools": tools} if tools else {})}
    assert herd_prompt(mine, body) == reference_prompt(theirs, messages, tools)


@pytest.mark.parametrize("name", [name for name in CONVERSATIONS if name != "system, developer and several turns"])
def test_the_llama3_template_renders_what_transformers_renders(templates, name):
    """Llama 3's template concatenates content strings: content null must arrive as "" (a None is a
    TypeError in the template), and tool turns render as plain turns."""
    mine, theirs = templates["llama3"]
    messages = CONVERSATIONS[name]
    assert herd_prompt(mine, {"messages": messages}) == reference_prompt(theirs, messages)


def test_calls_render_as_hand_written_text(templates):
    """The same facts without the reference: an empty arguments string is the object {}, not the
    string "" (it rendered `"parameters": ""`); an assistant turn with `tool_calls: []` keeps its
    text (the template skipped the whole turn); function_call and the function role are a call and
    its result (both were 400s)."""
    mine, _ = templates["llama4"]

    def text(name):
        return mine.decode(herd_prompt(mine, {"messages": CONVERSATIONS[name]}), skip_special_tokens=False)

    assert '<|python_start|><|python_end|>{"name": "get_time", "parameters": {}}<|eot|>' in \
        text("a call with empty content and empty arguments")
    assert "<|header_start|>assistant<|header_end|>\n\nHello! How can I help?<|eot|>" in \
        text("an empty tool_calls list beside the text")
    deprecated = text("the deprecated function_call and function role")
    assert '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot|>' in deprecated
    assert '<|header_start|>ipython<|header_end|>\n\n"snow"<|eot|>' in deprecated


def test_arguments_as_an_object_render_like_the_string():
    """Some frameworks send arguments already parsed; the prompt is the one for the JSON string."""
    def arguments(value):
        body = {"messages": [{"role": "user", "content": "x"},
                             {"role": "assistant", "tool_calls": [call("c", "get_weather", value)]}]}
        return parse_chat_request(body).messages[1]["tool_calls"][0]["function"]["arguments"]

    assert arguments({"city": "Paris"}) == arguments('{"city": "Paris"}') == {"city": "Paris"}
    assert arguments(None) == arguments("") == {}


# --- protocol: what is accepted, what is refused -------------------------------------------------

USER = [{"role": "user", "content": "SAY:ok"}]


@pytest.mark.parametrize("messages, param, words", [
    ([*USER, {"role": "assistant", "tool_calls": [call("c", "get_weather", '{"city": "Par')]}],
     "messages[1].tool_calls[0].function.arguments", ["JSON object"]),
    ([*USER, {"role": "assistant", "tool_calls": [call("c", "get_weather", "[1, 2]")]}],
     "messages[1].tool_calls[0].function.arguments", ["JSON object"]),
    ([*USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "custom", "custom": {"name": "x"}}]}],
     "messages[1].tool_calls[0]", ["function"]),
    ([*USER, {"role": "assistant", "function_call": {"name": "f", "arguments": "{"}}],
     "messages[1].function_call.arguments", ["JSON object"]),
    ([*USER, {"role": "assistant", "content": None, "tool_calls": [call("c", "get_time", "{}")],
              "function_call": {"name": "get_time", "arguments": "{}"}}], "messages[1].function_call", ["not both"]),
    ([*USER, {"role": "function", "content": "snow"}], "messages[1].name", ["function"]),
    ([*USER, {"role": "tool", "tool_call_id": 7, "content": "x"}], "messages[1].tool_call_id", ["string"]),
    ([{"role": "user", "content": "x", "name": ["bob"]}], "messages[0].name", ["string"]),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio", "input_audio": {}}]}],
     "messages[0].content[1]", ["'input_audio'", '"type": "text"']),
    ([{"role": "user", "content": ["plain string"]}], "messages[0].content[0]", ["str"]),
])
def test_malformed_history_is_a_400_naming_the_field(served, messages, param, words):
    assert_error(post(served, "/v1/chat/completions", {"model": "llama", "messages": messages}), 400, param, *words)


@pytest.mark.parametrize("path, fields", [
    ("/v1/chat/completions", {"functions": [{"name": "get_weather", "parameters": {}}]}),
    ("/v1/chat/completions", {"function_call": {"name": "get_weather"}}),
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}),
    ("/v1/chat/completions", {"web_search_options": {}}),
    ("/v1/chat/completions", {"reasoning_effort": "high"}),
    ("/v1/chat/completions", {"echo": True}),
    ("/v1/chat/completions", {"best_of": 3}),
    ("/v1/chat/completions", {"min_tokens": 5}),
    ("/v1/chat/completions", {"guided_json": {"type": "object"}}),
    ("/v1/chat/completions", {"chat_template_kwargs": {"enable_thinking": True}}),
    ("/v1/chat/completions", {"continue_final_message": True}),
    ("/v1/chat/completions", {"add_generation_prompt": False}),
    ("/v1/chat/completions", {"include_stop_str_in_output": True}),
    ("/v1/completions", {"skip_special_tokens": False}),
    ("/v1/completions", {"add_special_tokens": False}),
    ("/v1/completions", {"use_beam_search": True}),
    ("/v1/completions", {"suffix": " the end"}),
])
def test_fields_that_would_change_the_answer_are_refused(served, path, fields):
    body = say("ok", **fields) if path.endswith("chat/completions") else {"prompt": "SAY:ok", **fields}
    (param,) = fields
    assert_error(post(served, path, body), 400, param, param)


@pytest.mark.parametrize("path, fields", [
    ("/v1/chat/completions", {"user": "u-1", "metadata": {"run": "7"}, "store": False, "service_tier": "auto",
                              "safety_identifier": "abc", "prompt_cache_key": "k", "prediction": {
                                  "type": "content", "content": "ok"}}),
    # the no-op values of the refused fields, and null for any field (some clients send every field)
    ("/v1/chat/completions", {"modalities": ["text"], "functions": None, "function_call": "auto", "echo": False,
                              "min_tokens": 0, "add_generation_prompt": True, "skip_special_tokens": True,
                              "reasoning_effort": None, "audio": None, "chat_template_kwargs": {}}),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": None}}]}),
    ("/v1/completions", {"user": "u-1", "suffix": "", "add_special_tokens": True, "include_stop_str_in_output": False}),
])
def test_fields_a_server_may_ignore_are_accepted(served, path, fields):
    body = say("ok", **fields) if path.endswith("chat/completions") else {"prompt": "SAY:ok", **fields}
    response = post(served, path, body)
    assert response.status_code == 200, response.text


def test_stop_takes_a_string_or_at_most_four():
    """OpenAI's limit is 4 stop sequences (herd took 16); a string is one."""
    assert MAX_STOP_STRINGS == 4
    for parse, body in ((parse_chat_request, {"messages": USER}), (parse_completion_request, {"prompt": "x"})):
        assert parse({**body, "stop": "###"}).sampling.stop == ["###"]
        assert parse({**body, "stop": ["a", "b", "c", "d"]}).sampling.stop == ["a", "b", "c", "d"]
        with pytest.raises(APIError) as error:
            parse({**body, "stop": ["a", "b", "c", "d", "e"]})
        assert (error.value.status, error.value.param) == (400, "stop") and "at most 4" in error.value.message


def test_max_completion_tokens_wins_over_max_tokens():
    sampling = parse_chat_request({"messages": USER, "max_tokens": 3, "max_completion_tokens": 9}).sampling
    assert (sampling.max_tokens, sampling.max_tokens_param) == (9, "max_completion_tokens")
    sampling = parse_chat_request({"messages": USER, "max_tokens": 3, "max_completion_tokens": None}).sampling
    assert (sampling.max_tokens, sampling.max_tokens_param) == (3, "max_tokens")


def test_a_tool_history_through_the_server_reaches_the_engine_as_transformers_renders_it(served, templates):
    """The llama3.1 tokenizer the server runs has the Llama 3 template: the prompt the engine gets
    for a history with content null, an empty-arguments call and a function-role result."""
    messages = [*CONVERSATIONS["the deprecated function_call and function role"], {"role": "user", "content": "SAY:ok"}]
    response = post(served, "/v1/chat/completions", {"model": "llama", "messages": messages, "user": "u-1",
                                                     "metadata": {"a": "b"}, "store": True})
    assert response.status_code == 200, response.text
    _, theirs = templates["llama3"]
    assert served.engine.requests_seen[-1].prompt_ids == reference_prompt(theirs, messages)
    assert response.json()["usage"]["prompt_tokens"] == len(reference_prompt(theirs, messages))


@pytest.mark.parametrize("tool_choice, constrained, calls", [
    ("auto", False, True),  # the model may call: its call is parsed
    ("none", False, False),  # no call: what it writes stays content
    ("required", True, True),  # a call is forced while decoding (a JSON call of one of the tools)
    ({"type": "function", "function": {"name": "get_weather"}}, True, True),
])
def test_tool_choice(served, tool_choice, constrained, calls):
    answer = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    response = post(served, "/v1/chat/completions", say(answer, tools=TOOLS, tool_choice=tool_choice))
    assert response.status_code == 200, response.text
    assert (served.engine.requests_seen[-1].constraint is not None) == constrained
    choice = response.json()["choices"][0]
    if calls:
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in
                choice["message"]["tool_calls"]] == [("get_weather", {"city": "Paris"})]
    else:
        assert choice["message"]["content"] == answer and "tool_calls" not in choice["message"]
