"""Tokens to text, one token at a time, with stop strings cut out.

`TextAssembler.add(token)` returns only text that is final: a token that ends inside a UTF-8
character waits for the next one, and text that could be the start of a stop string is held back
until the next tokens show it is not one (so a stop string spread over several tokens never
reaches a streaming client). Once a stop string appears, the text ends before it.

Each token decodes a short window, not the whole answer (a whole decode per token costs the
event loop O(length) per token, for every stream): the text of ids[prefix:] minus that of
ids[prefix:read], the window starting one decoded token back so that a leading space (or a
SentencePiece word boundary) comes out as decoding the whole would give it.
"""

from __future__ import annotations

import re
from typing import Any

_INCOMPLETE = "\ufffd"  # what a byte-level decode gives for a partial UTF-8 character
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a SentencePiece byte-fallback token
_WORD_START = "\u2581"  # SentencePiece's mark of a space before a word


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: a byte-level token is a string of these
    (the printable Latin-1 bytes stand for themselves, the others are shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


_BYTE_LEVEL = _byte_level_alphabet()


class TextAssembler:
    def __init__(self, tokenizer: Any, stop: list[str] | None = None, *, skip_special_tokens: bool = True,
                 hidden_ids: set[int] | frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.skip_special_tokens = skip_special_tokens
        self.hidden_ids = hidden_ids  # end-of-answer ids: never part of the text
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] is the window's already-decoded part
        self.read = 0
        self.text = ""  # everything decoded so far (stop string included, once seen)
        self.sent = 0  # characters of `text` handed out
        self.stopped = False  # a stop string ended the text
        self.final_text: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that could begin a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def add(self, token_id: int | None) -> str:
        """The new final text after `token_id` ("" when nothing is final yet or the text has ended)."""
        if self.stopped or token_id is None or token_id in self.hidden_ids:
            return ""
        self.ids.append(int(token_id))
        known = self._decode(self.ids[self.prefix : self.read])
        window = self._decode(self.ids[self.prefix :])
        if window.endswith(_INCOMPLETE) or len(window) <= len(known):
            return ""  # inside a UTF-8 character, or a token with no text yet
        self.prefix, self.read = self.read, len(self.ids)
        text = self.text = self.text + window[len(known) :]
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            found = [position for position in (text.find(s, start) for s in self.stop) if position >= 0]
            if found:
                self.stopped = True
                self.final_text = text[: min(found)]
                return self._take(len(self.final_text))
        return self._take(len(text) - self._held_back(text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def finish(self) -> str:
        """The rest of the text when generation ends without a stop string (held-back text included)."""
        if self.stopped:
            return ""
        if self.ids:
            self.text = self._decode(self.ids)  # a last partial character shows as U+FFFD, as other servers do
        self.final_text = self.text
        return self._take(len(self.text))

    def _piece(self, token_id: int) -> str | None:
        """The token's vocabulary entry (a string, or None where the tokenizer has none)."""
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        return piece if isinstance(piece, str) else None

    def token_text(self, token_id: int, piece: str | None = None) -> str:
        """The token alone as text (logprobs' `token`). A SentencePiece word start (a piece beginning
        with U+2581) keeps its space: decoding one token alone strips it as the start of a text,
        and the tokens of an answer would join without the spaces between words."""
        text = self.tokenizer.decode([int(token_id)], skip_special_tokens=False)
        piece = piece if piece is not None else self._piece(token_id)
        if piece is not None and piece.startswith(_WORD_START) and not text.startswith(" "):
            text = " " + text
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes (logprobs' `bytes`). A token holding part of a character (an emoji is
        often 2-4 tokens) decodes to U+FFFD; clients join the tokens' bytes to rebuild the character,
        so these come from the token itself: its byte-level characters or its <0xNN> byte."""
        piece = self._piece(token_id)
        text = self.token_text(token_id, piece)
        if _INCOMPLETE not in text:
            return text.encode()
        if piece is not None and (byte := _BYTE_TOKEN.fullmatch(piece)):
            return bytes([int(byte.group(1), 16)])
        if piece and all(ch in _BYTE_LEVEL for ch in piece):
            return bytes(_BYTE_LEVEL[ch] for ch in piece)
        return text.encode()
