"""Mllama configurations the fuzz (tests/fuzz/test_mllama.py) does not draw, against transformers.

Vision towers of other shapes (no or more global layers, other intermediate_layers_indices, negative ones included,
max_num_tiles 1, 2 and 6 with their own supported_aspect_ratios, images of different tile counts per row) and a
cross-attention layer at layer 0, which transformers 5.17 runs only without a cache.
"""

from __future__ import annotations

import copy

import pytest
import torch

import herd
from tests.fuzz._diff import _randomize, assert_close

IMAGE = 128
DEFAULT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
SIX_TILES = [[1, 1], [1, 2], [2, 1], [1, 3], [3, 1], [2, 2], [1, 4], [4, 1], [1, 5], [5, 1], [1, 6], [2, 3], [3, 2], [6, 1]]

CASES = {
    "no_global_layers": (dict(num_global_layers=0), ((1, 3), (2,))),
    "three_global_layers": (dict(num_global_layers=3), ((4,), (2, 1))),
    "one_intermediate_layer": (dict(intermediate_layers_indices=[1]), ((1, 3), (2,))),
    "intermediate_layers_reversed_and_repeated": (dict(intermediate_layers_indices=[1, 0, 0]), ((1, 3), (2,))),
    "negative_intermediate_index": (dict(intermediate_layers_indices=[-1, 0]), ((1, 3), (2,))),
    "one_tile": (dict(max_num_tiles=1, supported_aspect_ratios=[[1, 1]]), ((1, 1), (1,))),
    "two_tiles": (dict(max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]), ((1, 2), (2,))),
    "six_tiles": (dict(max_num_tiles=6, supported_aspect_ratios=SIX_TILES), ((1, 6), (5, 3, 2))),
}


def _model(tmp_path, vision=None, cross_layers=(1,)):
    import transformers

    vision_config = dict(hidden_size=16, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=32,
                         image_size=28, patch_size=14, intermediate_layers_indices=[0, 1], max_num_tiles=4)
    vision_config.update(vision or {})
    vision_config["vision_output_dim"] = 16 * (len(vision_config["intermediate_layers_indices"]) + 1)
    text_config = dict(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, cross_attention_layers=list(cross_layers), pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, max_position_embeddings=256)
    torch.manual_seed(0)
    config = transformers.MllamaConfig(text_config=text_config, vision_config=vision_config, image_token_index=IMAGE)
    reference = _randomize(transformers.MllamaForConditionalGeneration(config), gates=True)
    reference.save_pretrained(tmp_path)
    return reference, herd.MllamaForConditionalGeneration.from_pretrained(tmp_path, progress=False), vision_config


def _inputs(vision_config, tiles_per_row, length=10):
    """Each row's images at tokens 0, 3, 6, ...; every token from an image on sees it (so every token sees one)."""
    ratios = vision_config.get("supported_aspect_ratios") or DEFAULT_RATIOS
    tiles, rows, images = vision_config["max_num_tiles"], len(tiles_per_row), max(map(len, tiles_per_row))
    generator = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(rows, images, tiles, 3, 28, 28, generator=generator)
    aspect_ratio_ids = torch.zeros(rows, images, dtype=torch.long)
    aspect_ratio_mask = torch.zeros(rows, images, tiles, dtype=torch.long)
    ids = torch.randint(3, IMAGE, (rows, length), generator=generator)
    cross = torch.zeros(rows, length, images, tiles, dtype=torch.long)
    for row, counts in enumerate(tiles_per_row):
        for image, count in enumerate(counts):
            aspect_ratio_ids[row, image] = 1 + next(i for i, (h, w) in enumerate(ratios) if h * w == count)
            aspect_ratio_mask[row, image, :count] = 1
            ids[row, 3 * image] = IMAGE
            cross[row, 3 * image:, image, :count] = 1
    return dict(input_ids=ids, pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
                aspect_ratio_mask=aspect_ratio_mask, cross_attention_mask=cross)


GREEDY = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("case", list(CASES))
def test_vision_config_variants_match_reference(tmp_path, case):
    vision, tiles_per_row = CASES[case]
    reference, ours, vision_config = _model(tmp_path, vision)
    inputs = _inputs(vision_config, tiles_per_row)
    with torch.no_grad():
        assert_close(ours(**inputs).logits, copy.deepcopy(reference)(**inputs).logits)
    assert torch.equal(ours.generate(**inputs, **GREEDY), copy.deepcopy(reference).generate(**inputs, **GREEDY))


def test_cross_attention_at_layer_0_matches_uncached_reference(tmp_path):
    """transformers 5.17 fails (IndexError) with a cache when layer 0 is a cross-attention layer; herd runs it, and
    its cached forward and greedy generate equal transformers' uncached forwards."""
    reference, ours, vision_config = _model(tmp_path, cross_layers=(0, 2))
    inputs = _inputs(vision_config, ((1, 3), (2,)))
    with torch.no_grad():
        expected = reference(**inputs, use_cache=False).logits
        assert_close(ours(**inputs).logits, expected)
        got = ours.generate(**inputs, **GREEDY)
        step = dict(inputs)
        for _ in range(GREEDY["max_new_tokens"]):  # greedy, uncached; new tokens see what the last one saw
            token = reference(**step, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            step["input_ids"] = torch.cat([step["input_ids"], token], dim=1)
            mask = step["cross_attention_mask"]
            step["cross_attention_mask"] = torch.cat([mask, mask[:, -1:]], dim=1)
    assert torch.equal(got, step["input_ids"])
