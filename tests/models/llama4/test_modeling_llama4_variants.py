"""Llama 4 against transformers over configurations and arguments that
tests/models/llama4/test_modeling_llama4*.py do not reach.

- Llama4TextModel's output with both output_attentions and output_hidden_states: transformers
  orders the keys (and the tuple form) attentions before hidden_states, unlike LlamaModel; herd
  gave LlamaModel's order.
- output_router_logits: transformers' Llama4TextModel returns each MoE layer's router logits
  (`router_logits`, last in the tuple form); its Llama4ForCausalLM and Llama4ForConditionalGeneration
  accept the argument and return neither router logits nor an auxiliary loss. herd refused the
  argument (TypeError) and never returned router logits.
- get_image_features(return_dict=False): a tuple, as in transformers (herd raised a TypeError).
- Configurations: head_dim unlike hidden / heads with attention_bias, tied embeddings, chunks larger
  than, equal to and smaller than the prompt, every layer NoPE, temperature tuning off where
  floor_scale would bite, qk norm off on Maverick's layout, llama3 rope; each with left padding, a
  cache continuation and greedy tokens.
- Output forms: hidden states, attention weights (eager), tuples with a loss, logits_to_keep as
  indices, use_cache=False; for the multimodal model, the tuple form with image features and a
  cached continuation after the image.
"""

from __future__ import annotations

import pytest
import torch

import herd
from tests.conftest import max_abs_diff, randomize_norms_and_biases
from tests.models.llama4.test_modeling_llama4 import _batch as left_padded_batch

TOL = 1e-5
IMAGE = 127
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
            attention_chunk_size=8, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=56,
              patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
              pixel_shuffle_ratio=0.5, rope_theta=10000)
TOKENS_PER_IMAGE = 4  # 16 patches, pixel shuffle 0.5


def _text_pair(folder, attn="sdpa", **overrides):
    import transformers

    torch.manual_seed(0)
    randomize_norms_and_biases(transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**{**TEXT, **overrides}))).save_pretrained(folder)
    reference = transformers.Llama4ForCausalLM.from_pretrained(folder, attn_implementation=attn).eval()
    return reference, herd.Llama4ForCausalLM.from_pretrained(folder, attn_implementation=attn, progress=False)


def _batch(lengths, seed=0):
    return left_padded_batch(lengths, seed, vocab=120)


@pytest.fixture(scope="module")
def maverick(tmp_path_factory):
    """Dense and MoE layers alternating, top-2, floor_scale 2: eager, so that attention weights exist."""
    return _text_pair(tmp_path_factory.mktemp("maverick"), attn="eager", interleave_moe_layer_step=2,
                      num_experts_per_tok=2, floor_scale=2)


def _close_tuples(got, expected, real):
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected):
        if ours.dim() == 3:
            assert max_abs_diff(ours[real], theirs[real]) < TOL
        else:  # attention weights: the rows and columns of real tokens
            keep = real[:, None, :, None] & real[:, None, None, :]
            assert max_abs_diff(ours * keep, theirs * keep) < TOL


def test_text_model_router_logits_match_reference(maverick):
    reference, ours = maverick
    ids, mask = _batch((13, 9, 4))
    with torch.no_grad():
        expected = reference.model(ids, attention_mask=mask, output_router_logits=True)
        got = ours.model(ids, attention_mask=mask, output_router_logits=True)
        assert list(got.keys()) == list(expected.keys()) == ["last_hidden_state", "past_key_values", "router_logits"]
        assert len(got.router_logits) == 2  # the two MoE layers
        for ours_logits, reference_logits in zip(got.router_logits, expected.router_logits):
            assert ours_logits.shape == (3 * 13, 4)
            assert max_abs_diff(ours_logits, reference_logits) < TOL
        # transformers' Llama4TextModel puts attentions before hidden_states (unlike LlamaModel), router logits last
        flags = dict(output_router_logits=True, output_hidden_states=True, output_attentions=True)
        order = ["last_hidden_state", "past_key_values", "attentions", "hidden_states", "router_logits"]
        assert list(ours.model(ids, attention_mask=mask, **flags).keys()) == order
        assert list(reference.model(ids, attention_mask=mask, **flags).keys()) == order
        expected_tuple = reference.model(ids, attention_mask=mask, return_dict=False, **flags)
        got_tuple = ours.model(ids, attention_mask=mask, return_dict=False, **flags)
        assert len(got_tuple) == len(expected_tuple) == 5
        for ours_logits, reference_logits in zip(got_tuple[-1], expected_tuple[-1]):
            assert max_abs_diff(ours_logits, reference_logits) < TOL
        assert got_tuple[2][0].dim() == 4 and got_tuple[3][0].dim() == 3
        _close_tuples(got_tuple[2], expected_tuple[2], mask.bool())
        _close_tuples(got_tuple[3], expected_tuple[3], mask.bool())
        # without router logits too
        flags = dict(output_hidden_states=True, output_attentions=True, return_dict=False)
        got_tuple = ours.model(ids, attention_mask=mask, **flags)
        assert len(got_tuple) == 4 and got_tuple[2][0].dim() == 4 and got_tuple[3][0].dim() == 3
        # not asked for: no router logits
        assert "router_logits" not in ours.model(ids, attention_mask=mask)


def test_router_logits_from_the_config(tmp_path):
    reference, ours = _text_pair(tmp_path, moe_layers=[1, 2], output_router_logits=True, router_aux_loss_coef=0.5)
    ids = torch.randint(3, 120, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = reference.model(ids), ours.model(ids)
        assert list(got.keys()) == list(expected.keys())
        assert max_abs_diff(torch.stack(got.router_logits), torch.stack(expected.router_logits)) < TOL
        # the causal LM returns neither router logits nor an auxiliary loss, as transformers
        expected, got = reference(ids, labels=ids), ours(ids, labels=ids)
        assert list(got.keys()) == list(expected.keys()) == ["loss", "logits", "past_key_values"]
        assert abs(got.loss.item() - expected.loss.item()) < TOL


def test_causal_lm_accepts_output_router_logits_and_changes_nothing(maverick):
    reference, ours = maverick
    ids, mask = _batch((13, 9, 4))
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, labels=labels, output_router_logits=True, return_dict=False)
        got = ours(ids, attention_mask=mask, labels=labels, output_router_logits=True, return_dict=False)
    assert len(got) == len(expected) == 3
    assert abs(got[0].item() - expected[0].item()) < TOL
    assert max_abs_diff(got[1][mask.bool()], expected[1][mask.bool()]) < TOL


def test_output_forms_match_reference(maverick):
    reference, ours = maverick
    ids, mask = _batch((13, 9, 4), seed=3)
    real = mask.bool()
    labels = ids.masked_fill(~real, -100)
    with torch.no_grad():
        flags = dict(labels=labels, output_hidden_states=True, output_attentions=True, return_dict=False)
        expected, got = reference(ids, attention_mask=mask, **flags), ours(ids, attention_mask=mask, **flags)
        assert len(got) == len(expected) == 5
        assert abs(got[0].item() - expected[0].item()) < TOL
        assert max_abs_diff(got[1][real], expected[1][real]) < TOL
        _close_tuples(got[3], expected[3], real)
        _close_tuples(got[4], expected[4], real)
        keep = torch.tensor([0, 5, 12])
        expected = reference(ids, attention_mask=mask, logits_to_keep=keep, use_cache=False)
        got = ours(ids, attention_mask=mask, logits_to_keep=keep, use_cache=False)
        assert list(got.keys()) == list(expected.keys()) == ["logits"]
        assert max_abs_diff(got.logits[real[:, keep]], expected.logits[real[:, keep]]) < TOL


CONFIGS = {
    "head_dim_16_attention_bias": dict(head_dim=16, attention_bias=True),
    "head_dim_12_mha": dict(head_dim=12, num_key_value_heads=4),
    "tied_embeddings": dict(tie_word_embeddings=True),
    "chunk_larger_than_prompt": dict(attention_chunk_size=64),
    "chunk_equal_to_prompt": dict(attention_chunk_size=13),
    "chunk_3": dict(attention_chunk_size=3),
    "every_layer_nope": dict(no_rope_layer_interval=1, floor_scale=3),
    "temperature_tuning_off": dict(attn_temperature_tuning=False, floor_scale=2, attn_scale=1.0),
    "maverick_no_qk_norm_llama3": dict(interleave_moe_layer_step=2, use_qk_norm=False, intermediate_size=48,
                                       intermediate_size_mlp=16, rope_scaling={
                                           "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
}


def _check_forward_and_continuation(reference, ours, ids, mask):
    """One forward over left-padded rows, and a 7-token prefill continued from its cache, give the
    reference's logits at the real positions."""
    real = mask.bool()
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        assert max_abs_diff(ours(ids, attention_mask=mask).logits[real], expected[real]) < TOL
        first = ours(ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        rest = ours(ids[:, 7:], attention_mask=mask, past_key_values=first.past_key_values)
        assert max_abs_diff(torch.cat([first.logits, rest.logits], dim=1)[real], expected[real]) < TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_forward_continuation_and_greedy_match_reference(tmp_path, name):
    reference, ours = _text_pair(tmp_path, **CONFIGS[name])
    ids, mask = _batch((13, 9, 4), seed=5)
    _check_forward_and_continuation(reference, ours, ids, mask)
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **greedy),
                       reference.generate(ids, attention_mask=mask, **greedy))


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    text = {**TEXT, "interleave_moe_layer_step": 2, "num_experts_per_tok": 2, "floor_scale": 4}
    config = transformers.Llama4Config(text_config=text, vision_config=VISION, image_token_index=IMAGE)
    folder = tmp_path_factory.mktemp("llama4mm")
    randomize_norms_and_biases(transformers.Llama4ForConditionalGeneration(config)).save_pretrained(folder)
    reference = transformers.Llama4ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    ours = herd.Llama4ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager", progress=False)
    ids, mask = _batch((20, 14), seed=1)
    ids[0, 4 : 4 + TOKENS_PER_IMAGE] = IMAGE
    ids[1, 10 : 10 + TOKENS_PER_IMAGE] = IMAGE
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    return reference, ours, ids, mask, pixels


def test_get_image_features_forms_match_reference(multimodal):
    reference, ours, _, _, pixels = multimodal
    with torch.no_grad():
        expected = reference.get_image_features(pixels, vision_feature_select_strategy="default", return_dict=False)
        got = ours.get_image_features(pixels, vision_feature_select_strategy="default", return_dict=False)
        assert isinstance(got, tuple) and len(got) == len(expected) == 1
        assert max_abs_diff(got[0], expected[0]) < TOL
        expected = reference.get_image_features(pixels, vision_feature_select_strategy="default",
                                                output_hidden_states=True)
        got = ours.get_image_features(pixels, output_hidden_states=True)
        assert list(got.keys()) == list(expected.keys()) == ["last_hidden_state", "hidden_states"]
        assert max_abs_diff(torch.stack(got.hidden_states), torch.stack(expected.hidden_states)) < TOL


def test_multimodal_tuple_form_router_flag_and_continuation_match_reference(multimodal):
    reference, ours, ids, mask, pixels = multimodal
    real = mask.bool()
    labels = ids.masked_fill(~real, -100)
    with torch.no_grad():
        flags = dict(pixel_values=pixels, labels=labels, output_hidden_states=True, return_dict=False,
                     output_router_logits=True)
        expected, got = reference(ids, attention_mask=mask, **flags), ours(ids, attention_mask=mask, **flags)
        # loss, logits, cache, hidden states, image features
        assert len(got) == len(expected) == 5
        assert abs(got[0].item() - expected[0].item()) < TOL
        assert max_abs_diff(got[1][real], expected[1][real]) < TOL
        _close_tuples(got[3], expected[3], real)
        assert max_abs_diff(got[4], expected[4]) < TOL
        # the image in the first call, text continuing from the cache
        full = expected[1]
        first = ours(ids[:, :15], attention_mask=mask[:, :15], pixel_values=pixels, use_cache=True)
        rest = ours(ids[:, 15:], attention_mask=mask, past_key_values=first.past_key_values)
        assert max_abs_diff(torch.cat([first.logits, rest.logits], dim=1)[real], full[real]) < TOL
        # inputs_embeds in place of input_ids (text only)
        text = ids.masked_fill(ids == IMAGE, 5)
        expected = reference(inputs_embeds=reference.get_input_embeddings()(text), attention_mask=mask).logits
        got = ours(inputs_embeds=ours.get_input_embeddings()(text), attention_mask=mask).logits
        assert max_abs_diff(got[real], expected[real]) < TOL


def test_flex_attention_small_chunks_odd_head_dim_and_bias_match_reference(tmp_path):
    """herd's flex_attention (uncompiled on the CPU) against the reference's sdpa: transformers'
    flex path compiles with inductor, which this CPU image cannot build."""
    reference, _ = _text_pair(tmp_path / "sdpa", attention_chunk_size=3, head_dim=12, attention_bias=True, floor_scale=2)
    ours = herd.Llama4ForCausalLM.from_pretrained(tmp_path / "sdpa", attn_implementation="flex_attention", progress=False)
    ids, mask = _batch((13, 9, 4), seed=5)
    _check_forward_and_continuation(reference, ours, ids, mask)
