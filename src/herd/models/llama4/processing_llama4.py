"""The Llama 4 processor: tokenizer + image processor, with early-fusion image tokens.

Each `<|image|>` of the text becomes the image's token layout: `<|image_start|>`, then (when the
image has several tiles) for each row of tiles the patch tokens of each tile separated by
`<|tile_x_separator|>` and the row closed by `<|tile_y_separator|>`, then `<|image|>` followed by the
global tile's patch tokens, and `<|image_end|>`. A tile gives (tile / patch_size)^2 / (1 /
pixel_shuffle_ratio^2) patch tokens (144 for Llama 4's 336-pixel tiles). The model then writes
image features over the `<|patch|>`... placeholder embeddings.
"""

from __future__ import annotations

from typing import Any

from ...image_utils import BatchFeature, fetch_images, make_nested_list_of_images
from ...processing_utils import TEXT_KWARGS, ProcessorMixin, merge_kwargs
from .image_processing_llama4 import Llama4ImageProcessorFast


class Llama4Processor(ProcessorMixin):
    image_processor_class = Llama4ImageProcessorFast

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, patch_size: int = 14,
                 pixel_shuffle_ratio: float = 0.5, fake_image_token: str = "<|image|>", image_token: str = "<|image|>",
                 start_of_image_token: str = "<|image_start|>", end_of_image_token: str = "<|image_end|>",
                 patch_token: str = "<|patch|>", tile_x_separator_token: str = "<|tile_x_separator|>",
                 tile_y_separator_token: str = "<|tile_y_separator|>", chat_template: str | dict | None = None,
                 **kwargs: Any):
        if image_processor is None or tokenizer is None:
            raise ValueError("Llama4Processor needs an image processor and a tokenizer")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.patch_size = patch_size
        self.downsample_ratio = int(round(1.0 / (pixel_shuffle_ratio**2)))
        self.fake_image_token = fake_image_token
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.start_of_img_token, self.end_of_img_token = start_of_image_token, end_of_image_token
        self.img_patch_token = patch_token
        self.tile_token, self.tile_global_token = tile_x_separator_token, tile_y_separator_token
        for token in (image_token, start_of_image_token, end_of_image_token, patch_token, tile_x_separator_token,
                      tile_y_separator_token):
            if tokenizer.convert_tokens_to_ids(token) is None:
                raise ValueError(f"the tokenizer has no {token} token, which Llama 4 prompts need")

    @property
    def model_input_names(self) -> list[str]:
        return list(self.tokenizer.model_input_names) + ["pixel_values"]

    def image_layout(self, aspect_ratio: tuple[int, int], tokens_per_tile: int) -> str:
        """The token text one image becomes (see the module docstring)."""
        rows, columns = aspect_ratio
        parts = [self.start_of_img_token]
        if rows * columns > 1:
            for _ in range(rows):
                tiles = [self.img_patch_token * tokens_per_tile] * columns
                parts.append(self.tile_token.join(tiles) + self.tile_global_token)
        parts.append(self.image_token + self.img_patch_token * tokens_per_tile + self.end_of_img_token)
        return "".join(parts)

    def __call__(self, images: Any = None, text: str | list[str] | None = None, audio: Any = None, videos: Any = None,
                 **kwargs: Any) -> BatchFeature:
        if audio is not None or videos is not None:
            raise ValueError("Llama4Processor handles text and images only (no audio or videos)")
        if text is None:
            raise ValueError("Llama4Processor needs text (with one <|image|> per image)")
        texts = [text] if isinstance(text, str) else list(text)
        text_kwargs, images_kwargs = merge_kwargs(kwargs, TEXT_KWARGS, self.image_processor.valid_kwargs, "Llama4Processor")
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        text_kwargs.setdefault("padding_side", "left")
        placeholders = sum(item.count(self.fake_image_token) for item in texts)
        flat_images = [image for sample in make_nested_list_of_images(fetch_images(images)) for image in sample] \
            if images is not None else []
        if placeholders != len(flat_images):
            raise ValueError(
                f"Found {placeholders} {self.fake_image_token} placeholders across the batch, but {len(flat_images)} "
                "images: give one placeholder per image"
            )
        image_inputs: dict[str, Any] = {}
        if flat_images:
            processed = self.image_processor(flat_images, return_tensors="pt", **images_kwargs)
            tile_height, tile_width = processed["pixel_values"].shape[-2:]
            tokens_per_tile = (tile_height // self.patch_size) * (tile_width // self.patch_size) // self.downsample_ratio
            layouts = iter(self.image_layout(tuple(r), tokens_per_tile) for r in processed["aspect_ratios"].tolist())
            texts = ["".join(piece if i == 0 else next(layouts) + piece
                             for i, piece in enumerate(item.split(self.fake_image_token))) for item in texts]
            image_inputs = {"pixel_values": processed["pixel_values"]}
        text_inputs = dict(self.tokenizer(texts, **text_kwargs))
        return BatchFeature({**text_inputs, **image_inputs}, tensor_type=return_tensors)


__all__ = ["Llama4Processor"]
