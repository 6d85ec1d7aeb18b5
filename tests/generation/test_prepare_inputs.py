"""model.prepare_inputs_for_generation(...) against transformers': the same keys, in the same order,
with the same values, for the calls generate() makes (prefill, decode steps with a cache, embeddings,
position ids, image inputs), and the forward runs on what it returns."""

from __future__ import annotations

import inspect

import pytest
import torch

import herd
from tests.conftest import TINY_LLAMA

MLLAMA_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, cross_attention_layers=[1], pad_token_id=0, bos_token_id=1, eos_token_id=2,
                   max_position_embeddings=64)
MLLAMA_VISION = dict(hidden_size=16, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=32,
                     vision_output_dim=32, image_size=28, patch_size=14, intermediate_layers_indices=[0],
                     max_num_tiles=4)
LLAMA4_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                   attention_chunk_size=8, max_position_embeddings=64, pad_token_id=0)
LLAMA4_VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
                     patch_size=14, vision_output_dim=16, projector_input_dim=16, projector_output_dim=16,
                     pixel_shuffle_ratio=0.5)


def _pair(name):
    """(transformers' model, herd's) of one class, from the same tiny config (weights do not matter here)."""
    import transformers

    torch.manual_seed(0)
    if name == "llama":
        return (transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)),
                herd.LlamaForCausalLM(herd.LlamaConfig(**TINY_LLAMA)))
    if name == "mllama":
        kwargs = dict(text_config=MLLAMA_TEXT, vision_config=MLLAMA_VISION, image_token_index=127)
        return (transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(**kwargs)),
                herd.MllamaForConditionalGeneration(herd.MllamaConfig(**kwargs)))
    kwargs = dict(text_config=LLAMA4_TEXT, vision_config=LLAMA4_VISION, image_token_index=127)
    return (transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(**kwargs)),
            herd.Llama4ForConditionalGeneration(herd.Llama4Config(**kwargs)))


@pytest.fixture(scope="module", params=["llama", "mllama", "llama4"])
def pair(request):
    return request.param, *_pair(request.param)


def _caches(reference, model, kind, prefill):
    """transformers' and herd's cache of one kind, each holding `prefill` positions of its own model."""
    import transformers

    if kind is None:
        return None, None
    if kind == "dynamic":
        theirs, ours = transformers.DynamicCache(config=reference.config), herd.DynamicCache(config=model.config)
    else:
        theirs = transformers.StaticCache(config=reference.config, max_cache_len=16)
        ours = herd.StaticCache(config=model.config, max_cache_len=16)
    ids = torch.randint(1, 100, (2, prefill), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference(input_ids=ids, past_key_values=theirs, use_cache=True)
        model(input_ids=ids, past_key_values=ours, use_cache=True)
    return theirs, ours


def _same(expected, got, path="inputs"):
    if isinstance(expected, dict):
        assert list(got) == list(expected), path
        for key in expected:
            _same(expected[key], got[key], f"{path}[{key!r}]")
    elif torch.is_tensor(expected):
        assert torch.is_tensor(got) and got.shape == expected.shape and torch.equal(got, expected), path
        assert got.is_contiguous() == expected.is_contiguous(), path
    elif type(expected).__name__ in ("DynamicCache", "StaticCache"):
        assert type(got).__name__ == type(expected).__name__, path
    else:
        assert got == expected, path


def _calls(name):
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    embeds = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    calls = [
        ("prompt", None, dict(input_ids=ids, attention_mask=mask, is_first_iteration=True)),
        ("prompt, use_cache", None, dict(input_ids=ids, attention_mask=mask, use_cache=True, is_first_iteration=True)),
        ("decode step", "dynamic", dict(input_ids=ids, attention_mask=mask, next_sequence_length=1, use_cache=True)),
        ("decode step, positions", "dynamic", dict(input_ids=ids, attention_mask=mask, next_sequence_length=1,
                                                   position_ids=positions, use_cache=True, logits_to_keep=1)),
        ("all positions given", None, dict(input_ids=ids, position_ids=positions, labels=ids, output_attentions=True)),
        ("embeddings first", None, dict(input_ids=ids[:, :0], inputs_embeds=embeds, attention_mask=mask,
                                        is_first_iteration=True)),
        ("embeddings later", "dynamic", dict(input_ids=ids, inputs_embeds=embeds, attention_mask=mask,
                                             next_sequence_length=2, use_cache=True)),
        ("static cache, no mask", "static", dict(input_ids=ids, next_sequence_length=1, use_cache=True)),
    ]
    if name == "mllama":
        images = dict(pixel_values=torch.randn(2, 1, 4, 3, 28, 28), aspect_ratio_ids=torch.tensor([[1], [1]]),
                      aspect_ratio_mask=torch.tensor([[[1, 0, 0, 0]], [[1, 0, 0, 0]]]),
                      cross_attention_mask=torch.ones(2, 7, 1, 4, dtype=torch.long))
        calls += [("images at prefill", None, dict(input_ids=ids, attention_mask=mask, use_cache=True,
                                                   is_first_iteration=True, **images)),
                  ("images after prefill", "dynamic", dict(input_ids=ids, attention_mask=mask, use_cache=True,
                                                           next_sequence_length=1, **images)),
                  ("images without a cache", None, dict(input_ids=ids, attention_mask=mask, use_cache=False,
                                                        **images))]
    if name == "llama4":
        pixels = dict(pixel_values=torch.randn(1, 3, 28, 28))
        calls += [("images at prefill", None, dict(input_ids=ids, attention_mask=mask, is_first_iteration=True,
                                                   **pixels)),
                  ("images after prefill", "dynamic", dict(input_ids=ids, attention_mask=mask, use_cache=True,
                                                           next_sequence_length=1, **pixels)),
                  ("images without a cache", None, dict(input_ids=ids, use_cache=False, **pixels))]
    return calls


def test_signature_matches_transformers(pair):
    name, reference, model = pair
    expected = inspect.signature(reference.prepare_inputs_for_generation).parameters
    got = inspect.signature(model.prepare_inputs_for_generation).parameters
    assert list(got) == list(expected)
    assert [p.default for p in got.values()] == [p.default for p in expected.values()]


def test_keys_and_values_match_transformers(pair):
    name, reference, model = pair
    for label, cache_kind, kwargs in _calls(name):
        theirs, ours = _caches(reference, model, cache_kind, prefill=6)
        expected = reference.prepare_inputs_for_generation(past_key_values=theirs, **kwargs)
        got = model.prepare_inputs_for_generation(past_key_values=ours, **kwargs)
        if cache_kind == "static" and "attention_mask" in kwargs:  # transformers makes it 4D; herd keeps it 2D
            expected["attention_mask"] = kwargs["attention_mask"]
        try:
            _same(expected, got)
        except AssertionError as error:
            raise AssertionError(f"{name}, {label}: {error}") from None


def test_forward_runs_on_what_it_returns(pair):
    """A prefill and two decode steps through prepare_inputs_for_generation give generate()'s tokens."""
    name, _, model = pair
    ids = torch.randint(1, 100, (1, 5), generator=torch.Generator().manual_seed(3))
    expected = model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None)
    cache = herd.DynamicCache(config=model.config)
    tokens = ids
    with torch.no_grad():
        for step in range(3):
            inputs = model.prepare_inputs_for_generation(
                tokens, past_key_values=cache, attention_mask=torch.ones_like(tokens), use_cache=True,
                next_sequence_length=None if step == 0 else 1, is_first_iteration=step == 0)
            logits = model(**inputs).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=-1)
    assert torch.equal(tokens, expected)
