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
