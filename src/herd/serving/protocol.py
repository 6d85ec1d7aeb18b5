"""The OpenAI request bodies, checked field by field, and the error body clients expect.

Every bad field is an `APIError` whose message and `param` name the field (`messages[1].content`,
`max_tokens`), answered as `{"error": {"message", "type", "param", "code"}}` with its 4xx status.
Parsing is plain dict checking rather than a schema library, so each message can say what to send
instead. Fields that cannot change the answer (`user`, `metadata`, `store`, `service_tier`, ...) and
fields nobody knows are ignored, as OpenAI-compatible servers do; fields known to change the answer
that herd does not implement (the deprecated `functions`, audio output, vLLM's `guided_json`,
`min_tokens`, ...) are a 400 naming them unless they carry their no-op value, never silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

# The roles a chat message may have (developer is OpenAI's newer name for system; function is the
# deprecated functions API's tool result, rendered as a tool message).
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_N = 128
MAX_STOP_STRINGS = 4  # OpenAI's limit ("up to 4 sequences")
MAX_TOP_LOGPROBS = 20
# a top_k past any vocabulary keeps every token (vLLM takes any top_k and clamps it to the vocabulary);
# off before it reaches the engine, where a value past 64 bits would fail the whole batch's step
MAX_TOP_K = 2**31 - 1
# seeds seed torch generators, which take 64-bit values (OpenAI's and vLLM's seed is an int64 too)
SEED_RANGE = (-(2**63), 2**63 - 1)
# /v1/completions' max_tokens when it is left out, as OpenAI's reference gives it (chat has no such default)
COMPLETION_MAX_TOKENS = 16


class APIError(Exception):
    """A request that fails with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


@dataclass
class Sampling:
    """The sampling fields shared by chat and completions, as the client sent them (None = not sent)."""

    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"  # the field max_tokens came from, for errors about it
    default_max_tokens: int | None = None  # when max_tokens is left out (None: the room left in the context)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k best
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict[str, Any]]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (vLLM's): usage so far on every chunk
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] = "auto"
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool = True  # False: at most one call per answer (the first the model wrote)


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (vLLM's): usage so far on every chunk
    response_format: dict[str, Any] | None = None
    echo: bool = False  # the prompt's text (and its tokens' logprobs) before each choice's
    prompt_only: bool = False  # echo with max_tokens 0: the prompt alone (one token is generated and dropped, as vLLM)


# --- field checks ---------------------------------------------------------------------------------


def _number(body: dict, name: str, *, low: float | None = None, high: float | None = None, integer: bool = False,
            low_open: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (not integer and not math.isfinite(value)):
        raise bad(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise bad(name, f"must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise bad(name, f"must be <= {high}, got {value}")
    # a number field sent as a JSON integer (10**30 included) is a float from here on: the engine turns it
    # into a tensor, where a Python int past 64 bits fails the whole batch's step
    return value if integer else float(value)


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, got {value!r}")
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise bad("stop", "must be a string or a list of strings")
    if len(strings) > MAX_STOP_STRINGS:
        raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(strings)}")
    if any(s == "" for s in strings):
        raise bad("stop", "a stop string must not be empty")
    return strings


def _logit_bias(body: dict) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias}, each bias a number in [-100, 100]."""
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("logit_bias", 'must be an object mapping token ids to biases, like {"1234": -100}')
    biases = {}
    for key, bias in value.items():
        token = str(key).strip()
        if not token.isdigit():
            raise bad("logit_bias", f"keys must be token ids (integers >= 0), got {key!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias) \
                or not -100 <= bias <= 100:
            raise bad("logit_bias", f"the bias of token {key} must be a number in [-100, 100], got {bias!r}")
        biases[int(token)] = float(bias)
    return biases


def _sampling(body: dict, logprobs: int | None) -> Sampling:
    max_tokens = _number(body, "max_tokens", low=1, integer=True)
    completion_limit = _number(body, "max_completion_tokens", low=1, integer=True)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                 for i in stop_ids):
        raise bad("stop_token_ids", "must be a list of token ids (integers >= 0)")
    top_k = _number(body, "top_k", low=-1, integer=True)
    if top_k is not None and top_k > MAX_TOP_K:  # as many as the vocabulary: the same as off
        top_k = 0
    return Sampling(
        max_tokens=completion_limit if completion_limit is not None else max_tokens,
        max_tokens_param="max_completion_tokens" if completion_limit is not None else "max_tokens",
        temperature=_number(body, "temperature", low=0, high=2),
        top_p=_number(body, "top_p", low=0, high=1, low_open=True),
        top_k=None if top_k in (None, -1) else top_k,  # -1 is vLLM's "off", 0 is ours
        min_p=_number(body, "min_p", low=0, high=1),
        seed=_number(body, "seed", low=SEED_RANGE[0], high=SEED_RANGE[1], integer=True),
        n=_number(body, "n", low=1, high=MAX_N, integer=True) or 1,
        stop=_stop(body),
        stop_token_ids=list(stop_ids),
        presence_penalty=_number(body, "presence_penalty", low=-2, high=2) or 0.0,
        frequency_penalty=_number(body, "frequency_penalty", low=-2, high=2) or 0.0,
        repetition_penalty=_number(body, "repetition_penalty", low=0, low_open=True) or 1.0,
        ignore_eos=_boolean(body, "ignore_eos"),
        logprobs=logprobs,
        logit_bias=_logit_bias(body),
    )


def _stream_options(body: dict, stream: bool) -> dict[str, bool]:
    """include_usage (a last chunk with the usage) and continuous_usage (vLLM's continuous_usage_stats:
    the usage so far on every chunk as well; as vLLM, only together with include_usage)."""
    options = body.get("stream_options")
    if options is None:
        return {"include_usage": False, "continuous_usage": False}
    if not isinstance(options, dict):
        raise bad("stream_options", 'must be an object like {"include_usage": true}')
    if not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    include, continuous = _boolean(options, "include_usage"), _boolean(options, "continuous_usage_stats")
    return {"include_usage": include, "continuous_usage": include and continuous}


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"must be a string, got {model!r}")
    return model


def _response_format(body: dict) -> dict[str, Any] | None:
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("response_format", 'must be {"type": "text" | "json_object" | "json_schema", ...}')
    if value["type"] == "text":
        return None
    if value["type"] == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad("response_format.json_schema", 'must be {"name": ..., "schema": {a JSON schema}}')
    return value


# --- fields that change the answer and are not implemented ----------------------------------------

_NO_GUIDED = "send response_format (json_object or json_schema) instead"
_NO_VLLM = "a vLLM extension herd does not implement; leave it out"
# field -> (the values that change nothing, what to send instead); None (left out) always passes
_SHARED_UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "min_tokens": ((0,), _NO_VLLM),
    "use_beam_search": ((False,), "beam search is not implemented; leave it out"),
    "length_penalty": ((1, 1.0), "beam search is not implemented; leave it out"),
    "guided_json": ((), _NO_GUIDED),
    "guided_regex": ((), "regular-expression constraints are not implemented; leave it out"),
    "guided_choice": ((), "choice constraints are not implemented; leave it out"),
    "guided_grammar": ((), "grammar constraints are not implemented; leave it out"),
    "structured_outputs": ((), _NO_GUIDED),
    "include_stop_str_in_output": ((False,), "stop strings are always removed from the answer; leave it out"),
    "skip_special_tokens": ((True,), "special tokens are always skipped; leave it out"),
    "spaces_between_special_tokens": ((True,), _NO_VLLM),
    "truncate_prompt_tokens": ((), "prompts are never truncated; shorten the prompt instead"),
    "prompt_logprobs": ((), "prompt logprobs come with echo and logprobs on /v1/completions"),
    "bad_words": (([],), _NO_VLLM),
    "allowed_token_ids": ((), "use logit_bias instead"),
    "logits_processors": (([],), _NO_VLLM),
    "return_tokens_as_token_ids": ((False,), _NO_VLLM),
}
_CHAT_UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    **_SHARED_UNSUPPORTED,
    "functions": (([],), "the deprecated functions API is not supported; send tools instead"),
    "function_call": (("none", "auto"), "the deprecated functions API is not supported; send tool_choice instead"),
    "audio": ((), "audio output is not supported: this model answers in text"),
    "modalities": ((["text"],), 'this model answers in text only: send ["text"] or leave it out'),
    "web_search_options": ((), "web search is not supported; leave it out"),
    "reasoning_effort": (("none",), "this model does not reason before answering; leave it out"),
    "verbosity": (("medium",), "the answer's length follows max_tokens only; leave it out"),
    "best_of": ((1,), "the n samples are returned as they are, never the best of more; leave it out"),
    "echo": ((False,), "echo is supported on /v1/completions only"),
    "add_generation_prompt": ((True,), "the prompt always ends with the assistant's header; leave it out"),
    "continue_final_message": ((False,), "continuing the final message is not implemented; leave it out"),
    "chat_template": ((), "the model's own chat template is always used; leave it out"),
    "chat_template_kwargs": (({},), "the chat template takes no extra arguments here; leave it out"),
    "documents": (([],), "documents are not supported; put them in a message"),
    "mm_processor_kwargs": (({},), _NO_VLLM),
}
_COMPLETION_UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    **_SHARED_UNSUPPORTED,
    "add_special_tokens": ((True,), "the tokenizer's special tokens are always added; leave it out"),
}


def _refuse_unsupported(body: dict, table: dict[str, tuple[tuple, str]]) -> None:
    for name, (harmless, advice) in table.items():
        value = body.get(name)
        if value is None or any(type(value) is type(h) and value == h for h in harmless):
            continue
        raise bad(name, f"is not supported by this server: {advice} (got {json.dumps(value)[:80]})")


# --- chat -----------------------------------------------------------------------------------------


def _content_part(part: Any, where: str, role: str) -> dict[str, Any]:
    if isinstance(part, dict) and part.get("type") == "refusal" and role == "assistant":
        # an earlier answer the model refused, as the client replays it: its text
        if not isinstance(part.get("refusal"), str):
            raise bad(f"{where}.refusal", "must be a string")
        return {"type": "text", "text": part["refusal"]}
    if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
        seen = f"a part of type {part.get('type')!r}" if isinstance(part, dict) else f"{type(part).__name__} {part!r:.40}"
        raise bad(where, 'a content part must be {"type": "text", "text": ...} or {"type": "image_url", '
                         f'"image_url": {{"url": ...}}}}, got {seen}')
    if part["type"] == "text":
        if not isinstance(part.get("text"), str):
            raise bad(f"{where}.text", "must be a string")
        return {"type": "text", "text": part["text"]}
    source = part.get("image_url")
    url = source.get("url") if isinstance(source, dict) else source
    if not isinstance(url, str) or not url:
        raise bad(f"{where}.image_url", 'must be {"url": "https://..." or "data:image/...;base64,..."}')
    return {"type": "image_url", "url": url}


def _optional_string(message: dict, name: str, where: str) -> str | None:
    value = message.get(name)
    if value is not None and not isinstance(value, str):
        raise bad(f"{where}.{name}", f"must be a string, got {value!r}")
    return value


def _message(message: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad(where, 'must be an object like {"role": "user", "content": "..."}')
    role = message.get("role")
    if role not in ROLES:
        raise bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    name = _optional_string(message, "name", where)
    if role == "function" and not name:
        raise bad(f"{where}.name", "is missing: a function message names the function whose result it holds")
    content = message.get("content")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and (role != "assistant" or not isinstance(tool_calls, list)):
        raise bad(f"{where}.tool_calls", "must be a list, in an assistant message")
    calls = [_tool_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(tool_calls or [])]
    function_call = message.get("function_call")
    if function_call is not None:  # the deprecated functions API's call: one tool call without an id
        if role != "assistant":
            raise bad(f"{where}.function_call", "is only allowed in an assistant message")
        if calls:
            raise bad(f"{where}.function_call", "send either tool_calls or the deprecated function_call, not both")
        calls = [_tool_call({"type": "function", "function": function_call}, f"{where}.function_call",
                            function_only=True)]
    if content is None and role == "assistant" and isinstance(message.get("refusal"), str):
        content = message["refusal"]  # OpenAI's answer when the model refused: content null, the refusal beside it
    if content is None and not calls:
        raise bad(f"{where}.content", "is missing (only an assistant message with tool_calls may leave it out)")
    if content is not None and not isinstance(content, (str, list)):
        raise bad(f"{where}.content", "must be a string or a list of content parts")
    parts = None
    if isinstance(content, list):
        if not content:  # OpenAI refuses it too; the template would render an empty turn
            raise bad(f"{where}.content", "must not be an empty list; send at least one content part")
        parts = [_content_part(part, f"{where}.content[{i}]", role) for i, part in enumerate(content)]
        if role != "user" and any(part["type"] == "image_url" for part in parts):
            raise bad(f"{where}.content", "images are allowed in user messages only")
    checked: dict[str, Any] = {"role": {"developer": "system", "function": "tool"}.get(role, role),
                               "content": parts if parts is not None else content}
    if calls:  # an empty list is no call: the templates would otherwise drop the whole turn
        checked["tool_calls"] = calls
    if role == "tool":
        checked["tool_call_id"] = _optional_string(message, "tool_call_id", where)
    if name is not None:
        checked["name"] = name
    return checked


def _tool_call(call: Any, where: str, function_only: bool = False) -> dict[str, Any]:
    """A tool call of an earlier assistant turn, its arguments parsed to the object the chat templates
    render (as vLLM hands them over): a JSON object string, or empty/null for no arguments."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
            call.get("type", "function") != "function":
        if function_only:
            raise bad(where, 'must be {"name": ..., "arguments": "{...}"}')
        raise bad(where, 'must be {"id": ..., "type": "function", "function": {"name": ..., "arguments": "{...}"}}')
    ident = None if function_only else _optional_string(call, "id", where)
    arguments = function.get("arguments")
    param = f"{where}.arguments" if function_only else f"{where}.function.arguments"
    if arguments is None or arguments == "":
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):
            raise bad(param, f"must be a JSON object as a string, like '{{\"city\": \"Paris\"}}', got "
                             f"{function['arguments'][:80]!r}") from None
    if not isinstance(arguments, dict):
        raise bad(param, f"must be a JSON object (the call's arguments by name), got {function['arguments']!r:.80}")
    return {"id": ident, "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _tools(body: dict) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools", "must be a list of {\"type\": \"function\", \"function\": {...}}")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise bad(f"tools[{i}]", 'must be {"type": "function", "function": {"name": ..., "parameters": {...}}}')
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise bad(f"tools[{i}].function.parameters", "must be a JSON schema object")
    return tools or None


def _tool_choice(body: dict, tools: list | None) -> str | dict[str, Any]:
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:  # as vLLM and OpenAI answer
            raise bad("tool_choice", f'"{choice}" needs tools: send tools, or leave tool_choice out')
        return choice
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise bad("tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')
    if not any(tool["function"]["name"] == name for tool in tools or []):
        raise bad("tool_choice", f"names the function {name!r}, which is not in tools")
    return {"type": "function", "function": {"name": name}}


def parse_chat_request(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of messages")
    checked = [_message(message, i) for i, message in enumerate(messages)]
    _refuse_unsupported(body, _CHAT_UNSUPPORTED)
    wants_logprobs = _boolean(body, "logprobs")
    top = _number(body, "top_logprobs", low=0, high=MAX_TOP_LOGPROBS, integer=True)
    if top and not wants_logprobs:  # 0 asks for nothing more: accepted alone, as vLLM does
        raise bad("top_logprobs", "needs logprobs: true")
    stream = _boolean(body, "stream")
    tools = _tools(body)
    return ChatRequest(
        model=_model(body), messages=checked, sampling=_sampling(body, (top or 0) if wants_logprobs else None),
        stream=stream, **_stream_options(body, stream), tools=tools,
        tool_choice=_tool_choice(body, tools), response_format=_response_format(body),
        parallel_tool_calls=_boolean(body, "parallel_tool_calls", default=True))


# --- completions ----------------------------------------------------------------------------------


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                           for i in value)


def parse_completion_request(body: Any) -> CompletionRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists")
    if any(p == "" for p in prompts):
        raise bad("prompt", "must not be empty")
    echo = _boolean(body, "echo")
    # echo with max_tokens 0 answers the prompt alone (OpenAI's and vLLM's way to score a text)
    prompt_only = echo and type(body.get("max_tokens")) is int and body["max_tokens"] == 0
    if prompt_only:
        body = {**body, "max_tokens": 1}
    _refuse_unsupported(body, _COMPLETION_UNSUPPORTED)
    if body.get("suffix") not in (None, ""):  # an empty suffix asks for nothing
        raise bad("suffix", "is not supported by Llama models; leave it out")
    logprobs = _number(body, "logprobs", low=0, high=MAX_TOP_LOGPROBS, integer=True)
    stream = _boolean(body, "stream")
    sampling = _sampling(body, logprobs)
    sampling.default_max_tokens = COMPLETION_MAX_TOKENS
    best_of = _number(body, "best_of", low=1, integer=True)
    if best_of is not None and best_of != sampling.n:
        # the n samples come back as they are, never the best n of more: another best_of would be silently ignored
        raise bad("best_of", f"is not supported (the n samples are returned as they are); leave it out or set it "
                             f"equal to n, got best_of {best_of} with n {sampling.n}")
    return CompletionRequest(model=_model(body), prompts=prompts, sampling=sampling, stream=stream,
                             **_stream_options(body, stream), response_format=_response_format(body),
                             echo=echo, prompt_only=prompt_only)
