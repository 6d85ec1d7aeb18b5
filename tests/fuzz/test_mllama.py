"""Differential fuzz: herd.MllamaForConditionalGeneration against transformers (images, tiles, cross-attention masks).

transformers 5.17 lets text before a row's first image see an average of the image; herd does not (Meta's row
masking). Where a drawn prompt has such text, the reference gets Meta's zeroing of those rows through a hook, as in
tests/models/mllama/test_modeling_mllama.py.
"""

from __future__ import annotations

import contextlib

import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import NO_SHRINK, scaled
from tests.fuzz._diff import PAD, assert_close, model_pair, seeds

IMAGE = 128  # <|image|>: one past the tiny lm_head
VISION = dict(hidden_size=16, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=32,
              vision_output_dim=48, image_size=28, patch_size=14, intermediate_layers_indices=[0, 1], max_num_tiles=4)
TILES_TO_ID = {1: 1, 2: 2, 3: 3, 4: 6}  # (1x1), (1x2), (1x3), (2x2) in the default ratio list


@st.composite
def mllama_configs(draw):
    layers = draw(st.integers(2, 4))
    # no cross-attention at layer 0: transformers 5.17 reads the cache's length from layer 0 and then indexes the
    # cross-attention mask with the vision-token count (IndexError); real checkpoints start at layer 3
    cross = draw(st.lists(st.integers(1, layers - 1), min_size=1, max_size=2, unique=True).map(sorted))
    heads = draw(st.sampled_from([2, 4]))
    return dict(vocab_size=128, hidden_size=draw(st.sampled_from([16, 32])), intermediate_size=32,
                num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])),
                cross_attention_layers=cross, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                max_position_embeddings=256)


@st.composite
def multimodal_inputs(draw, text_only_rows=False, first_image_at_start=False):
    """Per row 1-2 images of 1-4 tiles at drawn positions; which tokens see which image (from the image on, or a
    drawn later span). text_only_rows: some rows may have no image (issue 19 item 6)."""
    batch = draw(st.integers(1, 2))
    length = draw(st.integers(4, 12))
    rows = [[draw(st.integers(1, 4)) for _ in range(draw(st.integers(0 if text_only_rows else 1, 2)))]
            for _ in range(batch)]
    if text_only_rows and all(rows):
        rows[-1] = []
    if not any(rows):
        rows[0] = [draw(st.integers(1, 4))]
    most = max(len(r) for r in rows)
    generator = torch.Generator().manual_seed(draw(seeds()))
    pixel_values = torch.randn(batch, most, 4, 3, 28, 28, generator=generator)
    aspect_ids = torch.zeros(batch, most, dtype=torch.long)
    aspect_mask = torch.zeros(batch, most, 4, dtype=torch.long)
    ids = torch.randint(3, 128, (batch, length), generator=generator)
    cross = torch.zeros(batch, length, most, 4, dtype=torch.long)
    for row, tiles in enumerate(rows):
        places = sorted(draw(st.lists(st.integers(0, length - 1), min_size=len(tiles), max_size=len(tiles), unique=True)))
        if first_image_at_start and places:
            places[0] = 0
        for image, (count, at) in enumerate(zip(tiles, places)):
            aspect_ids[row, image], aspect_mask[row, image, :count] = TILES_TO_ID[count], 1
            ids[row, at] = IMAGE
            end = length if first_image_at_start or draw(st.booleans()) else draw(st.integers(at + 1, length))
            cross[row, at:end, image, :count] = 1
    return dict(input_ids=ids, pixel_values=pixel_values, aspect_ratio_ids=aspect_ids, aspect_ratio_mask=aspect_mask,
                cross_attention_mask=cross)


@contextlib.contextmanager
def metas_row_masking(reference, cross_attention_mask):
    rows = cross_attention_mask.flatten(2).any(-1).float()  # 1 where a token sees an image

    def zero_rows_that_see_no_image(module, args, out):
        # the prompt's rows; in a generation step new tokens see what the last prompt token saw
        seen = rows if out[0].shape[1] == rows.shape[1] else rows[:, -1:].expand(-1, out[0].shape[1])
        return out[0] * seen[..., None], out[1]

    hooks = [layer.cross_attn.register_forward_hook(zero_rows_that_see_no_image)
             for layer in reference.model.language_model.layers if hasattr(layer, "cross_attn")]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _pair(config, seed):
    return model_pair("mllama", config, seed=seed, vision_config=VISION, image_token_index=IMAGE)


def _both_logits(pair, inputs):
    """(herd's logits, the reference's) on the same inputs, the reference masking rows as Meta's model does."""
    reference = pair.fresh_reference()
    with metas_row_masking(reference, inputs["cross_attention_mask"]):
        expected = reference(**inputs).logits
    return pair.ours(**inputs).logits, expected


@scaled(0.6)
@given(config=mllama_configs(), seed=seeds(), inputs=multimodal_inputs())
def test_forward_logits(config, seed, inputs):
    with _pair(config, seed) as pair, torch.no_grad():
        assert_close(*_both_logits(pair, inputs))


@scaled(0.6)
@given(config=mllama_configs(), seed=seeds(), inputs=multimodal_inputs(first_image_at_start=True),
       kwargs=st.sampled_from([dict(), dict(num_beams=2), dict(num_beams=3, num_return_sequences=2),
                               dict(do_sample=True, top_k=10, temperature=0.7)]),
       sampling_seed=seeds(), max_new=st.integers(1, 6))
def test_generate(config, seed, inputs, kwargs, sampling_seed, max_new):
    with _pair(config, seed) as pair:
        outputs = []
        for model in (pair.fresh_reference(), pair.ours):
            torch.manual_seed(sampling_seed)
            outputs.append(model.generate(**inputs, max_new_tokens=max_new, pad_token_id=PAD, eos_token_id=None, **kwargs))
    assert outputs[1].shape == outputs[0].shape and torch.equal(outputs[1], outputs[0]), f"\n{outputs[1]}\n!=\n{outputs[0]}"


# issue 19 item 6
@scaled(0.6, phases=NO_SHRINK)
@given(config=mllama_configs(), seed=seeds(), inputs=multimodal_inputs(text_only_rows=True, first_image_at_start=True))
def test_text_only_rows_mixed_with_image_rows(config, seed, inputs):
    with _pair(config, seed) as pair, torch.no_grad():
        assert_close(*_both_logits(pair, inputs))
        reference = pair.fresh_reference()
        with metas_row_masking(reference, inputs["cross_attention_mask"]):
            expected = reference.generate(**inputs, max_new_tokens=4, pad_token_id=PAD, eos_token_id=None)
        got = pair.ours.generate(**inputs, max_new_tokens=4, pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(got, expected)


# issue 19 item 6
@scaled(0.6, phases=NO_SHRINK)
@given(config=mllama_configs(), seed=seeds(), inputs=multimodal_inputs(first_image_at_start=True))
def test_pixel_values_without_cross_attention_mask(config, seed, inputs):
    """Every token sees every tile, as transformers' eager attention has it (its sdpa path applies a
    causal mask between text positions and image tokens when no mask is given)."""
    inputs = {k: v for k, v in inputs.items() if k != "cross_attention_mask"}
    with _pair(config, seed) as pair, torch.no_grad():
        reference = pair.fresh_reference()
        reference.set_attn_implementation("eager")
        assert_close(pair.ours(**inputs).logits, reference(**inputs).logits)


# issue 19 item 6
@scaled(0.6, phases=NO_SHRINK)
@given(config=mllama_configs(), seed=seeds(), inputs=multimodal_inputs(first_image_at_start=True), data=st.data())
def test_sliced_cross_attention_mask_in_cached_forwards(config, seed, inputs, data):
    """Prefill with the images, then one token at a time with the matching slice of cross_attention_mask."""
    ids, cross = inputs["input_ids"], inputs["cross_attention_mask"]
    prefill = data.draw(st.integers(1, ids.shape[1] - 1), label="prefill")
    images = {k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    with _pair(config, seed) as pair, torch.no_grad():
        expected = pair.fresh_reference()(**inputs).logits
        out = pair.ours(ids[:, :prefill], cross_attention_mask=cross[:, :prefill], use_cache=True, **images)
        assert_close(out.logits, expected[:, :prefill], what="prefill")
        cache = out.past_key_values
        for t in range(prefill, ids.shape[1]):
            out = pair.ours(ids[:, t:t + 1], cross_attention_mask=cross[:, t:t + 1], past_key_values=cache,
                            use_cache=True)
            cache = out.past_key_values
            assert_close(out.logits, expected[:, t:t + 1], what=f"step {t}")
