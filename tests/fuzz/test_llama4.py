"""Differential fuzz: herd.Llama4ForCausalLM against transformers (MoE, chunked attention, NoPE layers, qk norm)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.conftest import NO_SHRINK
from tests.fuzz._diff import PAD, assert_close, left_padded, llama4_configs, model_pair, seeds


@given(config=llama4_configs(), seed=seeds(), attn=st.sampled_from(["sdpa", "eager"]), data=st.data())
def test_forward_and_cached_steps(config, seed, attn, data):
    """One forward (left padding, optional position_ids) and decoding with past_key_values: chunks of 1-3 tokens
    with eager, one token at a time with sdpa (see test_sdpa_chunk_after_prefill)."""
    _forward_and_cached_steps(config, seed, attn, data, most=3 if attn == "eager" else 1)


@settings(phases=NO_SHRINK)
@given(config=llama4_configs(), seed=seeds(), data=st.data())
def test_sdpa_chunk_after_prefill(config, seed, data):
    _forward_and_cached_steps(config, seed, "sdpa", data, most=3, least=2, padded=False)


def _forward_and_cached_steps(config, seed, attn, data, most, least=1, padded=None):
    ids, mask = data.draw(left_padded(config["vocab_size"], max_len=24, padded=padded), label="inputs")
    real = mask.bool()
    kwargs = {"attention_mask": mask}
    if data.draw(st.booleans(), label="explicit position_ids"):
        kwargs["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids) + data.draw(st.integers(0, 8), label="offset")
    use_embeds = data.draw(st.booleans(), label="inputs_embeds")
    prefill = data.draw(st.integers(1, ids.shape[1]), label="prefill")
    with model_pair("llama4", config, seed=seed, attn=attn) as pair, torch.no_grad():
        reference = pair.fresh_reference()
        if use_embeds:
            expected = reference(inputs_embeds=reference.get_input_embeddings()(ids), **kwargs).logits
            got = pair.ours(inputs_embeds=pair.ours.get_input_embeddings()(ids), **kwargs).logits
        else:
            expected, got = reference(ids, **kwargs).logits, pair.ours(ids, **kwargs).logits
        assert_close(got[real], expected[real])
        # cached decoding: prefill, then one token at a time == one full forward (no position_ids)
        full = pair.ours(ids, attention_mask=mask).logits
        expected_full = reference(ids, attention_mask=mask).logits
        assert_close(full[real], expected_full[real], what="full forward")
        cache, start = None, 0
        cuts = [prefill]
        while cuts[-1] < ids.shape[1]:
            cuts.append(min(ids.shape[1], cuts[-1] + data.draw(st.integers(least, most), label="chunk")))
        for stop in cuts:
            out = pair.ours(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache, use_cache=True)
            cache, part = out.past_key_values, real[:, start:stop]
            assert_close(out.logits[part], expected_full[:, start:stop][part], what=f"cached step {start}:{stop}")
            start = stop


@given(config=llama4_configs(), seed=seeds(), data=st.data())
def test_greedy_and_beam_generation(config, seed, data):
    ids, mask = data.draw(left_padded(config["vocab_size"], max_len=12), label="prompts")
    kwargs = data.draw(st.sampled_from([dict(), dict(num_beams=2), dict(num_beams=3, num_return_sequences=2),
                                        dict(do_sample=True, top_k=10)]), label="mode")
    sampling_seed = data.draw(seeds(), label="sampling seed")
    with model_pair("llama4", config, seed=seed) as pair:
        outputs = []
        for model in (pair.fresh_reference(), pair.ours):
            torch.manual_seed(sampling_seed)
            outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=data.draw(st.just(6)),
                                          pad_token_id=PAD, eos_token_id=None, **kwargs))
    assert outputs[1].shape == outputs[0].shape and torch.equal(outputs[1], outputs[0]), f"\n{outputs[1]}\n!=\n{outputs[0]}"
