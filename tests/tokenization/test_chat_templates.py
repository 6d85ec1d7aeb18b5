"""Chat templates against transformers 5.17: rendering, helpers, the sandbox, tools, conversation checks,
and where tokenizers and processors read templates from.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from typing import Literal

import jinja2
import pytest

from herd.tokenization import AutoTokenizer
from herd.processing_utils import PROCESSOR_TEMPLATE_SOURCES
from herd.tokenization.chat_templates import TOKENIZER_TEMPLATE_SOURCES, function_tool_schema, read_chat_template
from tests.tokenization.common import (  # noqa: F401  (llama31, pair, with_pad_token: fixtures)
    BUILTIN_TOOL_CHAT,
    CONTENT_LIST_TEMPLATE,
    LLAMA31_CHAT_TEMPLATE,
    SYSTEM_CHAT,
    TOKENIZERS,
    TOOL_CHAT,
    WEATHER_TOOL,
    llama31,
    outcome,
    pair,
    transformers,
    with_pad_token,
)


# ----------------------------------------------------------------------------------------------
# Chat templates
# ----------------------------------------------------------------------------------------------


def test_folder_templates_render_identically(pair):
    # spm-llama-style has no template: both libraries refuse with a ValueError.
    herd_tok, ref_tok = pair
    for chat in (SYSTEM_CHAT, SYSTEM_CHAT[1:], SYSTEM_CHAT[:2]):
        for generation_prompt in (False, True):
            kwargs = dict(add_generation_prompt=generation_prompt, tokenize=False)
            assert outcome(herd_tok.apply_chat_template, chat, **kwargs) == outcome(
                ref_tok.apply_chat_template, chat, **kwargs
            )
            assert outcome(herd_tok.apply_chat_template, chat, add_generation_prompt=generation_prompt) == outcome(
                ref_tok.apply_chat_template, chat, add_generation_prompt=generation_prompt
            )
    kwargs = dict(tokenize=False, continue_final_message=True)
    assert outcome(herd_tok.apply_chat_template, SYSTEM_CHAT[:3], **kwargs) == outcome(
        ref_tok.apply_chat_template, SYSTEM_CHAT[:3], **kwargs
    )


LLAMA31_CASES = [
    dict(conversation=SYSTEM_CHAT),
    dict(conversation=SYSTEM_CHAT, add_generation_prompt=True),
    dict(conversation=SYSTEM_CHAT[1:], date_string="23 Jul 2024"),
    dict(conversation=SYSTEM_CHAT[:3], continue_final_message=True),
    dict(
        conversation=SYSTEM_CHAT[:2] + [{"role": "assistant", "content": "Sure, trailing  "}],
        continue_final_message=True,
    ),
    dict(conversation=TOOL_CHAT, tools=[WEATHER_TOOL]),
    dict(conversation=TOOL_CHAT, tools=[WEATHER_TOOL], add_generation_prompt=True, date_string="01 Jan 2025"),
    dict(conversation=TOOL_CHAT, tools=[WEATHER_TOOL], tools_in_user_message=False),
    dict(conversation=TOOL_CHAT[1:], tools=[WEATHER_TOOL, WEATHER_TOOL], add_generation_prompt=True),
    dict(conversation=BUILTIN_TOOL_CHAT, builtin_tools=["brave_search", "wolfram_alpha", "code_interpreter"]),
    dict(conversation=[SYSTEM_CHAT, TOOL_CHAT[:2], SYSTEM_CHAT[1:2]], add_generation_prompt=True),
    dict(conversation=[TOOL_CHAT, TOOL_CHAT[:3]], tools=[WEATHER_TOOL], date_string="5 May 2025"),
    dict(conversation=[SYSTEM_CHAT[:3], SYSTEM_CHAT[:3]], continue_final_message=True),
    # Two tool calls in one message: the template itself rejects it with raise_exception.
    dict(conversation=TOOL_CHAT[:2] + [{"role": "assistant", "tool_calls": TOOL_CHAT[2]["tool_calls"] * 2}]),
]


@pytest.mark.parametrize("case", LLAMA31_CASES, ids=lambda c: f"{len(c['conversation'])}msgs-" + "-".join(sorted(c)))
def test_llama31_chat_template_matches(llama31, case):
    herd_tok, ref_tok = llama31
    rejected = case is LLAMA31_CASES[-1]
    case = dict(case, chat_template=LLAMA31_CHAT_TEMPLATE)
    text = outcome(herd_tok.apply_chat_template, tokenize=False, **case)
    assert text == outcome(ref_tok.apply_chat_template, tokenize=False, **case)
    assert (text == ("error", "TemplateError")) if rejected else (text[0] == "ok")
    if text[0] == "ok":
        rendered = text[1]
        first = rendered if isinstance(rendered, str) else rendered[0]
        assert first.startswith("<|begin_of_text|>") and not first.startswith("<|begin_of_text|>" * 2)
    for kwargs in (dict(return_dict=False), dict(), dict(return_dict=True, return_tensors="np")):
        assert outcome(herd_tok.apply_chat_template, **case, **kwargs) == outcome(
            ref_tok.apply_chat_template, **case, **kwargs
        ), kwargs


def test_tokenized_chat_has_one_bos(llama31):
    herd_tok, ref_tok = llama31
    ids = herd_tok.apply_chat_template(SYSTEM_CHAT, chat_template=LLAMA31_CHAT_TEMPLATE, return_dict=False)
    assert ids[0] == 128000 and ids[1] != 128000
    assert ids == ref_tok.apply_chat_template(SYSTEM_CHAT, chat_template=LLAMA31_CHAT_TEMPLATE, return_dict=False)


def test_batched_chat_with_padding_and_tensors(with_pad_token):
    herd_tok, ref_tok = with_pad_token
    chats = [SYSTEM_CHAT, SYSTEM_CHAT[1:2]]
    for kwargs in (
        dict(padding=True, return_tensors="pt"),
        dict(padding=True, return_tensors="pt", return_dict=False),
        dict(padding="max_length", max_length=80, truncation=True),
        dict(truncation=True, max_length=10, add_generation_prompt=True),
        dict(tokenizer_kwargs={"padding_side": "left"}, padding=True),
    ):
        assert outcome(herd_tok.apply_chat_template, chats, **kwargs) == outcome(
            ref_tok.apply_chat_template, chats, **kwargs
        ), kwargs


def test_content_lists(llama31):
    herd_tok, ref_tok = llama31
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat, "}, {"type": "text", "text": "sitting "}]},
    ]
    for kwargs in (dict(), dict(continue_final_message=True), dict(return_dict=False)):
        kwargs = dict(kwargs, chat_template=CONTENT_LIST_TEMPLATE)
        assert outcome(herd_tok.apply_chat_template, chat, tokenize=False, **kwargs) == outcome(
            ref_tok.apply_chat_template, chat, tokenize=False, **kwargs
        )
        assert outcome(herd_tok.apply_chat_template, chat, **kwargs) == outcome(
            ref_tok.apply_chat_template, chat, **kwargs
        )


def test_template_helpers(llama31):
    herd_tok, ref_tok = llama31
    chat = SYSTEM_CHAT[1:2]
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ pad_token is defined }}|{{ messages | tojson }}|"
        "{{ messages[0] | tojson(indent=2) }}|{{ {'b': 1, 'a': [1, 2]} | tojson(sort_keys=true, separators=(',', ':')) }}|"
        "{{ 'x' if add_generation_prompt else 'y' }}|{{ extra }}"
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.role }}{% endfor %}"
        "{% generation %}[assistant]{% endgeneration %}"
    )
    kwargs = dict(chat_template=template, tokenize=False, extra="ünïcode <b>&</b>")
    assert herd_tok.apply_chat_template(chat, **kwargs) == ref_tok.apply_chat_template(chat, **kwargs)
    # Explicit keyword arguments win over the special tokens.
    kwargs["bos_token"] = "[BOS]"
    assert herd_tok.apply_chat_template(chat, **kwargs).startswith("[BOS]|<|eot_id|>|False|")
    year = herd_tok.apply_chat_template(chat, chat_template="{{ strftime_now('%Y') }}", tokenize=False)
    assert year == str(datetime.now().year)
    failing = "{{ raise_exception('Only user and assistant roles are supported!') }}"
    for tok in (herd_tok, ref_tok):
        with pytest.raises(jinja2.exceptions.TemplateError, match="Only user and assistant"):
            tok.apply_chat_template(chat, chat_template=failing, tokenize=False)


def test_the_sandbox_blocks_unsafe_templates(llama31):
    herd_tok, _ = llama31
    unsafe = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        herd_tok.apply_chat_template(SYSTEM_CHAT, chat_template=unsafe, tokenize=False)
    mutating = "{% set x = messages.append({'role': 'x'}) %}{{ messages | length }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        herd_tok.apply_chat_template(SYSTEM_CHAT, chat_template=mutating, tokenize=False)


def get_current_weather(location: str, unit: Literal["celsius", "fahrenheit"] = "celsius", days: int | None = None):
    """
    Get the current weather at a location.

    Args:
        location: The city and country, e.g. "Paris, France". This description
            goes over two lines.
        unit: The unit of temperature (choices: ["celsius", "fahrenheit"])
        days: How many days of forecast, if any.
    """


def multiply(a: float, b: list[float], options: dict[str, int], flags: tuple[bool, str]) -> float:
    """A function that multiplies numbers.

    Args:
        a: The first number
        b: More numbers
        options: Named options
        flags: Two flags

    Returns:
        The product of all the numbers.
    """
    return a


def test_python_functions_as_tools(llama31):
    herd_tok, ref_tok = llama31
    kwargs = dict(
        chat_template=LLAMA31_CHAT_TEMPLATE, tokenize=False, tools=[get_current_weather, multiply, WEATHER_TOOL]
    )
    assert herd_tok.apply_chat_template(TOOL_CHAT, **kwargs) == ref_tok.apply_chat_template(TOOL_CHAT, **kwargs)
    from transformers.utils import get_json_schema

    for function in (get_current_weather, multiply):
        assert function_tool_schema(function) == get_json_schema(function)


def test_multiple_named_templates(llama31):
    herd_tok = AutoTokenizer.from_pretrained(
        TOKENIZERS / "llama3-nobos",
        chat_template={"default": "D{{ messages|length }}", "tool_use": "T{{ tools|length }}"},
    )
    assert herd_tok.apply_chat_template(SYSTEM_CHAT, tokenize=False) == "D4"
    assert herd_tok.apply_chat_template(SYSTEM_CHAT, tools=[WEATHER_TOOL], tokenize=False) == "T1"
    assert herd_tok.apply_chat_template(SYSTEM_CHAT, chat_template="tool_use", tools=[], tokenize=False) == "T0"
    herd_tok.chat_template = {"a": "A", "b": "B"}
    assert herd_tok.apply_chat_template(SYSTEM_CHAT, chat_template="b", tokenize=False) == "B"
    with pytest.raises(ValueError, match="several chat templates"):
        herd_tok.apply_chat_template(SYSTEM_CHAT, tokenize=False)


def test_no_chat_template_is_an_error():
    herd_tok = AutoTokenizer.from_pretrained(TOKENIZERS / "spm-llama-style")
    assert herd_tok.chat_template is None
    with pytest.raises(ValueError, match=r"has no chat template.*chat_template="):
        herd_tok.apply_chat_template(SYSTEM_CHAT)
    # A template passed in works.
    assert herd_tok.apply_chat_template(SYSTEM_CHAT[1:2], chat_template="{{ bos_token }}{{ messages[0].content }}") == {
        "input_ids": herd_tok("Hi! Who are you?")["input_ids"],
        "attention_mask": [1] * len(herd_tok("Hi! Who are you?")["input_ids"]),
    }


MALFORMED = [
    ({"role": "user", "content": "hi"}, "must be a list of messages"),
    ("hello", "must be a list of messages"),
    ([], "empty conversation"),
    (["hello"], "message 0 is a str"),
    ([{"content": "hi"}], "message 0 has no 'role'"),
    ([{"role": 3, "content": "hi"}], "'role' must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}], "message 1 \\(role 'assistant'\\) has no 'content'"),
    ([{"role": "user", "content": None}], "has no 'content'"),
    ([{"role": "user", "content": 42}], "content must be a string or a list of content dicts.*got int"),
    ([{"role": "user", "content": {"type": "text", "text": "hi"}}], "got dict"),
    ([{"role": "user", "content": ["plain string item"]}], "content item 0 is a str"),
    ([[{"role": "user", "content": "ok"}], [{"role": "user"}]], "conversation 1, message 0"),
    ([[{"role": "user", "content": "ok"}], []], "empty conversation"),
]


@pytest.mark.parametrize("conversation, message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_conversations_are_errors(llama31, conversation, message):
    herd_tok, _ = llama31
    with pytest.raises(ValueError, match=message):
        herd_tok.apply_chat_template(conversation, tokenize=False)


def test_chat_argument_errors(llama31):
    herd_tok, ref_tok = llama31
    for tok in (herd_tok, ref_tok):
        with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt"):
            tok.apply_chat_template(SYSTEM_CHAT, add_generation_prompt=True, continue_final_message=True)
    for tok in (herd_tok, ref_tok):
        with pytest.raises(ValueError, match="requires `return_dict=True`"):
            tok.apply_chat_template(SYSTEM_CHAT, return_assistant_tokens_mask=True, return_dict=False)
    with pytest.raises(ValueError, match="tools must be a list"):
        herd_tok.apply_chat_template(SYSTEM_CHAT, tools=WEATHER_TOOL, tokenize=False)
    with pytest.raises(ValueError, match="each tool must be"):
        herd_tok.apply_chat_template(SYSTEM_CHAT, tools=["get_weather"], tokenize=False)

    def undocumented(x: int):
        return x

    with pytest.raises(ValueError, match="no docstring"):
        herd_tok.apply_chat_template(SYSTEM_CHAT, tools=[undocumented], tokenize=False)
    with pytest.raises(TypeError, match="documents"):
        herd_tok.apply_chat_template(SYSTEM_CHAT, documents=["text"], tokenize=False)
    # continue_final_message needs something to continue, in a field the template uses.
    with pytest.raises(ValueError, match='has no "reasoning"'):
        herd_tok.apply_chat_template(SYSTEM_CHAT, continue_final_message="reasoning", tokenize=False)
    with pytest.raises(ValueError, match="does not appear in the rendered chat"):
        herd_tok.apply_chat_template(SYSTEM_CHAT, chat_template="{{ 'content' }}", continue_final_message=True)


# ----------------------------------------------------------------------------------------------
# Where templates are read from: one reader, the tokenizer's order and the processor's
# ----------------------------------------------------------------------------------------------

# Template files of a folder, by layout (each template renders its own source's name), and the
# templates the tokenizer and a processor load from it.
JSON_TEMPLATE = {"chat_template": "{{ 'json' }}"}
TEMPLATE_LAYOUTS = {
    "jinja and json": (
        {"chat_template.jinja": "{{ 'jinja' }}", "chat_template.json": JSON_TEMPLATE},
        "{{ 'jinja' }}",
        "{{ 'json' }}",
    ),
    "config and json": (
        {"tokenizer_config.json": "{{ 'config' }}", "chat_template.json": JSON_TEMPLATE},
        "{{ 'config' }}",
        "{{ 'json' }}",
    ),
    "config and jinja": (
        {"tokenizer_config.json": "{{ 'config' }}", "chat_template.jinja": "{{ 'jinja' }}"},
        "{{ 'jinja' }}",
        "{{ 'jinja' }}",
    ),
    # transformers' tokenizer ignores a lone chat_template.json; herd's reads it.
    "json alone": ({"chat_template.json": JSON_TEMPLATE}, "{{ 'json' }}", "{{ 'json' }}"),
    # transformers' processor refuses this mix; herd's takes chat_template.json, as it does alone.
    "named jinja and json": (
        {
            "chat_template.jinja": "{{ 'jinja' }}",
            "additional_chat_templates/other.jinja": "{{ 'other' }}",
            "chat_template.json": JSON_TEMPLATE,
        },
        {"default": "{{ 'jinja' }}", "other": "{{ 'other' }}"},
        "{{ 'json' }}",
    ),
}
# The layouts on which transformers loads both, and agrees.
ORACLE_LAYOUTS = ("jinja and json", "config and json", "config and jinja")


def _write_layout(folder, layout: dict) -> None:
    from herd.models.mllama import MllamaImageProcessor

    shutil.copytree(TOKENIZERS / "spm-llama-style", folder)  # its tokenizer_config.json has no chat template
    MllamaImageProcessor().save_pretrained(folder)
    for name, content in layout.items():
        path = folder / name
        if name == "tokenizer_config.json":
            path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": content}))
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(content if isinstance(content, str) else json.dumps(content))


@pytest.mark.parametrize("layout", TEMPLATE_LAYOUTS)
def test_tokenizers_and_processors_read_templates_in_their_own_order(tmp_path, layout):
    # One reader serves both; as in transformers 5.17 a tokenizer prefers the Jinja files, then its
    # config, then chat_template.json, while a processor prefers chat_template.json.
    from herd.models.mllama import MllamaProcessor

    files, tokenizer_template, processor_template = TEMPLATE_LAYOUTS[layout]
    folder = tmp_path / "folder"
    _write_layout(folder, files)
    assert AutoTokenizer.from_pretrained(folder).chat_template == tokenizer_template
    assert MllamaProcessor.from_pretrained(folder).chat_template == processor_template
    if layout in ORACLE_LAYOUTS:
        assert transformers.AutoTokenizer.from_pretrained(folder).chat_template == tokenizer_template
        assert transformers.MllamaProcessor.from_pretrained(folder).chat_template == processor_template


def test_the_reader_follows_the_sources_given(tmp_path):
    folder = tmp_path / "folder"
    _write_layout(folder, TEMPLATE_LAYOUTS["jinja and json"][0])
    assert read_chat_template(folder, TOKENIZER_TEMPLATE_SOURCES) == "{{ 'jinja' }}"
    assert read_chat_template(folder, PROCESSOR_TEMPLATE_SOURCES) == "{{ 'json' }}"
    (folder / "processor_config.json").write_text(json.dumps({"chat_template": "{{ 'processor config' }}"}))
    (folder / "chat_template.json").unlink()
    (folder / "chat_template.jinja").unlink()
    assert read_chat_template(folder, PROCESSOR_TEMPLATE_SOURCES) == "{{ 'processor config' }}"
    assert read_chat_template(folder, TOKENIZER_TEMPLATE_SOURCES) is None
    assert read_chat_template(folder, ()) is None
