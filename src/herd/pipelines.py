"""`pipeline("text-generation", ...)`: prompts or chats in, text out, as the reference returns it.

- a string -> [{"generated_text": str}] (one record per returned sequence)
- a chat (list of {"role", "content"} messages) -> [{"generated_text": messages + [assistant reply]}]
- a list of either -> a list of such lists
With return_full_text=False, "generated_text" holds only the new text.
"""

from __future__ import annotations

import copy
import enum
from typing import Any

import torch

from .generation import GenerationConfig

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


class TextGenerationPipeline:
    task = "text-generation"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 1, **call_defaults: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.generation_config = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
        if self.generation_config.max_new_tokens is None:
            self.generation_config.max_new_tokens = _DEFAULT_MAX_NEW_TOKENS
        # Keyword arguments given to pipeline(): defaults of every call, pipeline options
        # (return_full_text=False, prefix=...) and generation arguments alike, as in transformers.
        self.generate_defaults = call_defaults

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype | None:
        return getattr(self.model, "dtype", None)

    torch_dtype = dtype  # transformers' older name

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
        merged = {**dict.fromkeys(options), **self.generate_defaults, **given, **generate_kwargs}
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


SUPPORTED_TASKS = {"text-generation": TextGenerationPipeline}


def pipeline(
    task: str,
    model: Any = None,
    tokenizer: Any = None,
    *,
    dtype: Any = "auto",
    device: Any = None,
    device_map: Any = None,
    batch_size: int = 1,
    model_kwargs: dict[str, Any] | None = None,
    **generate_defaults: Any,
) -> TextGenerationPipeline:
    """Build a pipeline. `model` is a folder, a Hub id, or an already loaded herd model."""
    if task not in SUPPORTED_TASKS:
        raise ValueError(f"unsupported pipeline task {task!r}; herd has: {', '.join(SUPPORTED_TASKS)}")
    if model is None:
        raise ValueError("pipeline() needs model= (a folder, a Hub id or a loaded model): herd picks no default model")
    if "torch_dtype" in generate_defaults:
        dtype = generate_defaults.pop("torch_dtype")
    if device is not None and device_map is not None:
        raise ValueError("pass device or device_map, not both")
    if isinstance(device, int):
        device = torch.device("cuda", device) if device >= 0 else torch.device("cpu")
    placement = device_map if device_map is not None else device
    from .auto import AutoModelForCausalLM
    from .tokenization import AutoTokenizer

    if isinstance(model, str) or hasattr(model, "__fspath__"):
        source = model
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=placement, **(model_kwargs or {}))
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(source)
    elif placement is not None:
        model = model.to(torch.device(placement) if not isinstance(placement, torch.device) else placement)
    if tokenizer is None:
        source = getattr(model.config, "name_or_path", "")
        if not source:
            raise ValueError("pipeline() got a model object without a tokenizer: pass tokenizer=")
        tokenizer = AutoTokenizer.from_pretrained(source)
    elif isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return SUPPORTED_TASKS[task](model, tokenizer, batch_size=batch_size, **generate_defaults)
