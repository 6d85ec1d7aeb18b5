"""Chat templates: reading them from a folder, compiling them in a sandbox, checking conversations,
describing Python functions as tools, and rendering.

Templates are rendered with jinja2 in an immutable sandbox, with the helpers chat templates expect
(`raise_exception`, `strftime_now`, a `tojson` filter that does not escape HTML or non-ASCII text),
so that prompts come out exactly as transformers 5.17 renders them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .files import (
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    CHAT_TEMPLATE_JSON_FILE,
    TOKENIZER_CONFIG_FILE,
    read_json_object,
)


# ----------------------------------------------------------------------------------------------
# Reading them from a folder
# ----------------------------------------------------------------------------------------------

# Where a tokenizer looks, first hit wins (transformers 5.17): the Jinja files, then
# tokenizer_config.json, then chat_template.json (the processors' older format). Processors look
# in another order (herd.processing_utils).
TOKENIZER_TEMPLATE_SOURCES = (CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_JSON_FILE)


def read_chat_template(folder: Path, sources: Sequence[str]) -> str | dict | list | None:
    """The chat template(s) of a folder, from the first of `sources` that holds one (None if none does).

    CHAT_TEMPLATE_FILE stands for the Jinja files: chat_template.jinja (the "default" template) and
    additional_chat_templates/*.jinja (named ones). A lone default comes back as a string, several
    templates as a {name: template} dict. Any other source is a JSON file of the folder whose
    "chat_template" key may hold one, in whatever form it was stored (see normalize_chat_template).
    """
    for source in sources:
        if source == CHAT_TEMPLATE_FILE:
            template = _read_jinja_templates(folder)
        else:
            path = folder / source
            template = read_json_object(path).get("chat_template") if path.is_file() else None
        if template is not None:
            return template
    return None


def _read_jinja_templates(folder: Path) -> str | dict | None:
    templates: dict[str, str] = {}
    main = folder / CHAT_TEMPLATE_FILE
    if main.is_file():
        templates["default"] = main.read_text(encoding="utf-8")
    extra_dir = folder / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if list(templates) == ["default"]:
        return templates["default"]
    return templates or None


def normalize_chat_template(template: Any) -> str | dict | None:
    """Templates are stored as a string, or as a list of {"name", "template"} dicts for several."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, Mapping):
        return dict(template)
    if isinstance(template, (list, tuple)):
        try:
            return {entry["name"]: entry["template"] for entry in template}
        except (TypeError, KeyError) as error:
            raise ValueError('a list of chat templates must hold {"name": ..., "template": ...} dicts') from error
    raise ValueError(
        f"chat_template must be a string, a dict or a list of named templates, got {type(template).__name__}"
    )


# ----------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text: rendered unchanged, and its
    [start, end) character span recorded while a tracker is active (return_assistant_tokens_mask).

    The span is measured as transformers measures it: the length of everything rendered before
    the block, then of the block's own output.
    """

    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        environment.extend(track_generation_spans=self.track_generation_spans)
        self._rendered: list[str] | None = None
        self._spans: list[tuple[int, int]] | None = None

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        text = caller()
        if self._spans is not None:
            start = len("".join(self._rendered))
            self._spans.append((start, start + len(text)))
        return text

    @contextlib.contextmanager
    def track_generation_spans(self, rendered: list[str], spans: list[tuple[int, int]]):
        """While active, `rendered` must receive each chunk of `Template.generate()` as it comes."""
        if self._spans is not None:
            raise RuntimeError("a chat template is already being rendered with generation tracking")
        self._rendered, self._spans = rendered, spans
        try:
            yield
        finally:
            self._rendered, self._spans = None, None


def _raise_template_error(message: str):
    """`raise_exception(...)` inside a template: the template's own way of rejecting a conversation."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
):
    # jinja2's own tojson escapes <, >, & and ' for HTML, which would change the prompt; chat
    # templates expect plain json.dumps (with its indent/separators/sort_keys options) and UTF-8 text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_template_error
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(source)


def template_variables(template: str) -> frozenset[str]:
    """The variables a template reads from outside (to tell template arguments from other keyword arguments)."""
    environment = compile_chat_template(template).environment
    return frozenset(jinja2.meta.find_undeclared_variables(environment.parse(template)))


# ----------------------------------------------------------------------------------------------
# Checking conversations
# ----------------------------------------------------------------------------------------------


_TOOL_ROLES = ("tool", "ipython", "function")


def _check_content(content: Any, role: str, where: str) -> None:
    if isinstance(content, str):
        return
    if role in _TOOL_ROLES and isinstance(content, (Mapping, list, tuple, int, float, bool)):
        return  # tool results may be structured; templates serialize them (e.g. with tojson)
    if isinstance(content, (list, tuple)):
        for position, item in enumerate(content):
            if not isinstance(item, Mapping):
                raise ValueError(
                    f"{where}: content item {position} is a {type(item).__name__}; a list content holds dicts "
                    'such as {"type": "text", "text": "..."}'
                )
        return
    raise ValueError(
        f"{where}: content must be a string or a list of content dicts such as "
        f'{{"type": "text", "text": "..."}}, got {type(content).__name__}'
    )


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, Mapping):
        raise ValueError(f"{where} is a {type(message).__name__}, not a dict with 'role' and 'content' keys")
    if "role" not in message:
        raise ValueError(f"{where} has no 'role' key (keys: {sorted(message)})")
    role = message["role"]
    if not isinstance(role, str):
        raise ValueError(f"{where}: 'role' must be a string, got {type(role).__name__}")
    if "content" not in message or message["content"] is None:
        if message.get("tool_calls"):
            return  # an assistant turn that only calls tools
        raise ValueError(f"{where} (role {role!r}) has no 'content'")
    _check_content(message["content"], role, where)


def _messages_of(conversation: Any) -> Any:
    # transformers' pipelines wrap conversations in objects with a `.messages` list.
    return conversation.messages if hasattr(conversation, "messages") else conversation


def _check_conversation(conversation: Any, label: str) -> None:
    if not isinstance(conversation, (list, tuple)):
        raise ValueError(
            f"{label} must be a list of messages (dicts with 'role' and 'content'), got {type(conversation).__name__}"
        )
    if len(conversation) == 0:
        raise ValueError(f"Cannot apply a chat template to an empty conversation ({label}): give at least one message")
    for index, message in enumerate(conversation):
        _check_message(message, f"{label}, message {index}")


def _split_batch(conversation: Any) -> tuple[list[Any], bool]:
    """(list of conversations, whether the input was a batch)."""
    if isinstance(conversation, (list, tuple)) and conversation:
        first = conversation[0]
        if isinstance(first, (list, tuple)) or hasattr(first, "messages"):
            return [_messages_of(item) for item in conversation], True
    return [_messages_of(conversation)], False


# ----------------------------------------------------------------------------------------------
# continue_final_message: the prompt ends inside the final message
# ----------------------------------------------------------------------------------------------

# Appended to the message being continued, so that its end can be found in the rendered text.
_CONTINUATION_MARK = "HERD_CONTINUE_FINAL_MESSAGE_MARK "


def _mark_final_message(messages: list, field: str, template_source: str) -> tuple[list, str]:
    """A copy of `messages` with the mark after the text of the last message, and that text."""
    messages = copy.deepcopy(list(messages))
    final = messages[-1].get(field)
    if final is None:
        raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue')
    if field not in template_source:
        raise ValueError(f'continue_final_message is set to "{field}", which the chat template never uses')
    if isinstance(final, (list, tuple)):
        # Continue the last text block of a multi-part content.
        for block in reversed(final):
            if "text" in block:
                text = block["text"]
                block["text"] = text + _CONTINUATION_MARK
                return messages, text
        raise ValueError("continue_final_message is set but the final message has no text block to continue")
    messages[-1] = {**messages[-1], field: final + _CONTINUATION_MARK}
    return messages, final


def _cut_at_mark(rendered: str, final_text: str) -> str:
    """Everything before the mark: the prompt ends inside the final message, open for the model to continue."""
    mark = _CONTINUATION_MARK.strip()
    if final_text.strip() not in rendered or mark not in rendered:
        raise ValueError(
            "continue_final_message is set but the final message does not appear in the rendered chat; the "
            "template changes or drops it, so it cannot be continued.\n"
            f"Final message: {final_text.strip()}\nRendered chat:\n{rendered}"
        )
    position = rendered.rindex(mark)
    if rendered[position : position + len(_CONTINUATION_MARK)] == _CONTINUATION_MARK:
        return rendered[:position]
    # The template trimmed the message's trailing whitespace (and the mark's space with it): trim ours too.
    return rendered[:position].rstrip()


# ----------------------------------------------------------------------------------------------
# Tools given as Python functions: JSON schema from type hints and a Google-style docstring
# ----------------------------------------------------------------------------------------------


_BASIC_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}


def _json_schema_for_type(hint: Any) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None:
        if hint is typing.Any:
            return {}
        if hint in _BASIC_JSON_TYPES:
            return {"type": _BASIC_JSON_TYPES[hint]}
        # transformers' two media types (a hint naming either means its module is already imported).
        torch, pil_image = sys.modules.get("torch"), sys.modules.get("PIL.Image")
        if torch is not None and hint is torch.Tensor:
            return {"type": "audio"}
        if pil_image is not None and hint is pil_image.Image:
            return {"type": "image"}
        # Bare list, tuple, dict and any other class: "object", as transformers maps them.
        return {"type": "object"}
    if origin is typing.Union or origin is types.UnionType:
        members = [_json_schema_for_type(arg) for arg in args if arg is not type(None)]
        if len(members) == 1:
            schema = members[0]
        elif all(isinstance(member.get("type"), str) for member in members):
            schema = {"type": sorted(member["type"] for member in members)}
        else:
            schema = {"anyOf": members}
        if type(None) in args:
            schema["nullable"] = True
        return schema
    if origin is typing.Literal:
        kinds = []
        for value in args:
            kind = _BASIC_JSON_TYPES.get(type(value))
            if kind is None:
                raise ValueError(f"Literal values must be str, int, float, bool or None, got {value!r}")
            if kind not in kinds:
                kinds.append(kind)
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": list(args)}
    if origin is list:
        return {"type": "array", "items": _json_schema_for_type(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if len(args) == 1 or Ellipsis in args:
            raise ValueError(f"cannot describe {hint} in a tool schema: use list[...] for variable-length inputs")
        return {"type": "array", "prefixItems": [_json_schema_for_type(arg) for arg in args]}
    if origin is dict:
        schema = {"type": "object"}
        if len(args) == 2:
            schema["additionalProperties"] = _json_schema_for_type(args[1])
        return schema
    raise NotImplementedError(f"herd cannot turn the type hint {hint} into a tool schema; pass a JSON schema dict")


_SECTION_HEADERS = ("Args:", "Returns:", "Raises:")


def _docstring_sections(doc: str) -> tuple[str, list[str], list[str]]:
    """(description, lines of the Args block, lines of the Returns block) of a Google-style docstring."""
    sections: dict[str, list[str]] = {"description": [], "Args:": [], "Returns:": [], "Raises:": []}
    current = "description"
    for line in doc.splitlines():
        if line.strip() in _SECTION_HEADERS:
            current = line.strip()
            continue
        sections[current].append(line)
    return "\n".join(sections["description"]).strip(), sections["Args:"], sections["Returns:"]


def _argument_descriptions(lines: list[str]) -> dict[str, str]:
    """`name: text` entries; continuation lines join the entry above with single spaces."""
    descriptions: dict[str, list[str]] = {}
    current = None
    for line in lines:
        if not line.strip():
            continue
        match = re.match(r"\s*(\w+):\s*(.*)$", line)
        if match:
            current = match.group(1)
            descriptions[current] = [match.group(2).strip()]
        elif current is not None:
            descriptions[current].append(line.strip())
    return {name: " ".join(part for part in parts if part) for name, parts in descriptions.items()}


def function_tool_schema(function: Any) -> dict:
    """The JSON schema chat templates expect for a Python function offered as a tool."""
    name = getattr(function, "__name__", "operation")
    doc = inspect.getdoc(function)
    if not doc:
        raise ValueError(f"Cannot describe the tool {name}: it has no docstring (Google style, with an Args: block)")
    description, argument_lines, return_lines = _docstring_sections(doc.strip())
    argument_docs = _argument_descriptions(argument_lines)
    parameters = list(inspect.signature(function).parameters.values())
    # A method's receiver (self/cls without a hint) is not an argument of the tool.
    if parameters and parameters[0].name in ("self", "cls") and parameters[0].annotation is inspect.Parameter.empty:
        parameters = parameters[1:]
    for parameter in parameters:
        if parameter.annotation is inspect.Parameter.empty:
            raise ValueError(f"Cannot describe the tool {name}: argument {parameter.name} has no type hint")
    hints = typing.get_type_hints(function)
    properties = {arg: _json_schema_for_type(hint) for arg, hint in hints.items()}
    return_schema = properties.pop("return", None)
    for arg, schema in properties.items():
        if arg not in argument_docs:
            raise ValueError(f"Cannot describe the tool {name}: its docstring does not describe the argument {arg!r}")
        text = argument_docs[arg]
        choices = re.search(r"\(choices:\s*(.*?)\)\s*$", text, flags=re.IGNORECASE)
        if choices:
            schema["enum"] = [c.strip() if isinstance(c, str) else c for c in json.loads(choices.group(1))]
            text = text[: choices.start()].strip()
        schema["description"] = text
    parameters_schema: dict[str, Any] = {"type": "object", "properties": properties}
    required = [p.name for p in parameters if p.default is inspect.Parameter.empty]
    if required:
        parameters_schema["required"] = required
    described: dict[str, Any] = {"name": name, "description": description, "parameters": parameters_schema}
    if return_schema is not None:
        returns_text = "\n".join(return_lines).strip()
        if returns_text:
            return_schema["description"] = returns_text
        described["return"] = return_schema
    return {"type": "function", "function": described}


def _tool_schemas(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of JSON schema dicts (or functions), got {type(tools).__name__}")
    schemas = []
    for tool in tools:
        if isinstance(tool, Mapping):
            schemas.append(tool)
        elif inspect.isfunction(tool) or inspect.ismethod(tool):
            schemas.append(function_tool_schema(tool))
        else:
            raise ValueError(
                "each tool must be a JSON schema dict or a Python function with type hints and a Google-style "
                f"docstring, got {type(tool).__name__}"
            )
    return schemas


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def render_chat(
    template: str,
    conversation: Any,
    variables: Mapping[str, Any],
    tools: list | None = None,
    documents: list | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    generation_spans: list | None = None,
) -> tuple[list[str], bool]:
    """(the rendered text of each conversation, whether `conversation` was a batch of them).

    `variables` are the other template variables (special tokens, date_string=...). With
    `continue_final_message` (True for "content", or the name of the message field to continue),
    each text ends inside its final message, open for the model to continue it. Given a list as
    `generation_spans`, one list per conversation is appended to it: the character spans of its
    `{% generation %}` blocks.
    """
    conversations, is_batched = _split_batch(conversation)
    for index, messages in enumerate(conversations):
        _check_conversation(messages, f"conversation {index}" if is_batched else "the conversation")
    tool_schemas = _tool_schemas(tools)
    if documents is not None and not all(isinstance(document, Mapping) for document in documents):
        raise TypeError("documents must be a list of dicts (with 'title' and 'text' keys)")

    compiled = compile_chat_template(template)
    continued_field = (
        (continue_final_message if isinstance(continue_final_message, str) else "content")
        if continue_final_message
        else None
    )
    rendered = []
    for messages in conversations:
        final_text = None
        if continued_field is not None:
            messages, final_text = _mark_final_message(messages, continued_field, template)
        context = dict(
            messages=messages,
            tools=tool_schemas,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        if generation_spans is None:
            text = compiled.render(**context)
        else:
            chunks: list[str] = []
            spans: list[tuple[int, int]] = []
            with compiled.environment.track_generation_spans(chunks, spans):
                for chunk in compiled.generate(**context):
                    chunks.append(chunk)
            text = "".join(chunks)
            generation_spans.append(spans)
        rendered.append(_cut_at_mark(text, final_text) if final_text is not None else text)
    return rendered, is_batched
