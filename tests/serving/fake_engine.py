"""A stand-in for serving/engine.py's Engine and AsyncEngine (the contract's interface), for the API tests.

FakeEngine runs each request through model.generate() alone (batch 1) the first time the scheduler
sees it, then hands its tokens out one per step(), interleaved with the other running requests, so
that the server sees what the real engine gives: token events, finish reasons, aborts freeing
"blocks", a bounded waiting queue. With `script`, the tokens come from a function of the request
instead (to force a tiny model's answer, e.g. a tool call). FakeAsyncEngine drives any object with
the Engine interface from a background thread.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from herd.generation.logits_process import LogitsProcessor, LogitsProcessorList
from herd.generation.stopping import StoppingCriteria, StoppingCriteriaList
from herd.serving.engine import EngineRequest, QueueFull, TokenEvent


def model_eos_ids(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]


class _OpenAIPenalties(LogitsProcessor):
    """presence / frequency penalty over the generated tokens (OpenAI's definition)."""

    def __init__(self, prompt_length: int, presence: float, frequency: float):
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids, scores):
        generated = input_ids[0, self.prompt_length:]
        if generated.numel():
            counts = torch.bincount(generated, minlength=scores.shape[-1])[: scores.shape[-1]].to(scores.dtype)
            scores = scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
        return scores


class _Constrained(LogitsProcessor):
    """A TokenConstraint as a logits processor (mask) and a stopping criterion (finished)."""

    def __init__(self, constraint, prompt_length: int):
        self.constraint, self.prompt_length, self.seen = constraint, prompt_length, 0

    def _catch_up(self, input_ids):
        generated = input_ids[0, self.prompt_length:].tolist()
        for token in generated[self.seen:]:
            self.constraint.accept(int(token))
        self.seen = len(generated)

    def __call__(self, input_ids, scores):
        self._catch_up(input_ids)
        allowed = torch.ones(scores.shape[-1], dtype=torch.bool)
        self.constraint.fill_allowed(allowed)
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))


class _ConstraintDone(StoppingCriteria):
    def __init__(self, constrained: _Constrained):
        self.constrained = constrained

    def __call__(self, input_ids, scores, **kwargs):
        self.constrained._catch_up(input_ids)
        return torch.tensor([self.constrained.constraint.is_finished()])


@dataclass
class _Running:
    request: EngineRequest
    tokens: list[TokenEvent] | None = None
    sent: int = 0


@dataclass
class FakeEngine:
    model: object = None
    max_batch: int = 256
    max_model_len: int | None = None
    block_size: int = 16
    num_blocks: int = 4096
    max_waiting: int = 1024
    script: Callable[[EngineRequest], list[int]] | None = None
    step_delay_s: float = 0.0
    eos_token_ids: tuple = ()  # the end-of-answer ids of a scripted engine (a model engine reads its model's)
    waiting: deque = field(default_factory=deque)
    running: dict = field(default_factory=dict)
    finished_aborts: list = field(default_factory=list)
    generated_tokens: int = 0
    requests_seen: list = field(default_factory=list)

    def add_request(self, request: EngineRequest) -> None:
        if self.max_model_len is not None and len(request.prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt_ids: the prompt is {len(request.prompt_ids)} tokens, max_model_len is "
                             f"{self.max_model_len}")
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are waiting")
        self.requests_seen.append(request)
        self.waiting.append(_Running(request))

    def abort(self, request_id: str) -> None:
        for item in list(self.waiting):
            if item.request.request_id == request_id:
                self.waiting.remove(item)
                self.finished_aborts.append((request_id, item))
        if request_id in self.running:
            self.finished_aborts.append((request_id, self.running.pop(request_id)))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.finished_aborts)

    def stats(self) -> dict[str, float]:
        used = sum(math.ceil((len(r.request.prompt_ids) + r.sent) / self.block_size) for r in self.running.values())
        return {"running": len(self.running), "waiting": len(self.waiting), "kv_blocks_used": used,
                "kv_blocks_total": self.num_blocks, "prefix_cache_queries": 0, "prefix_cache_hits": 0,
                "generated_tokens": self.generated_tokens, "preemptions": 0}

    def step(self) -> list[tuple[str, TokenEvent]]:
        if self.step_delay_s:
            import time

            time.sleep(self.step_delay_s)
        events = [(request_id, TokenEvent(None, finish_reason="abort", prompt_tokens=len(item.request.prompt_ids)))
                  for request_id, item in self.finished_aborts]
        self.finished_aborts.clear()
        while self.waiting and len(self.running) < self.max_batch:
            item = self.waiting.popleft()
            self.running[item.request.request_id] = item
        for request_id, item in list(self.running.items()):
            if item.tokens is None:
                item.tokens = self._tokens(item.request)
            event = item.tokens[item.sent]
            item.sent += 1
            self.generated_tokens += 1
            events.append((request_id, event))
            if event.finish_reason is not None:
                del self.running[request_id]
        return events

    # -- the tokens of one request --

    def _tokens(self, request: EngineRequest) -> list[TokenEvent]:
        sampling = request.sampling
        eos = set(model_eos_ids(self.model)) if self.model is not None else set(self.eos_token_ids)
        stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else eos)
        if self.script is not None:
            ids, logprobs = self.script(request), None
        else:
            ids, logprobs = self._generate(request, sorted(stop_ids))
        events = []
        prompt_tokens = len(request.prompt_ids)
        for position, token in enumerate(ids):
            logprob, top = (None, None) if logprobs is None else logprobs[position]
            events.append(TokenEvent(token, logprob=logprob, top_logprobs=top, prompt_tokens=prompt_tokens))
            if token in stop_ids or len(events) == sampling.max_tokens:
                break
        constraint_done = self.script is None and request.constraint is not None and request.constraint.is_finished()
        if events:
            events[-1].finish_reason = "stop" if events[-1].token_id in stop_ids or constraint_done else "length"
        return events

    def _generate(self, request: EngineRequest, stop_ids: list[int]):
        sampling = request.sampling
        prompt = torch.tensor([request.prompt_ids])
        kwargs: dict = dict(max_new_tokens=sampling.max_tokens, return_dict_in_generate=True, output_logits=True,
                            eos_token_id=stop_ids or None, pad_token_id=stop_ids[0] if stop_ids else 0)
        if sampling.temperature == 0:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k or None, min_p=sampling.min_p or None)
        if sampling.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = sampling.repetition_penalty
        processors, criteria = [], []
        if sampling.presence_penalty or sampling.frequency_penalty:
            processors.append(_OpenAIPenalties(prompt.shape[1], sampling.presence_penalty, sampling.frequency_penalty))
        if request.constraint is not None:
            constrained = _Constrained(request.constraint, prompt.shape[1])
            processors.append(constrained)
            criteria.append(_ConstraintDone(constrained))
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        with torch.inference_mode():
            out = self.model.generate(prompt, generator=generator, logits_processor=LogitsProcessorList(processors),
                                      stopping_criteria=StoppingCriteriaList(criteria), **kwargs,
                                      **(request.model_inputs or {}))
        ids = out.sequences[0, prompt.shape[1]:].tolist()
        logprobs = None
        if sampling.logprobs is not None:
            logprobs = []
            for token, logits in zip(ids, out.logits):
                row = torch.log_softmax(logits[0].float(), dim=-1)
                top = row.topk(sampling.logprobs) if sampling.logprobs else None
                logprobs.append((row[token].item(), [] if top is None else
                                 list(zip(top.indices.tolist(), top.values.tolist()))))
        return ids, logprobs


class FakeAsyncEngine:
    """The contract's AsyncEngine over any Engine-like object: step() in a background thread."""

    def __init__(self, engine):
        self._engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def engine(self):
        return self._engine

    async def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fake-engine")
        self._thread.start()

    async def stop(self) -> None:
        with self._lock:
            for request_id in list(self._queues):
                self._engine.abort(request_id)
        self._wake.set()
        self._stopping = True
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)

    def stats(self) -> dict[str, float]:
        with self._lock:
            return self._engine.stats()

    def _loop(self) -> None:
        while not self._stopping or self._engine.has_work():
            with self._lock:
                events = self._engine.step() if self._engine.has_work() else None
            if events is None:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            for request_id, event in events:
                target = self._queues.get(request_id)
                if target is not None:
                    target[0].call_soon_threadsafe(target[1].put_nowait, event)

    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenEvent]:
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._engine.add_request(request)  # QueueFull / ValueError at the first __anext__
            self._queues[request.request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while True:
                event = await queue.get()
                if event.finish_reason is not None:
                    finished = True
                yield event
                if finished:
                    return
        finally:
            # (no await here: this runs inside a cancelled scope when the client went away)
            with self._lock:
                self._queues.pop(request.request_id, None)
                if not finished:
                    self._engine.abort(request.request_id)
            self._wake.set()
