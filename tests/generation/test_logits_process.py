"""Each logits processor against the reference's processor on the same logits."""

from __future__ import annotations

import pytest
import torch

from herd.generation import GenerationConfig
from herd.generation import logits_process as lp


def _logits(seed=0, batch=3, vocab=50):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=generator) * 3, torch.randint(0, 50, (batch, 7), generator=generator)


@pytest.mark.parametrize("seed", range(3))
def test_each_processor_matches_reference(seed):
    from transformers.generation import logits_process as ref

    scores, ids = _logits(seed)
    cases = [
        (lp.repetition_penalty(1.3), ref.RepetitionPenaltyLogitsProcessor(1.3)),
        (lp.repetition_penalty(0.7), ref.RepetitionPenaltyLogitsProcessor(0.7)),
        (lp.temperature(0.6), ref.TemperatureLogitsWarper(0.6)),
        (lp.top_k(5), ref.TopKLogitsWarper(5)),
        (lp.top_k(80), ref.TopKLogitsWarper(80)),
        (lp.top_p(0.8), ref.TopPLogitsWarper(0.8)),
        (lp.top_p(0.05, min_tokens_to_keep=3), ref.TopPLogitsWarper(0.05, min_tokens_to_keep=3)),
        (lp.min_p(0.1), ref.MinPLogitsWarper(0.1)),
        (lp.min_p(0.9, min_tokens_to_keep=2), ref.MinPLogitsWarper(0.9, min_tokens_to_keep=2)),
        (lp.suppress_eos_before(10, torch.tensor([3, 4])), ref.MinLengthLogitsProcessor(10, [3, 4])),
        (lp.suppress_eos_before(3, torch.tensor([3]), prompt_length=5), ref.MinNewTokensLengthLogitsProcessor(5, 3, 3)),
    ]
    for ours, theirs in cases:
        assert torch.equal(ours(ids, scores.clone()), theirs(ids, scores.clone())), theirs


@pytest.mark.parametrize("seed", range(3))
def test_each_new_processor_matches_reference(seed):
    """The options added for issue 19, on plain logits and on logits that already hold -inf."""
    from transformers.generation import logits_process as ref

    scores, ids = _logits(seed)
    ids[:, -3:] = ids[:, :3]  # a repeated trigram, so n-gram bans have something to ban
    filtered = scores.masked_fill(scores < -2, -float("inf"))
    first, second = int(ids[0, 1]), int(ids[0, 2])
    eos = torch.tensor([first, 7])
    bias = {(first,): -2.0, (first, second): 1.5, (int(ids[1, -1]), 9): -3.0, (second,): 0.5}
    cases = [
        (lp.typical_p(0.7), ref.TypicalLogitsWarper(0.7)),
        (lp.typical_p(0.2, min_tokens_to_keep=4), ref.TypicalLogitsWarper(0.2, min_tokens_to_keep=4)),
        (lp.epsilon_cutoff(0.02), ref.EpsilonLogitsWarper(0.02)),
        (lp.epsilon_cutoff(0.3, min_tokens_to_keep=3), ref.EpsilonLogitsWarper(0.3, min_tokens_to_keep=3)),
        (lp.eta_cutoff(0.05), ref.EtaLogitsWarper(0.05)),
        (lp.eta_cutoff(0.5, min_tokens_to_keep=2), ref.EtaLogitsWarper(0.5, min_tokens_to_keep=2)),
        (lp.top_h(0.4), ref.TopHLogitsWarper(0.4)),
        (lp.top_h(1.0), ref.TopHLogitsWarper(1.0)),
        (lp.no_repeat_ngram(1), ref.NoRepeatNGramLogitsProcessor(1)),
        (lp.no_repeat_ngram(2), ref.NoRepeatNGramLogitsProcessor(2)),
        (lp.no_repeat_ngram(4), ref.NoRepeatNGramLogitsProcessor(4)),
        (lp.sequence_bias(bias), ref.SequenceBiasLogitsProcessor(bias)),
        (lp.bad_words([[first], [second, 3], [7]], eos), ref.NoBadWordsLogitsProcessor([[first], [second, 3], [7]], eos)),
        (lp.force_tokens_at(7, [4, 5]), ref.ForcedEOSTokenLogitsProcessor(8, [4, 5])),
        (lp.force_tokens_at(8, 3), ref.ForcedEOSTokenLogitsProcessor(9, 3)),
        (lp.remove_invalid_values, ref.InfNanRemoveLogitsProcessor()),
        (lp.exponential_decay_length_penalty(2, 1.5, eos, 3), ref.ExponentialDecayLengthPenalty((2, 1.5), eos, 3)),
        (lp.exponential_decay_length_penalty(4, 0.8, eos, 4), ref.ExponentialDecayLengthPenalty((4, 0.8), eos, 4)),
        (lp.suppress_tokens([1, 5, 9]), ref.SuppressTokensLogitsProcessor([1, 5, 9])),
        (lp.suppress_tokens([1, 5], at_length=7), ref.SuppressTokensAtBeginLogitsProcessor([1, 5], 7)),
        (lp.suppress_tokens([1, 5], at_length=6), ref.SuppressTokensAtBeginLogitsProcessor([1, 5], 6)),
        (lp.renormalize, ref.LogitNormalization()),
    ]
    for ours, theirs in cases:
        for logits in (scores, filtered):
            # bit-equal; nan where the reference makes nan too (a decay penalty on an eos already at -inf)
            torch.testing.assert_close(ours(ids, logits.clone()), theirs(ids, logits.clone()), rtol=0, atol=0,
                                       equal_nan=True, msg=lambda m: f"{theirs}: {m}")
    one_token = ids[:, :1]
    assert torch.equal(lp.force_tokens_at(1, 4)(one_token, scores), ref.ForcedBOSTokenLogitsProcessor(4)(one_token, scores))


def test_top_p_by_hand():
    # probabilities 0.5, 0.3, 0.2: top_p=0.7 keeps the first two
    scores = torch.tensor([[0.5, 0.3, 0.2]]).log()
    kept = lp.top_p(0.7)(None, scores)
    assert torch.isfinite(kept).tolist() == [[True, True, False]]


def test_processor_order_and_selection():
    config = GenerationConfig(do_sample=True, temperature=0.5, top_k=3, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                              min_new_tokens=2, min_length=6, sequence_bias={(3,): 1.0}, no_repeat_ngram_size=2,
                              bad_words_ids=[[4]], forced_bos_token_id=1, forced_eos_token_id=2,
                              remove_invalid_values=True, exponential_decay_length_penalty=(1, 1.1),
                              suppress_tokens=[5], begin_suppress_tokens=[6], top_h=0.5, typical_p=0.9,
                              epsilon_cutoff=0.01, eta_cutoff=0.01, renormalize_logits=True).merged_with(None)
    processors = lp.build_logits_processors(config, torch.tensor([1]), prompt_length=4)
    names = [p.__qualname__.split(".")[0] for p in processors]
    # transformers 5.17's _get_logits_processor order
    assert names == ["sequence_bias", "repetition_penalty", "no_repeat_ngram", "sequence_bias", "suppress_eos_before",
                     "suppress_eos_before", "force_tokens_at", "force_tokens_at", "remove_invalid_values",
                     "exponential_decay_length_penalty", "suppress_tokens", "suppress_tokens", "temperature", "top_h",
                     "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "renormalize"]
    greedy = GenerationConfig().merged_with(None)
    assert lp.build_logits_processors(greedy, torch.tensor([1]), 4) == []
    # the fast path's in-graph greedy blocks need an empty list: a min_length the prompt reaches adds nothing
    reached = GenerationConfig(min_length=4, repetition_penalty=1.0, typical_p=0.5).merged_with(None)
    assert lp.build_logits_processors(reached, torch.tensor([1]), 4) == []
