"""TextAssembler: the text handed out token by token is final (whole characters, no piece of a stop string)."""

from __future__ import annotations

import pytest
import torch

from herd.serving.text import TextAssembler
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def tokenizer():
    import herd

    return herd.AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "llama3.1")


def pieces(tokenizer, text, stop=(), **kwargs):
    assembler = TextAssembler(tokenizer, list(stop), **kwargs)
    out = [assembler.add(token) for token in tokenizer.encode(text, add_special_tokens=False)]
    out.append(assembler.finish())
    return out, assembler


def test_without_stop_strings_the_pieces_make_the_text(tokenizer):
    text = "Paris is the capital of France. Ünïcödé 日本語 🐑!"
    out, assembler = pieces(tokenizer, text)
    assert "".join(out) == text == assembler.final_text
    assert not any("\ufffd" in piece for piece in out)  # a character split over tokens waits for its last byte


@pytest.mark.parametrize("stop", [" of Fra", "capital", "🐑", "France.", "s the c"])
def test_a_stop_string_never_shows_even_in_part(tokenizer, stop):
    text = "Paris is the capital of France. 🐑 and more text after."
    out, assembler = pieces(tokenizer, text, stop=[stop, "zzz"])
    assert "".join(out) == text[: text.index(stop)] == assembler.final_text and assembler.stopped
    shown = ""
    for piece in out:
        shown += piece
        # nothing handed out ever goes past where the stop string starts
        assert text.index(stop) >= len(shown)


def test_held_back_text_is_released_when_it_is_not_a_stop_string(tokenizer):
    assembler = TextAssembler(tokenizer, ["capital city"])
    out = [assembler.add(token) for token in tokenizer.encode("the capital of", add_special_tokens=False)]
    assert "".join(out) == "the capital of"  # " capital" was held until " of" showed it is not the stop string
    assert out[1] == " "  # the space went out, "capital" waited


def test_hidden_ids_and_special_tokens(tokenizer):
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    ids = tokenizer.encode("Hi", add_special_tokens=False) + [eot]
    plain, kept = TextAssembler(tokenizer), TextAssembler(tokenizer, skip_special_tokens=False, hidden_ids={eot})
    header = tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    assert "".join(plain.add(i) for i in [header, *ids]) + plain.finish() == "Hi"
    assert "".join(kept.add(i) for i in [header, *ids]) + kept.finish() == "<|start_header_id|>Hi"


@pytest.mark.parametrize("folder", ["llama3.1", "spm-llama-style"])
def test_streamed_pieces_are_the_whole_decode_for_any_tokens(folder):
    """Random token ids (partial UTF-8 characters, special tokens, SentencePiece word starts) of a
    byte-level BPE and a SentencePiece-style tokenizer: what the windowed decode streams, plus
    finish(), is exactly the decode of all the ids at once, with and without special tokens."""
    from herd import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / folder)
    generator = torch.Generator().manual_seed(0)
    texts = ["Größe 名字 🙂 naïve", " leading  spaces\n\ttabs", "word" * 5]
    for case in range(24):
        if case < len(texts):
            ids = tokenizer.encode(texts[case], add_special_tokens=False)
        else:
            ids = torch.randint(0, len(tokenizer), (int(torch.randint(1, 40, (1,), generator=generator)),),
                                generator=generator).tolist()
        for skip in (True, False):
            assembler = TextAssembler(tokenizer, skip_special_tokens=skip)
            streamed = "".join(assembler.add(token) for token in ids) + assembler.finish()
            assert streamed == tokenizer.decode(ids, skip_special_tokens=skip), (folder, ids)


@pytest.mark.parametrize("folder", ["llama3.1", "spm-llama-style"])
def test_token_texts_join_into_the_text_with_its_spaces(folder):
    """logprobs' `token`: each token alone, a SentencePiece word start with its space, so that an
    answer's tokens join into its text (a SentencePiece text decoded whole drops the first space)."""
    from herd import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / folder)
    assembler = TextAssembler(tokenizer)
    text = "Hello world, the banana is  here.\nNext line"
    ids = tokenizer.encode(text, add_special_tokens=False)
    joined = "".join(assembler.token_text(i) for i in ids)
    assert joined.lstrip(" ") == tokenizer.decode(ids).lstrip(" ")
    assert " world" in joined and " banana" in joined


@pytest.mark.parametrize("folder", ["llama3.1", "spm-llama-style"])
def test_token_bytes_rebuild_characters_split_over_tokens(folder):
    """logprobs' `bytes`: a token holding part of an emoji decodes to U+FFFD, but its bytes are its
    own (byte-level characters or a <0xNN> byte), so that the tokens' bytes join into the text."""
    from herd import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / folder)
    assembler = TextAssembler(tokenizer)
    text = "🍨🐑Größe日本語"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in assembler.token_text(i) for i in ids)  # the case at stake: partial characters
    joined = b"".join(assembler.token_bytes(i) for i in ids)
    assert joined.decode() in (text, " " + text)  # (a SentencePiece text starts with a word start's space)
    assert all(assembler.token_bytes(i) == assembler.token_text(i).encode() for i in ids
               if "\ufffd" not in assembler.token_text(i))
