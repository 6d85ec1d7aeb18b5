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


def test_herd_tokenizer_and_generate_answer_like_reference(models, smollm2_folder):
    reference, ours, reference_tokenizer = models
    tokenizer = herd.AutoTokenizer.from_pretrained(smollm2_folder)
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What color is the sky?"}]]
    for chat in chats:
        ours_inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ref_inputs = reference_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        assert torch.equal(ours_inputs["input_ids"], ref_inputs["input_ids"])
        expected = reference.generate(**ref_inputs, max_new_tokens=20, do_sample=False)
        got = ours.generate(**ours_inputs, max_new_tokens=20, do_sample=False)
        assert torch.equal(got, expected)
    answer = tokenizer.decode(got[0, ours_inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() != ""
    first = ours.generate(**tokenizer.apply_chat_template(chats[0], add_generation_prompt=True, return_tensors="pt",
                                                          return_dict=True), max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(first[0])


def test_left_padded_batch_generation_on_real_weights(models, smollm2_folder):
    _, ours, _ = models
    tokenizer = herd.AutoTokenizer.from_pretrained(smollm2_folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    chats = [[{"role": "user", "content": "What is the capital of France?"}], [{"role": "user", "content": "Say hi."}]]
    batch = tokenizer.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True)
    together = ours.generate(**batch, max_new_tokens=10, do_sample=False)
    for row, chat in enumerate(chats):
        alone = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        single = ours.generate(**alone, max_new_tokens=10, do_sample=False)
        new_alone = single[0, alone["input_ids"].shape[1]:].tolist()
        new_batched = together[row, batch["input_ids"].shape[1]:].tolist()[: len(new_alone)]
        assert new_batched == new_alone
