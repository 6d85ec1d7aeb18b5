"""The serving engine: many requests at once over one model, token ids in, token events out.

`Engine` is synchronous: one thread calls `step()`, which schedules (serving/scheduler.py: decode
rows, prefill chunks, preemption, prefix reuse), runs the model over the paged store
(serving/paged.py), chooses each row's token (serving/sampling.py) and returns what happened as
(request_id, TokenEvent) pairs. `add_request` and `abort` may be called from other threads.
`AsyncEngine` drives `step()` in a background thread for asyncio code (the HTTP server).

Text-level matters (chat templates, detokenizing, stop strings, n > 1, tool calls, grammars) are
the API's (serving/server.py); the engine works on token ids. A greedy request (temperature 0)
gets exactly model.generate()'s greedy tokens for the same prompt, whatever else is batched with
it (float32).
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..cache import FP8_KV_DTYPE, KV_CACHE_DTYPES
from ..cache import kv_cache_dtype as storage_dtype
from ..decoding.plans import CHUNKED, FULL
from .paged import PagedRunner, PrefillWork, prefill_batches
from .parallel import agreed_block_count
from .sampling import Choice, Drawn, SamplingRow, choose, draw, draws_on_device
from .scheduler import PLACEHOLDER, Scheduler, Sequence

DEFAULT_MAX_MODEL_LEN = 32768  # when the config allows more (Llama 4 says 10M): the block tables' width
CUDA_MEMORY_FRACTION = 0.9  # of the free GPU memory after loading, for the KV pools when num_blocks is not given
CPU_DEFAULT_ROWS = 16  # without num_blocks off the GPU: pools for this many requests of max_model_len
MLLAMA_IMAGE_ROWS = 8  # Llama 3.2 Vision: requests with images running at once (their image keys/values)
MLLAMA_MAX_IMAGES = 2  # Llama 3.2 Vision: images per request (each up to max_num_tiles tiles)
# prompt tokens per step: 256 prompts of 512 tokens into the 8B took 7.43 s at 2048 a step and 7.04 at
# 8192 (H200, bench/RESULTS.md 2026-12-01), vLLM's throughput default; fewer keep running answers flowing
DEFAULT_PREFILL_TOKENS = 8192
PROMPT_LOGPROB_ROWS = 256  # prompt positions whose log-softmax is taken at once (prompt logprobs)


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off
    min_p: float = 0.0
    seed: int | None = None  # same request + same seed -> same tokens, whatever else is batched with it
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0  # OpenAI semantics (over generated tokens)
    repetition_penalty: float = 1.0  # transformers' semantics (over prompt + generated)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k best
    stop_token_ids: tuple[int, ...] = ()  # ends with finish_reason "stop" (eos ids of the model are added unless ignore_eos)
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the model's logits first (OpenAI's)
    # None: none; k >= 0: each prompt token's logprob and the k best at its position, from the model's
    # own log-softmax (no bias, penalty or temperature: what the model thinks of the text, as vLLM's
    # prompt_logprobs), on the first token's event. Such a prompt is not read from the prefix cache.
    prompt_logprobs: int | None = None


class TokenConstraint(Protocol):
    """Structured output: which tokens may come next (the API implements it with a grammar library)."""

    def fill_allowed(self, allowed: torch.Tensor) -> None: ...  # allowed: bool (vocab,) on CPU, all True on entry

    def accept(self, token_id: int) -> None: ...

    def is_finished(self) -> bool: ...  # the engine ends the request with "stop" once True


@dataclass
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    model_inputs: dict[str, Any] | None = None  # one request's image tensors as the processor returns them, batch 1
    constraint: TokenConstraint | None = None


@dataclass
class TokenEvent:
    token_id: int | None  # None only on a final event without a token (abort)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    # with sampling.prompt_logprobs, on the first token's event: per prompt token (logprob, [(id,
    # logprob) of the k best]), None for the first token (nothing comes before it)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    error: str | None = None  # finish_reason "error": what failed (its step's model run, its grammar)


class QueueFull(Exception):
    """add_request when the waiting queue is full (the API answers 429)."""


def _eos_ids(model) -> frozenset[int]:
    """Every id of the eos list in generation_config (Llama 3 Instruct ends turns with <|eot_id|>,
    one of three), else the config's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config.get_text_config(), "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _image_family(model) -> str | None:
    """"llama4" or "mllama" for the classes that take images, None for text-only ones."""
    from ..models.llama4 import Llama4ForConditionalGeneration
    from ..models.mllama import MllamaForConditionalGeneration

    if isinstance(model, Llama4ForConditionalGeneration):
        return "llama4"
    if isinstance(model, MllamaForConditionalGeneration):
        return "mllama"
    return None


@dataclass
class _Pending:
    """What the engine thread picks up at its next step."""

    sequences: deque = field(default_factory=deque)
    events: list = field(default_factory=list)


@dataclass
class _InFlight:
    """A step's tokens (and logprobs) still on their way from the GPU (async scheduling): `drawn` on
    the device, whose tokens the next step's decode reads for these rows; `host` its copy (pinned)
    once `ready` has passed; `rows` each row's sequence and the index of its placeholder in
    sequence.tokens."""

    drawn: Drawn
    host: Drawn
    ready: Any  # torch.cuda.Event, or None on the CPU (host is drawn itself)
    samplings: list[SamplingRow]
    rows: list[tuple[Sequence, int]]
    row_of: dict[int, int]  # id(sequence) -> its row in drawn.tokens

    @classmethod
    def launch(cls, drawn: Drawn, samplings: list[SamplingRow], sequences: list[Sequence]) -> _InFlight:
        host, ready = drawn, None
        if drawn.tokens.is_cuda:
            copies = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in drawn.tensors()]
            for copy, tensor in zip(copies, drawn.tensors()):
                copy.copy_(tensor, non_blocking=True)
            host = drawn.with_tensors(copies)
            ready = torch.cuda.Event()
            ready.record()
        rows = []
        for sequence in sequences:
            rows.append((sequence, len(sequence.tokens)))
            sequence.tokens.append(PLACEHOLDER)
        return cls(drawn, host, ready, samplings, rows, {id(sequence): row for row, sequence in enumerate(sequences)})

    def choices(self) -> list[Choice]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.choices(self.samplings)


def kv_block_bytes(text_config, block_size: int, dtype: torch.dtype, kv_cache_dtype: torch.dtype | None = None,
                   tp_size: int = 1) -> dict[str, int]:
    """Bytes of one block in one layer, per paged kind: keys and values of `block_size` positions
    of this rank's kv heads in `dtype`. With the FP8 KV cache a full-attention layer's are one byte
    per element and a float32 scale per head of each position (half the bytes, plus 4 per
    head_dim: 3% at head_dim 128); the chunked layers' windows stay in `dtype`."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    heads = 2 * (text_config.num_key_value_heads // tp_size) * block_size  # keys and values, every position
    plain = heads * head_dim * dtype.itemsize
    fp8 = heads * (head_dim * FP8_KV_DTYPE.itemsize + torch.float32.itemsize)
    return {FULL: fp8 if kv_cache_dtype == FP8_KV_DTYPE else plain, CHUNKED: plain}


def pool_blocks(budget: float, layers: dict[str, int], block_bytes: dict[str, int], window_blocks: int) -> int:
    """Blocks of the full-attention pool that `budget` bytes hold, with `layers` layers of each kind
    taking `block_bytes` per block each; the chunked layers' pool (at most `window_blocks` blocks)
    is taken first where there is room for it, else both pools get as many."""
    full_bytes = block_bytes[FULL] * layers.get(FULL, 0)
    window_bytes = block_bytes[CHUNKED] * layers.get(CHUNKED, 0)
    if window_bytes and budget > window_blocks * (full_bytes + window_bytes):
        return int((budget - window_blocks * window_bytes) // max(full_bytes, 1))
    return int(budget // max(full_bytes + window_bytes, 1))


class Engine:
    """Continuous batching over a paged KV store (synchronous core; one thread drives step()).

    `kv_cache_dtype` "fp8" (or another of cache.KV_CACHE_DTYPES' spellings): the FP8 KV cache in
    the full-attention pools, e4m3 keys/values with a float32 scale per head of each position
    (generate()'s cache_config={"dtype": "fp8"}: a greedy request gets its tokens), about twice the
    blocks in the same memory."""

    def __init__(self, model, *, max_batch: int = 256, max_model_len: int | None = None, block_size: int = 16,
                 num_blocks: int | None = None, max_waiting: int = 1024, prefill_chunk: int = DEFAULT_PREFILL_TOKENS,
                 kv_cache_dtype: str | torch.dtype | None = None, async_scheduling: bool | None = None):
        for name, value in (("max_batch", max_batch), ("block_size", block_size), ("max_waiting", max_waiting),
                            ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        try:
            self.kv_cache_dtype = storage_dtype(kv_cache_dtype)
        except ValueError:
            raise ValueError(f"kv_cache_dtype (herd serve --kv-cache-dtype) {kv_cache_dtype!r} is not supported: use "
                             f"{' / '.join(KV_CACHE_DTYPES)} (FP8 e4m3 keys/values with a scale per head) or leave it "
                             "unset (the model's dtype)") from None
        self.model = model.eval()
        text_config = model.config.get_text_config()
        self.vocab_size = text_config.vocab_size
        # prompt ids may go past the head's rows (Mllama's <|image|> is one past them): the embedding's size
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.input_ids_limit = getattr(embeddings, "num_embeddings", None) or self.vocab_size
        limit = getattr(text_config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        self.max_model_len = max_model_len or min(limit, DEFAULT_MAX_MODEL_LEN)
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        self.block_size, self.max_batch = block_size, max_batch
        self.eos_ids = _eos_ids(model)
        self.image_family = _image_family(model)
        table_width = -(-self.max_model_len // block_size)
        layers = PagedRunner.layers_of(model)
        chunk_size = getattr(text_config, "attention_chunk_size", None) if CHUNKED in layers else None
        window_per_row = 0
        if chunk_size is not None:  # a chunked layer holds at most a chunk and a prefill chunk per request
            window_per_row = -(-(chunk_size + prefill_chunk) // block_size) + 1
        if num_blocks is None:
            num_blocks = self._default_blocks(layers, table_width, max_batch * window_per_row)
        num_blocks = agreed_block_count(model, num_blocks)  # tensor parallel: the same pools on every rank
        needed = min(table_width, window_per_row) if FULL not in layers else table_width
        if num_blocks < needed:
            raise ValueError(f"num_blocks={num_blocks} cannot hold one request of max_model_len={self.max_model_len} "
                             f"({needed} blocks of {block_size}): raise num_blocks or lower max_model_len")
        blocks = {kind: num_blocks if kind == FULL else min(num_blocks, max_batch * window_per_row) for kind in layers}
        image_rows, self.image_tokens_per_request = 0, 0
        if self.image_family == "mllama":
            vision = model.config.vision_config
            self.tokens_per_tile = (vision.image_size // vision.patch_size) ** 2 + 1  # patches and the class token
            self.image_tokens_per_request = MLLAMA_MAX_IMAGES * vision.max_num_tiles * self.tokens_per_tile
            image_rows = min(max_batch, MLLAMA_IMAGE_ROWS)
        self.runner = PagedRunner(model, max_rows=max_batch, block_size=block_size, blocks=blocks,
                                  table_width=table_width, image_rows=image_rows,
                                  image_tokens=self.image_tokens_per_request, kv_cache_dtype=self.kv_cache_dtype)
        self.scheduler = Scheduler(kinds=list(blocks), num_blocks=blocks, block_size=block_size, max_batch=max_batch,
                                   prefill_chunk=prefill_chunk, chunk_size=chunk_size, max_waiting=max_waiting,
                                   image_slots=image_rows)
        self.max_waiting = max_waiting
        if async_scheduling is None:  # on a GPU, without tensor parallel (the followers need the tokens)
            async_scheduling = model.device.type == "cuda" and (getattr(model, "tp_size", None) or 1) == 1
        self.async_scheduling = async_scheduling
        self._in_flight: _InFlight | None = None
        self.sequences: dict[str, Sequence] = {}
        self.generated_tokens = 0
        self._pending = _Pending()
        self._inbox_lock = threading.Lock()  # add_request from other threads
        self._lock = threading.RLock()  # the scheduler: step() and abort()

    def _default_blocks(self, layers: dict[str, int], table_width: int, window_blocks: int) -> int:
        """Blocks of the full-attention pool: on CUDA what fits in CUDA_MEMORY_FRACTION of the free
        memory (the chunked layers' pool, at most `window_blocks`, taken first; `pool_blocks`), in
        FP8 with the FP8 KV cache; elsewhere enough for CPU_DEFAULT_ROWS requests of max_model_len."""
        model = self.model
        if model.device.type != "cuda":
            return min(self.max_batch, CPU_DEFAULT_ROWS) * table_width
        block_bytes = kv_block_bytes(model.config.get_text_config(), self.block_size, model.dtype, self.kv_cache_dtype,
                                     getattr(model, "tp_size", None) or 1)  # this rank's share of the kv heads
        free, _ = torch.cuda.mem_get_info(model.device)
        return pool_blocks(free * CUDA_MEMORY_FRACTION, layers, block_bytes, window_blocks)

    def warm_up(self, progress=None) -> None:
        """Compile and capture the decode step of every batch bucket before the first request (on
        the GPU each takes seconds; a server calls this while it still answers 503). `progress`:
        called with (bucket, its index, how many) before each."""
        runner = self.runner  # under --tp the Leader: the followers capture the same buckets
        buckets, kinds = runner.buckets(), list(runner.layers_by_kind)
        with self._lock:
            for index, rows in enumerate(buckets):
                if progress is not None:
                    progress(rows, index, len(buckets))
                # padding rows alone: they write to block 0, which no request holds
                runner.decode([0] * rows, [0] * rows, {kind: [0] * rows for kind in kinds},
                              {kind: [[0]] * rows for kind in kinds}, {kind: [0] * rows for kind in kinds})

    # --- requests ------------------------------------------------------------------------------

    def _check(self, request: EngineRequest) -> None:
        if not isinstance(request.request_id, str) or not request.request_id:
            raise ValueError("request_id must be a non-empty string")
        prompt = request.prompt_ids
        if not prompt:
            raise ValueError("prompt_ids is empty: give at least one token")
        if any(not isinstance(t, int) or t < 0 or t >= self.input_ids_limit for t in prompt):
            raise ValueError(f"prompt_ids holds ids outside the vocabulary [0, {self.input_ids_limit})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt_ids has {len(prompt)} tokens; max_model_len is {self.max_model_len} "
                             f"(with room for at least one new token): shorten the prompt")
        params = request.sampling
        checks = [
            ("max_tokens", isinstance(params.max_tokens, int) and params.max_tokens >= 1, "an integer >= 1"),
            ("temperature", params.temperature >= 0, ">= 0"),
            ("top_p", 0 < params.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(params.top_k, int) and params.top_k >= 0, "an integer >= 0 (0: off)"),
            ("min_p", 0 <= params.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", params.repetition_penalty > 0, "> 0"),
            ("logprobs", params.logprobs is None or (isinstance(params.logprobs, int)
                                                     and 0 <= params.logprobs <= self.vocab_size), "None or >= 0"),
            ("prompt_logprobs", params.prompt_logprobs is None or (
                isinstance(params.prompt_logprobs, int) and 0 <= params.prompt_logprobs <= self.vocab_size),
             "None or >= 0"),
            ("stop_token_ids", all(isinstance(t, int) for t in params.stop_token_ids), "token ids"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"sampling.{name} must be {expected}, got {getattr(params, name)!r}")
        if request.model_inputs:
            if self.image_family is None:
                raise ValueError(f"model_inputs: {type(self.model).__name__} is a text-only model; send text only")
            if self.image_family == "mllama":
                pixels = request.model_inputs.get("pixel_values")
                if pixels is None or pixels.dim() != 6 or pixels.shape[0] != 1:
                    raise ValueError("model_inputs: Llama 3.2 Vision takes pixel_values (1, images, tiles, 3, height, "
                                     "width) with aspect_ratio_ids, aspect_ratio_mask and cross_attention_mask, as "
                                     "MllamaProcessor returns them for one request")
                if pixels.shape[1] * pixels.shape[2] * self.tokens_per_tile > self.image_tokens_per_request:
                    raise ValueError(f"model_inputs: at most {MLLAMA_MAX_IMAGES} images per request are served for "
                                     f"Llama 3.2 Vision, got {pixels.shape[1]}")

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; ValueError (naming the field) for a bad one, QueueFull when the waiting
        queue is full."""
        self._check(request)
        params = request.sampling
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.model.device)
            generator.manual_seed(params.seed if params.seed is not None else random.SystemRandom().getrandbits(63))
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        prompt_length = len(request.prompt_ids)
        sequence = Sequence(request=request, arrival=0, tokens=list(request.prompt_ids), prompt_length=prompt_length,
                            generator=generator, stop_ids=stop_ids,
                            limit=min(prompt_length + params.max_tokens, self.max_model_len))
        with self._inbox_lock:
            if request.request_id in self.sequences:
                raise ValueError(f"request_id {request.request_id!r} is already running: ids must be unique")
            if len(self._pending.sequences) + len(self.scheduler.waiting) >= self.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests): retry later")
            self.sequences[request.request_id] = sequence
            self._pending.sequences.append(sequence)

    def abort(self, request_id: str) -> None:
        """Stop a request now: its blocks go back at once; the next step() returns its final
        "abort" event. Unknown or finished ids are ignored."""
        with self._lock, self._inbox_lock:
            sequence = self.sequences.pop(request_id, None)
            if sequence is None:
                return
            if sequence in self._pending.sequences:
                self._pending.sequences.remove(sequence)
            else:
                self.scheduler.remove(sequence)
            self._pending.events.append((request_id, self._event(sequence, None, "abort")))

    def has_work(self) -> bool:
        return bool(self._pending.sequences or self._pending.events or self.scheduler.waiting or self.scheduler.running
                    or self._in_flight is not None)

    def stats(self) -> dict[str, float]:
        stats = self.scheduler.stats()
        stats["waiting"] += len(self._pending.sequences)
        stats["generated_tokens"] = self.generated_tokens
        return stats

    # --- one step ------------------------------------------------------------------------------

    def _event(self, sequence: Sequence, choice, finish_reason: str | None):
        prompt_logprobs = None
        if choice and sequence.request.sampling.prompt_logprobs is not None and not sequence.prompt_logprobs_sent:
            prompt_logprobs = [None, *sequence.prompt_logprobs]
            sequence.prompt_logprobs_sent = True
        return TokenEvent(token_id=choice.token_id if choice else None,
                          logprob=choice.logprob if choice else None,
                          top_logprobs=choice.top_logprobs if choice else None,
                          finish_reason=finish_reason, prompt_tokens=sequence.prompt_length,
                          cached_prompt_tokens=sequence.cached_tokens, prompt_logprobs=prompt_logprobs)

    def _collect_prompt_logprobs(self, sequence: Sequence, start: int, logits: torch.Tensor) -> None:
        """The prompt entries a chunk's logits give: the logits at position p (p = start, ...) are the
        model's prediction of token p + 1; the positions already collected (a chunk computed again
        after a preemption) and the prompt's last position (it predicts the first new token) are
        skipped. Log-softmax in slices of PROMPT_LOGPROB_ROWS positions (a float32 copy of a whole
        chunk's logits would be prefill_chunk x vocab x 4 bytes)."""
        collected, k = sequence.prompt_logprobs, sequence.request.sampling.prompt_logprobs
        first, end = len(collected), min(start + logits.shape[0], sequence.prompt_length - 1)
        if first < start:
            raise RuntimeError(f"prompt logprobs of positions {first}..{start - 1} were never computed")
        vocab = logits.shape[1]
        for piece in range(first, end, PROMPT_LOGPROB_ROWS):
            stop = min(piece + PROMPT_LOGPROB_ROWS, end)
            rows = logits[piece - start : stop - start].float().log_softmax(dim=-1)
            targets = torch.tensor(sequence.tokens[piece + 1 : stop + 1], device=rows.device)
            inside = targets < vocab  # Mllama's <|image|> is past the head's rows: no logprob of its own
            own = rows.gather(1, targets.clamp(max=vocab - 1)[:, None]).squeeze(1)
            own = own.masked_fill(~inside, float("-inf")).tolist()
            values, ids = rows.topk(k, dim=-1) if k else (rows[:, :0], rows[:, :0].long())
            for logprob, top_ids, top_values in zip(own, ids.tolist(), values.tolist()):
                collected.append((logprob, list(zip(top_ids, top_values))))

    def step(self) -> list[tuple[str, TokenEvent]]:
        """One scheduler iteration: a token for every running request past its prompt, the next
        prompt chunks, and the events of what happened (aborts since the last step first).

        With async scheduling a step whose rows all draw on the device (sampling.draws_on_device)
        leaves its tokens on the GPU: each sequence gets a placeholder, the next step's decode
        reads the token from the device, and that next step, once it has launched its own work,
        waits for these tokens and returns their events. The GPU runs one step while the host
        finishes the one before; a request that stops (an eos) has one more row computed and
        dropped. Steps with other rows wait for the tokens before them and return their own."""
        with self._lock:
            with self._inbox_lock:
                events, self._pending.events = self._pending.events, []
                while self._pending.sequences:
                    self.scheduler.add(self._pending.sequences.popleft())
            plan = self.scheduler.schedule()
            scheduler, runner = self.scheduler, self.runner
            sampled: list[Sequence] = []
            logits = []
            if plan.decode:
                images = [(s.image_slot, s.image_tokens) if s.image_tokens else None for s in plan.decode]
                try:
                    logits.append(runner.decode(*scheduler.decode_inputs(plan.decode), images=images,
                                                carried=self._carried(plan.decode)))
                except Exception as error:  # noqa: BLE001 - the rows of this run fail, the engine goes on
                    events += [self._fail(sequence, error) for sequence in plan.decode]
                else:
                    for sequence in plan.decode:
                        sequence.computed += 1
                        scheduler.after_compute(sequence)
                    sampled += plan.decode
            works = []
            for chunk in plan.prefill:
                sequence = chunk.sequence
                slots, kept_from = scheduler.prefill_slots(chunk)
                works.append(PrefillWork(sequence.tokens[: chunk.end], chunk.start, slots, kept_from,
                                         sequence.request.model_inputs if chunk.start == 0 else None,
                                         sequence.image_slot, every_logits=sequence.needs_prompt_logits))
            prefilled = [None] * len(works)
            for batch in prefill_batches(works):
                try:
                    for index, result in zip(batch, runner.prefill([works[i] for i in batch])):
                        prefilled[index] = result
                except Exception as error:  # noqa: BLE001 - this batch's requests fail, the others go on
                    events += [self._fail(plan.prefill[index].sequence, error) for index in batch]
            for chunk, result in zip(plan.prefill, prefilled):
                sequence = chunk.sequence
                if result is None:  # failed above
                    continue
                if result.image_tokens is not None:
                    sequence.image_tokens = result.image_tokens
                if result.every is not None:
                    self._collect_prompt_logprobs(sequence, chunk.start, result.every)
                sequence.computed = chunk.end
                scheduler.after_compute(sequence)
                if chunk.finishes_prompt:
                    logits.append(result.logits[None])
                    sampled.append(sequence)
            launched = None
            rows = [SamplingRow(s.request.sampling, s.tokens, s.prompt_length, s.generator, s.request.constraint)
                    for s in sampled]
            if rows and self.async_scheduling and all(draws_on_device(row) for row in rows):
                launched = _InFlight.launch(draw(torch.cat(logits), rows), rows, sampled)
            events += self._settle()  # the step before's tokens (its GPU work is done or nearly)
            self._in_flight = launched
            if rows and launched is None:
                choices = choose(torch.cat(logits), rows)
                for sequence, choice in zip(sampled, choices):
                    if not self._is_live(sequence):  # ended by the tokens just settled (an eos)
                        continue
                    events.append(self._fail(sequence, choice.error) if choice.error is not None
                                  else (sequence.request_id, self._advance(sequence, choice)))
            return events

    def _is_live(self, sequence: Sequence) -> bool:
        return self.sequences.get(sequence.request_id) is sequence

    def _carried(self, sequences: list[Sequence]) -> tuple[torch.Tensor, list[int]] | None:
        """For a decode over `sequences`: the tokens of the step in flight (on the device) and, per
        row, the row of it holding this row's token (-1: the token is on the host)."""
        in_flight = self._in_flight
        if in_flight is None:
            return None
        sources = [in_flight.row_of[id(s)] if s.tokens[s.computed] == PLACEHOLDER else -1 for s in sequences]
        return in_flight.drawn.tokens, sources

    def _settle(self) -> list[tuple[str, TokenEvent]]:
        """The tokens of the step in flight into their sequences (waiting for them) and their events;
        sequences aborted or ended since are skipped."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return []
        events = []
        for (sequence, index), choice in zip(in_flight.rows, in_flight.choices()):
            if not self._is_live(sequence):
                continue
            sequence.tokens[index] = choice.token_id
            if sequence.blocks:  # (not when preempted since) blocks whose last token this was are registered now
                self.scheduler.after_compute(sequence)
            events.append((sequence.request_id, self._conclude(sequence, choice, index + 1)))
        return events

    def _conclude(self, sequence: Sequence, choice: Choice, length: int, constraint_done: bool = False) -> TokenEvent:
        """The event of a token now in sequence.tokens, whose first `length` tokens are its own; ends
        the sequence at a stop token, a finished constraint or its length limit."""
        self.generated_tokens += 1
        finish = None
        if choice.token_id in sequence.stop_ids or constraint_done:
            finish = "stop"
        elif length >= sequence.limit:
            finish = "length"
        if finish is not None:
            self._finish(sequence)
        return self._event(sequence, choice, finish)

    def _finish(self, sequence: Sequence) -> None:
        with self._inbox_lock:
            self.sequences.pop(sequence.request_id, None)
        self.scheduler.remove(sequence)

    def _fail(self, sequence: Sequence, error: Exception) -> tuple[str, TokenEvent]:
        """End a request whose own part of a step failed (its batch's model run, its constraint):
        its blocks go back, its final event says why; the engine and the other requests go on."""
        self._finish(sequence)
        event = self._event(sequence, None, "error")
        event.error = f"{type(error).__name__}: {error}"
        return sequence.request_id, event

    def _advance(self, sequence: Sequence, choice) -> TokenEvent:
        """The chosen token into the sequence; ends it where a stop condition holds."""
        token = choice.token_id
        constraint = sequence.request.constraint
        if constraint is not None:
            try:
                constraint.accept(token)
            except Exception as error:  # noqa: BLE001 - a grammar that fails ends its own request only
                return self._fail(sequence, error)[1]
        sequence.tokens.append(token)
        return self._conclude(sequence, choice, len(sequence.tokens),
                              constraint_done=constraint is not None and constraint.is_finished())

    def run_to_completion(self) -> dict[str, list[TokenEvent]]:
        """Step until every queued request is done; each request's events (a convenience for
        offline use and tests)."""
        results: dict[str, list[TokenEvent]] = {}
        while self.has_work():
            for request_id, event in self.step():
                results.setdefault(request_id, []).append(event)
        return results


class RequestStream:
    """One request's events as an async iterator (also awaitable, giving itself). Leaving it
    early (aclose, cancellation, or dropping it) aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self._engine, self.request_id, self._queue = engine, request_id, queue
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    def __await__(self):
        async def itself():
            return self

        return itself().__await__()

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except BaseException:  # cancelled: the client is gone
            self.aclose_now()
            raise
        if isinstance(event, BaseException):
            self._done = True
            raise event
        if event.finish_reason is not None:
            self._done = True
        return event

    def ready(self) -> bool:
        """Whether the next event is already here (the reader can take it without waiting)."""
        return not self._done and not self._queue.empty()

    def aclose_now(self) -> None:
        if not self._done:
            self._done = True
            self._engine._abort_soon(self.request_id)

    async def aclose(self) -> None:
        self.aclose_now()

    def __del__(self):
        if not self._done and self._engine is not None:
            self._engine._abort_soon(self.request_id)


class AsyncEngine:
    """Engine.step() in a background thread; requests as async iterators of TokenEvents."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._streams: dict[str, asyncio.Queue] = {}
        self._aborts: deque[str] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def engine(self) -> Engine:
        return self._engine

    def stats(self) -> dict[str, float]:
        return self._engine.stats()

    async def start(self) -> None:
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._thread = threading.Thread(target=self._drive, name="herd-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Abort every request in flight (each stream ends with its "abort" event), then stop."""
        for request_id in list(self._streams):
            self._abort_soon(request_id)
        for _ in range(200):  # the abort events reach the streams within a step or two
            if not self._streams:
                break
            await asyncio.sleep(0.01)
        self._running = False
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    def generate(self, request: EngineRequest) -> RequestStream:
        """The request's events, as `async for event in engine.generate(request)`; raises
        QueueFull / ValueError at once."""
        if not self._running:
            raise RuntimeError("AsyncEngine.start() must run before generate()")
        if request.request_id in self._streams:
            raise ValueError(f"request_id {request.request_id!r} is already running: ids must be unique")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = queue
        try:
            self._engine.add_request(request)
        except BaseException:
            del self._streams[request.request_id]
            raise
        self._wake.set()
        return RequestStream(self, request.request_id, queue)

    def _abort_soon(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._wake.set()

    def _drive(self) -> None:
        engine = self._engine
        while self._running:
            while self._aborts:
                engine.abort(self._aborts.popleft())
            if not engine.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                events = engine.step()
            except Exception as error:  # the scheduler itself failed (a request's own failure is its event)
                self._loop.call_soon_threadsafe(self._fail_all, error)
                for request_id in list(engine.sequences):
                    engine.abort(request_id)
                continue
            if events:
                self._loop.call_soon_threadsafe(self._dispatch, events)

    def _dispatch(self, events: list[tuple[str, TokenEvent]]) -> None:
        for request_id, event in events:
            queue = self._streams.get(request_id)
            if queue is not None:
                failed = event.finish_reason == "error"
                queue.put_nowait(RuntimeError(f"the request failed: {event.error}") if failed else event)
                if event.finish_reason is not None:
                    del self._streams[request_id]

    def _fail_all(self, error: Exception) -> None:
        for request_id, queue in list(self._streams.items()):
            queue.put_nowait(RuntimeError(f"the engine failed: {error}"))
            del self._streams[request_id]


__all__ = ["AsyncEngine", "Engine", "EngineRequest", "QueueFull", "SamplingParams", "TokenConstraint", "TokenEvent"]
