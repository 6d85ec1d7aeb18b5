"""herd's PreTrainedTokenizerFast against transformers 5.17 on real tokenizer folders: attributes, encoding,
decoding, padding, BOS/EOS, added tokens and saving.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import herd.tokenization as tokenization
from herd.tokenization import AutoTokenizer, LlamaTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast
from tests.tokenization.common import (  # noqa: F401  (llama31, llama31_with_pad_token, pair, with_pad_token: fixtures)
    LLAMA31_CHAT_TEMPLATE,
    SYSTEM_CHAT,
    TEST_STRINGS,
    TOKENIZERS,
    TOOL_CHAT,
    first_difference,
    llama31,
    llama31_with_pad_token,
    load_both,
    outcome,
    pair,
    plain,
    shared,
    transformers,
    with_pad_token,
)


# ----------------------------------------------------------------------------------------------
# Loading and attributes
# ----------------------------------------------------------------------------------------------


def test_aliases_and_auto():
    assert LlamaTokenizer is PreTrainedTokenizerFast and LlamaTokenizerFast is PreTrainedTokenizerFast
    with pytest.raises(OSError, match="from_pretrained"):
        AutoTokenizer()


def test_attributes_match(pair):
    herd_tok, ref_tok = pair
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        assert getattr(herd_tok, name) == getattr(ref_tok, name), name
        assert getattr(herd_tok, name + "_id") == getattr(ref_tok, name + "_id"), name
    assert herd_tok.all_special_tokens == ref_tok.all_special_tokens
    assert herd_tok.all_special_ids == ref_tok.all_special_ids
    assert herd_tok.special_tokens_map == ref_tok.special_tokens_map
    assert herd_tok.vocab_size == ref_tok.vocab_size
    assert len(herd_tok) == len(ref_tok)
    assert herd_tok.get_vocab() == ref_tok.get_vocab()
    assert herd_tok.added_tokens_encoder == ref_tok.added_tokens_encoder
    assert herd_tok.padding_side == ref_tok.padding_side
    assert herd_tok.truncation_side == ref_tok.truncation_side
    assert herd_tok.model_max_length == ref_tok.model_max_length
    assert herd_tok.chat_template == ref_tok.chat_template
    assert herd_tok.add_bos_token == ref_tok.add_bos_token
    assert herd_tok.add_eos_token == ref_tok.add_eos_token
    assert herd_tok.clean_up_tokenization_spaces == ref_tok.clean_up_tokenization_spaces
    assert herd_tok.model_input_names == ref_tok.model_input_names
    assert herd_tok.num_special_tokens_to_add() == ref_tok.num_special_tokens_to_add()
    assert herd_tok.num_special_tokens_to_add(pair=True) == ref_tok.num_special_tokens_to_add(pair=True)
    assert herd_tok.name_or_path == str(TOKENIZERS / herd_tok.folder_name)
    assert herd_tok.is_fast and "vocab_size" in repr(herd_tok)


def test_padding_side_per_folder(pair):
    # transformers 5.17: the LlamaTokenizer class pads on the left, PreTrainedTokenizerFast on the right.
    herd_tok, _ = pair
    expected = "left" if herd_tok.folder_name == "spm-llama-style" else "right"
    assert herd_tok.padding_side == expected


def test_settings_as_from_pretrained_arguments():
    herd_tok, ref_tok = load_both("spm-llama-style", padding_side="right", pad_token="<unk>", model_max_length=7)
    assert (herd_tok.padding_side, herd_tok.pad_token, herd_tok.model_max_length) == ("right", "<unk>", 7)
    texts = ["a b c d e f g h i j", "x"]
    for kwargs in ({"padding": "max_length", "truncation": True}, {"truncation": True}, {"padding": True}):
        assert plain(herd_tok(texts, **kwargs)) == plain(ref_tok(texts, **kwargs)), kwargs


def test_special_token_setters():
    herd_tok, ref_tok = load_both("spm-llama-style")
    for tok in (herd_tok, ref_tok):
        tok.pad_token = tok.eos_token
    assert herd_tok.pad_token_id == ref_tok.pad_token_id == 2
    herd_tok.pad_token_id = 0
    ref_tok.pad_token_id = 0
    assert herd_tok.pad_token == ref_tok.pad_token == "<unk>"
    assert herd_tok.all_special_tokens == ref_tok.all_special_tokens
    with pytest.raises(ValueError, match="pad_token must be a string"):
        herd_tok.pad_token = 5
    with pytest.raises(ValueError, match="padding_side"):
        herd_tok.padding_side = "middle"


def test_vocabulary_conversions(pair):
    herd_tok, ref_tok = pair
    ids = list(range(0, 200)) + [herd_tok.vocab_size - 1, len(herd_tok) - 1]
    assert herd_tok.convert_ids_to_tokens(ids) == ref_tok.convert_ids_to_tokens(ids)
    assert herd_tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == ref_tok.convert_ids_to_tokens(
        ids, skip_special_tokens=True
    )
    assert herd_tok.convert_ids_to_tokens(5) == ref_tok.convert_ids_to_tokens(5)
    assert herd_tok.convert_ids_to_tokens(torch.tensor([5, 6])) == ref_tok.convert_ids_to_tokens([5, 6])
    tokens = herd_tok.convert_ids_to_tokens(ids) + ["definitely-not-a-token", "<s>", "<|eot_id|>"]
    assert herd_tok.convert_tokens_to_ids(tokens) == ref_tok.convert_tokens_to_ids(tokens)
    assert herd_tok.convert_tokens_to_ids(tokens[3]) == ref_tok.convert_tokens_to_ids(tokens[3])
    assert herd_tok.convert_tokens_to_string(tokens[:50]) == ref_tok.convert_tokens_to_string(tokens[:50])
    for text in TEST_STRINGS[:60]:
        assert herd_tok.tokenize(text) == ref_tok.tokenize(text), text
    assert herd_tok.tokenize("Hi there", add_special_tokens=True) == ref_tok.tokenize(
        "Hi there", add_special_tokens=True
    )
    ids = herd_tok("Hello <s> there <|eot_id|>")["input_ids"]
    assert herd_tok.get_special_tokens_mask(ids, already_has_special_tokens=True) == ref_tok.get_special_tokens_mask(
        ids, already_has_special_tokens=True
    )
    with pytest.raises(NotImplementedError):
        herd_tok.get_special_tokens_mask(ids)


# ----------------------------------------------------------------------------------------------
# Encoding and decoding
# ----------------------------------------------------------------------------------------------


def test_there_are_hundreds_of_test_strings():
    assert len(TEST_STRINGS) >= 300 and len(set(TEST_STRINGS)) >= 280


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_match_on_varied_strings(pair, add_special_tokens):
    herd_tok, ref_tok = pair
    ours = herd_tok(TEST_STRINGS, add_special_tokens=add_special_tokens)
    theirs = ref_tok(TEST_STRINGS, add_special_tokens=add_special_tokens)
    assert ours["input_ids"] == theirs["input_ids"], first_difference(
        ours["input_ids"], theirs["input_ids"], TEST_STRINGS
    )
    assert plain(ours) == plain(theirs)
    # One string at a time (no batch dimension), and encode().
    for text in TEST_STRINGS[::4]:
        assert plain(herd_tok(text, add_special_tokens=add_special_tokens)) == plain(
            ref_tok(text, add_special_tokens=add_special_tokens)
        ), text
        assert herd_tok.encode(text, add_special_tokens=add_special_tokens) == ref_tok.encode(
            text, add_special_tokens=add_special_tokens
        ), text


def test_decode_matches(pair):
    herd_tok, ref_tok = pair
    rows = ref_tok(TEST_STRINGS)["input_ids"]
    rng = random.Random(1)
    special = ref_tok.all_special_ids + [len(ref_tok) - 1]
    # Ids with special tokens (and, for byte-level vocabularies, broken UTF-8) in odd places.
    rows += [[rng.choice(special + row) for _ in range(len(row))] for row in rows[:100] if row]
    rows += [[rng.randrange(len(ref_tok)) for _ in range(rng.randint(1, 12))] for _ in range(60)]
    for skip in (False, True):
        ours = herd_tok.batch_decode(rows, skip_special_tokens=skip)
        theirs = ref_tok.batch_decode(rows, skip_special_tokens=skip)
        assert ours == theirs, first_difference(ours, theirs, rows)
        assert herd_tok.decode(rows, skip_special_tokens=skip) == theirs
    for clean_up in (None, True, False):
        assert herd_tok.decode(rows[10], clean_up_tokenization_spaces=clean_up) == ref_tok.decode(
            rows[10], clean_up_tokenization_spaces=clean_up
        )
    # Ids as an int, a tensor, a numpy array, a 2-D tensor.
    assert herd_tok.decode(rows[8][1]) == ref_tok.decode(rows[8][1])
    assert herd_tok.decode(torch.tensor(rows[8])) == ref_tok.decode(rows[8])
    assert herd_tok.decode(np.array(rows[8])) == ref_tok.decode(rows[8])
    assert herd_tok.decode(torch.tensor([rows[8], rows[8]])) == ref_tok.decode([rows[8], rows[8]])
    assert herd_tok.batch_decode(torch.tensor([rows[8]])) == ref_tok.batch_decode([rows[8]])


def test_round_trip_of_plain_text(pair):
    herd_tok, _ = pair
    for text in ("Hello world", "naïve café 日本語 😀", "def f(x):\n    return x\n"):
        assert herd_tok.decode(herd_tok.encode(text), skip_special_tokens=True) == text


PADDING_CASES = [
    dict(padding=True),
    dict(padding="longest"),
    dict(padding="longest", padding_side="left"),
    dict(padding=True, padding_side="right"),
    dict(padding="max_length", max_length=12),
    dict(padding="max_length", max_length=12, padding_side="left"),
    dict(padding="max_length"),  # no max_length and no model_max_length: no padding
    dict(padding=True, pad_to_multiple_of=8),
    dict(padding=True, max_length=4),  # max_length ignored, with a warning
    dict(padding="do_not_pad"),
    dict(max_length=5),  # a bare max_length truncates
    dict(max_length=5, truncation=False),
    dict(truncation=True),  # nothing to truncate to
    dict(truncation=True, max_length=5),
    dict(truncation="longest_first", max_length=3),
    dict(truncation="only_first", max_length=4),
    dict(truncation=True, max_length=6, padding="max_length"),
    dict(truncation=True, max_length=6, padding=True, padding_side="left"),
    dict(truncation=True, max_length=8, padding=True, pad_to_multiple_of=4),
    dict(truncation=True, max_length=6, padding=True, pad_to_multiple_of=4),  # error in both
    dict(padding=True, return_tensors="pt"),
    dict(padding=True, return_tensors="np", padding_side="left"),
    dict(truncation=True, max_length=4, padding="max_length", return_tensors="pt"),
    dict(return_tensors="np"),  # ragged: numpy object array
    dict(return_tensors="pt"),  # ragged: error in both
    dict(padding=True, return_attention_mask=False),
    dict(padding=True, return_token_type_ids=True, return_special_tokens_mask=True, return_length=True),
    dict(padding=True, return_offsets_mapping=True),
    dict(truncation=True, max_length=4, stride=1, return_overflowing_tokens=True),
    dict(padding="sideways"),  # error in both
    dict(truncation="everything"),  # error in both
]


@pytest.mark.parametrize("case", PADDING_CASES, ids=lambda case: ",".join(f"{k}={v}" for k, v in case.items()))
def test_padding_truncation_and_tensors(with_pad_token, case):
    herd_tok, ref_tok = with_pad_token
    batch = ["Hello world, this is a longer sentence.", "Hi", "", "naïve café 日本語 text with emoji 😀"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = outcome(herd_tok, batch, **case)
        theirs = outcome(ref_tok, batch, **case)
        assert ours == theirs
        # One string: no batch dimension unless tensors are asked for.
        assert outcome(herd_tok, batch[0], **case) == outcome(ref_tok, batch[0], **case)
    # Both warn that max_length is ignored by padding=True without truncation.
    ignored = [w for w in caught if "`max_length` is ignored" in str(w.message)]
    assert len(ignored) == (4 if case == dict(padding=True, max_length=4) else 0)


PAIR_CASES = [
    dict(),
    dict(add_special_tokens=False),
    dict(truncation="only_first", max_length=9),
    dict(truncation="only_second", max_length=9),
    dict(truncation="longest_first", max_length=7),
    dict(padding=True, return_token_type_ids=True),
    dict(padding=True, truncation=True, max_length=10, return_tensors="pt"),
]


@pytest.mark.parametrize("case", PAIR_CASES, ids=str)
def test_text_pairs(with_pad_token, case):
    herd_tok, ref_tok = with_pad_token
    first = ["What is the capital of France?", "Short", "日本語"]
    second = ["Paris is the capital and largest city of France.", "Another short one", "テキスト です"]
    assert outcome(herd_tok, first, second, **case) == outcome(ref_tok, first, second, **case)
    assert outcome(herd_tok, first[0], second[0], **case) == outcome(ref_tok, first[0], second[0], **case)


def test_pretokenized_and_split_special_tokens(pair):
    herd_tok, ref_tok = pair
    words = [["Hello", "world", "<s>"], ["naïve", "café"]]
    assert plain(herd_tok(words, is_split_into_words=True)) == plain(ref_tok(words, is_split_into_words=True))
    text = "a <|eot_id|> b <s> c"
    assert plain(herd_tok(text, split_special_tokens=True)) == plain(ref_tok(text, split_special_tokens=True))
    assert plain(herd_tok(text)) == plain(ref_tok(text))  # the setting does not stick


def test_padding_without_pad_token_is_an_error(pair):
    herd_tok, ref_tok = pair
    assert herd_tok.pad_token is None
    with pytest.raises(ValueError, match="does not have a padding token"):
        herd_tok(["a", "b c"], padding=True)
    with pytest.raises(ValueError):
        ref_tok(["a", "b c"], padding=True)


def test_bad_inputs_are_errors(llama31):
    herd_tok, _ = llama31
    with pytest.raises(ValueError, match="text must be a string"):
        herd_tok(123)
    with pytest.raises(ValueError, match="specify `text`"):
        herd_tok(None)
    with pytest.raises(ValueError, match="return_tensors"):
        herd_tok("a", return_tensors="tf")
    with pytest.raises(TypeError):
        herd_tok("a", not_an_option=True)
    with pytest.raises(ValueError, match="does not match"):
        herd_tok(["a", "b"], ["c"])


PAD_INPUTS = [
    [{"input_ids": [1, 2, 3]}, {"input_ids": [4]}],
    [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}, {"input_ids": [4], "attention_mask": [1]}],
    {"input_ids": [[1, 2, 3], [4], []]},
    {"input_ids": [5, 6]},
]


@pytest.mark.parametrize("inputs", PAD_INPUTS, ids=str)
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"padding_side": "left"},
        {"padding": "max_length", "max_length": 6},
        {"pad_to_multiple_of": 4},
        {"return_tensors": "pt"},
        {"return_tensors": "np", "return_attention_mask": False},
        {"padding": False},
    ],
    ids=str,
)
def test_pad_matches(llama31_with_pad_token, inputs, kwargs):
    # pad() does not depend on the vocabulary: one folder is enough.
    herd_tok, ref_tok = llama31_with_pad_token
    assert outcome(herd_tok.pad, inputs, **kwargs) == outcome(ref_tok.pad, inputs, **kwargs)


def test_pad_of_tokenizer_outputs_and_tensors(llama31_with_pad_token):
    herd_tok, ref_tok = llama31_with_pad_token
    rows = [herd_tok("Hello world"), herd_tok("Hi")]
    assert plain(herd_tok.pad(rows)) == plain(ref_tok.pad([ref_tok("Hello world"), ref_tok("Hi")]))
    tensors = [{"input_ids": torch.tensor([1, 2, 3])}, {"input_ids": torch.tensor([4])}]
    assert plain(herd_tok.pad(tensors)) == plain(ref_tok.pad(tensors))
    with pytest.raises(ValueError, match="input_ids"):
        herd_tok.pad([{"attention_mask": [1]}])


# ----------------------------------------------------------------------------------------------
# BOS / EOS
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "folder, kwargs",
    [
        ("llama3.1", {"add_bos_token": False}),
        ("llama3-nobos", {"add_bos_token": True}),
        ("spm-llama-style", {"add_eos_token": True}),
        ("spm-llama-style", {"add_bos_token": True, "add_eos_token": True}),
    ],
)
def test_add_bos_and_eos_arguments(folder, kwargs):
    herd_tok, ref_tok = load_both(folder, **kwargs)
    texts = TEST_STRINGS[::5]
    assert herd_tok(texts)["input_ids"] == ref_tok(texts)["input_ids"]
    assert herd_tok(texts[:5], texts[5:10])["input_ids"] == ref_tok(texts[:5], texts[5:10])["input_ids"]
    assert (herd_tok.add_bos_token, herd_tok.add_eos_token) == (ref_tok.add_bos_token, ref_tok.add_eos_token)


def test_add_eos_token_attribute():
    # As in transformers 5.17, add_bos_token reads False for folders whose BOS comes from tokenizer.json,
    # so switching on EOS rebuilds a post-processor without BOS.
    herd_tok, ref_tok = load_both("spm-llama-style")
    assert herd_tok("hi")["input_ids"] == ref_tok("hi")["input_ids"] == [1, 12014]
    herd_tok.add_eos_token = True
    ref_tok.add_eos_token = True
    assert herd_tok("hi")["input_ids"] == ref_tok("hi")["input_ids"] == [12014, 2]
    herd_tok.add_bos_token = True
    ref_tok.add_bos_token = True
    assert herd_tok("hi")["input_ids"] == ref_tok("hi")["input_ids"] == [1, 12014, 2]


# ----------------------------------------------------------------------------------------------
# Added tokens
# ----------------------------------------------------------------------------------------------


def test_add_tokens_and_special_tokens():
    herd_tok, ref_tok = load_both("spm-llama-style")
    for tok in (herd_tok, ref_tok):
        assert tok.add_tokens(["<new1>", "hello_tok"]) == 2
        assert tok.add_tokens("<new1>") == 0
        assert tok.add_tokens(tokenization.AddedToken("<sp>", special=True), special_tokens=True) == 1
        assert tok.add_special_tokens({"pad_token": "<pad>", "extra_special_tokens": ["<x1>", "<x2>"]}) == 3
    assert len(herd_tok) == len(ref_tok)
    assert herd_tok.all_special_tokens == ref_tok.all_special_tokens
    assert herd_tok.all_special_ids == ref_tok.all_special_ids
    assert herd_tok.pad_token_id == ref_tok.pad_token_id
    text = "a <new1> b <pad><x1>hello_tok<sp> end"
    assert herd_tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    ids = herd_tok(text)["input_ids"]
    for skip in (False, True):
        assert herd_tok.decode(ids, skip_special_tokens=skip) == ref_tok.decode(ids, skip_special_tokens=skip)
    assert herd_tok.add_special_tokens({}) == 0
    with pytest.raises(ValueError, match="not a special token name"):
        herd_tok.add_special_tokens({"nonsense_token_kind": "<y>"})
    with pytest.raises(ValueError, match="extra_special_tokens"):
        herd_tok.add_special_tokens({"extra_special_tokens": "<y>"})


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def test_save_pretrained_reloads_identically(pair, tmp_path):
    herd_tok, ref_tok = pair
    written = herd_tok.save_pretrained(tmp_path / "saved")
    names = sorted(Path(path).name for path in written)
    assert names == sorted(
        ["tokenizer.json", "tokenizer_config.json"] + (["chat_template.jinja"] if herd_tok.chat_template else [])
    )
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    texts = TEST_STRINGS[::2]
    expected = ref_tok(texts)["input_ids"]
    assert again(texts)["input_ids"] == expected
    assert theirs(texts)["input_ids"] == expected, first_difference(theirs(texts)["input_ids"], expected, texts)
    for reloaded in (again, theirs):
        assert reloaded.chat_template == herd_tok.chat_template
        assert reloaded.padding_side == herd_tok.padding_side
        assert reloaded.special_tokens_map == herd_tok.special_tokens_map
        assert reloaded.all_special_ids == herd_tok.all_special_ids
        assert len(reloaded) == len(herd_tok)
    assert again.decode(expected[3]) == herd_tok.decode(expected[3])


def test_save_pretrained_after_changes(tmp_path):
    herd_tok = AutoTokenizer.from_pretrained(TOKENIZERS / "spm-llama-style", padding_side="right", add_eos_token=True)
    herd_tok.add_special_tokens({"pad_token": "<|pad|>", "extra_special_tokens": ["<|tool|>"]})
    herd_tok.add_tokens(["<new_word>"])
    herd_tok.chat_template = {"default": LLAMA31_CHAT_TEMPLATE, "tool_use": "T{{ tools | length }}", "plain": "P"}
    herd_tok.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved" / "additional_chat_templates").iterdir()) == [
        "plain.jinja",
        "tool_use.jinja",
    ]
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    texts = ["hi <|pad|> there <new_word><|tool|>", "x"]
    for reloaded in (again, theirs):
        assert reloaded(texts, padding=True)["input_ids"] == herd_tok(texts, padding=True)["input_ids"]
        assert reloaded.chat_template == herd_tok.chat_template
        assert reloaded.padding_side == "right"
        assert reloaded.pad_token == "<|pad|>" and reloaded.all_special_tokens == herd_tok.all_special_tokens
        assert reloaded.apply_chat_template(TOOL_CHAT, tokenize=False) == herd_tok.apply_chat_template(
            TOOL_CHAT, tokenize=False
        )
        assert reloaded("hi")["input_ids"] == [12014, 2]  # add_eos_token=True alone drops BOS, as in 5.17


def test_model_specific_named_tokens(tmp_path):
    # "image_token" keys and an extra_special_tokens dict give named tokens (image_token, image_token_id),
    # added to the vocabulary when missing, and passed to chat templates.
    folder = tmp_path / "mm"
    shutil.copytree(TOKENIZERS / "spm-llama-style", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(extra_special_tokens={"audio_token": "<|audio|>"}, image_token="<|image|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    herd_tok = AutoTokenizer.from_pretrained(folder)
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert (herd_tok.image_token, herd_tok.image_token_id) == (ref_tok.image_token, ref_tok.image_token_id)
    assert herd_tok.audio_token_id == ref_tok.audio_token_id
    assert herd_tok.special_tokens_map == ref_tok.special_tokens_map
    assert herd_tok.all_special_tokens == ref_tok.all_special_tokens and len(herd_tok) == len(ref_tok)
    text = "a <|image|> b<|audio|>"
    assert herd_tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    template = "{{ image_token }}{{ audio_token }}{{ messages[0].content }}"
    kwargs = dict(chat_template=template, tokenize=False)
    assert herd_tok.apply_chat_template(SYSTEM_CHAT, **kwargs) == ref_tok.apply_chat_template(SYSTEM_CHAT, **kwargs)
    ref_tok.save_pretrained(tmp_path / "ref")  # writes "model_specific_special_tokens" too
    herd_tok.save_pretrained(tmp_path / "herd")
    for saved in ("ref", "herd"):
        again = AutoTokenizer.from_pretrained(tmp_path / saved)
        assert (
            again.special_tokens_map == ref_tok.special_tokens_map
            and again(text)["input_ids"] == ref_tok(text)["input_ids"]
        )
    with pytest.raises(AttributeError):
        _ = herd_tok.video_token


def test_build_from_a_tokenizers_object():
    herd_tok, ref_tok = shared("llama3-nobos")
    built = PreTrainedTokenizerFast(
        tokenizer_object=herd_tok.backend_tokenizer, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )
    assert built(TEST_STRINGS[:40])["input_ids"] == ref_tok(TEST_STRINGS[:40])["input_ids"]
    assert built.backend_tokenizer is not herd_tok.backend_tokenizer
    from_file = PreTrainedTokenizerFast(tokenizer_file=TOKENIZERS / "llama3.1" / "tokenizer.json", add_bos_token=False)
    assert from_file("Hello world")["input_ids"] == [9906, 1917]
    with pytest.raises(ValueError, match="tokenizer_object= or tokenizer_file="):
        PreTrainedTokenizerFast()
