"""Mllama on the fast path (decoding/plans/mllama.py): on the CPU the same code runs uncompiled and
uncaptured; its tokens and logits must equal the plain path's (the reference forward, itself
checked against transformers in tests/models/mllama)."""

from __future__ import annotations

import pytest
import torch

from herd.decoding import decoders
from tests.conftest import max_abs_diff
from tests.models.mllama.test_modeling_mllama import LEFT_PADDED_ROWS, _inputs, _left_padded, pair  # noqa: F401  (the fixture)


@pytest.fixture
def fast_on_cpu(monkeypatch):
    monkeypatch.setattr(decoders, "FAST_DEVICES", ("cuda", "cpu"))


def _both(model, inputs, **kwargs):
    kwargs = dict(max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                  return_dict_in_generate=True, **kwargs)
    return model.generate(**inputs, **kwargs), model.generate(**inputs, disable_compile=True, **kwargs)


@pytest.mark.parametrize(
    "batch_images, image_at",
    [
        ([[4]], (0, 5)),  # one image of 4 tiles at the start
        ([[4, 1], [2]], (0, 5)),  # two images in a row, rows of different image counts
        ([[3]], (6,)),  # text before the image: those rows see nothing, later ones do
        ([[2], []], (0, 5)),  # a row with no image at all: both gated branches give zero for it
    ],
    ids=str,
)
def test_fast_path_equals_the_plain_path_with_images(fast_on_cpu, pair, batch_images, image_at):  # noqa: F811
    _, model, _ = pair
    fast, plain = _both(model, _inputs(batch_images, image_at=image_at))
    assert torch.equal(fast.sequences, plain.sequences)
    assert max(max_abs_diff(a, b) for a, b in zip(fast.logits, plain.logits)) < 1e-4
    decoder = decoders.fast_decoder(model)
    assert decoder.entry is not None and decoder.entry.kv.cross is not None  # the fast path really ran, with the image
    image_tokens = sum(4 * 5 for _ in range(max(len(row) for row in batch_images)))  # images x tiles x tokens per tile
    assert decoder.entry.kv.cross.keys[1].shape[2] == image_tokens


def test_text_only_prompt_skips_the_cross_attention_layers(fast_on_cpu, pair):  # noqa: F811
    _, model, _ = pair
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    fast, plain = _both(model, {"input_ids": ids})
    assert torch.equal(fast.sequences, plain.sequences)
    assert max(max_abs_diff(a, b) for a, b in zip(fast.logits, plain.logits)) < 1e-4
    assert decoders.fast_decoder(model).entry.kv.cross is None


def test_the_image_store_is_reused_for_the_same_shape_and_refilled(fast_on_cpu, pair):  # noqa: F811
    _, model, _ = pair
    first = _inputs([[4]])
    model.generate(**first, max_new_tokens=3, do_sample=False, pad_token_id=0)
    store = decoders.fast_decoder(model).entry.kv.cross
    second = dict(first, pixel_values=torch.randn_like(first["pixel_values"]))
    fast, plain = _both(model, second)
    assert decoders.fast_decoder(model).entry.kv.cross is store  # same buffers: a captured graph stays valid
    assert torch.equal(fast.sequences, plain.sequences)  # and they hold the new image


def test_fp8_cache_on_the_fast_path_equals_the_plain_paths(fast_on_cpu, pair):  # noqa: F811
    """cache_config={"dtype": "fp8"}: the self-attention layers' keys/values in FP8 on both paths,
    the image's cross-attention keys/values in the model's dtype."""
    _, model, _ = pair
    fast, plain = _both(model, _inputs([[4, 1], [2]], image_at=(0, 5)), cache_config={"dtype": "fp8"})
    assert torch.equal(fast.sequences, plain.sequences)
    assert max(max_abs_diff(a, b) for a, b in zip(fast.logits, plain.logits)) < 1e-4
    kv = decoders.fast_decoder(model).entry.kv
    assert kv.full.keys and all(keys.dtype == torch.float8_e4m3fn for keys in kv.full.keys.values())
    assert all(keys.dtype == model.dtype for keys in kv.cross.keys.values())


def test_left_padded_batch_mixing_image_and_text_rows(fast_on_cpu, pair):  # noqa: F811
    """Rows padded by different amounts, one with text before its image, one text-only: the fast
    path's tokens and logits equal the plain path's (itself checked against transformers and rows
    alone in tests/models/mllama)."""
    _, model, _ = pair
    inputs, _ = _left_padded(LEFT_PADDED_ROWS)
    fast, plain = _both(model, inputs)
    assert torch.equal(fast.sequences, plain.sequences)
    assert max(max_abs_diff(a, b) for a, b in zip(fast.logits, plain.logits)) < 1e-4
    assert decoders.fast_decoder(model).entry.kv.cross is not None  # the fast path really ran, with the images
