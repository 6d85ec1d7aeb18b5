"""The tokenizer: `PreTrainedTokenizerFast` (also reachable as `LlamaTokenizer`, `LlamaTokenizerFast`
and through `AutoTokenizer`) wraps a `tokenizers.Tokenizer` loaded from a `tokenizer.json`.

The BPE, normalization, pre-tokenization, special-token templates, padding and truncation all run
in the `tokenizers` library; this module decides which options to hand it, so that ids, strings
and chat prompts come out exactly as transformers 5.17 makes them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Encoding, Tokenizer, processors

from .. import hub
from ..quantization.gguf import gguf_path, open_gguf
from .chat_templates import TOKENIZER_TEMPLATE_SOURCES, normalize_chat_template, read_chat_template, render_chat
from .encodings import BatchEncoding
from .files import (
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    added_token_from_dict,
    folder_settings,
    is_llama_class,
    load_backend,
    split_from_pretrained_arguments,
    token_content,
    tokenizer_folder,
)

logger = logging.getLogger(__name__)

# transformers' stand-in for "no limit" (model_max_length of 1e30); anything above 1e20 counts as
# "no maximum" when a padding or truncation length has to be guessed.
VERY_LARGE_INTEGER = int(1e30)
LARGE_INTEGER = int(1e20)

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")
TRUNCATION_STRATEGIES = ("only_first", "only_second", "longest_first", "do_not_truncate")

# Keys of tokenizer_config.json that describe where files were, or which transformers backend
# loaded them: meaningless once loaded, and never written back.
_CONFIG_KEYS_NOT_SAVED = {
    "added_tokens_decoder",
    "add_bos_token",
    "add_eos_token",
    "backend",
    "chat_template",
    "fast_tokenizer_files",
    "files_loaded",
    "init_inputs",
    "is_local",
    "local_files_only",
    "name_or_path",
    "special_tokens_map_file",
    "tokenizer_file",
    "vocab_file",
    "merges_file",
}


# The options of one tokenizer call's encoding (the parameters of _encode_texts but the texts).
_ENCODING_OPTIONS = frozenset(
    (
        "add_special_tokens", "padding", "truncation", "max_length", "stride", "is_split_into_words",
        "pad_to_multiple_of", "padding_side", "return_tensors", "return_token_type_ids", "return_attention_mask",
        "return_overflowing_tokens", "return_special_tokens_mask", "return_offsets_mapping", "return_length",
        "verbose", "split_special_tokens",
    )
)  # fmt: skip

# ----------------------------------------------------------------------------------------------
# Padding and truncation options
# ----------------------------------------------------------------------------------------------


def _padding_strategy(padding: Any) -> str:
    if padding is False or padding is None:
        return "do_not_pad"
    if padding is True:
        return "longest"
    name = getattr(padding, "value", padding)
    if name not in PADDING_STRATEGIES:
        raise ValueError(f"padding must be True, False or one of {PADDING_STRATEGIES}, got {padding!r}")
    return name


def _truncation_strategy(truncation: Any) -> str:
    if truncation is False or truncation is None:
        return "do_not_truncate"
    if truncation is True:
        return "longest_first"
    name = getattr(truncation, "value", truncation)
    if name not in TRUNCATION_STRATEGIES:
        raise ValueError(f"truncation must be True, False or one of {TRUNCATION_STRATEGIES}, got {truncation!r}")
    return name


def _is_text_input(text: Any) -> bool:
    """A string, a list of strings, or (pre-tokenized) lists of lists of strings."""
    if isinstance(text, str):
        return True
    if not isinstance(text, (list, tuple)):
        return False
    if len(text) == 0 or isinstance(text[0], str):
        return True
    if isinstance(text[0], (list, tuple)):
        return len(text[0]) == 0 or isinstance(text[0][0], (str, list, tuple))
    return False


def _to_python(value: Any) -> Any:
    """Token ids given as torch tensors, numpy arrays or numpy scalars, as plain Python ints and lists."""
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    if isinstance(value, Mapping):
        return {key: _to_python(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(item) for item in value]
    return value


def _assistant_masks(encoded: BatchEncoding, generation_spans: list, batched_rows: bool) -> list[list[int]]:
    """Per row, 1 on the tokens of the template's `{% generation %}` blocks (the assistant's text), 0 elsewhere.

    As transformers computes it: a span covers the tokens from the one holding its first character
    to the one holding its last; a span whose start was truncated away ends the row's marking, and
    one whose end was truncated (or falls on token 0) runs to the end of the row.
    """
    rows = encoded["input_ids"] if batched_rows else [encoded["input_ids"]]
    masks = []
    for index, row in enumerate(rows):
        mask = [0] * len(row)
        for start_char, end_char in generation_spans[index]:
            start = encoded.char_to_token(index, start_char)
            end = encoded.char_to_token(index, end_char - 1)
            if start is None:
                break
            for position in range(start, end + 1 if end else len(row)):
                mask[position] = 1
        masks.append(mask)
    return masks


# ----------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------


def _special_token_property(name: str) -> property:
    def get(self) -> str | None:
        return self._special_tokens.get(name)

    def set(self, value: Any) -> None:
        if value is not None and not isinstance(value, (str, AddedToken)):
            raise ValueError(f"{name} must be a string (or an AddedToken), got {type(value).__name__}")
        self._special_tokens[name] = token_content(value)

    return property(get, set, doc=f"The {name.replace('_', ' ')} (a string), or None.")


def _special_token_id_property(name: str) -> property:
    def get(self) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self.convert_tokens_to_ids(token)

    def set(self, value: int | None) -> None:
        self._special_tokens[name] = None if value is None else self.convert_ids_to_tokens(int(value))

    return property(get, set, doc=f"The id of the {name.replace('_', ' ')}, or None.")


class PreTrainedTokenizerFast(hub.PushToHubMixin):
    """A `tokenizers.Tokenizer` with the transformers tokenizer API (call, encode, decode, pad, chat templates).

    Load one with `from_pretrained(folder_or_hub_id)`, or build one from a `tokenizers.Tokenizer`
    (`tokenizer_object=`) or a `tokenizer_file=` path, with settings as keyword arguments
    (bos_token="<s>", padding_side="left", chat_template=..., ...).
    """

    model_input_names = ["input_ids", "attention_mask"]
    # Defaults when the config does not say; transformers' LlamaTokenizer class pads on the left.
    default_padding_side = "right"
    default_llama_padding_side = "left"
    default_truncation_side = "right"

    bos_token = _special_token_property("bos_token")
    eos_token = _special_token_property("eos_token")
    unk_token = _special_token_property("unk_token")
    sep_token = _special_token_property("sep_token")
    pad_token = _special_token_property("pad_token")
    cls_token = _special_token_property("cls_token")
    mask_token = _special_token_property("mask_token")
    bos_token_id = _special_token_id_property("bos_token")
    eos_token_id = _special_token_id_property("eos_token")
    unk_token_id = _special_token_id_property("unk_token")
    sep_token_id = _special_token_id_property("sep_token")
    pad_token_id = _special_token_id_property("pad_token")
    cls_token_id = _special_token_id_property("cls_token")
    mask_token_id = _special_token_id_property("mask_token")

    def __init__(
        self, tokenizer_object: Tokenizer | None = None, tokenizer_file: str | os.PathLike | None = None, **kwargs
    ):
        if tokenizer_object is not None:
            # A copy, so that the padding/truncation settings made per call do not leak to the caller's object.
            backend = Tokenizer.from_str(tokenizer_object.to_str())
        elif tokenizer_file is not None:
            backend = load_backend(Path(tokenizer_file), None)
        else:
            raise ValueError(
                "PreTrainedTokenizerFast needs tokenizer_object= or tokenizer_file=, or use from_pretrained()"
            )
        self._setup(backend, kwargs, llama_style=False)

    # -- construction --

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *inputs: Any, **kwargs: Any):
        """Load the tokenizer of a local folder or a Hub repository id (tokenizer.json + tokenizer_config.json).

        Keyword arguments: revision, cache_dir, token, local_files_only, subfolder (where to find it),
        and any tokenizer setting (padding_side="left", pad_token=..., add_bos_token=..., chat_template=...).
        """
        if inputs:
            raise TypeError("from_pretrained takes the folder or Hub id, then keyword arguments only")
        hub_arguments, user_settings = split_from_pretrained_arguments(dict(kwargs))
        gguf_file = gguf_path(pretrained_model_name_or_path, user_settings.pop("gguf_file", None))
        if gguf_file is not None:  # the vocabulary, merges and settings stored in a GGUF file
            backend, settings = open_gguf(gguf_file).tokenizer()
            settings.update(user_settings)
            settings["name_or_path"] = str(pretrained_model_name_or_path)
            tokenizer = cls.__new__(cls)
            tokenizer._setup(backend, settings, llama_style=False)
            return tokenizer
        folder = tokenizer_folder(pretrained_model_name_or_path, hub_arguments)
        settings = folder_settings(folder)
        # The folder's chat template files may replace its config's "chat_template"; arguments win over both.
        chat_template = read_chat_template(folder, TOKENIZER_TEMPLATE_SOURCES)
        if chat_template is not None:
            settings["chat_template"] = chat_template
        settings.update(user_settings)
        llama_options = None
        if is_llama_class(settings.get("tokenizer_class")):
            # LlamaTokenizer's defaults: no "legacy" key means legacy=False; no add_prefix_space means True.
            add_prefix_space = settings.get("add_prefix_space")
            llama_options = (
                bool(settings.get("legacy", False)),
                True if add_prefix_space is None else bool(add_prefix_space),
            )
        backend = load_backend(folder / TOKENIZER_FILE, llama_options)
        settings["name_or_path"] = str(pretrained_model_name_or_path)
        tokenizer = cls.__new__(cls)
        tokenizer._setup(backend, settings, llama_style=llama_options is not None)
        return tokenizer

    def _setup(self, backend: Tokenizer, settings: dict, llama_style: bool) -> None:
        """Apply settings (tokenizer_config.json keys and constructor arguments) to a fresh backend.

        `llama_style`: the backend was rebuilt like transformers' LlamaTokenizer (see from_pretrained).
        """
        settings = dict(settings)
        self._tokenizer = backend
        self.name_or_path = str(settings.pop("name_or_path", ""))
        settings.pop("tokenizer_class", None)
        self._llama_style = llama_style

        # Padding/truncation stored in tokenizer.json only provide defaults: each call sets its own.
        if backend.padding is not None:
            settings.setdefault("pad_token", backend.padding["pad_token"])
            settings.setdefault("padding_side", backend.padding["direction"])
            backend.no_padding()
        if backend.truncation is not None:
            settings.setdefault("truncation_side", backend.truncation["direction"])
            backend.no_truncation()

        self._special_tokens = dict.fromkeys(SPECIAL_TOKEN_NAMES)
        for name in SPECIAL_TOKEN_NAMES:
            self._special_tokens[name] = token_content(settings.pop(name, None))
        extra = settings.pop("extra_special_tokens", None)
        legacy_extra = settings.pop("additional_special_tokens", None)
        if extra is None:
            extra = legacy_extra
        self._extra_special_tokens: list[str] = []
        # Named model-specific tokens behave like bos_token & co: any other "<name>_token" string
        # setting ("image_token": "<|image|>"), then those of an extra_special_tokens dict. The order
        # matters: it is the order in which missing ones are added to the vocabulary.
        for key in [k for k, v in settings.items() if k.endswith("_token") and isinstance(v, (str, AddedToken))]:
            self._special_tokens[key] = token_content(settings.pop(key))
        # transformers writes the named ones again under "model_specific_special_tokens".
        named = dict(settings.pop("model_specific_special_tokens", None) or {})
        if isinstance(extra, Mapping):
            named.update(extra)
        for name, token in named.items():
            self._special_tokens[name] = token_content(token)
        if extra and not isinstance(extra, Mapping):
            self._extra_special_tokens = [token_content(token) for token in extra]

        model_max_length = settings.pop("model_max_length", settings.pop("max_len", None))
        self.model_max_length = VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length)
        default_padding_side = self.default_llama_padding_side if llama_style else self.default_padding_side
        self.padding_side = settings.pop("padding_side", default_padding_side)
        self.truncation_side = settings.pop("truncation_side", self.default_truncation_side)
        self.model_input_names = list(settings.pop("model_input_names", type(self).model_input_names))
        self.clean_up_tokenization_spaces = bool(settings.pop("clean_up_tokenization_spaces", False))
        self.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = bool(
            settings.pop("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
        )
        self.split_special_tokens = bool(settings.pop("split_special_tokens", False))
        self.chat_template = normalize_chat_template(settings.pop("chat_template", None))
        self.verbose = bool(settings.pop("verbose", False))

        explicit_bos_eos = "add_bos_token" in settings or "add_eos_token" in settings
        self._add_bos_token = bool(settings.pop("add_bos_token", False))
        self._add_eos_token = bool(settings.pop("add_eos_token", False))

        self._add_missing_added_tokens(settings.pop("added_tokens_decoder", None) or {})
        self._tokenizer.encode_special_tokens = self.split_special_tokens
        if explicit_bos_eos or self._tokenizer.post_processor is None:
            self.update_post_processor()

        # Everything else is kept as given and written back by save_pretrained (e.g. "legacy").
        self._other_settings = {k: v for k, v in settings.items() if k not in _CONFIG_KEYS_NOT_SAVED}
        self._warned_too_long = False

    def _add_missing_added_tokens(self, config_added_tokens: Mapping) -> None:
        """Register the config's added tokens and the special tokens the backend does not know as added tokens.

        As in transformers: a named special token that is only in the BPE vocabulary (not an added
        token) becomes one, so that its literal text is matched as a whole from then on.
        """
        known = {repr(token) for token in self._tokenizer.get_added_tokens_decoder().values()}
        from_config = []
        for _, entry in sorted(((int(i), e) for i, e in config_added_tokens.items()), key=lambda pair: pair[0]):
            token = added_token_from_dict(entry) if isinstance(entry, Mapping) else entry
            if repr(token) not in known:
                from_config.append(token)
        added_contents = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        added_contents.update(t.content for t in from_config)
        missing = []
        for token in [*self._special_tokens.values(), *self._extra_special_tokens]:
            if token is not None and token not in added_contents:
                missing.append(AddedToken(token, special=True, normalized=False))
                added_contents.add(token)
        if from_config or missing:
            self._tokenizer.add_tokens(from_config + missing)

    # -- plain attributes --

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        if value not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {value!r}")
        self._padding_side = value

    @property
    def truncation_side(self) -> str:
        return self._truncation_side

    @truncation_side.setter
    def truncation_side(self, value: str) -> None:
        if value not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {value!r}")
        self._truncation_side = value

    def __getattr__(self, name: str) -> Any:
        # Named model-specific special tokens (image_token, image_token_id...) read like bos_token.
        special = self.__dict__.get("_special_tokens", {})
        if name in special:
            return special[name]
        if name.endswith("_id") and name.removesuffix("_id") in special:
            token = special[name.removesuffix("_id")]
            return None if token is None else self.convert_tokens_to_ids(token)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def is_fast(self) -> bool:
        return True

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` doing the work."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Size of the whole vocabulary, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __bool__(self) -> bool:
        return True  # never "empty", whatever __len__ says

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self.get_vocab()

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return self._tokenizer.get_added_tokens_decoder()

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {token.content: index for index, token in sorted(self.added_tokens_decoder.items())}

    def get_added_vocab(self) -> dict[str, int]:
        return self.added_tokens_encoder

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, e.g. {"bos_token": "<s>", "eos_token": "</s>"}."""
        return {name: token for name, token in self._special_tokens.items() if token is not None}

    @property
    def extra_special_tokens(self) -> list[str]:
        return list(self._extra_special_tokens)

    @extra_special_tokens.setter
    def extra_special_tokens(self, tokens: list[str] | None) -> None:
        self._extra_special_tokens = [token_content(token) for token in tokens or []]

    additional_special_tokens = extra_special_tokens

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens, then extra ones, each once."""
        tokens = [t for t in self._special_tokens.values() if t is not None] + self._extra_special_tokens
        return list(dict.fromkeys(tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def pad_token_type_id(self) -> int:
        return 0

    @property
    def add_bos_token(self) -> bool:
        """Whether herd's own post-processor adds BOS. False unless set: tokenizer.json's post-processor decides."""
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._add_bos_token = bool(value)
        self.update_post_processor()

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._add_eos_token = bool(value)
        self.update_post_processor()

    def update_post_processor(self) -> None:
        """Replace the post-processor with one adding BOS and/or EOS as add_bos_token/add_eos_token say."""
        if self.bos_token is None:
            self._add_bos_token = False
        if self.eos_token is None:
            self._add_eos_token = False
        bos, eos = self.bos_token, self.eos_token
        single = " ".join(
            ([f"{bos}:0"] if self._add_bos_token else []) + ["$A:0"] + ([f"{eos}:0"] if self._add_eos_token else [])
        )
        pair = " ".join(
            [single]
            + ([f"{bos}:1"] if self._add_bos_token else [])
            + ["$B:1"]
            + ([f"{eos}:1"] if self._add_eos_token else [])
        )
        special = []
        if self._add_bos_token:
            special.append((bos, self.bos_token_id))
        if self._add_eos_token:
            special.append((eos, self.eos_token_id))
        self._tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"model_max_length={self.model_max_length}, padding_side={self.padding_side!r}, "
            f"truncation_side={self.truncation_side!r}, special_tokens={self.special_tokens_map})"
        )

    # -- vocabulary --

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Id of a token (or ids of a list of tokens); unknown tokens give unk_token_id (None without one)."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(token) for token in tokens]

    def _token_to_id(self, token: str) -> int | None:
        index = self._tokenizer.token_to_id(token)
        if index is not None:
            return index
        unk = self._special_tokens.get("unk_token")
        return None if unk is None else self._tokenizer.token_to_id(unk)

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | None | list[str]:
        ids = _to_python(ids)
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skipped]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self._tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self._tokenizer.num_special_tokens_to_add(pair)

    @property
    def max_len_single_sentence(self) -> int:
        """The longest text the model takes, once the special tokens are added."""
        return self.model_max_length - self.num_special_tokens_to_add(pair=False)

    @property
    def max_len_sentences_pair(self) -> int:
        """The longest pair of texts the model takes, once the special tokens are added."""
        return self.model_max_length - self.num_special_tokens_to_add(pair=True)

    @property
    def decoder(self) -> Any:
        """The backend's decoder (a `tokenizers.decoders` object)."""
        return self._tokenizer.decoder

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        """1 where an id is a special token, 0 elsewhere, for ids that already hold their special tokens.

        As in transformers 5.17, ids without their special tokens are not supported: ask the call for
        them instead (`tokenizer(text, return_special_tokens_mask=True)`).
        """
        if not already_has_special_tokens:
            raise NotImplementedError(
                "get_special_tokens_mask needs already_has_special_tokens=True; for text, call the tokenizer "
                "with return_special_tokens_mask=True"
            )
        if token_ids_1 is not None:
            raise ValueError("with already_has_special_tokens=True, pass one sequence only (it already holds the pair)")
        special = set(self.all_special_ids)
        return [1 if int(i) in special else 0 for i in _to_python(token_ids_0)]

    def add_tokens(self, new_tokens: str | AddedToken | list[str | AddedToken], special_tokens: bool = False) -> int:
        """Add tokens to the vocabulary (at its end, when new); returns how many were new."""
        if not new_tokens:
            return 0
        if not isinstance(new_tokens, (list, tuple)):
            new_tokens = [new_tokens]
        if special_tokens:
            return self._tokenizer.add_special_tokens(list(new_tokens))
        return self._tokenizer.add_tokens(list(new_tokens))

    def add_special_tokens(
        self, special_tokens_dict: Mapping[str, Any], replace_extra_special_tokens: bool = True
    ) -> int:
        """Set named special tokens ({"pad_token": "<pad>"}) and extra ones, adding them to the vocabulary if new."""
        if not special_tokens_dict:
            return 0
        tokens = dict(special_tokens_dict)
        if "additional_special_tokens" in tokens:
            tokens.setdefault("extra_special_tokens", tokens.pop("additional_special_tokens"))
        to_add: list[AddedToken] = []
        for key, value in tokens.items():
            if key == "extra_special_tokens":
                if not isinstance(value, (list, tuple)) or not all(isinstance(t, (str, AddedToken)) for t in value):
                    raise ValueError("extra_special_tokens must be a list of strings or AddedTokens")
                new = [self._as_special_added_token(t) for t in value]
                if not replace_extra_special_tokens:
                    new = [t for t in new if t.content not in self._extra_special_tokens]
                    self._extra_special_tokens += [t.content for t in new]
                elif new:
                    self._extra_special_tokens = [t.content for t in new]
                to_add += new
            elif key in self._special_tokens or key in SPECIAL_TOKEN_NAMES:
                if not isinstance(value, (str, AddedToken)):
                    raise ValueError(f"{key} must be a string or an AddedToken, got {type(value).__name__}")
                token = self._as_special_added_token(value)
                self._special_tokens[key] = token.content
                to_add.append(token)
            else:
                valid = sorted(set(SPECIAL_TOKEN_NAMES) | {"extra_special_tokens"})
                raise ValueError(f"{key!r} is not a special token name; use one of {valid}")
        return self._tokenizer.add_special_tokens(to_add)

    @staticmethod
    def _as_special_added_token(token: str | AddedToken) -> AddedToken:
        if isinstance(token, AddedToken):
            return token
        return AddedToken(token, rstrip=False, lstrip=False, normalized=False, special=True)

    # -- encoding --

    def _resolve_strategies(
        self,
        padding: Any,
        truncation: Any,
        max_length: int | None,
        pad_to_multiple_of: int | None,
        verbose: bool = True,
    ) -> tuple[str, str, int | None]:
        """(padding strategy, truncation strategy, max_length) with transformers' defaults filled in."""
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"  # a bare max_length means: truncate to it
        if padding is True and verbose and max_length is not None and truncation in (None, False, "do_not_truncate"):
            warnings.warn(
                "`max_length` is ignored when `padding`=`True` and there is no truncation strategy. "
                "To pad to max length, use `padding='max_length'`.",
                stacklevel=3,  # point at the user's tokenizer call
            )
        padding_strategy = _padding_strategy(padding)
        truncation_strategy = _truncation_strategy(truncation)
        if max_length is None:
            # Fall back on model_max_length, unless it is the "no limit" placeholder.
            unlimited = self.model_max_length > LARGE_INTEGER
            if padding_strategy == "max_length":
                if unlimited:
                    padding_strategy = "do_not_pad"
                else:
                    max_length = self.model_max_length
            if truncation_strategy != "do_not_truncate":
                if unlimited:
                    truncation_strategy = "do_not_truncate"
                else:
                    max_length = self.model_max_length
        pad_id = self.pad_token_id
        if padding_strategy != "do_not_pad" and (pad_id is None or pad_id < 0):
            raise ValueError(
                "Asking to pad but the tokenizer does not have a padding token. Set one, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token`, or add one with "
                "`tokenizer.add_special_tokens({'pad_token': '[PAD]'})`."
            )
        if (
            truncation_strategy != "do_not_truncate"
            and padding_strategy != "do_not_pad"
            and pad_to_multiple_of is not None
            and max_length is not None
            and max_length % pad_to_multiple_of != 0
        ):
            raise ValueError(
                f"Truncation and padding are both on but the truncation length ({max_length}) is not a multiple "
                f"of pad_to_multiple_of ({pad_to_multiple_of})."
            )
        return padding_strategy, truncation_strategy, max_length

    def _configure_backend(
        self,
        padding_strategy: str,
        truncation_strategy: str,
        max_length: int | None,
        stride: int,
        pad_to_multiple_of: int | None,
        padding_side: str | None,
    ) -> None:
        """Set the backend's truncation and padding for one call (the backend keeps them until the next)."""
        backend = self._tokenizer
        if truncation_strategy == "do_not_truncate":
            if backend.truncation is not None:
                backend.no_truncation()
        else:
            wanted = {
                "max_length": max_length,
                "stride": stride,
                "strategy": truncation_strategy,
                "direction": self.truncation_side,
            }
            current = backend.truncation
            if current is None or {key: current.get(key) for key in wanted} != wanted:
                backend.enable_truncation(**wanted)
        if padding_strategy == "do_not_pad":
            if backend.padding is not None:
                backend.no_padding()
        else:
            side = padding_side if padding_side is not None else self.padding_side
            if side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
            wanted = {
                "length": max_length if padding_strategy == "max_length" else None,
                "direction": side,
                "pad_id": self.pad_token_id,
                "pad_token": self.pad_token,
                "pad_type_id": self.pad_token_type_id,
                "pad_to_multiple_of": pad_to_multiple_of,
            }
            if backend.padding != wanted:
                backend.enable_padding(**wanted)

    def _encodings_to_dict(
        self,
        encodings: list[Encoding],
        return_token_type_ids: bool | None,
        return_attention_mask: bool | None,
        return_overflowing_tokens: bool,
        return_special_tokens_mask: bool,
        return_offsets_mapping: bool,
        return_length: bool,
    ) -> tuple[dict[str, list], list[Encoding]]:
        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        fields: dict[str, list] = {"input_ids": []}
        if return_token_type_ids:
            fields["token_type_ids"] = []
        if return_attention_mask:
            fields["attention_mask"] = []
        if return_special_tokens_mask:
            fields["special_tokens_mask"] = []
        if return_offsets_mapping:
            fields["offset_mapping"] = []
        if return_length:
            fields["length"] = []
        flat: list[Encoding] = []
        sample_of_row: list[int] = []
        for sample, encoding in enumerate(encodings):
            # With return_overflowing_tokens, what truncation cut off comes back as extra rows.
            rows = [encoding] + (list(encoding.overflowing) if return_overflowing_tokens else [])
            for row in rows:
                flat.append(row)
                sample_of_row.append(sample)
                fields["input_ids"].append(row.ids)
                if return_token_type_ids:
                    fields["token_type_ids"].append(row.type_ids)
                if return_attention_mask:
                    fields["attention_mask"].append(row.attention_mask)
                if return_special_tokens_mask:
                    fields["special_tokens_mask"].append(row.special_tokens_mask)
                if return_offsets_mapping:
                    fields["offset_mapping"].append(row.offsets)
                if return_length:
                    fields["length"].append(len(row.ids))
        if return_overflowing_tokens:
            fields["overflow_to_sample_mapping"] = sample_of_row
        return fields, flat

    def _warn_if_too_long(self, ids_rows: list[list[int]], max_length: int | None, verbose: bool) -> None:
        if max_length is not None or not verbose or self._warned_too_long or self.model_max_length == 0:
            return
        longest = max((len(ids) for ids in ids_rows), default=0)
        if longest > self.model_max_length:
            logger.warning(
                "Token indices sequence length is longer than the specified maximum sequence length for this "
                "model (%d > %d). Running this sequence through the model will result in indexing errors",
                longest,
                self.model_max_length,
            )
            self._warned_too_long = True

    def __call__(
        self,
        text: str | list[str] | list[list[str]] | None = None,
        text_pair: str | list[str] | list[list[str]] | None = None,
        text_target: str | list[str] | list[list[str]] | None = None,
        text_pair_target: str | list[str] | list[list[str]] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        tokenizer_kwargs: dict[str, Any] | None = None,
        split_special_tokens: bool | None = None,
        max_target_length: int | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Tokenize a string (or a pair) or a batch of them, with optional padding, truncation and tensors.

        As in transformers, `text_target` (and `text_pair_target`) are tokenized the same way (with
        `max_target_length` as their max_length when given): alone they are the result, with `text`
        their input_ids come back as "labels". `tokenizer_kwargs` entries override the arguments.
        Other keyword arguments (and tokenizer_kwargs entries) are a TypeError: transformers ignores
        them silently, so that a misspelled option, or `truncation_side=` (an attribute, not a call
        option), would change nothing without a word.
        """
        settings = dict(
            add_special_tokens=add_special_tokens, padding=padding, truncation=truncation, max_length=max_length,
            stride=stride, is_split_into_words=is_split_into_words, pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side, return_tensors=return_tensors, return_token_type_ids=return_token_type_ids,
            return_attention_mask=return_attention_mask, return_overflowing_tokens=return_overflowing_tokens,
            return_special_tokens_mask=return_special_tokens_mask, return_offsets_mapping=return_offsets_mapping,
            return_length=return_length, verbose=verbose, split_special_tokens=split_special_tokens,
        )
        settings.update(tokenizer_kwargs or {})
        settings.update(kwargs)
        unknown = sorted(key for key in settings if key not in _ENCODING_OPTIONS)
        if unknown:
            hint = ""
            if "truncation_side" in unknown:
                hint = " truncation_side is not a call option: set tokenizer.truncation_side before the call."
            raise TypeError(
                f"The tokenizer call got unexpected arguments {unknown} (transformers would ignore them without "
                f"a word).{hint}"
            )
        if text is None and text_target is None:
            raise ValueError("You need to specify `text` or `text_target`: a string or a list of strings")
        encodings = None if text is None else self._encode_texts(text, text_pair, **settings)
        if text_target is None:
            return encodings
        if max_target_length is not None:
            settings["max_length"] = max_target_length
        targets = self._encode_texts(text_target, text_pair_target, **settings)
        if encodings is None:
            return targets
        encodings["labels"] = targets["input_ids"]
        return encodings

    def _encode_texts(
        self,
        text: str | list[str] | list[list[str]] | None = None,
        text_pair: str | list[str] | list[list[str]] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        split_special_tokens: bool | None = None,
    ) -> BatchEncoding:
        """One __call__ encoding: of the texts, or of the targets."""
        for value, name in ((text, "text"), (text_pair, "text_pair")):
            if value is not None and not _is_text_input(value):
                raise ValueError(
                    f"{name} must be a string, a list of strings (a batch, or one pre-tokenized text with "
                    f"is_split_into_words=True) or a list of lists of strings, got {type(value).__name__}"
                )
        if is_split_into_words:
            is_batched = isinstance(text, (list, tuple)) and bool(text) and isinstance(text[0], (list, tuple))
        else:
            is_batched = isinstance(text, (list, tuple))
        if is_batched:
            if isinstance(text_pair, str):
                raise TypeError("when tokenizing a batch, text_pair must be a list as long as text")
            if text_pair is not None and len(text) != len(text_pair):
                raise ValueError(
                    f"batch length of text ({len(text)}) does not match that of text_pair ({len(text_pair)})"
                )
            batch = list(zip(text, text_pair)) if text_pair is not None else list(text)
        else:
            # As in transformers, an empty text_pair counts as no pair.
            batch = [(text, text_pair)] if text_pair else [text]

        padding_strategy, truncation_strategy, max_length = self._resolve_strategies(
            padding, truncation, max_length, pad_to_multiple_of, verbose
        )
        self._configure_backend(
            padding_strategy, truncation_strategy, max_length, stride, pad_to_multiple_of, padding_side
        )
        split = self.split_special_tokens if split_special_tokens is None else bool(split_special_tokens)
        if self._tokenizer.encode_special_tokens != split:
            self._tokenizer.encode_special_tokens = split
        try:
            encodings = self._tokenizer.encode_batch(
                batch, add_special_tokens=add_special_tokens, is_pretokenized=is_split_into_words
            )
        except Exception as error:  # tokenizers raises bare Exceptions (e.g. impossible truncation)
            raise ValueError(f"tokenization failed: {error}") from error
        except BaseException as error:
            # tokenizers panics (a pyo3 PanicException, no Exception subclass) when the overflow stride is not
            # below the room truncation leaves a sequence; callers catching Exception would miss it.
            if type(error).__name__ != "PanicException":
                raise
            raise ValueError(
                f"tokenization failed: stride={stride} is not below the tokens truncation to max_length={max_length} "
                "leaves a sequence (less special tokens and, for pairs, the other text's share): use a smaller "
                f"stride or a larger max_length (tokenizers: {str(error).splitlines()[0]}...)"
            ) from None

        fields, flat = self._encodings_to_dict(
            encodings,
            return_token_type_ids,
            return_attention_mask,
            return_overflowing_tokens,
            return_special_tokens_mask,
            return_offsets_mapping,
            return_length,
        )
        self._warn_if_too_long(fields["input_ids"], max_length, verbose)
        if not is_batched and return_tensors is None and not return_overflowing_tokens:
            # One text in, one row out: drop the batch dimension.
            fields = {
                key: (value[0] if value and isinstance(value[0], list) else value) for key, value in fields.items()
            }
        return BatchEncoding(fields, flat, tensor_type=return_tensors)

    def encode(
        self,
        text: str | list[str],
        text_pair: str | list[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """The input_ids of a text (a list of ints, or a tensor with return_tensors)."""
        return self(
            text,
            text_pair=text_pair,
            add_special_tokens=add_special_tokens,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            stride=stride,
            padding_side=padding_side,
            return_tensors=return_tensors,
            **kwargs,
        )["input_ids"]

    def tokenize(
        self, text: str, pair: str | None = None, add_special_tokens: bool = False, **kwargs: Any
    ) -> list[str]:
        """The token strings of a text (no special tokens unless asked for)."""
        return self(text, text_pair=pair, add_special_tokens=add_special_tokens, **kwargs).tokens()

    # -- padding already-tokenized inputs --

    def pad(
        self,
        encoded_inputs: Any,
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Pad one encoding or a batch (a list of encodings, or a dict of lists) to a common length."""
        if isinstance(encoded_inputs, (list, tuple)) and encoded_inputs and isinstance(encoded_inputs[0], Mapping):
            encoded_inputs = {key: [example[key] for example in encoded_inputs] for key in encoded_inputs[0]}
        if not isinstance(encoded_inputs, Mapping):
            raise ValueError("pad() takes an encoding (a dict of lists) or a list of encodings")
        encoded_inputs = dict(encoded_inputs)
        main = self.model_input_names[0]
        if main not in encoded_inputs:
            raise ValueError(f"pad() needs encodings with {main!r}; got the keys {list(encoded_inputs)}")
        required = encoded_inputs[main]
        if required is None or (hasattr(required, "__len__") and len(required) == 0):
            if return_attention_mask:
                encoded_inputs["attention_mask"] = []
            return BatchEncoding(encoded_inputs)

        # Tensors in, tensors of the same kind out (unless return_tensors says otherwise).
        first = required[0]
        if isinstance(first, (list, tuple)):
            first = next((row[0] for row in required if len(row)), first)
        if not isinstance(first, (int, list, tuple)):
            if isinstance(first, np.ndarray) or isinstance(first, np.generic):
                return_tensors = return_tensors or "np"
            elif type(first).__module__.startswith("torch"):
                return_tensors = return_tensors or "pt"
            else:
                raise ValueError(
                    f"cannot pad values of type {type(first).__name__}: give ints, numpy arrays or torch tensors"
                )
            encoded_inputs = {key: _to_python(value) for key, value in encoded_inputs.items()}

        padding_strategy, _, max_length = self._resolve_strategies(padding, None, max_length, None, verbose)
        rows = encoded_inputs[main]
        if rows and not isinstance(rows[0], (list, tuple)):
            padded = self._pad_one(
                encoded_inputs, max_length, padding_strategy, pad_to_multiple_of, padding_side, return_attention_mask
            )
            return BatchEncoding(padded, tensor_type=return_tensors)
        if any(len(values) != len(rows) for values in encoded_inputs.values()):
            raise ValueError("every field of the encodings must have one entry per sequence of the batch")
        if padding_strategy == "longest":
            max_length = max(len(row) for row in rows)
            padding_strategy = "max_length"
        batch: dict[str, list] = {}
        for index in range(len(rows)):
            example = {key: values[index] for key, values in encoded_inputs.items()}
            padded = self._pad_one(
                example, max_length, padding_strategy, pad_to_multiple_of, padding_side, return_attention_mask
            )
            for key, value in padded.items():
                batch.setdefault(key, []).append(value)
        return BatchEncoding(batch, tensor_type=return_tensors)

    def _pad_one(
        self,
        example: dict[str, list],
        max_length: int | None,
        padding_strategy: str,
        pad_to_multiple_of: int | None,
        padding_side: str | None,
        return_attention_mask: bool | None,
    ) -> dict[str, list]:
        """Pad the fields of one sequence (ids with pad_token_id, attention mask with 0)."""
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        example = dict(example)
        main = self.model_input_names[0]
        ids = list(example[main])
        if padding_strategy == "longest":
            max_length = len(ids)
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        if return_attention_mask and "attention_mask" not in example:
            example["attention_mask"] = [1] * len(ids)
        if padding_strategy == "do_not_pad" or max_length is None or len(ids) >= max_length:
            return example
        missing = max_length - len(ids)
        side = padding_side if padding_side is not None else self.padding_side
        fillers = {main: self.pad_token_id, "token_type_ids": self.pad_token_type_id, "special_tokens_mask": 1}
        if return_attention_mask:
            fillers["attention_mask"] = 0
        for key, filler in fillers.items():
            if key not in example:
                continue
            values = list(example[key])
            if side == "right":
                example[key] = values + [filler] * missing
            elif side == "left":
                example[key] = [filler] * missing + values
            else:
                raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        return example

    # -- decoding --

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str | list[str]:
        """The text of a sequence of ids (ints, a list, a tensor or an array); a batch gives a list of texts."""
        kwargs.pop("use_source_tokenizer", None)
        # Slow tokenizers' option; transformers' fast (tokenizers-backed) decode ignores it, and so does herd.
        kwargs.pop("spaces_between_special_tokens", None)
        if kwargs:
            raise TypeError(f"decode() got unexpected arguments {sorted(kwargs)}")
        token_ids = _to_python(token_ids)
        if isinstance(token_ids, Mapping):
            token_ids = token_ids["input_ids"]
        if isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], (list, tuple)):
            return [self._decode_one(row, skip_special_tokens, clean_up_tokenization_spaces) for row in token_ids]
        return self._decode_one(token_ids, skip_special_tokens, clean_up_tokenization_spaces)

    def _decode_one(self, ids: Any, skip_special_tokens: bool, clean_up_tokenization_spaces: bool | None) -> str:
        if isinstance(ids, int):
            ids = [ids]
        for i in ids:
            if not isinstance(i, int):  # as transformers: float ids are an error, not rounded
                raise TypeError(f"token ids must be integers, got {type(i).__name__} {i!r}")
        text = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        clean_up = (
            self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        )
        # transformers 5.17 skips this clean-up for BPE vocabularies (all Llama ones): it was written
        # for WordPiece and would delete real spaces before punctuation.
        is_bpe = type(self._tokenizer.model).__name__ == "BPE"
        if clean_up and (not is_bpe or self.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output):
            text = self.clean_up_tokenization(text)
        return text

    @staticmethod
    def clean_up_tokenization(text: str) -> str:
        """Remove the spaces that WordPiece-style decoding leaves before punctuation and contractions."""
        for spaced, joined in (
            (" .", "."),
            (" ?", "?"),
            (" !", "!"),
            (" ,", ","),
            (" ' ", "'"),
            (" n't", "n't"),
            (" 'm", "'m"),
            (" 's", "'s"),
            (" 've", "'ve"),
            (" 're", "'re"),
        ):
            text = text.replace(spaced, joined)
        return text

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> list[str]:
        decoded = self.decode(sequences, skip_special_tokens, clean_up_tokenization_spaces, **kwargs)
        return [decoded] if isinstance(decoded, str) else decoded

    # -- chat templates --

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template to render: the argument (a template or the name of one), else the tokenizer's own."""
        if isinstance(self.chat_template, dict):
            templates = self.chat_template
            if chat_template is not None and chat_template in templates:
                return templates[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in templates:
                    return templates["tool_use"]
                if "default" in templates:
                    return templates["default"]
                raise ValueError(
                    "This tokenizer has several chat templates and none is the default: pass one, or the name of "
                    f"one, as chat_template=. Names: {sorted(templates)}"
                )
            return chat_template
        if chat_template is not None:
            return chat_template
        if self.chat_template is None:
            raise ValueError(
                "This tokenizer has no chat template (tokenizer.chat_template is None). Pass a Jinja template "
                "string as chat_template=..., or set tokenizer.chat_template."
            )
        return self.chat_template

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> Any:
        """Render a conversation (or a batch) with the chat template, and tokenize it unless tokenize=False.

        As in transformers 5.17, a tokenized result is a BatchEncoding (input_ids, attention_mask)
        unless return_dict=False, which gives the ids alone. The rendered text already holds its
        special tokens (BOS included), so it is tokenized with add_special_tokens=False. Extra
        keyword arguments (date_string=..., tools_in_user_message=...) become template variables.
        """
        if not tokenize:
            return_dict = False
        if return_assistant_tokens_mask and not (return_dict and tokenize):
            raise ValueError("`return_assistant_tokens_mask=True` requires `return_dict=True` and `tokenize=True`")
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt are not compatible: continue_final_message "
                "leaves the final message open for the model to continue, add_generation_prompt starts a new "
                "assistant message."
            )
        if continue_final_message and return_assistant_tokens_mask:
            raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask.")
        template = self.get_chat_template(chat_template, tools)
        generation_spans = [] if return_assistant_tokens_mask else None
        rendered, is_batched = render_chat(
            template,
            conversation,
            {**self.special_tokens_map, **template_kwargs},  # explicit kwargs win over special tokens
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            generation_spans=generation_spans,
        )
        prompt = rendered if is_batched else rendered[0]
        if not tokenize:
            return prompt
        encoded = self(
            prompt,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            add_special_tokens=False,
            return_tensors=return_tensors,
            **(tokenizer_kwargs or {}),
        )
        if generation_spans is not None:
            masks = _assistant_masks(encoded, generation_spans, batched_rows=is_batched or bool(return_tensors))
            encoded["assistant_masks"] = masks if is_batched or return_tensors else masks[0]
            if return_tensors:
                encoded.convert_to_tensors(tensor_type=return_tensors)
        return encoded if return_dict else encoded["input_ids"]

    # -- saving --

    def _config_to_save(self) -> dict:
        config = copy.deepcopy(self._other_settings)
        for name, token in self._special_tokens.items():
            if token is not None:
                config[name] = token
        if self._extra_special_tokens:
            config["extra_special_tokens"] = list(self._extra_special_tokens)
        config.update(
            model_max_length=self.model_max_length,
            padding_side=self.padding_side,
            truncation_side=self.truncation_side,
            model_input_names=list(self.model_input_names),
            clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
            # PreTrainedTokenizerFast loads in transformers 4.x and 5.x alike; LlamaTokenizer folders keep
            # their class so that the same pipeline is rebuilt on loading.
            tokenizer_class="LlamaTokenizer" if self._llama_style else "PreTrainedTokenizerFast",
        )
        if self.split_special_tokens:
            config["split_special_tokens"] = True
        # Settings such as "legacy" stay in _other_settings and are written back: transformers drops
        # "legacy" when it saves a LlamaTokenizer, so its own reload of such a folder tokenizes
        # differently ("▁" before the first piece only); keeping it makes the folder round-trip.
        return config

    def _save_chat_templates(self, folder: Path, prefix: str) -> list[Path]:
        if self.chat_template is None:
            return []
        templates = {"default": self.chat_template} if isinstance(self.chat_template, str) else self.chat_template
        written = []
        for name, template in templates.items():
            if name == "default":
                path = folder / f"{prefix}{CHAT_TEMPLATE_FILE}"
            else:
                directory = folder / f"{prefix}{CHAT_TEMPLATE_DIR}"
                path = directory / f"{name}.jinja"
                if path.resolve().parent != directory.resolve():  # a name like "../x" must not escape
                    raise ValueError(f"invalid chat template name {name!r}")
                directory.mkdir(exist_ok=True)
            path.write_text(template, encoding="utf-8")
            written.append(path)
        return written

    def save_pretrained(
        self, save_directory: str | os.PathLike, filename_prefix: str | None = None, **kwargs: Any
    ) -> tuple[str, ...]:
        """Write tokenizer.json, tokenizer_config.json and the chat template(s) (chat_template.jinja)."""
        kwargs.pop("legacy_format", None)
        kwargs.pop("save_jinja_files", None)
        push = hub.push_request(save_directory, kwargs)
        if kwargs:
            raise TypeError(f"save_pretrained() got unexpected arguments {sorted(kwargs)}")
        folder = hub.save_folder(save_directory)
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        config_path = folder / f"{prefix}{TOKENIZER_CONFIG_FILE}"
        config_text = json.dumps(self._config_to_save(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        config_path.write_text(config_text, encoding="utf-8")
        template_paths = self._save_chat_templates(folder, prefix)
        tokenizer_path = folder / f"{prefix}{TOKENIZER_FILE}"
        # The backend still holds the padding/truncation of the last call; saved, they would turn
        # into defaults (a pad token, a padding side) on loading. Each call sets its own anyway.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._tokenizer.save(str(tokenizer_path))
        if push is not None:
            push.upload(self)
        return tuple(str(path) for path in (config_path, *template_paths, tokenizer_path))


# transformers' names for the same tokenizer. Which pipeline a folder gets is decided by its
# tokenizer_config.json ("tokenizer_class"), not by the alias used to load it.
LlamaTokenizer = PreTrainedTokenizerFast
LlamaTokenizerFast = PreTrainedTokenizerFast


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(folder_or_hub_id, **kwargs)` loads the tokenizer of a folder or Hub repository."""

    def __init__(self) -> None:
        raise OSError("AutoTokenizer is not instantiated: use AutoTokenizer.from_pretrained(...)")

    @staticmethod
    def from_pretrained(
        pretrained_model_name_or_path: str | os.PathLike, *inputs: Any, **kwargs: Any
    ) -> PreTrainedTokenizerFast:
        return PreTrainedTokenizerFast.from_pretrained(pretrained_model_name_or_path, *inputs, **kwargs)
