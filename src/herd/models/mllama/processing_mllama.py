"""The Llama 3.2 Vision (Mllama) processor: the tokenizer and the image processor together.

Text marks where images go with `<|image|>` tokens. Mllama reads images through cross-attention,
so the tokens stay as they are (no expansion into patches); instead the processor builds
`cross_attention_mask` (batch, seq_len, max_num_images, max_image_tiles): which text positions
see which image's tiles. As in the reference, an image is seen from its `<|image|>` token up to
the next `<|image|>` token (or the end of the text), and consecutive `<|image|>` tokens form a
group: every image of the group is seen until the next `<|image|>` token after the group. So a
token sees the most recent image or group of images, and tokens before the first image see
nothing.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np

from ...image_utils import BatchFeature, fetch_images, make_nested_list_of_images
from ...processing_utils import TEXT_KWARGS, ProcessorMixin, merge_kwargs
from .image_processing_mllama import MllamaImageProcessor

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Prompts and the cross-attention mask
# ----------------------------------------------------------------------------------------------


def build_string_from_input(prompt: str, bos_token: str | None, image_token: str) -> str:
    """The prompt with the BOS token added after its leading `<|image|>` tokens, unless it has one.

    >>> build_string_from_input("<|image|>Hello", "<|begin_of_text|>", "<|image|>")
    '<|image|><|begin_of_text|>Hello'
    """
    if bos_token is None or bos_token in prompt:
        return prompt
    leading_images = 0
    while prompt.startswith(image_token):
        prompt = prompt[len(image_token) :]
        leading_images += 1
    return f"{image_token * leading_images}{bos_token}{prompt}"


def get_cross_attention_token_mask(input_ids: list[int], image_token_id: int) -> list[list[int]]:
    """[start, end) of the token positions that see each image of one sequence.

    Each image is seen from its `<|image|>` token to the next one; the last image to the end of
    the sequence (end -1, "to the end of the padded batch", when there is a single image). An
    image token followed directly by another joins its group: it is seen as long as the group's
    last image is.
    """
    positions = [index for index, token in enumerate(input_ids) if token == image_token_id]
    if not positions:
        return []
    if len(positions) == 1:
        return [[positions[0], -1]]
    spans = [[start, end] for start, end in zip(positions, positions[1:] + [len(input_ids)])]
    for index in range(len(spans) - 2, -1, -1):
        start, end = spans[index]
        if end == start + 1:  # the next token is an image token too
            spans[index][1] = spans[index + 1][1]
    return spans


def convert_sparse_cross_attention_mask_to_dense(
    cross_attention_token_mask: list[list[list[int]]],
    num_tiles: list[list[int]],
    max_num_tiles: int,
    length: int,
) -> np.ndarray:
    """(batch, length, max_num_images, max_num_tiles) int64: 1 where a position sees an image's real tiles."""
    max_num_images = max((len(spans) for spans in cross_attention_token_mask), default=0)
    dense = np.zeros((len(cross_attention_token_mask), length, max_num_images, max_num_tiles), dtype=np.int64)
    for sample_index, (spans, sample_tiles) in enumerate(zip(cross_attention_token_mask, num_tiles)):
        for image_index, ((start, end), tiles) in enumerate(zip(spans, sample_tiles)):
            end = length if end == -1 else min(end, length)
            dense[sample_index, start:end, image_index, :tiles] = 1
    return dense


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def _texts_of(text: Any) -> list[str]:
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and all(isinstance(item, str) for item in text):
        return list(text)
    if isinstance(text, (list, tuple)):
        wrong = next(item for item in text if not isinstance(item, str))
        raise TypeError(f"text must be a string or a list of strings, got a list holding a {type(wrong).__name__}")
    raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")


def _check_image_counts(tokens_per_text: list[int], images_per_sample: list[int] | None, image_token: str) -> None:
    """Every sample's text must have one image token per image of that sample. A text-only sample
    in a batch with images has none of either: its cross-attention mask is all zeros, and the
    model gives such rows nothing of the images."""
    if images_per_sample is None:
        if sum(tokens_per_text) > 0:
            rows = [index for index, count in enumerate(tokens_per_text) if count]
            raise ValueError(
                f"The text has {image_token} tokens (per sample: {tokens_per_text}; sample(s) {rows}) but no images "
                f"were given: pass images=..., one image per {image_token} token"
            )
        return
    if sum(tokens_per_text) == 0 and sum(images_per_sample) == 0:
        raise ValueError(
            f"images holds only empty lists (images per sample: {images_per_sample}), so no images were given: "
            "pass images=None for text-only input"
        )
    if sum(tokens_per_text) == 0:
        raise ValueError(
            f"{sum(images_per_sample)} image(s) were given but the text has no {image_token} token: put one "
            f"{image_token} in the text where each image belongs"
        )
    if len(tokens_per_text) != len(images_per_sample):
        hint = ""
        if sum(images_per_sample) == sum(tokens_per_text):
            hint = (" Pass the images as a nested list, one list of images per sample, [] for a text-only "
                    "sample: [[img1], [], [img2, img3]].")
        raise ValueError(
            f"{len(tokens_per_text)} text(s) were given but images for {len(images_per_sample)} sample(s) "
            f"({image_token} tokens per text: {tokens_per_text}; images per sample: {images_per_sample}).{hint}"
        )
    for index, (tokens, images) in enumerate(zip(tokens_per_text, images_per_sample)):
        if tokens != images:
            raise ValueError(
                f"Sample {index} has {tokens} {image_token} token(s) in its text but {images} image(s) "
                f"({image_token} tokens per text: {tokens_per_text}; images per sample: {images_per_sample})."
            )


# ----------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------


class MllamaProcessor(ProcessorMixin):
    """Tokenizer + MllamaImageProcessor for Llama 3.2 Vision.

    `processor(images=..., text=...)` gives input_ids, attention_mask, cross_attention_mask,
    pixel_values, aspect_ratio_ids and aspect_ratio_mask (a BatchFeature). Keyword arguments go
    to the tokenizer and the image processor (flat, or as text_kwargs / images_kwargs /
    common_kwargs dicts).
    """

    attributes: ClassVar[list[str]] = ["image_processor", "tokenizer"]
    image_processor_class = MllamaImageProcessor

    def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str | dict | None = None):
        if image_processor is None or tokenizer is None:
            raise ValueError("MllamaProcessor needs an image processor and a tokenizer")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        # A tokenizer may name its image token (image_token in its config); Llama 3.2's is <|image|>.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None:
            raise ValueError(
                f"The tokenizer has no {self.image_token} token. Add it first: "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': ['{self.image_token}']}}) "
                "(Llama 3.2 Vision's tokenizer has it as id 128256)."
            )
        self.python_token = "<|python_tag|>"
        self.python_token_id = tokenizer.convert_tokens_to_ids(self.python_token)
        self.bos_token = tokenizer.bos_token

    @property
    def model_input_names(self) -> list[str]:
        image_names = [name for name in self.image_processor.model_input_names if name != "num_tiles"]
        return list(self.tokenizer.model_input_names) + image_names + ["cross_attention_mask"]

    # -- calls --

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        audio: Any = None,
        videos: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize `text` and tile `images`; with both, also build the cross-attention mask.

        `images`: an image, a list (one sample's images) or a list of lists (one per sample), as
        PIL images, arrays, tensors, paths or URLs. `text`: a string or a list of strings, with
        one `<|image|>` per image of its sample. The BOS token is added after any leading image
        tokens when a text has none.
        """
        if audio is not None or videos is not None:
            raise ValueError("MllamaProcessor handles text and images only (no audio or videos)")
        if images is None and text is None:
            raise ValueError("You need to provide at least one input to call MllamaProcessor: text, images or both")
        texts = None
        if text is not None:
            texts = [build_string_from_input(item, self.bos_token, self.image_token) for item in _texts_of(text)]
        nested_images = None
        if images is not None:
            nested_images = make_nested_list_of_images(fetch_images(images))
        if texts is not None:
            _check_image_counts(
                [item.count(self.image_token) for item in texts],
                None if nested_images is None else [len(sample) for sample in nested_images],
                self.image_token,
            )

        text_kwargs, images_kwargs = merge_kwargs(
            kwargs, TEXT_KWARGS, tuple(self.image_processor.valid_kwargs), type(self).__name__
        )
        return_tensors = text_kwargs.pop("return_tensors", None)

        text_inputs: dict[str, Any] = {}
        if texts is not None:
            text_inputs = dict(self.tokenizer(texts, **text_kwargs))
            self._check_image_tokens_kept(texts, text_inputs["input_ids"])

        image_inputs: dict[str, Any] = {}
        if nested_images is not None:
            image_inputs = dict(self.image_processor(nested_images, **images_kwargs))
            num_tiles = image_inputs.pop("num_tiles")

        if texts is not None and nested_images is not None:
            input_ids = [list(row) for row in text_inputs["input_ids"]]
            spans = [get_cross_attention_token_mask(row, self.image_token_id) for row in input_ids]
            # The tile axis follows the call's max_image_tiles, like pixel_values. (The reference uses the
            # processor's setting here even when the call overrides it, and the two axes then disagree.)
            max_tiles = images_kwargs.get("max_image_tiles") or self.image_processor.max_image_tiles
            text_inputs["cross_attention_mask"] = convert_sparse_cross_attention_mask_to_dense(
                spans, num_tiles=num_tiles, max_num_tiles=max_tiles, length=max(len(row) for row in input_ids)
            )
        return BatchFeature({**text_inputs, **image_inputs}, tensor_type=return_tensors)


__all__ = ["MllamaProcessor"]
