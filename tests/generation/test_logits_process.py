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


def test_top_p_by_hand():
    # probabilities 0.5, 0.3, 0.2: top_p=0.7 keeps the first two
    scores = torch.tensor([[0.5, 0.3, 0.2]]).log()
    kept = lp.top_p(0.7)(None, scores)
    assert torch.isfinite(kept).tolist() == [[True, True, False]]


def test_processor_order_and_selection():
    config = GenerationConfig(do_sample=True, temperature=0.5, top_k=3, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                              min_new_tokens=2).merged_with(None)
    processors = lp.build_logits_processors(config, torch.tensor([1]), prompt_length=4)
    names = [p.__qualname__.split(".")[0] for p in processors]
    assert names == ["repetition_penalty", "suppress_eos_before", "temperature", "top_k", "top_p", "min_p"]
    greedy = GenerationConfig().merged_with(None)
    assert lp.build_logits_processors(greedy, torch.tensor([1]), 4) == []
