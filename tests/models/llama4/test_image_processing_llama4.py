"""Llama 4 image processor against transformers' outputs.

transformers' Llama4 image processor needs torchvision, which has no CPU build here, so its outputs
were recorded on the GPU machine (scripts/make_llama4_image_fixtures.py) into
tests/fixtures/llama4_image_processor.safetensors; herd must reproduce them bit for bit.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from herd.models.llama4.image_processing_llama4 import (
    Llama4ImageProcessor,
    Llama4ImageProcessorFast,
    best_canvas,
    canvas_options,
)
from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests" / "fixtures" / "llama4_image_processor.safetensors"


def _fixture_script():
    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "scripts" / "make_llama4_image_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _fixture_script()
PHOTOS = [(p.stem, Image.open(p)) for p in sorted((SHARED_DATA / "images").iterdir())]
CASES = [(setting, name) for setting in SCRIPT.SETTINGS for name, _ in PHOTOS + list(SCRIPT.synthetic_images())]


@pytest.fixture(scope="module")
def recorded():
    return safe_open(str(FIXTURES), "pt")


@pytest.mark.parametrize("setting, name", CASES, ids=[f"{s}-{n}" for s, n in CASES])
def test_matches_reference_bit_for_bit(recorded, setting, name):
    images = dict(PHOTOS + list(SCRIPT.synthetic_images()))
    processor = Llama4ImageProcessorFast(**SCRIPT.SETTINGS[setting])
    out = processor(images=images[name], return_tensors="pt")
    expected = recorded.get_tensor(f"{setting}/{name}/pixel_values")
    assert out["pixel_values"].dtype == torch.bfloat16  # rescaled and normalized in bfloat16, as the reference
    assert torch.equal(out["pixel_values"], expected)
    assert torch.equal(out["aspect_ratios"], recorded.get_tensor(f"{setting}/{name}/aspect_ratios"))


@pytest.mark.parametrize("setting", list(SCRIPT.SETTINGS))
def test_batch_of_two_images(recorded, setting):
    out = Llama4ImageProcessor(**SCRIPT.SETTINGS[setting])(images=[PHOTOS[0][1], PHOTOS[1][1]], return_tensors="pt")
    assert torch.equal(out["pixel_values"], recorded.get_tensor(f"{setting}/batch_0_1/pixel_values"))
    assert torch.equal(out["aspect_ratios"], recorded.get_tensor(f"{setting}/batch_0_1/aspect_ratios"))


def test_canvases_by_hand():
    canvases = canvas_options(4, 10).tolist()
    assert sorted(map(tuple, canvases)) == sorted([(10, 40), (20, 20), (10, 10), (40, 10), (10, 30), (30, 10), (10, 20), (20, 10)])
    # 200x300 into tiles of 224: only 224x448 upscales (by 224/200 < 448/300): the smallest upscale wins
    options = torch.tensor([[224, 672], [672, 224], [224, 448], [448, 224], [224, 224]])
    assert best_canvas(200, 300, options) == (224, 448)
    assert best_canvas(200, 300, options, resize_to_max_canvas=True) == (224, 448)
    # too big for every canvas: the mildest downscale
    assert best_canvas(1000, 1000, canvas_options(4, 224)) == (448, 448)


def test_tile_count_is_capped_by_max_patches():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (2000, 300, 3), dtype=np.uint8))
    for max_patches in (1, 2, 5, 16):
        out = Llama4ImageProcessorFast(size={"height": 28, "width": 28}, max_patches=max_patches)(images=image, return_tensors="pt")
        rows, columns = out["aspect_ratios"][0].tolist()
        assert rows * columns <= max_patches
        assert out["pixel_values"].shape[0] == rows * columns + (1 if rows * columns > 1 else 0)
        assert rows >= columns  # a tall image gets a tall canvas (ratios not swapped)


def test_save_and_load(tmp_path):
    processor = Llama4ImageProcessorFast(size={"height": 56, "width": 56}, max_patches=9)
    processor.save_pretrained(tmp_path)
    again = Llama4ImageProcessorFast.from_pretrained(tmp_path)
    assert again.to_dict() == processor.to_dict()


def test_errors():
    processor = Llama4ImageProcessorFast(size={"height": 28, "width": 28})
    with pytest.raises(ValueError, match="do_resize=False"):
        processor(images=PHOTOS[0][1], do_resize=False)
    with pytest.raises(ValueError, match="square"):
        processor(images=PHOTOS[0][1], size={"height": 28, "width": 56})
    with pytest.raises(ValueError, match="max_patches"):
        processor(images=PHOTOS[0][1], max_patches=0)
    with pytest.raises(ValueError, match="no images"):
        processor(images=[])
