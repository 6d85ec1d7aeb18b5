"""pipeline("text-generation") returns what the reference pipeline returns."""

from __future__ import annotations

import pytest
import torch

import herd
from tests.conftest import SHARED_DATA, reference_llama, save_reference

LLAMA31 = SHARED_DATA / "tokenizers" / "llama3.1"


@pytest.fixture(scope="module")
def chat_model_folder(tmp_path_factory):
    """A tiny random Llama over the real Llama 3.1 vocabulary, saved with its tokenizer and chat template."""
    import transformers

    reference = reference_llama(vocab_size=128256, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=512, seed=2,
                                bos_token_id=128000, eos_token_id=[128001, 128009], pad_token_id=None)
    folder = save_reference(reference, tmp_path_factory.mktemp("pipe") / "ckpt")
    transformers.AutoTokenizer.from_pretrained(LLAMA31).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipes(chat_model_folder):
    import transformers

    reference = transformers.pipeline("text-generation", model=str(chat_model_folder), dtype=torch.float32)
    ours = herd.pipeline("text-generation", model=str(chat_model_folder), dtype=torch.float32)
    return reference, ours


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a planet."}]
CHAT2 = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count to 3"}]


@pytest.mark.parametrize("inputs", ["The capital of France is", ["Hello", "A much longer prompt about the sea"], CHAT, [CHAT, CHAT2]],
                         ids=["string", "strings", "chat", "chats"])
@pytest.mark.parametrize("return_full_text", [True, False])
def test_matches_reference_pipeline(pipes, inputs, return_full_text):
    reference, ours = pipes
    kwargs = dict(max_new_tokens=8, do_sample=False, return_full_text=return_full_text)
    assert ours(inputs, **kwargs) == reference(inputs, **kwargs)


def test_batched_rows_equal_rows_alone(pipes):
    _, ours = pipes
    prompts = ["Hello", "A much longer prompt about the sea", "x"]
    kwargs = dict(max_new_tokens=6, do_sample=False)  # the pipeline samples by default, as transformers'
    assert ours(prompts, batch_size=3, **kwargs) == ours(prompts, batch_size=1, **kwargs)


def test_continue_final_message_and_num_return_sequences(pipes):
    reference, ours = pipes
    partial = CHAT + [{"role": "assistant", "content": "It is"}]
    assert ours(partial, max_new_tokens=5, do_sample=False) == reference(partial, max_new_tokens=5, do_sample=False)
    torch.manual_seed(0)
    sampled = ours("Hello", max_new_tokens=4, do_sample=True, num_return_sequences=3)
    assert len(sampled) == 3 and all(r["generated_text"].startswith("Hello") for r in sampled)


def test_pipeline_from_a_loaded_model(chat_model_folder):
    model = herd.AutoModelForCausalLM.from_pretrained(chat_model_folder, progress=False)
    tokenizer = herd.AutoTokenizer.from_pretrained(chat_model_folder)
    pipe = herd.pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = pipe("Hello", max_new_tokens=3)
    assert isinstance(out, list) and out[0]["generated_text"].startswith("Hello")


def test_pipeline_errors(chat_model_folder, pipes):
    _, ours = pipes
    with pytest.raises(ValueError, match="unsupported pipeline task"):
        herd.pipeline("summarization", model=str(chat_model_folder))
    with pytest.raises(ValueError, match="must be a string or a chat"):
        ours([42])
    with pytest.raises(ValueError, match="role"):
        ours([{"content": "no role"}], max_new_tokens=2)


@pytest.mark.parametrize("kwargs", [
    dict(stop_sequence=" the"),
    dict(return_type="new_text"),
    dict(return_tensors=True),
    dict(tokenizer_encode_kwargs={"add_special_tokens": False}),
    dict(max_length=5, truncation=True, max_new_tokens=None),
    dict(handle_long_generation="hole"),
    dict(return_full_text=True, return_tensors=True),
    dict(return_full_text=False, return_text=True),
    dict(handle_long_generation="middle"),
], ids=str)
def test_call_options_match_reference(pipes, kwargs):
    """The reference pipeline's call options: stop_sequence, return_type, tokenizer_encode_kwargs, max_length
    (which also truncates the prompt), handle_long_generation, and its conflicting-flag errors."""
    from transformers.pipelines.text_generation import ReturnType

    reference, ours = pipes
    kwargs = {"max_new_tokens": 6, "do_sample": False, **kwargs}
    if kwargs.get("max_new_tokens") is None:
        kwargs.pop("max_new_tokens")
    if kwargs.get("return_type") == "new_text":
        kwargs["return_type"] = ReturnType.NEW_TEXT
    prompt = "Hello there my friend how are you"
    try:
        expected = reference(prompt, **kwargs)
    except ValueError as error:
        with pytest.raises(ValueError, match=str(error)[:20]):
            ours(prompt, **kwargs)
        return
    assert ours(prompt, **kwargs) == expected


def test_pipeline_arguments_are_call_defaults(chat_model_folder):
    """pipeline(..., return_full_text=False, max_new_tokens=...) sets defaults for every call, as in the reference."""
    import transformers

    kwargs = dict(dtype=torch.float32, return_full_text=False, max_new_tokens=4, do_sample=False)
    reference = transformers.pipeline("text-generation", model=str(chat_model_folder), **kwargs)
    ours = herd.pipeline("text-generation", model=str(chat_model_folder), **kwargs)
    assert ours("Hello") == reference("Hello")
    assert ours("Hello", return_full_text=True) == reference("Hello", return_full_text=True)
    assert ours.task == reference.task == "text-generation"
    assert ours.dtype == reference.dtype == torch.float32
