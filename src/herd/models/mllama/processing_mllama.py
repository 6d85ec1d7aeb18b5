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

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import jinja2.meta
import numpy as np

from ... import hub
from ...configuration import pop_hub_kwargs
from ...image_utils import BatchFeature, fetch_images, make_nested_list_of_images
from ...tokenization import AutoTokenizer
from .image_processing_mllama import (
    IMAGE_PROCESSOR_FILE,
    PROCESSOR_FILE,
    MllamaImageProcessor,
    read_image_processor_config,
)

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# Keyword arguments the processor passes on to the tokenizer call.
TEXT_KWARGS = (
    "add_special_tokens",
    "padding",
    "truncation",
    "max_length",
    "stride",
    "is_split_into_words",
    "pad_to_multiple_of",
    "return_token_type_ids",
    "return_attention_mask",
    "return_overflowing_tokens",
    "return_special_tokens_mask",
    "return_offsets_mapping",
    "return_length",
    "verbose",
    "padding_side",
    "split_special_tokens",
    "return_tensors",
)
_MODALITY_GROUPS = ("text_kwargs", "images_kwargs", "common_kwargs", "videos_kwargs", "audio_kwargs")


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
    """Every sample's text must have one image token per image of that sample."""
    if images_per_sample is None:
        if sum(tokens_per_text) > 0:
            rows = [index for index, count in enumerate(tokens_per_text) if count]
            raise ValueError(
                f"The text has {image_token} tokens (per sample: {tokens_per_text}; sample(s) {rows}) but no images "
                f"were given: pass images=..., one image per {image_token} token"
            )
        return
    if sum(tokens_per_text) == 0:
        raise ValueError(
            f"{sum(images_per_sample)} image(s) were given but the text has no {image_token} token: put one "
            f"{image_token} in the text where each image belongs"
        )
    without_image = [index for index, count in enumerate(tokens_per_text) if count == 0]
    if without_image:
        raise ValueError(
            f"Sample(s) {without_image} of the batch have no {image_token} token while others have some. With "
            "images, every sample needs at least one image (as in transformers, Mllama's processor cannot mix "
            "text-only and image samples in one batch); process text-only prompts in a separate call."
        )
    if len(tokens_per_text) != len(images_per_sample):
        hint = ""
        if len(images_per_sample) == 1 and sum(images_per_sample) == sum(tokens_per_text):
            hint = " Pass the images as a nested list, one list of images per sample: [[img1], [img2, img3]]."
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


def _merge_kwargs(kwargs: dict, text_keys: tuple, image_keys: tuple) -> tuple[dict, dict]:
    """(tokenizer kwargs, image processor kwargs) from a call's keyword arguments.

    As in transformers: a flat keyword goes to every modality that takes it (return_tensors to
    both), `text_kwargs` / `images_kwargs` dicts go to theirs, `common_kwargs` to all, and a
    modality's own or flat value wins over a common one. A key given both flat and in a
    modality dict is an error; an unknown flat key is ignored with a warning.
    """
    kwargs = dict(kwargs)
    groups = {name: dict(kwargs.pop(name, None) or {}) for name in _MODALITY_GROUPS}
    for name in ("videos_kwargs", "audio_kwargs"):
        if groups[name]:
            raise ValueError(f"MllamaProcessor handles text and images only; got {name}={groups[name]}")
    common = groups["common_kwargs"]
    merged = []
    for group_name, keys in (("text_kwargs", text_keys), ("images_kwargs", image_keys)):
        group = groups[group_name]
        values = {key: value for key, value in common.items() if key in keys}
        for key in keys:
            if key in group and key in kwargs:
                raise ValueError(
                    f"Keyword argument {key} was passed two times: in {group_name} and as a keyword argument."
                )
            if key in group:
                values[key] = group.pop(key)
            elif key in kwargs:
                values[key] = kwargs[key]
        if group:
            raise TypeError(f"{group_name} got unexpected keys {sorted(group)}; valid keys: {sorted(keys)}")
        merged.append(values)
    unknown_common = sorted(set(common) - set(text_keys) - set(image_keys))
    if unknown_common:
        raise TypeError(f"common_kwargs got keys neither the tokenizer nor the image processor takes: {unknown_common}")
    unknown = sorted(set(kwargs) - set(text_keys) - set(image_keys))
    if unknown:
        logger.warning("Keyword arguments %s are not valid for MllamaProcessor and are ignored.", unknown)
    return merged[0], merged[1]


# ----------------------------------------------------------------------------------------------
# Chat templates
# ----------------------------------------------------------------------------------------------


def _template_variables(template: str) -> frozenset[str]:
    """The variables a Jinja template reads from outside (to tell template kwargs from processor kwargs)."""
    from ...tokenization import _compile_chat_template

    environment = _compile_chat_template(template).environment
    return frozenset(jinja2.meta.find_undeclared_variables(environment.parse(template)))


# Keys of an image content item that hold the image, in the order transformers reads them.
_IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")


def _normalized_conversation(conversation: list) -> list:
    """A copy of the messages with OpenAI-style {"type": "image_url", "image_url": {"url": ...}} items as image items."""
    messages = []
    for message in conversation:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            items = []
            for item in content:
                if isinstance(item, Mapping) and item.get("type") == "image_url" and "image_url" in item:
                    source = item["image_url"]
                    items.append(
                        {"type": "image", "url": source.get("url", "") if isinstance(source, Mapping) else source}
                    )
                else:
                    items.append(item)
            message = {**message, "content": items}
        messages.append(message)
    return messages


def _images_of_conversation(conversation: list) -> list:
    images = []
    for message in conversation:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for position, item in enumerate(content):
            if not isinstance(item, Mapping) or item.get("type") != "image":
                continue
            source = next((item[key] for key in _IMAGE_SOURCE_KEYS if key in item), None)
            if source is None:
                raise ValueError(
                    f"an image item of a {message.get('role')!r} message (content item {position}) has none of the "
                    f"keys {list(_IMAGE_SOURCE_KEYS)} to give the image"
                )
            images.append(source)
    return images


# ----------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------


class MllamaProcessor:
    """Tokenizer + MllamaImageProcessor for Llama 3.2 Vision.

    `processor(images=..., text=...)` gives input_ids, attention_mask, cross_attention_mask,
    pixel_values, aspect_ratio_ids and aspect_ratio_mask (a BatchFeature). Keyword arguments go
    to the tokenizer and the image processor (flat, or as text_kwargs / images_kwargs /
    common_kwargs dicts).
    """

    attributes: ClassVar[list[str]] = ["image_processor", "tokenizer"]

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}:\n- image_processor: {self.image_processor!r}\n- tokenizer: {self.tokenizer!r}\n"

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

        text_kwargs, images_kwargs = _merge_kwargs(kwargs, TEXT_KWARGS, tuple(self.image_processor.valid_kwargs))
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

    def _check_image_tokens_kept(self, texts: list[str], input_ids: Any) -> None:
        """Truncation must not cut image tokens: each would lose its image."""
        in_ids = [list(row).count(self.image_token_id) for row in input_ids]
        in_text = [item.count(self.image_token) for item in texts]
        if in_ids != in_text:
            raise ValueError(
                f"Mismatch in `image` token count between text and `input_ids`: ids={in_ids}, text={in_text}. "
                "Likely due to truncation (truncation=True / max_length): disable it or increase max_length."
            )

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        """The tokenizer's decode."""
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """The tokenizer's batch_decode."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def post_process_image_text_to_text(
        self,
        generated_outputs: Any,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """The texts of generated ids (batch_decode, skipping special tokens by default)."""
        return self.tokenizer.batch_decode(
            generated_outputs,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    # -- chat --

    def _resolve_chat_template(self, chat_template: str | None) -> str:
        templates = self.chat_template
        if templates is None:
            templates = getattr(self.tokenizer, "chat_template", None)
        if chat_template is not None:
            if isinstance(templates, dict) and chat_template in templates:
                return templates[chat_template]  # the name of one of several templates
            return chat_template
        if isinstance(templates, dict):
            if "default" in templates:
                return templates["default"]
            raise ValueError(
                'The processor has several chat templates and none is named "default": pass chat_template= with '
                f"one of their names: {sorted(templates)}"
            )
        if templates is None:
            raise ValueError(
                "Cannot use apply_chat_template: neither the processor nor its tokenizer has a chat template. Pass "
                "chat_template=..., or load a folder with chat_template.jinja."
            )
        return templates

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        tools: list | None = None,
        documents: list | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        return_assistant_tokens_mask: bool = False,
        tokenize: bool = False,
        return_tensors: str | None = None,
        return_dict: bool = False,
        processor_kwargs: dict | None = None,
        **kwargs: Any,
    ) -> Any:
        """Render a conversation (or a batch) with the chat template; with tokenize=True, process it too.

        Image items ({"type": "image", "image" | "url" | "path" | "base64": ...}) become `<|image|>`
        in the text (as the template writes them) and are loaded and tiled. With tokenize=True,
        return_dict=True gives the processor's full output, else only input_ids. Keyword arguments
        that the template does not read (padding=..., max_image_tiles=...) go to the processor,
        together with `processor_kwargs`; the others are template variables (date_string=...).
        """
        if return_assistant_tokens_mask:
            raise NotImplementedError("herd does not compute assistant token masks (return_assistant_tokens_mask)")
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt are not compatible: use continue_final_message "
                "to continue the final message, add_generation_prompt to start a new assistant message."
            )
        template = self._resolve_chat_template(chat_template)
        call_kwargs = dict(processor_kwargs or {})
        template_variables = _template_variables(template)
        stray = {key: value for key, value in kwargs.items() if key not in template_variables}
        if stray:
            logger.warning(
                "Arguments %s are not used by the chat template; passing them to the processor.", sorted(stray)
            )
            call_kwargs.update(stray)

        if not isinstance(conversation, (list, tuple)) or len(conversation) == 0:
            raise ValueError("conversation must be a non-empty list of messages (or a list of such lists)")
        first = conversation[0]
        is_batched = isinstance(first, (list, tuple)) or hasattr(first, "messages")
        conversations = [getattr(item, "messages", item) for item in conversation] if is_batched else [conversation]
        conversations = [_normalized_conversation(list(messages)) for messages in conversations]

        rendered = self.tokenizer.apply_chat_template(
            conversations,
            tools=tools,
            documents=documents,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **{key: value for key, value in kwargs.items() if key in template_variables},
        )
        prompt = rendered if is_batched else rendered[0]
        if not tokenize:
            return prompt

        batch_images = [_images_of_conversation(messages) for messages in conversations]
        # The template writes the special tokens itself (BOS included): do not add them again.
        bos = self.tokenizer.bos_token
        if bos is not None and rendered[0].startswith(bos):
            call_kwargs["add_special_tokens"] = False
        if return_tensors:
            call_kwargs["return_tensors"] = return_tensors
        has_images = any(images for images in batch_images)
        outputs = self(text=prompt, images=batch_images if has_images else None, **call_kwargs)
        return outputs if return_dict else outputs["input_ids"]

    # -- saving and loading --

    def to_dict(self) -> dict[str, Any]:
        return {"image_processor": self.image_processor.to_dict(), "processor_class": type(self).__name__}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Write the tokenizer files, the chat template(s) and processor_config.json (transformers 5 layout).

        processor_config.json holds the image processor settings under "image_processor";
        transformers' AutoProcessor and herd's from_pretrained both read it.
        """
        if kwargs.pop("push_to_hub", False):
            raise NotImplementedError("herd does not push to the Hub; upload the saved folder with huggingface_hub")
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"{folder} is a file; save_pretrained needs a folder")
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        written = []
        templates = self.chat_template
        if isinstance(templates, str):
            templates = {"default": templates}
        for name, template in (templates or {}).items():
            if name == "default":
                path = folder / CHAT_TEMPLATE_FILE
            else:
                if Path(name).name != name or name in ("", ".", ".."):
                    raise ValueError(f"Invalid chat template name: {name!r}")
                (folder / CHAT_TEMPLATE_DIR).mkdir(exist_ok=True)
                path = folder / CHAT_TEMPLATE_DIR / f"{name}.jinja"
            path.write_text(template, encoding="utf-8")
            written.append(str(path))
        config_path = folder / PROCESSOR_FILE
        config_path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return [str(config_path), *written]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> MllamaProcessor:
        """Load the tokenizer, the image processor and the chat template of a folder or Hub id.

        The image processor comes from processor_config.json ("image_processor") or
        preprocessor_config.json; the chat template from chat_template.json, else
        chat_template.jinja (plus additional_chat_templates/), else the tokenizer's. Keyword
        arguments: hub ones (revision, cache_dir, token, local_files_only, subfolder),
        chat_template=..., image processor settings (max_image_tiles=...) and tokenizer settings.
        """
        kwargs = dict(kwargs)
        hub_kwargs = pop_hub_kwargs(kwargs)
        if hub_kwargs.get("subfolder") is None:
            hub_kwargs.pop("subfolder", None)
        for ignored in ("trust_remote_code", "use_fast", "_from_auto"):
            kwargs.pop(ignored, None)
        folder = hub.resolve(pretrained_model_name_or_path, **hub_kwargs)
        chat_template = kwargs.pop("chat_template", None)
        image_settings = {
            key: kwargs.pop(key)
            for key in list(kwargs)
            if key in MllamaImageProcessor.valid_kwargs and key != "return_tensors"
        }
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        image_processor = MllamaImageProcessor.from_dict(read_image_processor_config(folder), **image_settings)
        if chat_template is None:
            chat_template = read_processor_chat_template(folder)
        if chat_template is None:
            chat_template = tokenizer.chat_template
        return cls(image_processor, tokenizer, chat_template=copy.deepcopy(chat_template))


def read_processor_chat_template(folder: Path) -> str | dict | None:
    """The processor chat template of a folder, where transformers 5.17 looks for it.

    chat_template.json (the older processor format) wins; otherwise chat_template.jinja is the
    "default" template and additional_chat_templates/*.jinja add named ones; a single template is
    returned as a string. processor_config.json may also hold one under "chat_template".
    """
    legacy = folder / CHAT_TEMPLATE_JSON_FILE
    if legacy.is_file():
        return json.loads(legacy.read_text(encoding="utf-8"))["chat_template"]
    templates = {}
    extra_dir = folder / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    main = folder / CHAT_TEMPLATE_FILE
    if main.is_file():
        templates["default"] = main.read_text(encoding="utf-8")
    if list(templates) == ["default"]:
        return templates["default"]
    if templates:
        return templates
    for config_name in (PROCESSOR_FILE, IMAGE_PROCESSOR_FILE):
        path = folder / config_name
        if path.is_file():
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            if template is not None:
                return template
    return None


__all__ = ["MllamaProcessor"]
