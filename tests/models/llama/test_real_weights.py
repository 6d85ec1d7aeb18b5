"""A real trained Llama-architecture model (SmolLM2-135M-Instruct): what random weights hide."""

from __future__ import annotations

import pytest
import torch

import herd
from tests.conftest import max_abs_diff


@pytest.fixture(scope="module")
def models(smollm2_folder):
    import transformers

    reference = transformers.LlamaForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_folder)
    ours = herd.AutoModelForCausalLM.from_pretrained(smollm2_folder, progress=False)
    return reference, ours, tokenizer


def _chat_ids(tokenizer, question):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def test_config_is_read_like_reference(models):
    reference, ours, _ = models
    assert ours.config.num_key_value_heads == 3 and ours.config.num_attention_heads == 9
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.config.rope_theta == reference.config.rope_parameters["rope_theta"] == 100000.0


def test_logits_match_reference_on_real_weights(models):
    reference, ours, tokenizer = models
    ids = _chat_ids(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        expected, got = reference(ids).logits, ours(ids).logits
    assert max_abs_diff(got, expected) < 1e-4


def test_greedy_decoding_with_cache_answers_like_reference(models):
    reference, ours, tokenizer = models
    ids = _chat_ids(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
        # greedy by hand over herd's cache: prefill, then one token at a time
        out = ours(ids, use_cache=True)
        tokens = []
        for _ in range(12):
            next_id = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(next_id.item())
            out = ours(next_id, past_key_values=out.past_key_values, use_cache=True)
    expected = expected.tolist()  # the reference stops at its eos token
    assert len(expected) >= 6 and tokens[: len(expected)] == expected
    assert "Paris" in tokenizer.decode(tokens)


def test_left_padded_batch_on_real_weights(models):
    reference, ours, tokenizer = models
    questions = ["What is the capital of France?", "Name a color."]
    rows = [_chat_ids(tokenizer, q)[0] for q in questions]
    width = max(len(r) for r in rows)
    ids = torch.full((2, width), tokenizer.pad_token_id or 0)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        expected = reference(ids, attention_mask=mask).logits
        alone = ours(rows[1][None]).logits[0]
    real = mask.bool()
    assert max_abs_diff(got[real], expected[real]) < 1e-4
    assert max_abs_diff(got[1][real[1]], alone) < 1e-4
