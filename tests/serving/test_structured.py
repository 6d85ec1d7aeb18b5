"""JsonConstraint over the 128k Llama 3 vocabulary: random walks through the allowed tokens always
end in a document that parses and matches the schema."""

from __future__ import annotations

import json

import pytest
import torch

from herd.serving.protocol import APIError
from herd.serving.structured import GrammarCompiler
from tests.conftest import SHARED_DATA

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
EOS = 128009


@pytest.fixture(scope="module")
def tokenizer():
    import herd

    return herd.AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "llama3.1")


@pytest.fixture(scope="module")
def compiler(tokenizer):
    # a model vocabulary a little larger than the tokenizer's, as checkpoints pad it
    return GrammarCompiler(tokenizer, vocab_size=len(tokenizer) + 44, eos_token_ids=[EOS])


def random_walk(constraint, vocab_size, seed, limit=300):
    generator = torch.Generator().manual_seed(seed)
    tokens = []
    while not constraint.is_finished() and len(tokens) < limit:
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        constraint.fill_allowed(allowed)
        choices = allowed.nonzero().flatten()
        assert choices.numel() > 0
        token = int(choices[torch.randint(choices.numel(), (1,), generator=generator)])
        constraint.accept(token)
        tokens.append(token)
    return tokens


def check_document(document):
    assert set(document) == {"name", "age", "tags", "ok"}
    assert isinstance(document["name"], str) and len(document["name"]) <= 8
    assert isinstance(document["age"], int) and 0 <= document["age"] <= 120
    assert isinstance(document["tags"], list) and len(document["tags"]) <= 3
    assert all(tag in ("a", "b", "c") for tag in document["tags"])
    assert isinstance(document["ok"], bool)


@pytest.mark.parametrize("seed", range(4))
def test_random_walks_give_valid_documents(compiler, tokenizer, seed):
    constraint = compiler.json_schema(SCHEMA)
    tokens = random_walk(constraint, compiler.vocab_size, seed)
    # finished as soon as the document is complete (the engine then stops the request; only EOS could follow)
    assert constraint.is_finished()
    check_document(json.loads(tokenizer.decode(tokens)))


def test_padding_ids_beyond_the_tokenizer_are_never_allowed(compiler, tokenizer):
    allowed = torch.ones(compiler.vocab_size, dtype=torch.bool)
    compiler.json_schema(None).fill_allowed(allowed)
    assert not allowed[len(tokenizer):].any()
    assert allowed.any()


def test_json_object_and_forced_tool_call(compiler, tokenizer):
    # any object: its first token must open one (a random walk could run long inside a free string)
    constraint = compiler.for_response_format({"type": "json_object"})
    allowed = torch.ones(compiler.vocab_size, dtype=torch.bool)
    constraint.fill_allowed(allowed)
    starts = {tokenizer.decode([i]).lstrip()[:1] for i in allowed.nonzero().flatten().tolist()}
    assert starts <= {"{"}, starts
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"unit": {"enum": ["C", "F"]}}, "required": ["unit"],
        "additionalProperties": False}}},
        {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}}]
    tokens = random_walk(compiler.for_tool_call(tools, "get_weather"), compiler.vocab_size, 1)
    call = json.loads(tokenizer.decode(tokens))
    assert call["name"] == "get_weather" and call["parameters"]["unit"] in ("C", "F")


def test_bad_schema_is_a_400_naming_the_field(compiler):
    with pytest.raises(APIError) as caught:
        compiler.for_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}})
    assert caught.value.status == 400 and caught.value.param == "response_format.json_schema.schema"


def allowed_after(constraint, tokenizer, prefix: str) -> set[str]:
    for token in tokenizer.encode(prefix, add_special_tokens=False):
        constraint.accept(token)
    assert not constraint.matcher.is_error(), prefix
    allowed = torch.ones(len(tokenizer), dtype=torch.bool)
    constraint.fill_allowed(allowed)
    return {tokenizer.decode([i]) for i in allowed.nonzero().flatten().tolist()}


def test_objects_that_list_their_properties_get_no_others(compiler, tokenizer):
    """A schema without additionalProperties let SmolLM2 call get_time(zone=..., description=...), an
    argument the function does not take; vLLM's default backend (xgrammar, strict) allows none."""
    inner = {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}
    schema = {"type": "object", "properties": {"a": inner, "n": {"enum": [{"properties": 1}]}}, "required": ["a"]}
    starts = allowed_after(compiler.json_schema(schema), tokenizer, '{"a":{"b":1')
    assert not any(text.lstrip().startswith(",") for text in starts) and any(t.startswith("}") for t in starts)
    # the top level too: after "a", only "n" may follow
    starts = allowed_after(compiler.json_schema(schema), tokenizer, '{"a":{"b":1},"')
    assert starts and all("n".startswith(text[:1]) for text in starts if text), sorted(starts)[:20]
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}]
    starts = allowed_after(compiler.for_tool_call(tools), tokenizer, '{"name":"get_time","parameters":{"zone":"CET"')
    assert not any(text.lstrip().startswith(",") for text in starts)
    # what the schema says of others is kept
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "integer"}}
    assert any(t.startswith(",") for t in allowed_after(compiler.json_schema(schema), tokenizer, '{"a":1'))
