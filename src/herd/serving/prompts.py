"""Requests to prompt token ids (and image tensors): the chat template, tools, images.

Text-only models render with the tokenizer's chat template; Mllama and Llama 4 with their
processor's, which also tiles the images into the tensors the engine hands the model. Images are
fetched and decoded by media.py under the server's policy, and reach the processor as PIL images
only (never as a client-chosen path or URL).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import jinja2

from .media import MediaPolicy, load_request_image
from .protocol import APIError, bad


@dataclass
class PromptBuilder:
    tokenizer: Any
    processor: Any = None  # an image processor + tokenizer (Mllama, Llama 4); None for text-only models
    media: MediaPolicy = field(default_factory=MediaPolicy)

    @property
    def takes_images(self) -> bool:
        return self.processor is not None

    def has_chat_template(self) -> bool:
        owner = self.processor if self.processor is not None else self.tokenizer
        return getattr(owner, "chat_template", None) is not None or \
            getattr(self.tokenizer, "chat_template", None) is not None

    async def chat(self, messages: list[dict[str, Any]], tools: list[dict] | None) -> tuple[list[int], dict | None]:
        """(prompt ids, model inputs for the images or None) of messages checked by protocol.parse_chat_request."""
        if not self.has_chat_template():
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        image_parts = [(i, j, part["url"]) for i, message in enumerate(messages)
                       if isinstance(message["content"], list)
                       for j, part in enumerate(message["content"]) if part["type"] == "image_url"]
        if image_parts and not self.takes_images:
            i, j, _ = image_parts[0]
            raise bad(f"messages[{i}].content[{j}]", "this model takes no images; send text only")
        images = await asyncio.gather(*(asyncio.to_thread(load_request_image, url, self.media,
                                                          f"messages[{i}].content[{j}].image_url")
                                        for i, j, url in image_parts))
        loaded = iter(images)
        conversation = [self._message(message, loaded) for message in messages]
        try:
            if self.processor is not None:
                inputs = self.processor.apply_chat_template(conversation, tools=tools, add_generation_prompt=True,
                                                            tokenize=True, return_dict=True, return_tensors="pt")
                ids = inputs["input_ids"][0].tolist()
                model_inputs = {name: value for name, value in inputs.items()
                                if name not in ("input_ids", "attention_mask")}
                return ids, (model_inputs or None)
            ids = self.tokenizer.apply_chat_template(conversation, tools=tools, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
        except (jinja2.TemplateError, ValueError, TypeError) as error:
            # the template's raise_exception (roles that do not alternate, ...) and image count mismatches
            raise bad("messages", f"the chat template refused the conversation: {error}") from None
        return list(ids[0] if ids and isinstance(ids[0], list) else ids), None

    def _message(self, message: dict[str, Any], images) -> dict[str, Any]:
        message = dict(message)
        content = message["content"]
        if isinstance(content, list):
            if self.takes_images:
                message["content"] = [{"type": "image", "image": next(images)} if part["type"] == "image_url"
                                      else {"type": "text", "text": part["text"]} for part in content]
            else:  # the Llama 3 templates read string content
                message["content"] = "\n".join(part["text"] for part in content)
        elif content is None:
            message["content"] = ""
        # tool_calls come checked (protocol._message): never an empty list, arguments already objects
        return message

    def completion(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return list(prompt)
        return list(self.tokenizer(prompt)["input_ids"])
