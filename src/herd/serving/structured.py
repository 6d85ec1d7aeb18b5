"""response_format (JSON object / JSON schema) and forced tool calls, enforced while decoding.

A `JsonConstraint` is the engine's TokenConstraint over an llguidance matcher: before each token
it clears the tokens that cannot continue a valid document, it follows each chosen token, and it
says when the document is complete (the engine then ends the request with "stop"). llguidance was
chosen over xgrammar by measurement (bench/RESULTS.md, 2026-11-30): masks of the same order,
no dependencies. The llguidance tokenizer is built once per server from the tokenizer's own
`tokenizers` JSON (about half a second for a 128k vocabulary); a schema compiles in about 1 ms.
Object schemas that list their properties refuse others unless they say otherwise (closed_objects).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from .protocol import APIError, bad

# Compact JSON: no free-running white space between tokens (a weak model could otherwise spend its
# whole budget on spaces).
_JSON_OPTIONS = {"whitespace_flexible": False}


# Keys whose values are data, never schemas (an enum of objects with a "properties" key stays as written).
_DATA_KEYS = frozenset({"const", "enum", "default", "examples", "required", "title", "description"})
# Keys whose schemas are left as written: closing them would change what the whole accepts.
_AS_WRITTEN = frozenset({"allOf", "not", "if"})
# An object schema beside these says itself what else it takes, or takes properties from a combined
# part (allOf / anyOf / oneOf / $ref beside its own properties): left open.
_OPEN_BESIDE = frozenset({"additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "anyOf",
                          "oneOf", "$ref"})
# Keys whose values map names to schemas.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` where every object schema that lists its properties and says nothing of
    others (no additionalProperties, patternProperties or unevaluatedProperties) refuses others, as
    vLLM's default grammar backend (xgrammar's strict mode) generates: a weak model otherwise invents
    arguments (`get_time(zone=..., description=...)`) that break the client's function call. The
    parts of an allOf are left as written (each may add properties the other lists), and so are
    `not` and `if` (closing them would change what the whole accepts)."""
    if isinstance(schema, list):
        return [closed_objects(part) for part in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DATA_KEYS or key in _AS_WRITTEN:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed_objects(part) for name, part in value.items()}
        else:
            out[key] = closed_objects(value)
    if isinstance(out.get("properties"), dict) and not out.keys() & _OPEN_BESIDE:
        out["additionalProperties"] = False
    return out


def _llguidance():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - the serve extra installs it
        raise ImportError("response_format and forced tool calls need llguidance: pip install 'herd[serve]'") from None
    return llguidance


class JsonConstraint:
    """The TokenConstraint of one request: its own matcher over the server's shared tokenizer."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size

    def fill_allowed(self, allowed: torch.Tensor) -> None:
        if self.matcher.is_error():
            return  # is_finished() ends the request; nothing sensible to mask
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        width = min(allowed.shape[0], self.vocab_size)
        allowed[:width] &= torch.from_numpy(bits[:width].astype(np.bool_))
        allowed[width:] = False

    def accept(self, token_id: int) -> None:
        self.matcher.consume_token(int(token_id))

    def is_finished(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_error()


class GrammarCompiler:
    """Builds JsonConstraints for one model: its tokenizer, vocabulary size and end-of-answer ids."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]):
        llguidance = _llguidance()
        self.vocab_size = vocab_size
        self._llguidance = llguidance
        backend = tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else tokenizer
        # the tokenizer may hold ids the model never produces (Mllama's <|image|> is one past its lm_head)
        size = max(vocab_size, backend.get_vocab_size(with_added_tokens=True))
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=size, eos_token=list(eos_token_ids) or None)

    def json_schema(self, schema: dict[str, Any] | None, *, param: str = "response_format") -> JsonConstraint:
        """A constraint for a document matching `schema` (None: any JSON object); APIError for a bad schema."""
        grammar = self._llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps({"type": "object"} if schema is None else closed_objects(schema)), defaults=_JSON_OPTIONS)
        matcher = self._llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise bad(param, f"is not a JSON schema this server can enforce: {matcher.get_error()}")
        return JsonConstraint(matcher, self.vocab_size)

    def for_response_format(self, response_format: dict[str, Any] | None) -> JsonConstraint | None:
        if response_format is None:
            return None
        if response_format["type"] == "json_object":
            return self.json_schema(None)
        spec = response_format["json_schema"]
        return self.json_schema(spec.get("schema") or None, param="response_format.json_schema.schema")

    def for_tool_call(self, tools: list[dict[str, Any]], name: str | None = None) -> JsonConstraint:
        """A forced call (tool_choice "required" or a named function) as Llama 3.1's JSON call:
        {"name": one of the tools, "parameters": that tool's parameters}."""
        options = []
        for tool in tools:
            function = tool["function"]
            if name is not None and function["name"] != name:
                continue
            options.append({"type": "object",
                            "properties": {"name": {"const": function["name"]},
                                           "parameters": function.get("parameters") or {"type": "object"}},
                            "required": ["name", "parameters"], "additionalProperties": False})
        if not options:
            raise APIError(400, f"tool_choice: no tool named {name!r}", param="tool_choice")
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        return self.json_schema(schema, param="tools")
