"""Tokenizer call forms and attributes that user code (fine-tuning scripts, collators) reaches for,
compared with transformers 5.17 on the real Llama 3.1 tokenizer folder."""

from __future__ import annotations

import pytest

from tests.tokenization.common import (  # noqa: F401  (llama31, llama31_with_pad_token: fixtures)
    llama31,
    llama31_with_pad_token,
    outcome,
)

TARGET_CASES = [
    dict(text="Translate: hello", text_target="bonjour"),
    dict(text_target="only a target"),
    dict(text=["a b c", "d"], text_target=["x", "y z w v"], padding=True, return_tensors="pt"),
    dict(text=["a b c", "d"], text_target=["x", "y z w v"], truncation=True, max_length=3),
    dict(text=["a b c", "d"], text_target=["x", "y z w v"], truncation=True, max_length=5, max_target_length=2),
    dict(text="q", text_pair="context", text_target="answer", text_pair_target="more"),
    dict(text="Hello", tokenizer_kwargs={"add_special_tokens": False}),
    dict(text="Hello", tokenizer_kwargs={"return_tensors": "np", "return_length": True}),
    dict(),
]


@pytest.mark.parametrize("kwargs", TARGET_CASES, ids=lambda kwargs: ",".join(sorted(kwargs)) or "nothing")
def test_text_target_and_tokenizer_kwargs(llama31_with_pad_token, kwargs):
    """`tokenizer(text, text_target=...)` gives "labels" (seq2seq-style fine-tuning scripts rely on it)."""
    ours, reference = llama31_with_pad_token
    assert outcome(ours, **kwargs) == outcome(reference, **kwargs)


@pytest.mark.parametrize("name", ["max_len_single_sentence", "max_len_sentences_pair", "model_max_length"])
def test_length_attributes(llama31, name):
    ours, reference = llama31
    assert getattr(ours, name) == getattr(reference, name)


def test_decoder_is_the_backends(llama31):
    ours, reference = llama31
    assert type(ours.decoder) is type(reference.decoder)
    assert ours.decoder.decode(["Hello", "Ġworld"]) == reference.decoder.decode(["Hello", "Ġworld"])


# A chat template that marks the assistant's text with {% generation %} (as TRL's SFT templates do).
GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MASK_CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, of course."},
]
MASK_CASES = [
    dict(conversation=MASK_CHAT),
    dict(conversation=MASK_CHAT, return_tensors="pt"),
    dict(conversation=[MASK_CHAT, MASK_CHAT[:2]], padding=True, return_tensors="pt"),
    dict(conversation=[MASK_CHAT, MASK_CHAT[:2]]),
    dict(conversation=MASK_CHAT, truncation=True, max_length=20),
    dict(conversation=MASK_CHAT, truncation=True, max_length=8),
    dict(conversation=MASK_CHAT, chat_template=None),  # the Llama 3.1 template: no generation blocks, all zeros
    dict(conversation=MASK_CHAT, return_dict=False),
    dict(conversation=MASK_CHAT[:2], continue_final_message=True),
]


@pytest.mark.parametrize("case", MASK_CASES, ids=lambda case: ",".join(f"{k}" for k in case if k != "conversation"))
def test_return_assistant_tokens_mask(llama31_with_pad_token, case):
    """`assistant_masks` marks the tokens of the template's generation blocks (for assistant-only losses)."""
    ours, reference = llama31_with_pad_token
    kwargs = {"chat_template": GENERATION_TEMPLATE, "date_string": "26 Jul 2024", **case}
    conversation = kwargs.pop("conversation")
    expected = outcome(reference.apply_chat_template, conversation, return_assistant_tokens_mask=True, **kwargs)
    got = outcome(ours.apply_chat_template, conversation, return_assistant_tokens_mask=True, **kwargs)
    assert got == expected
