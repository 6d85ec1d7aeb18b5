"""The Llama 4 processor: tokenizer + image processor, with early-fusion image tokens.

Each `<|image|>` of the text becomes the image's token layout: `<|image_start|>`, then (when the
image has several tiles) for each row of tiles the patch tokens of each tile separated by
`<|tile_x_separator|>` and the row closed by `<|tile_y_separator|>`, then `<|image|>` followed by the
global tile's patch tokens, and `<|image_end|>`. A tile gives (tile / patch_size)^2 / (1 /
pixel_shuffle_ratio^2) patch tokens (144 for Llama 4's 336-pixel tiles). The model then writes
image features over the `<|patch|>`... placeholder embeddings.

A processor built without a chat template (a folder with none of its own) uses Llama 4's chat
format, `DEFAULT_CHAT_TEMPLATE`, as transformers' Llama4Processor does.
"""

from __future__ import annotations

from typing import Any

from ...image_utils import BatchFeature, fetch_images, make_nested_list_of_images
from ...processing_utils import TEXT_KWARGS, ProcessorMixin, merge_kwargs
from .image_processing_llama4 import Llama4ImageProcessorFast


# Llama 4's chat format: what transformers' Llama4Processor renders when its folder has no template.
# A system message (its first text item when it is a list), then, with tools, the tool list in the
# first user message (tools_in_user_message, the default) or in the system message; the turns
# (`<|image|>` per image item); assistant tool calls as `<|python_start|>content<|python_end|>`
# followed by one JSON object per call; tool results as `ipython` turns, JSON-encoded.
DEFAULT_CHAT_TEMPLATE = r"""{%- macro header(role) %}
    {{- '<|header_start|>' + role + '<|header_end|>\n\n' }}
{%- endmacro %}
{%- macro message_text(content) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for item in content %}
            {%- if item['type'] == 'image' %}
                {{- '<|image|>' }}
            {%- elif item['type'] == 'text' %}
                {{- item['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- macro tool_list(tools) %}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- 'Do not use variables.\n\n' }}
    {%- for tool in tools %}
        {{- tool | tojson(indent=4) + '\n\n' }}
    {%- endfor %}
{%- endmacro %}
{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if tools is not defined %}
    {%- set tools = none %}
{%- endif %}
{%- if tools_in_user_message is not defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{#- date_string is taken (Llama 3's templates print it) but Llama 4's format does not show it. #}
{%- if date_string is not defined %}
    {%- set date_string = strftime_now("%d %b %Y") if strftime_now is defined else "26 Jul 2024" %}
{%- endif %}

{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {{- header('system') }}
    {%- if tools is not none %}
        {{- 'Environment: ipython\n' }}
        {%- if not tools_in_user_message %}
            {{- 'You have access to the following functions. To call a function, please respond with JSON for a '
                'function call.' }}
            {{- tool_list(tools) }}
        {%- endif %}
    {%- endif %}
    {{- (system if system is string else system[0]['text']) | trim }}
    {{- '<|eot|>' }}
    {%- set messages = messages[1:] %}
{%- endif %}

{%- if tools_in_user_message and tools is not none %}
    {%- if messages | length == 0 %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- header('user') }}
    {{- 'Given the following functions, please respond with a JSON for a function call with its proper '
        'arguments that best answers the given prompt.\n\n' }}
    {{- tool_list(tools) }}
    {{- (messages[0]['content'] | trim) + '<|eot|>' }}
    {%- set messages = messages[1:] %}
{%- endif %}

{%- for message in messages %}
    {%- set is_tool_result = message.role == 'tool' or message.role == 'ipython' %}
    {%- if not is_tool_result and 'tool_calls' not in message %}
        {{- header(message['role']) + message_text(message['content']) + '<|eot|>' }}
    {%- elif 'tool_calls' in message and message.tool_calls | length > 0 %}
        {{- header('assistant') + '<|python_start|>' + message_text(message['content']) + '<|python_end|>' }}
        {%- for call in message.tool_calls %}
            {{- '{"name": "' + call.function.name + '", "parameters": ' + call.function.arguments | tojson + '}' }}
        {%- endfor %}
        {{- '<|eot|>' }}
    {%- elif is_tool_result %}
        {{- header('ipython') }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- '<|eot|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- header('assistant') }}
{%- endif %}
"""


class Llama4Processor(ProcessorMixin):
    image_processor_class = Llama4ImageProcessorFast
    default_chat_template = DEFAULT_CHAT_TEMPLATE

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, patch_size: int = 14,
                 pixel_shuffle_ratio: float = 0.5, fake_image_token: str = "<|image|>", image_token: str = "<|image|>",
                 start_of_image_token: str = "<|image_start|>", end_of_image_token: str = "<|image_end|>",
                 patch_token: str = "<|patch|>", tile_x_separator_token: str = "<|tile_x_separator|>",
                 tile_y_separator_token: str = "<|tile_y_separator|>",
                 chat_template: str | dict | None = DEFAULT_CHAT_TEMPLATE,
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
            # As in transformers: without return_tensors, pixel_values is a list with one tensor of tiles per
            # image; with it, all the images' tiles in one tensor.
            processed = self.image_processor(flat_images, return_tensors="pt" if return_tensors else None,
                                             **images_kwargs)
            tile_height, tile_width = processed["pixel_values"][0].shape[-2:]
            tokens_per_tile = (tile_height // self.patch_size) * (tile_width // self.patch_size) // self.downsample_ratio
            aspect_ratios = processed["aspect_ratios"]
            aspect_ratios = aspect_ratios.tolist() if hasattr(aspect_ratios, "tolist") else aspect_ratios
            layouts = iter(self.image_layout(tuple(r), tokens_per_tile) for r in aspect_ratios)
            texts = ["".join(piece if i == 0 else next(layouts) + piece
                             for i, piece in enumerate(item.split(self.fake_image_token))) for item in texts]
            image_inputs = {"pixel_values": processed["pixel_values"]}
        text_inputs = dict(self.tokenizer(texts, **text_kwargs))
        self._check_image_tokens_kept(texts, text_inputs["input_ids"])
        return BatchFeature({**text_inputs, **image_inputs}, tensor_type=return_tensors)


__all__ = ["DEFAULT_CHAT_TEMPLATE", "Llama4Processor"]
