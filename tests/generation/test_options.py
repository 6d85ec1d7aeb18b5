"""Every logits-processing option and the length rules of generate(), against transformers' generate().

Each option is checked for tokens and for the processed scores (output_scores), and each check also
asserts that the option changed something, so a processor that silently does nothing fails.
"""

from __future__ import annotations

import logging

import pytest
import torch

import herd
from tests.conftest import left_padded_prompts, reference_llama, save_reference

PAD = 0
VOCAB = 256
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = reference_llama(**SMALL, max_position_embeddings=128, seed=7)
    folder = save_reference(reference, tmp_path_factory.mktemp("options") / "ckpt")
    return reference, herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


def _prompts(lengths=(9, 5, 2), seed=0):
    """Left-padded prompts, a different amount of padding per row."""
    return left_padded_prompts(lengths, VOCAB, seed, PAD)


def _run(model, ids, mask, seed, kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(ids, attention_mask=mask, pad_token_id=PAD, return_dict_in_generate=True,
                          output_scores=True, **kwargs)


def _same_scores(got, expected, atol=1e-5):
    """Equal -inf patterns and close finite values, step by step."""
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected):
        assert torch.equal(torch.isfinite(mine), torch.isfinite(theirs))
        finite = torch.isfinite(theirs)
        assert (mine[finite] - theirs[finite]).abs().max().item() < atol


def _compare(pair, ids, mask, seed=None, **kwargs):
    reference, ours = pair
    expected = _run(reference, ids, mask, seed, kwargs)
    got = _run(ours, ids, mask, seed, kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    _same_scores(got.scores, expected.scores)
    return got


def _changes_something(pair, ids, mask, got, seed, option, mode):
    """The option must change the tokens or the scores, else the comparison proves nothing."""
    without = _run(pair[1], ids, mask, seed, mode)
    if not torch.equal(without.sequences, got.sequences):
        return
    assert any(not torch.equal(a, b) for a, b in zip(without.scores, got.scores)), f"{option} changed nothing"


def _without(kwargs, option):
    """kwargs less the option under test (named by the case, up to a suffix)."""
    return {key: value for key, value in kwargs.items() if not option.startswith(key)}


@pytest.fixture(scope="module")
def free_tokens(pair):
    """What the reference generates greedily with no option: the tokens the options below target."""
    ids, mask = _prompts()
    return pair[0].generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=8)[:, ids.shape[1] :].tolist()


# option name -> kwargs built from the free greedy tokens `new` (batch, 8)
OPTIONS = {
    "no_repeat_ngram_size": lambda new: dict(no_repeat_ngram_size=2),
    "bad_words_ids": lambda new: dict(bad_words_ids=[[new[0][0]], [new[1][1], new[1][2]]], eos_token_id=[new[2][5]]),
    "sequence_bias": lambda new: dict(sequence_bias={(new[0][0],): -4.0, (new[1][1], new[1][2]): -10.0, (new[2][0],): 2.5}),
    "sequence_bias_list_form": lambda new: dict(sequence_bias=[[[new[0][0]], -4.0], [[new[1][1], new[1][2]], -10.0]]),
    "forced_eos_token_id": lambda new: dict(forced_eos_token_id=[5, 6]),
    "remove_invalid_values": lambda new: dict(remove_invalid_values=True, bad_words_ids=[[new[0][0]]]),
    "exponential_decay_length_penalty": lambda new: dict(exponential_decay_length_penalty=(2, 1.6), eos_token_id=[17, 42]),
    "suppress_tokens": lambda new: dict(suppress_tokens=[new[0][0], new[1][0]]),
    "begin_suppress_tokens": lambda new: dict(begin_suppress_tokens=[new[0][0], new[2][0]]),
    "renormalize_logits": lambda new: dict(renormalize_logits=True, suppress_tokens=[new[0][0]]),
    "repetition_penalty": lambda new: dict(repetition_penalty=1.8),
    "encoder_repetition_penalty": lambda new: dict(encoder_repetition_penalty=3.0),
    "encoder_no_repeat_ngram_size": lambda new: dict(encoder_no_repeat_ngram_size=1),
    "min_length": lambda new: dict(min_length=14, eos_token_id=[new[0][1], new[1][1], new[2][1]]),
}
SAMPLING_OPTIONS = {
    "typical_p": dict(typical_p=0.6, top_k=0),
    "epsilon_cutoff": dict(epsilon_cutoff=0.01, temperature=0.5, top_k=0),
    "eta_cutoff": dict(eta_cutoff=0.05, temperature=0.2, top_k=0),
    "top_h": dict(top_h=0.4, top_k=0),
    "min_p": dict(min_p=0.5, temperature=0.5, top_k=0),
    "renormalize_logits": dict(renormalize_logits=True, top_k=20),
    # -inf from min_new_tokens (before it in the order) becomes the float32 minimum (top_k would
    # filter that again)
    "remove_invalid_values": dict(remove_invalid_values=True, min_new_tokens=4, eos_token_id=[1, 2], top_k=0),
    "typical_p_with_top_p_and_min_p": dict(typical_p=0.8, top_p=0.9, min_p=0.05, temperature=0.7),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("search", ["greedy", "beams", "sampling"])
def test_option_matches_reference(pair, free_tokens, option, search):
    if option == "encoder_repetition_penalty" and search == "beams":
        pytest.skip("transformers 5.17 applies it to the first batch-size beam rows only (its prompt ids are not "
                    "expanded per beam); herd rewards each beam's prompt: test_prompt_reward_reaches_every_beam")
    # left padding under repetition_penalty: test_repetition_penalty_does_not_count_left_padding
    ids, mask = _prompts((9, 9, 9)) if option == "repetition_penalty" else _prompts()
    mode = {"greedy": {}, "beams": dict(num_beams=3), "sampling": dict(do_sample=True, top_k=0)}[search]
    mode = dict(mode, max_new_tokens=8)
    seed = 13 if search == "sampling" else None
    kwargs = OPTIONS[option](free_tokens)
    got = _compare(pair, ids, mask, seed=seed, **mode, **kwargs)
    _changes_something(pair, ids, mask, got, seed, option, {**mode, **_without(kwargs, option)})


@pytest.mark.parametrize("option", sorted(SAMPLING_OPTIONS))
def test_sampling_option_matches_reference(pair, option):
    ids, mask = _prompts()
    kwargs = SAMPLING_OPTIONS[option]
    got = _compare(pair, ids, mask, seed=21, do_sample=True, max_new_tokens=8, **kwargs)
    _changes_something(pair, ids, mask, got, 21, option, dict(do_sample=True, max_new_tokens=8, **_without(kwargs, option)))


def test_sampling_options_with_beam_sampling(pair):
    ids, mask = _prompts()
    _compare(pair, ids, mask, seed=5, do_sample=True, num_beams=2, max_new_tokens=6, typical_p=0.7, epsilon_cutoff=0.002,
             eos_token_id=[3, 4])


def test_forced_bos_and_begin_suppress_after_a_one_token_prompt(pair):
    ids, mask = torch.tensor([[17], [99]]), torch.ones(2, 1, dtype=torch.long)
    for search in ({}, dict(num_beams=2)):
        got = _compare(pair, ids, mask, max_new_tokens=5, forced_bos_token_id=9, begin_suppress_tokens=[1, 2, 3], **search)
        assert got.sequences[:, 1].tolist() == [9, 9]
        # With a forced bos after a one-token prompt, the suppression moves to the second new token.
        assert torch.isinf(got.scores[1][:, [1, 2, 3]]).all() and torch.isfinite(got.scores[0][:, 9]).all()


def test_combined_options_keep_the_reference_order(pair, free_tokens):
    """Bias, penalty, bans, lengths and warpers together: any change of order changes the scores.
    (Unpadded rows: the pinned reference also penalises left padding, which herd does not.)"""
    ids, mask = _prompts((9, 9, 9))
    new = free_tokens
    _compare(pair, ids, mask, seed=2, do_sample=True, max_new_tokens=8, sequence_bias={(new[0][0],): 3.0},
             repetition_penalty=1.4, no_repeat_ngram_size=3, min_new_tokens=2, eos_token_id=[new[1][2]],
             exponential_decay_length_penalty=(1, 1.3), suppress_tokens=[new[2][0]], temperature=0.8, top_k=40,
             typical_p=0.9, renormalize_logits=True)


# --- repetition_penalty and left padding -----------------------------------------------------

@pytest.mark.parametrize("mode", [{}, dict(num_beams=3)])
def test_repetition_penalty_does_not_count_left_padding(pair, mode):
    """Each left-padded row gets what the reference gives that row alone: its leading pads are not
    part of its sequence (transformers skips them from 5.23 on; 5.17, pinned here, penalised the pad
    token too, so the oracle is the row without its padding)."""
    reference, ours = pair
    ids, mask = _prompts((9, 5, 2))  # 0, 4 and 7 pads
    kwargs = dict(max_new_tokens=10, repetition_penalty=2.0, **mode)
    batch = _run(ours, ids, mask, None, kwargs)
    for row in range(ids.shape[0]):
        alone = ids[row : row + 1, mask[row].bool()]
        expected = _run(reference, alone, torch.ones_like(alone), None, kwargs)
        new = expected.sequences[0, alone.shape[1] :]
        got = batch.sequences[row, ids.shape[1] :]
        assert torch.equal(got[: len(new)], new)
        assert bool((got[len(new) :] == PAD).all())  # the batch ran on after this row stopped
        if not mode:
            _same_scores([step[row : row + 1] for step in batch.scores[: len(new)]], expected.scores)


def test_repetition_penalty_processor_skips_each_rows_leading_padding():
    from herd.generation.logits_process import repetition_penalty

    scores = torch.randn(2, 10)
    ids = torch.tensor([[3, 5, 3, 7], [0, 0, 6, 0]])  # row 1: two pads (id 0), then 6, then a real token 0
    got = repetition_penalty(2.0, torch.tensor([0, 2]))(ids, scores)
    for row, real in ((0, [3, 5, 7]), (1, [6, 0])):
        expected = scores[row].clone()
        expected[real] = torch.where(expected[real] < 0, expected[real] * 2.0, expected[real] / 2.0)
        assert torch.equal(got[row], expected)
    plain = repetition_penalty(2.0)(ids[:1], scores[:1])  # no padding: the reference's gather/scatter
    assert torch.equal(plain, got[:1])


# --- lengths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt_length", [5, 19, 30])
@pytest.mark.parametrize("mode", [{}, dict(num_beams=2)])
def test_no_max_set_means_twenty_new_tokens(pair, prompt_length, mode):
    ids, mask = _prompts((prompt_length,), seed=prompt_length)
    got = _compare(pair, ids, mask, **mode)
    assert got.sequences.shape[1] == prompt_length + 20


def test_default_length_is_capped_at_the_context(tmp_path):
    reference = reference_llama(**SMALL, max_position_embeddings=32, seed=3)
    ours = herd.LlamaForCausalLM.from_pretrained(save_reference(reference, tmp_path / "short"), progress=False)
    ids, mask = _prompts((19,))
    got = _compare((reference, ours), ids, mask)
    assert got.sequences.shape[1] == 32


def test_a_max_length_someone_set_is_the_total(pair):
    reference, ours = pair
    ids, mask = _prompts((5,))
    assert _compare(pair, ids, mask, max_length=12).sequences.shape[1] == 12
    import transformers

    expected = reference.generate(ids, attention_mask=mask, generation_config=transformers.GenerationConfig(max_length=9))
    got = ours.generate(ids, attention_mask=mask, generation_config=herd.GenerationConfig(max_length=9))
    assert torch.equal(got, expected) and got.shape[1] == 9
    saved = reference.generation_config.max_length, ours.generation_config.max_length
    try:
        reference.generation_config.max_length = ours.generation_config.max_length = 11
        assert _compare(pair, ids, mask).sequences.shape[1] == 11
    finally:
        reference.generation_config.max_length, ours.generation_config.max_length = saved


def test_min_new_tokens_wins_over_min_length_with_a_warning(pair, free_tokens, caplog):
    ids, mask = _prompts()
    eos = sorted({row[1] for row in free_tokens})  # every row would stop at its second new token
    with caplog.at_level(logging.WARNING, logger="herd"):
        got = _compare(pair, ids, mask, max_new_tokens=10, min_new_tokens=3, min_length=30, eos_token_id=eos)
    assert "min_new_tokens" in caplog.text and "precedence" in caplog.text
    # min_length=30 would still ban eos at the fourth new token; min_new_tokens=3 does not.
    assert torch.isfinite(got.scores[3][:, eos]).all() and torch.isinf(got.scores[2][:, eos]).all()


def test_prompt_reward_reaches_every_beam(pair):
    """encoder_repetition_penalty under beam search: every beam of a row sees its own prompt rewarded."""
    from herd.generation.logits_process import prompt_repetition_reward

    prompt = torch.tensor([[3, 4], [5, 6]]).repeat_interleave(2, dim=0)  # 2 rows x 2 beams
    scores = torch.randn(4, 10)
    got = prompt_repetition_reward(2.0, prompt)(prompt, scores)
    for row in range(4):
        expected = scores[row].clone()
        ids = prompt[row]
        expected[ids] = torch.where(expected[ids] < 0, expected[ids] * 0.5, expected[ids] / 0.5)
        assert torch.equal(got[row], expected)


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("search", ["greedy", "sampling"])
def test_guidance_scale_matches_reference(pair, negative, search):
    """Classifier-free guidance against an unconditional run (from the last prompt token, or from a
    negative prompt), first in the processor order: tokens and scores equal."""
    ids, mask = _prompts((9, 9, 9))
    kwargs = dict(max_new_tokens=6, guidance_scale=1.5)
    if negative:
        kwargs.update(negative_prompt_ids=torch.tensor([[7, 8], [9, 10], [11, 12]]),
                      negative_prompt_attention_mask=torch.ones(3, 2, dtype=torch.long))
    if search == "sampling":
        kwargs.update(do_sample=True, top_k=0)
    got = _compare(pair, ids, mask, seed=5 if search == "sampling" else None, **kwargs)
    plain = _run(pair[1], ids, mask, 5 if search == "sampling" else None, dict(max_new_tokens=6, do_sample=search == "sampling", top_k=0) if search == "sampling" else dict(max_new_tokens=6))
    assert any(not torch.equal(a, b) for a, b in zip(got.scores, plain.scores))  # guidance changed the scores
