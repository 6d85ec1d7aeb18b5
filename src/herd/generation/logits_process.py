"""Logits processors: the reference's order and arithmetic, each a small callable.

Each takes (input_ids (batch, seq), scores (batch, vocab)) and returns new scores. Filtered
tokens get -inf, as in the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .configuration import GenerationConfig

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FILTERED = -float("inf")


def repetition_penalty(penalty: float) -> LogitsProcessor:
    """Tokens already in the sequence: negative scores multiplied by `penalty`, positive ones divided."""

    def process(input_ids, scores):
        seen = torch.gather(scores, 1, input_ids)
        penalised = torch.where(seen < 0, seen * penalty, seen / penalty)
        return scores.scatter(1, input_ids, penalised)

    return process


def suppress_eos_before(min_length: int, eos_ids: torch.Tensor, prompt_length: int = 0) -> LogitsProcessor:
    """No eos until the sequence (minus `prompt_length`) has `min_length` tokens."""

    def process(input_ids, scores):
        if input_ids.shape[-1] - prompt_length < min_length:
            eos_mask = torch.isin(torch.arange(scores.shape[-1], device=scores.device), eos_ids.to(scores.device))
            scores = scores.masked_fill(eos_mask, FILTERED)
        return scores

    return process


def temperature(value: float) -> LogitsProcessor:
    return lambda input_ids, scores: scores / value


def top_k(k: int, min_tokens_to_keep: int = 1) -> LogitsProcessor:
    k = max(k, min_tokens_to_keep)

    def process(input_ids, scores):
        kth_best = torch.topk(scores, min(k, scores.shape[-1]))[0][..., -1, None]
        return scores.masked_fill(scores < kth_best, FILTERED)

    return process


def top_p(p: float, min_tokens_to_keep: int = 1) -> LogitsProcessor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p."""

    def process(input_ids, scores):
        sorted_scores, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - p)
        remove_sorted[..., -min_tokens_to_keep:] = False
        remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
        return scores.masked_fill(remove, FILTERED)

    return process


def min_p(p: float, min_tokens_to_keep: int = 1) -> LogitsProcessor:
    """Drop tokens less likely than p times the most likely one."""

    def process(input_ids, scores):
        probs = scores.softmax(dim=-1)
        remove = probs < p * probs.amax(dim=-1, keepdim=True)
        keep = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
        remove.scatter_(-1, keep, False)
        return scores.masked_fill(remove, FILTERED)

    return process


def build_logits_processors(config: GenerationConfig, eos_ids: torch.Tensor | None, prompt_length: int) -> list[LogitsProcessor]:
    processors: list[LogitsProcessor] = []
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(repetition_penalty(config.repetition_penalty))
    if eos_ids is not None and config.min_length:
        processors.append(suppress_eos_before(config.min_length, eos_ids))
    if eos_ids is not None and config.min_new_tokens:
        processors.append(suppress_eos_before(config.min_new_tokens, eos_ids, prompt_length))
    if config.do_sample:
        # Beam sampling keeps one more candidate than there are eos ids, so a beam can continue.
        keep = 1 if config.num_beams == 1 else (len(eos_ids) + 1 if eos_ids is not None else 2)
        if config.temperature != 1.0:
            processors.append(temperature(config.temperature))
        if config.top_k:
            processors.append(top_k(config.top_k, keep))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(top_p(config.top_p, keep))
        if config.min_p is not None:
            processors.append(min_p(config.min_p, keep))
    return processors


def apply_processors(processors: list[LogitsProcessor], input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for process in processors:
        scores = process(input_ids, scores)
    return scores
