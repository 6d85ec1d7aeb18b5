"""Tokenizers against transformers 5.17, past the basics of test_differential.py:

- BatchEncoding's alignment methods (token_to_chars, token_to_word, token_to_sequence, char_to_word,
  word_to_tokens, word_to_chars), which herd lacked, on texts, pairs, batches and pre-tokenized words;
- decode of float ids (an error in transformers, silently rounded by herd before);
- tokenizer calls with keyword arguments that are no encoding option: transformers ignores them,
  herd raises a TypeError (deliberately), now with a message that names them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herd.tokenization.encodings import CharSpan, TokenSpan
from tests.tokenization.common import (  # noqa: F401  (pair, llama31, llama31_with_pad_token: fixtures)
    FOLDERS,
    SYSTEM_CHAT,
    llama31,
    llama31_with_pad_token,
    outcome,
    pair,
    plain,
    shared,
)

TEXTS = ["Hello world, this is a test.", "naïve café 日本語 😀", "  a  b  ", "x"]
SECONDS = ["Second one here and more words", "日本", " y", ""]
WORDS = [["Hello", "world"], ["naïve", " café", "日本", ""], ["a"]]


def _alignment(encoding, rows: int, texts: list[str], seconds: list[str] | None, words: int) -> list:
    """Every alignment query of an encoding (batch form), as plain values."""
    out = []
    for row in range(rows):
        out.append(("tokens", encoding.tokens(row), encoding.word_ids(row), encoding.sequence_ids(row)))
        for token in range(len(encoding.tokens(row))):
            out.append(
                (
                    token,
                    outcome(encoding.token_to_chars, row, token),
                    outcome(encoding.token_to_word, row, token),
                    outcome(encoding.token_to_sequence, row, token),
                )
            )
        for sequence, text in enumerate([texts[row]] + ([seconds[row]] if seconds else [])):
            for char in range(len(text) + 1):
                out.append(
                    (
                        sequence,
                        char,
                        outcome(encoding.char_to_token, row, char, sequence),
                        outcome(encoding.char_to_word, row, char, sequence),
                    )
                )
            for word in range(words):
                out.append(
                    (
                        sequence,
                        word,
                        outcome(encoding.word_to_tokens, row, word, sequence),
                        outcome(encoding.word_to_chars, row, word, sequence),
                    )
                )
    return out


def test_alignment_methods_on_batches_and_pairs(pair):
    herd_tok, ref_tok = pair
    for args in ((TEXTS,), (TEXTS, SECONDS)):
        seconds = args[1] if len(args) > 1 else None
        for kwargs in ({}, {"truncation": "longest_first", "max_length": 9}):
            ours, theirs = herd_tok(*args, **kwargs), ref_tok(*args, **kwargs)
            assert _alignment(ours, len(TEXTS), TEXTS, seconds, 9) == _alignment(
                theirs, len(TEXTS), TEXTS, seconds, 9
            )


def test_alignment_methods_single_call_form(pair):
    """The one-index forms (batch index 0), and the span types: CharSpan / TokenSpan named tuples."""
    herd_tok, ref_tok = pair
    ours, theirs = herd_tok(TEXTS[0], SECONDS[0]), ref_tok(TEXTS[0], SECONDS[0])
    for token in range(len(theirs["input_ids"])):
        for name in ("token_to_chars", "token_to_word", "token_to_sequence"):
            assert outcome(getattr(ours, name), token) == outcome(getattr(theirs, name), token), (name, token)
    for char in range(len(TEXTS[0])):
        for name in ("char_to_token", "char_to_word"):
            assert outcome(getattr(ours, name), char) == outcome(getattr(theirs, name), char), (name, char)
    for word in range(8):
        for name in ("word_to_tokens", "word_to_chars"):
            assert outcome(getattr(ours, name), word) == outcome(getattr(theirs, name), word), (name, word)
            assert outcome(getattr(ours, name), word, sequence_index=1) == outcome(
                getattr(theirs, name), word, sequence_index=1
            )
    span = ours.token_to_chars(1)
    assert isinstance(span, CharSpan) and span == (span.start, span.end)
    assert isinstance(ours.word_to_tokens(0), TokenSpan)
    assert CharSpan._fields == type(theirs.token_to_chars(1))._fields == ("start", "end")


def test_alignment_methods_on_pretokenized_words(pair):
    herd_tok, ref_tok = pair
    for kwargs in ({}, {"add_special_tokens": False}):
        ours = herd_tok(WORDS, is_split_into_words=True, **kwargs)
        theirs = ref_tok(WORDS, is_split_into_words=True, **kwargs)
        for row, words in enumerate(WORDS):
            for word in range(len(words) + 1):
                assert outcome(ours.word_to_tokens, row, word) == outcome(theirs.word_to_tokens, row, word)
                assert outcome(ours.word_to_chars, row, word) == outcome(theirs.word_to_chars, row, word)
            for token in range(len(theirs["input_ids"][row])):
                assert outcome(ours.token_to_word, row, token) == outcome(theirs.token_to_word, row, token)
                assert outcome(ours.token_to_chars, row, token) == outcome(theirs.token_to_chars, row, token)


def test_alignment_of_overflow_rows(llama31):
    herd_tok, ref_tok = llama31
    kwargs = dict(truncation=True, max_length=6, stride=2, return_overflowing_tokens=True)
    ours, theirs = herd_tok(TEXTS, **kwargs), ref_tok(TEXTS, **kwargs)
    rows = len(theirs["input_ids"])
    assert len(ours["input_ids"]) == rows
    for row in range(rows):
        for token in range(len(theirs["input_ids"][row])):
            assert outcome(ours.token_to_chars, row, token) == outcome(theirs.token_to_chars, row, token)
            assert outcome(ours.token_to_word, row, token) == outcome(theirs.token_to_word, row, token)


def test_negative_indices(llama31):
    """Negative batch indices work in both. For a negative token index, transformers 5.17 fails with an
    AttributeError in token_to_word/token_to_sequence (it reads BatchEncoding attributes that do not
    exist) and hands it to tokenizers in token_to_chars (an OverflowError); herd counts it from the end
    in the first two and does as transformers in the third."""
    herd_tok, ref_tok = llama31
    ours, theirs = herd_tok(TEXTS), ref_tok(TEXTS)
    assert ours.char_to_token(-1, 2) == theirs.char_to_token(-1, 2) == theirs.char_to_token(len(TEXTS) - 1, 2)
    assert ours.token_to_chars(-1, 1) == theirs.token_to_chars(-1, 1)
    last = len(theirs["input_ids"][0]) - 1
    assert ours.token_to_word(0, -1) == theirs.token_to_word(0, last)
    assert ours.token_to_sequence(0, -1) == theirs.token_to_sequence(0, last)
    with pytest.raises(AttributeError):
        theirs.token_to_word(0, -1)
    assert outcome(ours.token_to_chars, 0, -1) == outcome(theirs.token_to_chars, 0, -1) == ("error", "OverflowError")


def test_alignment_needs_encodings():
    from herd.tokenization import BatchEncoding

    for name in ("token_to_chars", "token_to_word", "token_to_sequence", "char_to_word", "word_to_tokens"):
        with pytest.raises(ValueError, match="no token alignment"):
            getattr(BatchEncoding({"input_ids": [[1, 2]]}), name)(0)
        with pytest.raises(ValueError, match="no token alignment"):
            getattr(BatchEncoding({"input_ids": [[1, 2]]}, encoding=[]), name)(0)


_PIECES = [" ", "  ", "\n", "日本", "😀", "e\u0301", "<|eot_id|>", "<s>", "'s"]
_TEXT = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(_PIECES)), max_size=6).map("".join)


@settings(max_examples=25, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(first=_TEXT, second=_TEXT, folder=st.sampled_from(FOLDERS))
def test_fuzz_alignment_as_transformers(first, second, folder):
    herd_tok, ref_tok = shared(folder)
    ours, theirs = herd_tok([first], [second]), ref_tok([first], [second])
    assert _alignment(ours, 1, [first], [second], 6) == _alignment(theirs, 1, [first], [second], 6)


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids",
    [[1.0, 2.0], torch.tensor([100.0, 200.0]), np.array([3.0]), [5, 2.5], [[1, 2], [3.0]]],
    ids=["floats", "float tensor", "float array", "one float", "float in a row"],
)
def test_decode_of_float_ids_is_a_type_error(pair, ids):
    herd_tok, ref_tok = pair
    for tok in (herd_tok, ref_tok):
        with pytest.raises(TypeError):
            tok.decode(ids)
    with pytest.raises(TypeError):
        herd_tok.batch_decode([ids] if not isinstance(ids, list) or not isinstance(ids[0], list) else ids)


def test_decode_of_integer_kinds(pair):
    """Ints of any kind (numpy scalars and arrays, 0-d tensors, tuples, int32) still decode as transformers does."""
    herd_tok, ref_tok = pair
    ids = ref_tok("Hello world <|eot_id|> naïve")["input_ids"]
    for value in (
        ids, tuple(ids), np.array(ids, dtype=np.int32), torch.tensor(ids), [np.int64(i) for i in ids],
        [torch.tensor(i) for i in ids], np.int64(ids[1]), torch.tensor(ids[1]), ids[1],
    ):  # fmt: skip
        for skip in (False, True):
            assert herd_tok.decode(value, skip_special_tokens=skip) == ref_tok.decode(value, skip_special_tokens=skip)


# ----------------------------------------------------------------------------------------------
# Keyword arguments that are no encoding option: a deliberate difference
# ----------------------------------------------------------------------------------------------

UNKNOWN_CASES = [
    dict(truncation_side="left", truncation=True, max_length=4),  # an attribute, not a call option
    dict(not_an_option=1),
    dict(return_dict=True, padding=True),
    dict(tokenizer_kwargs={"bogus": 1, "padding_side": "left"}, padding=True),
    dict(text_target=["x", "y z w", "v", "u"], tokenizer_kwargs={"max_target_length": 1}, max_length=3),
]


@pytest.mark.parametrize("kwargs", UNKNOWN_CASES, ids=lambda kwargs: ",".join(sorted(kwargs)))
def test_unknown_call_arguments_are_type_errors(llama31_with_pad_token, kwargs):
    """transformers 5.17 drops them without a word (a call with truncation_side="left" truncates on the
    right); herd refuses them, as tests/tokenization/test_tokenizer.py::test_bad_inputs_are_errors wants."""
    herd_tok, ref_tok = llama31_with_pad_token
    options = ("truncation", "max_length", "padding", "text_target")
    known = {key: value for key, value in kwargs.items() if key in options}
    if "tokenizer_kwargs" in kwargs:
        known["tokenizer_kwargs"] = {k: v for k, v in kwargs["tokenizer_kwargs"].items() if k == "padding_side"}
    assert outcome(ref_tok, TEXTS, **kwargs) == outcome(ref_tok, TEXTS, **known)  # ignored by transformers
    assert outcome(herd_tok, TEXTS, **known) == outcome(ref_tok, TEXTS, **known)
    with pytest.raises(TypeError, match="unexpected arguments"):
        herd_tok(TEXTS, **kwargs)


def test_truncation_side_error_names_the_attribute(llama31):
    herd_tok, _ = llama31
    with pytest.raises(TypeError, match="set tokenizer.truncation_side"):
        herd_tok(TEXTS, truncation_side="left", truncation=True, max_length=4)
    with pytest.raises(TypeError, match="unexpected arguments"):
        herd_tok.apply_chat_template(SYSTEM_CHAT, tokenizer_kwargs={"truncation_side": "left"})
    assert herd_tok.truncation_side == "right"


def test_the_call_options_list_matches_the_encoder():
    import inspect

    from herd.tokenization.tokenizer import _ENCODING_OPTIONS, PreTrainedTokenizerFast

    parameters = set(inspect.signature(PreTrainedTokenizerFast._encode_texts).parameters)
    assert parameters - {"self", "text", "text_pair"} == _ENCODING_OPTIONS
