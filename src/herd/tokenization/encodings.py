"""The dicts that tokenizers and processors return: model inputs by name, with attribute access.

`BatchDict` holds what both kinds share: `out.input_ids` for `out["input_ids"]`, `.data`,
conversion of every value to torch tensors or numpy arrays, and `.to(...)`. `BatchEncoding`
(a tokenizer's output) adds the token alignment of the `tokenizers` encodings behind it;
`BatchFeature` (a processor's output) lives in herd.image_utils.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from tokenizers import Encoding

logger = logging.getLogger(__name__)


class CharSpan(NamedTuple):
    """A span of characters of the original text: `start` (first character) and `end` (one past the last)."""

    start: int
    end: int


class TokenSpan(NamedTuple):
    """A span of tokens of an encoding: `start` (first token) and `end` (one past the last)."""

    start: int
    end: int


def _nested_is_empty(value: Any) -> bool:
    """True for [], [[]], [[], []]...: lists with no scalar anywhere inside."""
    if isinstance(value, (list, tuple)):
        return all(_nested_is_empty(item) for item in value)
    return False


def tensor_type_name(tensor_type: Any) -> str | None:
    """'pt', 'np' or None, from a string or an enum with a string value (transformers' TensorType)."""
    if tensor_type is None:
        return None
    name = getattr(tensor_type, "value", tensor_type)
    if name not in ("pt", "np"):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {tensor_type!r}")
    return name


def as_numpy_array(value: Any) -> np.ndarray:
    """Nested lists / arrays as one numpy array; rows of different lengths as an object array of rows."""
    if isinstance(value, np.ndarray):
        return value
    if _nested_is_empty(value):
        return np.asarray(value, dtype=np.int64)
    rows_are_sequences = isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, np.ndarray))
    if rows_are_sequences and len({len(row) for row in value}) > 1:
        # Ragged rows: like transformers, numpy gets an object array of 1-D arrays.
        ragged = np.empty(len(value), dtype=object)
        ragged[:] = [np.asarray(row) for row in value]
        return ragged
    return np.asarray(value)


def _as_numpy(value: Any) -> np.ndarray:
    # torch is looked up, not imported: numpy outputs should not need it.
    torch = sys.modules.get("torch")
    if torch is not None and torch.is_tensor(value):
        return value.detach().cpu().numpy()
    return as_numpy_array(value)


def _as_torch(value: Any):
    import torch

    if torch.is_tensor(value):
        return value
    if isinstance(value, (list, tuple)) and value and torch.is_tensor(value[0]):
        return torch.stack(list(value))
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], np.ndarray):
        value = np.array(value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if _nested_is_empty(value):
        return torch.tensor(value, dtype=torch.int64)  # token ids, even when there are none
    return torch.tensor(value)


def _is_device(value: Any) -> bool:
    import torch

    return isinstance(value, (str, int, torch.device))


class BatchDict(dict):
    """A dict of model inputs with attribute access (`out.input_ids`) and tensor conversion."""

    def __init__(self, data: Mapping[str, Any] | None = None, tensor_type: Any = None):
        super().__init__(data or {})
        self.convert_to_tensors(tensor_type)

    def __getattr__(self, name: str) -> Any:
        # Only reached when ordinary attribute lookup fails: fall back to the dict's keys.
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no attribute or key {name!r}") from None

    @property
    def data(self) -> dict:
        """The fields as a plain dict (transformers keeps them in `.data`)."""
        return dict(self)

    def convert_to_tensors(self, tensor_type: Any = None, prepend_batch_axis: bool = False) -> BatchDict:
        """Turn every value into a torch tensor ('pt') or a numpy array ('np'), in place."""
        name = tensor_type_name(tensor_type)
        if name is None:
            return self
        convert = _as_torch if name == "pt" else _as_numpy
        for key, value in list(self.items()):
            if prepend_batch_axis:
                value = [value]
            try:
                self[key] = convert(value)
            except (ValueError, TypeError) as error:
                if "BFloat16" in str(error):
                    raise ValueError(
                        f"Unable to create a numpy array from `{key}`: numpy has no bfloat16 type; pass "
                        "return_tensors='pt' instead"
                    ) from error
                raise ValueError(
                    f"Unable to create a tensor from `{key}`: its rows probably have different lengths. Pass "
                    "padding=True (and truncation=True if needed) to get batched tensors of one length."
                ) from error
        return self

    def to(self, *args: Any, **kwargs: Any) -> BatchDict:
        """Move tensors to a device and/or cast floating point tensors to a dtype, as `Tensor.to` takes them.

        Only floating point tensors are cast, so that token ids and masks keep their integer type.
        Returns self.
        """
        import torch

        device = kwargs.get("device")
        if device is None and args:
            first = args[0]
            if _is_device(first):
                device = first
            elif not isinstance(first, torch.dtype):
                raise ValueError(f"{type(self).__name__}.to() takes a device and/or a dtype, got {first!r}")
        non_blocking = kwargs.get("non_blocking", False)

        def move(value: Any) -> Any:
            if torch.is_tensor(value) and torch.is_floating_point(value):
                return value.to(*args, **kwargs)
            if torch.is_tensor(value) and device is not None:
                return value.to(device=device, non_blocking=non_blocking)
            if isinstance(value, (list, tuple)):
                return type(value)(move(item) for item in value)
            return value

        for key, value in list(self.items()):
            self[key] = move(value)
        return self


class BatchEncoding(BatchDict):
    """The output of a tokenizer call: a dict ("input_ids", "attention_mask", ...) with attribute access.

    `enc.input_ids` is `enc["input_ids"]`; `enc[0]` is the `tokenizers.Encoding` of the first sequence
    (offsets, word ids...); `enc.to(device)` moves torch tensors.
    """

    def __init__(
        self,
        data: Mapping[str, Any] | None = None,
        encoding: Encoding | list[Encoding] | None = None,
        tensor_type: str | None = None,
        prepend_batch_axis: bool = False,
        n_sequences: int | None = None,
    ):
        if isinstance(encoding, Encoding):
            encoding = [encoding]
        self._encodings = encoding
        if n_sequences is None and encoding:
            n_sequences = encoding[0].n_sequences
        self._n_sequences = n_sequences
        super().__init__(data)
        self.convert_to_tensors(tensor_type=tensor_type, prepend_batch_axis=prepend_batch_axis)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return dict.__getitem__(self, key)
        if isinstance(key, int) and self._encodings is not None:
            return self._encodings[key]
        if isinstance(key, slice):
            return {name: value[key] for name, value in self.items()}
        raise KeyError(f"BatchEncoding keys are field names (str), slices, or batch indices (int); got {key!r}")

    @property
    def encodings(self) -> list[Encoding] | None:
        return self._encodings

    @property
    def n_sequences(self) -> int | None:
        return self._n_sequences

    @property
    def is_fast(self) -> bool:
        return self._encodings is not None

    def _encoding(self, batch_index: int) -> Encoding:
        if not self._encodings:
            raise ValueError("this BatchEncoding was not made by a tokenizer call, so it has no token alignment")
        return self._encodings[batch_index]

    def _at(self, batch_or_index: int, index: int | None) -> tuple[Encoding, int]:
        """(encoding, index inside it) for the "(index)" and "(batch_index, index)" call forms."""
        batch_index, index = (0, batch_or_index) if index is None else (batch_or_index, index)
        return self._encoding(batch_index), index

    def _locate(self, batch_or_index: int, index: int | None) -> tuple[Encoding, int]:
        """`_at`, with negative token indices counting from the end (of the batch, and of the
        encoding's tokens): transformers 5.17 means to do the same in token_to_sequence and
        token_to_word, but fails with an AttributeError on them (it reads attributes BatchEncoding
        does not have)."""
        encoding, index = self._at(batch_or_index, index)
        return encoding, index + len(encoding) if index < 0 else index

    def tokens(self, batch_index: int = 0) -> list[str]:
        return self._encoding(batch_index).tokens

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        return self._encoding(batch_index).word_ids

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        return self._encoding(batch_index).sequence_ids

    def token_to_sequence(self, batch_or_token_index: int, token_index: int | None = None) -> int | None:
        """Which text (0, or 1 for the second of a pair) a token comes from; None for added special tokens."""
        encoding, token_index = self._locate(batch_or_token_index, token_index)
        return encoding.token_to_sequence(token_index)

    def token_to_word(self, batch_or_token_index: int, token_index: int | None = None) -> int | None:
        """The index of the word (in its own text) a token is part of; None for added special tokens."""
        encoding, token_index = self._locate(batch_or_token_index, token_index)
        return encoding.token_to_word(token_index)

    def word_to_tokens(
        self, batch_or_word_index: int, word_index: int | None = None, sequence_index: int = 0
    ) -> TokenSpan | None:
        """The tokens of a word of text `sequence_index`, as a TokenSpan; None when no token holds it."""
        encoding, word_index = self._at(batch_or_word_index, word_index)
        span = encoding.word_to_tokens(word_index, sequence_index)
        return None if span is None else TokenSpan(*span)

    def token_to_chars(self, batch_or_token_index: int, token_index: int | None = None) -> CharSpan | None:
        """The characters of its text a token covers, as a CharSpan; None for added special tokens."""
        # As transformers: a negative token index is handed to tokenizers as it is (an OverflowError).
        encoding, token_index = self._at(batch_or_token_index, token_index)
        span = encoding.token_to_chars(token_index)
        return None if span is None else CharSpan(*span)

    def char_to_token(self, batch_or_char_index: int, char_index: int | None = None, sequence_index: int = 0):
        """The token holding a character of text `sequence_index`; None for characters no token holds."""
        encoding, char_index = self._at(batch_or_char_index, char_index)
        return encoding.char_to_token(char_index, sequence_index)

    def word_to_chars(
        self, batch_or_word_index: int, word_index: int | None = None, sequence_index: int = 0
    ) -> CharSpan:
        """The characters of a word of text `sequence_index`, as a CharSpan."""
        encoding, word_index = self._at(batch_or_word_index, word_index)
        span = encoding.word_to_chars(word_index, sequence_index)
        if span is None:
            # transformers fails here too, with a TypeError (it unpacks None into a CharSpan).
            raise TypeError(f"word {word_index} is not in sequence {sequence_index} of this encoding")
        return CharSpan(*span)

    def char_to_word(self, batch_or_char_index: int, char_index: int | None = None, sequence_index: int = 0):
        """The word of text `sequence_index` a character is part of; None for characters of no word."""
        encoding, char_index = self._at(batch_or_char_index, char_index)
        return encoding.char_to_word(char_index, sequence_index)

    def to(self, device: Any, *, non_blocking: bool = False) -> BatchEncoding:
        """Move every torch tensor to `device` (other values are left as they are); returns self."""
        if not _is_device(device):
            # Mirrors transformers: a dtype here (model.half() style code) is not applied to token ids.
            logger.warning("BatchEncoding.to() takes a device, not %r; nothing was moved", device)
            return self
        return super().to(device, non_blocking=non_blocking)
