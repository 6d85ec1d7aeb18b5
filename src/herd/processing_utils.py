"""What every image-and-text processor shares: routing keyword arguments to the tokenizer and the
image processor, chat templates with image items, decoding, and saving/loading the folder layout
transformers 5 writes (tokenizer files, processor_config.json, chat_template.jinja).

A family's processor subclasses `ProcessorMixin`, names its `image_processor_class`, and writes
`__init__` and `__call__` (how its text and images become model inputs).
"""

from __future__ import annotations

import bisect
import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import hub
from .configuration import pop_hub_kwargs
from .image_processing_utils import IMAGE_PROCESSOR_FILE, PROCESSOR_FILE, read_image_processor_config
from .tokenization import CHAT_TEMPLATE_DIR, CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_JSON_FILE, AutoTokenizer
from .tokenization.chat_templates import read_chat_template, render_chat, template_variables

logger = logging.getLogger(__name__)

# Where a processor looks for its chat template, first hit wins (transformers 5.17): the older
# chat_template.json, then the Jinja files, then the processor's configs. Tokenizers look in
# another order (herd.tokenization.chat_templates).
PROCESSOR_TEMPLATE_SOURCES = (CHAT_TEMPLATE_JSON_FILE, CHAT_TEMPLATE_FILE, PROCESSOR_FILE, IMAGE_PROCESSOR_FILE)

# Keyword arguments the processor passes on to the tokenizer call: its options, and (as in
# transformers) its further text inputs, the second sequence of each pair and targets returned as
# "labels". A processor's image handling applies to `text` only: an image token in text_pair has no
# image and fails the processor's token-count check.
TEXT_KWARGS = (
    "text_pair",
    "text_target",
    "text_pair_target",
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


def merge_kwargs(kwargs: dict, text_keys: tuple, image_keys: tuple, processor_name: str = "the processor") -> tuple[dict, dict]:
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
            raise ValueError(f"{processor_name} handles text and images only; got {name}={groups[name]}")
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
        logger.warning("Keyword arguments %s are not valid for %s and are ignored.", unknown, processor_name)
    return merged[0], merged[1]


# ----------------------------------------------------------------------------------------------
# Chat templates
# ----------------------------------------------------------------------------------------------


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


def _as_list(value: Any) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _assistant_mask(offsets: list, length: int, spans: list[tuple[int, int]]) -> list[int]:
    """1 on the tokens of one row that fall in the `{% generation %}` character spans, as
    transformers' processors place them.

    A span starts at the first token whose offset starts at or after its first character, and is
    skipped unless that token holds that character (its start cut by truncation, or falling inside
    a token); it runs up to the first token starting at or after its end, or to the row's end when
    that is token 0. The offsets are those of the text the tokenizer got: a processor that expands
    image tokens in the text (Llama 4) shifts them against the template's spans, as in transformers.
    """
    starts = [start for start, _ in offsets]
    mask = [0] * length
    for span_start, span_end in spans:
        first = bisect.bisect_left(starts, span_start)
        if first >= len(offsets) or not offsets[first][0] <= span_start < offsets[first][1]:
            continue
        last = min(bisect.bisect_left(starts, span_end), length)
        for position in range(first, last or length):
            mask[position] = 1
    return mask


class ProcessorMixin(hub.PushToHubMixin):
    """Decode, chat templates and folder I/O for a tokenizer + image processor pair."""

    image_processor_class: Any = None
    # The chat template of a processor whose folder has none (Llama 4's format; None: the tokenizer's).
    default_chat_template: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}:\n- image_processor: {self.image_processor!r}\n- tokenizer: {self.tokenizer!r}\n"

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
        return_assistant_tokens_mask=True (with tokenize=True, return_dict=True) adds
        `assistant_masks`: 1 on the tokens of the template's `{% generation %}` blocks.
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt are not compatible: use continue_final_message "
                "to continue the final message, add_generation_prompt to start a new assistant message."
            )
        if continue_final_message and return_assistant_tokens_mask:
            raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask.")
        template = self._resolve_chat_template(chat_template)
        call_kwargs = dict(processor_kwargs or {})
        variables = template_variables(template)
        stray = {key: value for key, value in kwargs.items() if key not in variables}
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

        generation_spans = [] if return_assistant_tokens_mask else None
        rendered, _ = render_chat(
            template,
            conversations,
            # explicit template variables win over the special tokens of the same name
            {**self.tokenizer.special_tokens_map, **{key: value for key, value in kwargs.items() if key in variables}},
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            generation_spans=generation_spans,
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
        if generation_spans is not None:
            call_kwargs["return_offsets_mapping"] = True  # token boundaries, to place the spans
        has_images = any(images for images in batch_images)
        outputs = self(text=prompt, images=batch_images if has_images else None, **call_kwargs)
        if not return_dict:
            return outputs["input_ids"]
        if generation_spans is not None:
            offsets = outputs.pop("offset_mapping")
            outputs["assistant_masks"] = [
                _assistant_mask(_as_list(row_offsets), len(row_ids), spans)
                for row_offsets, row_ids, spans in zip(offsets, outputs["input_ids"], generation_spans)
            ]
            outputs.convert_to_tensors(tensor_type=return_tensors)
        return outputs

    # -- saving and loading --

    def to_dict(self) -> dict[str, Any]:
        return {"image_processor": self.image_processor.to_dict(), "processor_class": type(self).__name__}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Write the tokenizer files, the chat template(s) and processor_config.json (transformers 5 layout).

        processor_config.json holds the image processor settings under "image_processor";
        transformers' AutoProcessor and herd's from_pretrained both read it.
        """
        folder = hub.save_folder(save_directory)
        push = hub.push_request(folder, kwargs)
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
        if push is not None:
            push.upload(self)
        return [str(config_path), *written]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> ProcessorMixin:
        """Load the tokenizer, the image processor and the chat template of a folder or Hub id.

        The image processor comes from processor_config.json ("image_processor") or
        preprocessor_config.json; the chat template from chat_template.json, else
        chat_template.jinja (plus additional_chat_templates/), else the family's built-in one
        (`default_chat_template`: Llama 4), else the tokenizer's. Keyword
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
            if key in cls.image_processor_class.valid_kwargs and key != "return_tensors"
        }
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        image_processor = cls.image_processor_class.from_dict(read_image_processor_config(folder), **image_settings)
        if chat_template is None:
            chat_template = read_chat_template(folder, PROCESSOR_TEMPLATE_SOURCES)
        if chat_template is None:
            # A family with a built-in template (Llama 4) falls back to it, as in transformers; the
            # others to the tokenizer's (transformers' would have none).
            chat_template = cls.default_chat_template or tokenizer.chat_template
        return cls(image_processor, tokenizer, chat_template=copy.deepcopy(chat_template))
