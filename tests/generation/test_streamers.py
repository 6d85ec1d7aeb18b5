"""Streamers print/yield exactly the generated text, whole words at a time."""

from __future__ import annotations

import threading

import pytest
import torch

import herd
from herd.generation import TextIteratorStreamer, TextStreamer
from tests.conftest import SHARED_DATA, reference_llama, save_reference


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    tokenizer = herd.AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "spm-llama-style")
    reference = reference_llama(vocab_size=32000, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=128, seed=5)
    folder = save_reference(reference, tmp_path_factory.mktemp("stream") / "ckpt")
    return herd.LlamaForCausalLM.from_pretrained(folder, progress=False), tokenizer


def test_text_streamer_prints_the_generated_text(model_and_tokenizer, capsys):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=15, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) + "\n"
    # without skip_prompt the prompt is printed too, special tokens included unless skipped
    out = model.generate(ids, max_new_tokens=5, streamer=TextStreamer(tokenizer))
    assert capsys.readouterr().out == tokenizer.decode(out[0]) + "\n"


def test_iterator_streamer_from_a_thread(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer("The weather today", return_tensors="pt").input_ids
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=model.generate(ids, max_new_tokens=12, streamer=streamer)))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert len(pieces) >= 2  # streamed in several pieces, not all at the end
    assert "".join(pieces) == tokenizer.decode(result["out"][0, ids.shape[1] :])


def test_streamer_refuses_batches(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="one row"):
        model.generate(torch.tensor([[1, 5], [1, 6]]), max_new_tokens=2, streamer=TextStreamer(tokenizer))


# ----------------------------------------------------------------------------------------------
# The exact pieces, against transformers' streamers
# ----------------------------------------------------------------------------------------------

TEXTS = [
    "Hello world, this is a test.",
    "Line one\nLine two\n\nThree words here",
    "Emoji 🦙🦙 and accents: café, naïve — done",
    "中文字符测试 mixed with English words",
    "trailing spaces   ",
]


def _drain(streamer, tokens, prompt_length):
    """Every item an iterator streamer yields for a prompt put whole, then one token at a time."""
    streamer.put(torch.tensor([tokens[:prompt_length]]))
    for token in tokens[prompt_length:]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    return list(streamer)


@pytest.mark.parametrize("tokenizer_name", ["spm-llama-style", "llama3.1"])
@pytest.mark.parametrize("options", [{}, {"skip_prompt": True}, {"skip_prompt": True, "skip_special_tokens": True}],
                         ids=str)
def test_iterator_streamer_yields_what_transformers_yields(tokenizer_name, options):
    import transformers

    folder = SHARED_DATA / "tokenizers" / tokenizer_name
    ours, theirs = herd.AutoTokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        tokens = theirs(text).input_ids + [theirs.eos_token_id]
        assert ours(text).input_ids == tokens[:-1]
        for prompt_length in (1, 3):
            expected = _drain(transformers.TextIteratorStreamer(theirs, **options), tokens, prompt_length)
            got = _drain(TextIteratorStreamer(ours, **options), tokens, prompt_length)
            assert got == expected, (text, prompt_length)
            assert "" in got  # transformers yields the empty pieces too


def test_iterator_streamer_through_generate_matches_transformers(model_and_tokenizer, tmp_path):
    """Several generations (prompt shown or skipped, stopped by eos or by length) stream the same items."""
    import transformers

    model, tokenizer = model_and_tokenizer
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "spm-llama-style")
    model.save_pretrained(tmp_path / "ckpt")
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()

    def stream(generating_model, streamer, ids, **kwargs):
        result = {}
        thread = threading.Thread(target=lambda: result.update(out=generating_model.generate(
            ids, streamer=streamer, do_sample=False, pad_token_id=0, **kwargs)))
        thread.start()
        items = list(streamer)
        thread.join()
        return items, result["out"]

    for prompt in ("Once upon a time", "The weather today is"):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        first, _ = stream(model, TextIteratorStreamer(tokenizer, timeout=60), ids, max_new_tokens=12)
        plain, _ = stream(reference, transformers.TextIteratorStreamer(reference_tokenizer, timeout=60), ids,
                          max_new_tokens=12)
        assert first == plain
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        for options, kwargs in (({"skip_prompt": True}, {"max_new_tokens": 12}),
                                ({"skip_prompt": True, "skip_special_tokens": True},
                                 {"max_new_tokens": 12, "eos_token_id": greedy[4]}),  # stops after 5 tokens
                                ({}, {"max_new_tokens": 1})):
            expected, expected_ids = stream(reference, transformers.TextIteratorStreamer(
                reference_tokenizer, timeout=60, **options), ids, **kwargs)
            got, got_ids = stream(model, TextIteratorStreamer(tokenizer, timeout=60, **options), ids, **kwargs)
            assert torch.equal(got_ids, expected_ids)
            assert got == expected, (prompt, options, kwargs)
