"""Choosing each request's next token from a batch of logits, each row with its own settings.

In order, per row (rows that ask for nothing skip each part):
0. `logit_bias` (OpenAI's): each listed token's bias added to the model's logit;
1. penalties: `repetition_penalty` as transformers applies it (over prompt and generated tokens:
   a positive logit divided by it, a negative one multiplied), then OpenAI's `frequency_penalty`
   (times each token's count among the generated tokens) and `presence_penalty` (once per
   generated token id) subtracted;
2. the structured-output constraint: tokens that cannot continue the document get -inf;
3. greedy rows (temperature 0): the argmax, done;
4. temperature, then top-k, top-p and min-p truncation (transformers' order);
5. a draw: argmax(probs / E) with E ~ Exponential(1) drawn from the request's own generator
   (an exact sample of probs). The noise is the only random number a step draws for a row, so a
   seeded request's tokens do not depend on what else is in the batch.

Logprobs are log_softmax of the logits after steps 0, 1, 2 and the temperature, before the
truncation of step 4 (so alternatives outside top-k/top-p keep a finite logprob): the
distribution the request samples from, as processed. vLLM by default returns the raw model's
logprobs instead; for greedy rows with no penalty both are the same.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Choice:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: Exception | None = None  # the row's constraint failed: no token for it (the engine ends it)


@dataclass
class SamplingRow:
    """What choosing a row's token needs: its settings (an engine SamplingParams), its tokens so far
    (the prompt's first `prompt_length`), its generator and its constraint."""

    params: Any
    tokens: list[int]
    prompt_length: int
    generator: torch.Generator | None
    constraint: Any = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_length :]


def _apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for index, row in enumerate(rows):
        bias = row.params.logit_bias
        if bias:
            ids = torch.tensor([token for token, _ in bias], device=logits.device)
            logits[index, ids] += torch.tensor([value for _, value in bias], dtype=logits.dtype, device=logits.device)


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for index, row in enumerate(rows):
        params = row.params
        if params.repetition_penalty != 1.0:
            # not an id past the head's rows (Mllama's <|image|> in a prompt)
            seen = sorted(token for token in set(row.tokens) if token < logits.shape[1])
            ids = torch.tensor(seen, dtype=torch.long, device=logits.device)
            scores = logits[index, ids]
            logits[index, ids] = torch.where(scores < 0, scores * params.repetition_penalty,
                                             scores / params.repetition_penalty)
        if (params.frequency_penalty or params.presence_penalty) and len(row.tokens) > row.prompt_length:
            counts = Counter(row.generated)
            ids = torch.tensor(list(counts), device=logits.device)
            times = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
            logits[index, ids] -= params.frequency_penalty * times + params.presence_penalty


def _apply_constraints(logits: torch.Tensor, rows: list[SamplingRow]) -> dict[int, Exception]:
    """The constrained rows' disallowed tokens at -inf; returns the rows whose constraint raised
    (their row is left as it was: the caller fails those requests, not the batch)."""
    constrained = [index for index, row in enumerate(rows) if row.constraint is not None]
    errors: dict[int, Exception] = {}
    if not constrained:
        return errors
    allowed = torch.ones(len(constrained), logits.shape[1], dtype=torch.bool)
    for mask_row, index in enumerate(constrained):
        try:
            rows[index].constraint.fill_allowed(allowed[mask_row])
        except Exception as error:  # noqa: BLE001 - one request's grammar failing is that request's failure
            errors[index] = error
            allowed[mask_row] = True
    index = torch.tensor(constrained, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
    return errors


def _truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits (rows, vocab) with the tokens outside each row's top-k / top-p / min-p set to -inf;
    top_k 0 is off. The most likely token always stays."""
    vocab = logits.shape[1]
    ordered, order = logits.sort(dim=-1, descending=True)  # (rows, vocab)
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab)
    drop = rank[None, :] >= k[:, None]
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    drop |= before > top_p[:, None]
    drop |= probs < (min_p * probs[:, 0])[:, None]
    drop[:, 0] = False
    return logits.scatter(1, order, ordered.masked_fill(drop, float("-inf")))


def _reads_tokens(row: SamplingRow) -> bool:
    """Whether steps 1-2 read the row's tokens so far (penalties, a constraint)."""
    params = row.params
    return bool(params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty
                or row.constraint is not None)


def _edits_logits(row: SamplingRow) -> bool:
    """Whether steps 0-2 change the row's logits."""
    return bool(row.params.logit_bias) or _reads_tokens(row)


def draws_on_device(row: SamplingRow) -> bool:
    """Whether `draw` gives the row's token and logprobs without its tokens so far on the host (no
    penalty or constraint). Such rows can stay on the GPU until later (the engine's async
    scheduling)."""
    return not _reads_tokens(row)


@dataclass
class Drawn:
    """A batch's tokens and logprobs as `draw` leaves them, on the logits' device (or copied to the
    host): `tokens` (rows,); for the rows in `wants` (those asking for logprobs) the chosen token's
    logprob (wants,) and the best `top_values` / `top_ids` (wants, the largest k asked)."""

    tokens: torch.Tensor
    wants: list[int]
    own: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    errors: dict[int, Exception] = field(default_factory=dict)  # rows whose constraint raised

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.tokens, self.own, self.top_values, self.top_ids) if t is not None]

    def with_tensors(self, tensors: list[torch.Tensor]) -> Drawn:
        """The same with its tensors replaced (in `tensors()`'s order): copies on the host."""
        tokens, *rest = tensors
        logprobs = dict(zip(("own", "top_values", "top_ids"), rest)) if self.own is not None else {}
        return Drawn(tokens, self.wants, errors=self.errors, **logprobs)

    def choices(self, rows: list[SamplingRow]) -> list[Choice]:
        """Each row's Choice (reads the tensors: waits for the device where they are on one)."""
        choices = [Choice(token, error=self.errors.get(index)) for index, token in enumerate(self.tokens.tolist())]
        if self.wants:
            own, top_values, top_ids = self.own.tolist(), self.top_values.tolist(), self.top_ids.tolist()
            for j, i in enumerate(self.wants):
                k = rows[i].params.logprobs
                choices[i].logprob = own[j]
                choices[i].top_logprobs = list(zip(top_ids[j][:k], top_values[j][:k]))
        return choices


def draw(logits: torch.Tensor, rows: list[SamplingRow]) -> Drawn:
    """Each row's token, and logprobs where asked, without waiting for the device."""
    chosen, scaled, errors = _draw(logits.float(), rows)
    wants = [index for index, row in enumerate(rows) if row.params.logprobs is not None]
    if not wants:
        return Drawn(chosen, wants, errors=errors)
    index = torch.tensor(wants, device=logits.device)
    logprobs = scaled[index].log_softmax(dim=-1)
    most = max(rows[i].params.logprobs for i in wants)
    own = logprobs.gather(1, chosen[index][:, None]).squeeze(1)
    top_values, top_ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0].long())
    return Drawn(chosen, wants, own, top_values, top_ids, errors)


def choose(logits: torch.Tensor, rows: list[SamplingRow]) -> list[Choice]:
    """logits (rows, vocab) float32 -> each row's token (and logprobs where asked)."""
    return draw(logits, rows).choices(rows)


def _draw(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor, dict[int, Exception]]:
    """Steps 0-5: (each row's token (rows,), the logits after steps 0-2 and the temperature (what
    logprobs are taken from), the rows whose constraint raised)."""
    device = logits.device
    errors: dict[int, Exception] = {}
    if any(_edits_logits(row) for row in rows):
        logits = logits.clone()  # the caller's stays as it was
        _apply_logit_bias(logits, rows)
        _apply_penalties(logits, rows)
        errors = _apply_constraints(logits, rows)
    chosen = logits.argmax(dim=-1)
    sampled_rows = [index for index, row in enumerate(rows) if row.params.temperature > 0]
    wants = [index for index, row in enumerate(rows) if row.params.logprobs is not None]
    scaled = logits
    if sampled_rows or wants:  # greedy rows without logprobs never look at the scaled logits
        temperature = torch.tensor([row.params.temperature for row in rows], device=device)
        scaled = logits / torch.where(temperature <= 0, 1.0, temperature)[:, None]
    if sampled_rows:
        index = torch.tensor(sampled_rows, device=device)
        params = [rows[i].params for i in sampled_rows]
        candidates = scaled[index]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
            candidates = _truncate(candidates, torch.tensor([p.top_k for p in params], device=device),
                                   torch.tensor([p.top_p for p in params], device=device),
                                   torch.tensor([p.min_p for p in params], device=device))
        probs = candidates.softmax(dim=-1)
        noise = torch.stack([torch.empty(logits.shape[1], device=device).exponential_(generator=rows[i].generator)
                             for i in sampled_rows])
        chosen[index] = (probs / noise).argmax(dim=-1)
    return chosen, scaled, errors
