"""transformers' helpers users import next to the models: set_seed, StoppingCriteria(List),
LogitsProcessor(List), usable in generate() as in transformers (checked against it)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import herd
from tests.conftest import reference_llama, save_reference

PAD = 0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = reference_llama(vocab_size=64, max_position_embeddings=128)
    folder = save_reference(reference, tmp_path_factory.mktemp("user") / "ckpt")
    return reference, herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


def _prompts():
    ids = torch.tensor([[5, 9, 13, 2, 7], [PAD, PAD, 3, 11, 4]])
    return ids, (ids != PAD).long()


def _processor_classes(base):
    class BanToken(base):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores):
            return scores.masked_fill(torch.arange(scores.shape[-1]) == self.token, -float("inf"))

    return BanToken


def _criteria_classes(base):
    class StopAfter(base):
        """Stops a row once it holds `length` tokens or its last token is `token`."""

        def __init__(self, length, token):
            self.length, self.token = length, token

        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, -1] == self.token) | (input_ids.shape[-1] >= self.length)

    return StopAfter


def test_user_logits_processors_and_stopping_criteria_as_in_transformers(pair):
    import transformers

    reference, ours = pair
    ids, mask = _prompts()
    free = reference.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
                              eos_token_id=None)
    banned, stopper = int(free[0, 5]), int(free[1, 7])  # the first new token of row 0; a token row 1 makes later

    def run(model, lib):
        processors = lib.LogitsProcessorList([_processor_classes(lib.LogitsProcessor)(banned)])
        criteria = lib.StoppingCriteriaList([_criteria_classes(lib.StoppingCriteria)(14, stopper)])
        return model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
                              eos_token_id=None, logits_processor=processors, stopping_criteria=criteria,
                              output_scores=True, return_dict_in_generate=True)

    expected, got = run(reference, transformers), run(ours, herd)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores)
    for mine, theirs in zip(got.scores, expected.scores):
        assert torch.equal(torch.isinf(mine), torch.isinf(theirs))
        finite = torch.isfinite(theirs)
        assert (mine[finite] - theirs[finite]).abs().max() < 1e-5
    assert got.sequences.shape[1] < free.shape[1]  # the criteria stopped generation early
    assert not (got.sequences[0, 5:] == banned).any()  # the processor ran


def test_max_length_criteria_stops_like_max_length(pair):
    _, ours = pair
    ids, mask = _prompts()
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=None,
                        stopping_criteria=herd.StoppingCriteriaList([herd.MaxLengthCriteria(8)]))
    assert got.shape[1] == 8


def test_set_seed_seeds_every_generator_as_transformers_does():
    import transformers

    draws = []
    for seed_with in (transformers.set_seed, herd.set_seed):
        seed_with(1234)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert draws[0] == draws[1]
    herd.set_seed(1234)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws[1]


def test_sampling_after_set_seed_gives_the_reference_tokens(pair):
    reference, ours = pair
    ids, mask = _prompts()
    outputs = []
    for model, seed_with in ((reference, __import__("transformers").set_seed), (ours, herd.set_seed)):
        seed_with(7)
        outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=0,
                                      pad_token_id=PAD, eos_token_id=None))
    assert torch.equal(outputs[0], outputs[1])


def test_encoder_and_guidance_processor_classes_as_in_transformers(pair):
    """EncoderRepetitionPenaltyLogitsProcessor, EncoderNoRepeatNGramLogitsProcessor (its n-grams per
    input row, under beams too) and UnbatchedClassifierFreeGuidanceLogitsProcessor, built by the user and
    passed to generate(), give transformers' tokens and scores (herd did not have these classes)."""
    import transformers

    reference, ours = pair
    ids, mask = _prompts()
    base = dict(attention_mask=mask, pad_token_id=PAD, eos_token_id=None, max_new_tokens=5, return_dict_in_generate=True,
                output_scores=True)

    def build(library, beams):
        rows = ids.repeat_interleave(beams, dim=0)
        return [library.EncoderRepetitionPenaltyLogitsProcessor(1.7, rows),
                library.EncoderNoRepeatNGramLogitsProcessor(2, ids),
                library.UnbatchedClassifierFreeGuidanceLogitsProcessor(1.5, reference if library is transformers else ours)]

    for beams in (1, 2):
        got, expected = (model.generate(ids, num_beams=beams, logits_processor=library.LogitsProcessorList(build(library, beams)),
                                        **base)
                         for model, library in ((ours, herd), (reference, transformers)))
        assert torch.equal(got.sequences, expected.sequences), beams
        for mine, theirs in zip(got.scores, expected.scores):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="strictly positive float"):
        herd.EncoderRepetitionPenaltyLogitsProcessor(1, ids)
    with pytest.raises(ValueError, match="strictly positive integer"):
        herd.EncoderNoRepeatNGramLogitsProcessor(0, ids)
