"""generate() against transformers where a differential audit found differences: per-step attentions and
hidden states of greedy decoding, beam_indices' dtype, top_k=None in the call, inputs_embeds, and where
the user's logits processors go among generate()'s own."""

from __future__ import annotations

import pytest
import torch

import herd
from tests.conftest import left_padded_prompts, reference_llama, save_reference

PAD = 0
VOCAB = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    reference = reference_llama(vocab_size=VOCAB, max_position_embeddings=128, seed=7)
    return save_reference(reference, tmp_path_factory.mktemp("inputs_outputs") / "ckpt")


def _reference(checkpoint):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def pair(checkpoint):
    """(transformers model, herd model), both with eager attention (transformers' sdpa returns no attentions)."""
    return _reference(checkpoint), herd.LlamaForCausalLM.from_pretrained(checkpoint, progress=False, attn_implementation="eager")


def _prompts():
    return left_padded_prompts((9, 5, 2), VOCAB, 0, PAD)


def _both(pair, seed=0, **kwargs):
    outputs = []
    for model in pair:
        torch.manual_seed(seed)
        outputs.append(model.generate(pad_token_id=PAD, **kwargs))
    return outputs


def _flat(nested):
    return [t for step in nested for t in step]


def _same_tensors(got, expected, what):
    assert len(got) == len(expected), what
    for mine, theirs in zip(got, expected):
        assert mine.shape == theirs.shape, what
        assert torch.equal(torch.isfinite(mine), torch.isfinite(theirs)), what
        finite = torch.isfinite(theirs)
        assert (mine[finite] - theirs[finite]).abs().max().item() < 1e-4, what


@pytest.mark.parametrize("mode", [{}, dict(num_beams=2)])
def test_every_steps_attentions_and_hidden_states_as_in_transformers(pair, mode):
    """Greedy decoding without output_scores once ran its steps in blocks that keep no model outputs:
    only the prompt's attentions and hidden states came back."""
    ids, mask = _prompts()
    expected, got = _both(pair, input_ids=ids, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True,
                          output_attentions=True, output_hidden_states=True, **mode)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.attentions) == len(got.hidden_states) == 4
    for name in ("attentions", "hidden_states"):
        assert [len(step) for step in getattr(got, name)] == [len(step) for step in getattr(expected, name)], name
        _same_tensors(_flat(getattr(got, name)), _flat(getattr(expected, name)), name)
    if mode:
        assert got.beam_indices.dtype == expected.beam_indices.dtype == torch.int32
        assert torch.equal(got.beam_indices, expected.beam_indices)


def test_top_k_none_in_the_call_turns_top_k_off(pair):
    """top_k=None passed to generate() is no top-k filtering, as in transformers, not the default 50."""
    ids, mask = _prompts()
    kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=3, return_dict_in_generate=True,
                  output_scores=True)
    expected, got = _both(pair, seed=4, top_k=None, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    _same_tensors(got.scores, expected.scores, "scores")
    assert all(bool(torch.isfinite(step).all()) for step in got.scores)  # nothing filtered
    default = pair[1].generate(pad_token_id=PAD, **kwargs)
    assert all(int(torch.isfinite(step).sum(dim=-1).max()) == 50 for step in default.scores)  # top_k 50 by default


def _embeds(pair, ids):
    return pair[0].get_input_embeddings()(ids).detach()


EMBEDS_CASES = {
    "greedy": dict(max_new_tokens=6),
    "sampling": dict(max_new_tokens=5, do_sample=True, num_return_sequences=2, top_k=0),
    "beams": dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, eos_token_id="produced",
                  return_dict_in_generate=True, output_scores=True),
    "penalties": dict(max_new_tokens=6, repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=3,
                      eos_token_id="produced"),
    # a max_length / min_length someone set counts the embeddings' positions too
    "max_and_min_length": dict(max_length=16, min_length=13, eos_token_id="produced"),
    "static_cache_no_mask": dict(max_new_tokens=4, cache_implementation="static", attention_mask=None),
    "with_input_ids": dict(max_new_tokens=4, ids=True, repetition_penalty=1.5),
    "with_fewer_input_ids": dict(max_length=15, min_length=14, ids=3, eos_token_id="produced"),
    # no prompt ids: begin_suppress_tokens wait for the forced bos (at the second new token), as after one id
    "begin_suppress_with_forced_bos": dict(max_new_tokens=3, begin_suppress_tokens="first", forced_bos_token_id=5,
                                           return_dict_in_generate=True, output_scores=True),
}


@pytest.mark.parametrize("case", sorted(EMBEDS_CASES))
def test_inputs_embeds_match_transformers(pair, case):
    """generate(inputs_embeds=...): the prompt as embeddings (without input_ids the output holds only
    the new tokens), the tokens after it as ids, the lengths counted as transformers counts them."""
    ids, mask = _prompts()
    kwargs = dict(EMBEDS_CASES[case])
    kwargs.setdefault("attention_mask", mask)
    if kwargs.get("eos_token_id") == "produced":  # an eos the model does produce, so that rows finish early
        free = pair[0].generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=6, eos_token_id=None)
        kwargs["eos_token_id"] = [int(free[1, ids.shape[1] + 2]), int(free[2, ids.shape[1] + 3])]
    if kwargs.get("begin_suppress_tokens") == "first":  # the first new token of each row
        first = pair[0].generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=1)[:, -1]
        kwargs["begin_suppress_tokens"] = sorted(set(first.tolist()))
    with_ids = kwargs.pop("ids", False)
    if with_ids:
        kwargs["input_ids"] = ids if with_ids is True else ids[:, -with_ids:]
    if kwargs["attention_mask"] is None:
        del kwargs["attention_mask"]
    expected, got = _both(pair, seed=2, inputs_embeds=_embeds(pair, ids), **kwargs)
    if isinstance(expected, torch.Tensor):
        assert got.shape == expected.shape and torch.equal(got, expected)
        if with_ids:  # the ids, then the new tokens
            assert torch.equal(got[:, : kwargs["input_ids"].shape[1]], kwargs["input_ids"])
        else:  # only the new tokens
            assert got.shape[1] <= 7
        return
    assert torch.equal(got.sequences, expected.sequences)
    _same_tensors(got.scores, expected.scores, "scores")
    if "num_beams" in kwargs:
        assert (got.sequences_scores - expected.sequences_scores).abs().max() < 1e-4
        assert torch.equal(got.beam_indices, expected.beam_indices)


def test_inputs_embeds_continue_from_a_cache_as_in_transformers(pair):
    """A second generate() over the whole embedded conversation, given the first call's cache, runs only
    the embeddings the cache has not seen and gives what a fresh call gives."""
    reference, ours = pair
    ids, mask = _prompts()
    embeds = _embeds(pair, ids)
    firsts = [model.generate(inputs_embeds=embeds, attention_mask=mask, pad_token_id=PAD, max_new_tokens=3,
                             return_dict_in_generate=True) for model in pair]
    assert torch.equal(firsts[1].sequences, firsts[0].sequences)
    longer = torch.cat([embeds, _embeds(pair, firsts[0].sequences)], dim=1)
    longer_mask = torch.cat([mask, torch.ones_like(firsts[0].sequences)], dim=1)
    expected, got = (model.generate(inputs_embeds=longer, attention_mask=longer_mask, past_key_values=first.past_key_values,
                                    pad_token_id=PAD, max_new_tokens=4) for model, first in zip(pair, firsts))
    assert torch.equal(got, expected)
    assert torch.equal(got, ours.generate(inputs_embeds=longer, attention_mask=longer_mask, pad_token_id=PAD,
                                          max_new_tokens=4))


def test_inputs_embeds_errors(pair):
    _, ours = pair
    ids, mask = _prompts()
    embeds = _embeds(pair, ids)
    with pytest.raises(ValueError, match=r"inputs_embeds must be \(batch, seq, hidden\), got \(9, 32\)"):
        ours.generate(inputs_embeds=embeds[0], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask \(3, 8\) must match inputs_embeds' \(batch, seq\) \(3, 9\)"):
        ours.generate(inputs_embeds=embeds, attention_mask=mask[:, 1:], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"max_length \(10\) leaves no new tokens after the prompt's 9 inputs_embeds "
                                         r"positions and 3 input_ids; set max_new_tokens instead"):
        ours.generate(ids[:, -3:], inputs_embeds=embeds, attention_mask=mask, max_length=10)
    with pytest.raises(ValueError, match="needs input_ids .* or inputs_embeds, or a bos_token_id"):
        ours.generate(max_new_tokens=2, bos_token_id=None)  # (with a bos id, generation starts from it)


USER_PROCESSOR_CASES = {
    # a user's processor of a class generate() also makes from its options takes that one's place
    "replaces_repetition_penalty": (lambda lib: [lib.RepetitionPenaltyLogitsProcessor(3.0)], dict(repetition_penalty=1.3)),
    "replaces_min_length": (lambda lib: [lib.MinLengthLogitsProcessor(11, [5, 9])],
                            dict(min_length=14, eos_token_id=[5, 9])),
    # the others run before the sampling warpers ...
    "before_the_warpers": (lambda lib: [lib.TopPLogitsWarper(0.5), lib.TemperatureLogitsWarper(3.0)],
                           dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=0)),
    # ... and before renormalisation
    "before_renormalising": (lambda lib: [lib.SuppressTokensLogitsProcessor([7, 8, 9])],
                             dict(renormalize_logits=True, num_beams=2)),
}


@pytest.mark.parametrize("case", sorted(USER_PROCESSOR_CASES))
def test_user_processors_merge_into_generates_own_as_in_transformers(pair, case):
    import transformers

    ids, mask = _prompts()
    make, options = USER_PROCESSOR_CASES[case]
    outputs = []
    for model, lib in zip(pair, (transformers, herd)):
        torch.manual_seed(5)
        outputs.append(model.generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=5,
                                      logits_processor=lib.LogitsProcessorList(make(lib)), return_dict_in_generate=True,
                                      output_scores=True, **options))
    expected, got = outputs
    assert torch.equal(got.sequences, expected.sequences)
    _same_tensors(got.scores, expected.scores, "scores")


def test_rows_a_users_eos_criteria_ended_are_padded_as_in_transformers(pair):
    """A user's EosTokenCriteria makes eos one of the stopping rules (transformers: a criteria with an
    eos_token_id): a row it ends gets padding afterwards, as with generate(eos_token_id=...)."""
    import transformers

    ids, mask = _prompts()
    free = pair[0].generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=6, eos_token_id=None)
    eos = int(free[1, ids.shape[1] + 2])  # row 1's third new token
    assert eos not in free[0, ids.shape[1]:].tolist()  # (row 0 runs to the end)
    outputs = [model.generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=6, eos_token_id=None,
                              stopping_criteria=lib.StoppingCriteriaList([lib.EosTokenCriteria(eos)]))
               for model, lib in zip(pair, (transformers, herd))]
    expected, got = outputs
    assert torch.equal(got, expected)
    assert got[1, ids.shape[1] + 3 :].tolist() == [PAD] * 3


def test_model_inputs_transformers_accepts_give_its_tokens(pair):
    """labels, logits_to_keep and the mask's own position_ids, which transformers' generate() takes."""
    ids, mask = _prompts()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for extra in (dict(labels=ids), dict(logits_to_keep=1), dict(position_ids=positions)):
        expected, got = _both(pair, input_ids=ids, attention_mask=mask, max_new_tokens=3, **extra)
        assert torch.equal(got, expected), extra
    with pytest.raises(NotImplementedError, match=r"generate\(position_ids=\.\.\.\) other than the attention mask's "
                                                  r"positions .* leave position_ids out"):
        pair[1].generate(ids, attention_mask=mask, position_ids=positions + 1, max_new_tokens=2)


def test_unknown_arguments_are_a_value_error_as_in_transformers_and_name_the_likely_one(pair):
    ids, mask = _prompts()
    with pytest.raises(ValueError, match=r"does not know: max_new_token \(did you mean max_new_tokens\?\)$"):
        pair[1].generate(ids, attention_mask=mask, max_new_token=2)
    with pytest.raises(TypeError, match=r"does not know: colour, temprature \(did you mean temperature\?\)$"):
        pair[1].generate(ids, attention_mask=mask, colour="red", temprature=0.5)
    with pytest.raises(ValueError):  # (transformers' own error for the same call)
        pair[0].generate(ids, attention_mask=mask, max_new_token=2)


@pytest.mark.parametrize("mode", [dict(do_sample=True, num_return_sequences=2), dict(num_beams=2)])
def test_min_new_tokens_beyond_the_length_limit_runs_as_in_transformers(pair, mode, caplog):
    """transformers warns ("Unfeasible length constraints") and generates to the limit, eos suppressed."""
    ids, mask = _prompts()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=3, eos_token_id=[5, 9],
                  return_dict_in_generate=True, output_scores=True, **mode)
    with caplog.at_level("WARNING", logger="herd"):
        expected, got = _both(pair, seed=3, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    _same_tensors(got.scores, expected.scores, "scores")
    assert all(bool(torch.isneginf(step[:, [5, 9]]).all()) for step in got.scores)
    assert "min_new_tokens (3) exceeds the 2 new tokens the length limit allows" in caplog.text


@pytest.mark.parametrize("normalize_logits", [False, True])
@pytest.mark.parametrize("mode", [dict(do_sample=True, num_return_sequences=2, top_k=10), dict(num_beams=3, num_return_sequences=2)])
def test_compute_transition_scores_as_in_transformers(pair, mode, normalize_logits):
    """Each chosen token's score, per step; after beam search through beam_indices, 0 once a beam is done."""
    ids, mask = _prompts()
    free = pair[0].generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=6, eos_token_id=None)
    eos = [int(free[1, ids.shape[1] + 1]), int(free[2, ids.shape[1] + 3])]  # so that beams end at different steps
    expected, got = _both(pair, seed=6, input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos,
                          return_dict_in_generate=True, output_scores=True, **mode)
    assert torch.equal(got.sequences, expected.sequences)
    transitions = [model.compute_transition_scores(out.sequences, out.scores, out.get("beam_indices"),
                                                   normalize_logits=normalize_logits)
                   for model, out in zip(pair, (expected, got))]
    assert transitions[1].shape == transitions[0].shape
    _same_tensors([transitions[1]], [transitions[0]], "transition scores")
    if "num_beams" in mode:
        assert (transitions[1] == 0).any()  # a beam that finished early


@pytest.mark.parametrize("mode", [{}, dict(num_beams=2)])
def test_a_static_cache_is_sized_as_in_transformers(pair, checkpoint, mode):
    """max_length - 1 positions (the last token never goes in): the attentions over it, and the cache
    returned, have transformers' shapes. (A fresh reference: transformers reuses a static cache an
    earlier call made when it is large enough.)"""
    ids, mask = _prompts()
    expected, got = _both((_reference(checkpoint), pair[1]), input_ids=ids, attention_mask=mask, max_new_tokens=3, cache_implementation="static",
                          return_dict_in_generate=True, output_attentions=True, **mode)
    assert torch.equal(got.sequences, expected.sequences)
    assert got.past_key_values.get_max_cache_shape() == expected.past_key_values.get_max_cache_shape() == ids.shape[1] + 2
    _same_tensors(_flat(got.attentions), _flat(expected.attentions), "attentions")
