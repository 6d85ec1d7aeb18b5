"""The tool-call parser on every format the Llama family writes, and on answers that are not calls."""

from __future__ import annotations

import json

import pytest

from herd.serving.tool_calls import call_may_start, parse_tool_calls


def calls_of(text):
    parsed = parse_tool_calls(text)
    return parsed.content, [(call.name, json.loads(call.arguments)) for call in parsed.tool_calls]


@pytest.mark.parametrize("text, content, calls", [
    # Llama 3.1 JSON, "parameters" and "arguments", end markers, several calls, a JSON list
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}<|eot_id|>', None,
     [("get_weather", {"city": "Paris", "days": 3})]),
    ('{"name": "f", "arguments": "{\\"x\\": 1}"}', None, [("f", {"x": 1})]),
    ('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"k": [1, 2]}}', None,
     [("a", {}), ("b", {"k": [1, 2]})]),
    ('[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]', None, [("a", {"x": 1}), ("b", {})]),
    ('{"type": "function", "function": {"name": "a", "parameters": {"x": true}}}', None, [("a", {"x": True})]),
    ('Let me look that up.\n{"name": "search", "parameters": {"q": "herd"}}', "Let me look that up.",
     [("search", {"q": "herd"})]),
    # Llama 3.1 built-ins after <|python_tag|>
    ('<|python_tag|>brave_search.call(query="weather in Paris")<|eom_id|>', None,
     [("brave_search", {"query": "weather in Paris"})]),
    ('<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}', None, [("get_time", {"zone": "CET"})]),
    ('<|python_tag|>print(1 + 1)<|eom_id|>', None, [("code_interpreter", {"code": "print(1 + 1)"})]),
    # Llama 3.2 / Llama 4 pythonic, bare and wrapped, several calls, text before
    ('[get_weather(city="Paris"), get_time(zone="CET")]', None,
     [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]),
    ('[f(a=1, b=2.5, c=True, d=None, e=[1, "x"], g={"k": "v"}, h=-3)]', None,
     [("f", {"a": 1, "b": 2.5, "c": True, "d": None, "e": [1, "x"], "g": {"k": "v"}, "h": -3})]),
    ('[f(flag=true, nothing=null)]<|eot|>', None, [("f", {"flag": True, "nothing": None})]),
    ('I will check the weather. [get_weather(city="Paris")]', "I will check the weather.",
     [("get_weather", {"city": "Paris"})]),
    ('<|python_start|>[get_weather(city="Paris"), get_time(zone="CET")]<|python_end|>', None,
     [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]),
    ('Sure, checking.<|python_start|>get_weather(city="Paris")<|python_end|><|eot|>', "Sure, checking.",
     [("get_weather", {"city": "Paris"})]),
    ('<|python_start|>[a(x=1)]<|python_end|><|python_start|>[b(y=2)]<|python_end|>', None,
     [("a", {"x": 1}), ("b", {"y": 2})]),
])
def test_formats(text, content, calls):
    assert calls_of(text) == (content, calls)


@pytest.mark.parametrize("text", [
    "The capital of France is Paris.",
    "Here is a list: [1, 2, 3] and a dict {\"a\": 1}.",
    '{"name": "f", "parameters": {"x": 1}',  # cut off
    '{"name": 3, "parameters": {}}',  # not a name
    '{"name": "Alice", "age": 3}',  # JSON data with a "name" key, not a call
    '[{"name": "a", "parameters": {}}, {"name": "Paris", "population": 2}]',
    '{"type": "function", "function": {"name": "f", "parameters": {}}, "extra": 1}',
    "[f(1, 2)]",  # positional arguments: not a call we can name
    "[f(x=open('/etc/passwd'))]",  # not a literal
    "[get_weather(city=\"Paris\"",  # cut off
    "<|python_start|>[f(x=]<|python_end|>",
    "",
])
def test_not_a_call_is_content(text):
    content, calls = calls_of(text)
    assert calls == []
    expected = text.replace("<|python_start|>", "").replace("<|python_end|>", "").strip() or None
    assert content == expected


def test_call_ids_are_distinct_and_openai_shaped():
    parsed = parse_tool_calls('[a(x=1), a(x=2)]')
    first, second = (call.to_openai() for call in parsed.tool_calls)
    assert first["id"] != second["id"] and first["type"] == "function"
    assert json.loads(second["function"]["arguments"]) == {"x": 2}


@pytest.mark.parametrize("text, start", [
    ("It is sunny.", None),
    ("Checking. [get_weather(", 10),
    ('{"name": "f"', 0),
    ("Let me look. <|python_start|>[f()]", 13),
    ("Let me look. <|pyth", 13),  # a marker's first characters wait for the next ones
    ("a < b", None),
    ("Before<|python_tag|>brave_search", 6),
])
def test_where_a_call_may_start(text, start):
    assert call_may_start(text) == start
