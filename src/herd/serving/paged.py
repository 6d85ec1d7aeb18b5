"""The server's paged KV store: which block holds what (`BlockPool`), and the model over it
(`PagedRunner`).

Blocks: each request's positions live in fixed-size blocks, listed in its block table. A block
full of tokens is named by a digest of its tokens and of every token before it: a later request with the same prefix reuses it (reference counted) instead
of computing it again. A block nobody holds any more stays cached, and the least recently
released cached block is the first to be taken for new work (LRU eviction). Block 0 of every
pool is never handed out: rows that pad a captured batch write there.

The model: prefill chunks go through the model's reference forward with `PagedPrefillCache`
(chunks from the same position as one right-padded batch: `prefill_batches`); decode steps run
the family's decode plan (decoding/plans/) over a `PagedKV` for every running request at once,
on CUDA compiled and captured as one CUDA graph per batch-size bucket (rows padded up to the
bucket).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Any, NamedTuple

import numpy
import torch

from ..decoding.decoders import fast_decoder, forward_tokens
from ..decoding.graphs import CapturedStep, compile_units
from ..decoding.kv import PagedCrossKV, PagedKV, PagedPrefillCache
from ..decoding.plans import CHUNKED, CROSS, FULL, plan_for

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # decode batch sizes a graph is captured for (then multiples of 256)


def batch_bucket(rows: int) -> int:
    """The captured batch size for `rows` running requests."""
    for bucket in BATCH_BUCKETS:
        if rows <= bucket:
            return bucket
    return -(-rows // BATCH_BUCKETS[-1]) * BATCH_BUCKETS[-1]


def block_digest(parent: bytes, tokens: list[int]) -> bytes:
    """The name of a full block: its tokens and (through `parent`, the previous block's digest, b""
    for the first block) everything before it. A cryptographic hash: a client must not be able to
    make its block collide with another client's. (Requests with images are never cached: the
    same tokens with another image are other keys/values.)"""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Blocks 1..num_blocks of one pool, reference counted; with `caching`, full blocks registered
    under their digest stay findable until evicted."""

    def __init__(self, num_blocks: int, caching: bool):
        self.total, self.caching = num_blocks, caching
        self.free: deque[int] = deque(range(1, num_blocks + 1))
        self.refs = [0] * (num_blocks + 1)
        self.digest_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced: oldest release first

    @property
    def used(self) -> int:
        """Blocks some request holds."""
        return self.total - len(self.free) - len(self.evictable)

    @property
    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int | None:
        """A block for new work (a free one, else the least recently released cached one), or None."""
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.block_of[self.digest_of.pop(block)]
        else:
            return None
        self.refs[block] = 1
        return block

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.digest_of:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def find(self, digest: bytes) -> int | None:
        return self.block_of.get(digest) if self.caching else None

    def share(self, block: int) -> None:
        """One more holder of a cached block (taken back from eviction if nobody held it)."""
        if self.refs[block] == 0:
            del self.evictable[block]
        self.refs[block] += 1

    def register(self, block: int, digest: bytes) -> None:
        """A block now full of the tokens `digest` names (the first block with that name wins)."""
        if self.caching and digest not in self.block_of and block not in self.digest_of:
            self.block_of[digest] = block
            self.digest_of[block] = digest


class PrefillWork(NamedTuple):
    """A prompt chunk of one request: its tokens up to the chunk's end, the chunk's first
    position, per kind the flat slot of each position up to the end (serving/scheduler.py) and
    the first position the chunk's queries can see, its images (a first chunk) and Mllama's
    image slot; `every_logits`: the logits of every position of the chunk are kept, not only the
    last one's (a request asking for its prompt's logprobs)."""

    tokens: list[int]
    start: int
    slots: dict[str, list[int]]
    kept_from: dict[str, int]
    model_inputs: dict[str, Any] | None = None
    image_slot: int | None = None
    every_logits: bool = False


def prefill_batches(works: list[PrefillWork], max_padding: float = 0.25) -> list[list[int]]:
    """Which chunks go through the model together (indices into works): those from the same
    position, longest first, while the padding stays within `max_padding` of the real tokens; a
    request with images alone, and one whose every position's logits are kept (the others keep
    only their last position's)."""
    batches, groups = [], {}
    for index, work in enumerate(works):
        if work.model_inputs or work.every_logits:
            batches.append([index])
        else:
            groups.setdefault((work.start, tuple(sorted(work.kept_from.items()))), []).append(index)
    for indices in groups.values():
        indices.sort(key=lambda i: -len(works[i].tokens))
        batch, real = [], 0
        for index in indices:
            length = len(works[index].tokens) - works[index].start
            longest = len(works[batch[0]].tokens) - works[batch[0]].start if batch else length
            if batch and (len(batch) + 1) * longest > (1 + max_padding) * (real + length):
                batches.append(batch)
                batch, real = [], 0
            batch.append(index)
            real += length
        batches.append(batch)
    return batches


class Prefilled(NamedTuple):
    logits: torch.Tensor  # (vocab,) float32: the chunk's last token's
    image_tokens: int | None  # Mllama: the image tokens kept for the request's new tokens (None: no image)
    every: torch.Tensor | None = None  # (chunk tokens, vocab) in the model's dtype, with every_logits


class PagedRunner:
    """The model over a PagedKV: `prefill` (chunks of one or more requests from one position) and
    `decode` (one token for each of several requests). Mllama's image keys/values go to `image_rows` slots of
    `image_tokens` positions each (PagedCrossKV). `kv_cache_dtype` FP8_KV_DTYPE: the FP8 KV cache
    in the full-attention pools (PagedKV)."""

    def __init__(self, model, *, max_rows: int, block_size: int, blocks: dict[str, int], table_width: int,
                 image_rows: int = 0, image_tokens: int = 0, compile: bool | None = None,
                 capture: bool | None = None, kv_cache_dtype: torch.dtype | None = None):
        self.model = model
        if plan_for(model) is None:
            raise ValueError(f"{type(model).__name__} has no decode plan: the server runs Llama, Llama 4 and Mllama models")
        # generate()'s plan, shared: its weights are fused once (a second plan would fuse them again
        # while the first still held the old copies)
        self.plan = fast_decoder(model).plan
        self.plan.prepare()
        kinds = self.plan.attention_kinds()
        self.layers_by_kind = {kind: [i for i, k in enumerate(kinds) if k == kind] for kind in (FULL, CHUNKED)
                               if kind in kinds}
        is_cuda = model.device.type == "cuda"
        self.use_compile = is_cuda if compile is None else compile
        self.capture = is_cuda if capture is None else capture
        kv_heads, head_dim = self.plan.kv_shape
        self.max_rows = batch_bucket(max_rows) if self.capture else max_rows
        self.kv = PagedKV(self.layers_by_kind, {kind: blocks[kind] + 1 for kind in self.layers_by_kind}, block_size,
                          kv_heads, head_dim, self.max_rows, table_width, model.dtype, model.device,
                          cache_dtype=kv_cache_dtype)
        cross_layers = [i for i, kind in enumerate(kinds) if kind == CROSS]
        # Mllama's image keys/values stay in the model's dtype with the FP8 KV cache too, as
        # generate()'s (cache_config's dtype is the self-attention layers' storage): written once
        # per request, a few thousand positions, they are not what a decode step reads most
        if cross_layers and image_rows:
            self.kv.cross_store = PagedCrossKV(cross_layers, image_rows, image_tokens, kv_heads, head_dim,
                                               self.max_rows, model.dtype, model.device)
        units = self.plan.units()
        if self.use_compile:
            # every batch bucket (and Llama 4's kinds of layer in each) adds entries to the units'
            # shared code cache, beside generate()'s shapes
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
                torch._dynamo.config.accumulated_recompile_limit = max(
                    torch._dynamo.config.accumulated_recompile_limit, 1024)
        self.run = compile_units(units) if self.use_compile else units
        self.graphs: dict[tuple, CapturedStep] = {}
        self.pool = None  # the memory pool the graphs share (never replayed at the same time)

    @staticmethod
    def layers_of(model) -> dict[str, int]:
        """How many layers of each paged kind (full, chunked) the model's plan has."""
        plan = plan_for(model)
        if plan is None:
            raise ValueError(f"{type(model).__name__} has no decode plan: the server runs Llama, Llama 4 and Mllama models")
        kinds = plan.attention_kinds()
        return {kind: kinds.count(kind) for kind in (FULL, CHUNKED) if kind in kinds}

    def prefill(self, works: list[PrefillWork]) -> list[Prefilled]:
        """Prompt chunks of one or more requests, all from the same position `start`, as one batch
        through the reference forward, each row right-padded to the longest chunk. A padded
        position comes after every real one of its row, so causal attention hides it from them;
        its key/value go to slot 0 of block 0 (never handed to a request). Images go in with the
        whole prompt of a request prefilled alone; Mllama's image keys/values then go to its
        `image_slot`."""
        start, kept_from = works[0].start, works[0].kept_from
        if any(work.start != start or work.kept_from != kept_from for work in works):
            raise ValueError("a batch of prefill chunks starts at one position")
        if len(works) > 1 and any(work.model_inputs for work in works):
            raise ValueError("a request with images is prefilled alone")
        device = self.model.device
        end = max(len(work.tokens) for work in works)
        tokens = torch.zeros(len(works), end - start, dtype=torch.long)
        slots = {kind: torch.zeros(len(works), end, dtype=torch.long) for kind in works[0].slots}
        for row, work in enumerate(works):
            tokens[row, : len(work.tokens) - start] = torch.tensor(work.tokens[start:])
            for kind, row_slots in work.slots.items():
                slots[kind][row, : len(row_slots)] = torch.tensor(row_slots)
        cache = PagedPrefillCache(self.kv, {kind: t.to(device) for kind, t in slots.items()}, start, kept_from)
        # each row's last token: the logits kept (one column per distinct chunk length); every
        # position's where a row asks for them
        last = sorted({len(work.tokens) - 1 - start for work in works})
        if any(work.every_logits for work in works):
            last = list(range(end - start))
        work = works[0]
        extra = {}
        if work.model_inputs:
            extra = self.model._inputs_for_step(_on(work.model_inputs, self.model), True, len(work.tokens))
        mask = torch.ones(len(works), end, dtype=torch.long, device=device)
        with torch.no_grad(), self.plan.prefilling():
            outputs = forward_tokens(self.model, tokens.to(device), mask, cache,
                                     logits_to_keep=torch.tensor(last, device=device), **extra)
            image_tokens = None
            image_keys_values = cache.cross_attention_cache()
            if image_keys_values and work.image_slot is not None:
                image_tokens = self.kv.cross_store.fill(work.image_slot, image_keys_values,
                                                        _visible_image_tokens(image_keys_values, extra))
        logits = outputs.logits  # (rows, kept, vocab)
        return [Prefilled(logits[row, last.index(len(work.tokens) - 1 - start)].float(), image_tokens,
                          logits[row, : len(work.tokens) - start] if work.every_logits else None)
                for row, work in enumerate(works)]

    def decode(self, tokens: list[int], positions: list[int], slots: dict[str, list[int]],
               tables: dict[str, list[list[int]]], first: dict[str, list[int]],
               images: list[tuple[int, int] | None] | None = None,
               carried: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor:
        """One token per row: tokens/positions (rows,), per kind each row's flat slot for its new
        key/value, its block table and its first visible position; images (Mllama): per row its
        (image slot, image tokens) or None; carried (async scheduling): the tokens a step before
        chose, still on the device, and per row the one of them that is its token (-1: the row's
        token is in `tokens`). Returns logits (rows, vocab), float32 (a copy: the captured graph's
        output is overwritten by the next step)."""
        rows = len(tokens)
        padded = batch_bucket(rows) if self.capture else rows
        if padded > self.max_rows:
            raise ValueError(f"{rows} rows in one decode step; the store was built for {self.max_rows}")
        pad = padded - rows
        kv = self.kv
        # padding rows: token 0 at position 0 in block 0 (never handed to a request), seeing only itself
        # (a carried row's placeholder token is overwritten on the device below)
        host = [tokens + [0] * pad, positions + [0] * pad, [p + 1 for p in positions] + [1] * pad]
        for kind in self.layers_by_kind:
            host += [slots[kind] + [0] * pad, first[kind] + [0] * pad]
        if carried is not None:
            host.append(carried[1] + [-1] * pad)
        host = _staged(torch.tensor(host, dtype=torch.long), kv.tokens)
        kv.tokens[:padded].copy_(host[0], non_blocking=True)
        if carried is not None:  # the rows whose token never came to the host
            source = host[-1].to(kv.tokens.device, non_blocking=True)
            chosen = carried[0][source.clamp(min=0)]
            kv.tokens[:padded].copy_(torch.where(source >= 0, chosen, kv.tokens[:padded]))
        kv.positions[:padded].copy_(host[1], non_blocking=True)
        kv.lengths[:padded].copy_(host[2], non_blocking=True)
        for index, kind in enumerate(self.layers_by_kind):
            kv.slots[kind][:padded].copy_(host[3 + 2 * index], non_blocking=True)
            kv.first[kind][:padded].copy_(host[4 + 2 * index], non_blocking=True)
            # only the columns in use: a row never reads its table past its length
            used = max(len(blocks) for blocks in tables[kind])
            table = numpy.zeros((padded, used), dtype=numpy.int32)
            for row, blocks in enumerate(tables[kind]):
                table[row, : len(blocks)] = blocks
            kv.tables[kind][:padded, :used].copy_(_staged(torch.from_numpy(table), kv.tokens), non_blocking=True)
        kv.rows = padded
        kv.cross = None
        if images is not None and any(images):
            self._set_images(images + [None] * pad)
        key = (padded, kv.cross is not None)
        with torch.no_grad():
            if not self.capture:
                return self._step()[:rows]
            if key not in self.graphs or self.graphs[key].released:  # released: see graphs.release_captured
                self.graphs[key] = CapturedStep(self._step, lambda: None, self.pool)
                self.pool = self.graphs[key].pool
            return self.graphs[key].replay()[:rows].clone()

    def buckets(self) -> list[int]:
        """The batch sizes the decode step is captured for (every bucket up to max_rows); none when
        nothing is captured (the CPU)."""
        if not self.capture:
            return []
        largest = BATCH_BUCKETS[-1]
        return [bucket for bucket in BATCH_BUCKETS if bucket <= self.max_rows] + list(
            range(2 * largest, self.max_rows + 1, largest))

    def _set_images(self, images: list[tuple[int, int] | None]) -> None:
        """Mllama: which image slot each row reads and how many of its tokens (block 0, one
        position, for rows without an image: their outputs are zeroed)."""
        store = self.kv.cross_store
        padded = len(images)
        host = torch.tensor([[image[0], image[1], 1] if image else [0, 1, 0] for image in images], dtype=torch.long)
        store.table[:padded, 0].copy_(host[:, 0], non_blocking=True)
        store.lengths[:padded].copy_(host[:, 1], non_blocking=True)
        store.sees[:padded, 0].copy_(host[:, 2], non_blocking=True)
        store.rows = padded
        self.kv.cross = store

    def _step(self) -> torch.Tensor:
        kv = self.kv
        return self.plan.step(self.run, kv.tokens[: kv.rows], kv.positions[: kv.rows], kv)


def _staged(host: torch.Tensor, destination: torch.Tensor) -> torch.Tensor:
    """`host` in pinned memory when it goes to a GPU: the copy then never waits for the GPU's
    queue, so the host prepares a step while the one before runs (async scheduling)."""
    return host.pin_memory() if destination.is_cuda else host


def _visible_image_tokens(image_keys_values: dict, step_inputs: dict[str, Any]) -> torch.Tensor:
    """Mllama: which image tokens (image tokens,) the request's new tokens see: those its last
    prompt token saw (the reference's generate() repeats the cross-attention mask's last row)."""
    keys = next(iter(image_keys_values.values()))[0]
    image_tokens = keys.shape[2]
    mask = step_inputs.get("cross_attention_mask")  # (1, tokens, images, tiles)
    if mask is None:
        return torch.ones(image_tokens, dtype=torch.bool, device=keys.device)
    tokens_per_tile = image_tokens // (mask.shape[2] * mask.shape[3])
    return mask[0, -1].bool().repeat_interleave(tokens_per_tile, dim=-1).reshape(-1).to(keys.device)


def _on(inputs: dict[str, Any], model) -> dict[str, Any]:
    """A request's image tensors on the model's device (pixel values in the model's dtype)."""
    moved = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(model.device)
            if value.is_floating_point() and name == "pixel_values":
                value = value.to(model.dtype)
        moved[name] = value
    return moved
