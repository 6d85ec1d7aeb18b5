"""herd's tokenizers against transformers 5.17 (the oracle) on real tokenizer folders from ../shared.

Each folder is loaded once per module by both libraries; tests that change a tokenizer load their own.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import warnings
from datetime import datetime
from pathlib import Path
from typing import Literal

import jinja2
import numpy as np
import pytest
import torch

import herd.tokenization as tokenization
from herd.tokenization import AutoTokenizer, BatchEncoding, LlamaTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast

transformers = pytest.importorskip("transformers")

TOKENIZERS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizers"
FOLDERS = ["llama3.1", "llama3-nobos", "spm-llama-style"]

if not all((TOKENIZERS / name / "tokenizer.json").is_file() for name in FOLDERS):
    pytest.skip(f"tokenizer folders are not in {TOKENIZERS}", allow_module_level=True)


def load_both(name: str, **kwargs):
    """Fresh (herd tokenizer, transformers tokenizer) of a folder, for tests that change them."""
    folder = TOKENIZERS / name
    return AutoTokenizer.from_pretrained(folder, **kwargs), transformers.AutoTokenizer.from_pretrained(folder, **kwargs)


_SHARED: dict[str, tuple] = {}


def shared(name: str):
    """(herd, transformers) tokenizers of a folder, loaded once for the whole module; do not change them."""
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
    if isinstance(result, (torch.Tensor, np.ndarray)):
        return ("ok", type(result).__name__, result.tolist())
    return ("ok", result)


def first_difference(ours: list, theirs: list, inputs: list) -> str:
    for index, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return f"input {inputs[index]!r}: herd {a} vs transformers {b}"
    return f"lengths {len(ours)} vs {len(theirs)}"


# ----------------------------------------------------------------------------------------------
# Loading and attributes
# ----------------------------------------------------------------------------------------------


def test_aliases_and_auto():
    assert LlamaTokenizer is PreTrainedTokenizerFast and LlamaTokenizerFast is PreTrainedTokenizerFast
    with pytest.raises(OSError, match="from_pretrained"):
        AutoTokenizer()


def test_backend_pipeline_is_the_one_transformers_builds(pair):
    # For LlamaTokenizer-class folders transformers rebuilds normalizer, pre-tokenizer and decoder.
    herd_tok, ref_tok = pair
    ours, theirs = herd_tok.backend_tokenizer, ref_tok.backend_tokenizer
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        mine, reference = getattr(ours, part), getattr(theirs, part)
        assert (mine and json.loads(mine.__getstate__())) == (reference and json.loads(reference.__getstate__())), part
    for option in ("dropout", "unk_token", "fuse_unk", "byte_fallback", "ignore_merges", "continuing_subword_prefix"):
        assert getattr(ours.model, option) == getattr(theirs.model, option), option
    assert ours.get_added_tokens_decoder() == theirs.get_added_tokens_decoder()
    if herd_tok.folder_name == "spm-llama-style":  # small enough to compare whole
        assert json.loads(ours.to_str()) == json.loads(theirs.to_str())


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


def test_batch_encoding_access(llama31):
    herd_tok, ref_tok = llama31
    encoding = herd_tok(["Hello world", "Hi there"], return_tensors="pt")
    assert isinstance(encoding, BatchEncoding) and isinstance(encoding, dict)
    assert encoding.input_ids is encoding["input_ids"] and encoding.input_ids.dtype == torch.int64
    assert encoding.to("cpu") is encoding and encoding.attention_mask.device.type == "cpu"
    assert encoding.tokens(0) == ref_tok(["Hello world", "Hi there"]).tokens(0)
    assert encoding[0].ids == encoding.input_ids[0].tolist()
    assert encoding.char_to_token(0, 6) == ref_tok(["Hello world", "Hi there"]).char_to_token(0, 6)
    with pytest.raises(AttributeError):
        _ = encoding.not_a_key
    assert dict(herd_tok("Hi")) == {"input_ids": [128000, 13347], "attention_mask": [1, 1]}
    copied = copy.deepcopy(encoding)
    assert copied.input_ids.tolist() == encoding.input_ids.tolist() and copied.tokens(1) == encoding.tokens(1)
    assert encoding[:1]["input_ids"].tolist() == [encoding.input_ids[0].tolist()]


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


def test_config_add_bos_token_is_ignored_with_tokenizer_json(tmp_path):
    # 5.17 drops add_bos_token/add_eos_token from tokenizer_config.json when tokenizer.json exists.
    folder = tmp_path / "tok"
    shutil.copytree(TOKENIZERS / "spm-llama-style", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, add_eos_token=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    herd_tok = AutoTokenizer.from_pretrained(folder)
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert herd_tok("hi")["input_ids"] == ref_tok("hi")["input_ids"] == [1, 12014]


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
# Chat templates
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
        assert tokenization._function_tool_schema(function) == get_json_schema(function)


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
    with pytest.raises(NotImplementedError, match="assistant token masks"):
        herd_tok.apply_chat_template(SYSTEM_CHAT, return_assistant_tokens_mask=True)
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


def test_transformers_saved_folders_load(tmp_path):
    # Folders written by transformers: chat_template.jinja, "backend"/"is_local" keys, and for a
    # LlamaTokenizer no "legacy" key, which changes how transformers itself reloads it.
    _, original = load_both("spm-llama-style", chat_template=LLAMA31_CHAT_TEMPLATE)
    original.save_pretrained(tmp_path / "ref")
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ref")
    herd_tok = AutoTokenizer.from_pretrained(tmp_path / "ref")
    assert herd_tok.chat_template == ref_tok.chat_template == LLAMA31_CHAT_TEMPLATE
    assert herd_tok(TEST_STRINGS)["input_ids"] == ref_tok(TEST_STRINGS)["input_ids"]
    assert herd_tok("a</s>b")["input_ids"] != original("a</s>b")["input_ids"]  # transformers' round trip is lossy
    herd_tok.save_pretrained(tmp_path / "herd")
    config = json.loads((tmp_path / "herd" / "tokenizer_config.json").read_text())
    assert "is_local" not in config and "backend" not in config and "chat_template" not in config


def test_legacy_folders_with_special_tokens_map_and_json_template(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    shutil.copy(TOKENIZERS / "spm-llama-style" / "tokenizer.json", folder)
    config = {"tokenizer_class": "LlamaTokenizerFast", "legacy": True, "model_max_length": 2048}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special = {
        "bos_token": {"content": "<s>", "lstrip": False},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}"}))
    herd_tok = AutoTokenizer.from_pretrained(folder)
    assert herd_tok.special_tokens_map == ref_tok.special_tokens_map
    assert herd_tok.model_max_length == ref_tok.model_max_length == 2048
    assert herd_tok(TEST_STRINGS, padding=True)["input_ids"] == ref_tok(TEST_STRINGS, padding=True)["input_ids"]
    assert herd_tok.apply_chat_template(SYSTEM_CHAT, tokenize=False) == SYSTEM_CHAT[0]["content"]


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


# ----------------------------------------------------------------------------------------------
# Loading errors
# ----------------------------------------------------------------------------------------------


def test_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_lone_sentencepiece_model_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05<unk>not really a model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(
        FileNotFoundError,
        match="only supports tokenizer.json-based tokenizers.*SentencePiece|SentencePiece.*only supports tokenizer.json",
    ):
        AutoTokenizer.from_pretrained(tmp_path)


def test_malformed_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(ValueError, match="not a valid tokenizers file"):
        AutoTokenizer.from_pretrained(tmp_path)
    shutil.copy(TOKENIZERS / "spm-llama-style" / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>",')
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(ValueError, match="chat_template must be"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_missing_folder_and_unsupported_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        AutoTokenizer.from_pretrained(tmp_path / "no" / "such" / "folder")
    with pytest.raises(NotImplementedError, match="GGUF"):
        AutoTokenizer.from_pretrained(TOKENIZERS / "llama3.1", gguf_file="model.gguf")


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--meta-llama--Tiny-Tokenizer"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(TOKENIZERS / "spm-llama-style", repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    herd_tok = AutoTokenizer.from_pretrained("meta-llama/Tiny-Tokenizer", cache_dir=tmp_path / "hub")
    assert herd_tok("Hello this is a test")["input_ids"] == [1, 22557, 456, 349, 264, 1369]
    assert herd_tok.name_or_path == "meta-llama/Tiny-Tokenizer"
