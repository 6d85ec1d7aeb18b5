"""`pipeline("text-generation", ...)`: prompts or chats in, text out, as the reference returns it.

- a string -> [{"generated_text": str}] (one record per returned sequence)
- a chat (list of {"role", "content"} messages) -> [{"generated_text": messages + [assistant reply]}]
- a list of either -> a list of such lists
With return_full_text=False, "generated_text" holds only the new text.
As transformers' pipeline, text-generation samples (temperature 0.7, 256 new tokens) unless the model's
generation config or the call says otherwise; pass do_sample=False for greedy text.
"""

from __future__ import annotations

import copy
import enum
from typing import Any

import torch

from .generation import GenerationConfig
from .image_utils import load_images

# The reference pipeline's default when the model's generation config sets no length.
_DEFAULT_MAX_NEW_TOKENS = 256
_TOKENIZER_KWARGS = ("add_special_tokens", "truncation", "padding", "max_length")


def _is_chat(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def _is_chat_object(value: Any) -> bool:
    return isinstance(value, dict) and "messages" in value  # {"messages": [...]} as some datasets store chats


class ReturnType(enum.Enum):
    """What each record holds (transformers' `return_type=`): token ids, the new text, or prompt + new text."""

    TENSORS = 0
    NEW_TEXT = 1
    FULL_TEXT = 2


def _return_type(return_full_text, return_tensors, return_text, return_type) -> ReturnType:
    """The record kind from the call's flags, with transformers' precedence and conflicts."""
    if return_type is not None:
        return ReturnType(getattr(return_type, "value", return_type))  # herd's or transformers' enum
    if return_full_text is not None:
        if return_text is not None:
            raise ValueError("`return_text` is mutually exclusive with `return_full_text`")
        if return_tensors is not None:
            raise ValueError("`return_full_text` is mutually exclusive with `return_tensors`")
        return ReturnType.FULL_TEXT if return_full_text else ReturnType.NEW_TEXT
    if return_tensors is not None:
        if return_text is not None:
            raise ValueError("`return_text` is mutually exclusive with `return_tensors`")
        return ReturnType.TENSORS
    return ReturnType.FULL_TEXT


class _GenerationPipeline:
    """What the generating pipelines share: the model, its generation config (with the reference
    pipeline's default length), the batch size, and the keyword arguments given to pipeline(),
    defaults of every call (pipeline options such as return_full_text=False and generation
    arguments alike, as in transformers)."""

    _default_generation: dict[str, Any] = {"max_new_tokens": _DEFAULT_MAX_NEW_TOKENS}

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 1, **call_defaults: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        config = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
        # The reference pipeline's defaults fill only what the model's generation config leaves unset.
        for key, value in self._default_generation.items():
            if getattr(config, key, None) is None:
                setattr(config, key, value)
        # A model's own max_length (not the global 20) wins over the default length, as in transformers.
        if config.max_new_tokens == _DEFAULT_MAX_NEW_TOKENS and config.max_length not in (None, 20):
            config.max_new_tokens = None
        self.generation_config = config
        self.call_defaults = call_defaults

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype | None:
        return getattr(self.model, "dtype", None)

    torch_dtype = dtype  # transformers' older name


class TextGenerationPipeline(_GenerationPipeline):
    task = "text-generation"
    # As transformers' text-generation pipeline: free-form text is sampled unless the model's config says otherwise.
    _default_generation = {"max_new_tokens": _DEFAULT_MAX_NEW_TOKENS, "do_sample": True, "temperature": 0.7}

    def __call__(
        self,
        text_inputs: Any,
        *,
        return_full_text: bool | None = None,
        return_tensors: bool | None = None,
        return_text: bool | None = None,
        return_type: Any = None,
        clean_up_tokenization_spaces: bool | None = None,
        skip_special_tokens: bool | None = None,
        continue_final_message: bool | None = None,
        prefix: str | None = None,
        handle_long_generation: str | None = None,
        stop_sequence: str | None = None,
        tokenizer_encode_kwargs: dict | None = None,
        batch_size: int | None = None,
        tools: list | None = None,
        documents: list | None = None,
        **generate_kwargs: Any,
    ):
        options = dict(
            return_full_text=return_full_text, return_tensors=return_tensors, return_text=return_text,
            return_type=return_type, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            skip_special_tokens=skip_special_tokens, continue_final_message=continue_final_message, prefix=prefix,
            handle_long_generation=handle_long_generation, stop_sequence=stop_sequence,
            tokenizer_encode_kwargs=tokenizer_encode_kwargs, batch_size=batch_size, tools=tools,
            documents=documents,
        )
        # A call's own options win over pipeline() defaults; options it leaves unset (None) do not.
        given = {key: value for key, value in options.items() if value is not None}
        merged = {**dict.fromkeys(options), **self.call_defaults, **given, **generate_kwargs}
        return self._generate_records(text_inputs, **merged)

    def _generate_records(
        self,
        text_inputs: Any,
        *,
        return_full_text: bool | None,
        return_tensors: bool | None,
        return_text: bool | None,
        return_type: Any,
        clean_up_tokenization_spaces: bool,
        skip_special_tokens: bool,
        continue_final_message: bool | None,
        prefix: str,
        handle_long_generation: str | None,
        stop_sequence: str | None,
        tokenizer_encode_kwargs: dict | None,
        batch_size: int | None,
        tools: list | None,
        documents: list | None,
        **generate_kwargs: Any,
    ):
        single = isinstance(text_inputs, str) or _is_chat(text_inputs) or _is_chat_object(text_inputs)
        prompts = [text_inputs] if single else list(text_inputs)
        if not prompts:
            raise ValueError("text-generation pipeline got an empty list of prompts")
        prompts = [p["messages"] if _is_chat_object(p) else p for p in prompts]
        for prompt in prompts:
            if not isinstance(prompt, str) and not _is_chat(prompt):
                raise ValueError(
                    "each prompt must be a string or a chat (a list of {'role': ..., 'content': ...} dicts), "
                    f"got {type(prompt).__name__}"
                )
        if handle_long_generation not in (None, "hole"):
            raise ValueError(
                f"{handle_long_generation} is not a valid value for `handle_long_generation` parameter expected"
                " [None, 'hole']"
            )
        kind = _return_type(return_full_text, return_tensors, return_text, return_type)
        prefix = prefix or ""
        skip_special_tokens = True if skip_special_tokens is None else skip_special_tokens
        clean_up_tokenization_spaces = True if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        # As in transformers, max_length limits both the prompt's tokenization and generation.
        tokenizer_kwargs = {k: generate_kwargs.pop(k) if k != "max_length" else generate_kwargs[k]
                            for k in _TOKENIZER_KWARGS if k in generate_kwargs}
        tokenizer_kwargs.update(tokenizer_encode_kwargs or {})
        if stop_sequence is not None:
            # Every token of the stop sequence ends generation, as transformers' eos_token_id override does.
            generate_kwargs["eos_token_id"] = self.tokenizer.encode(stop_sequence, add_special_tokens=False)
        generate_kwargs.setdefault("generation_config", self.generation_config)
        if "tokenizer" not in generate_kwargs and generate_kwargs.get("stop_strings"):
            generate_kwargs["tokenizer"] = self.tokenizer

        if not single:
            # transformers runs a list through a torch DataLoader, whose iterator draws one base seed from the
            # global generator first: drawing it too keeps seeded sampling over a list the same as there.
            torch.empty((), dtype=torch.int64).random_()
        size = batch_size or self.batch_size
        results = []
        for start in range(0, len(prompts), size):
            group = prompts[start : start + size]
            encoded = [self._encode(p, prefix, continue_final_message, tools, documents, tokenizer_kwargs) for p in group]
            if handle_long_generation == "hole":
                encoded = [self._keep_room_for_new_tokens(ids, generate_kwargs) for ids in encoded]
            input_ids, attention_mask = self._left_pad(encoded)
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
            sequences = output.sequences if hasattr(output, "sequences") else output
            per_prompt = sequences.shape[0] // len(group)
            for row, prompt in enumerate(group):
                records = []
                for sequence in sequences[row * per_prompt : (row + 1) * per_prompt]:
                    new_ids = sequence[input_ids.shape[1] :].tolist()
                    if kind is ReturnType.TENSORS:
                        records.append({"generated_token_ids": sequence.tolist()})
                        continue
                    text = self.tokenizer.decode(new_ids, skip_special_tokens=skip_special_tokens,
                                                 clean_up_tokenization_spaces=clean_up_tokenization_spaces)
                    if kind is ReturnType.FULL_TEXT:
                        text = self._full_text(prompt, prefix, text, continue_final_message)
                    records.append({"generated_text": text})
                results.append(records)
        return results[0] if single else results

    def _keep_room_for_new_tokens(self, ids: list[int], generate_kwargs: dict) -> list[int]:
        """handle_long_generation="hole": drop the prompt's start so that prompt + new tokens fit model_max_length."""
        if "max_new_tokens" in generate_kwargs:
            new_tokens = generate_kwargs["max_new_tokens"]
        else:
            new_tokens = generate_kwargs.get("max_length", self.generation_config.max_length) - len(ids)
            if new_tokens < 0:
                raise ValueError("We cannot infer how many new tokens are expected")
        if len(ids) + new_tokens <= self.tokenizer.model_max_length:
            return ids
        keep_length = self.tokenizer.model_max_length - new_tokens
        if keep_length <= 0:
            raise ValueError(
                "We cannot use `hole` to handle this generation the number of desired tokens exceeds the models max length"
            )
        return ids[-keep_length:]

    def _encode(self, prompt, prefix, continue_final_message, tools, documents, tokenizer_kwargs) -> list[int]:
        if isinstance(prompt, str):
            encoded = self.tokenizer(prefix + prompt, **tokenizer_kwargs)
            return list(encoded["input_ids"])
        if continue_final_message is None:
            continue_final_message = prompt[-1].get("role") == "assistant"
        kwargs = {k: v for k, v in tokenizer_kwargs.items() if k != "add_special_tokens"}
        ids = self.tokenizer.apply_chat_template(
            prompt,
            add_generation_prompt=not continue_final_message,
            continue_final_message=continue_final_message,
            tokenize=True,
            tools=tools,
            documents=documents,
            **kwargs,
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def _left_pad(self, encoded: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of different lengths become one left-padded batch (generation appends on the right)."""
        width = max(len(row) for row in encoded)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.generation_config.pad_token_id
        if pad_id is None:
            eos = self.generation_config.eos_token_id
            pad_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            if ids:
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    @staticmethod
    def _full_text(prompt, prefix, new_text, continue_final_message):
        if isinstance(prompt, str):
            return prompt + new_text
        if continue_final_message is None:
            continue_final_message = prompt[-1].get("role") == "assistant"
        if continue_final_message:
            last = prompt[-1]
            return list(prompt[:-1]) + [{"role": last["role"], "content": last["content"] + new_text}]
        return list(prompt) + [{"role": "assistant", "content": new_text}]


class ImageTextToTextPipeline(_GenerationPipeline):
    """`pipeline("image-text-to-text", ...)`: images + text, or chats with image items, in; text out.

    As the reference pipeline:
    - a chat (messages whose content lists {"type": "image", ...} and {"type": "text", ...} items)
      -> [{"input_text": messages, "generated_text": messages + [assistant reply]}]; a list of chats
      -> a list of such lists
    - images= and text= (a string, or lists of them: one batch) -> [{"input_text": text,
      "generated_text": text + new text}], one record per text
    With return_full_text=False, "generated_text" holds only the new text.
    """

    task = "image-text-to-text"

    def __init__(self, model: Any, processor: Any, batch_size: int = 1, **call_defaults: Any):
        super().__init__(model, processor.tokenizer, batch_size, **call_defaults)
        self.processor = processor
        self.image_processor = processor.image_processor

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any):
        kwargs = {**self.call_defaults, **kwargs}
        if images is None and text is None:
            raise ValueError("You must at least provide either text or images.")
        if _is_chat_input(text) or (text is None and _is_chat_input(images)):
            if text is not None and images is not None:
                raise ValueError(
                    "Invalid input: you passed `chat` and `images` as separate input arguments. Images must be placed "
                    "inside the chat message's `content`, e.g. {'type': 'image', 'url': 'image_url'}"
                )
            chats = text if text is not None else images
            if isinstance(chats[0], dict):
                return self._run({"chat": chats}, **kwargs)
            return [self._run({"chat": chat}, **kwargs) for chat in chats]
        if images is not None and text is None:
            raise ValueError("You must provide text for this pipeline.")
        return self._run({"images": images, "text": text}, **kwargs)

    def _run(
        self,
        inputs: dict,
        *,
        max_new_tokens: int | None = None,
        generate_kwargs: dict | None = None,
        timeout: float | None = None,
        return_full_text: bool | None = None,
        return_tensors: bool | None = None,
        return_type: Any = None,
        clean_up_tokenization_spaces: bool | None = None,
        stop_sequence: str | list[str] | None = None,
        continue_final_message: bool | None = None,
        skip_special_tokens: bool | None = None,
        processor_kwargs: dict | None = None,
        **processing_kwargs: Any,
    ) -> list[dict]:
        """One input (a chat, or images + text) through the processor, generate() and decoding."""
        if return_full_text is not None and return_type is None and return_tensors is not None:
            raise ValueError("`return_full_text` is mutually exclusive with `return_tensors`")
        kind = _return_type(return_full_text, return_tensors, None, return_type)
        generate_kwargs = dict(generate_kwargs or {})
        if stop_sequence is not None:
            generate_kwargs["stop_strings"] = [stop_sequence] if isinstance(stop_sequence, str) else stop_sequence
            generate_kwargs["tokenizer"] = self.tokenizer
        if max_new_tokens is not None:
            if "max_new_tokens" in generate_kwargs:
                raise ValueError(
                    "'max_new_tokens' is defined twice, once in 'generate_kwargs' and once as a direct parameter, "
                    "please use only one"
                )
            generate_kwargs["max_new_tokens"] = max_new_tokens
        generate_kwargs.setdefault("generation_config", self.generation_config)

        chat = inputs.get("chat")
        if chat is not None:
            if continue_final_message is None:
                continue_final_message = chat[-1]["role"] == "assistant"
            model_inputs = self.processor.apply_chat_template(
                chat, continue_final_message=continue_final_message, add_generation_prompt=not continue_final_message,
                tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs=processor_kwargs or {},
                **processing_kwargs,
            )
            prompts = [chat]
        else:
            call_kwargs = processor_kwargs if processor_kwargs is not None else processing_kwargs
            text = inputs["text"]
            if isinstance(text, (list, tuple)) and len(text) > 1:
                call_kwargs = {"padding": True, **call_kwargs}  # a batch of prompts is padded by default
            images = None if inputs["images"] is None else load_images(inputs["images"], timeout=timeout)
            model_inputs = self.processor(images=images, text=text, return_tensors="pt", **call_kwargs)
            prompts = [text] if isinstance(text, str) else list(text)
        model_inputs = model_inputs.to(self.device).to(self.dtype) if self.dtype is not None else model_inputs
        input_ids = model_inputs["input_ids"]
        generated = self.model.generate(**model_inputs, **generate_kwargs)
        generated = generated.sequences if hasattr(generated, "sequences") else generated
        if kind is ReturnType.TENSORS:
            return [{"input_text": prompt, "generated_token_ids": generated[i]} for i, prompt in enumerate(prompts)]
        decode = dict(skip_special_tokens=True if skip_special_tokens is None else skip_special_tokens)
        if clean_up_tokenization_spaces is not None:
            decode["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        texts = self.processor.post_process_image_text_to_text(generated, **decode)
        decoded_inputs = self.processor.post_process_image_text_to_text(input_ids, **decode)
        texts = [_without_prompt(text, prompt) for text, prompt in zip(texts, decoded_inputs)]
        if kind is ReturnType.FULL_TEXT:
            texts = [_with_prompt(prompt, text, continue_final_message) for prompt, text in zip(prompts, texts)]
        return [{"input_text": prompt, "generated_text": text} for prompt, text in zip(prompts, texts)]


def _is_chat_input(value: Any) -> bool:
    """A chat (a list of message dicts) or a list of chats, as the reference tells them from images and texts."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], (list, tuple, dict))


def _without_prompt(generated_text: str, decoded_prompt: str) -> str:
    """The new text: the decoded prompt is cut when it starts the decoded output (up to 2 characters in)."""
    index = generated_text.find(decoded_prompt)
    return generated_text[index + len(decoded_prompt) :] if 0 <= index <= 2 else generated_text


def _with_prompt(prompt: Any, new_text: str, continue_final_message: bool | None) -> Any:
    """The prompt with the new text: appended to a string, or as the chat's next (or continued) message."""
    if isinstance(prompt, str):
        return prompt + new_text
    if continue_final_message is None:
        continue_final_message = prompt[-1]["role"] == "assistant"
    if continue_final_message:
        last = prompt[-1]
        continued = {**last["content"][-1], "text": last["content"][-1]["text"] + new_text}
        return list(prompt[:-1]) + [{"role": last["role"], "content": list(last["content"][:-1]) + [continued]}]
    return list(prompt) + [{"role": "assistant", "content": new_text}]


SUPPORTED_TASKS = {"text-generation": TextGenerationPipeline, "image-text-to-text": ImageTextToTextPipeline}


class UnknownTaskError(ValueError, KeyError):
    """An unknown pipeline task: a ValueError, and a KeyError as transformers raises for it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# Model types whose checkpoints take images: a pipeline without task= runs them as image-text-to-text.
_IMAGE_TEXT_MODEL_TYPES = ("mllama", "llama4")


def _infer_task(model: Any) -> str:
    """The task of a model (a loaded one, or a folder / Hub id read through its config): what transformers
    reads from the Hub's pipeline tag, from the model's own config here."""
    config = getattr(model, "config", None)
    if config is None:
        from .auto import AutoConfig

        config = AutoConfig.from_pretrained(model)
    model_type = getattr(config, "model_type", None)
    architectures = getattr(config, "architectures", None) or []
    if model_type in _IMAGE_TEXT_MODEL_TYPES or any(a.endswith("ForConditionalGeneration") for a in architectures):
        return "image-text-to-text"
    return "text-generation"


def pipeline(
    task: str | None = None,
    model: Any = None,
    tokenizer: Any = None,
    *,
    processor: Any = None,
    dtype: Any = "auto",
    device: Any = None,
    device_map: Any = None,
    batch_size: int = 1,
    model_kwargs: dict[str, Any] | None = None,
    **generate_defaults: Any,
) -> TextGenerationPipeline | ImageTextToTextPipeline:
    """Build a pipeline. `model` is a folder, a Hub id, or an already loaded herd model; without task=,
    the task is read from the model's config (image-text-to-text for Mllama / Llama 4, else text-generation)."""
    if task is None:
        if model is None:
            raise ValueError("pipeline() needs task= or model=: pass e.g. pipeline('text-generation', model=folder)")
        task = _infer_task(model)
    if task not in SUPPORTED_TASKS:
        raise UnknownTaskError(f"unsupported pipeline task {task!r}; herd has: {', '.join(SUPPORTED_TASKS)}")
    if model is None:
        raise ValueError("pipeline() needs model= (a folder, a Hub id or a loaded model): herd picks no default model")
    # As transformers: torch_dtype (the older name) is used only where dtype keeps its default "auto";
    # a dtype in model_kwargs is used where dtype= is not given, and refused where it is.
    torch_dtype = generate_defaults.pop("torch_dtype", None)
    if torch_dtype is not None and dtype == "auto":
        dtype = torch_dtype
    model_kwargs = dict(model_kwargs or {})
    if "torch_dtype" in model_kwargs or "dtype" in model_kwargs:
        if dtype != "auto":
            raise ValueError(
                "pipeline() got dtype= and model_kwargs={'dtype': ...}: pass the dtype in only one of them"
            )
        torch_dtype = model_kwargs.pop("torch_dtype", None)
        dtype = model_kwargs.pop("dtype", torch_dtype)
    if "device_map" in model_kwargs:
        if device_map is not None:
            raise ValueError(
                "pipeline() got device_map= and model_kwargs={'device_map': ...}: pass it in only one of them"
            )
        device_map = model_kwargs.pop("device_map")
    if device is not None and device_map is not None:
        raise ValueError("pass device or device_map, not both")
    if isinstance(device, int):
        device = torch.device("cuda", device) if device >= 0 else torch.device("cpu")
    placement = device_map if device_map is not None else device
    from .auto import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
    from .tokenization import AutoTokenizer

    if task == "image-text-to-text":
        model, processor = _model_and_companion(model, processor, AutoModelForImageTextToText, AutoProcessor,
                                                "processor", dtype, placement, model_kwargs)
        return ImageTextToTextPipeline(model, processor, batch_size=batch_size, **generate_defaults)
    model, tokenizer = _model_and_companion(model, tokenizer, AutoModelForCausalLM, AutoTokenizer, "tokenizer", dtype,
                                            placement, model_kwargs)
    return SUPPORTED_TASKS[task](model, tokenizer, batch_size=batch_size, **generate_defaults)


def _model_and_companion(model, companion, model_class, companion_class, name: str, dtype, placement, model_kwargs):
    """(model, its tokenizer or processor): loaded from a folder or Hub id, or as given (a loaded
    model moved to the placement; its companion from the model's own folder where none is given)."""
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        source = model
        model = model_class.from_pretrained(source, dtype=dtype, device_map=placement, **(model_kwargs or {}))
        if companion is None:
            companion = companion_class.from_pretrained(source)
    elif placement is not None:
        model = model.to(torch.device(placement) if not isinstance(placement, torch.device) else placement)
    if companion is None:
        source = getattr(model.config, "name_or_path", "")
        if not source:
            raise ValueError(f"pipeline() got a model object without a {name}: pass {name}=")
        companion = companion_class.from_pretrained(source)
    elif isinstance(companion, str):
        companion = companion_class.from_pretrained(companion)
    return model, companion
