"""When a row is done: an eos id, a stop string, a user's stopping criteria, or the length limit."""

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


class StoppingCriteria:
    """A user's rule for when rows are done, as in transformers: `__call__(input_ids (batch, seq), scores)`
    returns a bool tensor (batch,) (or one bool for every row). `scores` is what generate() hands over, as
    transformers does: the tuple of every step's processed scores so far ((rows, vocab) each) when it returns
    them (return_dict_in_generate and output_scores), else None."""

    def __call__(self, input_ids: torch.Tensor, scores: tuple[torch.Tensor, ...] | None,
                 **kwargs: Any) -> torch.Tensor | bool:
        raise NotImplementedError(f"{type(self).__name__} must define __call__(input_ids, scores)")


class StoppingCriteriaList(list):
    """Criteria of which any one stops a row."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criteria in self:
            done = done | torch.as_tensor(criteria(input_ids, scores, **kwargs), device=input_ids.device).bool()
        return done


class MaxLengthCriteria(StoppingCriteria):
    """Rows are done once the sequence holds `max_length` tokens (prompt included)."""

    def __init__(self, max_length: int, max_position_embeddings: int | None = None):
        self.max_length, self.max_position_embeddings = max_length, max_position_embeddings

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[-1] >= self.max_length, device=input_ids.device)


class MaxTimeCriteria(StoppingCriteria):
    """Rows are done once `max_time` seconds have passed since `initial_timestamp` (the criteria's creation)."""

    def __init__(self, max_time: float, initial_timestamp: float | None = None):
        import time

        self.max_time = max_time
        self.initial_timestamp = time.time() if initial_timestamp is None else initial_timestamp

    def __call__(self, input_ids, scores, **kwargs):
        import time

        elapsed = time.time() - self.initial_timestamp > self.max_time
        return torch.full((input_ids.shape[0],), elapsed, device=input_ids.device)


class EosTokenCriteria(StoppingCriteria):
    """Rows are done when their last token is one of `eos_token_id` (an id, a list or a tensor of ids)."""

    def __init__(self, eos_token_id: int | list[int] | torch.Tensor):
        if not isinstance(eos_token_id, torch.Tensor):
            eos_token_id = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids, scores, **kwargs):
        return ends_with_eos(input_ids, self.eos_token_id)


class StopStringCriteria(StoppingCriteria):
    """Rows are done when a stop string ends in the newest token's text (generate(stop_strings=...) as a
    criteria object the user builds, as in transformers)."""

    def __init__(self, tokenizer: Any, stop_strings: str | list[str]):
        self._stop = StopStrings(tokenizer, stop_strings)
        self.stop_strings = self._stop.stop_strings

    def __call__(self, input_ids, scores, **kwargs):
        return self._stop(input_ids)


class StopChecks:
    """Every rule checked after each new token besides eos: stop strings and the user's criteria."""

    def __init__(self, stop_strings: StopStrings | None, criteria: list | None):
        self.stop_strings = stop_strings
        self.criteria = StoppingCriteriaList(criteria or [])

    def __call__(self, sequences: torch.Tensor, scores: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        done = self.criteria(sequences, scores)
        if self.stop_strings is not None:
            done = done | self.stop_strings(sequences)
        return done
