"""Tool calls out of a Llama model's answer, in every format the family writes.

- Llama 3.1 / 3.3, JSON: `{"name": "f", "parameters": {...}}` (some fine-tunes write "arguments"),
  one object, several separated by `;` or new lines, or a JSON list of them; built-in tools as
  `<|python_tag|>brave_search.call(query="...")` (ending in `<|eom_id|>`), and
  `<|python_tag|>` + plain code for code_interpreter.
- Llama 3.2 1B/3B and Llama 4, pythonic: `[f(a=1), g(b="x")]`, Llama 4 sometimes inside
  `<|python_start|>...<|python_end|>`.

The formats are told apart by the text, not by the model (fine-tunes mix them up: vllm#16214,
#22917). Text before a call stays as content. An answer that is not a well-formed call is content,
never an error: the parser never raises.

What counts as a call: a JSON object with only a call's keys, a name and its "parameters" (or
"arguments"), as vLLM's llama3_json parser asks; pythonic calls with keyword arguments that are
literals. `arguments` is strict JSON (no NaN / Infinity, which clients cannot read; such a call is
content). A bare call runs to the end of the answer, and one inside an earlier structure that never
closes (`[send(msgs=[note(text="hi")]`, cut off) is that structure's argument, not a call.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

PYTHON_TAG = "<|python_tag|>"
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
CALL_MARKERS = (PYTHON_TAG, PYTHON_START)
# Markers that may end an answer, decoded with the special tokens kept.
END_MARKERS = ("<|eom_id|>", "<|eot_id|>", "<|eot|>", "<|end_of_text|>", "<|eom|>")
# Where to look for the start of a bare call: a JSON object or a pythonic list. At most this many
# candidates are tried, so a long answer full of brackets costs little.
MAX_START_CANDIDATES = 64
# The keys a JSON call may have: Llama 3.1's name and parameters (or arguments), in OpenAI's wrapper or not.
_CALL_KEYS = {"name", "parameters", "arguments", "type"}
_WRAPPER_KEYS = {"id", "type", "function"}
logger = logging.getLogger(__name__)
_LITERAL_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
# Where a bare call may begin: a JSON object (`{"`) or a pythonic / JSON list (`[f(`, `[{"`). Only these
# count as candidates (and against MAX_START_CANDIDATES): prose brackets ("[1]", "{braces}") cannot.
_PLAUSIBLE_START = re.compile(r'(?=\{\s*"|\[\s*(?:\{\s*"|[^\W\d][\w.]*\s*\())')
_CLOSERS = {"[": "]", "{": "}", "(": ")"}
_OPENER = re.compile(r"[\[{]")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python's json reads them, clients' parsers do not


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _encode_arguments(arguments: dict) -> str:
    """Strict JSON (no NaN / Infinity: raises ValueError), UTF-8 kept as is; a lone surrogate (an escape
    such as "\\ud800" in the model's text) stays escaped, as it cannot be sent in UTF-8."""
    encoded = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    try:
        encoded.encode("utf-8")
    except UnicodeEncodeError:
        encoded = json.dumps(arguments, allow_nan=False)
    return encoded


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's function.arguments
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedAnswer:
    content: str | None
    tool_calls: list[ToolCall]


def _strip_end(text: str) -> str:
    text = text.strip()
    changed = True
    while changed:
        changed = False
        for marker in END_MARKERS:
            if text.endswith(marker):
                text, changed = text[: -len(marker)].rstrip(), True
    return text


# --- JSON -----------------------------------------------------------------------------------------


def _json_call(value: Any) -> ToolCall | None:
    # Only a call's own keys: an object with others ({"name": "Alice", "age": 3}) is an answer written
    # in JSON (response_format, the user's data), not a call to a function "Alice".
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):  # {"type": "function", "function": {...}}
        if not value.keys() <= _WRAPPER_KEYS:
            return None
        value = value["function"]
    # A call names its arguments (Llama 3.1 writes "parameters": {} for a function without any), as
    # vLLM's llama3_json parser requires: {"name": "Alice"} alone is data.
    if not value.keys() <= _CALL_KEYS or not value.keys() & {"parameters", "arguments"}:
        return None
    if value.get("type", "function") != "function":
        return None
    name = value.get("name")
    arguments = value["parameters"] if "parameters" in value else value["arguments"]
    if isinstance(arguments, str):
        try:
            arguments = _DECODER.decode(arguments)
        except ValueError:
            return None
    if not _valid_name(name) or not isinstance(arguments, dict):
        return None
    try:
        return ToolCall(name, _encode_arguments(arguments))
    except ValueError:
        return None


def _valid_name(name: Any) -> bool:
    """A function's name: a non-empty string without white space or control characters, sendable as UTF-8."""
    if not isinstance(name, str) or not name or any(not ch.isprintable() or ch.isspace() for ch in name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json_calls(text: str) -> list[ToolCall] | None:
    """Calls from JSON objects (one, several separated by ; or white space, or a list), or None."""
    calls: list[ToolCall] = []
    position = 0
    while True:
        while position < len(text) and (text[position].isspace() or text[position] in ";,"):
            position += 1
        if position == len(text):
            break
        try:
            value, position = _DECODER.raw_decode(text, position)
        except (ValueError, RecursionError):  # not JSON, NaN / Infinity, nested past Python's stack
            return None
        values = value if isinstance(value, list) else [value]
        for item in values:
            call = _json_call(item)
            if call is None:
                return None
            calls.append(call)
    return calls or None


# --- pythonic -------------------------------------------------------------------------------------


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
        return _LITERAL_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Tuple):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(key): _literal(value) for key, value in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def _function_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    # brave_search.call(...) (Llama 3.1's built-ins) and module.function(...) name the tool by its head
    if isinstance(node, ast.Attribute):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            parts.append(node.id)
            parts.reverse()
            return parts[0] if parts[-1] == "call" and len(parts) == 2 else ".".join(parts)
    return None


def parse_pythonic_calls(text: str) -> list[ToolCall] | None:
    """Calls from `[f(a=1), g(b="x")]` (or a single bare `f(a=1)`), keyword arguments only, or None."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _function_name(node.func)
        if name is None or any(keyword.arg is None for keyword in node.keywords):
            return None
        try:
            arguments = {keyword.arg: _literal(keyword.value) for keyword in node.keywords}
            encoded = _encode_arguments(arguments)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            # not a literal, not JSON (a set, bytes, 1e999 as Infinity), nested past Python's stack
            return None
        calls.append(ToolCall(name, encoded))
    return calls or None


# --- the whole answer -----------------------------------------------------------------------------


def _calls(text: str) -> list[ToolCall] | None:
    text = text.strip()
    if text.startswith("{"):
        return parse_json_calls(text)
    if text.startswith("["):
        return parse_pythonic_calls(text) or parse_json_calls(text)
    return None


def _content(text: str) -> str | None:
    text = text.strip()
    return text or None


# What the first characters of a call look like (`_PLAUSIBLE_START`), where the text may still end:
# `{"`, `[{"`, `[name(`, or a prefix of one of them at the end of the answer so far.
_OPENING_PREFIX = re.compile(r'\{\s*(?:"|\Z)|\[\s*(?:\Z|\{\s*(?:"|\Z)|[^\W\d][\w.]*\s*(?:\(|\Z))')


def _could_open_call(text: str, start: int) -> bool:
    """Whether the `[` or `{` at text[start] (an answer so far) may still open a call: its first
    characters may (not "[1]", "[a link](url)", "{braces}"), and once its brackets close, only white
    space, another call or an end marker follows (a bare call runs to the end of the answer).
    Once False, it stays False however the answer goes on."""
    if not _OPENING_PREFIX.match(text, start):
        return False
    end = _structure_end(text, start)
    if end >= len(text):
        return True  # still open
    tail = text[end + 1:].lstrip(" \t\r\n;,")
    return not tail or tail[0] in "{[<"


def call_may_start(text: str, after: int = 0) -> int | None:
    """Where in `text` (an answer so far), at `after` or later, a tool call may begin: the first call
    marker (or a marker's first characters at the very end), or the first `[` / `{` that may still
    open a call (`_could_open_call`); None when none can. A streamed answer is sent up to there and
    held from there: from a marker to the end, from an opener until the answer rules it out.
    `after`: where an earlier look at a shorter answer found its first candidate (those before
    it stay ruled out)."""
    starts = [index for index in (text.find(marker, after) for marker in CALL_MARKERS) if index >= 0]
    for marker in CALL_MARKERS:
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:size]):
                starts.append(len(text) - size)
                break
    first_marker = min(starts, default=len(text))
    for match in _OPENER.finditer(text, after, first_marker):
        if _could_open_call(text, match.start()):
            return match.start()
    return min(starts, default=None)


def parse_tool_calls(text: str) -> ParsedAnswer:
    """The answer's content and tool calls. `text` is decoded with its special tokens kept (the
    markers above tell the formats apart); the answer is all content when it holds no valid call.
    Never raises: whatever goes wrong, the answer is content."""
    try:
        return _parse(text)
    except Exception:  # noqa: BLE001 - a model's answer must never become a 500
        logger.warning("tool-call parsing failed; the answer is returned as content", exc_info=True)
        return ParsedAnswer(_content(_strip_end(text).replace(PYTHON_START, "").replace(PYTHON_END, "")
                                     .replace(PYTHON_TAG, "")), [])


def _is_python(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def _tagged_calls(code: str) -> list[ToolCall] | None:
    """Calls after <|python_tag|>: JSON ones, a pythonic list, or one bare call. A bare call with a
    dotted name other than Llama 3.1's `tool.call(...)` (`plt.show()`, `os.listdir(path=".")`) is
    code for code_interpreter, not a tool."""
    found = parse_json_calls(code)
    if found:
        return found
    found = parse_pythonic_calls(code)
    if found and not code.startswith("[") and any("." in call.name for call in found):
        return None
    return found


def _structure_end(text: str, start: int) -> int:
    """Where the bracket structure opened at text[start] stops: the index of its closing bracket, of
    the first closer that does not match (it was prose), or len(text) when it never closes. Quoted
    strings (either quote, backslash escapes) are skipped."""
    stack: list[str] = []
    quote = None
    i = start
    while i < len(text):
        ch = text[i]
        if quote is not None:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in _CLOSERS:
            stack.append(_CLOSERS[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch or not stack:
                return i
        i += 1
    return len(text)


def _parse_blocks(answer: str) -> ParsedAnswer:
    """Llama 4's `<|python_start|>...<|python_end|>` blocks. A block holds calls, or text: the chat
    template (transformers') renders an assistant turn with calls as `<|python_start|>` + its content +
    `<|python_end|>` followed by the calls as JSON objects, and models copy it. Calls in the blocks or
    right after the last one; text before, or in a block that is not a call, is content. Text after
    the calls, or no call at all: the whole answer is content."""
    fallback = ParsedAnswer(_content(answer.replace(PYTHON_START, "").replace(PYTHON_END, "")), [])
    before, _, rest = answer.partition(PYTHON_START)
    content = [before]
    calls: list[ToolCall] = []
    while True:
        block, _, after = rest.partition(PYTHON_END)
        found = parse_pythonic_calls(block) or parse_json_calls(block.strip())
        if found:
            calls += found
        elif calls:
            return fallback  # text after a call
        else:
            content.append(block)
        if PYTHON_START not in after:
            break
        between, _, rest = after.partition(PYTHON_START)
        if between.strip():
            return fallback
    if after.strip():
        found = _calls(after)
        if not found:
            return fallback
        calls += found
    return ParsedAnswer(_content("".join(content)), calls) if calls else fallback


def _parse(text: str) -> ParsedAnswer:
    answer = _strip_end(text)
    if PYTHON_START in answer:
        return _parse_blocks(answer)
    if PYTHON_TAG in answer:
        before, _, code = answer.partition(PYTHON_TAG)
        code = code.strip()
        found = _tagged_calls(code)
        if found is None and code and _is_python(code):
            # Llama 3.1's code_interpreter: the tag followed by plain Python code
            found = [ToolCall("code_interpreter", _encode_arguments({"code": code}))]
        if found:
            return ParsedAnswer(_content(before), found)
        # not a call, not code (a truncated call, prose): all content, as without tools
        return ParsedAnswer(_content(answer.replace(PYTHON_TAG, "")), [])
    # A bare call runs to the end of the answer: it ends with "]" or "}".
    if not answer.endswith(("]", "}")):
        return ParsedAnswer(_content(answer), [])
    candidates = [match.start() for match in _PLAUSIBLE_START.finditer(answer)][:MAX_START_CANDIDATES]
    ends: dict[int, int] = {}
    for n, start in enumerate(candidates):
        found = _calls(answer[start:])
        if not found:
            continue
        # A call inside an earlier structure that never closes (a truncated or malformed call:
        # `[send(msgs=[note(text="hi")]`) is an argument of that one, not a call of its own.
        enclosed = False
        for earlier in candidates[:n]:
            if earlier not in ends:
                ends[earlier] = _structure_end(answer, earlier)
            if ends[earlier] > start:
                enclosed = True
                break
        if not enclosed:
            return ParsedAnswer(_content(answer[:start]), found)
    return ParsedAnswer(_content(answer), [])
