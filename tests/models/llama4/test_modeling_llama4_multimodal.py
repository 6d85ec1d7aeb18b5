"""Llama 4 vision encoder and Llama4ForConditionalGeneration against transformers (tiny random weights)."""

from __future__ import annotations

import pytest
import torch

import herd
from tests.conftest import max_abs_diff

TOL = 1e-4
IMAGE = 127  # the image placeholder id of the tiny vocabulary
TOKENS_PER_TILE = 4  # (56 / 14)^2 = 16 patches, pixel shuffle 0.5 -> 4 tokens
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
            attention_chunk_size=8, interleave_moe_layer_step=2, max_position_embeddings=256, pad_token_id=0)
VISION = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56,
              patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
              pixel_shuffle_ratio=0.5, rope_theta=10000)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    reference = transformers.Llama4ForConditionalGeneration(
        transformers.Llama4Config(text_config=TEXT, vision_config=VISION, image_token_index=IMAGE)).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith(("layernorm.weight", "norm.weight")):
                parameter.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("llama4mm") / "ckpt"
    reference.save_pretrained(folder)
    return reference, herd.Llama4ForConditionalGeneration.from_pretrained(folder, progress=False), folder


def _prompt(tiles_per_image, length=24, seed=0):
    """Token ids with one run of placeholders per image, and the pixel values of all their tiles."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (1, length), generator=generator)
    start = 2
    for tiles in tiles_per_image:
        ids[0, start : start + tiles * TOKENS_PER_TILE] = IMAGE
        start += tiles * TOKENS_PER_TILE + 2
    pixels = torch.randn(sum(tiles_per_image), 3, 56, 56, generator=generator) if tiles_per_image else None
    return ids, pixels


@pytest.mark.parametrize("tiles", [1, 3, 5])
def test_vision_model_matches_reference(pair, tiles):
    reference, ours, _ = pair
    pixels = torch.randn(tiles, 3, 56, 56)
    with torch.no_grad():
        expected = reference.model.vision_model(pixels).last_hidden_state if hasattr(reference, "model") \
            else reference.vision_model(pixels).last_hidden_state
        got = ours.vision_model(pixels).last_hidden_state
    assert got.shape == expected.shape == (tiles, TOKENS_PER_TILE, 32)
    assert max_abs_diff(got, expected) < TOL
    # image features as get_image_features returns them
    assert max_abs_diff(ours.get_image_features(pixels).last_hidden_state, got) == 0


def test_bfloat16_pixels_into_a_float32_model(pair):
    _, ours, _ = pair
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        as_float = ours.vision_model(pixels).last_hidden_state
        as_bf16 = ours.vision_model(pixels.to(torch.bfloat16)).last_hidden_state
    assert as_bf16.dtype == torch.float32 and max_abs_diff(as_float, as_bf16) < 0.05


@pytest.mark.parametrize("tiles_per_image", [[1], [3], [2, 1], []], ids=str)
def test_logits_and_greedy_generation_match_reference(pair, tiles_per_image):
    reference, ours, _ = pair
    ids, pixels = _prompt(tiles_per_image)
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels, labels=ids)
        got = ours(input_ids=ids, pixel_values=pixels, labels=ids)
    assert max_abs_diff(got.logits, expected.logits) < TOL
    assert abs(got.loss.item() - expected.loss.item()) < TOL
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(ids, pixel_values=pixels, **kwargs),
                       reference.generate(ids, pixel_values=pixels, **kwargs))


def test_placeholder_count_must_match_image_features(pair):
    _, ours, _ = pair
    ids, pixels = _prompt([2])
    with pytest.raises(ValueError, match="8 image placeholder tokens but the images give 4 feature rows"):
        ours(input_ids=ids, pixel_values=pixels[:1])
    with pytest.raises(ValueError, match=r"pixel_values must be \(tiles, channels"):
        ours.vision_model(pixels[None])


def test_save_pretrained_round_trip_and_text_only_class(pair, tmp_path):
    import transformers

    reference, ours, folder = pair
    ours.save_pretrained(tmp_path / "out")
    back = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids, pixels = _prompt([1])
    with torch.no_grad():
        assert max_abs_diff(back(input_ids=ids, pixel_values=pixels).logits,
                            reference(input_ids=ids, pixel_values=pixels).logits) == 0
    text_only = herd.AutoModelForCausalLM.from_pretrained(folder, progress=False)
    assert isinstance(text_only, herd.Llama4ForCausalLM)
    assert isinstance(herd.AutoModelForImageTextToText.from_pretrained(folder, progress=False),
                      herd.Llama4ForConditionalGeneration)


def _left_padded_batch(rows, seed=2):
    """rows: (length, tiles, first placeholder) per row, tiles 0 for a text-only row.
    -> left-padded ids, attention mask, the pixel values of every row's tiles in order, and each
    row's own (ids, pixels) as it would be sent alone."""
    generator = torch.Generator().manual_seed(seed)
    width = max(length for length, _, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pixels, alone = [], []
    for row, (length, tiles, at) in enumerate(rows):
        tokens = torch.randint(3, 120, (length,), generator=generator)
        tokens[at : at + tiles * TOKENS_PER_TILE] = IMAGE
        own = torch.randn(tiles, 3, 56, 56, generator=generator) if tiles else None
        pixels += [own] if tiles else []
        ids[row, width - length :], mask[row, width - length :] = tokens, 1
        alone.append((tokens[None], own))
    return ids, mask, torch.cat(pixels), alone


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_left_padded_batch_of_image_and_text_rows(pair, attn):
    """Rows of different lengths, one text-only, images at different places, crossing attention
    chunks of 8: the reference's logits and tokens, and each row the tokens it gets alone."""
    reference, _, folder = pair
    ours = herd.Llama4ForConditionalGeneration.from_pretrained(folder, attn_implementation=attn, progress=False)
    ids, mask, pixels, alone = _left_padded_batch([(22, 2, 3), (11, 0, 0), (15, 1, 6)])
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        expected = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    real = mask.bool()
    assert max_abs_diff(got[real], expected[real]) < TOL
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    tokens = ours.generate(ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    assert torch.equal(tokens, reference.generate(ids, attention_mask=mask, pixel_values=pixels, **kwargs))
    if attn == "flex_attention":
        return  # uncompiled flex attention is slow on the CPU; it equals the reference, as sdpa does, and sdpa the rows
    for row, (own_ids, own_pixels) in enumerate(alone):
        single = ours.generate(own_ids, pixel_values=own_pixels, **kwargs)
        assert torch.equal(single[0, own_ids.shape[1] :], tokens[row, ids.shape[1] :]), row


def test_left_padded_batch_of_image_and_text_rows_on_the_fast_path(pair, monkeypatch):
    """The fast decoding path (the default on CUDA; run here uncompiled) on the same batch: the
    plain path's tokens and logits."""
    from herd.decoding import decoders

    monkeypatch.setattr(decoders, "FAST_DEVICES", ("cuda", "cpu"))
    _, ours, _ = pair
    ids, mask, pixels, _ = _left_padded_batch([(22, 2, 3), (11, 0, 0), (15, 1, 6)])
    kwargs = dict(attention_mask=mask, pixel_values=pixels, max_new_tokens=10, do_sample=False, pad_token_id=0,
                  eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    fast = ours.generate(ids, **kwargs)
    plain = ours.generate(ids, disable_compile=True, **kwargs)
    assert decoders.fast_decoder(ours).entry is not None  # the fast path really ran
    assert torch.equal(fast.sequences, plain.sequences)
    assert max(max_abs_diff(a, b) for a, b in zip(fast.logits, plain.logits)) < 1e-4
