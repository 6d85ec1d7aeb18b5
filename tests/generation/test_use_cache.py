"""generate(use_cache=False): the whole sequence through the model at every step, as transformers
does; it matters for rope types whose frequencies depend on the length (longrope, dynamic) once
the sequence passes the original length."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.decoding.decoders import why_not_fast
from herd.generation import GenerationConfig
from tests.conftest import reference_llama, save_reference

PAD = 0
ROPES = {
    # original_max_position_embeddings 16 (longrope) / max_position_embeddings 16 (dynamic): the
    # 10-token prompts pass it after 7 new tokens.
    "longrope": dict(max_position_embeddings=64, rope_parameters={
        "rope_type": "longrope", "original_max_position_embeddings": 16, "rope_theta": 10000.0,
        "short_factor": [1.0, 1.1, 1.3, 1.7, 1.2, 1.0, 1.4, 1.1], "long_factor": [1.5, 2.0, 3.0, 4.0, 2.5, 1.5, 3.5, 2.0]}),
    "dynamic": dict(max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
}


@pytest.fixture(params=list(ROPES))
def pair(request, tmp_path):
    reference = reference_llama(vocab_size=256, hidden_size=64, intermediate_size=128, seed=3, **ROPES[request.param])
    return reference, herd.LlamaForCausalLM.from_pretrained(save_reference(reference, tmp_path / "ckpt"), progress=False)


def _prompts():
    ids = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = PAD, 0  # a left-padded row
    return ids, mask


@pytest.mark.parametrize("use_cache", [False, True])
def test_tokens_and_scores_match_reference_past_the_original_length(pair, use_cache):
    reference, ours = pair
    ids, mask = _prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=14, pad_token_id=PAD, use_cache=use_cache,
                  return_dict_in_generate=True, output_scores=True)
    expected, got = reference.generate(ids, **kwargs), ours.generate(ids, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == 14
    for step, (ours_step, reference_step) in enumerate(zip(got.scores, expected.scores)):
        torch.testing.assert_close(ours_step, reference_step, rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_without_cache_differs_from_with_cache_past_the_original_length(pair):
    # Without a cache every position is rotated with the current length's frequencies; with one,
    # the keys keep those of the step that made them: the logits part ways.
    _, ours = pair
    ids, mask = _prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=14, pad_token_id=PAD, return_dict_in_generate=True,
                  output_scores=True)
    cached, recomputed = ours.generate(ids, use_cache=True, **kwargs), ours.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached.scores[0], recomputed.scores[0])  # the prompt: same forward
    assert not torch.allclose(cached.scores[-1], recomputed.scores[-1])


def test_beam_search_without_cache_matches_reference(pair):
    reference, ours = pair
    ids, mask = _prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=PAD, use_cache=False, num_beams=3,
                  num_return_sequences=2)
    assert torch.equal(ours.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_use_cache_false_is_a_reason_not_to_take_the_fast_path(pair):
    _, ours = pair
    config = GenerationConfig(use_cache=False).merged_with(None)
    assert "use_cache=False" in why_not_fast(ours, config, past_key_values=None, extra_outputs=False)
    with pytest.raises(ValueError, match="use_cache=False"):
        ours.generate(_prompts()[0], max_new_tokens=2, use_cache=False, past_key_values=herd.DynamicCache(ours.config))
