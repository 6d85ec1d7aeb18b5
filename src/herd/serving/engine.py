"""PLACEHOLDER (serve-api branch): the engine interface's types only, as the contract between the
server's two halves writes them. The serve-engine branch owns this file and replaces it whole
(Engine, AsyncEngine, the scheduler); on merging, take serve-engine's version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


class TokenConstraint(Protocol):
    def fill_allowed(self, allowed: torch.Tensor) -> None: ...
    def accept(self, token_id: int) -> None: ...
    def is_finished(self) -> bool: ...


@dataclass
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    model_inputs: dict[str, Any] | None = None
    constraint: TokenConstraint | None = None


@dataclass
class TokenEvent:
    token_id: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0


class QueueFull(Exception):
    pass
