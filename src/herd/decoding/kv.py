"""Key/value stores of the fast path: preallocated, fixed-shape, one kind per attention kind.

A decode plan asks a store one thing per layer, `layer(i)`: the layer's keys and values, the
slot where this step's key/value go, and which slots the new token may see. It never asks which
kind of store it holds. Kinds:

- `ContiguousKV` (full attention): slot = the token's position in the cache, `length` slots
  (a bucket: `graphs.cache_bucket`). With the FP8 KV cache (generate's cache_config) its keys and
  values are float8_e4m3fn with a float32 scale per (row, kv head, slot), quantized by the plain
  cache's rule (cache.fp8_quantize) when the prompt and each new token are written, and read
  dequantized; the other stores keep the model's dtype.
- `RingKV` (Llama 4's chunked layers): min(attention_chunk_size, length) slots, slot =
  position % ring; a chunk longer than the whole generation never wraps, and attention reads
  only the slots that can be filled.
- `CrossAttentionKV` (Mllama's cross-attention layers): the image's keys/values, computed once
  at prefill and never written during decoding, with which image tokens each row sees.

`DecodeKV` holds the stores of one model and batch; `begin_step` updates each store's slot and
visibility once per step (tensor arithmetic only, so it runs inside the captured graph), and
`PrefillCache` lets the reference forward write the prompt into the same buffers through the
ordinary Cache interface.

`PagedKV` is the server's store (serving/): one pool of fixed-size blocks per layer shared by
every request, a block table per row, per-row slots and lengths. Its `layer(i)` hands the plan
the pool, each row's flat slot and its table; `store_token` and `attend` below write and read
either kind, so a plan runs unchanged over both. `PagedPrefillCache` is its Cache adapter for
the reference forward (a chunk of one request's prompt). With the FP8 KV cache (herd serve
--kv-cache-dtype fp8) its full-attention pools are e4m3 with a float32 scale per (kv head, slot),
written and read by the same rule as ContiguousKV's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..cache import FP8_KV_DTYPE, Cache, fp8_dequantize, fp8_quantize
from ..kernels import decode_attention, paged_attention
from ..kernels.gemv import store_key_value
from .graphs import compiled_once
from .visibility import kept_positions, visible

# The attention kinds a layer's keys/values belong to: its own keys in a full cache, a ring of
# chunk slots (Llama 4's chunked layers), or an image (Mllama's cross-attention layers)
FULL, CHUNKED, CROSS = "full", "chunked", "cross"


class LayerKV(NamedTuple):
    """What one layer's decode step reads: keys/values (batch, kv_heads, slots, head_dim), the slot
    (1,) where this step's key/value go, and which slots the new token may see (batch, slots).

    Paged (PagedKV): keys/values are the layer's pool (1, kv_heads, blocks * block_size, head_dim),
    slot (batch,) each row's flat slot, allowed None; the row sees its positions
    [first_position, lengths) through block_table (batch, blocks per row).

    FP8 (the FP8 KV cache, ContiguousKV or PagedKV): keys/values float8_e4m3fn, key_scales/
    value_scales float32 their scales, (batch, kv_heads, slots) or for a pool (1, kv_heads, slots)."""

    keys: torch.Tensor
    values: torch.Tensor
    slot: torch.Tensor
    allowed: torch.Tensor | None
    block_table: torch.Tensor | None = None
    first_position: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    block_size: int = 0
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None


def store_token(kv: LayerKV, key: torch.Tensor, value: torch.Tensor) -> None:
    """This step's key/value (batch, kv_heads, head_dim) into the layer's store."""
    store_key_value(kv.keys, kv.values, kv.slot, key, value, kv.key_scales, kv.value_scales)


def attend(query: torch.Tensor, kv: LayerKV, scaling: float) -> torch.Tensor:
    """query (batch, heads, 1, head_dim) over what each row may see -> (batch, heads * head_dim)."""
    if kv.block_table is None:
        return decode_attention.attend(query, kv.keys, kv.values, kv.allowed, kv.slot, scaling, kv.key_scales,
                                       kv.value_scales)
    return paged_attention.attend(query, kv.keys, kv.values, kv.block_table, kv.first_position, kv.lengths,
                                  kv.block_size, scaling, kv.key_scales, kv.value_scales)


def _buffers(layers, batch, kv_heads, slots, head_dim, dtype, device):
    shape = (batch, kv_heads, slots, head_dim)
    keys = {index: torch.zeros(shape, dtype=dtype, device=device) for index in layers}
    values = {index: torch.zeros(shape, dtype=dtype, device=device) for index in layers}
    return keys, values


def mark_written(real: torch.Tensor, cache_position: torch.Tensor) -> None:
    """The new token's slot (1,) holds a real token in every row of real (batch, length)."""
    real.index_fill_(1, cache_position, True)


class ContiguousKV:
    """Full-attention layers: slot i holds position i (padding included) of every row.
    `cache_dtype` FP8_KV_DTYPE: the FP8 KV cache (keys/values in e4m3, scales beside them)."""

    def __init__(self, layers, batch, kv_heads, head_dim, length, dtype, device, compiled=False, cache_dtype=None):
        self.is_fp8 = cache_dtype == FP8_KV_DTYPE
        self.keys, self.values = _buffers(layers, batch, kv_heads, length, head_dim,
                                          FP8_KV_DTYPE if self.is_fp8 else dtype, device)
        # FP8: float32 scales (batch, kv_heads, length) per layer; none otherwise
        self.key_scales, self.value_scales = ({index: torch.zeros(batch, kv_heads, length, device=device)
                                               for index in (layers if self.is_fp8 else ())} for _ in range(2))
        self.real = torch.zeros(batch, length, dtype=torch.bool, device=device)  # slot holds a real token
        self.seen = dict.fromkeys(layers, 0)
        self.compiled = compiled
        self.slot = None

    @property
    def length(self) -> int:
        return self.real.shape[1]

    def reset(self) -> None:
        self.real.zero_()
        self.seen = dict.fromkeys(self.seen, 0)

    def dynamic_dims(self) -> list[tuple[torch.Tensor, int]]:
        """The dimensions that are the cache length: another bucket re-captures, never recompiles."""
        tensors = (*self.keys.values(), *self.values.values(), *self.key_scales.values(), *self.value_scales.values())
        return [(tensor, 2) for tensor in tensors] + [(self.real, 1)]

    def write_prompt(self, layer_idx, key_states, value_states):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        start, new = self.seen[layer_idx], key_states.shape[-2]
        if start + new > keys.shape[2]:
            raise ValueError(f"the fast path's cache holds {keys.shape[2]} positions; {start + new} were asked for")
        if self.is_fp8:
            return self._write_prompt_fp8(layer_idx, key_states, value_states, start, new)
        keys[:, :, start : start + new] = key_states
        values[:, :, start : start + new] = value_states
        self.seen[layer_idx] = start + new
        # the written prefix: an unpadded prefill stays plain causal attention (sdpa's fused kernels)
        return keys[:, :, : start + new], values[:, :, : start + new]

    def _write_prompt_fp8(self, layer_idx, key_states, value_states, start, new):
        """As the plain FP8 cache (cache.StaticCache): quantized on the way in, the written prefix
        read back dequantized in the new keys' dtype."""
        read = []
        for stored, scales, states in ((self.keys[layer_idx], self.key_scales[layer_idx], key_states),
                                       (self.values[layer_idx], self.value_scales[layer_idx], value_states)):
            quantized, scale = fp8_quantize(states)  # (batch, kv_heads, new, head_dim), (batch, kv_heads, new, 1)
            stored.view(torch.uint8)[:, :, start : start + new] = quantized.view(torch.uint8)
            scales[:, :, start : start + new] = scale[..., 0]
            read.append(fp8_dequantize(stored[:, :, : start + new], scales[:, :, : start + new, None], states.dtype))
        self.seen[layer_idx] = start + new
        return tuple(read)

    def stored(self, layer_idx) -> int:
        return self.seen[layer_idx]

    def mark_prompt(self, attention_mask: torch.Tensor) -> None:
        self.real[:, : attention_mask.shape[1]] = attention_mask.bool()

    def begin_step(self, cache_position: torch.Tensor, positions: torch.Tensor) -> None:
        (compiled_once(mark_written) if self.compiled else mark_written)(self.real, cache_position)
        self.slot = cache_position

    def layer(self, layer_idx: int) -> LayerKV:
        return LayerKV(self.keys[layer_idx], self.values[layer_idx], self.slot, self.real,
                       key_scales=self.key_scales.get(layer_idx), value_scales=self.value_scales.get(layer_idx))


def ring_step(ring_positions, ring_real, cache_position, positions, chunk_size: int):
    """Write the new token's cache position into its ring slot and say which slots it may see.

    ring_positions (ring,): the cache position each slot holds (-1: none yet); ring_real (batch,
    ring); cache_position (1,); positions (batch,) the token's position in each row. Returns the
    slot (1,) and the visible slots (batch, ring).
    """
    slot = cache_position % ring_positions.shape[0]  # (1,)
    ring_positions.index_copy_(0, slot, cache_position)
    ring_real.index_fill_(1, slot, True)
    first_real = cache_position - positions  # (batch,): the cache position of each row's first real token
    held = ring_positions[None, :] - first_real[:, None]  # (batch, ring): positions in each row
    return slot, visible(positions[:, None], held, chunk_size, ring_real)


class RingKV:
    """Chunked-attention layers: the last `ring` cache positions, slot = position % ring."""

    def __init__(self, layers, batch, kv_heads, head_dim, ring, chunk_size, dtype, device, compiled=False):
        self.keys, self.values = _buffers(layers, batch, kv_heads, ring, head_dim, dtype, device)
        self.positions = torch.full((ring,), -1, dtype=torch.long, device=device)  # cache position per slot
        self.real = torch.zeros(batch, ring, dtype=torch.bool, device=device)
        self.chunk_size = chunk_size
        self.seen = dict.fromkeys(layers, 0)
        self.compiled = compiled
        self.slot = self.allowed = None

    @property
    def ring(self) -> int:
        return self.positions.shape[0]

    def reset(self) -> None:
        self.positions.fill_(-1)
        self.real.zero_()
        self.seen = dict.fromkeys(self.seen, 0)

    def dynamic_dims(self, length: int) -> list[tuple[torch.Tensor, int]]:
        """A ring as long as the cache (the chunk is longer) grows with the bucket."""
        if self.ring != length:
            return []
        return [(tensor, 2) for tensor in (*self.keys.values(), *self.values.values())] + [(self.positions, 0), (self.real, 1)]

    def write_prompt(self, layer_idx, key_states, value_states):
        """Returns what is left of the current window followed by the new keys; keeps the newest
        `ring` of them."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        start, new = self.seen[layer_idx], key_states.shape[-2]
        device, ring = keys.device, self.ring
        if ring < self.chunk_size and start + new > ring:  # a ring shorter than the chunk must never wrap
            raise ValueError(f"the fast path's ring holds {ring} positions; {start + new} were asked for")
        kept = torch.arange(start - kept_positions(start, self.chunk_size), start, device=device)  # this window so far
        all_keys = torch.cat([keys[:, :, kept % ring], key_states], dim=2)
        all_values = torch.cat([values[:, :, kept % ring], value_states], dim=2)
        written = torch.arange(max(start, start + new - ring), start + new, device=device)
        keys[:, :, written % ring] = key_states[:, :, written - start]
        values[:, :, written % ring] = value_states[:, :, written - start]
        self.seen[layer_idx] = start + new
        return all_keys, all_values

    def stored(self, layer_idx) -> int:
        return kept_positions(self.seen[layer_idx], self.chunk_size)

    def mark_prompt(self, attention_mask: torch.Tensor) -> None:
        prompt_length = attention_mask.shape[1]
        written = torch.arange(max(0, prompt_length - self.ring), prompt_length, device=attention_mask.device)
        self.positions[written % self.ring] = written
        self.real[:, written % self.ring] = attention_mask.bool()[:, written]

    def begin_step(self, cache_position: torch.Tensor, positions: torch.Tensor) -> None:
        step = compiled_once(ring_step) if self.compiled else ring_step
        self.slot, self.allowed = step(self.positions, self.real, cache_position, positions, self.chunk_size)

    def layer(self, layer_idx: int) -> LayerKV:
        return LayerKV(self.keys[layer_idx], self.values[layer_idx], self.slot, self.allowed)


class CrossAttentionKV:
    """Cross-attention layers: keys/values (batch, kv_heads, image tokens, head_dim) of the image,
    written once after prefill (`fill`). `visible` (batch, image tokens): the image tokens each
    row's new tokens see; `row_sees_image` (batch, 1): 0 for a row that sees no image at all,
    whose cross-attention and cross-layer MLP outputs the layer zeroes (its `visible` row is all
    True then: the reference attends uniformly there rather than over nothing)."""

    def __init__(self, layers, batch, kv_heads, image_tokens, head_dim, dtype, device):
        self.keys, self.values = _buffers(layers, batch, kv_heads, image_tokens, head_dim, dtype, device)
        self.visible = torch.zeros(batch, image_tokens, dtype=torch.bool, device=device)
        self.row_sees_image = torch.zeros(batch, 1, dtype=dtype, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # nothing is written while decoding

    @classmethod
    def like(cls, image_keys_values: dict) -> CrossAttentionKV:
        """Buffers shaped as the prefill's image keys/values {layer: (keys, values)}."""
        keys = next(iter(image_keys_values.values()))[0]
        batch, kv_heads, image_tokens, head_dim = keys.shape
        return cls(list(image_keys_values), batch, kv_heads, image_tokens, head_dim, keys.dtype, keys.device)

    @property
    def shape_key(self) -> tuple:
        return tuple(self.visible.shape)

    def fill(self, image_keys_values: dict, visible_tokens: torch.Tensor) -> None:
        for index, (keys, values) in image_keys_values.items():
            self.keys[index].copy_(keys)
            self.values[index].copy_(values)
        sees = visible_tokens.any(dim=1, keepdim=True)  # (batch, 1)
        self.visible.copy_(visible_tokens | ~sees)
        self.row_sees_image.copy_(sees)

    def layer(self, layer_idx: int) -> LayerKV:
        return LayerKV(self.keys[layer_idx], self.values[layer_idx], self.slot, self.visible)


class DecodeKV:
    """The stores of one model and batch, by layer."""

    def __init__(self, full: ContiguousKV, ring: RingKV | None = None):
        self.full, self.ring = full, ring
        self.cross: CrossAttentionKV | None = None  # this request's image, if any
        self.spare_cross: CrossAttentionKV | None = None  # kept across requests: same shape, same graph
        self.self_attention_stores = [store for store in (full, ring) if store is not None]
        self.store_of = {index: store for store in self.self_attention_stores for index in store.keys}

    @property
    def length(self) -> int:
        return self.full.length

    @property
    def cache_position(self) -> torch.Tensor:
        """(1,): the new token's position counted from the cache's start (padding included)."""
        return self.full.slot

    def reset(self) -> None:
        self.spare_cross, self.cross = self.cross or self.spare_cross, None
        for store in self.self_attention_stores:
            store.reset()
        self.store_of = {index: store for store in self.self_attention_stores for index in store.keys}

    def set_image(self, image_keys_values: dict, visible_tokens: torch.Tensor) -> None:
        """The image keys/values {layer: (batch, kv_heads, image tokens, head_dim)} the prefill made,
        and which image tokens (batch, image tokens) the new tokens see."""
        cross = self.spare_cross
        if cross is None or cross.shape_key != tuple(visible_tokens.shape):
            cross = CrossAttentionKV.like(image_keys_values)
        cross.fill(image_keys_values, visible_tokens)
        self.cross = cross
        self.store_of.update(dict.fromkeys(cross.keys, cross))

    def dynamic_dims(self) -> list[tuple[torch.Tensor, int]]:
        dims = self.full.dynamic_dims()
        if self.ring is not None:
            dims += self.ring.dynamic_dims(self.length)
        return dims

    def mark_prompt(self, attention_mask: torch.Tensor) -> None:
        """After prefill: which of the prompt's positions are real tokens."""
        for store in self.self_attention_stores:
            store.mark_prompt(attention_mask)

    def begin_step(self, cache_position: torch.Tensor, positions: torch.Tensor) -> None:
        """cache_position (1,): the new token's slot in full layers; positions (batch,): its
        position in each row."""
        for store in self.self_attention_stores:
            store.begin_step(cache_position, positions)

    def layer(self, layer_idx: int) -> LayerKV:
        return self.store_of[layer_idx].layer(layer_idx)


class PrefillCache(Cache):
    """The stores through the ordinary Cache interface, for the reference forward at prefill."""

    def __init__(self, kv: DecodeKV):
        self.kv = kv

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        return self.kv.store_of[layer_idx].write_prompt(layer_idx, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.store_of[layer_idx].seen[layer_idx] if layer_idx in self.kv.store_of else 0

    def get_max_cache_shape(self) -> int:
        return self.kv.length

    def kv_length(self, layer_idx: int, query_length: int) -> int:
        return self.kv.store_of[layer_idx].stored(layer_idx) + query_length

    def kv_offset(self, layer_idx: int) -> int:
        store = self.kv.store_of[layer_idx]
        return store.seen[layer_idx] - store.stored(layer_idx)

    def _tensors(self):
        return []


class PagedKV:
    """The server's store: per layer one pool of `blocks[kind]` blocks of `block_size` slots,
    (1, kv_heads, blocks * block_size, head_dim), shared by every request; which block holds which
    of a request's positions is the scheduler's business (serving/paged.py), handed over per step
    as a block table per row. Layers of one kind (full, chunked) share a table: a chunked layer's
    blocks older than its window are given back, so its pools are smaller.

    The step's inputs live in fixed buffers of `max_rows` rows (a captured graph reads the first
    `rows`): tokens, positions, per kind each row's flat slot, table and first visible position,
    and each row's length (position + 1). Block 0 of every pool is never handed to a request:
    padding rows write there.

    `cache_dtype` FP8_KV_DTYPE: the FP8 KV cache. The full-attention pools hold e4m3 keys/values
    and float32 scales (1, kv_heads, blocks * block_size) per layer, one per head of each slot
    (cache.fp8_quantize's rule); the chunked layers' pools (short windows) stay in the model's
    dtype, as the plain FP8 cache (cache.StaticCache) and the fast path's rings keep them.
    """

    def __init__(self, layers_by_kind: dict[str, list[int]], blocks: dict[str, int], block_size: int,
                 kv_heads: int, head_dim: int, max_rows: int, table_width: int, dtype, device, cache_dtype=None):
        self.block_size, self.table_width = block_size, table_width
        self.kind_of = {index: kind for kind, layers in layers_by_kind.items() for index in layers}
        self.keys, self.values = {}, {}
        self.key_scales, self.value_scales = {}, {}  # FP8 layers only
        for index, kind in self.kind_of.items():
            slots = blocks[kind] * block_size
            fp8 = cache_dtype == FP8_KV_DTYPE and kind == FULL
            stored_as = FP8_KV_DTYPE if fp8 else dtype
            self.keys[index] = torch.zeros(1, kv_heads, slots, head_dim, dtype=stored_as, device=device)
            self.values[index] = torch.zeros(1, kv_heads, slots, head_dim, dtype=stored_as, device=device)
            if fp8:
                self.key_scales[index] = torch.zeros(1, kv_heads, slots, dtype=torch.float32, device=device)
                self.value_scales[index] = torch.zeros(1, kv_heads, slots, dtype=torch.float32, device=device)
        long = dict(dtype=torch.long, device=device)
        self.tokens = torch.zeros(max_rows, **long)
        self.positions = torch.zeros(max_rows, **long)
        self.lengths = torch.ones(max_rows, **long)
        self.slots = {kind: torch.zeros(max_rows, **long) for kind in layers_by_kind}
        self.first = {kind: torch.zeros(max_rows, **long) for kind in layers_by_kind}
        self.tables = {kind: torch.zeros(max_rows, table_width, dtype=torch.int32, device=device)
                       for kind in layers_by_kind}
        self.rows = max_rows
        self.cross_store: PagedCrossKV | None = None  # Mllama's image keys/values, outside the pages
        self.cross: PagedCrossKV | None = None  # the store when a row of this step sees an image (else skipped)

    @property
    def cache_position(self) -> torch.Tensor:
        """(rows,): each row's new position (no padding in a paged store)."""
        return self.positions[: self.rows]

    def layer(self, layer_idx: int) -> LayerKV:
        if layer_idx not in self.kind_of:
            return self.cross_store.layer(layer_idx)
        kind, rows = self.kind_of[layer_idx], self.rows
        return LayerKV(self.keys[layer_idx], self.values[layer_idx], self.slots[kind][:rows], None,
                       self.tables[kind][:rows], self.first[kind][:rows], self.lengths[:rows], self.block_size,
                       self.key_scales.get(layer_idx), self.value_scales.get(layer_idx))


class PagedCrossKV:
    """Mllama's image keys/values in the server, one request per slot, outside the pages: per
    cross-attention layer a buffer of `slots` + 1 blocks of `tokens` positions (1, kv_heads,
    (slots + 1) * tokens, head_dim); block 0 stays zero for rows without an image.

    A request's new tokens see the image tokens its last prompt token saw (fixed after prefill),
    so only those are kept, packed at the start of its block: the step attends to [0, seen) of
    it through the paged kernel (a one-block table per row). `row_sees_image` (rows, 1) is 0 for a
    row that sees no image, whose cross-attention outputs the layer zeroes."""

    def __init__(self, layers: list[int], slots: int, tokens: int, kv_heads: int, head_dim: int, max_rows: int,
                 dtype, device):
        self.tokens = tokens
        shape = (1, kv_heads, (slots + 1) * tokens, head_dim)
        self.keys = {index: torch.zeros(shape, dtype=dtype, device=device) for index in layers}
        self.values = {index: torch.zeros(shape, dtype=dtype, device=device) for index in layers}
        long = dict(dtype=torch.long, device=device)
        self.table = torch.zeros(max_rows, 1, dtype=torch.int32, device=device)
        self.first = torch.zeros(max_rows, **long)
        self.lengths = torch.ones(max_rows, **long)
        self.no_slot = torch.zeros(max_rows, **long)  # nothing is written while decoding
        self.sees = torch.zeros(max_rows, 1, dtype=dtype, device=device)
        self.rows = max_rows

    @property
    def row_sees_image(self) -> torch.Tensor:
        return self.sees[: self.rows]

    def fill(self, slot: int, image_keys_values: dict, visible: torch.Tensor) -> int:
        """A request's image keys/values {layer: (1, kv_heads, image tokens, head_dim)} into block
        `slot` (1 and up), only the image tokens visible (image tokens,) bool. Returns how many."""
        seen = int(visible.sum())
        if seen > self.tokens:
            raise ValueError(f"the request's images give {seen} image tokens; the store holds {self.tokens} per request")
        start = slot * self.tokens
        for index, (keys, values) in image_keys_values.items():
            self.keys[index][0, :, start : start + seen] = keys[0][:, visible]
            self.values[index][0, :, start : start + seen] = values[0][:, visible]
        return seen

    def layer(self, layer_idx: int) -> LayerKV:
        rows = self.rows
        return LayerKV(self.keys[layer_idx], self.values[layer_idx], self.no_slot[:rows], None, self.table[:rows],
                       self.first[:rows], self.lengths[:rows], self.tokens)


class PagedPrefillCache(Cache):
    """Prompt chunks of one or more requests through the reference forward into a PagedKV, all
    from the same position `start` (the positions before it stored already).

    slots[kind] (rows, end): the flat slot of each row's positions up to the chunk's end (a row
    right-padded to the longest chunk writes its padded positions to slot 0 of block 0, which no
    request holds); kept_from[kind]: the first position the chunk's queries can see (0 for full
    layers, the start of `start`'s attention chunk for chunked ones): update returns keys/values
    from there on, and the mask is told so (kv_offset).

    An FP8 pool (PagedKV's FP8 KV cache) gets the chunk quantized per token and head
    (cache.fp8_quantize) and returns what is visible dequantized in the chunk's dtype, as the plain
    FP8 cache (cache.StaticCache) returns its whole cache: the chunk's own keys/values are read back
    rounded through e4m3 too, so the prompt attends to what decoding will read."""

    def __init__(self, kv: PagedKV, slots: dict[str, torch.Tensor], start: int, kept_from: dict[str, int]):
        self.kv, self.slots, self.start, self.kept_from = kv, slots, start, kept_from

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        kind = self.kv.kind_of[layer_idx]
        slots = self.slots[kind]  # (rows, end)
        end = self.start + key_states.shape[-2]
        written = slots[:, self.start : end].reshape(-1)  # (rows * new,), row after row
        visible = slots[:, self.kept_from[kind] : end]  # (rows, visible)
        if layer_idx in self.kv.key_scales:
            return tuple(self._update_fp8(pool, scales, states, written, visible) for pool, scales, states in (
                (self.kv.keys[layer_idx], self.kv.key_scales[layer_idx], key_states),
                (self.kv.values[layer_idx], self.kv.value_scales[layer_idx], value_states)))
        keys, values = self.kv.keys[layer_idx][0], self.kv.values[layer_idx][0]  # (kv_heads, slots, head_dim)
        # (rows, kv_heads, new, head_dim) -> (kv_heads, rows * new, head_dim), rows in the same order
        keys.index_copy_(1, written, key_states.transpose(0, 1).flatten(1, 2).to(keys.dtype))
        values.index_copy_(1, written, value_states.transpose(0, 1).flatten(1, 2).to(values.dtype))
        # (kv_heads, rows, visible, head_dim) -> (rows, kv_heads, visible, head_dim)
        return keys[:, visible].transpose(0, 1), values[:, visible].transpose(0, 1)

    @staticmethod
    def _update_fp8(pool, scales, states, written, visible):
        """states (rows, kv_heads, new, head_dim) into an FP8 pool (1, kv_heads, slots, head_dim)
        (bytes through a uint8 view: float8 has no index_copy_ on some torch versions) with its
        scales (1, kv_heads, slots) at `written`; returns the `visible` slots (rows, visible)
        dequantized, (rows, kv_heads, visible, head_dim) in the states' dtype."""
        quantized, scale = fp8_quantize(states)  # (rows, kv_heads, new, head_dim), (rows, kv_heads, new, 1)
        stored = pool.view(torch.uint8)[0]  # (kv_heads, slots, head_dim)
        stored.index_copy_(1, written, quantized.view(torch.uint8).transpose(0, 1).flatten(1, 2))
        scales[0].index_copy_(1, written, scale[..., 0].transpose(0, 1).flatten(1, 2))
        # (kv_heads, rows, visible, head_dim) -> (rows, kv_heads, visible, head_dim)
        seen = stored[:, visible].view(FP8_KV_DTYPE).transpose(0, 1)
        seen_scales = scales[0][:, visible].transpose(0, 1)  # (rows, kv_heads, visible)
        return fp8_dequantize(seen, seen_scales[..., None], states.dtype)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def kv_length(self, layer_idx: int, query_length: int) -> int:
        return self.start - self.kv_offset(layer_idx) + query_length

    def kv_offset(self, layer_idx: int) -> int:
        kind = self.kv.kind_of.get(layer_idx)
        return self.kept_from[kind] if kind is not None else 0

    def _tensors(self):
        return []
