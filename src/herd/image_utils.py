"""Images for processors: loading them from anywhere, arranging them in batches, and the
BatchFeature dict that processors return.

`load_image` turns a local path, an http(s) URL, a `data:` URL (or bare base64), a PIL image, a
numpy array or a torch tensor into an RGB PIL image, as transformers' `load_image` does for the
inputs it knows. Image processors keep PIL images, arrays and tensors as they are and only load
strings, so that their own RGB conversion (and its alpha handling) decides the pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import urllib.request
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

from .tokenization.encodings import BatchDict

logger = logging.getLogger(__name__)

# Seconds to wait for an http(s) image when the caller gives no timeout.
DEFAULT_URL_TIMEOUT = 10.0

# The channel counts an array image may have; the axis holding one of them is the channel axis.
ARRAY_CHANNEL_COUNTS = (1, 3)

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"

__all__ = [
    "CHANNELS_FIRST",
    "CHANNELS_LAST",
    "BatchFeature",
    "channel_format_of",
    "convert_to_rgb",
    "fetch_images",
    "is_valid_image",
    "load_image",
    "load_images",
    "make_nested_list_of_images",
    "to_channels_first_array",
]


# ----------------------------------------------------------------------------------------------
# What counts as an image
# ----------------------------------------------------------------------------------------------


def _is_torch_tensor(value: Any) -> bool:
    # torch is imported lazily: loading an image from a path should not need it.
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def is_valid_image(value: Any) -> bool:
    """True for a PIL image, a numpy array or a torch tensor (the in-memory image types)."""
    return isinstance(value, (PIL.Image.Image, np.ndarray)) or _is_torch_tensor(value)


def _tensor_to_numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def normalize_channel_format(value: Any) -> str | None:
    """'channels_first' / 'channels_last' (or None) from a string or an enum holding one."""
    if value is None:
        return None
    name = getattr(value, "value", value)
    if name in (CHANNELS_FIRST, "first"):
        return CHANNELS_FIRST
    if name in (CHANNELS_LAST, "last"):
        return CHANNELS_LAST
    raise ValueError(f"a channel format must be 'channels_first' or 'channels_last', got {value!r}")


def channel_format_of(array: np.ndarray) -> str:
    """Whether a 3-D array image is (channels, height, width) or (height, width, channels).

    As in transformers, the channel axis is the first or last axis of size 1 or 3, and the first
    axis wins when both qualify (a 3x5x3 array is 3 channels of 5x3).
    """
    if array.ndim != 3:
        raise ValueError(f"an array image has 3 dimensions (2 for grayscale), got shape {tuple(array.shape)}")
    if array.shape[0] in ARRAY_CHANNEL_COUNTS:
        if array.shape[-1] in ARRAY_CHANNEL_COUNTS:
            logger.warning(
                "The channel axis of an image of shape %s is ambiguous; taking the first axis as channels. "
                "Pass input_data_format='channels_last' if that is wrong.",
                tuple(array.shape),
            )
        return CHANNELS_FIRST
    if array.shape[-1] in ARRAY_CHANNEL_COUNTS:
        return CHANNELS_LAST
    raise ValueError(
        f"Unsupported number of channels for an image of shape {tuple(array.shape)}: array and tensor images "
        f"must have {' or '.join(map(str, ARRAY_CHANNEL_COUNTS))} channels, on the first or the last axis. For "
        "RGBA or other arrays, pass a PIL image instead, e.g. herd.image_utils.load_image(array), which converts "
        "it to RGB."
    )


def to_channels_first_array(image: Any, input_data_format: Any = None) -> np.ndarray:
    """A (channels, height, width) numpy array of an image, its dtype kept.

    PIL images with channels are read channels last; a 2-D array or a grayscale PIL image gets
    a channel axis of size 1; otherwise the channel axis is `input_data_format` or inferred.
    """
    input_data_format = normalize_channel_format(input_data_format)
    if isinstance(image, PIL.Image.Image):
        array = np.array(image)
        if array.ndim == 3 and input_data_format is None:
            input_data_format = CHANNELS_LAST
    elif _is_torch_tensor(image):
        array = _tensor_to_numpy(image)
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"an image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3:
        raise ValueError(
            f"an image has 2 (height, width) or 3 dimensions (with channels), got shape {tuple(array.shape)}"
        )
    if input_data_format is None:
        input_data_format = channel_format_of(array)
    if input_data_format == CHANNELS_LAST:
        array = np.transpose(array, (2, 0, 1))
    return array


# ----------------------------------------------------------------------------------------------
# RGB conversion
# ----------------------------------------------------------------------------------------------


def convert_to_rgb(image: Any) -> Any:
    """An RGB copy of a PIL image, transparent pixels laid over white; other inputs are returned as they are.

    This is the conversion the Mllama image processor applies (do_convert_rgb). Compositing over
    white rather than dropping the alpha channel keeps transparent areas from turning into
    whatever colour they happen to store.
    """
    if not isinstance(image, PIL.Image.Image) or image.mode == "RGB":
        return image
    with_alpha = image.convert("RGBA")
    white = PIL.Image.new("RGBA", with_alpha.size, (255, 255, 255))
    return PIL.Image.alpha_composite(white, with_alpha).convert("RGB")


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    """A PIL image of an array with 1, 3 or 4 channels on either end (or none), uint8 or float."""
    if array.ndim == 3:
        if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.transpose(array, (1, 2, 0))
        elif array.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"Unsupported number of channels for an image of shape {tuple(array.shape)}: "
                "expected 1, 3 or 4 channels on the first or the last axis"
            )
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(f"an array image has 2 or 3 dimensions, got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        if array.dtype == np.bool_:
            array = array.astype(np.uint8) * 255
        elif np.issubdtype(array.dtype, np.floating) and array.size and array.min() >= 0 and array.max() <= 1:
            # Floats in [0, 1] are read as intensities, like transformers' to_pil_image does.
            array = np.round(array.astype(np.float64) * 255)
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"cannot make an image of values in [{array.min()}, {array.max()}]: expected [0, 255] "
                "(or [0, 1] for floats)"
            )
        array = array.astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(array))


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _read_url(url: str, timeout: float | None) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "herd"})
    try:
        with urllib.request.urlopen(request, timeout=DEFAULT_URL_TIMEOUT if timeout is None else timeout) as reply:
            return reply.read()
    except OSError as error:  # URLError, HTTPError and socket timeouts are all OSErrors
        raise OSError(f"could not fetch the image at {url}: {error}") from error


def _decode_base64(text: str) -> bytes:
    if text.startswith("data:"):
        header, _, payload = text.partition(",")
        if not header.endswith(";base64"):
            raise ValueError(f"only base64 data: URLs are supported, got one starting with {header!r}")
        text = payload
    return base64.b64decode(text, validate=False)


def _open_image_bytes(data: bytes, source: str) -> PIL.Image.Image:
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{source} does not hold an image PIL can read: {error}") from error
    return image


def _describe(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def _image_from_string(source: str, timeout: float | None) -> PIL.Image.Image:
    if source.startswith(("http://", "https://")):
        return _open_image_bytes(_read_url(source, timeout), source)
    if os.path.isfile(source):
        image = PIL.Image.open(source)
        image.load()
        return image
    # Anything else must be base64 image data (a data: URL or bare base64), as in transformers.
    try:
        return _open_image_bytes(_decode_base64(source), "the base64 image data")
    except (binascii.Error, ValueError) as error:
        raise ValueError(
            f"Incorrect image source {_describe(source)!r}: it is not an http(s) URL, not the path of an "
            f"existing file, and not a data: URL or base64 text holding an image ({error})"
        ) from error


def load_image(image: Any, timeout: float | None = None) -> PIL.Image.Image:
    """An RGB PIL image from a path, an http(s) URL, a data: URL, base64 text, a PIL image, an array or a tensor.

    Arrays and tensors may be channels first or last with 1, 3 or 4 channels (uint8, or floats in
    [0, 1]). The EXIF orientation is applied. Like transformers, the result is `.convert("RGB")`:
    an alpha channel is dropped, not composited.
    """
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if isinstance(image, str):
        image = _image_from_string(image, timeout)
    elif _is_torch_tensor(image):
        image = _array_to_pil(_tensor_to_numpy(image))
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif not isinstance(image, PIL.Image.Image):
        raise TypeError(
            "an image must be a URL, a local path, a data: URL or base64 string, a PIL image, a numpy array or "
            f"a torch tensor, got {type(image).__name__}"
        )
    image = PIL.ImageOps.exif_transpose(image)
    return image.convert("RGB")


def load_images(images: Any, timeout: float | None = None) -> Any:
    """`load_image` over a single image, a list of images or a list of lists of images."""
    if isinstance(images, (list, tuple)):
        return [load_images(item, timeout=timeout) for item in images]
    return load_image(images, timeout=timeout)


def fetch_images(images: Any, timeout: float | None = None) -> Any:
    """Load the strings (paths, URLs, base64) of a possibly nested list; in-memory images stay as they are."""
    if isinstance(images, (list, tuple)):
        return [fetch_images(item, timeout=timeout) for item in images]
    if isinstance(images, (str, os.PathLike)):
        return load_image(images, timeout=timeout)
    if is_valid_image(images):
        return images
    raise TypeError(
        "images must be PIL images, numpy arrays, torch tensors, paths or URLs (or lists of them), got "
        f"{type(images).__name__}"
    )


# ----------------------------------------------------------------------------------------------
# Batches of images
# ----------------------------------------------------------------------------------------------


def _image_ndim(image: Any) -> int | None:
    """Dimensions of an array image; None for PIL images (always a single image)."""
    return None if isinstance(image, PIL.Image.Image) else image.ndim


def _is_list_of_images(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(is_valid_image(item) for item in value)


def _split_array_batch(image: Any) -> list:
    # A 4-D array is several 3-D images stacked on the first axis.
    return [image[index] for index in range(image.shape[0])]


def make_nested_list_of_images(images: Any) -> list[list[Any]]:
    """Images as a list (one entry per sample) of lists (that sample's images).

    A single image is one sample with one image; a flat list of images is ONE sample holding all
    of them (as in transformers); a list of lists is taken as it is (a sample may be empty). A
    4-D array or tensor stands for several images.
    """
    if isinstance(images, (list, tuple)) and images and all(isinstance(item, (list, tuple)) for item in images):
        for index, sample in enumerate(images):
            if sample and not _is_list_of_images(sample):
                bad = next(item for item in sample if not is_valid_image(item))
                raise TypeError(
                    f"sample {index} holds a {type(bad).__name__}; images must be PIL images, numpy arrays or "
                    "torch tensors"
                )
        return [[image for item in sample for image in _expand_array_batch(item)] for sample in images]
    if _is_list_of_images(images):
        if _image_ndim(images[0]) == 4:
            return [_split_array_batch(item) for item in images]
        return [[image for item in images for image in _expand_array_batch(item)]]
    if is_valid_image(images):
        return [_expand_array_batch(images)]
    if isinstance(images, (list, tuple)) and len(images) == 0:
        raise ValueError("no images were given (an empty list)")
    raise TypeError(
        "images must be a PIL image, a numpy array or a torch tensor, a list of them, or a list of lists of them "
        f"(one list per sample); got {type(images).__name__}"
    )


def _expand_array_batch(image: Any) -> list:
    if _image_ndim(image) == 4:
        return _split_array_batch(image)
    if _image_ndim(image) not in (None, 2, 3):
        raise ValueError(f"an image array has 2, 3 or (for a stack of images) 4 dimensions, got shape {image.shape}")
    return [image]


# ----------------------------------------------------------------------------------------------
# BatchFeature
# ----------------------------------------------------------------------------------------------


class BatchFeature(BatchDict):
    """What processors return: a dict of model inputs with attribute access (`out.pixel_values`).

    `to(device)` moves every tensor; `to(dtype)` (or `to(device, dtype)`) also casts the floating
    point ones only, so that token ids and masks keep their integer type.
    """
