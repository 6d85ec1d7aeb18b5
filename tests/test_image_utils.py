"""herd.image_utils: loading images from anywhere, batching them, BatchFeature.

transformers' load_image is the oracle where it accepts the input (paths, data: URLs, base64, PIL).
"""

from __future__ import annotations

import base64
import http.server
import io
import socket
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from herd.image_utils import (
    BatchFeature,
    channel_format_of,
    convert_to_rgb,
    fetch_images,
    load_image,
    load_images,
    make_nested_list_of_images,
    to_channels_first_array,
)

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"
IMAGE_NAMES = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "horse.png", "rocket.jpg"]


def reference_load_image(source):
    from transformers.image_utils import load_image as transformers_load_image

    return transformers_load_image(source)


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image)


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Local files, PIL images, data: URLs and base64 text, against transformers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_path_loads_like_transformers(name):
    path = IMAGES / name
    image = load_image(str(path))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(pixels(image), pixels(reference_load_image(str(path))))
    # A pathlib.Path works too (transformers takes only str).
    np.testing.assert_array_equal(pixels(load_image(path)), pixels(image))


@pytest.mark.parametrize("name", ["horse.png", "camera.png"])
def test_pil_image_converts_like_transformers(name):
    original = PIL.Image.open(IMAGES / name)
    image = load_image(original)
    assert image.mode == "RGB" and image.size == original.size
    np.testing.assert_array_equal(pixels(image), pixels(reference_load_image(original)))


@pytest.mark.parametrize("with_prefix", [True, False])
def test_data_url_and_base64_load_like_transformers(with_prefix):
    encoded = base64.b64encode((IMAGES / "chelsea.png").read_bytes()).decode()
    source = f"data:image/png;base64,{encoded}" if with_prefix else encoded
    image = load_image(source)
    np.testing.assert_array_equal(pixels(image), pixels(reference_load_image(source)))
    np.testing.assert_array_equal(pixels(image), pixels(load_image(str(IMAGES / "chelsea.png"))))


def test_exif_orientation_is_applied_like_transformers(tmp_path):
    array = np.zeros((10, 30, 3), dtype=np.uint8)
    array[:, :5] = 255  # a white band on the left that moves with the rotation
    image = PIL.Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=100)
    loaded = load_image(str(path))
    assert loaded.size == (10, 30)  # width and height swapped
    np.testing.assert_array_equal(pixels(loaded), pixels(reference_load_image(str(path))))


# ----------------------------------------------------------------------------------------------
# Arrays and tensors
# ----------------------------------------------------------------------------------------------


LAYOUTS = [(1, "first"), (1, "last"), (1, "none"), (3, "first"), (3, "last"), (4, "first"), (4, "last")]


@pytest.mark.parametrize(("channels", "layout"), LAYOUTS)
@pytest.mark.parametrize("kind", ["numpy", "torch", "float"])
def test_arrays_and_tensors_load_as_rgb(channels, layout, kind):
    rng = np.random.default_rng(channels)
    hwc = rng.integers(0, 256, (6, 9, channels), dtype=np.uint8)
    expected = pixels(PIL.Image.fromarray(hwc[..., 0] if channels == 1 else hwc).convert("RGB"))
    array = {"first": np.transpose(hwc, (2, 0, 1)), "last": hwc, "none": hwc[..., 0]}[layout]
    if kind == "float":
        array = array.astype(np.float32) / 255
    elif kind == "torch":
        array = torch.from_numpy(np.ascontiguousarray(array))
    image = load_image(array)
    assert image.mode == "RGB" and image.size == (9, 6)
    np.testing.assert_array_equal(pixels(image), expected)


def test_unsupported_array_channels_fail_clearly():
    with pytest.raises(ValueError, match="channels"):
        load_image(np.zeros((6, 9, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        load_image(np.full((6, 9, 3), 300, dtype=np.int32))


def test_to_channels_first_array():
    hwc = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    chw = np.transpose(hwc, (2, 0, 1))
    np.testing.assert_array_equal(to_channels_first_array(hwc), chw)
    np.testing.assert_array_equal(to_channels_first_array(chw), chw)
    np.testing.assert_array_equal(to_channels_first_array(torch.from_numpy(hwc)), chw)
    np.testing.assert_array_equal(to_channels_first_array(PIL.Image.fromarray(hwc)), chw)
    assert to_channels_first_array(np.zeros((4, 7))).shape == (1, 4, 7)
    assert to_channels_first_array(PIL.Image.new("L", (7, 4))).shape == (1, 4, 7)
    # An explicit format wins over the guess.
    assert to_channels_first_array(np.zeros((3, 5, 3)), "channels_last").shape == (3, 3, 5)
    assert channel_format_of(np.zeros((3, 5, 3))) == "channels_first"  # ambiguous: first axis, as transformers
    assert channel_format_of(np.zeros((5, 7, 1))) == "channels_last"
    with pytest.raises(ValueError, match="Unsupported number of channels"):
        to_channels_first_array(np.zeros((5, 7, 4)))


def test_convert_to_rgb_composites_alpha_over_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept
    rgba[0, 1] = (10, 20, 30, 0)  # transparent: white
    converted = convert_to_rgb(PIL.Image.fromarray(rgba))
    assert converted.mode == "RGB"
    assert tuple(pixels(converted)[0, 0]) == (10, 20, 30)
    assert tuple(pixels(converted)[0, 1]) == (255, 255, 255)
    array = np.zeros((3, 2, 2))
    assert convert_to_rgb(array) is array  # arrays are left alone


# ----------------------------------------------------------------------------------------------
# http(s), against a local server
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_server():
    """A local HTTP server: /chelsea.png is an image, anything else is 404."""
    body = (IMAGES / "chelsea.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/chelsea.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_url_loads(image_server):
    image = load_image(f"{image_server}/chelsea.png", timeout=5)
    np.testing.assert_array_equal(pixels(image), pixels(load_image(str(IMAGES / "chelsea.png"))))


def test_http_errors_name_the_url(image_server):
    with pytest.raises(OSError, match="missing.png"):
        load_image(f"{image_server}/missing.png", timeout=5)


def test_http_timeout():
    # A server that accepts the connection and never answers.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        with pytest.raises(OSError, match="could not fetch"):
            load_image(f"http://127.0.0.1:{listener.getsockname()[1]}/slow.png", timeout=0.3)
    finally:
        listener.close()


# ----------------------------------------------------------------------------------------------
# Bad sources
# ----------------------------------------------------------------------------------------------


def test_bad_sources_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="not the path of an existing file"):
        load_image(str(tmp_path / "nowhere.png"))
    with pytest.raises(ValueError, match="Incorrect image source"):
        load_image("data:image/png;base64," + base64.b64encode(b"not an image").decode())
    with pytest.raises(TypeError, match="an image must be"):
        load_image(3.5)
    with pytest.raises(TypeError, match="images must be"):
        fetch_images([object()])


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def test_load_images_and_fetch_images_keep_nesting():
    path = str(IMAGES / "coffee.png")
    array = np.zeros((4, 4, 3), dtype=np.uint8)
    nested = load_images([[path], [path, path]])
    assert [len(sample) for sample in nested] == [1, 2]
    assert all(isinstance(image, PIL.Image.Image) for sample in nested for image in sample)
    fetched = fetch_images([[path, array]])
    assert isinstance(fetched[0][0], PIL.Image.Image) and fetched[0][1] is array  # in-memory images stay


def test_make_nested_list_of_images_like_transformers():
    from transformers.image_utils import make_nested_list_of_images as reference

    a, b, c = (np.zeros((4, 5, 3), dtype=np.uint8) for _ in range(3))
    pil = PIL.Image.new("RGB", (5, 4))
    cases = [a, pil, [a, b], [[a], [b, c]], [[a], []], np.stack([a, b]), [np.stack([a, b]), np.stack([c])]]
    for case in cases:
        expected = reference(case)
        got = make_nested_list_of_images(case)
        assert [len(sample) for sample in got] == [len(sample) for sample in expected]
    # 2-D arrays are grayscale images here (transformers rejects them).
    assert make_nested_list_of_images(np.zeros((4, 5)))[0][0].shape == (4, 5)
    with pytest.raises(ValueError, match="no images"):
        make_nested_list_of_images([])
    with pytest.raises(TypeError, match="sample 1"):
        make_nested_list_of_images([[a], ["text"]])


# ----------------------------------------------------------------------------------------------
# BatchFeature
# ----------------------------------------------------------------------------------------------


def test_batch_feature_tensors_and_to():
    features = BatchFeature(
        {"pixel_values": np.ones((1, 2), dtype=np.float32), "ids": [[1, 2]], "tiles": [np.array([1, 2])]},
        tensor_type="pt",
    )
    assert features.pixel_values.dtype == torch.float32 and features["ids"].dtype == torch.int64
    assert features.tiles.shape == (1, 2)
    features.to(torch.float16)
    assert features.pixel_values.dtype == torch.float16 and features.ids.dtype == torch.int64  # ids never cast
    features.to("cpu", dtype=torch.bfloat16)
    assert features.pixel_values.dtype == torch.bfloat16
    with pytest.raises(AttributeError, match="nothing"):
        getattr(features, "nothing")  # noqa: B009 (attribute access is what is tested)
    with pytest.raises(ValueError, match="device and/or a dtype"):
        features.to(3.5)
    as_numpy = BatchFeature({"ids": [[1, 2], [3]]}, tensor_type="np")
    assert as_numpy["ids"].dtype == object  # ragged rows
    with pytest.raises(ValueError, match="padding=True"):
        BatchFeature({"ids": [[1, 2], [3]]}, tensor_type="pt")
    with pytest.raises(ValueError, match="return_tensors"):
        BatchFeature({"ids": [1]}, tensor_type="tf")
