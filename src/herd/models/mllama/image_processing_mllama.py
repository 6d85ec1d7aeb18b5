"""The Llama 3.2 Vision (Mllama) image processor.

Each image is resized (keeping its aspect ratio) to fit the best canvas made of up to
`max_image_tiles` square tiles of `size`, padded with zeros to fill that canvas, rescaled and
normalized, and cut into tiles. A batch is a list of samples, each with its own number of
images; outputs are padded to the largest number of images and to `max_image_tiles` tiles:

- pixel_values: (batch, max_num_images, max_image_tiles, channels, tile_height, tile_width)
- aspect_ratio_ids: (batch, max_num_images), 1 + the index of the image's tile arrangement in
  the supported arrangements, 0 for padding images
- aspect_ratio_mask: (batch, max_num_images, max_image_tiles), 1 for the tiles an image uses
  (the first tile is always 1, padding images included, as in the reference)
- num_tiles: list of lists, the number of tiles of each image

The arithmetic follows transformers' PIL backend step by step (uint8 resize through PIL, float64
rescale cast to float32, float32 normalization), so that the outputs are equal to its outputs.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import PIL.Image

from ...image_processing_utils import BaseImageProcessor
from ...image_utils import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    BatchFeature,
    channel_format_of,
    convert_to_rgb,
    fetch_images,
    make_nested_list_of_images,
    normalize_channel_format,
    to_channels_first_array,
)


IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# ImagesKwargs that transformers accepts for every image processor but Mllama does not use.
_UNUSED_IMAGE_KWARGS = ("default_to_square", "crop_size", "do_center_crop", "pad_size", "disable_grouping")


# ----------------------------------------------------------------------------------------------
# Choosing the canvas
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def get_all_supported_aspect_ratios(max_image_tiles: int) -> list[tuple[int, int]]:
    """Every (tiles down, tiles across) arrangement of at most `max_image_tiles` tiles, in the reference's order.

    >>> get_all_supported_aspect_ratios(4)
    [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    """
    return [
        (rows, columns)
        for rows in range(1, max_image_tiles + 1)
        for columns in range(1, max_image_tiles + 1)
        if rows * columns <= max_image_tiles
    ]


@lru_cache(maxsize=256)
def get_optimal_tiled_canvas(
    image_height: int, image_width: int, max_image_tiles: int, tile_size: int
) -> tuple[int, int]:
    """The (height, width) of the tile canvas an image is resized into.

    Each canvas allows the scale that fits the image inside it. If some canvas lets the image
    grow (or keep its size), the smallest such scale wins: the least upscaling. Otherwise the
    largest scale wins: the least downscaling. Ties go to the smallest canvas area, then to the
    first arrangement in the supported order.
    """
    canvases = [
        (rows * tile_size, columns * tile_size) for rows, columns in get_all_supported_aspect_ratios(max_image_tiles)
    ]
    scales = [min(height / image_height, width / image_width) for height, width in canvases]
    upscales = [scale for scale in scales if scale >= 1]
    chosen_scale = min(upscales) if upscales else max(scales)
    candidates = [canvas for canvas, scale in zip(canvases, scales) if scale == chosen_scale]
    # min() keeps the first of equal areas, like numpy's argmin.
    return min(candidates, key=lambda canvas: canvas[0] * canvas[1])


def get_image_size_fit_to_canvas(
    image_height: int, image_width: int, canvas_height: int, canvas_width: int, tile_size: int
) -> tuple[int, int]:
    """The (height, width) to resize an image to so that it fits the canvas with its aspect ratio.

    Each side is first brought within [tile_size, canvas side]; the side that must shrink the most
    (or grow the least) sets the scale, and the other side follows it (at least 1 pixel).
    """
    target_width = min(max(image_width, tile_size), canvas_width)
    target_height = min(max(image_height, tile_size), canvas_height)
    scale_height = target_height / image_height
    scale_width = target_width / image_width
    if scale_width < scale_height:
        new_width = target_width
        new_height = min(math.floor(image_height * scale_width) or 1, target_height)
    else:
        new_height = target_height
        new_width = min(math.floor(image_width * scale_height) or 1, target_width)
    return new_height, new_width


# ----------------------------------------------------------------------------------------------
# Pixel operations on (channels, height, width) arrays
# ----------------------------------------------------------------------------------------------


def _needs_scaling_for_pil(array: np.ndarray) -> bool:
    """Whether an array must be multiplied by 255 to become uint8 for PIL, as transformers decides it.

    uint8 and integer-valued arrays in [0, 255] go to PIL as they are; other floats must lie in [0, 1].
    """
    if array.dtype == np.uint8:
        return False
    if np.allclose(array, array.astype(int)):
        if np.all(array >= 0) and np.all(array <= 255):
            return False
        raise ValueError(
            f"cannot resize an image with values in [{array.min()}, {array.max()}]: integer pixel values must "
            "lie in [0, 255]"
        )
    if np.all(array >= 0) and np.all(array <= 1):
        return True
    raise ValueError(
        f"cannot resize an image with values in [{array.min()}, {array.max()}]: float pixel values must lie in "
        "[0, 1] (or be integers in [0, 255])"
    )


def rescale_array(image: np.ndarray, scale: float) -> np.ndarray:
    """image * scale, computed in float64 and returned as float32 (transformers' rescale)."""
    return (image.astype(np.float64) * scale).astype(np.float32)


def resize_channels_first(image: np.ndarray, height: int, width: int, resample: Any) -> np.ndarray:
    """Resize a (channels, height, width) array with PIL, keeping its value range.

    Float images in [0, 1] go through uint8 (x255, truncated) and come back divided by 255, as in
    transformers, which is why the result is exactly the reference's.
    """
    channels = image.shape[0]
    # 2 channels (an LA or PA image kept as it is with do_convert_rgb=False) resize as PIL's LA mode.
    if channels not in (1, 2, 3, 4):
        raise ValueError(f"cannot resize an image with {channels} channels: PIL handles 1 to 4 channels")
    pixels = np.transpose(image, (1, 2, 0))
    if channels == 1:
        pixels = pixels[..., 0]
    scaled = _needs_scaling_for_pil(pixels)
    if scaled:
        pixels = rescale_array(pixels, 255)
    resized = np.array(PIL.Image.fromarray(pixels.astype(np.uint8)).resize((width, height), resample=resample))
    if resized.ndim == 2:
        resized = resized[..., np.newaxis]
    resized = np.transpose(resized, (2, 0, 1))
    return rescale_array(resized, 1 / 255) if scaled else resized


def normalize_array(image: np.ndarray, mean: Any, std: Any) -> np.ndarray:
    """(image - mean) / std per channel of a (channels, height, width) array, in float32 for integer input."""
    channels = image.shape[0]
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    per_channel = []
    for name, value in (("image_mean", mean), ("image_std", std)):
        values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * channels
        if len(values) != channels:
            raise ValueError(
                f"{name} has {len(values)} values but the image has {channels} channel(s). Pass RGB images (PIL "
                f"images are converted when do_convert_rgb=True), or a {name} with one value per channel."
            )
        per_channel.append(np.array(values, dtype=image.dtype)[:, np.newaxis, np.newaxis])
    channel_mean, channel_std = per_channel
    return (image - channel_mean) / channel_std


def split_to_tiles(image: np.ndarray, tiles_down: int, tiles_across: int) -> np.ndarray:
    """(channels, H, W) -> (tiles_down * tiles_across, channels, H / tiles_down, W / tiles_across), row by row."""
    channels, height, width = image.shape
    tile_height, tile_width = height // tiles_down, width // tiles_across
    tiles = image.reshape(channels, tiles_down, tile_height, tiles_across, tile_width)
    tiles = tiles.transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(tiles.reshape(tiles_down * tiles_across, channels, tile_height, tile_width))


# ----------------------------------------------------------------------------------------------
# Batch outputs
# ----------------------------------------------------------------------------------------------


def pack_images(batch_tiles: list[list[np.ndarray]], max_image_tiles: int) -> tuple[np.ndarray, list[list[int]]]:
    """Stack per-image tiles into one zero-padded float32 array, and the number of tiles of each image."""
    first = next(tiles for sample in batch_tiles for tiles in sample)
    _, channels, tile_height, tile_width = first.shape
    max_num_images = max(len(sample) for sample in batch_tiles)
    stacked = np.zeros(
        (len(batch_tiles), max_num_images, max_image_tiles, channels, tile_height, tile_width), dtype=np.float32
    )
    num_tiles = []
    for sample_index, sample in enumerate(batch_tiles):
        for image_index, tiles in enumerate(sample):
            if tiles.shape[1] != channels:
                raise ValueError(
                    f"all images of a batch must have the same number of channels after conversion; sample "
                    f"{sample_index}, image {image_index} has {tiles.shape[1]}, the first image has {channels}"
                )
            stacked[sample_index, image_index, : tiles.shape[0]] = tiles
        num_tiles.append([tiles.shape[0] for tiles in sample])
    return stacked, num_tiles


def convert_aspect_ratios_to_ids(aspect_ratios: list[list[tuple[int, int]]], max_image_tiles: int) -> np.ndarray:
    """(batch, max_num_images) ids: 1 + index of each arrangement among the supported ones, 0 for padding."""
    supported = get_all_supported_aspect_ratios(max_image_tiles)
    max_num_images = max(len(sample) for sample in aspect_ratios)
    ids = np.zeros((len(aspect_ratios), max_num_images), dtype=np.int64)
    for sample_index, sample in enumerate(aspect_ratios):
        for image_index, arrangement in enumerate(sample):
            arrangement = tuple(int(n) for n in arrangement)
            if arrangement not in supported:
                raise ValueError(
                    f"sample {sample_index}, image {image_index} uses {arrangement[0]}x{arrangement[1]} tiles, more "
                    f"than max_image_tiles={max_image_tiles} supports (arrangements: {supported})"
                )
            ids[sample_index, image_index] = supported.index(arrangement) + 1
    return ids


def build_aspect_ratio_mask(aspect_ratios: list[list[tuple[int, int]]], max_image_tiles: int) -> np.ndarray:
    """(batch, max_num_images, max_image_tiles): 1 for each tile an image uses.

    The first tile is 1 for every slot, padding images included: the reference pads the list of
    aspect ratios with (1, 1), and the model relies on at least one unmasked tile per slot.
    """
    max_num_images = max(len(sample) for sample in aspect_ratios)
    mask = np.zeros((len(aspect_ratios), max_num_images, max_image_tiles), dtype=np.int64)
    mask[:, :, 0] = 1
    for sample_index, sample in enumerate(aspect_ratios):
        for image_index, (tiles_down, tiles_across) in enumerate(sample):
            mask[sample_index, image_index, : tiles_down * tiles_across] = 1
    return mask


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


def _size_dict(size: Any) -> dict[str, int]:
    """{"height": h, "width": w} from a dict, an int (a square) or a (height, width) pair."""
    if isinstance(size, dict) or hasattr(size, "keys"):
        size = {key: size[key] for key in size if size[key] is not None}
        if set(size) != {"height", "width"}:
            raise ValueError(f"size must be a dict with keys 'height' and 'width' (the tile size), got {size}")
        return {"height": int(size["height"]), "width": int(size["width"])}
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    raise ValueError(f"size must be a dict with keys 'height' and 'width' (the tile size), got {size!r}")


def _check_settings(do_resize: Any, size: dict, do_pad: Any, max_image_tiles: Any) -> None:
    if not do_pad:
        raise ValueError(
            "MllamaImageProcessor doesn't support `do_pad=False` mode: images are always padded to their tile canvas."
        )
    if not do_resize:
        raise ValueError(
            "MllamaImageProcessor doesn't support `do_resize=False` mode: images are always resized to their tile canvas."
        )
    if isinstance(max_image_tiles, bool) or not isinstance(max_image_tiles, (int, np.integer)) or max_image_tiles <= 0:
        raise ValueError(f"MllamaImageProcessor `max_image_tiles` must be a positive integer, got {max_image_tiles!r}.")
    if not (size.get("height") and size.get("width")):
        raise ValueError(f"Argument `size` must be a dictionary with keys 'height' and 'width'. Got: {size}")
    if size["height"] != size["width"]:
        raise ValueError(f"Argument `size` must have the same height and width (tiles are square), got {size}")


def _resample_filter(resample: Any) -> int:
    if isinstance(resample, bool) or not isinstance(resample, (int, np.integer)):
        raise TypeError(
            f"resample must be a PIL resampling filter (e.g. PIL.Image.Resampling.BILINEAR), got {resample!r}"
        )
    return int(resample)


# ----------------------------------------------------------------------------------------------
# The image processor
# ----------------------------------------------------------------------------------------------


class MllamaImageProcessor(BaseImageProcessor):
    """Turns images into Mllama's tiled pixel values (see the module docstring for the outputs).

    Call it (or `preprocess`) with a PIL image, a numpy array or a torch tensor (channels first or
    last), a path or URL, a list of them (one sample with several images) or a list of lists (one
    list per sample).
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values", "num_tiles", "aspect_ratio_ids", "aspect_ratio_mask"]
    defaults: ClassVar[dict[str, Any]] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": 224, "width": 224},
        "resample": PIL.Image.Resampling.BILINEAR,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_STANDARD_MEAN),
        "image_std": list(IMAGENET_STANDARD_STD),
        "do_pad": True,
        "max_image_tiles": 4,
    }
    ignored_settings = _UNUSED_IMAGE_KWARGS
    # The names preprocess() takes, used by the processor to route keyword arguments.
    valid_kwargs = (*defaults, "input_data_format", "data_format", "device", "return_tensors", *_UNUSED_IMAGE_KWARGS)

    def __init__(self, **kwargs: Any):
        """Settings as in `defaults` (None takes the default); unknown ones are kept and saved back."""
        super().__init__(**kwargs)
        self.size = _size_dict(self.size)
        self.resample = PIL.Image.Resampling(_resample_filter(self.resample))
        _check_settings(self.do_resize, self.size, self.do_pad, self.max_image_tiles)

    # -- single-image steps, usable on their own --

    def convert_to_rgb(self, image: Any) -> Any:
        """RGB copy of a PIL image (alpha over white); arrays and tensors are returned as they are."""
        return convert_to_rgb(image)

    def fetch_images(self, images: Any, timeout: float | None = None) -> Any:
        """Load the paths, URLs and base64 strings of a (nested) list of images; other images stay as they are."""
        return fetch_images(images, timeout=timeout)

    def resize(
        self,
        image: Any,
        size: dict[str, int],
        max_image_tiles: int,
        resample: int | None = None,
        data_format: str | None = None,
        input_data_format: str | None = None,
    ) -> tuple[Any, tuple[int, int]]:
        """Resize an image into its best tile canvas, keeping its aspect ratio.

        Returns the resized image (numpy, in `data_format`, by default the input's channel format;
        a torch tensor for a tensor input) and the (tiles down, tiles across) arrangement.
        """
        size = _size_dict(size)
        resample = self.resample if resample is None else _resample_filter(resample)
        array, input_format, was_tensor = _channels_first_input(image, input_data_format)
        height, width = array.shape[-2:]
        tile_size = size["height"]
        canvas_height, canvas_width = get_optimal_tiled_canvas(height, width, max_image_tiles, tile_size)
        new_height, new_width = get_image_size_fit_to_canvas(height, width, canvas_height, canvas_width, tile_size)
        resized = resize_channels_first(array, new_height, new_width, resample)
        arrangement = (canvas_height // tile_size, canvas_width // tile_size)
        return _channels_first_output(resized, data_format or input_format, was_tensor), arrangement

    def pad(
        self,
        image: Any,
        size: dict[str, int],
        aspect_ratio: tuple[int, int],
        data_format: str | None = None,
        input_data_format: str | None = None,
    ) -> Any:
        """Pad an image with zeros at the bottom and right to `aspect_ratio` tiles of `size`.

        With size {"height": 224, "width": 224} and aspect_ratio (1, 2) the result is 224x448.
        """
        size = _size_dict(size)
        array, input_format, was_tensor = _channels_first_input(image, input_data_format)
        tiles_down, tiles_across = aspect_ratio
        padded_height, padded_width = tiles_down * size["height"], tiles_across * size["width"]
        height, width = array.shape[-2:]
        if height > padded_height or width > padded_width:
            raise ValueError(
                f"cannot pad a {height}x{width} image to {padded_height}x{padded_width} ({tiles_down}x{tiles_across} "
                f"tiles of {size['height']}x{size['width']}): it is larger; resize it first"
            )
        padded = np.pad(array, ((0, 0), (0, padded_height - height), (0, padded_width - width)), mode="constant")
        return _channels_first_output(padded, data_format or input_format, was_tensor)

    def rescale(self, image: np.ndarray, scale: float, **kwargs: Any) -> np.ndarray:
        """image * scale as float32 (computed in float64)."""
        return rescale_array(np.asarray(image), scale)

    def normalize(self, image: np.ndarray, mean: Any, std: Any, **kwargs: Any) -> np.ndarray:
        """(image - mean) / std over the channels of a (channels, height, width) array."""
        return normalize_array(np.asarray(image), mean, std)

    # -- batches --

    def _settings_for_call(self, kwargs: dict) -> dict:
        unknown = sorted(set(kwargs) - set(self.valid_kwargs))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.preprocess() got unexpected keyword arguments {unknown}; it takes "
                f"{sorted(set(self.valid_kwargs) - set(_UNUSED_IMAGE_KWARGS))}"
            )
        settings = {name: getattr(self, name) for name in self.defaults}
        settings.update({key: value for key, value in kwargs.items() if value is not None})
        settings["size"] = _size_dict(settings["size"])
        settings["resample"] = _resample_filter(settings["resample"])
        _check_settings(settings["do_resize"], settings["size"], settings["do_pad"], settings["max_image_tiles"])
        if settings["do_rescale"] and settings["rescale_factor"] is None:
            raise ValueError("`rescale_factor` must be specified if `do_rescale` is `True`.")
        if settings["do_normalize"] and (settings["image_mean"] is None or settings["image_std"] is None):
            raise ValueError("`image_mean` and `image_std` must both be specified if `do_normalize` is `True`.")
        return settings

    def _tiles_of_image(self, image: Any, settings: dict) -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> (its tiles (n, channels, tile, tile), its (tiles down, tiles across))."""
        if settings["do_convert_rgb"]:
            image = convert_to_rgb(image)
        array = to_channels_first_array(image, settings.get("input_data_format"))
        size = settings["size"]
        resized, arrangement = self.resize(
            array, size, settings["max_image_tiles"], settings["resample"], input_data_format=CHANNELS_FIRST
        )
        padded = self.pad(resized, size, arrangement, input_data_format=CHANNELS_FIRST)
        if settings["do_rescale"]:
            padded = rescale_array(padded, settings["rescale_factor"])
        if settings["do_normalize"]:
            padded = normalize_array(padded, settings["image_mean"], settings["image_std"])
        return split_to_tiles(padded, *arrangement), arrangement

    def preprocess(
        self,
        images: Any,
        do_convert_rgb: bool | None = None,
        do_resize: bool | None = None,
        size: dict[str, int] | None = None,
        resample: int | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | list[float] | None = None,
        image_std: float | list[float] | None = None,
        do_pad: bool | None = None,
        max_image_tiles: int | None = None,
        input_data_format: str | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tile a batch of images; arguments left as None take the processor's settings.

        Returns a BatchFeature with pixel_values, aspect_ratio_ids and aspect_ratio_mask (numpy
        arrays, or torch tensors with return_tensors="pt") and num_tiles (a list of lists).
        """
        settings = self._settings_for_call(
            dict(
                do_convert_rgb=do_convert_rgb,
                do_resize=do_resize,
                size=size,
                resample=resample,
                do_rescale=do_rescale,
                rescale_factor=rescale_factor,
                do_normalize=do_normalize,
                image_mean=image_mean,
                image_std=image_std,
                do_pad=do_pad,
                max_image_tiles=max_image_tiles,
                input_data_format=input_data_format,
                **kwargs,
            )
        )
        data_format = normalize_channel_format(settings.get("data_format"))
        if data_format not in (None, CHANNELS_FIRST):
            raise ValueError(
                "MllamaImageProcessor only returns channels-first pixel values (data_format='channels_first')"
            )
        batch = make_nested_list_of_images(self.fetch_images(images))
        if not any(batch):
            raise ValueError("no images were given: every sample of the batch has an empty list of images")

        batch_tiles, batch_arrangements = [], []
        for sample in batch:
            tiles_and_arrangements = [self._tiles_of_image(image, settings) for image in sample]
            batch_tiles.append([tiles for tiles, _ in tiles_and_arrangements])
            batch_arrangements.append([arrangement for _, arrangement in tiles_and_arrangements])

        max_tiles = settings["max_image_tiles"]
        pixel_values, num_tiles = pack_images(batch_tiles, max_tiles)
        features = BatchFeature(
            {
                "pixel_values": pixel_values,
                "aspect_ratio_ids": convert_aspect_ratios_to_ids(batch_arrangements, max_tiles),
                "aspect_ratio_mask": build_aspect_ratio_mask(batch_arrangements, max_tiles),
            },
            tensor_type=return_tensors,
        )
        if settings.get("device") is not None and getattr(return_tensors, "value", return_tensors) == "pt":
            features.to(settings["device"])
        features["num_tiles"] = num_tiles
        return features


def _channels_first_input(image: Any, input_data_format: Any) -> tuple[np.ndarray, str, bool]:
    """(channels-first array, the input's channel format, whether it was a torch tensor)."""
    was_tensor = not isinstance(image, (np.ndarray, PIL.Image.Image))
    input_data_format = normalize_channel_format(input_data_format)
    if isinstance(image, PIL.Image.Image):
        return to_channels_first_array(image), CHANNELS_LAST, False
    array = image.detach().cpu().numpy() if was_tensor else image
    if array.ndim == 2:
        return array[np.newaxis], CHANNELS_FIRST, was_tensor
    input_format = input_data_format or channel_format_of(array)
    return to_channels_first_array(array, input_format), input_format, was_tensor


def _channels_first_output(array: np.ndarray, data_format: str, as_tensor: bool) -> Any:
    if normalize_channel_format(data_format) == CHANNELS_LAST:
        array = np.transpose(array, (1, 2, 0))
    if as_tensor:
        import torch

        return torch.from_numpy(np.ascontiguousarray(array))
    return array


# transformers 5 has a torchvision-backed MllamaImageProcessor and a PIL one, MllamaImageProcessorPil
# (what MllamaImageProcessor falls back to without torchvision); herd has one implementation,
# equal to the PIL one, under both names.
MllamaImageProcessorPil = MllamaImageProcessor

__all__ = ["MllamaImageProcessor", "MllamaImageProcessorPil"]
