"""A scripted stand-in for serving/engine.py's Engine and AsyncEngine (the contract's interface),
for the API tests that need an exact answer (a tool call in a given format, a failing step).

FakeEngine's tokens come from `script(request)`, handed out one per step() interleaved with the
other running requests, so that the server sees what the real engine gives: token events, finish
reasons, aborts freeing "blocks", a bounded waiting queue. FakeAsyncEngine drives it from a
background thread. The tests of real answers run on the real Engine (conftest.engine_server).
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from herd.serving.engine import EngineRequest, QueueFull, TokenEvent


@dataclass
class _Running:
    request: EngineRequest
    tokens: list[TokenEvent] | None = None
    sent: int = 0


@dataclass
class FakeEngine:
    script: Callable[[EngineRequest], list[int]] = lambda request: []
    max_batch: int = 256
    max_model_len: int | None = None
    block_size: int = 16
    num_blocks: int = 4096
    max_waiting: int = 1024
    step_delay_s: float = 0.0
    eos_token_ids: tuple = ()  # end of answer (unless ignore_eos)
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
        stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.eos_token_ids))
        events = []
        for token in self.script(request):
            events.append(TokenEvent(token, prompt_tokens=len(request.prompt_ids)))
            if sampling.logprobs is not None:  # made-up values: the n-th token's is -n/8, alone in its top list
                logprob = -len(events) / 8
                events[-1].logprob, events[-1].top_logprobs = logprob, [(token, logprob)][: sampling.logprobs]
            if token in stop_ids or len(events) == sampling.max_tokens:
                break
        if events:
            events[-1].finish_reason = "stop" if events[-1].token_id in stop_ids else "length"
            if getattr(sampling, "prompt_logprobs", None) is not None:  # the same made-up rule over the prompt
                events[0].prompt_logprobs = [None] + [(-n / 8, [(token, -n / 8)][: sampling.prompt_logprobs])
                                                      for n, token in enumerate(request.prompt_ids[1:], 1)]
        return events


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
