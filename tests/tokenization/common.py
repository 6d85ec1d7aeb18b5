"""What the tokenizer tests share: the tokenizer folders from ../shared, loaded by herd and by
transformers 5.17 (the oracle), test strings and chat conversations, and helpers to compare outputs.

Each folder is loaded once per test session by both libraries (`shared`); tests that change a
tokenizer load their own (`load_both`). Test modules import the fixtures they use from here.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from herd.tokenization import AutoTokenizer

transformers = pytest.importorskip("transformers")

TOKENIZERS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tokenizers"
FOLDERS = ["llama3.1", "llama3-nobos", "spm-llama-style"]

if not all((TOKENIZERS / name / "tokenizer.json").is_file() for name in FOLDERS):
    pytest.skip(f"tokenizer folders are not in {TOKENIZERS}", allow_module_level=True)


def load_both(name: str, **kwargs):
    """Fresh (herd tokenizer, transformers tokenizer) of a folder, for tests that change them."""
    folder = TOKENIZERS / name
    return AutoTokenizer.from_pretrained(folder, **kwargs), transformers.AutoTokenizer.from_pretrained(folder, **kwargs)


_SHARED: dict[str, tuple] = {}


def shared(name: str):
    """(herd, transformers) tokenizers of a folder, loaded once for the whole session; do not change them."""
    if name not in _SHARED:
        herd_tok, ref_tok = load_both(name)
        herd_tok.folder_name = name
        _SHARED[name] = (herd_tok, ref_tok)
    return _SHARED[name]


@pytest.fixture(scope="module", params=FOLDERS)
def pair(request):
    return shared(request.param)


@pytest.fixture(scope="module")
def llama31():
    return shared("llama3.1")


def _padded(pair):
    """The shared pair with pad_token = eos_token, restored afterwards."""
    herd_tok, ref_tok = pair
    herd_tok.pad_token = herd_tok.eos_token
    ref_tok.pad_token = ref_tok.eos_token
    yield herd_tok, ref_tok
    herd_tok.pad_token = None
    ref_tok.pad_token = None


@pytest.fixture
def with_pad_token(pair):
    yield from _padded(pair)


@pytest.fixture
def llama31_with_pad_token(llama31):
    yield from _padded(llama31)


# ----------------------------------------------------------------------------------------------
# Test strings
# ----------------------------------------------------------------------------------------------

BASE_STRINGS = [
    "",
    " ",
    "   ",
    "\t",
    "\n",
    "\n\n\n",
    " \n \t ",
    "\r\n",
    "Hello world",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "  double  spaces  here  ",
    "tabs\tand\ttabs",
    "line1\nline2\n\nline4\n",
    "Mixed\r\nline endings\r",
    "UPPER lower MiXeD CaSe",
    "don't won't it's I'm you're they've we'll he'd",
    "naïve café résumé",
    "Straße Größe Ünïcödé ÀÉÎÕÜ",
    "日本語のテキストです。",
    "中文测试，标点符号。",
    "한국어 텍스트",
    "Привет, мир!",
    "مرحبا بالعالم",
    "שלום עולם",
    "ελληνικά γράμματα",
    "हिन्दी पाठ",
    "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦",
    "flags 🇫🇷🇯🇵",
    "math ∑∫√∞ ≠ ≤ ≥ π",
    "currency $€£¥₹",
    "1234567890",
    "3.14159265358979",
    "-42 +17 1e-9",
    "1,000,000.00",
    "12345678901234567890123456789012345678901234567890",
    "2024-07-23T12:34:56Z",
    "0x1F 0b1010 0o777",
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '<html><body class="x">&amp; &lt;</body></html>',
    '{"key": [1, 2, {"nested": null}], "b": true}',
    "SELECT * FROM t WHERE a = 'b';",
    "path/to/file.py:123:45",
    "https://example.com/a?b=c&d=e#f",
    "user@example.com",
    "<|begin_of_text|>",
    "<|eot_id|>",
    "text<|eot_id|>more text",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|reserved_special_token_5|>",
    "<|end_of_text|> end",
    "<s>",
    "</s>",
    "<unk>",
    "<s>Hello</s>",
    "a <s> b </s> c",
    "▁already▁has▁metaspace",
    "\u00a0non-breaking\u00a0space",
    "zero\u200bwidth\u200djoiner",
    "combining e\u0301 vs é",
    "\x00 nul and \x07 bell",
    "a" * 300,
    "ab " * 100,
    " ".join(str(i) for i in range(120)),
    "    indented code block\n        more",
    "...!!!???;;;",
    "—–-‐",
    "«quotes» “curly” ‘single’",
    "x",
    "I",
    "the",
    " the",
    "\t\tdeep\ttabs\n\t",
    "<0x41> byte token text",
]


def _random_strings(count: int, seed: int = 0) -> list[str]:
    pieces = list("abcXYZ019 \t\n.,!?'\"-_/()[]{}<>|@#") + [
        "é", "ß", "ø", "日", "本", "語", "한", "д", "ж", "ع", "😀", "🎉", "👍🏽", "\u200b", "\u00a0",
        "  ", "\n\n", "<s>", "</s>", "<|eot_id|>", "<|begin_of_text|>", "hello", " world", "123", "4567",
    ]  # fmt: skip
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(count)]


TEST_STRINGS = (
    BASE_STRINGS
    + [" " + s for s in BASE_STRINGS]
    + [s + " " for s in BASE_STRINGS]
    + [s + "\n" + s for s in BASE_STRINGS[8:48]]
    + _random_strings(80)
)


def plain(encoding) -> dict:
    """A tokenizer output as {key: (kind, python value)}, comparable across the two libraries."""
    out = {}
    for key in encoding.keys():
        value = encoding[key]
        if isinstance(value, torch.Tensor):
            out[key] = ("pt", str(value.dtype), value.tolist())
        elif isinstance(value, np.ndarray):
            if value.dtype == object:
                out[key] = ("np-object", [row.tolist() for row in value])
            else:
                out[key] = ("np", str(value.dtype), value.tolist())
        else:
            out[key] = ("list", value)
    return out


def outcome(function, *args, **kwargs):
    """("ok", plain output) or ("error", exception class name), to compare failures too."""
    try:
        result = function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the point is to compare which error
        # tokenizers raises bare Exceptions (e.g. for impossible truncations); herd turns them into ValueErrors.
        return ("error", "ValueError" if type(error) is Exception else type(error).__name__)
    if hasattr(result, "keys"):
        return ("ok", plain(result))
    if isinstance(result, tuple) and hasattr(result, "_fields"):  # CharSpan, TokenSpan: the class's name too
        return ("ok", type(result).__name__, tuple(result))
    if isinstance(result, (torch.Tensor, np.ndarray)):
        return ("ok", type(result).__name__, result.tolist())
    return ("ok", result)


def first_difference(ours: list, theirs: list, inputs: list) -> str:
    for index, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return f"input {inputs[index]!r}: herd {a} vs transformers {b}"
    return f"lengths {len(ours)} vs {len(theirs)}"


# ----------------------------------------------------------------------------------------------
# Chat test data
# ----------------------------------------------------------------------------------------------

# The Llama 3.1 Instruct chat template (Meta's tokenizer_config.json): system prompt with the
# "Cutting Knowledge"/"Today Date" header, JSON tools (in the first user message by default),
# built-in tools with <|python_tag|> calls and <|eom_id|>, and ipython/tool results.
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n"
    '{%- if not date_string is defined %}\n    {%- set date_string = "26 Jul 2024" %}\n{%- endif %}\n'
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = "" %}\n{%- endif %}\n\n'
    "{#- System message + builtin tools #}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{%- if builtin_tools is defined or tools is not none %}\n    {{- "Environment: ipython\\n" }}\n{%- endif %}\n'
    "{%- if builtin_tools is defined %}\n"
    '    {{- "Tools: " + builtin_tools | reject(\'equalto\', \'code_interpreter\') | join(", ") + "\\n\\n"}}\n'
    "{%- endif %}\n"
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{%- if tools is not none and not tools_in_user_message %}\n"
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- "<|eot_id|>" }}\n\n'
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n    {%- else %}\n"
    '        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n'
    "{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n    {%- endfor %}\n    {{- first_user_message + "<|eot_id|>"}}\n{%- endif %}\n\n'
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n        {%- endif %}\n'
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n'
    "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
    "                {{- arg_name + '=\"' + arg_val + '\"' }}\n                {%- if not loop.last %}\n"
    '                    {{- ", " }}\n                {%- endif %}\n                {%- endfor %}\n'
    '            {{- ")" }}\n        {%- else  %}\n'
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n            {{- '\"parameters\": ' }}\n"
    '            {{- tool_call.arguments | tojson }}\n            {{- "}" }}\n        {%- endif %}\n'
    "        {%- if builtin_tools is defined %}\n            {#- This means we're in ipython mode #}\n"
    '            {{- "<|eom_id|>" }}\n        {%- else %}\n            {{- "<|eot_id|>" }}\n        {%- endif %}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n"
    '        {%- endif %}\n        {{- "<|eot_id|>" }}\n    {%- endif %}\n{%- endfor %}\n'
    "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)

# A template for list contents ({"type": "text"/"image", ...}), in the style of Llama 3.2 Vision.
CONTENT_LIST_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<|image|>' }}{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_temperature",
        "description": "Température actuelle à un endroit <en °C> & autres: 東京, São Paulo",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": 'The location, "City, Country"'},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}

SYSTEM_CHAT = [
    {"role": "system", "content": "  You are a helpful assistant.  "},
    {"role": "user", "content": "Hi! Who are you?"},
    {"role": "assistant", "content": "I'm an assistant. 😀"},
    {"role": "user", "content": "Tell me about 日本 and\n\ttabs."},
]

TOOL_CHAT = [
    {"role": "system", "content": "You are a bot that answers weather questions."},
    {"role": "user", "content": "What's the temperature in Paris?"},
    {
        "role": "assistant",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_current_temperature", "arguments": {"location": "Paris, France"}},
            }
        ],
    },
    {"role": "tool", "content": "22.5"},
    {"role": "assistant", "content": "It is 22.5 °C in Paris."},
    {"role": "user", "content": "And in Tokyo?"},
    {
        "role": "assistant",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_current_temperature", "arguments": {"location": "東京"}}}
        ],
    },
    {"role": "ipython", "content": {"temperature": 18, "unit": "celsius", "note": "<ok> & fine"}},
]

BUILTIN_TOOL_CHAT = [
    {"role": "user", "content": "Search the weather"},
    {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": "brave_search", "arguments": {"query": "weather"}}}],
    },
    {"role": "ipython", "content": "sunny"},
]
