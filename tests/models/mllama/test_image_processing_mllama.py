"""MllamaImageProcessor against transformers' (its PIL backend, the one this machine has): outputs bit-exact."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from herd.models.mllama import MllamaImageProcessor, MllamaImageProcessorPil
from herd.models.mllama import image_processing_mllama as herd_module

IMAGES = Path(__file__).resolve().parents[4] / "shared" / "data" / "images"
IMAGE_NAMES = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "horse.png", "rocket.jpg"]
SMALL = {"height": 28, "width": 28}
# (height, width): tiny, square, just over a tile, very wide, very tall, odd ratios.
SIZES = [(1, 1), (3, 7), (7, 3), (28, 28), (29, 27), (56, 112), (100, 10), (10, 100), (2, 300), (300, 2), (113, 55)]


@pytest.fixture(scope="module", autouse=True)
def quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("herd.image_utils").setLevel(logging.ERROR)


def reference_class():
    # Without torchvision, transformers.MllamaImageProcessor is its PIL implementation.
    import transformers

    return transformers.MllamaImageProcessor


def assert_same_outputs(expected, got):
    assert list(got.keys()) == list(expected.keys())
    for key, value in expected.items():
        if key == "num_tiles":
            assert got[key] == value
            continue
        if isinstance(value, torch.Tensor):
            assert isinstance(got[key], torch.Tensor), key
            value, mine = value.numpy(), got[key].numpy()
        else:
            assert isinstance(got[key], np.ndarray), key
            mine = got[key]
        assert mine.shape == value.shape and mine.dtype == value.dtype, (key, mine.shape, value.shape)
        np.testing.assert_array_equal(mine, value, err_msg=key)  # bit-exact


def compare(images, init=None, **call):
    init = init or {}
    expected = reference_class()(**init)(images, **call)
    got = MllamaImageProcessor(**init)(images, **call)
    assert_same_outputs(expected, got)
    return got


def random_rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# Real photos
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGE_NAMES)
@pytest.mark.parametrize("max_image_tiles", [1, 2, 3, 4])
@pytest.mark.parametrize("tile", [28, 56])
def test_photos_match(name, max_image_tiles, tile):
    image = PIL.Image.open(IMAGES / name)
    out = compare(image, {"size": {"height": tile, "width": tile}, "max_image_tiles": max_image_tiles})
    assert out["pixel_values"].shape[:3] == (1, 1, max_image_tiles)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_photo_paths_match(name):
    # Paths are loaded (load_image: EXIF, convert("RGB")) before processing, in both.
    compare(str(IMAGES / name), {"size": {"height": 56, "width": 56}})


def test_photos_default_settings_and_tensors():
    images = [PIL.Image.open(IMAGES / name) for name in ("chelsea.png", "rocket.jpg")]
    out = compare(images, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 2, 4, 3, 224, 224)
    assert out["pixel_values"].dtype == torch.float32 and out["aspect_ratio_ids"].dtype == torch.int64


# ----------------------------------------------------------------------------------------------
# Synthetic images
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), SIZES)
@pytest.mark.parametrize("max_image_tiles", [1, 2, 3, 4])
def test_sizes_and_aspect_ratios_match(height, width, max_image_tiles):
    compare(PIL.Image.fromarray(random_rgb(height, width)), {"size": SMALL, "max_image_tiles": max_image_tiles})


@pytest.mark.parametrize(("height", "width"), [(1, 1), (3, 7), (40, 90), (90, 40)])
@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "I;16"])
def test_pil_modes_match(height, width, mode):
    rng = np.random.default_rng(1)
    if mode in ("L", "P"):
        image = PIL.Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), mode="L")
        image = image.convert(mode)
    elif mode == "I;16":
        image = PIL.Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint16))
    else:
        channels = 4 if mode == "RGBA" else 2
        image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode=mode)
    compare(image, {"size": SMALL})


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_without_rgb_conversion_match(mode):
    channels = {"L": 1, "RGBA": 4}[mode]
    image = PIL.Image.open(IMAGES / ("camera.png" if mode == "L" else "horse.png"))
    out = compare(image, {"size": SMALL}, do_convert_rgb=False, image_mean=0.5, image_std=0.5)
    assert out["pixel_values"].shape[3] == channels


@pytest.mark.parametrize(("height", "width"), [(5, 9), (40, 90), (90, 40), (300, 200)])
def test_arrays_and_tensors_match(height, width):
    hwc = random_rgb(height, width, seed=height)
    chw = np.ascontiguousarray(np.transpose(hwc, (2, 0, 1)))
    for image in (hwc, chw, torch.from_numpy(hwc), torch.from_numpy(chw)):
        compare(image, {"size": SMALL})
    compare(hwc, {"size": SMALL}, input_data_format="channels_last")
    # Floats in [0, 1] round-trip through uint8 for PIL; integer-valued floats are pixel values.
    compare(hwc.astype(np.float32) / 255, {"size": SMALL})
    compare(hwc.astype(np.float64), {"size": SMALL})
    compare(torch.from_numpy(chw).float() / 255, {"size": SMALL}, return_tensors="pt")
    # One channel arrays stay one channel (no RGB conversion for arrays, as in the reference).
    compare(hwc[..., :1], {"size": SMALL}, do_normalize=False)
    compare(chw[:1], {"size": SMALL}, image_mean=0.5, image_std=0.5)


def test_flags_match():
    image = PIL.Image.fromarray(random_rgb(45, 70))
    for flags in (
        {"do_rescale": False},
        {"do_normalize": False},
        {"do_rescale": False, "do_normalize": False},
        {"image_mean": [0.48, 0.45, 0.40], "image_std": [0.26, 0.26, 0.27]},
        {"rescale_factor": 0.5},
        {"resample": PIL.Image.Resampling.BICUBIC},
        {"resample": PIL.Image.Resampling.NEAREST, "max_image_tiles": 2},
        {"size": {"height": 56, "width": 56}},
    ):
        compare(image, {"size": SMALL}, **flags)
        compare(image, {"size": SMALL, **flags})  # the same as constructor settings


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def test_uneven_batches_match():
    images = [PIL.Image.fromarray(random_rgb(h, w, seed=i)) for i, (h, w) in enumerate(SIZES[:7])]
    batch = [[images[0]], [images[1], images[2], images[3]], [images[4], images[5]], [images[6]]]
    for max_image_tiles in (1, 2, 4):
        out = compare(batch, {"size": SMALL, "max_image_tiles": max_image_tiles}, return_tensors="pt")
        assert out["pixel_values"].shape[:3] == (4, 3, max_image_tiles)
        # Padding images: id 0, zeros, and (as in the reference) the first tile unmasked.
        assert out["aspect_ratio_ids"][0, 1:].tolist() == [0, 0]
        assert out["aspect_ratio_mask"][0, 1:].tolist() == [[1] + [0] * (max_image_tiles - 1)] * 2
        assert not out["pixel_values"][0, 1:].any()
    compare([[images[0]], []], {"size": SMALL})  # a sample without images


def test_flat_and_nested_lists_agree():
    images = [PIL.Image.fromarray(random_rgb(h, w, seed=i)) for i, (h, w) in enumerate([(30, 60), (60, 30), (9, 9)])]
    processor = MllamaImageProcessor(size=SMALL)
    flat = processor(images, return_tensors="pt")
    nested = processor([images], return_tensors="pt")
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(flat[key], nested[key])
    assert flat["num_tiles"] == nested["num_tiles"]
    compare(images, {"size": SMALL})
    # A 4-D array is a stack of images of one sample; a list of 4-D arrays, one stack per sample.
    stack = np.stack([random_rgb(20, 50, seed=s) for s in range(3)])
    compare(stack, {"size": SMALL})
    compare([stack, stack[:1]], {"size": SMALL})
    compare(torch.from_numpy(stack), {"size": SMALL})


def test_return_types():
    image = PIL.Image.fromarray(random_rgb(20, 20))
    processor = MllamaImageProcessor(size=SMALL)
    plain = processor(image)
    assert isinstance(plain["pixel_values"], np.ndarray) and plain["pixel_values"].dtype == np.float32
    assert plain.num_tiles == [[1]]  # attribute access
    as_numpy = processor(image, return_tensors="np")
    np.testing.assert_array_equal(as_numpy["pixel_values"], plain["pixel_values"])
    as_torch = processor(image, return_tensors="pt").to(torch.float16)
    assert as_torch.pixel_values.dtype == torch.float16 and as_torch.aspect_ratio_ids.dtype == torch.int64
    assert processor.preprocess(image)["num_tiles"] == [[1]]
    assert processor(image, return_tensors="pt", device="cpu").pixel_values.device.type == "cpu"


# ----------------------------------------------------------------------------------------------
# The helpers and the single-image steps
# ----------------------------------------------------------------------------------------------


def test_canvas_helpers_match():
    from transformers.models.mllama import image_processing_pil_mllama as reference

    for max_image_tiles in range(1, 9):
        assert herd_module.get_all_supported_aspect_ratios(
            max_image_tiles
        ) == reference.get_all_supported_aspect_ratios(max_image_tiles)
    sides = [1, 2, 13, 27, 28, 29, 55, 56, 57, 100, 111, 112, 113, 200, 448, 1000]
    for height in sides:
        for width in sides:
            for max_image_tiles in (1, 2, 4, 6):
                canvas = herd_module.get_optimal_tiled_canvas(height, width, max_image_tiles, 28)
                assert canvas == tuple(
                    int(v) for v in reference.get_optimal_tiled_canvas(height, width, max_image_tiles, 28)
                )
                fitted = herd_module.get_image_size_fit_to_canvas(height, width, *canvas, 28)
                assert fitted == tuple(
                    int(v) for v in reference.get_image_size_fit_to_canvas(height, width, *canvas, 28)
                )


def test_resize_and_pad_match_on_their_own():
    from transformers.image_utils import SizeDict

    reference = reference_class()(size=SMALL)
    processor = MllamaImageProcessor(size=SMALL)
    for height, width in [(5, 9), (40, 90), (90, 40), (28, 28)]:
        chw = np.ascontiguousarray(np.transpose(random_rgb(height, width), (2, 0, 1)))
        expected, expected_ratio = reference.resize(chw, SizeDict(**SMALL), max_image_tiles=4)
        resized, ratio = processor.resize(chw, SMALL, max_image_tiles=4)
        assert ratio == tuple(int(v) for v in expected_ratio)
        np.testing.assert_array_equal(resized, expected)
        np.testing.assert_array_equal(
            processor.pad(resized, SMALL, ratio), reference.pad(expected, SMALL, expected_ratio)
        )
        # Channels-last in, channels-last out; tensors in, tensors out.
        hwc_resized, _ = processor.resize(np.transpose(chw, (1, 2, 0)), SMALL, 4)
        np.testing.assert_array_equal(np.transpose(hwc_resized, (2, 0, 1)), expected)
        tensor_resized, _ = processor.resize(torch.from_numpy(chw), SMALL, 4, data_format="channels_first")
        np.testing.assert_array_equal(tensor_resized.numpy(), expected)
    padded = processor.pad(np.ones((3, 10, 20), dtype=np.uint8), {"height": 28, "width": 28}, (1, 2))
    assert padded.shape == (3, 28, 56) and padded.sum() == 3 * 10 * 20


def test_rescale_and_normalize_on_their_own():
    image = random_rgb(4, 4).transpose(2, 0, 1)
    processor = MllamaImageProcessor()
    rescaled = processor.rescale(image, 1 / 255)
    assert rescaled.dtype == np.float32
    normalized = processor.normalize(rescaled, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(normalized, rescaled * 2 - 1, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------


def test_save_and_load_round_trip_with_transformers(tmp_path):
    image = PIL.Image.open(IMAGES / "coffee.png")
    settings = {"size": {"height": 56, "width": 56}, "max_image_tiles": 3, "image_mean": [0.4, 0.5, 0.6]}
    reference_class()(**settings).save_pretrained(tmp_path / "from_transformers")
    loaded = MllamaImageProcessor.from_pretrained(tmp_path / "from_transformers")
    assert loaded.max_image_tiles == 3 and loaded.size == {"height": 56, "width": 56}
    assert_same_outputs(reference_class()(**settings)(image), loaded(image))

    loaded.save_pretrained(tmp_path / "from_herd")
    saved = json.loads((tmp_path / "from_herd" / "preprocessor_config.json").read_text())
    assert saved == json.loads((tmp_path / "from_transformers" / "preprocessor_config.json").read_text())
    back = reference_class().from_pretrained(tmp_path / "from_herd")
    assert_same_outputs(back(image), loaded(image))
    # Overrides at loading time, and a file path.
    assert MllamaImageProcessor.from_pretrained(tmp_path / "from_herd", max_image_tiles=2).max_image_tiles == 2
    assert (
        MllamaImageProcessor.from_pretrained(tmp_path / "from_herd" / "preprocessor_config.json").max_image_tiles == 3
    )


def test_loads_nested_processor_config(tmp_path):
    (tmp_path / "processor_config.json").write_text(
        json.dumps(
            {
                "image_processor": {"max_image_tiles": 2, "size": {"height": 28, "width": 28}},
                "processor_class": "MllamaProcessor",
            }
        )
    )
    loaded = MllamaImageProcessor.from_pretrained(tmp_path)
    assert loaded.max_image_tiles == 2 and loaded.size == SMALL
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="no image processor config"):
        MllamaImageProcessor.from_pretrained(tmp_path / "empty")


def test_aliases():
    import transformers

    assert hasattr(transformers, "MllamaImageProcessorPil")
    assert MllamaImageProcessorPil is MllamaImageProcessor


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_unsupported_settings_fail_like_the_reference():
    for settings in (
        {"do_pad": False},
        {"do_resize": False},
        {"max_image_tiles": 0},
        {"size": {"height": 28, "width": 56}},
    ):
        with pytest.raises(ValueError):
            reference_class()(**settings)
        with pytest.raises(ValueError, match="do_pad|do_resize|max_image_tiles|same height and width"):
            MllamaImageProcessor(**settings)
    # At call time the reference silently ignores do_pad=False / do_resize=False and tiles with a
    # non-square size; herd refuses them as it does in the constructor.
    processor = MllamaImageProcessor(size=SMALL)
    image = PIL.Image.fromarray(random_rgb(10, 10))
    for settings in (
        {"do_pad": False},
        {"do_resize": False},
        {"max_image_tiles": -1},
        {"size": {"height": 28, "width": 56}},
    ):
        with pytest.raises(ValueError, match="do_pad|do_resize|max_image_tiles|same height and width"):
            processor(image, **settings)
    with pytest.raises(TypeError, match="unexpected keyword"):
        processor(image, foo=1)


def test_bad_images_fail_clearly():
    processor = MllamaImageProcessor(size=SMALL)
    with pytest.raises(ValueError, match="no images"):
        processor([])
    with pytest.raises(ValueError, match="no images"):
        processor([[], []])
    with pytest.raises(ValueError, match="Unsupported number of channels"):
        processor(np.zeros((10, 10, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="Unsupported number of channels"):
        processor(np.zeros((2, 10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="image_mean has 3 values but the image has 1 channel"):
        processor(np.zeros((1, 10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        processor(np.full((10, 10, 3), -0.5, dtype=np.float32))
    with pytest.raises(TypeError, match="got int"):
        processor([[PIL.Image.new("RGB", (4, 4))], [3]])
    with pytest.raises(ValueError, match="Incorrect image source"):
        processor("not an image path")


def test_too_many_tiles_fail_clearly():
    with pytest.raises(ValueError, match="more than max_image_tiles=4"):
        herd_module.convert_aspect_ratios_to_ids([[(2, 3)]], max_image_tiles=4)
    processor = MllamaImageProcessor(size=SMALL)
    with pytest.raises(ValueError, match="larger"):
        processor.pad(np.zeros((3, 60, 10)), SMALL, (2, 1))
