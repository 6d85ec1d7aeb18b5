"""A differential audit against transformers 5.17 on inputs the other tokenization tests leave out:
call options in combination (offsets, overflow with stride, pairs of pre-tokenized words),
apply_chat_template's option matrix on batches, tool-call shapes, continue_final_message edge cases,
documents, assistant masks with left padding or truncation, tokens added with their flags and saved,
tool schemas of media and bare container hints, and a hypothesis fuzz of odd unicode.
"""

from __future__ import annotations

import warnings

import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herd import tokenization
from herd.tokenization import AutoTokenizer
from herd.tokenization.chat_templates import function_tool_schema
from tests.tokenization.common import (  # noqa: F401  (llama31, pair, with_pad_token: fixtures)
    CONTENT_LIST_TEMPLATE,
    FOLDERS,
    LLAMA31_CHAT_TEMPLATE,
    SYSTEM_CHAT,
    WEATHER_TOOL,
    llama31,
    load_both,
    outcome,
    pair,
    plain,
    shared,
    transformers,
    with_pad_token,
)

TEXTS = ["Hello world, this is a test.", "naïve café 日本語 😀", "  a  b  ", ""]
SECONDS = ["Second one here", "x", "日本", " y"]

CALL_CASES = [
    dict(return_offsets_mapping=True),
    dict(return_offsets_mapping=True, add_special_tokens=False),
    dict(return_overflowing_tokens=True, truncation=True, max_length=9, stride=2),
    dict(return_overflowing_tokens=True, truncation=True, max_length=6, stride=1, return_offsets_mapping=True),
    dict(return_overflowing_tokens=True, truncation="only_first", max_length=8, stride=1),
    dict(return_special_tokens_mask=True, add_special_tokens=False),
    dict(truncation="only_second", max_length=6),
    dict(truncation="do_not_truncate", max_length=3),
    dict(return_token_type_ids=True, return_offsets_mapping=True, return_length=True),
]


@pytest.mark.parametrize("case", CALL_CASES, ids=str)
def test_call_options_on_texts_and_pairs(pair, case):
    herd_tok, ref_tok = pair
    assert outcome(herd_tok, TEXTS, **case) == outcome(ref_tok, TEXTS, **case)
    assert outcome(herd_tok, TEXTS, SECONDS, **case) == outcome(ref_tok, TEXTS, SECONDS, **case)
    assert outcome(herd_tok, TEXTS[1], SECONDS[0], **case) == outcome(ref_tok, TEXTS[1], SECONDS[0], **case)


def test_words_pairs_and_encoding_views(pair):
    herd_tok, ref_tok = pair
    words, second = [["Hello", "world"], ["naïve", " café", "日本"]], [["a", "b"], ["c"]]
    for kwargs in (dict(), dict(return_offsets_mapping=True), dict(truncation=True, max_length=3)):
        assert plain(herd_tok(words, second, is_split_into_words=True, **kwargs)) == plain(
            ref_tok(words, second, is_split_into_words=True, **kwargs)
        )
        assert plain(herd_tok(words[1], is_split_into_words=True, **kwargs)) == plain(
            ref_tok(words[1], is_split_into_words=True, **kwargs)
        )
    ours, theirs = herd_tok(TEXTS, SECONDS), ref_tok(TEXTS, SECONDS)
    for row in range(len(TEXTS)):
        assert ours.word_ids(row) == theirs.word_ids(row)
        assert ours.sequence_ids(row) == theirs.sequence_ids(row)
        assert ours.tokens(row) == theirs.tokens(row)
    ids = ref_tok("a <|eot_id|> b <s> </s> c naïve")["input_ids"]
    for skip in (False, True):
        assert herd_tok.convert_ids_to_tokens(ids, skip_special_tokens=skip) == ref_tok.convert_ids_to_tokens(
            ids, skip_special_tokens=skip
        )
    assert herd_tok.get_special_tokens_mask(ids, already_has_special_tokens=True) == ref_tok.get_special_tokens_mask(
        ids, already_has_special_tokens=True
    )
    assert herd_tok.tokenize("Hello world", pair="second", add_special_tokens=True) == ref_tok.tokenize(
        "Hello world", pair="second", add_special_tokens=True
    )


def test_decode_accepts_the_slow_tokenizer_spacing_option(pair):
    # transformers' fast decode ignores spaces_between_special_tokens (a slow tokenizers' option); so does herd.
    herd_tok, ref_tok = pair
    ids = ref_tok("a <|eot_id|> b <s></s> c")["input_ids"]
    for spaces in (False, True):
        assert herd_tok.decode(ids, spaces_between_special_tokens=spaces) == ref_tok.decode(
            ids, spaces_between_special_tokens=spaces
        )
        assert herd_tok.batch_decode([ids], spaces_between_special_tokens=spaces) == ref_tok.batch_decode(
            [ids], spaces_between_special_tokens=spaces
        )
    with pytest.raises(TypeError, match="unexpected arguments"):
        herd_tok.decode(ids, not_an_option=True)


def test_overflow_stride_too_large_is_a_value_error(llama31):
    # tokenizers panics (pyo3's PanicException, not an Exception) and transformers lets it through; herd
    # raises a ValueError that names the fix.
    herd_tok, ref_tok = llama31
    kwargs = dict(return_overflowing_tokens=True, truncation=True, max_length=5, stride=2)
    with pytest.raises(BaseException) as caught:
        ref_tok(TEXTS[:1], SECONDS[:1], **kwargs)
    assert type(caught.value).__name__ == "PanicException"
    with pytest.raises(ValueError, match="stride=2 .* use a smaller stride or a larger max_length"):
        herd_tok(TEXTS[:1], SECONDS[:1], **kwargs)
    fits = dict(kwargs, max_length=8)
    assert herd_tok(TEXTS[:1], SECONDS[:1], **fits)["input_ids"] == ref_tok(TEXTS[:1], SECONDS[:1], **fits)["input_ids"]


# ----------------------------------------------------------------------------------------------
# apply_chat_template
# ----------------------------------------------------------------------------------------------

BATCH = [SYSTEM_CHAT, SYSTEM_CHAT[1:2], SYSTEM_CHAT[:3]]
BATCH_CASES = [
    dict(return_dict=False, return_tensors="pt", padding=True),
    dict(padding="max_length", max_length=100, return_tensors="np"),
    dict(padding=True, truncation=True, max_length=20, return_tensors="pt"),
    dict(padding=True, tokenizer_kwargs={"pad_to_multiple_of": 16}),
    dict(padding="longest", tokenizer_kwargs={"padding_side": "left", "return_offsets_mapping": True}),
    dict(return_tensors="pt"),  # ragged: an error in both
    dict(return_dict=True, return_tensors="np", padding=True, add_generation_prompt=True),
    dict(continue_final_message=True, padding=True),
    dict(tokenize=False, return_dict=True),
]


@pytest.mark.parametrize("case", BATCH_CASES, ids=str)
def test_chat_option_matrix_on_batches(with_pad_token, case):
    herd_tok, ref_tok = with_pad_token
    if herd_tok.chat_template is None:
        case = dict(case, chat_template=LLAMA31_CHAT_TEMPLATE)
    for conversation in (BATCH, tuple(BATCH), SYSTEM_CHAT[:3]):
        assert outcome(herd_tok.apply_chat_template, conversation, **case) == outcome(
            ref_tok.apply_chat_template, conversation, **case
        )


TOOL_SHAPES = {
    "arguments as a JSON string": [
        {"role": "user", "content": "temp?"},
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_current_temperature", "arguments": '{"location": "Paris"}'}}
        ]},
        {"role": "tool", "content": "22"},
    ],
    "calls without a function wrapper": [
        {"role": "user", "content": "temp?"},
        {"role": "assistant", "tool_calls": [{"name": "get_current_temperature", "arguments": {"location": "Paris"}}]},
        {"role": "tool", "name": "get_current_temperature", "content": "22"},
    ],
    "system and user as lists of parts": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ],
    "another role": [{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}],
}


@pytest.mark.parametrize("shape", TOOL_SHAPES)
@pytest.mark.parametrize("template", [None, LLAMA31_CHAT_TEMPLATE], ids=["folder", "llama3.1-instruct"])
def test_message_shapes_render_as_transformers(llama31, shape, template):
    herd_tok, ref_tok = llama31
    for kwargs in (
        dict(),
        dict(tools=[WEATHER_TOOL]),
        dict(add_generation_prompt=True, tools=[WEATHER_TOOL], tools_in_user_message=False, date_string="1 Jan 2000"),
        dict(builtin_tools=["brave_search", "wolfram_alpha"], custom_tools=[WEATHER_TOOL]),
    ):
        kwargs = dict(kwargs, chat_template=template, tokenize=False)
        assert outcome(herd_tok.apply_chat_template, TOOL_SHAPES[shape], **kwargs) == outcome(
            ref_tok.apply_chat_template, TOOL_SHAPES[shape], **kwargs
        )


DOCUMENTS_TEMPLATE = (
    "{{ bos_token }}{% if documents %}{% for d in documents %}[{{ d.title }}|{{ d.text }}]{% endfor %}{% endif %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
)


@pytest.mark.parametrize("documents", [[{"title": "T", "text": "body"}, {"title": "x", "text": "y", "n": 1}], []])
def test_documents_reach_the_template(llama31, documents):
    herd_tok, ref_tok = llama31
    kwargs = dict(documents=documents, chat_template=DOCUMENTS_TEMPLATE, add_generation_prompt=True)
    text = herd_tok.apply_chat_template(SYSTEM_CHAT, tokenize=False, **kwargs)
    assert text == ref_tok.apply_chat_template(SYSTEM_CHAT, tokenize=False, **kwargs)
    assert ("[T|body][x|y]" in text) == bool(documents)
    assert herd_tok.apply_chat_template(SYSTEM_CHAT, **kwargs) == ref_tok.apply_chat_template(SYSTEM_CHAT, **kwargs)


CONTINUED = {
    "empty": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
    "spaces": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "   "}],
    "newlines": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a\n\n"}],
    "same as the user's": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}],
    "user last": SYSTEM_CHAT,
    "system alone": SYSTEM_CHAT[:1],
    "image last": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Part "}, {"type": "image"}]},
    ],
}


@pytest.mark.parametrize("conversation", CONTINUED)
def test_continue_final_message_edge_cases(llama31, conversation):
    herd_tok, ref_tok = llama31
    for template in (None, LLAMA31_CHAT_TEMPLATE, CONTENT_LIST_TEMPLATE, DOCUMENTS_TEMPLATE):
        for tokenize in (False, True):
            kwargs = dict(continue_final_message=True, chat_template=template, tokenize=tokenize)
            assert outcome(herd_tok.apply_chat_template, CONTINUED[conversation], **kwargs) == outcome(
                ref_tok.apply_chat_template, CONTINUED[conversation], **kwargs
            ), (template, tokenize)


GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}<A>{% generation %}{{ m.content }}"
    "<|eot_id|>{% endgeneration %}{% else %}<U>{{ m.content }}<|eot_id|>{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding=True, tokenizer_kwargs={"padding_side": "left"}),
        dict(truncation=True, max_length=26),  # cuts the first answer
        dict(return_tensors="np", padding="max_length", max_length=64),
    ],
    ids=str,
)
def test_assistant_masks_padded_left_truncated_and_fixed_length(with_pad_token, kwargs):
    herd_tok, ref_tok = with_pad_token
    kwargs = dict(kwargs, chat_template=GENERATION_TEMPLATE, return_assistant_tokens_mask=True)
    for conversation in (BATCH, SYSTEM_CHAT):
        result = outcome(herd_tok.apply_chat_template, conversation, **kwargs)
        assert result == outcome(ref_tok.apply_chat_template, conversation, **kwargs)
        assert result[0] == "ok"
        if herd_tok.folder_name != "spm-llama-style":  # its longer ids leave no answer within 26 tokens
            assert "1" in str(result[1]["assistant_masks"][-1])  # some assistant tokens


# ----------------------------------------------------------------------------------------------
# Tools given as Python functions: the hints transformers maps in its own way
# ----------------------------------------------------------------------------------------------


def media_and_containers(
    a: list, b: tuple, c: dict, d: torch.Tensor, e: PIL.Image.Image, f: PIL.Image.Image | None = None,
    g: torch.Tensor | str = "x", h: set | None = None,
):  # fmt: skip
    """Bare containers are "object" in transformers; tensors "audio", PIL images "image".

    Args:
        a: a list
        b: a tuple
        c: a dict
        d: a sound
        e: a picture
        f: maybe a picture
        g: a sound or a name
        h: a set
    """


def test_tool_schemas_of_media_and_bare_container_hints():
    from transformers.utils import get_json_schema

    schema = function_tool_schema(media_and_containers)
    assert schema == get_json_schema(media_and_containers)
    properties = schema["function"]["parameters"]["properties"]
    assert [properties[name]["type"] for name in "abcde"] == ["object", "object", "object", "audio", "image"]


# ----------------------------------------------------------------------------------------------
# Added tokens with their flags, then saved and reloaded
# ----------------------------------------------------------------------------------------------

ADDED_TEXTS = [
    "a <new> b", "x<new>y", " <new> ", "word hello_tok wordhello_tok", "  <sp>  z", "<|pad|>a<|pad|>",
    "<LS>  left", "right<RS>  r", "NOrm <norm> NORM", "<x1><x2><x1>",
]  # fmt: skip


def _added_view(tok):
    return {
        "ids": [tok(ADDED_TEXTS, **kwargs)["input_ids"] for kwargs in ({}, dict(split_special_tokens=True))],
        "offsets": tok(ADDED_TEXTS, return_offsets_mapping=True)["offset_mapping"],
        "decoded": [tok.batch_decode(tok(ADDED_TEXTS)["input_ids"], skip_special_tokens=s) for s in (False, True)],
        "special": (tok.all_special_tokens, tok.all_special_ids, tok.special_tokens_map, tok.pad_token_id, len(tok)),
        "added": {
            index: (str(t), t.special, t.lstrip, t.rstrip, t.single_word, t.normalized)
            for index, t in tok.added_tokens_decoder.items()
        },
    }


@pytest.mark.parametrize("folder", ["llama3.1", "spm-llama-style"])
def test_added_tokens_with_flags_save_and_reload(folder, tmp_path):
    from tokenizers import AddedToken

    herd_tok, ref_tok = load_both(folder)
    for tok, token in ((herd_tok, tokenization.AddedToken), (ref_tok, AddedToken)):
        tok.add_tokens(["<new>", token("hello_tok", single_word=True), token("<norm>", normalized=True)])
        tok.add_tokens([token("<LS>", lstrip=True, special=True), token("<RS>", rstrip=True, special=True)], True)
        tok.add_special_tokens({"pad_token": "<|pad|>", "extra_special_tokens": ["<x1>", "<x2>"]})
        tok.add_tokens(token("<sp>", special=True, normalized=False), special_tokens=True)
    expected = _added_view(ref_tok)
    assert _added_view(herd_tok) == expected
    herd_tok.save_pretrained(tmp_path / "herd")
    assert _added_view(AutoTokenizer.from_pretrained(tmp_path / "herd")) == expected
    assert _added_view(transformers.AutoTokenizer.from_pretrained(tmp_path / "herd")) == expected
    ref_tok.save_pretrained(tmp_path / "transformers")
    assert _added_view(AutoTokenizer.from_pretrained(tmp_path / "transformers")) == _added_view(
        transformers.AutoTokenizer.from_pretrained(tmp_path / "transformers")
    )


# ----------------------------------------------------------------------------------------------
# Fuzz: odd unicode, whitespace runs and near-special tokens
# ----------------------------------------------------------------------------------------------

_PIECES = [
    "<|begin_of_text|>", "<|eot_id|>", "<s>", "</s>", "<unk>", "<|reserved_special_token_3|>", "<|eot_id", "<0x0A>",
    "▁", "<|", "|>", " ", "  ", "\n", "\t", "\u0301", "😀", "👨‍👩‍👧", "日本", "\u200b", "\r\n", "\u3000", "ﬁ", "Ⅻ",
    "\ufeff", "e\u0301\u0327", "\U0001f1eb\U0001f1f7", "\x00",
]  # fmt: skip
ODD_TEXT = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(_PIECES)), max_size=10).map("".join)


@settings(
    max_examples=300, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
@given(text=ODD_TEXT, folder=st.sampled_from(FOLDERS), add_special_tokens=st.booleans(), skip=st.booleans())
def test_fuzz_encode_decode_as_transformers(text, folder, add_special_tokens, skip):
    herd_tok, ref_tok = shared(folder)
    kwargs = dict(add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    expected = ref_tok(text, **kwargs)
    assert plain(herd_tok(text, **kwargs)) == plain(expected)
    ids = expected["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert herd_tok.decode(ids, skip_special_tokens=skip) == ref_tok.decode(ids, skip_special_tokens=skip)
    assert herd_tok.convert_ids_to_tokens(ids) == ref_tok.convert_ids_to_tokens(ids)
    assert herd_tok.tokenize(text) == ref_tok.tokenize(text)


_MESSAGE = st.builds(
    lambda role, text: {"role": role, "content": text}, st.sampled_from(["system", "user", "assistant", "tool"]), ODD_TEXT
)


@settings(max_examples=150, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    conversation=st.lists(_MESSAGE, min_size=1, max_size=4),
    template=st.sampled_from([None, LLAMA31_CHAT_TEMPLATE, CONTENT_LIST_TEMPLATE]),
    mode=st.sampled_from(["add_generation_prompt", "continue_final_message", None]),
    tokenize=st.booleans(),
)
def test_fuzz_chats_as_transformers(conversation, template, mode, tokenize):
    herd_tok, ref_tok = shared("llama3.1")
    kwargs = dict(chat_template=template, tokenize=tokenize, **({mode: True} if mode else {}))
    assert outcome(herd_tok.apply_chat_template, conversation, **kwargs) == outcome(
        ref_tok.apply_chat_template, conversation, **kwargs
    )


def _outcome_of_call(tok, *args, **kwargs):
    try:
        return outcome(tok, *args, **kwargs)
    except BaseException as error:  # tokenizers' panic (a too large stride): herd raises a ValueError instead
        if type(error).__name__ != "PanicException":
            raise
        return ("error", "ValueError")


@settings(max_examples=60, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    texts=st.lists(ODD_TEXT, min_size=1, max_size=3),
    with_pairs=st.booleans(),
    folder=st.sampled_from(FOLDERS),
    truncation=st.sampled_from([False, True, "only_first", "only_second", "longest_first"]),
    max_length=st.one_of(st.none(), st.integers(0, 12)),
    padding=st.sampled_from([False, True, "max_length"]),
    padding_side=st.sampled_from(["left", "right"]),
    pad_to_multiple_of=st.one_of(st.none(), st.integers(1, 5)),
    stride=st.one_of(st.none(), st.integers(0, 3)),
    flags=st.fixed_dictionaries({"return_offsets_mapping": st.booleans(), "add_special_tokens": st.booleans()}),
    return_tensors=st.sampled_from([None, "pt", "np"]),
)
def test_fuzz_call_options_as_transformers(
    texts, with_pairs, folder, truncation, max_length, padding, padding_side, pad_to_multiple_of, stride, flags,
    return_tensors,
):  # fmt: skip
    herd_tok, ref_tok = shared(folder)
    kwargs = dict(truncation=truncation, max_length=max_length, padding=padding, padding_side=padding_side,
                  pad_to_multiple_of=pad_to_multiple_of, return_tensors=return_tensors, **flags)  # fmt: skip
    if stride is not None:
        kwargs.update(return_overflowing_tokens=True, stride=stride)
    args = (texts, texts[::-1]) if with_pairs else (texts,)
    try:
        herd_tok.pad_token, ref_tok.pad_token = herd_tok.eos_token, ref_tok.eos_token
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert _outcome_of_call(herd_tok, *args, **kwargs) == _outcome_of_call(ref_tok, *args, **kwargs)
    finally:
        herd_tok.pad_token = ref_tok.pad_token = None
