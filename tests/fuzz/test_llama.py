"""Differential fuzz: herd.LlamaForCausalLM against transformers.LlamaForCausalLM, forwards (float32, CPU)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import NO_SHRINK
from tests.fuzz._diff import (MORE_ACTIVATIONS, assert_close, left_padded, llama_configs, model_pair,
                              seeds)


@given(config=llama_configs(), seed=seeds(), attn=st.sampled_from(["sdpa", "eager"]), data=st.data())
def test_forward_logits_and_loss(config, seed, attn, data):
    """Left padding, explicit position_ids, inputs_embeds, labels: logits of the real positions and the loss."""
    ids, mask = data.draw(left_padded(config["vocab_size"], max_len=36), label="inputs")
    use_mask = bool((mask == 0).any()) or data.draw(st.booleans(), label="explicit full mask")
    positions = data.draw(st.sampled_from(["none", "offset", "from_mask"]), label="position_ids")
    use_embeds = data.draw(st.booleans(), label="inputs_embeds")
    kwargs = {"attention_mask": mask} if use_mask else {}
    if positions == "offset":
        kwargs["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids) + data.draw(st.integers(0, 8), label="offset")
    elif positions == "from_mask":
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    # a label counts only where the position predicting it is real (padded positions are meaningless)
    predicted_from = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
    labels = ids.masked_fill(predicted_from == 0, -100)
    with model_pair("llama", config, seed=seed, attn=attn) as pair:
        reference = pair.fresh_reference()
        with torch.no_grad():
            if use_embeds:
                expected = reference(inputs_embeds=reference.get_input_embeddings()(ids), labels=labels, **kwargs)
                got = pair.ours(inputs_embeds=pair.ours.get_input_embeddings()(ids), labels=labels, **kwargs)
            else:
                expected = reference(input_ids=ids, labels=labels, **kwargs)
                got = pair.ours(input_ids=ids, labels=labels, **kwargs)
    real = mask.bool()  # padded positions are meaningless (issue 19 item 7)
    assert_close(got.logits[real], expected.logits[real])
    if (labels[:, 1:] != -100).any():
        assert_close(got.loss, expected.loss, what="loss")


@given(config=llama_configs(), seed=seeds(), attn=st.sampled_from(["sdpa", "eager"]), data=st.data())
def test_cached_decoding_matches_one_forward(config, seed, attn, data):
    """Prefill then chunks through past_key_values == the reference's steps (== one full forward).

    Chunks of 2-3 tokens after a prefill only with eager attention: see test_sdpa_chunk_after_prefill (NEW difference).
    """
    _cached_steps(config, seed, attn, data, most=3 if attn == "eager" else 1)


@given(config=llama_configs(), seed=seeds(), data=st.data())
def test_sdpa_chunk_after_prefill(config, seed, data):
    """Found by this fuzz: a chunk of 2+ tokens after a non-empty cache, no padding, under sdpa
    (the mask counted as plain causal, and sdpa's is_causal aligns its triangle top-left)."""
    _cached_steps(config, seed, "sdpa", data, most=3, least=2, padded=False)


def _cached_steps(config, seed, attn, data, most, least=1, padded=None):
    ids, mask = data.draw(left_padded(config["vocab_size"], max_len=36, padded=padded), label="inputs")
    width = ids.shape[1]
    cuts = [data.draw(st.integers(1, width), label="prefill")]
    while cuts[-1] < width:
        cuts.append(min(width, cuts[-1] + data.draw(st.integers(least, most), label="chunk")))
    real = mask.bool()
    with model_pair("llama", config, seed=seed, attn=attn) as pair:
        steps_reference = pair.fresh_reference()
        full = pair.fresh_reference()
        ours_cache = reference_cache = None
        start = 0
        with torch.no_grad():
            expected_full = full(ids, attention_mask=mask).logits
            got_full = pair.ours(ids, attention_mask=mask).logits
            assert_close(got_full[real], expected_full[real], what="full forward")
            for stop in cuts:
                step_mask = mask[:, :stop]
                r = steps_reference(ids[:, start:stop], attention_mask=step_mask, past_key_values=reference_cache,
                                    use_cache=True)
                o = pair.ours(ids[:, start:stop], attention_mask=step_mask, past_key_values=ours_cache, use_cache=True)
                reference_cache, ours_cache = r.past_key_values, o.past_key_values
                part = real[:, start:stop]
                assert_close(o.logits[part], r.logits[part], what=f"cached step {start}:{stop}")
                # dynamic NTK rescales and longrope switches to its long factors with the length seen so far (in
                # transformers too), so for them only the steps equal the reference's steps
                if config["rope_parameters"]["rope_type"] not in ("dynamic", "longrope"):
                    assert_close(o.logits[part], got_full[:, start:stop][part], what=f"step {start}:{stop} vs full")
                start = stop


# issue 19 item 5
@settings(phases=NO_SHRINK)
@given(config=llama_configs(activations=MORE_ACTIVATIONS), seed=seeds(), data=st.data())
def test_forward_with_more_activations(config, seed, data):
    ids, mask = data.draw(left_padded(config["vocab_size"], max_len=12, padded=False), label="inputs")
    with model_pair("llama", config, seed=seed) as pair, torch.no_grad():
        assert_close(pair.ours(ids).logits, pair.fresh_reference()(ids).logits)
