"""Llama 4 image processor: an image becomes tiles of `size` on the best-fitting canvas of at most
`max_patches` tiles, plus one global (thumbnail) tile when there is more than one.

What we match in the reference (transformers' torchvision path):
- the canvases: every (rows, columns) grid with rows x columns <= max_patches;
- the best fit: the smallest upscale >= 1 (or, with resize_to_max_canvas, the largest), else the
  mildest downscale; ties go to the smaller canvas; upscaling is capped at the tile size unless
  resize_to_max_canvas;
- bilinear antialiased resize of uint8 pixels, zero padding on the bottom/right, rescale and
  normalize in bfloat16 (the output is bfloat16, as in the original implementation);
- tiles in row-major order; pixel_values of all images concatenated on the first axis.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from torch import nn

from ...image_processing_utils import BaseImageProcessor
from ...image_utils import BatchFeature, make_nested_list_of_images, to_channels_first_array


def canvas_options(max_patches: int, tile_size: int) -> torch.Tensor:
    """(N, 2) canvas sizes (height, width) in pixels, in the reference's order: grouped by aspect
    ratio, ratios in order of first appearance from max_patches tiles down to 1."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for tiles in range(max_patches, 0, -1):
        for rows in sorted(d for d in range(1, tiles + 1) if tiles % d == 0):
            by_ratio.setdefault(rows / (tiles // rows), []).append((rows, tiles // rows))
    return torch.tensor([(r * tile_size, c * tile_size) for grids in by_ratio.values() for r, c in grids])


def best_canvas(height: int, width: int, canvases: torch.Tensor, resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """The canvas the image fits best without distortion (see the module docstring)."""
    scales = torch.minimum(canvases[:, 0] / height, canvases[:, 1] / width)  # the limiting side's scale
    upscales = scales[scales >= 1]
    if len(upscales):
        chosen = upscales.max() if resize_to_max_canvas else upscales.min()
    else:
        chosen = scales[scales < 1].max()
    candidates = canvases[scales == chosen]
    best = candidates[torch.argmin(candidates[:, 0] * candidates[:, 1])]
    return int(best[0]), int(best[1])


def size_without_distortion(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """The largest (height, width) of the image's aspect ratio inside the target.

    The scales are float32, as in the reference (its target is an integer tensor): 600 * (168 / 400)
    floors to 251 there, where float64 gives 252.
    """
    scale_w = torch.tensor(target_width) / width
    scale_h = torch.tensor(target_height) / height
    if scale_w < scale_h:
        return min(int(torch.floor(height * scale_w)), target_height), target_width
    return target_height, min(int(torch.floor(width * scale_h)), target_width)


def resize_bilinear(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (channels, h, w) -> uint8 (channels, height, width), antialiased bilinear (torchvision's tensor resize)."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    resized = nn.functional.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True,
                                        align_corners=False)
    return resized[0]


def split_to_tiles(image: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """(channels, rows * h, columns * w) -> (rows * columns, channels, h, w), row-major."""
    channels, height, width = image.shape
    tiles = image.view(channels, rows, height // rows, columns, width // columns)
    return tiles.permute(1, 3, 0, 2, 4).reshape(rows * columns, channels, height // rows, width // columns)


class Llama4ImageProcessorFast(BaseImageProcessor):
    """Turns images into Llama 4 tiles plus a global tile (see the module docstring); settings in `defaults`."""

    model_input_names = ["pixel_values"]
    defaults: ClassVar[dict[str, Any]] = {
        "do_resize": True, "size": {"height": 336, "width": 336}, "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True, "max_patches": 16, "resize_to_max_canvas": False,
    }
    valid_kwargs = (*defaults, "return_tensors")

    def _rescale_and_normalize(self, image: torch.Tensor, do_rescale: bool, do_normalize: bool) -> torch.Tensor:
        # In bfloat16, as the original implementation does (and the reference reproduces).
        if do_rescale and do_normalize:
            image = image.to(torch.bfloat16) * self.rescale_factor
        elif do_rescale:
            return image * self.rescale_factor
        if do_normalize:
            mean = torch.tensor(self.image_mean, dtype=image.dtype)[:, None, None]
            std = torch.tensor(self.image_std, dtype=image.dtype)[:, None, None]
            image = (image - mean) / std
        return image

    def _tiles_of(self, image: torch.Tensor, tile: int, canvases: torch.Tensor, resize_to_max_canvas: bool,
                  do_rescale: bool, do_normalize: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 (3, h, w) -> tiles (n, 3, tile, tile) and the grid (rows, columns)."""
        height, width = image.shape[-2:]
        canvas_h, canvas_w = best_canvas(height, width, canvases, resize_to_max_canvas)
        if resize_to_max_canvas:
            limit_h, limit_w = canvas_h, canvas_w
        else:  # never upscale past the tile size
            limit_h, limit_w = min(max(height, tile), canvas_h), min(max(width, tile), canvas_w)
        new_h, new_w = size_without_distortion(height, width, limit_h, limit_w)
        resized = resize_bilinear(image, max(new_h, 1), max(new_w, 1))
        canvas = nn.functional.pad(resized, (0, canvas_w - resized.shape[-1], 0, canvas_h - resized.shape[-2]))
        rows, columns = canvas_h // tile, canvas_w // tile
        tiles = split_to_tiles(self._rescale_and_normalize(canvas, do_rescale, do_normalize), rows, columns)
        if rows * columns > 1:  # a global view of the whole image, squeezed to one tile
            thumbnail = self._rescale_and_normalize(resize_bilinear(image, tile, tile), do_rescale, do_normalize)
            tiles = torch.cat([tiles, thumbnail[None]], dim=0)
        return tiles, (rows, columns)

    def preprocess(self, images: Any, do_resize: bool | None = None, size: dict[str, int] | None = None,
                   do_rescale: bool | None = None, do_normalize: bool | None = None, do_convert_rgb: bool | None = None,
                   max_patches: int | None = None, resize_to_max_canvas: bool | None = None,
                   return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        kwargs.pop("input_data_format", None)
        if kwargs:
            raise TypeError(f"Llama4ImageProcessorFast got unexpected arguments: {', '.join(kwargs)}")
        if not (self.do_resize if do_resize is None else do_resize):
            raise ValueError("Llama 4 always resizes images to one of its canvases: do_resize=False is not supported")
        size = dict(size or self.size)
        if size["height"] != size["width"]:
            raise ValueError(f"Llama 4 tiles are square: size {size} must have height == width")
        tile = size["height"]
        max_patches = self.max_patches if max_patches is None else max_patches
        if not isinstance(max_patches, int) or max_patches < 1:
            raise ValueError(f"max_patches must be a positive integer, got {max_patches!r}")
        resize_to_max_canvas = self.resize_to_max_canvas if resize_to_max_canvas is None else resize_to_max_canvas
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        canvases = canvas_options(max_patches, tile)

        all_tiles, aspect_ratios = [], []
        for sample in make_nested_list_of_images(images):
            for image in sample:
                if do_convert_rgb and isinstance(image, PIL.Image.Image) and image.mode != "RGB":
                    image = image.convert("RGB")  # the reference drops alpha here (no compositing)
                array = to_channels_first_array(image)
                if array.shape[0] != 3:
                    raise ValueError(f"Llama 4 images need 3 channels (RGB), got {array.shape[0]}")
                tensor = torch.from_numpy(np.ascontiguousarray(array))
                if tensor.dtype != torch.uint8:
                    tensor = tensor.clamp(0, 255).round().to(torch.uint8) if tensor.is_floating_point() else tensor.to(torch.uint8)
                tiles, grid = self._tiles_of(tensor, tile, canvases, resize_to_max_canvas, do_rescale, do_normalize)
                all_tiles.append(tiles)
                aspect_ratios.append(list(grid))
        if not all_tiles:
            raise ValueError("no images were given")
        pixel_values = torch.cat(all_tiles, dim=0) if return_tensors else all_tiles
        data = {"pixel_values": pixel_values, "aspect_ratios": torch.tensor(aspect_ratios) if return_tensors else aspect_ratios}
        return BatchFeature(data)


# The reference renamed it without the suffix; both names work.
Llama4ImageProcessor = Llama4ImageProcessorFast
