"""MllamaImageProcessor and MllamaProcessor against transformers on the CPU, over unusual inputs.

The oracle is transformers' PIL image processor (MllamaImageProcessorPil: torchvision is not
installed here, so no torchvision path is exercised) and its MllamaProcessor loaded from the same
folder. Outputs are compared bit for bit; where herd differs on purpose the test says so and checks
herd's own result by hand. Tiles are 16 pixels so that the whole file runs in a few seconds.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from herd.models.mllama import MllamaImageProcessor, MllamaProcessor
from herd.models.mllama import image_processing_mllama as herd_images
from tests.models.mllama.test_processing_mllama import (  # noqa: F401  (processor, reference: fixtures over this module's folder)
    processor,
    reference,
    write_processor_folder,
)

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"
TOKENIZER = SHARED / "tokenizers" / "llama3.1"
TILE = {"height": 16, "width": 16}
IMAGE = "<|image|>"
BOS = 128000
IMAGE_ID = 128256
TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module", autouse=True)
def quiet_loggers():
    import transformers

    transformers.logging.set_verbosity_error()
    for name in ("herd.image_utils", "herd.processing_utils", "herd.models.mllama.processing_mllama"):
        logging.getLogger(name).setLevel(logging.ERROR)


def reference_image_processor(**settings):
    from transformers.models.mllama.image_processing_pil_mllama import (
        MllamaImageProcessorPil,
    )

    return MllamaImageProcessorPil(**settings)


def as_array(value):
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def assert_same(expected, got):
    """Same keys in the same order, same types, shapes, dtypes and values (bit-exact)."""
    assert list(got.keys()) == list(expected.keys())
    for key, value in expected.items():
        mine = got[key]
        assert type(mine) is type(value), (key, type(mine), type(value))
        if isinstance(value, list):
            assert json.dumps(mine, default=lambda item: item.tolist()) == json.dumps(
                value, default=lambda item: item.tolist()
            ), key
            continue
        value, mine = as_array(value), as_array(mine)
        assert (mine.shape, mine.dtype) == (value.shape, value.dtype), key
        if value.dtype == object:  # ragged rows with return_tensors="np"
            assert [row.tolist() for row in mine] == [row.tolist() for row in value], key
            continue
        np.testing.assert_array_equal(mine, value, err_msg=key)


def compare_images(images, init=None, **call):
    init = {"size": TILE, **(init or {})}
    expected = reference_image_processor(**init)(images, **call)
    got = MllamaImageProcessor(**init)(images, **call)
    assert_same(expected, got)
    return got


def both_raise(images, init=None, **call):
    # The reference fails with ValueError, TypeError or its own validation error; herd with ValueError or TypeError.
    init = {"size": TILE, **(init or {})}
    with pytest.raises(Exception):  # noqa: B017
        reference_image_processor(**init)(images, **call)
    with pytest.raises((ValueError, TypeError)):
        MllamaImageProcessor(**init)(images, **call)


def rgb(height, width, seed=0):
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(array)


def rgba(height=20, width=30, seed=1):
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    return PIL.Image.fromarray(array, "RGBA")


# ----------------------------------------------------------------------------------------------
# Image processor: sizes, modes, input types
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width", [(1, 1), (1, 2000), (2000, 1), (1, 2), (2, 1), (17, 15), (15, 17), (33, 65), (1, 17), (301, 7)]
)
def test_extreme_sizes_and_aspect_ratios(height, width):
    out = compare_images(rgb(height, width), max_image_tiles=4)
    assert out["pixel_values"].shape == (1, 1, 4, 3, 16, 16)


def test_a_large_photo_with_its_real_tile_size():
    compare_images(rgb(1200, 700), {"size": {"height": 448, "width": 448}})


def palette_with_transparency():
    image = rgba().convert("RGB").convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 3
    return image


MODES = {
    "RGBA": lambda: rgba(),
    "L": lambda: rgba().convert("L"),
    "LA": lambda: rgba().convert("LA"),
    "P": lambda: rgba().convert("RGB").convert("P"),
    "P+transparency": palette_with_transparency,
    "PA": lambda: rgba().convert("PA"),
    "CMYK": lambda: rgba().convert("RGB").convert("CMYK"),
    "I;16": lambda: PIL.Image.fromarray(np.random.default_rng(2).integers(0, 65536, (20, 30), dtype=np.uint16)),
    "I": lambda: rgba().convert("I"),
    "F": lambda: rgba().convert("F"),
    "1": lambda: rgba().convert("1"),
    "RGBX": lambda: rgba().convert("RGBX"),
    "RGBa": lambda: rgba().convert("RGBa"),
    "YCbCr": lambda: rgba().convert("RGB").convert("YCbCr"),
    "HSV": lambda: rgba().convert("RGB").convert("HSV"),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_pil_modes_are_converted_as_the_reference(mode):
    compare_images(MODES[mode]())


@pytest.mark.parametrize(
    "mode, mean",
    [("LA", [0.5, 0.5]), ("LA", 0.5), ("PA", [0.4, 0.6]), ("L", 0.5), ("1", 0.5), ("I", 0.5), ("RGBA", [0.5] * 4)],
)
def test_modes_kept_without_rgb_conversion(mode, mean):
    # LA and PA images stay two-channel; herd refused them (PIL resizes them as LA) until this audit.
    image = MODES[mode]()
    out = compare_images(image, do_convert_rgb=False, image_mean=mean, image_std=mean)
    assert out["pixel_values"].shape[3] == len(np.array(image).reshape(20, 30, -1)[0, 0])
    compare_images(image, do_convert_rgb=False, do_normalize=False)


def test_modes_the_reference_refuses_without_rgb_conversion():
    # Three means against a 1-, 2- or 4-channel image; 16-bit and float pixels outside 0..255 / 0..1.
    for mode in ("L", "LA", "CMYK", "P"):
        both_raise(MODES[mode](), do_convert_rgb=False)
    for mode in ("I;16", "F"):
        both_raise(MODES[mode](), do_convert_rgb=False, image_mean=0.5, image_std=0.5)


def test_arrays_and_tensors():
    rng = np.random.default_rng(3)
    hwc = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    for image in (
        hwc,
        chw,
        hwc / 255.0,
        (hwc / 255.0).astype(np.float32),
        (hwc / 255.0).astype(np.float16),
        chw / 255.0,
        hwc.astype(np.float32),  # integer values in a float array: taken as 0..255
        hwc.astype(np.int64),
        hwc > 128,
        np.ones((20, 30, 3)),  # all 1.0: integer-valued, so 0..255 (1 out of 255)
        torch.from_numpy(chw),
        torch.from_numpy(hwc),
        torch.from_numpy(hwc).permute(2, 0, 1),  # not contiguous
        torch.from_numpy(chw).float() / 255,
        torch.rand(3, 20, 30, dtype=torch.float64),
        np.stack([hwc, hwc[::-1]]),  # a 4-D stack: one sample, two images
        torch.from_numpy(np.stack([chw, chw])),
    ):
        compare_images(image)
    compare_images(hwc, input_data_format="channels_last")
    compare_images(rng.integers(0, 256, (3, 20, 30), dtype=np.uint8), input_data_format="channels_first")
    compare_images([[hwc[..., 0]]], image_mean=0.5, image_std=0.5)  # 2-D arrays in a nested list
    compare_images(rng.integers(0, 256, (3, 1, 1), dtype=np.uint8))
    both_raise(hwc + 0.5)  # floats outside [0, 1]
    both_raise(hwc.astype(np.uint16) * 200)  # integers above 255
    both_raise(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8))  # channels cannot be inferred
    both_raise(torch.from_numpy(chw).bfloat16())


def test_exif_orientation_applies_to_loaded_files_only(tmp_path):
    image = rgb(20, 40)
    for orientation in (1, 3, 6, 8):
        exif = PIL.Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.jpg"
        image.save(path, "JPEG", exif=exif.tobytes())
        encoded = base64.b64encode(path.read_bytes()).decode()
        loaded = compare_images(str(path))
        compare_images(f"data:image/jpeg;base64,{encoded}")
        opened = compare_images(PIL.Image.open(path))
        # A path is loaded upright (rotated for 6 and 8: two tiles down); an opened PIL image is taken as stored.
        rotated = orientation in (6, 8)
        assert loaded["aspect_ratio_ids"].tolist() == [[5 if rotated else 2]]
        assert opened["aspect_ratio_ids"].tolist() == [[2]]


def test_saved_files_of_unusual_modes(tmp_path):
    palette = rgba().convert("RGB").convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=8)
    palette.save(tmp_path / "p.png", transparency=2)
    rgba().convert("LA").save(tmp_path / "la.png")
    MODES["I;16"]().save(tmp_path / "i16.png")
    rgba().convert("RGB").convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgba().convert("1").save(tmp_path / "one.png")
    frames = [rgba().convert("RGB").convert("P"), PIL.Image.new("P", (30, 20))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    for name in ("p.png", "la.png", "i16.png", "cmyk.jpg", "one.png", "anim.gif"):
        compare_images(str(tmp_path / name))
        compare_images(PIL.Image.open(tmp_path / name))


# ----------------------------------------------------------------------------------------------
# Image processor: batches and settings
# ----------------------------------------------------------------------------------------------


def test_batches_with_different_image_counts():
    a, b, c = rgb(20, 40, 1), rgb(40, 20, 2), rgb(16, 16, 3)
    for images in ([a], [a, b, c], (a, b), [[a], [b, c], [a, b, c]], [[a], []], [[], [a]], [[a, np.array(b)]]):
        compare_images(images)
    out = compare_images([[a], [], [a, b, c]], return_tensors="pt")
    assert out["num_tiles"] == [[2], [], [2, 2, 1]]
    assert out["aspect_ratio_ids"].tolist() == [[2, 0, 0], [0, 0, 0], [2, 5, 1]]
    # Padding images keep their first tile unmasked, as in the reference.
    assert out["aspect_ratio_mask"][1].tolist() == [[1, 0, 0, 0]] * 3


@pytest.mark.parametrize("max_image_tiles", [1, 2, 3, 5, 6, 8, 9, 16])
def test_max_image_tiles(max_image_tiles):
    images = [[rgb(10, 90), rgb(90, 10)], [rgb(30, 50)]]
    compare_images(images, max_image_tiles=max_image_tiles)
    compare_images(images, {"max_image_tiles": max_image_tiles})


def test_canvas_choice_matches_the_reference_everywhere():
    from transformers.models.mllama import image_processing_pil_mllama as reference

    randomness = random.Random(9)
    for _ in range(3000):
        height, width = randomness.randint(1, 4000), randomness.randint(1, 4000)
        tiles, tile = randomness.randint(1, 12), randomness.choice([1, 7, 14, 16, 224, 560])
        canvas = tuple(int(side) for side in reference.get_optimal_tiled_canvas(height, width, tiles, tile))
        assert herd_images.get_optimal_tiled_canvas(height, width, tiles, tile) == canvas
        expected = tuple(int(side) for side in reference.get_image_size_fit_to_canvas(height, width, *canvas, tile))
        assert herd_images.get_image_size_fit_to_canvas(height, width, *canvas, tile) == expected


def test_flags_sizes_means_and_filters():
    image = rgb(20, 41)
    for call in (
        {"do_rescale": False},
        {"do_normalize": False},
        {"do_rescale": False, "do_normalize": False},
        {"do_convert_rgb": False},
        {"rescale_factor": 1 / 127.5},
        {"image_mean": 0.3, "image_std": 0.2},
        {"image_mean": (0.1, 0.2, 0.3), "image_std": [0.3, 0.2, 0.1]},
        {"size": {"height": 24, "width": 24}},
        {"size": 24},
        {"device": "cpu", "return_tensors": "pt"},
    ):
        compare_images(image, **call)
    compare_images(np.asarray(image) / 255.0, do_rescale=False)
    for init in ({"size": 24}, {"size": (24, 24)}, {"size": {"height": 15, "width": 15}}, {"size": {"height": 1, "width": 1}}):
        compare_images(image, init)
    for resample in range(6):
        compare_images(image, resample=resample)
        compare_images(rgb(41, 20), {"resample": resample})
    compare_images(image, resample=PIL.Image.Resampling.LANCZOS)
    both_raise(image, image_mean=[0.1, 0.2], image_std=[0.3, 0.2])
    both_raise(image, size={"height": 24, "width": 20})
    both_raise(image, {"size": {"shortest_edge": 24}})
    both_raise(image, max_image_tiles=0)
    both_raise(image, foo=1)


@pytest.mark.parametrize("return_tensors", ["pt", "np", None])
def test_return_tensors(return_tensors):
    out = compare_images([[rgb(20, 40)], [rgb(40, 20), rgb(9, 9)]], return_tensors=return_tensors)
    kind = torch.Tensor if return_tensors == "pt" else np.ndarray
    assert all(isinstance(out[key], kind) for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"))
    assert out["pixel_values"].dtype in (np.float32, torch.float32) and out["num_tiles"] == [[2], [2, 1]]


def test_settings_round_trip_both_ways(tmp_path):
    settings = {
        "size": {"height": 24, "width": 24},
        "max_image_tiles": 2,
        "image_mean": [0.1, 0.2, 0.3],
        "image_std": [0.5, 0.4, 0.3],
        "resample": 3,
        "rescale_factor": 1 / 200,
        "do_convert_rgb": False,
    }
    reference_image_processor(**settings).save_pretrained(tmp_path / "transformers")
    MllamaImageProcessor(**settings).save_pretrained(tmp_path / "herd")
    read = lambda name: json.loads((tmp_path / name / "preprocessor_config.json").read_text())
    assert read("herd") == read("transformers")
    image = np.random.default_rng(4).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    expected = reference_image_processor(**settings)(image)
    assert_same(expected, MllamaImageProcessor.from_pretrained(tmp_path / "transformers")(image))
    assert_same(expected, type(reference_image_processor()).from_pretrained(tmp_path / "herd")(image))


# ----------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    assert TILE["height"] == TILE["width"]
    return write_processor_folder(tmp_path_factory.mktemp("mllama_audit"), TILE["height"], TEMPLATE)


def compare_calls(reference, processor, **kwargs):
    expected = reference(**kwargs)
    got = processor(**kwargs)
    assert_same(expected, got)
    return got


def both_refuse(reference, processor, match=None, **kwargs):
    with pytest.raises(Exception):  # noqa: B017 (the reference fails with IndexError in places)
        reference(**kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        processor(**kwargs)


def test_image_token_layouts_and_the_cross_attention_mask(processor, reference):
    a, b, c = rgb(20, 40), rgb(40, 20), rgb(16, 16)
    for text, images in (
        (IMAGE, a),
        ("hi " + IMAGE, a),
        (f"a {IMAGE}{IMAGE} b {IMAGE} c", [a, b, c]),
        (f"a {IMAGE} b {IMAGE}{IMAGE}", [a, b, c]),
        (f"x<|begin_of_text|>{IMAGE}y", a),
        (f"<|begin_of_text|><|begin_of_text|>{IMAGE}y", a),
        (f"x{IMAGE}y{IMAGE}{IMAGE}z", [a, b, c]),
        (f"<|python_tag|>{IMAGE}a", a),
    ):
        compare_calls(reference, processor, text=text, images=images, return_tensors="pt")
    # By hand: [BOS (tokenizer), BOS (processor), x, img, y, img, img, z]; image 0 is seen from its
    # token to the next one, each image of the group of two from its own token to the end.
    out = processor(text=f"x{IMAGE}y{IMAGE}{IMAGE}z", images=[[a, b, c]], return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert ids[:2] == [BOS, BOS] and [i for i, token in enumerate(ids) if token == IMAGE_ID] == [3, 5, 6]
    seen = out["cross_attention_mask"][0, :, :, 0].tolist()
    assert seen == [[0, 0, 0]] * 3 + [[1, 0, 0]] * 2 + [[0, 1, 0]] + [[0, 1, 1]] * 2
    # Tiles past an image's own are never seen: a (2 tiles), b (2), c (1).
    assert out["cross_attention_mask"][0, 7].tolist() == [[0] * 4, [1, 1, 0, 0], [1, 0, 0, 0]]


def test_batches_padding_and_truncation(processor, reference):
    a, b, c = rgb(20, 40), rgb(40, 20), rgb(16, 16)
    texts = [IMAGE + "short", f"a longer {IMAGE}{IMAGE} text here"]
    images = [[a], [b, c]]
    compare_calls(reference, processor, text=texts, images=images)
    compare_calls(reference, processor, text=texts, images=images, return_tensors="np")  # ragged: object arrays
    for kwargs in (
        {"padding": True},
        {"padding": True, "padding_side": "left"},
        {"padding": "max_length", "max_length": 20},
        {"padding": True, "pad_to_multiple_of": 8},
        {"padding": True, "return_attention_mask": False},
        {"padding": True, "return_token_type_ids": True, "return_length": True},
        {"padding": True, "return_special_tokens_mask": True, "return_offsets_mapping": True},
        {"padding": True, "add_special_tokens": False},
        {"padding": True, "text_kwargs": {"max_length": 12, "truncation": True}},
    ):
        compare_calls(reference, processor, text=texts, images=images, return_tensors="pt", **kwargs)
    three = [IMAGE + "a", IMAGE * 2 + "b", IMAGE * 3 + "c"]
    out = compare_calls(
        reference, processor, text=three, images=[[a], [a, b], [a, b, c]], padding=True, return_tensors="pt"
    )
    assert out["pixel_values"].shape == (3, 3, 4, 3, 16, 16)
    both_refuse(reference, processor, "truncation", text=["some words to cut" + IMAGE], images=[[a]], truncation=True, max_length=4)
    both_refuse(reference, processor, "Mismatch", text=texts, images=images, padding=True, return_tensors="pt",
                truncation=True, max_length=5, return_overflowing_tokens=True, stride=1)
    with pytest.raises(ValueError):
        reference(text=texts, images=images, return_tensors="pt")  # ragged rows
    with pytest.raises(ValueError, match="padding=True"):
        processor(text=texts, images=images, return_tensors="pt")


def test_image_and_token_count_mismatches(processor, reference):
    a, b = rgb(20, 40), rgb(40, 20)
    both_refuse(reference, processor, "Sample 0 has 1", text=IMAGE + "hi", images=[a, b])
    both_refuse(reference, processor, "Sample 0 has 2", text=IMAGE * 2 + "hi", images=[a])
    both_refuse(reference, processor, "no <|image|> token", text="hi", images=a)
    both_refuse(reference, processor, "no images were given", text=IMAGE + "hi")
    both_refuse(reference, processor, "2 text", text=[IMAGE + "a", IMAGE + "b"], images=[[a]])
    both_refuse(reference, processor, "nested list", text=[IMAGE + "a", IMAGE + "b"], images=[a, b])
    both_refuse(reference, processor, "no images", text="hi", images=[])
    # Only empty lists: the reference fails with an IndexError, herd says what is wrong.
    both_refuse(reference, processor, "only empty lists", text="hi", images=[[]])
    both_refuse(reference, processor, "only empty lists", text=["hi", "ho"], images=[[], []])


def test_other_inputs_and_kwargs_routes(processor, reference):
    a = rgb(20, 40)
    compare_calls(reference, processor, images=[[a], [rgb(9, 30), a]], return_tensors="pt")  # images alone
    compare_calls(reference, processor, text=["hi", "a longer one"], padding=True, return_tensors="pt")
    compare_calls(reference, processor, text="")
    compare_calls(reference, processor, text=(IMAGE + "a",), images=[a])
    compare_calls(reference, processor, text=IMAGE + "a", images=np.asarray(a), return_tensors="pt")
    compare_calls(reference, processor, text=IMAGE + "a", images=torch.from_numpy(np.array(a)).permute(2, 0, 1))
    compare_calls(reference, processor, text=IMAGE + "a", images=a, size={"height": 8, "width": 8}, do_normalize=False)
    compare_calls(reference, processor, text=IMAGE + "a", images=a, images_kwargs={"resample": 0, "max_image_tiles": 4})
    for group in ("images_kwargs", "common_kwargs", "text_kwargs"):
        compare_calls(reference, processor, text=IMAGE + "a", images=a, **{group: {"return_tensors": "pt"}})
    assert_same(reference(a, IMAGE + "x"), processor(a, IMAGE + "x"))  # positional images, text


def test_text_pair_and_targets_reach_the_tokenizer(processor, reference):
    """text_pair / text_target / text_pair_target go to the tokenizer as in transformers (herd dropped
    them with a warning before this audit): the pair's ids count in the cross-attention mask's length
    and the targets come back as labels."""
    a, b = rgb(20, 40), rgb(40, 20)
    for kwargs in (
        {"text": [IMAGE + "a"], "images": [[a]], "text_pair": ["b"]},
        {"text": [IMAGE + "a"], "images": [[a]], "text_target": ["b"]},
        {"text": [IMAGE + "a"], "images": [[a]], "text_target": "b"},
        {"text": [IMAGE + "a"], "images": [[a]], "text_pair": ["b"], "text_target": ["c"], "text_pair_target": ["d"]},
        {"text": [IMAGE + "a", IMAGE + "x y z"], "images": [[a], [b]], "text_pair": ["b", "c d"], "padding": True},
        {"text": [IMAGE + "a", IMAGE + "x"], "images": [[a], [b]], "text_kwargs": {"text_pair": ["b", "c d"]},
         "padding": True, "return_tensors": "pt"},
        {"text": "a", "text_target": "b"},
    ):
        compare_calls(reference, processor, **kwargs)
    out = processor(text=[IMAGE + "a"], images=[[a]], text_pair=["b"], text_target=["c"])
    assert out["input_ids"] == [[BOS, IMAGE_ID, BOS, 64, BOS, 65]] and out["labels"] == [[BOS, 66]]
    assert out["cross_attention_mask"].shape == (1, 6, 1, 4)
    both_refuse(reference, processor, "text_pair", text=IMAGE + "a", images=a, text_pair="b")
    # An image token in the pair has no image: both count the tokens of `text` only and refuse.
    both_refuse(reference, processor, "Mismatch", text=[IMAGE + "a"], images=[[a]], text_pair=["b" + IMAGE])


def test_chat_templates_with_images(processor, reference):
    a, b, c = rgb(20, 40), rgb(40, 20), rgb(16, 16)
    one = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "What?"}]}]
    two = [
        {"role": "user", "content": [{"type": "image", "image": np.asarray(b)}, {"type": "image", "image": c},
                                     {"type": "text", "text": "Compare"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": [{"type": "text", "text": "and"},
                                     {"type": "image", "image": torch.from_numpy(np.array(a)).permute(2, 0, 1)}]},
    ]
    assert processor.apply_chat_template(one, add_generation_prompt=True) == reference.apply_chat_template(
        one, add_generation_prompt=True
    )
    assert processor.apply_chat_template(two, continue_final_message=True) == reference.apply_chat_template(
        two, continue_final_message=True
    )
    assert processor.apply_chat_template(one, tokenize=True) == reference.apply_chat_template(one, tokenize=True)
    for conversation, kwargs in (
        (one, {"return_tensors": "np"}),
        (two, {"return_tensors": "pt"}),
        ([one, two], {"return_tensors": "pt", "padding": True}),
        (one, {"return_tensors": "pt", "images_kwargs": {"do_normalize": False}}),
        (one, {"return_tensors": "pt", "do_rescale": False}),
    ):
        expected = reference.apply_chat_template(conversation, tokenize=True, return_dict=True, **kwargs)
        got = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, **kwargs)
        assert_same(expected, got)


def test_processor_round_trips_with_custom_settings(tmp_path, reference, processor):
    import transformers

    settings = {"size": {"height": 24, "width": 24}, "max_image_tiles": 2, "resample": 3, "image_mean": [0.1, 0.2, 0.3]}
    kwargs = {"text": [IMAGE + "a", IMAGE * 2 + "b c"], "images": [[rgb(30, 50)], [rgb(10, 50), rgb(50, 10)]],
              "padding": True, "return_tensors": "pt"}
    theirs = transformers.MllamaProcessor(
        reference_image_processor(**settings), reference.tokenizer, chat_template=reference.chat_template
    )
    expected = theirs(**kwargs)
    theirs.save_pretrained(tmp_path / "transformers")
    loaded = MllamaProcessor.from_pretrained(tmp_path / "transformers")
    assert loaded.image_processor.max_image_tiles == 2 and loaded.chat_template == TEMPLATE
    assert_same(expected, loaded(**kwargs))
    loaded.save_pretrained(tmp_path / "herd")
    read = lambda name: json.loads((tmp_path / name / "processor_config.json").read_text())
    assert read("herd") == read("transformers")
    back = transformers.AutoProcessor.from_pretrained(tmp_path / "herd")
    assert type(back).__name__ == "MllamaProcessor"
    assert_same(expected, back(**kwargs))


def test_tokenizers_that_name_their_image_token(tmp_path, folder):
    import transformers

    for token in (IMAGE, "<img>"):
        path = tmp_path / ("named" if token == IMAGE else "custom")
        tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER, extra_special_tokens={"image_token": token})
        tokenizer.pad_token = "<|end_of_text|>"
        tokenizer.save_pretrained(path)
        shutil.copy(folder / "preprocessor_config.json", path)
        theirs, ours = transformers.AutoProcessor.from_pretrained(path), MllamaProcessor.from_pretrained(path)
        assert (ours.image_token, ours.image_token_id) == (theirs.image_token, theirs.image_token_id) == (token, 128256)
        kwargs = {"text": [token + "a", "b" + token], "images": [[rgb(20, 40)], [rgb(9, 9)]], "padding": True}
        assert_same(theirs(**kwargs, return_tensors="pt"), ours(**kwargs, return_tensors="pt"))


# ----------------------------------------------------------------------------------------------
# Deliberate differences, checked by hand
# ----------------------------------------------------------------------------------------------


def test_deliberate_differences(processor, reference, tmp_path):
    a = rgb(20, 40)
    # 1. A call's max_image_tiles: the reference sizes the cross-attention mask's tile axis with the
    #    processor's own setting (4) while pixel_values use the call's (1); herd uses the call's for both.
    call = {"text": IMAGE * 2 + "z", "images": [[a, a]], "max_image_tiles": 1, "return_tensors": "pt"}
    assert reference(**call)["cross_attention_mask"].shape[-1] == 4
    out = processor(**call)
    assert out["pixel_values"].shape[2] == out["cross_attention_mask"].shape[-1] == 1
    # 2. A text-only sample in a batch with images: the reference (5.17) refuses it; herd gives that row
    #    an all-zero cross-attention mask.
    with pytest.raises(ValueError):
        reference(text=[IMAGE + "hi", "plain"], images=[[a], []])
    out = processor(text=[IMAGE + "hi", "plain"], images=[[a], []], padding=True, return_tensors="pt")
    assert not out["cross_attention_mask"][1].any() and out["aspect_ratio_ids"].tolist() == [[2], [0]]
    # 3. A tokenizer without a BOS token: the reference fails in `bos_token in prompt`; herd adds nothing.
    tokenizer = processor.tokenizer
    saved_bos = tokenizer.bos_token
    try:
        tokenizer.bos_token = None
        no_bos = MllamaProcessor(processor.image_processor, tokenizer)
        assert no_bos(text=IMAGE + "a", images=a)["input_ids"] == [[BOS, IMAGE_ID, 64]]  # BOS from the post-processor only
    finally:
        tokenizer.bos_token = saved_bos
    # 4. Call-time do_pad=False / do_resize=False / data_format="channels_last": ignored by the reference,
    #    refused by herd (it cannot honour them).
    for settings in ({"do_pad": False}, {"do_resize": False}, {"data_format": "channels_last"}):
        reference_image_processor(size=TILE)(a, **settings)
        with pytest.raises(ValueError):
            MllamaImageProcessor(size=TILE)(a, **settings)
    # 5. Flat 2-D arrays (one grayscale image): the reference refuses them outside a nested list.
    gray = np.asarray(a)[..., 0]
    with pytest.raises(ValueError):
        reference_image_processor(size=TILE)(gray, image_mean=0.5, image_std=0.5)
    expected = reference_image_processor(size=TILE)([[gray]], image_mean=0.5, image_std=0.5)
    assert_same(expected, MllamaImageProcessor(size=TILE)(gray, image_mean=0.5, image_std=0.5))
