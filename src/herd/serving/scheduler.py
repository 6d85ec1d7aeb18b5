"""Continuous batching: which requests run this step, and which blocks hold their keys/values.

Each step runs every running request that is past its prompt for one token (a decode row) and,
within `prefill_chunk` tokens of prompt per step, the next chunk of prompts being prefilled:
first the requests already started, then waiting ones in arrival order (up to `max_batch`
running). A waiting request first takes the blocks of its prompt's longest cached prefix
(serving/paged.BlockPool: whole blocks, at least one token left to compute).

When a decode row needs a block and none is left (free or cached), the newest running request
is preempted (and nothing new is admitted in that step): its blocks are released (those full of tokens stay cached) and it goes back to the
front of the queue with its generated tokens, to be prefilled again later (recompute): greedy
requests give the same tokens, seeded ones keep their generator.

Llama 4's chunked-attention layers keep their own block table from a second pool: a query
sees only positions of its own attention chunk, so the blocks before the current chunk's start
are released as soon as the request moves past it; a request never holds more than
attention_chunk_size + prefill_chunk positions there. Those blocks are not cached: a prefix hit
is rounded down to a whole number of attention chunks, where the chunked layers need nothing
from before it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..decoding.plans import CHUNKED, FULL
from .paged import BlockPool, block_digest

# a generated token still on the GPU (the engine's async scheduling): the next decode step reads it
# there; the engine writes the real id in once it has it. No block holding one is registered.
PLACEHOLDER = -1


@dataclass(eq=False)  # one request is one object: membership tests compare identity, not every field
class Sequence:
    """One request as the scheduler tracks it."""

    request: Any  # the EngineRequest
    arrival: int
    tokens: list[int]  # the prompt, then the generated tokens
    prompt_length: int
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    limit: int | None = None  # tokens (prompt and generated) at which it ends: max_tokens or the context
    computed: int = 0  # positions whose keys/values are stored
    blocks: dict[str, list[int]] = field(default_factory=dict)  # per kind: the block of each logical block (0: released)
    digests: list[bytes] = field(default_factory=list)  # digests of the full blocks registered so far
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (first admission)
    admitted: bool = False
    image_slot: int | None = None  # Mllama: where its image keys/values are kept while it runs
    image_tokens: int | None = None  # Mllama: how many image tokens its new tokens see (None: none)
    # prompt logprobs (sampling.prompt_logprobs): the entry of each prompt token after the first,
    # collected chunk by chunk, and whether the first token's event has carried them
    prompt_logprobs: list = field(default_factory=list)
    prompt_logprobs_sent: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_length :]

    @property
    def in_prefill(self) -> bool:
        return self.computed < len(self.tokens) - 1 or (self.computed == 0 and len(self.tokens) == 1)

    @property
    def at_limit(self) -> bool:
        return self.limit is not None and len(self.tokens) >= self.limit

    @property
    def has_images(self) -> bool:
        return bool(self.request.model_inputs)

    @property
    def needs_prompt_logits(self) -> bool:
        """The request asks for its prompt's logprobs and they are not all collected: its prompt
        is computed position by position, none taken from the prefix cache."""
        wanted = getattr(getattr(self.request, "sampling", None), "prompt_logprobs", None) is not None
        return wanted and not self.prompt_logprobs_sent and len(self.prompt_logprobs) < self.prompt_length - 1


@dataclass
class PrefillChunk:
    sequence: Sequence
    start: int
    end: int

    @property
    def finishes_prompt(self) -> bool:
        return self.end == len(self.sequence.tokens)


@dataclass
class StepPlan:
    decode: list[Sequence]
    prefill: list[PrefillChunk]


class Scheduler:
    def __init__(self, *, kinds: list[str], num_blocks: dict[str, int], block_size: int, max_batch: int,
                 prefill_chunk: int, chunk_size: int | None, max_waiting: int, image_slots: int = 0):
        self.block_size, self.max_batch, self.prefill_chunk = block_size, max_batch, prefill_chunk
        self.chunk_size, self.max_waiting = chunk_size, max_waiting
        self.pools = {kind: BlockPool(num_blocks[kind], caching=kind == FULL) for kind in kinds}
        # a prefix hit is a whole number of these positions (whole blocks; with chunked layers whole chunks too)
        self.reuse_unit = math.lcm(block_size, chunk_size) if CHUNKED in kinds else block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order
        self.arrivals = 0
        # Mllama: slots for image keys/values (0: the family keeps none); a request with images
        # waits for one
        self.image_slots = image_slots
        self.free_image_slots = list(range(1, image_slots + 1))
        self.prefix_cache_queries = self.prefix_cache_hits = self.preemptions = 0

    # --- blocks --------------------------------------------------------------------------------

    def kept_from(self, kind: str, position: int) -> int:
        """The first position a query at `position` (or later) can see in layers of `kind`."""
        if kind == CHUNKED:
            return position - position % self.chunk_size
        return 0

    def slot(self, sequence: Sequence, kind: str, position: int) -> int:
        return sequence.blocks[kind][position // self.block_size] * self.block_size + position % self.block_size

    def _grow(self, sequence: Sequence, end: int) -> bool:
        """Blocks for positions up to `end` in every pool; False when a pool ran out (what was
        taken stays with the sequence)."""
        needed = -(-end // self.block_size)
        for kind, pool in self.pools.items():
            blocks = sequence.blocks.setdefault(kind, [])
            while len(blocks) < needed:
                block = pool.allocate()
                if block is None:
                    return False
                blocks.append(block)
        return True

    def _release(self, sequence: Sequence) -> None:
        for kind, blocks in sequence.blocks.items():
            for block in blocks:
                if block:
                    self.pools[kind].release(block)
        sequence.blocks = {}
        sequence.digests = []
        sequence.computed = 0
        if sequence.image_slot is not None:
            self.free_image_slots.append(sequence.image_slot)
            sequence.image_slot = sequence.image_tokens = None

    def _reuse_prefix(self, sequence: Sequence) -> int:
        """Take the cached blocks of the sequence's longest cached prefix; returns its tokens."""
        pool = self.pools.get(FULL)
        if pool is None or not pool.caching or sequence.has_images or sequence.needs_prompt_logits:
            # a prompt with images is prefilled whole: its image features go in with it; one whose
            # logprobs are asked for needs the logits of every position (vLLM skips the cache for it too)
            return 0
        size = self.block_size
        parent, taken = b"", []
        for index in range((len(sequence.tokens) - 1) // size):  # at least one token left to compute
            digest = block_digest(parent, sequence.tokens[index * size : (index + 1) * size])
            block = pool.find(digest)
            if block is None:
                break
            pool.share(block)
            taken.append(block)
            sequence.digests.append(digest)
            parent = digest
        hits = len(taken) * size
        hits -= hits % self.reuse_unit
        for block in taken[hits // size :]:
            pool.release(block)
        sequence.blocks[FULL] = taken[: hits // size]
        del sequence.digests[hits // size :]
        if CHUNKED in self.pools:  # nothing before the hit is visible to the chunked layers
            sequence.blocks[CHUNKED] = [0] * (hits // size)
        return hits

    def after_compute(self, sequence: Sequence) -> None:
        """Register the blocks that became full; release chunked-layer blocks nobody can see again."""
        pool, size = self.pools.get(FULL), self.block_size
        if pool is not None and pool.caching and not sequence.has_images:
            while (len(sequence.digests) + 1) * size <= sequence.computed:
                index = len(sequence.digests)
                parent = sequence.digests[-1] if sequence.digests else b""
                tokens = sequence.tokens[index * size : (index + 1) * size]
                if PLACEHOLDER in tokens:  # registered once the engine has the token
                    break
                digest = block_digest(parent, tokens)
                pool.register(sequence.blocks[FULL][index], digest)
                sequence.digests.append(digest)
        if CHUNKED in self.pools:
            blocks = sequence.blocks[CHUNKED]
            for index in range(self.kept_from(CHUNKED, sequence.computed) // size):
                if blocks[index]:
                    self.pools[CHUNKED].release(blocks[index])
                    blocks[index] = 0

    # --- requests ------------------------------------------------------------------------------

    def add(self, sequence: Sequence) -> None:
        sequence.arrival = self.arrivals
        self.arrivals += 1
        self.waiting.append(sequence)

    def remove(self, sequence: Sequence) -> None:
        """A finished or aborted sequence: its blocks go back at once."""
        self._release(sequence)
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)

    def _preempt(self, sequence: Sequence) -> None:
        self._release(sequence)
        self.running.remove(sequence)
        self.waiting.appendleft(sequence)
        self.preemptions += 1

    # --- one step ------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        preempted_before = self.preemptions
        preempted: set[int] = set()  # ids of the sequences this call preempted (running shrinks from its end)

        def preempt(victim: Sequence) -> None:
            self._preempt(victim)
            preempted.add(id(victim))

        decode: list[Sequence] = []
        for sequence in list(self.running):  # oldest first
            if id(sequence) in preempted or sequence.in_prefill or sequence.at_limit:
                continue  # at its limit: its last token is still on the GPU (async scheduling) and ends it
            while not self._grow(sequence, sequence.computed + 1):
                victim = self.running[-1]
                preempt(victim)
                if victim is sequence:
                    break
            else:
                decode.append(sequence)
        prefill: list[PrefillChunk] = []
        budget = self.prefill_chunk
        for sequence in list(self.running):
            if budget <= 0:
                break
            if id(sequence) in preempted or not sequence.in_prefill:
                continue
            chunk = self._prefill_chunk(sequence, budget)
            while chunk is None and not decode and not prefill and self.running[-1] is not sequence:
                preempt(self.running[-1])  # nothing else can move: make room
                chunk = self._prefill_chunk(sequence, budget)
            if chunk is None:
                break
            prefill.append(chunk)
            budget -= chunk.end - chunk.start
        # no admission in a step that had to preempt: what was preempted would come straight back
        while budget > 0 and self.waiting and len(self.running) < self.max_batch and self.preemptions == preempted_before:
            sequence = self.waiting[0]
            needs_slot = self.image_slots and sequence.has_images
            if needs_slot and not self.free_image_slots:
                break
            hits = self._reuse_prefix(sequence)
            sequence.computed = hits
            chunk = self._prefill_chunk(sequence, budget)
            if chunk is None:
                self._release(sequence)
                break
            self.waiting.popleft()
            if needs_slot:
                sequence.image_slot = self.free_image_slots.pop()
            if not sequence.admitted:
                sequence.admitted = True
                sequence.cached_tokens = hits
                self.prefix_cache_queries += sequence.prompt_length
                self.prefix_cache_hits += hits
            self.running.append(sequence)
            prefill.append(chunk)
            budget -= chunk.end - chunk.start
        return StepPlan(decode, prefill)

    def _prefill_chunk(self, sequence: Sequence, budget: int) -> PrefillChunk | None:
        """The next chunk of the sequence's prompt within `budget` tokens (a request with images
        goes in whole: its image features go with the whole prompt), with its blocks; None when
        the blocks are not there. Short of blocks, the chunk is what the blocks it got hold."""
        start = sequence.computed
        end = len(sequence.tokens) if sequence.has_images else min(len(sequence.tokens), start + budget)
        self._grow(sequence, end)
        end = min(end, min(len(blocks) for blocks in sequence.blocks.values()) * self.block_size)
        if end <= start or (sequence.has_images and end < len(sequence.tokens)):
            return None
        return PrefillChunk(sequence, start, end)

    # --- what the runner needs -----------------------------------------------------------------

    def prefill_slots(self, chunk: PrefillChunk) -> tuple[dict[str, list[int]], dict[str, int]]:
        sequence = chunk.sequence
        slots = {kind: [self.slot(sequence, kind, p) if sequence.blocks[kind][p // self.block_size] else 0
                        for p in range(chunk.end)] for kind in self.pools}
        return slots, {kind: self.kept_from(kind, chunk.start) for kind in self.pools}

    def decode_inputs(self, sequences: list[Sequence]):
        tokens = [s.tokens[s.computed] for s in sequences]
        positions = [s.computed for s in sequences]
        slots = {kind: [self.slot(s, kind, s.computed) for s in sequences] for kind in self.pools}
        tables = {kind: [s.blocks[kind] for s in sequences] for kind in self.pools}
        first = {kind: [self.kept_from(kind, s.computed) for s in sequences] for kind in self.pools}
        return tokens, positions, slots, tables, first

    def stats(self) -> dict[str, float]:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_blocks_used": sum(pool.used for pool in self.pools.values()),
            "kv_blocks_total": sum(pool.total for pool in self.pools.values()),
            "prefix_cache_queries": self.prefix_cache_queries,
            "prefix_cache_hits": self.prefix_cache_hits,
            "preemptions": self.preemptions,
        }
