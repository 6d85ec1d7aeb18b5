"""Mllama models against transformers on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.models.mllama import (
    MllamaForCausalLM,
    MllamaForConditionalGeneration,
    MllamaModel,
    MllamaTextModel,
    MllamaVisionModel,
)
from tests.conftest import max_abs_diff

TOL = 1e-4
IMAGE = 128  # the <|image|> id of the tiny vocabulary (one past the lm_head, as 128256 is for the real one)
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, cross_attention_layers=[1, 3], pad_token_id=0, bos_token_id=1, eos_token_id=2,
            max_position_embeddings=256)
VISION = dict(hidden_size=16, num_hidden_layers=3, num_global_layers=2, attention_heads=2, intermediate_size=32,
              vision_output_dim=48, image_size=28, patch_size=14, intermediate_layers_indices=[0, 2], max_num_tiles=4)


def _reference(seed=0):
    import transformers

    torch.manual_seed(seed)
    model = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(
        text_config=TEXT, vision_config=VISION, image_token_index=IMAGE))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "gate" in name:  # gates start at 0 (cross) or pi/4: make every path count
                parameter.uniform_(-1.0, 1.0)
            elif name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = _reference()
    folder = tmp_path_factory.mktemp("mllama") / "ckpt"
    reference.save_pretrained(folder)
    return reference, MllamaForConditionalGeneration.from_pretrained(folder, progress=False), folder


def _images(batch_images, seed=0):
    """batch_images: per row, the tile counts of its images. -> pixel_values, aspect ratio ids / mask."""
    generator = torch.Generator().manual_seed(seed)
    batch, most = len(batch_images), max(1, max(len(row) for row in batch_images))
    pixel_values = torch.randn(batch, most, 4, 3, 28, 28, generator=generator)
    tiles_to_id = {1: 1, 2: 2, 3: 3, 4: 6}  # ids of (1x1), (1x2), (1x3), (2x2) in the default ratio list
    ids = torch.zeros(batch, most, dtype=torch.long)
    mask = torch.zeros(batch, most, 4, dtype=torch.long)
    for row, tiles in enumerate(batch_images):
        for image, count in enumerate(tiles):
            ids[row, image] = tiles_to_id[count]
            mask[row, image, :count] = 1
    return pixel_values, ids, mask


def _text(batch_images, length=12, image_at=(0, 5), seed=1):
    """Token ids with <|image|> at the given positions, and the cross-attention mask the processor builds."""
    generator = torch.Generator().manual_seed(seed)
    batch, most = len(batch_images), max(1, max(len(row) for row in batch_images))
    ids = torch.randint(3, 128, (batch, length), generator=generator)
    cross = torch.zeros(batch, length, most, 4, dtype=torch.long)
    for row, tiles in enumerate(batch_images):
        for image, count in enumerate(tiles):
            ids[row, image_at[image]] = IMAGE
            cross[row, image_at[image] :, image, :count] = 1
    return ids, cross


def _inputs(batch_images, **text_kwargs):
    pixel_values, ids, mask = _images(batch_images)
    input_ids, cross = _text(batch_images, **text_kwargs)
    return dict(input_ids=input_ids, pixel_values=pixel_values, aspect_ratio_ids=ids, aspect_ratio_mask=mask,
                cross_attention_mask=cross)


@pytest.mark.parametrize("batch_images", [[[4]], [[1, 2]], [[4, 1], [2]], [[3], [4, 2]]], ids=str)
def test_vision_model_matches_reference(pair, batch_images):
    reference, ours, _ = pair
    pixel_values, ids, mask = _images(batch_images)
    with torch.no_grad():
        expected = reference.model.vision_model(pixel_values=pixel_values, aspect_ratio_ids=ids, aspect_ratio_mask=mask)
        got = ours.model.vision_model(pixel_values, ids, mask)
    assert got.last_hidden_state.shape == expected.last_hidden_state.shape  # (batch, images, tiles, 5, 48)
    assert max_abs_diff(got.last_hidden_state, expected.last_hidden_state) < TOL


@pytest.mark.parametrize("batch_images", [[[4]], [[1, 2]], [[4, 1], [2]]], ids=str)
def test_logits_match_reference_when_the_prompt_starts_with_an_image(pair, batch_images):
    reference, ours, _ = pair
    inputs = _inputs(batch_images)
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        # herd ignores labels on image tokens itself; the reference fails on them (id past its vocabulary)
        expected = reference(**inputs, labels=labels.masked_fill(labels == IMAGE, -100))
        got = ours(**inputs, labels=labels)
    assert max_abs_diff(got.logits, expected.logits) < TOL
    assert abs(got.loss.item() - expected.loss.item()) < TOL


def test_text_before_the_first_image_learns_nothing_of_it(pair):
    reference, ours, _ = pair
    inputs = _inputs([[4]], image_at=(4,))
    other = dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"]))
    with torch.no_grad():
        ours_a, ours_b = ours(**inputs).logits, ours(**other).logits
        ref_a, ref_b = reference(**inputs).logits, reference(**other).logits
    assert max_abs_diff(ours_a[:, :4], ours_b[:, :4]) == 0  # herd: no leak
    assert max_abs_diff(ref_a[:, :4], ref_b[:, :4]) > 1e-4  # transformers 5.17 leaks an average of the image
    assert max_abs_diff(ours_a[:, 4:], ours_b[:, 4:]) > 1e-4  # tokens after it do see the image
    assert torch.isfinite(ours_a).all()


def test_equals_reference_with_metas_row_masking(pair):
    """With text before the image, herd equals transformers plus Meta's zeroing of rows that see no image."""
    reference, ours, _ = pair
    inputs = _inputs([[4, 2], [1]], image_at=(3, 7))
    rows = inputs["cross_attention_mask"].flatten(2).any(-1).float()  # (batch, seq): 1 where a token sees an image
    hooks = [layer.cross_attn.register_forward_hook(lambda module, args, out: (out[0] * rows[..., None], out[1]))
             for layer in reference.model.language_model.layers if hasattr(layer, "cross_attn")]
    try:
        with torch.no_grad():
            expected = reference(**inputs).logits
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        assert max_abs_diff(ours(**inputs).logits, expected) < TOL


def test_text_only_prompt_through_the_full_model(pair):
    reference, ours, _ = pair
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        assert max_abs_diff(ours(input_ids=ids).logits, reference(input_ids=ids).logits) < TOL
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), expected)


@pytest.mark.parametrize("batch_images", [[[4]], [[2, 1]], [[4, 1], [2]]], ids=str)
def test_greedy_generation_with_images_matches_reference(pair, batch_images):
    reference, ours, _ = pair
    inputs = _inputs(batch_images)
    expected = reference.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = ours.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def test_beam_search_with_an_image_matches_reference(pair):
    reference, ours, _ = pair
    inputs = _inputs([[4], [2]])
    expected = reference.generate(**inputs, max_new_tokens=6, num_beams=3, pad_token_id=0)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=6, num_beams=3, pad_token_id=0), expected)


def test_image_encoded_once_and_cross_keys_cached(pair, monkeypatch):
    _, ours, _ = pair
    calls = []
    original = MllamaVisionModel.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MllamaVisionModel, "forward", counting)
    out = ours.generate(**_inputs([[4]]), max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert len(calls) == 1
    cross = out.past_key_values.cross_attention_cache()
    assert sorted(cross) == [1, 3]
    keys, values = cross[1]
    assert keys.shape == (1, 2, 4 * 5, 8)  # (batch, kv heads, tiles x (patches + class token), head_dim)


def test_causal_lm_reads_only_the_text_weights(pair, monkeypatch):
    import transformers

    import herd.loading

    _, _, folder = pair
    read = []
    original = herd.loading._load_shard

    def spy(reader, *args, **kwargs):
        class Recording:
            def __getattr__(self, name):
                return getattr(reader, name)

            def get_tensor(self, key):
                read.append(key)
                return reader.get_tensor(key)

        return original(Recording(), *args, **kwargs)

    monkeypatch.setattr(herd.loading, "_load_shard", spy)
    ours = herd.AutoModelForCausalLM.from_pretrained(folder, progress=False)
    assert isinstance(ours, MllamaForCausalLM)
    assert read and not any(k.startswith(("vision_model", "multi_modal_projector")) for k in read)
    reference = transformers.MllamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        got, expected = ours(ids), reference(ids)
    assert got.logits.dtype == torch.float32 and max_abs_diff(got.logits, expected.logits) < TOL


def test_base_text_and_vision_classes_load_from_the_full_checkpoint(pair):
    reference, ours, folder = pair
    inputs = _inputs([[4, 1], [2]])
    model = MllamaModel.from_pretrained(folder, progress=False)
    text = MllamaTextModel.from_pretrained(folder, progress=False)
    vision = MllamaVisionModel.from_pretrained(folder, progress=False)
    with torch.no_grad():
        expected = reference.model(**inputs).last_hidden_state
        assert max_abs_diff(model(**inputs).last_hidden_state, expected) < TOL
        ids = torch.randint(3, 128, (1, 6))
        assert max_abs_diff(text(ids).last_hidden_state, reference.model.language_model(ids).last_hidden_state) < TOL
        pixel_values, aspect_ids, aspect_mask = (inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"))
        assert max_abs_diff(vision(pixel_values, aspect_ids, aspect_mask).last_hidden_state,
                            reference.model.vision_model(pixel_values=pixel_values, aspect_ratio_ids=aspect_ids,
                                                         aspect_ratio_mask=aspect_mask).last_hidden_state) < TOL
    assert model.language_model.embed_tokens.num_embeddings == 128 + 8  # the extra image-token rows


def test_save_pretrained_writes_the_published_layout(pair, tmp_path):
    import transformers

    reference, ours, _ = pair
    ours.save_pretrained(tmp_path / "out")
    back = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    inputs = _inputs([[4]])
    with torch.no_grad():
        assert max_abs_diff(back(**inputs).logits, reference(**inputs).logits) == 0


def test_errors(pair):
    _, ours, _ = pair
    inputs = _inputs([[4]])
    with pytest.raises(ValueError, match="aspect_ratio_ids"):
        ours(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, images, tiles"):
        ours.model.vision_model(inputs["pixel_values"][0], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
    with pytest.raises(ValueError, match="tiles per image"):
        ours.model.vision_model(inputs["pixel_values"][:, :, :2], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])


def test_documented_lm_head_expansion_and_resizing(pair):
    _, _, folder = pair
    model = MllamaForConditionalGeneration.from_pretrained(folder, progress=False)
    inputs = _inputs([[4]])
    with torch.no_grad():
        before = model(**inputs).logits
    # the docs' recipe, verbatim
    old_embeddings = model.get_output_embeddings()
    num_tokens = model.vocab_size + 1
    resized_embeddings = model._get_resized_lm_head(old_embeddings, new_num_tokens=num_tokens, mean_resizing=True)
    resized_embeddings.requires_grad_(old_embeddings.weight.requires_grad)
    model.set_output_embeddings(resized_embeddings)
    with torch.no_grad():
        after = model(**inputs, labels=inputs["input_ids"]).logits
    assert after.shape[-1] == 129 and max_abs_diff(after[..., :128], before) == 0
    new_row = model.lm_head.weight[128]
    assert torch.allclose(new_row, old_embeddings.weight.mean(0))
    # resize_token_embeddings grows the input embeddings (136 -> 140), old rows kept
    embed = model.resize_token_embeddings(140)
    assert embed.num_embeddings == 140 and model.config.text_config.vocab_size == 140


def test_resize_token_embeddings_on_a_tied_llama():
    config = herd.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, tie_word_embeddings=True)
    model = herd.LlamaForCausalLM(config)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = model(ids).logits
    model.resize_token_embeddings(70, pad_to_multiple_of=8)
    assert model.get_input_embeddings().num_embeddings == 72 and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert max_abs_diff(model(ids).logits[..., :64], before) < 1e-6
    assert model(torch.tensor([[71]])).logits.shape == (1, 1, 72)


# ----------------------------------------------------------------------------------------------
# Batches mixing text-only rows, images without a cross_attention_mask, sliced masks
# ----------------------------------------------------------------------------------------------


def _metas_row_masking(reference, seeing):
    """Hooks giving the reference Meta's zeroing of cross-attention outputs for rows that see no
    image (herd's behaviour, see the module docstring); seeing: (batch,) 1/0 per row."""
    factor = seeing.float()[:, None, None]
    return [layer.cross_attn.register_forward_hook(lambda module, args, out: (out[0] * factor, out[1]))
            for layer in reference.model.language_model.layers if hasattr(layer, "cross_attn")]


def test_text_only_row_in_an_image_batch_generates_like_reference(pair):
    # transformers 5.17's processor refuses such a batch (as herd's does, test_processing_mllama
    # test_errors); built by hand, the text-only row has an all-zero cross_attention_mask and no image.
    reference, ours, _ = pair
    inputs = _inputs([[4], []], image_at=(0,))
    assert inputs["cross_attention_mask"][1].sum() == 0 and inputs["aspect_ratio_mask"][1].sum() == 0
    hooks = _metas_row_masking(reference, torch.tensor([1, 0]))
    try:
        with torch.no_grad():
            expected_logits = reference(**inputs).logits
        expected = reference.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        assert max_abs_diff(ours(**inputs).logits, expected_logits) < TOL
    got = ours.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
    # the text-only row continues exactly as it does alone, without images
    alone = ours.generate(inputs["input_ids"][1:], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got[1:], alone)


def test_pixel_values_without_cross_attention_mask_match_reference(pair):
    """Every token sees every tile of every image (padding tiles included), as in the reference's
    eager attention. (Its sdpa attention, given no mask, treats cross-attention as causal between
    text positions and image tokens when more than one token goes in: a quirk, not followed.)"""
    import transformers

    _, ours, folder = pair
    reference = transformers.MllamaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    inputs = _inputs([[4, 1], [2]])
    del inputs["cross_attention_mask"]
    with torch.no_grad():
        expected_logits = reference(**inputs).logits
        assert max_abs_diff(ours(**inputs).logits, expected_logits) < TOL
        eager = MllamaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager", progress=False)
        assert max_abs_diff(eager(**inputs).logits, expected_logits) < TOL
    expected = reference.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0), expected)


def test_cached_decoding_with_sliced_cross_attention_masks(pair):
    """herd's forward takes the cross_attention_mask of the whole sequence or of the new tokens
    only; the reference (which takes the whole one) decodes the same tokens step by step."""
    reference, ours, _ = pair
    inputs = _inputs([[4, 1], [2]])
    ids, cross = inputs.pop("input_ids"), inputs.pop("cross_attention_mask")
    steps = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(input_ids=ids, cross_attention_mask=cross, use_cache=True, **inputs)
        got = ours(input_ids=ids, cross_attention_mask=cross, use_cache=True, **inputs)
        assert max_abs_diff(got.logits, expected.logits) < TOL
        ref_cache, our_cache, full = expected.past_key_values, got.past_key_values, cross
        for step in range(steps.shape[1]):
            new = steps[:, step : step + 1]
            full = torch.cat([full, full[:, -1:]], dim=1)  # the new token sees what the last one saw
            expected = reference(input_ids=new, cross_attention_mask=full, past_key_values=ref_cache, use_cache=True)
            got = ours(input_ids=new, cross_attention_mask=full[:, -1:], past_key_values=our_cache, use_cache=True)
            assert max_abs_diff(got.logits, expected.logits) < TOL, step
            ref_cache, our_cache = expected.past_key_values, got.past_key_values


def _left_padded(rows, seed=3):
    """rows: (length, tile counts of its images, where each image token sits) per row, () for a
    text-only row. -> the left-padded batch (with attention_mask), and each row's own inputs as it
    would be sent alone (a text-only row without any image input)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(length for length, _, _ in rows)
    pixel_values, aspect_ids, aspect_mask = _images([list(tiles) for _, tiles, _ in rows])
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    cross = torch.zeros(len(rows), width, pixel_values.shape[1], 4, dtype=torch.long)
    alone = []
    for row, (length, tiles, places) in enumerate(rows):
        start = width - length
        ids[row, start:] = torch.randint(3, 128, (length,), generator=generator)
        mask[row, start:] = 1
        for image, (count, at) in enumerate(zip(tiles, places)):
            ids[row, start + at] = IMAGE
            cross[row, start + at :, image, :count] = 1
        own = dict(input_ids=ids[row : row + 1, start:])
        if tiles:
            images = slice(0, len(tiles))
            own.update(pixel_values=pixel_values[row : row + 1, images], aspect_ratio_ids=aspect_ids[row : row + 1, images],
                       aspect_ratio_mask=aspect_mask[row : row + 1, images],
                       cross_attention_mask=cross[row : row + 1, start:, images])
        alone.append(own)
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, aspect_ratio_ids=aspect_ids,
                 aspect_ratio_mask=aspect_mask, cross_attention_mask=cross)
    return batch, alone


# row 0: an image at the start; row 1: padded, text before its image; row 2: padded, text only
LEFT_PADDED_ROWS = [(12, (4,), (0,)), (7, (2,), (2,)), (5, (), ())]


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_left_padded_batch_mixing_image_and_text_rows(pair, attn):
    """Padded positions and text before an image have fully masked cross-attention rows: no NaN
    anywhere, on any backend. The batch gives the reference's logits and tokens (with Meta's row
    masking) and each row the tokens it gets alone."""
    reference, _, folder = pair
    ours = MllamaForConditionalGeneration.from_pretrained(folder, attn_implementation=attn, progress=False)
    inputs, alone = _left_padded(LEFT_PADDED_ROWS)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    seeing = inputs["cross_attention_mask"].flatten(2).any(-1).float()  # (batch, seq): 1 where a token sees an image
    hooks = [layer.cross_attn.register_forward_hook(
        lambda module, args, out: (out[0] * (seeing if out[0].shape[1] == seeing.shape[1] else seeing[:, -1:])[..., None],
                                   out[1]))
        for layer in reference.model.language_model.layers if hasattr(layer, "cross_attn")]
    try:
        with torch.no_grad():
            expected = reference(**inputs).logits
        expected_tokens = reference.generate(**inputs, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        got = ours(**inputs).logits
    assert torch.isfinite(got).all()  # the padded positions' logits too
    real = inputs["attention_mask"].bool()
    assert max_abs_diff(got[real], expected[real]) < TOL
    tokens = ours.generate(**inputs, **kwargs)
    assert torch.equal(tokens, expected_tokens)
    width = inputs["input_ids"].shape[1]
    for row, own in enumerate(alone):
        single = ours.generate(**own, **kwargs)
        assert torch.equal(single[0, own["input_ids"].shape[1] :], tokens[row, width:]), row
