"""Reading a tokenizer folder: its file names, JSON files, tokenizer.json (rebuilt like transformers'
LlamaTokenizer where the folder asks for that class) and the settings of tokenizer_config.json,
special_tokens_map.json and config.json.

Only `tokenizer.json` tokenizers are read. A folder with a lone SentencePiece `tokenizer.model` is
refused with an explanation; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from .. import hub
from ..configuration import pop_hub_kwargs

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
SENTENCEPIECE_FILE = "tokenizer.model"

# What a tokenizer may read from a Hub repository (no weights).
_TOKENIZER_PATTERNS = [
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    CHAT_TEMPLATE_FILE,
    CHAT_TEMPLATE_JSON_FILE,
    f"{CHAT_TEMPLATE_DIR}/*.jinja",
    "config.json",
    SENTENCEPIECE_FILE,
]

# from_pretrained arguments accepted and ignored for compatibility (hub ones go to hub.resolve).
_IGNORED_ARGUMENTS = (
    "force_download",
    "proxies",
    "resume_download",
    "trust_remote_code",
    "use_fast",
    "_from_auto",
    "_commit_hash",
    "_from_pipeline",
    "config",
)


def token_content(value: Any) -> str | None:
    """A special token from a config value: a string, an AddedToken, or its serialized dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, AddedToken):
        return value.content
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"a special token must be a string or an AddedToken, got {value!r}")


def added_token_from_dict(entry: Mapping[str, Any]) -> AddedToken:
    fields = {key: entry[key] for key in ("single_word", "lstrip", "rstrip", "normalized", "special") if key in entry}
    return AddedToken(entry["content"], **fields)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def read_json_object(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found a {type(data).__name__}")
    return data


def is_llama_class(tokenizer_class: str | None) -> bool:
    return tokenizer_class is not None and tokenizer_class.removesuffix("Fast") == "LlamaTokenizer"


def _rebuild_like_llama_tokenizer(tokenizer_json: dict, legacy: bool, add_prefix_space: bool) -> dict:
    """The pipeline transformers' LlamaTokenizer builds around the vocabulary and merges of tokenizer.json.

    transformers 5.17 does not trust the normalizer, pre-tokenizer and decoder of a folder whose
    tokenizer_class is LlamaTokenizer: it keeps the BPE vocabulary, merges, added tokens and
    post-processor, and rebuilds the rest: no normalizer, a Metaspace pre-tokenizer ("▁" for spaces,
    prefixed to every piece when `legacy`, to the first piece only otherwise, never without
    `add_prefix_space`), byte fallback in the model and a matching decoder. The ids follow from that
    pipeline, so herd builds the same one.
    """
    rebuilt = dict(tokenizer_json)
    rebuilt["model"] = {
        **tokenizer_json["model"],
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": True,
        "byte_fallback": True,
        "ignore_merges": False,
    }
    rebuilt["normalizer"] = None
    prepend_scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    rebuilt["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "▁",
        "prepend_scheme": prepend_scheme,
        "split": False,
    }
    decoders = [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if add_prefix_space:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    rebuilt["decoder"] = {"type": "Sequence", "decoders": decoders}
    return rebuilt


def load_backend(path: Path, llama_options: tuple[bool, bool] | None) -> Tokenizer:
    """The tokenizers.Tokenizer of tokenizer.json, rebuilt like LlamaTokenizer when `llama_options` is given."""
    try:
        if llama_options is None:
            return Tokenizer.from_file(str(path))
        data = read_json_object(path)
        if not isinstance(data.get("model"), dict) or data["model"].get("type") != "BPE":
            return Tokenizer.from_str(json.dumps(data))  # the rebuild only applies to BPE vocabularies
        return Tokenizer.from_str(json.dumps(_rebuild_like_llama_tokenizer(data, *llama_options)))
    except ValueError:
        raise
    except Exception as error:  # the tokenizers library raises plain Exceptions on bad files
        raise ValueError(f"{path} is not a valid tokenizers file: {error}") from error


def split_from_pretrained_arguments(kwargs: dict) -> tuple[dict, dict]:
    """(arguments for hub.resolve, tokenizer settings) from a from_pretrained call's kwargs."""
    hub_arguments = pop_hub_kwargs(kwargs)
    for key in _IGNORED_ARGUMENTS:
        kwargs.pop(key, None)
    if hub_arguments.get("subfolder") is None:
        hub_arguments.pop("subfolder", None)
    return hub_arguments, kwargs


def tokenizer_folder(name_or_path: str | os.PathLike, hub_arguments: dict) -> Path:
    folder = hub.resolve(name_or_path, allow_patterns=_TOKENIZER_PATTERNS, **hub_arguments)
    if not (folder / TOKENIZER_FILE).is_file():
        if (folder / SENTENCEPIECE_FILE).is_file():
            raise FileNotFoundError(
                f"{folder} has a SentencePiece {SENTENCEPIECE_FILE} but no {TOKENIZER_FILE}: herd only supports "
                f"tokenizer.json-based tokenizers (the `tokenizers` library format). Convert it once, e.g. with "
                f"transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder)."
            )
        raise FileNotFoundError(f"{folder} has no {TOKENIZER_FILE}; herd only supports tokenizer.json-based tokenizers")
    return folder


def folder_settings(folder: Path) -> dict:
    """Tokenizer settings of a folder as transformers 5.17 gathers them, its chat template aside."""
    config_path = folder / TOKENIZER_CONFIG_FILE
    settings = read_json_object(config_path) if config_path.is_file() else {}
    # With a tokenizer.json, 5.17 ignores the config's add_bos_token/add_eos_token: the post-processor
    # in tokenizer.json decides which tokens are added. Only explicit arguments override it.
    settings.pop("add_bos_token", None)
    settings.pop("add_eos_token", None)
    if "tokenizer_class" not in settings and (folder / "config.json").is_file():
        model_config = read_json_object(folder / "config.json")
        if isinstance(model_config.get("tokenizer_class"), str):
            settings["tokenizer_class"] = model_config["tokenizer_class"]
    special_map_path = folder / SPECIAL_TOKENS_MAP_FILE
    # Older folders list their special tokens in special_tokens_map.json; transformers reads it only
    # when the config has no added_tokens_decoder, and then it wins over the config.
    if "added_tokens_decoder" not in settings and special_map_path.is_file():
        for key, value in read_json_object(special_map_path).items():
            if key in ("additional_special_tokens", "extra_special_tokens"):
                existing = [token_content(t) for t in settings.get("extra_special_tokens") or []]
                settings["extra_special_tokens"] = existing + [
                    token_content(t) for t in value if token_content(t) not in existing
                ]
            else:
                settings[key] = value
    return settings
