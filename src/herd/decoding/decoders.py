"""The two decoders generate() runs: the reference forward over a growing cache, or a family's
decode plan compiled and captured over fixed KV stores. Both do the same three things:

- `start(batch, max_length)`: a fresh cache for one generate() call;
- `prefill(tokens, attention_mask, step_inputs)`: the prompt -> logits of its last token;
- `step(tokens)`: one new token per row -> its logits (batch, vocab), float32;
- `greedy_steps(tokens, steps)`: that many greedy tokens (batch, steps), each the next input.

`choose_decoder` picks one per call and says why the fast one was not taken. With
`use_cache=False` the plain decoder keeps no cache: each step runs the reference forward over the
whole sequence again, as transformers does (rope types that depend on the length, "dynamic" and
"longrope", then rotate every position with the frequencies of the current length).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import Cache, DynamicCache, StaticCache
from ..parallel.device_map import split_reason
from .graphs import CapturedStep, cache_bucket, compile_units, compiled_once, greedy_tail
from .kv import ContiguousKV, DecodeKV, PrefillCache, RingKV
from .plans import CHUNKED, FULL, DecodePlan, plan_for

logger = logging.getLogger("herd")

SYNC_INTERVAL = 16  # tokens between host checks of "is every row done?" on the fast path
# Longer prompts are prefilled in pieces of this many tokens: activation memory bounded by the piece.
# Larger pieces keep the matmuls and cuDNN's attention busier: Llama-3.1-8B's 122,880-token prompt
# took 12.2 s in pieces of 4096, 11.3 in 8192, 10.8 in 16384, for 2.5 GiB more at its peak
# (bench/RESULTS.md, 2026-11-30 sixth session).
PREFILL_CHUNK = 16384
# Devices on which generate() takes the fast path by default (tests add "cpu" to run it uncaptured).
FAST_DEVICES = ("cuda",)
# cache_implementation values that mean fixed shapes (None: the default, fast where it applies).
FIXED_SHAPE_CACHES = (None, "static", "hybrid")


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token among its row's real tokens; padding gets 1 (it is masked anyway)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def forward_tokens(model, tokens: torch.Tensor, attention_mask: torch.Tensor, cache: Cache,
                   logits_to_keep: int | torch.Tensor = 1, **kwargs: Any):
    """The reference forward on `tokens` (batch, new) given everything before them in `cache`; the
    logits of the last token (or of the new tokens' indices `logits_to_keep` (kept,))."""
    positions = positions_from_mask(attention_mask)[:, -tokens.shape[1] :]
    return model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                 use_cache=True, logits_to_keep=logits_to_keep, return_dict=True, **kwargs)


def prefill_tokens(model, tokens: torch.Tensor, attention_mask: torch.Tensor, cache: Cache, chunk: int | None,
                   **kwargs: Any):
    """The prompt's new tokens (batch, new) into `cache`, `chunk` tokens at a time: each piece attends
    to the cache and itself, so activation memory is bounded by the chunk, not the prompt. One
    forward when chunk is None or the prompt is shorter, and when images or extra outputs come with
    the prompt (`kwargs`: they go in with the whole prompt)."""
    if chunk is None or kwargs or tokens.shape[1] <= chunk:
        return forward_tokens(model, tokens, attention_mask, cache, **kwargs)
    past = attention_mask.shape[1] - tokens.shape[1]
    for start in range(0, tokens.shape[1], chunk):
        end = min(start + chunk, tokens.shape[1])
        outputs = forward_tokens(model, tokens[:, start:end], attention_mask[:, : past + end], cache)
    return outputs


def why_not_fast(model, config, *, past_key_values, extra_outputs: bool) -> str | None:
    """Why generate() cannot take the fast path here, or None when it can."""
    if config.use_cache is False:
        return "use_cache=False asks for the whole sequence to be recomputed at every step"
    if config.disable_compile:
        return "disable_compile=True"
    if os.environ.get("HERD_DISABLE_FAST_PATH"):
        return "HERD_DISABLE_FAST_PATH is set"
    split = split_reason(model)
    if split is not None:
        return split
    if model.device.type not in FAST_DEVICES:
        return f"the model is on {model.device.type}"
    if plan_for(model) is None:
        return f"{type(model).__name__} has no decode plan"
    if any(getattr(getattr(module, "scheme", None), "block", None) for module in model.modules()):
        return "block-scaled FP8 weights (the decode kernels read row-scaled and grouped formats)"
    if past_key_values is not None:
        return "a cache was passed in"
    if extra_outputs:
        return "attentions or hidden states were asked for"
    if model.training:
        return "the model is in training mode"
    if config.cache_implementation not in FIXED_SHAPE_CACHES:
        return f"cache_implementation={config.cache_implementation!r} asks for a cache that grows"
    text_config = model.config.get_text_config()
    rope_type = getattr(text_config, "rope_parameters", {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        return f"rope_type {rope_type!r} depends on the sequence length"
    return None


class NoCache:
    """What PlainDecoder.start returns under use_cache=False: no keys or values, only the tokens so
    far (the whole sequence goes through the model at every step). Beam search reorders it as it
    would reorder a cache."""

    def __init__(self):
        self.tokens: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # nothing is cached: prefill gets the whole prompt

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.tokens = self.tokens[beam_idx.to(self.tokens.device)]


class PlainDecoder:
    """The reference forward, one call per step, over a DynamicCache (or StaticCache for
    cache_implementation="static"/"hybrid", or the cache passed in), or over the whole sequence
    each step under use_cache=False. Returns each step's model outputs too (attentions, hidden
    states)."""

    sync_interval = 1

    def __init__(self, model, config, past_key_values: Cache | None, forward_kwargs: dict[str, Any]):
        self.model, self.config = model, config
        self.given_cache = past_key_values
        self.forward_kwargs = forward_kwargs
        self.cache: Cache | None = None
        self.attention_mask = self.extra = None

    def start(self, batch: int, max_length: int) -> Cache | NoCache:
        if self.config.use_cache is False:
            if self.given_cache is not None:
                raise ValueError("generate() got past_key_values and use_cache=False: pass one or the other")
            self.cache = NoCache()
        elif self.given_cache is not None:
            if not isinstance(self.given_cache, Cache):
                raise TypeError("past_key_values passed to generate() must be a herd Cache")
            self.cache = self.given_cache
        elif self.config.cache_implementation in ("static", "hybrid") or self.config.kv_cache_dtype is not None:
            # chunked layers keep a bounded window in either (what "hybrid" asks for); cache_config's
            # dtype (FP8) is the full layers' storage
            self.cache = StaticCache(self.model.config, max_cache_len=max_length, max_batch_size=batch,
                                     dtype=self.config.kv_cache_dtype)
        else:
            self.cache = DynamicCache(self.model.config)
        return self.cache

    def prefill(self, tokens, attention_mask, extra: dict[str, Any]):
        """tokens: what the cache has not seen yet of the prompt. Returns (logits (batch, vocab), outputs)."""
        self.attention_mask, self.extra = attention_mask, extra
        if isinstance(self.cache, NoCache):
            self.cache.tokens = tokens
            return self._recompute()
        step_inputs = self.model._inputs_for_step(extra, True, attention_mask.shape[1])
        outputs = prefill_tokens(self.model, tokens, attention_mask, self.cache, self.config.prefill_chunk_size,
                                 **step_inputs, **self.forward_kwargs)
        return outputs.logits[:, -1, :].to(torch.float32), outputs

    def _recompute(self):
        """use_cache=False: the whole sequence through the model, every input as at prefill."""
        mask = self.attention_mask
        step_inputs = self.model._inputs_for_step(self.extra, True, mask.shape[1])
        outputs = self.model(input_ids=self.cache.tokens, attention_mask=mask, position_ids=positions_from_mask(mask),
                             use_cache=False, logits_to_keep=1, return_dict=True, **step_inputs, **self.forward_kwargs)
        return outputs.logits[:, -1, :].to(torch.float32), outputs

    def step(self, tokens: torch.Tensor, copy: bool = True):
        mask = self.attention_mask
        self.attention_mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        if isinstance(self.cache, NoCache):
            self.cache.tokens = torch.cat([self.cache.tokens, tokens[:, None]], dim=-1)
            return self._recompute()
        step_inputs = self.model._inputs_for_step(self.extra, False, self.attention_mask.shape[1])
        outputs = forward_tokens(self.model, tokens[:, None], self.attention_mask, self.cache, **step_inputs,
                                 **self.forward_kwargs)
        return outputs.logits[:, -1, :].to(torch.float32), outputs

    def greedy_steps(self, tokens: torch.Tensor, steps: int) -> torch.Tensor:
        chosen = []
        for _ in range(steps):
            tokens = self.step(tokens)[0].argmax(dim=-1)
            chosen.append(tokens)
        return torch.stack(chosen, dim=1)


@dataclass
class _Entry:
    """Stores and graphs for one (batch, cache length, dtype, device): a graph is bound to the
    addresses of the buffers it was captured on."""

    key: tuple
    kv: DecodeKV
    tokens: torch.Tensor  # (batch,): the step's input tokens
    positions: torch.Tensor  # (batch,): their positions in each row
    cache_position: torch.Tensor  # (1,): their slot in the full-attention stores
    chosen: torch.Tensor  # (batch, cache length): greedy tokens, at the slot of the step that chose them
    graphs: dict  # (greedy, plan's shape key) -> CapturedStep
    pool: Any = None  # the memory pool the graphs share (never replayed at the same time)


class FastDecoder:
    """One per model: the plan, its compiled units, and the stores + graphs of the latest shape."""

    def __init__(self, model, plan: DecodePlan, compile: bool | None = None, capture: bool | None = None):
        self.model, self.plan = model, plan
        # None: decided per call from the device (compile and capture on CUDA, neither elsewhere).
        self.compile_override, self.capture_override = compile, capture
        self.use_compile = self.capture = False
        self.prefill_chunk = PREFILL_CHUNK  # tokens per prefill forward (generate's prefill_chunk_size)
        self.kv_cache_dtype: torch.dtype | None = None  # the full layers' storage (FP8: generate's cache_config)
        self.run: dict | None = None  # the plan's units, compiled when `run_is_compiled`
        self.run_is_compiled = False
        self.entry: _Entry | None = None
        self.slot = 0  # the cache slot of the next step's token (the device has its own copy)
        self.captures = 0  # graphs captured so far (a new shape re-captures, it does not recompile)
        self.prefill_cache: PrefillCache | None = None

    @property
    def sync_interval(self) -> int:
        return SYNC_INTERVAL

    def _allocate(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> DecodeKV:
        kinds = self.plan.attention_kinds()
        kv_heads, head_dim = self.plan.kv_shape
        full = ContiguousKV([i for i, kind in enumerate(kinds) if kind == FULL], batch, kv_heads, head_dim, length,
                            dtype, device, compiled=self.use_compile, cache_dtype=self.kv_cache_dtype)
        chunked = [i for i, kind in enumerate(kinds) if kind == CHUNKED]
        ring = None
        if chunked:
            chunk = self.plan.chunk_size
            ring = RingKV(chunked, batch, kv_heads, head_dim, min(chunk, length), chunk, dtype, device,
                          compiled=self.use_compile)
        return DecodeKV(full, ring)

    def start(self, batch: int, max_length: int) -> PrefillCache:
        """A fresh cache for one generate() call of `batch` rows and up to `max_length` positions."""
        self.plan.prepare()
        dtype, device = self.model.dtype, self.model.device
        is_cuda = device.type == "cuda"
        self.use_compile = is_cuda if self.compile_override is None else self.compile_override
        self.capture = is_cuda if self.capture_override is None else self.capture_override
        if self.run is None or self.run_is_compiled != self.use_compile:
            units = self.plan.units()
            self.run = compile_units(units) if self.use_compile else units
            self.run_is_compiled = self.use_compile
        length = cache_bucket(max_length)
        key = (batch, length, dtype, device, self.kv_cache_dtype)
        if self.entry is None or self.entry.key != key:
            self.entry = None  # free the old buffers and graphs before allocating new ones
            self.entry = _Entry(
                key=key,
                kv=self._allocate(batch, length, dtype, device),
                tokens=torch.zeros(batch, dtype=torch.long, device=device),
                positions=torch.zeros(batch, dtype=torch.long, device=device),
                cache_position=torch.zeros(1, dtype=torch.long, device=device),
                chosen=torch.zeros(batch, length, dtype=torch.long, device=device),
                graphs={},
            )
        self.entry.kv.reset()
        self.prefill_cache = PrefillCache(self.entry.kv)
        return self.prefill_cache

    def prefill(self, tokens: torch.Tensor, attention_mask: torch.Tensor, extra: dict[str, Any]):
        """The prompt through the reference forward into the stores, in pieces of `prefill_chunk`
        tokens (generate's prefill_chunk_size, PREFILL_CHUNK by default) when long. Images go in
        with the whole prompt."""
        step_inputs = self.model._inputs_for_step(extra, True, attention_mask.shape[1])
        cache = self.prefill_cache
        with self.plan.prefilling():
            outputs = prefill_tokens(self.model, tokens, attention_mask, cache, self.prefill_chunk, **step_inputs)
        kv = self.entry.kv
        kv.mark_prompt(attention_mask)
        self.plan.after_prefill(kv, cache, step_inputs)
        # the first new token: one past each row's last position, at the next slot
        self.entry.positions.copy_(positions_from_mask(attention_mask)[:, -1] + 1)
        self.entry.cache_position.fill_(attention_mask.shape[1])
        self.slot = attention_mask.shape[1]  # the host's copy: where the next step's token goes
        return outputs.logits[:, -1, :].to(torch.float32), outputs

    def _decode(self, advance: bool) -> torch.Tensor:
        """One step on the entry's buffers: (advance) positions and cache_position move on after it
        (in place: the graph's inputs; greedy decoding's tail does that itself)."""
        entry = self.entry
        entry.kv.begin_step(entry.cache_position, entry.positions)
        logits = self.plan.step(self.run, entry.tokens, entry.positions, entry.kv)  # (batch, vocab), float32
        if advance:
            entry.positions.add_(1)
            entry.cache_position.add_(1)
        return logits

    def _greedy_decode(self) -> None:
        entry = self.entry
        tail = compiled_once(greedy_tail) if self.use_compile else greedy_tail
        tail(self._decode(advance=False), entry.tokens, entry.chosen, entry.positions, entry.cache_position)

    def _mark_dynamic(self) -> None:
        # The cache length is a dynamic dimension: a new bucket re-captures but does not recompile.
        if self.use_compile:
            for tensor, dim in self.entry.kv.dynamic_dims() + [(self.entry.chosen, 1)]:
                torch._dynamo.mark_dynamic(tensor, dim)

    def _graph(self, greedy: bool) -> CapturedStep:
        """The captured step (greedy: the step and the choice of its token) for the current shape."""
        entry = self.entry
        key = (greedy, self.plan.shape_key(entry.kv))
        if key not in entry.graphs or entry.graphs[key].released:  # released: see graphs.release_captured
            self._mark_dynamic()
            saved = entry.tokens.clone(), entry.positions.clone(), entry.cache_position.clone()

            def rewind():
                for tensor, value in zip((entry.tokens, entry.positions, entry.cache_position), saved):
                    tensor.copy_(value)

            run = self._greedy_decode if greedy else lambda: self._decode(advance=True)
            entry.graphs[key] = CapturedStep(run, rewind, entry.pool)
            entry.pool = entry.graphs[key].pool
            self.captures += 1
        return entry.graphs[key]

    def greedy_steps(self, tokens: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy decoding of `steps` tokens from `tokens` (batch,): the argmax of each step is
        the next step's input without leaving the device, and nothing else runs between the
        replays. Returns (batch, steps)."""
        entry = self.entry
        entry.tokens.copy_(tokens)
        first = self.slot
        if self.capture:
            graph = self._graph(greedy=True)
            for _ in range(steps):
                graph.replay()
        else:
            for _ in range(steps):
                self._greedy_decode()
        self.slot += steps
        return entry.chosen[:, first : first + steps]

    def step(self, tokens: torch.Tensor, copy: bool = True):
        """Logits (batch, vocab), float32, for `tokens` (batch,) at the current positions, and no
        model outputs. With copy=False the logits are the graph's own output, overwritten by the
        next step."""
        self.entry.tokens.copy_(tokens)
        self.slot += 1
        if not self.capture:
            self._mark_dynamic()
            return self._decode(advance=True), None
        logits = self._graph(greedy=False).replay()
        return (logits.clone() if copy else logits), None


def fast_decoder(model) -> FastDecoder:
    """The model's FastDecoder, made on first use (kept outside the module tree: not a submodule)."""
    decoder = model.__dict__.get("_fast_decoder")
    if decoder is None or decoder.model is not model:
        decoder = FastDecoder(model, plan_for(model))
        model.__dict__["_fast_decoder"] = decoder
    return decoder


def choose_decoder(model, config, *, past_key_values, forward_kwargs: dict[str, Any]):
    """The fast decoder where it applies, else the plain one; logs why the fast one was not taken
    on a GPU."""
    reason = why_not_fast(model, config, past_key_values=past_key_values, extra_outputs=bool(forward_kwargs))
    if reason is None:
        decoder = fast_decoder(model)
        decoder.prefill_chunk = config.prefill_chunk_size or PREFILL_CHUNK
        decoder.kv_cache_dtype = config.kv_cache_dtype
        return decoder
    if model.device.type == "cuda":
        logger.info("generate(): plain decoding, not the fast path: %s", reason)
    return PlainDecoder(model, config, past_key_values, forward_kwargs)
