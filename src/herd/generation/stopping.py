"""When a row is done: an eos id, a stop string, or the length limit."""

from __future__ import annotations

from typing import Any

import torch


def ends_with_eos(sequences: torch.Tensor, eos_ids: torch.Tensor | None) -> torch.Tensor:
    """(rows,) True where the last token is one of the eos ids."""
    if eos_ids is None:
        return torch.zeros(sequences.shape[0], dtype=torch.bool, device=sequences.device)
    return torch.isin(sequences[:, -1], eos_ids.to(sequences.device))


class StopStrings:
    """Stop when a stop string ends inside the newest token's text.

    As in the reference, the string may start in earlier tokens and may run past the end of the
    stop string into the newest token ("st" + "opper" matches "stop"), but it must overlap the
    newest token: a stop string that lies wholly in the past does not stop again.
    """

    def __init__(self, tokenizer: Any, stop_strings: str | list[str]):
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: call generate(..., stop_strings=..., tokenizer=tokenizer)")
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not self.stop_strings or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        self.tokenizer = tokenizer
        # Every token is at least one character (or one byte of one): this many tokens cover any match.
        self.window = max(len(s.encode()) for s in self.stop_strings) + 1

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def __call__(self, sequences: torch.Tensor) -> torch.Tensor:
        done = []
        for row in sequences[:, -self.window :].tolist():
            before, whole = self._text(row[:-1]), self._text(row)
            # A match must end after the text of the earlier tokens, i.e. inside the newest token.
            # Compare on the common prefix: decoding may re-space the boundary between tokens.
            shared = 0
            while shared < min(len(before), len(whole)) and before[shared] == whole[shared]:
                shared += 1
            done.append(any(self._ends_after(whole, s, shared) for s in self.stop_strings))
        return torch.tensor(done, dtype=torch.bool, device=sequences.device)

    @staticmethod
    def _ends_after(text: str, stop: str, boundary: int) -> bool:
        start = text.find(stop, max(0, boundary - len(stop) + 1))
        return start != -1 and start + len(stop) > boundary
