"""Differential fuzz of generate(): herd.LlamaForCausalLM against transformers, token for token, score for score."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import NO_SHRINK
from tests.fuzz._diff import PAD, assert_close, assert_scores_close, left_padded, llama_configs, model_pair, seeds

# a smaller space than the forward fuzz: generation settings are what varies here
GEN_CONFIGS = llama_configs(vocab=(32, 64))


@st.composite
def generation_kwargs(draw, repetition=True):
    mode = draw(st.sampled_from(["greedy", "sample", "beam", "beam_sample"]))
    max_new = draw(st.integers(1, 8))
    kwargs = dict(max_new_tokens=max_new, do_sample=mode in ("sample", "beam_sample"))
    if mode in ("beam", "beam_sample"):
        beams = draw(st.integers(2, 4))
        kwargs.update(num_beams=beams, length_penalty=draw(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0])),
                      early_stopping=draw(st.sampled_from([True, False, "never"])),
                      num_return_sequences=draw(st.integers(1, beams)))
    elif mode == "sample":
        kwargs["num_return_sequences"] = draw(st.integers(1, 3))
    if kwargs["do_sample"]:
        kwargs.update(temperature=draw(st.sampled_from([0.5, 1.0, 1.5])), top_k=draw(st.sampled_from([0, 5, 20])),
                      top_p=draw(st.sampled_from([1.0, 0.9, 0.5])))
        min_p = draw(st.sampled_from([None, 0.05, 0.2]))
        if min_p is not None:
            kwargs["min_p"] = min_p
    if repetition and draw(st.booleans()):
        kwargs["repetition_penalty"] = draw(st.sampled_from([0.8, 1.3, 2.0]))
    if draw(st.booleans()):
        kwargs["min_new_tokens"] = draw(st.integers(0, max_new))
    kwargs["eos"] = draw(st.sampled_from(["none", "default", "produced", "list"]))
    kwargs["scores"] = draw(st.booleans())
    return kwargs


def _generate_both(pair, ids, mask, kwargs, seed, data):
    kwargs = dict(kwargs)
    eos, scores = kwargs.pop("eos"), kwargs.pop("scores")
    if eos == "none":
        kwargs["eos_token_id"] = None
    elif eos in ("produced", "list"):
        # an eos the model does produce, so that rows and beams finish early
        free = pair.ours.generate(ids, attention_mask=mask, max_new_tokens=kwargs["max_new_tokens"], do_sample=False,
                                  pad_token_id=PAD, eos_token_id=None)
        new = free[:, ids.shape[1]:].flatten()
        produced = int(new[data.draw(st.integers(0, new.numel() - 1), label="eos index")])
        kwargs["eos_token_id"] = produced if eos == "produced" else [produced, data.draw(st.integers(3, 31), label="eos 2")]
    if scores:
        kwargs.update(return_dict_in_generate=True, output_scores=True, output_logits=True)
    outputs = []
    for model in (pair.fresh_reference(), pair.ours):
        torch.manual_seed(seed)
        outputs.append(model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kwargs))
    expected, got = outputs
    if not scores:
        assert got.shape == expected.shape and torch.equal(got, expected), f"\n{got}\n!=\n{expected}"
        return
    assert got.sequences.shape == expected.sequences.shape and torch.equal(got.sequences, expected.sequences), \
        f"\n{got.sequences}\n!=\n{expected.sequences}"
    assert_scores_close(got.scores, expected.scores)
    assert_scores_close(got.logits, expected.logits, what="logits")
    if kwargs.get("num_beams", 1) > 1:
        assert_close(got.sequences_scores, expected.sequences_scores, what="sequences_scores")
        assert torch.equal(got.beam_indices, expected.beam_indices)


@given(config=GEN_CONFIGS, seed=seeds(), attn=st.sampled_from(["sdpa", "eager"]), data=st.data())
def test_generate_left_padded(config, seed, attn, data):
    """Greedy, sampling, beams (+ sampling) on left-padded batches; repetition_penalty only on unpadded batches."""
    ids, mask = data.draw(left_padded(config["vocab_size"], max_len=10), label="prompts")
    padded = bool((mask == 0).any())
    kwargs = data.draw(generation_kwargs(repetition=not padded), label="generate kwargs")
    with model_pair("llama", config, seed=seed, attn=attn) as pair:
        _generate_both(pair, ids, mask, kwargs, data.draw(seeds(), label="sampling seed"), data)


# issue 19 item 1
@settings(phases=NO_SHRINK)
@given(config=GEN_CONFIGS, seed=seeds(), data=st.data())
def test_repetition_penalty_on_left_padded_rows(config, seed, data):
    """Each left-padded row gets, greedily, what the reference gives that row alone: its leading pads
    are not part of it (transformers skips them from 5.23 on; 5.17, the oracle here, penalised the
    pad token too, so the oracle is the row without its padding)."""
    ids, mask = data.draw(left_padded(config["vocab_size"], max_len=10, padded=True, max_batch=3), label="prompts")
    # strong penalties, so that whether the pad tokens count as seen changes the tokens
    penalty = data.draw(st.sampled_from([0.05, 0.5, 1.5, 20.0]), label="repetition_penalty")
    kwargs = dict(max_new_tokens=6, do_sample=False, repetition_penalty=penalty, pad_token_id=PAD, eos_token_id=None)
    with model_pair("llama", config, seed=seed) as pair:
        got = pair.ours.generate(ids, attention_mask=mask, **kwargs)
        reference = pair.fresh_reference()
        for row in range(ids.shape[0]):
            alone = ids[row : row + 1, mask[row].bool()]
            expected = reference.generate(alone, attention_mask=torch.ones_like(alone), **kwargs)
            assert torch.equal(got[row, ids.shape[1] :], expected[0, alone.shape[1] :]), row


# issue 19 item 2
@settings(phases=NO_SHRINK)
@given(config=GEN_CONFIGS, seed=seeds(), data=st.data())
def test_default_generation_length(config, seed, data):
    ids, mask = data.draw(left_padded(config["vocab_size"], max_len=10), label="prompts")
    with model_pair("llama", config, seed=seed) as pair:
        expected = pair.fresh_reference().generate(ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=None)
        got = pair.ours.generate(ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=None)
    assert got.shape == expected.shape and torch.equal(got, expected)


# issue 19 item 3
@settings(phases=NO_SHRINK)
@given(config=GEN_CONFIGS, seed=seeds(), data=st.data())
def test_min_new_tokens_with_min_length(config, seed, data):
    ids, mask = data.draw(left_padded(config["vocab_size"], max_len=8, padded=False), label="prompts")
    kwargs = data.draw(generation_kwargs(repetition=False), label="generate kwargs")
    kwargs["max_new_tokens"] = 8
    kwargs["min_new_tokens"] = data.draw(st.integers(0, 8), label="min_new_tokens")
    kwargs["min_length"] = data.draw(st.integers(0, ids.shape[1] + 8), label="min_length")
    with model_pair("llama", config, seed=seed) as pair:
        _generate_both(pair, ids, mask, kwargs, data.draw(seeds(), label="sampling seed"), data)


# issue 19 item 4
@settings(phases=NO_SHRINK)
@given(config=GEN_CONFIGS, seed=seeds(), data=st.data())
def test_generate_without_cache(config, seed, data):
    ids, mask = data.draw(left_padded(config["vocab_size"], max_len=8), label="prompts")
    kwargs = data.draw(generation_kwargs(repetition=False), label="generate kwargs")
    kwargs["use_cache"] = False
    with model_pair("llama", config, seed=seed) as pair:
        _generate_both(pair, ids, mask, kwargs, data.draw(seeds(), label="sampling seed"), data)
        reference = pair.fresh_reference()
        with torch.no_grad():
            expected, got = (m(ids, attention_mask=mask, use_cache=False) for m in (reference, pair.ours))
            dict_kwargs = dict(max_new_tokens=3, pad_token_id=PAD, use_cache=False, return_dict_in_generate=True)
            expected_dict, got_dict = (m.generate(ids, attention_mask=mask, **dict_kwargs) for m in (reference, pair.ours))
    real = mask.bool()
    assert_close(got.logits[real], expected.logits[real])
    assert (got.past_key_values is None) == (expected.past_key_values is None), "forward(use_cache=False) cache"
    assert torch.equal(got_dict.sequences, expected_dict.sequences)
    assert (got_dict.past_key_values is None) == (expected_dict.past_key_values is None), "generate(use_cache=False) cache"


ONCE_REFUSED_OPTIONS = st.sampled_from([
    dict(no_repeat_ngram_size=2), dict(bad_words_ids=[[5], [7, 8]]), dict(typical_p=0.8, do_sample=True),
    dict(epsilon_cutoff=3e-4, do_sample=True), dict(eta_cutoff=1e-3, do_sample=True),
    dict(encoder_repetition_penalty=1.2), dict(suppress_tokens=[5, 6]), dict(begin_suppress_tokens=[5]),
    dict(forced_eos_token_id=2), dict(encoder_no_repeat_ngram_size=2),
])


# issue 19 item 5
@settings(phases=NO_SHRINK)
@given(config=GEN_CONFIGS, seed=seeds(), option=ONCE_REFUSED_OPTIONS, data=st.data())
def test_generation_options_herd_once_refused(config, seed, option, data):
    ids, mask = data.draw(left_padded(config["vocab_size"], max_len=8, padded=False), label="prompts")
    kwargs = dict(max_new_tokens=6, eos="none", scores=False, **option)
    kwargs.setdefault("do_sample", False)
    with model_pair("llama", config, seed=seed) as pair:
        _generate_both(pair, ids, mask, kwargs, data.draw(seeds(), label="sampling seed"), data)
