"""The GPU fast path of `generate()`: a static cache and a decode step captured once.

Decoding one token at small batch is bound by launch overhead long before it is bound by
memory: the plain forward launches hundreds of small kernels and syncs with the host. Here:

- The cache is preallocated (`DecodeBuffers`): full-attention layers get `cache_length`
  positions, rounded up to a bucket (`cache_bucket`) so that other prompt lengths and other
  max_new_tokens reuse the same shapes; chunked-attention layers (Llama 4) get a ring of
  `attention_chunk_size` slots, slot = position % chunk.
- The prompt goes through the ordinary forward (sdpa, fused attention), in chunks when long,
  writing into those buffers through `FastCache`, the same Cache interface every model uses.
- Each later token goes through the model's `decode_step(tokens, positions, cache)`, a pure
  function of fixed-shape tensors. Its pieces (embedding, each decoder layer's `decode`, the
  head) are compiled with torch.compile (regional compilation: layers of one structure share the
  compiled code, so compile time does not grow with depth; the cache length is a dynamic
  dimension, so buckets do not recompile), and the whole step is captured as one CUDA graph per
  (batch, bucket), replayed for every token.
- Choosing the token stays in the shared loop (generation/utils.py), on the device, and the loop
  asks the host whether every row is done only every `SYNC_INTERVAL` tokens.

`FastDecoder` keeps one set of buffers and one graph (the latest batch size and bucket): a graph
is bound to the addresses of the buffers it was captured on.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import Cache, layer_windows

logger = logging.getLogger("herd")

SYNC_INTERVAL = 16  # tokens between host checks of "is every row done?"
SMALLEST_BUCKET = 256
LARGEST_POWER_OF_TWO_BUCKET = 4096
PREFILL_CHUNK = 4096  # longer prompts are prefilled in pieces of this many tokens
# Devices on which generate() takes the fast path by default (tests add "cpu" to run it uncaptured).
FAST_DEVICES = ("cuda",)


def cache_bucket(length: int) -> int:
    """The cache length used for `length` positions: a power of two from 256 up to 4096, then a
    multiple of 4096. Few distinct shapes, at most twice the memory needed (below 4096)."""
    if length <= LARGEST_POWER_OF_TWO_BUCKET:
        size = SMALLEST_BUCKET
        while size < length:
            size *= 2
        return size
    return -(-length // LARGEST_POWER_OF_TWO_BUCKET) * LARGEST_POWER_OF_TWO_BUCKET


@dataclass
class DecodeBuffers:
    """Everything a decode step reads and writes besides the weights, preallocated.

    keys/values[layer]: (batch, kv_heads, cache_length or ring_length, head_dim).
    key_real (batch, cache_length): True where a full layer's slot holds a real (non-padding) token.
    ring_positions (ring_length,): the position each ring slot holds (-1: none yet).
    ring_real (batch, ring_length): True where a ring slot holds a real token.
    The ring holds min(chunk, cache_length) slots: a chunk longer than the whole generation
    (Llama 4's 8192 against a few hundred positions) never wraps, and its attention reads only
    the slots that can be filled.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    windows: tuple[int | None, ...]
    key_real: torch.Tensor
    ring_positions: torch.Tensor | None = None
    ring_real: torch.Tensor | None = None

    @property
    def ring_length(self) -> int | None:
        return None if self.ring_positions is None else self.ring_positions.shape[0]

    @property
    def chunk(self) -> int | None:
        """The chunked layers' attention_chunk_size."""
        return next((window for window in self.windows if window is not None), None)

    def reset(self) -> None:
        self.key_real.zero_()
        if self.ring_positions is not None:
            self.ring_positions.fill_(-1)
            self.ring_real.zero_()

    def mark_prompt(self, attention_mask: torch.Tensor) -> None:
        """After prefill: which of the prompt's positions are real tokens, for the full layers and the rings."""
        prompt_length = attention_mask.shape[1]
        real = attention_mask.bool()
        self.key_real[:, :prompt_length] = real
        if self.ring_positions is not None:
            ring = self.ring_length
            written = torch.arange(max(0, prompt_length - ring), prompt_length, device=real.device)
            self.ring_positions[written % ring] = written
            self.ring_real[:, written % ring] = real[:, written]


def step_masks(key_real, ring_positions, ring_real, cache_position, positions, chunk: int | None):
    """Mark the new token's slot real and say which slots it may attend to in the chunked layers.

    key_real (batch, cache_length), ring_positions (ring,) and ring_real (batch, ring) are
    updated in place; cache_position (1,) is the new token's slot in full layers, positions
    (batch,) its position in each row. Returns the ring slot (1,) and the chunked layers' mask
    (batch, ring), or (None, None) for a model without chunked layers. Tensor arithmetic only
    (index_fill_/index_copy_: a Python value assigned by indexing would be a host-to-device
    copy, which graph capture refuses), so it compiles into the captured step.
    """
    key_real.index_fill_(1, cache_position, True)
    if ring_positions is None:
        return None, None
    ring_slot = cache_position % ring_positions.shape[0]  # (1,)
    ring_positions.index_copy_(0, ring_slot, cache_position)
    ring_real.index_fill_(1, ring_slot, True)
    # A chunk starts at each row's first real token: the query's chunk began (its position %
    # chunk) slots ago.
    chunk_start = cache_position - positions % chunk  # (batch,)
    held = ring_positions[None, :]  # (1, ring)
    ring_allowed = ring_real & (held >= chunk_start[:, None]) & (held <= cache_position)
    return ring_slot, ring_allowed


class DecodeCache:
    """What one decode step sees of the buffers: where the new token goes and which keys it may
    see (`step_masks`, computed once for all layers)."""

    def __init__(self, buffers: DecodeBuffers, cache_position: torch.Tensor, positions: torch.Tensor,
                 masks=step_masks):
        self.buffers = buffers
        self.cache_position = cache_position  # (1,): the new token's slot in full layers
        self.ring_slot, self.ring_allowed = masks(buffers.key_real, buffers.ring_positions, buffers.ring_real,
                                                  cache_position, positions, buffers.chunk)
        self.full_allowed = buffers.key_real  # (batch, cache_length)

    def layer(self, layer_idx: int):
        """The layer's keys and values (batch, kv_heads, slots, head_dim), the slot (1,) where its
        new key/value goes, and which slots the new token may attend to (batch, slots)."""
        keys, values = self.buffers.keys[layer_idx], self.buffers.values[layer_idx]
        if self.buffers.windows[layer_idx] is None:
            return keys, values, self.cache_position, self.full_allowed
        return keys, values, self.ring_slot, self.ring_allowed


class FastCache(Cache):
    """The same buffers through the ordinary Cache interface, for the eager forwards (prefill).

    Full layers return the written prefix of their buffer, so an unpadded prefill stays plain
    causal attention (sdpa's fused kernels). Ring layers return what is left of the current
    window followed by the new keys, and keep the newest `ring_length` of them.
    """

    def __init__(self, buffers: DecodeBuffers):
        self.buffers = buffers
        self._seen = [0] * len(buffers.keys)

    def _window(self, layer_idx: int) -> int | None:
        return self.buffers.windows[layer_idx]

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        keys, values = self.buffers.keys[layer_idx], self.buffers.values[layer_idx]
        start, new = self._seen[layer_idx], key_states.shape[-2]
        window = self._window(layer_idx)
        if window is None:
            if start + new > keys.shape[2]:
                raise ValueError(f"the fast path's cache holds {keys.shape[2]} positions; {start + new} were asked for")
            keys[:, :, start : start + new] = key_states
            values[:, :, start : start + new] = value_states
            self._seen[layer_idx] = start + new
            return keys[:, :, : start + new], values[:, :, : start + new]
        device, ring = keys.device, keys.shape[2]
        if ring < window and start + new > ring:  # a ring shorter than the chunk must never wrap
            raise ValueError(f"the fast path's ring holds {ring} positions; {start + new} were asked for")
        kept = torch.arange(max(0, start - window), start, device=device)  # positions of this window so far
        all_keys = torch.cat([keys[:, :, kept % ring], key_states], dim=2)
        all_values = torch.cat([values[:, :, kept % ring], value_states], dim=2)
        written = torch.arange(max(start, start + new - ring), start + new, device=device)
        keys[:, :, written % ring] = key_states[:, :, written - start]
        values[:, :, written % ring] = value_states[:, :, written - start]
        self._seen[layer_idx] = start + new
        return all_keys, all_values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen[layer_idx]

    def get_max_cache_shape(self) -> int:
        return self.buffers.key_real.shape[1]

    def _stored(self, layer_idx: int) -> int:
        window = self._window(layer_idx)
        return self._seen[layer_idx] if window is None else min(self._seen[layer_idx], window)

    def kv_length(self, layer_idx: int, query_length: int) -> int:
        return self._stored(layer_idx) + query_length

    def kv_offset(self, layer_idx: int) -> int:
        return self._seen[layer_idx] - self._stored(layer_idx)

    def _tensors(self):
        return [self.buffers.keys, self.buffers.values]


def _decode(model, masks, tokens, positions, cache_position, keys, values, windows, key_real, ring_positions, ring_real,
            advance: bool = True):
    """The captured function: rebuild the cache view from flat tensors, run the model's step, and
    (advance) move positions and cache_position on to the next token (in place: the graph's
    inputs; greedy decoding's tail does that itself, in its own kernel)."""
    buffers = DecodeBuffers(keys, values, windows, key_real, ring_positions, ring_real)
    cache = DecodeCache(buffers, cache_position, positions, masks)
    logits = model.decode_step(tokens, positions, cache)  # (batch, vocab), float32
    if advance:
        positions.add_(1)
        cache_position.add_(1)
    return logits


def compile_units(model, layers) -> list[tuple[object, str]]:
    """The pieces of a decode step the fast path compiles, as (owner, method name): the model's
    `decode_embed`, each layer's `decode`, the model's `decode_head`."""
    return [(model, "decode_embed"), *((layer, "decode") for layer in layers), (model, "decode_head")]


def fast_path_unsupported(model, config, *, past_key_values, extra_outputs: bool) -> str | None:
    """Why generate() cannot take the fast path here, or None when it can."""
    device = model.device
    if config.disable_compile:
        return "disable_compile=True"
    if os.environ.get("HERD_DISABLE_FAST_PATH"):
        return "HERD_DISABLE_FAST_PATH is set"
    if device.type not in FAST_DEVICES:
        return f"the model is on {device.type}"
    if not hasattr(model, "decode_step"):
        return f"{type(model).__name__} has no decode_step"
    if past_key_values is not None:
        return "a cache was passed in"
    if extra_outputs:
        return "attentions or hidden states were asked for"
    if model.training:
        return "the model is in training mode"
    if config.cache_implementation not in (None, "static", "hybrid"):
        return f"cache_implementation={config.cache_implementation!r}"
    text_config = model.config.get_text_config()
    rope_type = getattr(text_config, "rope_parameters", {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        return f"rope_type {rope_type!r} depends on the sequence length"
    return None


@dataclass
class _Entry:
    """Buffers and graph for one (batch, cache length, dtype, device)."""

    key: tuple
    buffers: DecodeBuffers
    tokens: torch.Tensor
    positions: torch.Tensor
    cache_position: torch.Tensor
    graph: Any = None
    logits: torch.Tensor | None = None
    # greedy decoding's own graph: the step, then the argmax written back as the next step's
    # tokens and into chosen (batch, cache length) at the token's slot
    greedy_graph: Any = None
    chosen: torch.Tensor | None = None
    pool: Any = None  # the memory pool both graphs share (never replayed at the same time)

    def chosen_buffer(self) -> torch.Tensor:
        if self.chosen is None:
            batch, length = self.key[0], self.key[1]
            self.chosen = torch.zeros(batch, length, dtype=torch.long, device=self.tokens.device)
        return self.chosen


class FastDecoder:
    """One per model: the compiled step, and buffers + graph for the latest shape."""

    def __init__(self, model, compile: bool | None = None, capture: bool | None = None):
        self.model = model
        # None: decided per call from the device (compile and capture on CUDA, neither elsewhere).
        self.compile_override, self.capture_override = compile, capture
        self.use_compile = self.capture = False
        self.entry: _Entry | None = None
        self.slot = 0  # the cache slot of the next step's token (the device has its own copy)
        self.masks = step_masks
        self.captures = 0  # graphs captured so far (a new shape re-captures, it does not recompile)
        text_config = model.config.get_text_config()
        self.windows = tuple(layer_windows(model.config))
        self.num_layers = text_config.num_hidden_layers
        self.kv_heads = text_config.num_key_value_heads
        self.head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads

    def _allocate(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> DecodeBuffers:
        chunk = next((w for w in self.windows if w is not None), None)
        ring = None if chunk is None else min(chunk, length)
        keys, values = [], []
        for window in self.windows:
            shape = (batch, self.kv_heads, length if window is None else ring, self.head_dim)
            keys.append(torch.zeros(shape, dtype=dtype, device=device))
            values.append(torch.zeros(shape, dtype=dtype, device=device))
        return DecodeBuffers(
            keys,
            values,
            self.windows,
            key_real=torch.zeros(batch, length, dtype=torch.bool, device=device),
            ring_positions=None if ring is None else torch.full((ring,), -1, dtype=torch.long, device=device),
            ring_real=None if ring is None else torch.zeros(batch, ring, dtype=torch.bool, device=device),
        )

    def start(self, batch: int, max_length: int) -> FastCache:
        """A fresh cache for one generate() call of `batch` rows and up to `max_length` positions."""
        units = self.model.prepare_decode_step()
        dtype, device = self.model.dtype, self.model.device
        is_cuda = device.type == "cuda"
        self.use_compile = is_cuda and not os.environ.get("HERD_FAST_PATH_NO_COMPILE") if self.compile_override is None else self.compile_override
        self.capture = is_cuda if self.capture_override is None else self.capture_override
        if self.use_compile:
            self._compile(units)
        self.masks = compiled_once(step_masks) if self.use_compile else step_masks
        length = cache_bucket(max_length)
        key = (batch, length, dtype, device)
        if self.entry is None or self.entry.key != key:
            self.entry = None  # free the old buffers and graph before allocating new ones
            self.entry = _Entry(
                key=key,
                buffers=self._allocate(batch, length, dtype, device),
                tokens=torch.zeros(batch, dtype=torch.long, device=device),
                positions=torch.zeros(batch, dtype=torch.long, device=device),
                cache_position=torch.zeros(1, dtype=torch.long, device=device),
            )
        self.entry.buffers.reset()
        return FastCache(self.entry.buffers)

    def _compile(self, units) -> None:
        """Compile each piece of the step, (owner, method name), in place (regional compilation):
        layers of one structure share the compiled code (their weights are inputs, not
        constants), so compile time does not grow with depth.

        At batch 1 to 4, Llama's projections run layers/gemv.py's kernels. Elsewhere (larger batches,
        Llama 4's layers) coordinate-descent tuning is what makes inductor decompose one-row
        matmuls into its own reductions (with the norm before them and the residual add or
        activation after them fused in, and routed experts read by index in place);
        HERD_FAST_PATH_NO_TUNING=1 leaves them to cuBLAS and compiles faster.
        """
        # Each (model shape, dtype, batch size, layer kind) adds an entry to the shared code's
        # cache; dynamo's default limit of 8 is soon reached by a process that runs a few models.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # combo_kernels: the small independent kernels of a layer launch as one (Llama 4's rotary
        # of q and k and the cache writes; Llama's q/k/v kernel does those in its epilogue)
        options = {"coordinate_descent_tuning": not os.environ.get("HERD_FAST_PATH_NO_TUNING"), "combo_kernels": True}
        for owner, name in units:
            if name not in owner.__dict__:  # not compiled yet
                setattr(owner, name, torch.compile(getattr(owner, name), fullgraph=True, dynamic=False, options=options))

    def _arguments(self) -> tuple:
        entry = self.entry
        buffers = entry.buffers
        return (self.model, self.masks, entry.tokens, entry.positions, entry.cache_position, buffers.keys,
                buffers.values, buffers.windows, buffers.key_real, buffers.ring_positions, buffers.ring_real)

    def _mark_dynamic(self) -> None:
        # The cache length is a dynamic dimension: a new bucket re-captures but does not recompile.
        if self.use_compile:
            buffers = self.entry.buffers
            length = buffers.key_real.shape[1]
            for tensor in buffers.keys + buffers.values:
                if tensor.shape[2] == length:
                    torch._dynamo.mark_dynamic(tensor, 2)
            torch._dynamo.mark_dynamic(buffers.key_real, 1)
            if buffers.ring_length == length:  # a ring as long as the cache grows with it
                torch._dynamo.mark_dynamic(buffers.ring_positions, 0)
                torch._dynamo.mark_dynamic(buffers.ring_real, 1)

    def begin(self, positions: torch.Tensor, cache_position: int) -> None:
        """After prefill: the first decode step is for positions (batch,), at slot cache_position.
        Each step moves both on by one itself."""
        self.entry.positions.copy_(positions)
        self.entry.cache_position.fill_(cache_position)
        self.slot = cache_position  # the host's copy: where the next step's token goes

    def greedy_steps(self, tokens: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy decoding of `steps` tokens from `tokens` (batch,): the argmax of each step is
        the next step's input without leaving the device, and nothing else runs between the
        replays (no host-launched argmax, copy or concatenation per token). Returns (batch, steps)."""
        entry = self.entry
        entry.tokens.copy_(tokens)
        first = self.slot
        if not self.capture:
            for _ in range(steps):
                _greedy_tail(_decode(*self._arguments(), advance=False), entry.tokens, entry.chosen_buffer(),
                             entry.positions, entry.cache_position)
        else:
            if entry.greedy_graph is None:
                self._capture(greedy=True)
            for _ in range(steps):
                entry.greedy_graph.replay()
        self.slot += steps
        return entry.chosen_buffer()[:, first : first + steps]

    def step(self, tokens: torch.Tensor, copy: bool = True) -> torch.Tensor:
        """Logits (batch, vocab), float32, for `tokens` (batch,) at the current positions. With
        copy=False the result is the graph's own output, overwritten by the next step."""
        entry = self.entry
        entry.tokens.copy_(tokens)
        self.slot += 1
        if not self.capture:
            self._mark_dynamic()
            return _decode(*self._arguments())
        if entry.graph is None:
            self._capture()
        entry.graph.replay()
        return entry.logits.clone() if copy else entry.logits

    def _capture(self, greedy: bool = False) -> None:
        """Warm up (compiling on the first call) and capture the step as one CUDA graph (with
        greedy=True, the step and the choice of its token: `greedy_steps`).

        Each warm-up run is the real first step (positions reset before it): writing the same
        key/value to the same slot twice leaves the cache as one run would. Capture itself runs
        nothing; the first replay takes the step.
        """
        entry = self.entry
        self._mark_dynamic()
        positions, cache_position = entry.positions.clone(), entry.cache_position.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        tokens = entry.tokens.clone()
        chosen = entry.chosen_buffer() if greedy else None
        if greedy and self.use_compile:  # as long as the cache: the next bucket must not recompile
            torch._dynamo.mark_dynamic(chosen, 1)
        tail = (compiled_once(_greedy_tail) if self.use_compile else _greedy_tail) if greedy else None

        def run():
            logits = _decode(*self._arguments(), advance=not greedy)
            if greedy:
                tail(logits, entry.tokens, chosen, entry.positions, entry.cache_position)
            return logits

        def rewind():
            entry.tokens.copy_(tokens)
            entry.positions.copy_(positions)
            entry.cache_position.copy_(cache_position)

        with torch.cuda.stream(side):
            for _ in range(2):
                rewind()
                run()
            rewind()
        torch.cuda.current_stream().wait_stream(side)
        if entry.pool is None:
            entry.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=entry.pool):
            logits = run()
        if greedy:
            entry.greedy_graph = graph
        else:
            entry.graph, entry.logits = graph, logits
        self.captures += 1


def _greedy_tail(logits: torch.Tensor, tokens: torch.Tensor, chosen: torch.Tensor, positions: torch.Tensor,
                 cache_position: torch.Tensor) -> None:
    """After a step: its argmax becomes the next input and is kept at the step's slot of chosen
    (batch, cache length); positions and cache_position move on to the next token."""
    next_tokens = argmax_in_pieces(logits)  # (batch,)
    tokens.copy_(next_tokens)
    chosen.index_copy_(1, cache_position, next_tokens[:, None])
    positions.add_(1)
    cache_position.add_(1)


def argmax_in_pieces(logits: torch.Tensor, pieces: int = 256) -> torch.Tensor:
    """logits (batch, vocab) -> (batch,): argmax(dim=-1), the first index of the largest value,
    as the largest of each of `pieces` slices and then the largest of those. Compiled, a one-row
    argmax over a vocabulary is one program walking 128256 values (24 us on an H100, 2% of a 1B
    step); the slices spread that over the GPU."""
    batch, vocab = logits.shape
    width = -(-vocab // pieces)
    padded = torch.nn.functional.pad(logits, (0, width * pieces - vocab), value=float("-inf"))
    largest, within = padded.view(batch, pieces, width).max(dim=-1)  # (batch, pieces) each
    piece = largest.argmax(dim=-1, keepdim=True)  # (batch, 1): the first slice holding the maximum
    return (piece * width + within.gather(1, piece)).squeeze(1)


@functools.cache
def compiled_once(fn):
    """fn compiled once per process (whole graph, static shapes but for dimensions marked
    dynamic): it holds no weights, so every model shares it (step_masks, _greedy_tail)."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


def fast_decoder(model) -> FastDecoder:
    """The model's FastDecoder, made on first use (kept outside the module tree: not a submodule)."""
    decoder = model.__dict__.get("_fast_decoder")
    if decoder is None or decoder.model is not model:
        decoder = FastDecoder(model)
        model.__dict__["_fast_decoder"] = decoder
    return decoder
