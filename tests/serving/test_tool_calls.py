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
    # prose brackets open no call: their first characters, or text after they close, rule them out
    ("See [1] and [a link](http://x) then {braces}.", None),
    ('Data {"a": 1} and more', None),
    ('Data {"a": 1} ; {"name"', 5),  # JSON calls may follow one another
    ("[f(x='it]s')] ", 0),
    ("[f(x='it]s')] ok", None),
    ("[a] [b(x=1)]", 4),
    ("Here [get_w", 5),
    ("Here {", 5),
])
def test_where_a_call_may_start(text, start):
    assert call_may_start(text) == start
    # looking again from an earlier answer's first candidate finds the same place
    for cut in range(1, len(text)):
        earlier = call_may_start(text[:cut])
        if earlier is not None and not text.startswith(("<|python_start|>", "<|python_tag|>"), earlier):
            assert call_may_start(text, earlier) == start


# --- arguments: nested, quoted, escaped, unicode; strict JSON -----------------------------------------


@pytest.mark.parametrize("text, name, arguments", [
    # commas, brackets, quotes, escapes and unicode inside strings do not split or end the call
    ('[f(s="a, b [c] {d} \\"e\\" ü 😀\\n", t=\'it\\\'s\')]', "f",
     '{"s": "a, b [c] {d} \\"e\\" ü 😀\\n", "t": "it\'s"}'),
    ('{"name": "f", "parameters": {"s": "x), g(y=1", "n": [-1, 2.5e-3, {"k": [true, null]}]}}', "f",
     '{"s": "x), g(y=1", "n": [-1, 0.0025, {"k": [true, null]}]}'),
    ('[f(a=-3, b=-0.5, c=1e3, d=(1, "x"), e={"k": [None, False]})]', "f",
     '{"a": -3, "b": -0.5, "c": 1000.0, "d": [1, "x"], "e": {"k": [null, false]}}'),
    # a lone surrogate written as an escape cannot be sent as UTF-8: it stays an escape in the JSON
    ('[f(x="\\ud800")]', "f", '{"x": "\\ud800"}'),
    ('{"name": "f", "parameters": {"x": "\\ud800"}}', "f", '{"x": "\\ud800"}'),
])
def test_arguments_are_the_exact_json_string(text, name, arguments):
    parsed = parse_tool_calls(text)
    assert [(call.name, call.arguments) for call in parsed.tool_calls] == [(name, arguments)]
    assert parsed.content is None
    parsed.tool_calls[0].arguments.encode("utf-8")  # what the server sends must be UTF-8
    json.loads(arguments)


@pytest.mark.parametrize("text", [
    # NaN / Infinity are not JSON: OpenAI clients (JSON.parse, strict parsers) cannot read them
    "[f(x=1e999)]",
    '{"name": "f", "parameters": {"x": NaN}}',
    '{"name": "f", "parameters": {"x": -Infinity}}',
    '{"name": "f", "arguments": "{\\"x\\": NaN}"}',
    # JSON data that is not a call: no parameters / arguments, a name that is not a function's, a type
    '{"name": "Alice"}',
    '[{"name": "Alice"}, {"name": "Bob"}]',
    '{"name": "Alice Smith", "parameters": {}}',
    '{"type": "person", "name": "f", "parameters": {}}',
    # a call inside a truncated or malformed call is that call's argument, not a call of its own
    '[send(msgs=[note(text="hi")]',
    '{"name": "f", "parameters": {"x": {"name": "g", "parameters": {}}',
    '{"name": "f", "parameters": {"note": "[g(x=1)]',
    "[f(x=1)] and then [g(y=[h(z=2)]",
    # nested past Python's recursion limit: content, never an exception
    "[" * 5000 + "]" * 5000,
    '{"name": "f", "parameters": ' + "[" * 5000 + "]" * 5000 + "}",
    '[{"name": "f", "parameters": {"x": ' + "[" * 5000 + "]" * 5000 + "}}]",
    "[f(x=" + "[" * 500 + "]" * 500 + ")]",
    # brackets in prose, a call mentioned but not made
    "Call get_weather(city=\"Paris\") to get it.",
    "Use [get_weather(city=\"Paris\")] when asked, then reply.",
    "Sets look like {1, 2} and lists like [1, 2].",
])
def test_not_a_call_stays_content(text):
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == []
    assert parsed.content == text


def test_many_brackets_in_prose_before_a_call():
    prose = "See [1], [2] and {x}. " * 40  # 120 brackets before the call: none can start one
    parsed = parse_tool_calls(prose + '[get_weather(city="Paris")]')
    assert parsed.content == prose.strip()
    assert [(call.name, call.arguments) for call in parsed.tool_calls] == [("get_weather", '{"city": "Paris"}')]


def test_a_call_after_a_finished_nested_structure_still_counts():
    text = 'Data: {"a": [1, {"b": "]"}]}. Now: {"name": "f", "parameters": {"q": "x"}}'
    assert calls_of(text) == ('Data: {"a": [1, {"b": "]"}]}. Now:', [("f", {"q": "x"})])


# --- <|python_tag|> and <|python_start|> ------------------------------------------------------------


@pytest.mark.parametrize("text, content, calls", [
    # a truncated call or broken code after the tag is content (the tag dropped, as decoding does)
    ('<|python_tag|>{"name": "f", "parameters": {"x": 1', '{"name": "f", "parameters": {"x": 1', []),
    ('Let me run it.<|python_tag|>def f(:', "Let me run it.def f(:", []),
    # code with a dotted call is code, Llama 3.1's tool.call(...) is the built-in tool
    ("<|python_tag|>plt.show()<|eom_id|>", None, [("code_interpreter", {"code": "plt.show()"})]),
    ('<|python_tag|>wolfram_alpha.call(query="2+2")<|eom_id|>', None, [("wolfram_alpha", {"query": "2+2"})]),
    ('Searching.<|python_tag|>brave_search.call(query="a, \\"b\\" [c]")', "Searching.",
     [("brave_search", {"query": 'a, "b" [c]'})]),
    # a failed Llama 4 block: the end markers go, the text stays
    ("<|python_start|>[f(x=]<|python_end|><|eot|>", "[f(x=]", []),
    ('Checking.<|python_start|>[get_weather(city="Paris, FR"), get_time(zone="CET")]<|python_end|><|eot|>',
     "Checking.", [("get_weather", {"city": "Paris, FR"}), ("get_time", {"zone": "CET"})]),
    # the shape Llama 4's chat template gives an assistant turn with calls (its content in the block, the
    # calls as JSON after it), which the model copies
    ('<|python_start|>Let me check.<|python_end|>{"name": "f", "parameters": {"x": 1}}{"name": "g", "parameters": {}}'
     '<|eot|>', "Let me check.", [("f", {"x": 1}), ("g", {})]),
    ('<|python_start|><|python_end|>{"name": "f", "parameters": {"s": "a]"}}', None, [("f", {"s": "a]"})]),
    ('Sure. <|python_start|>Let me check.<|python_end|>[f(x=1)]', "Sure. Let me check.", [("f", {"x": 1})]),
    ('<|python_start|>Let me check.<|python_end|>{"name": "f", "para', 'Let me check.{"name": "f", "para', []),
    ("<|python_start|>[f(x=1)]<|python_end|> and more text", "[f(x=1)] and more text", []),
])
def test_tagged_answers(text, content, calls):
    assert calls_of(text) == (content, calls)


def test_the_parser_never_raises(monkeypatch):
    import herd.serving.tool_calls as module

    def broken(text):
        raise RuntimeError("a bug")

    monkeypatch.setattr(module, "parse_pythonic_calls", broken)
    parsed = parse_tool_calls('Sure. <|python_start|>[f(x=1)]<|python_end|><|eot|>')
    assert parsed.tool_calls == [] and parsed.content == "Sure. [f(x=1)]"


def test_ids_are_unique_across_answers():
    ids = [call.id for _ in range(50) for call in parse_tool_calls("[a(), b()]").tool_calls]
    assert len(set(ids)) == 100 and all(i.startswith("call_") for i in ids)


# --- streaming: what is sent before the end plus the rest is the whole answer's content ---------------


@pytest.mark.parametrize("text", [
    'I will check. [get_weather(city="Paris")]',
    "Here is a list: [1, 2, 3] and a dict {\"a\": 1}.",
    "See [1]. " * 5 + '{"name": "f", "parameters": {"s": "a, [b]"}}',
    '[send(msgs=[note(text="hi")]',
    'Let me run it.<|python_tag|>{"name": "f", "param',
    'Sure.<|python_start|>[f(x="é")]<|python_end|>',
    "a < b and <|pyth is not a tag",
])
def test_streamed_content_matches(text):
    from herd.serving.server import _ToolStream

    stream = _ToolStream()
    sent = "".join(stream.add(text[i:i + 3]) for i in range(0, len(text), 3))
    parsed = parse_tool_calls(stream.whole)
    assert sent + stream.rest_of(parsed.content) == (parsed.content or "")
    for call in parsed.tool_calls:  # no call's text was sent as content
        assert call.name not in sent


@pytest.mark.parametrize("text, sent", [
    ("See [1] and [a link](http://x.org). Then {braces} too. The end.",
     "See [1] and [a link](http://x.org). Then {braces} too. The end."),
    ('Data: {"a": 1} as asked. Done', 'Data: {"a": 1} as asked. Done'),
    ('Notes [1]. Now [get_weather(city="Paris")]', "Notes [1]. Now"),
    ('Checking {"name": "f", "parameters": {}}', "Checking"),
])
def test_prose_brackets_stream_before_the_end(text, sent):
    """A streamed answer is held at a `[` or `{` only while it may open a call: prose brackets are
    sent as they come, a call is never sent as content."""
    from herd.serving.server import _ToolStream

    stream = _ToolStream()
    assert "".join(stream.add(ch) for ch in text) == sent
    parsed = parse_tool_calls(text)
    assert (parsed.content or "") == sent + stream.rest_of(parsed.content)
