"""Key/value caches behind one small interface.

Attention asks a cache one thing: "store these keys/values for this layer, and give me back
everything this layer may attend to". Masks ask how long that is (`kv_length`). The model never
asks which kind of cache it holds.

- `DynamicCache` grows by concatenation: the default, no size to choose up front.
- `StaticCache` is preallocated to `max_cache_len`, with fixed shapes so that a decode step can
  be compiled and graph-captured once; keys past what was written are hidden by the causal mask.

Layers of chunked local attention (Llama 4: 3 of every 4 layers) only ever attend within a chunk
of `attention_chunk_size` positions, so both kinds keep just the last `attention_chunk_size`
positions for them (what the reference calls a hybrid cache); full layers keep everything.
`kv_offset` says which position the first key returned holds.

FP8 keys/values: `StaticCache(..., dtype=torch.float8_e4m3fn)` (from generate():
`cache_config={"dtype": "float8_e4m3fn"}`) stores the full-attention layers in e4m3, one byte per
element, with a float32 scale per key/value head of each token (`fp8_quantize`); the chunked
layers' short windows stay in the model's dtype. Attention reads them dequantized.

Offloading (`offloading=True`, transformers' argument): a layer's keys/values wait in CPU memory
between two of its updates and come back to the device of the new keys when the layer runs, so
the accelerator holds about one layer's cache at a time (`offload_only_non_sliding`: the small
chunked-layer windows stay put). The copy back starts when the layer's update comes, not ahead
of it on a side stream as transformers does, and the copy out is waited for: the same memory
saving, more waiting.

The constructors take transformers 5.17's arguments (`DynamicCache(ddp_cache_data, config=,
offloading=, offload_only_non_sliding=)`, `StaticCache(config, max_cache_len, offloading=,
offload_only_non_sliding=)`), plus StaticCache's older `max_batch_size` / `device` / `dtype`.

Later kinds (Mllama's cross-attention cache, a paged cache) plug in by implementing the same
methods.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .decoding.visibility import kept_positions

logger = logging.getLogger(__name__)


class Cache:
    """The interface every cache implements."""

    # Kinds that do not call Cache.__init__ (the fast path's prefill caches) never offload.
    offloading: bool = False
    only_non_sliding: bool = True

    def __init__(
        self,
        layers: list | None = None,
        layer_class_to_replicate: type | None = None,
        offloading: bool = False,
        offload_only_non_sliding: bool = True,
    ):
        if layers is not None or layer_class_to_replicate is not None:
            name = "layers" if layers is not None else "layer_class_to_replicate"
            raise ValueError(f"herd's caches are not built from per-layer cache objects ({name}=...): build a "
                             "DynamicCache(config=...) or StaticCache(config=..., max_cache_len=...) instead")
        if type(self) is Cache:
            raise TypeError("Cache is the interface herd's caches share: build a DynamicCache(config=...) or a "
                            "StaticCache(config=..., max_cache_len=...)")
        self.offloading = bool(offloading)
        self.only_non_sliding = bool(offload_only_non_sliding)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (batch, kv_heads, new_tokens, head_dim) keys/values; return what the layer attends to."""
        raise NotImplementedError

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """How many positions this layer has seen."""
        raise NotImplementedError

    def get_max_cache_shape(self) -> int | None:
        """The most positions the cache can hold, or None when it grows without bound."""
        return None

    def kv_length(self, layer_idx: int, query_length: int) -> int:
        """How many key positions attention will see once `query_length` new ones are stored."""
        return self.get_seq_length(layer_idx) + query_length

    def kv_offset(self, layer_idx: int) -> int:
        """The position held by the first key the next update returns (0 unless a window dropped some)."""
        return 0

    # Generation helpers, shared by every kind that stores per-row tensors.
    def _tensors(self) -> list[list[torch.Tensor]]:
        return [self.key_cache, self.value_cache]

    # Cross-attention keys/values (Mllama): computed once from the image at prefill, then reused.
    def cross_attention_cache(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        if not hasattr(self, "_cross_key_values"):
            self._cross_key_values = {}
        return self._cross_key_values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder batch rows (beam search)."""
        for store in self._tensors():
            for i, tensor in enumerate(store):
                if tensor is not None and tensor.numel():
                    store[i] = tensor.index_select(0, beam_idx.to(tensor.device))
        cross = self.cross_attention_cache()
        for layer, (keys, values) in cross.items():
            cross[layer] = (keys.index_select(0, beam_idx.to(keys.device)), values.index_select(0, beam_idx.to(values.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for store in self._tensors():
            for i, tensor in enumerate(store):
                if tensor is not None:
                    store[i] = tensor.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for store in self._tensors():
            for i, tensor in enumerate(store):
                if tensor is not None:
                    store[i] = tensor[indices]

    # Offloading: a layer's stored tensors move to the CPU after its update and back before the next.
    def _is_windowed(self, layer_idx: int) -> bool:
        return False

    def _update(self, key_states, value_states, layer_idx, cache_kwargs):
        raise NotImplementedError

    def _update_offloaded(self, key_states, value_states, layer_idx, cache_kwargs):
        """`_update` with the layer's stored tensors on the keys' device, and back in CPU memory
        after when this layer is offloaded."""
        offloaded = self.offloading and not (self.only_non_sliding and self._is_windowed(layer_idx))
        if offloaded:
            self._move_layer(layer_idx, key_states.device)
        keys, values = self._update(key_states, value_states, layer_idx, cache_kwargs)
        if offloaded:
            self._move_layer(layer_idx, torch.device("cpu"))
        return keys, values

    def _move_layer(self, layer_idx: int, device: torch.device) -> None:
        for store in self._tensors():
            if layer_idx < len(store) and store[layer_idx] is not None and store[layer_idx].device != device:
                # Back to the device without waiting; to the CPU waiting for the copy, so that
                # the host may read the CPU tensor (beam reordering) at once.
                store[layer_idx] = store[layer_idx].to(device, non_blocking=device.type != "cpu")


FP8_KV_DTYPE = torch.float8_e4m3fn
# Spellings of the FP8 KV cache's dtype: torch's name, and vLLM's kv_cache_dtype names.
KV_CACHE_DTYPES = {"float8_e4m3fn": FP8_KV_DTYPE, "fp8": FP8_KV_DTYPE, "fp8_e4m3": FP8_KV_DTYPE}
FP8_MAX = 448.0  # the largest finite e4m3fn value


def kv_cache_dtype(value: Any) -> torch.dtype | None:
    """The storage dtype a `cache_config["dtype"]` names (None: the model's own)."""
    if value is None or value == FP8_KV_DTYPE:
        return value
    if isinstance(value, str) and value in KV_CACHE_DTYPES:
        return KV_CACHE_DTYPES[value]
    raise ValueError(f"KV cache dtype {value!r} is not supported; use one of {', '.join(KV_CACHE_DTYPES)} "
                     "(FP8 e4m3 keys/values with a scale per head) or leave it unset")


def fp8_quantize(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys or values (batch, kv_heads, tokens, head_dim) -> e4m3 of the same shape and float32
    scales (batch, kv_heads, tokens, 1): one per head of each token, its largest |value| / 448.

    A scale per token (not one fixed per head at the prompt) never saturates: a left-padded row's
    first prefill chunk may hold only padding, and later tokens may be larger than any before.
    It costs 4 bytes per head_dim bytes (3% at head_dim 128)."""
    states = states.float()
    scale = (states.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (states / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE), scale


def fp8_dequantize(stored: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (stored.float() * scale).to(dtype)


def layer_windows(config: Any) -> list[int | None]:
    """Per layer: how many recent positions it can attend to (None: all of them)."""
    if config is None:
        return []
    text_config = config.get_text_config()
    layer_types = getattr(text_config, "layer_types", None)
    chunk_size = getattr(text_config, "attention_chunk_size", None)
    if layer_types is None:
        return [None] * getattr(text_config, "num_hidden_layers", 0)
    return [chunk_size if kind == "chunked_attention" else None for kind in layer_types]


class DynamicCache(Cache):
    """A cache that grows by one concatenation per step.

    Full-attention layers hold every position; chunked layers hold only the last
    `attention_chunk_size` - 1 (what a later query sees besides its own key, as transformers'
    chunked layers keep), however long the sequence grows.
    """

    def __init__(
        self,
        ddp_cache_data: Any = None,
        config: Any = None,
        offloading: bool = False,
        offload_only_non_sliding: bool = False,
    ):
        """`ddp_cache_data`: (keys, values) or (keys, values, window) per layer to start from, as
        transformers takes it (a window, without a config, makes that layer keep only its last
        `window` - 1 positions). `config`: the model's config, whose chunked layers then keep only their
        window. A config given first, `DynamicCache(model.config)`, is taken as `config` (herd's
        earlier spelling; in transformers the first argument is ddp_cache_data)."""
        if config is None and hasattr(ddp_cache_data, "get_text_config"):
            ddp_cache_data, config = None, ddp_cache_data
        super().__init__(offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)
        self.key_cache: list[torch.Tensor] = []
        self.value_cache: list[torch.Tensor] = []
        self.windows = layer_windows(config)
        self._seen: list[int] = []
        for layer_idx, entry in enumerate(ddp_cache_data or ()):
            key_states, value_states = entry[0], entry[1]
            window = entry[2] if len(entry) > 2 else None
            if config is None and window is not None:
                self.windows += [None] * (layer_idx + 1 - len(self.windows))
                self.windows[layer_idx] = int(window)
            if key_states is not None and value_states is not None:
                self.update(key_states, value_states, layer_idx)

    def _window(self, layer_idx: int) -> int | None:
        return self.windows[layer_idx] if layer_idx < len(self.windows) else None

    def _is_windowed(self, layer_idx: int) -> bool:
        return self._window(layer_idx) is not None

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        return self._update_offloaded(key_states, value_states, layer_idx, cache_kwargs)

    def _update(self, key_states, value_states, layer_idx, cache_kwargs):
        while len(self.key_cache) <= layer_idx:
            self.key_cache.append(None)
            self.value_cache.append(None)
            self._seen.append(0)
        if self.key_cache[layer_idx] is None:
            keys, values = key_states, value_states
        else:
            keys = torch.cat([self.key_cache[layer_idx], key_states], dim=-2)
            values = torch.cat([self.value_cache[layer_idx], value_states], dim=-2)
        self._seen[layer_idx] += key_states.shape[-2]
        # A windowed layer keeps only what a later query can still see besides its own key: the
        # last window - 1 (transformers' dynamic chunked layers keep as many, so a decode step's
        # attention has the same columns); this call's queries still get everything, since a long
        # prefill needs keys older than the window.
        window = self._window(layer_idx)
        dropped = keys.shape[-2] - kept_positions(keys.shape[-2], None if window is None else max(window - 1, 0))
        self.key_cache[layer_idx] = keys[..., dropped:, :]
        self.value_cache[layer_idx] = values[..., dropped:, :]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen[layer_idx] if layer_idx < len(self._seen) else 0

    def stored_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.key_cache) or self.key_cache[layer_idx] is None:
            return 0
        return self.key_cache[layer_idx].shape[-2]

    def kv_length(self, layer_idx: int, query_length: int) -> int:
        return self.stored_length(layer_idx) + query_length

    def kv_offset(self, layer_idx: int) -> int:
        return self.get_seq_length(layer_idx) - self.stored_length(layer_idx)

    def reset(self) -> None:
        """Empty again, for another sequence (its layers' windows kept)."""
        self.key_cache, self.value_cache, self._seen = [], [], []

    def crop(self, max_length: int) -> None:
        """Keep only the first `max_length` positions (negative: drop that many from the end)."""
        if any(self.windows):
            raise NotImplementedError("crop() cannot bring back positions a windowed (chunked) layer dropped")
        if max_length < 0:
            max_length = self.get_seq_length() + max_length
        for store in self._tensors():
            for i, tensor in enumerate(store):
                store[i] = tensor[..., :max_length, :]
        self._seen = [min(seen, max_length) for seen in self._seen]

    # Iterating gives transformers' triples, (keys, values, the layer's window as a long tensor or
    # None), what DynamicCache(ddp_cache_data) takes back; indexing and the legacy format give the
    # tuple-of-(key, value)-per-layer older code passes around.
    def __len__(self) -> int:
        return len(self.key_cache)

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def __iter__(self):
        for layer_idx in range(len(self)):
            window = self._window(layer_idx)
            yield *self[layer_idx], None if window is None else torch.tensor(window, dtype=torch.long)

    def to_legacy_cache(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple(self[layer_idx] for layer_idx in range(len(self)))

    @classmethod
    def from_legacy_cache(cls, past_key_values) -> DynamicCache:
        return cls(past_key_values)  # no config: every layer is a full layer


class StaticCache(Cache):
    """A cache preallocated to `max_cache_len` positions; writes go to `cache_position`.

    Buffers are allocated at the first update, from the keys' batch size, heads, dtype and device,
    unless `max_batch_size` / `dtype` / `device` are given up front (transformers 5 ignores those
    three; herd keeps their earlier meaning, and `dtype="fp8"` is the FP8 cache). Other keyword
    arguments are ignored, as transformers ignores them, with a warning naming them.
    """

    def __init__(
        self,
        config: Any = None,
        max_cache_len: int | None = None,
        offloading: bool = False,
        offload_only_non_sliding: bool = True,
        *,
        max_batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ):
        super().__init__(offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)
        max_cache_len = max_cache_len or kwargs.pop("max_length", None)
        if max_cache_len is None:
            raise ValueError("StaticCache needs max_cache_len (prompt length + max_new_tokens)")
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be >= 1, got {max_cache_len}")
        self.max_cache_len = int(max_cache_len)
        self.max_batch_size = max_batch_size or kwargs.pop("batch_size", None)
        if kwargs:
            logger.warning("StaticCache ignores the arguments %s (transformers ignores them too)", sorted(kwargs))
        self.device = torch.device(device) if device is not None else None
        self.dtype = kv_cache_dtype(dtype) if isinstance(dtype, str) else dtype
        # FP8 storage: the full-attention layers' scales (batch, kv_heads, max_cache_len, 1), by layer
        self.is_fp8 = self.dtype == FP8_KV_DTYPE
        self.key_scales: list[torch.Tensor | None] = []
        self.value_scales: list[torch.Tensor | None] = []
        num_layers = getattr(config.get_text_config(), "num_hidden_layers", 0) if config is not None else 0
        self.key_cache: list[torch.Tensor | None] = [None] * num_layers
        self.value_cache: list[torch.Tensor | None] = [None] * num_layers
        self._seen: list[int] = [0] * num_layers
        # Chunked layers keep their bounded window in a dynamic cache of their own (the fast path's
        # decoding/kv.py keeps them in a fixed ring of slots instead).
        self.windows = layer_windows(config)
        self._windowed = DynamicCache(config=config, offloading=self.offloading,
                                      offload_only_non_sliding=self.only_non_sliding)

    def _is_windowed(self, layer_idx: int) -> bool:
        return layer_idx < len(self.windows) and self.windows[layer_idx] is not None

    def _allocate(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        while len(self.key_cache) <= layer_idx:
            self.key_cache.append(None)
            self.value_cache.append(None)
            self._seen.append(0)
        batch, kv_heads, _, _ = key_states.shape
        if self.max_batch_size is not None and batch > self.max_batch_size:
            raise ValueError(f"batch of {batch} rows does not fit a StaticCache made for {self.max_batch_size}")
        device = self.device or key_states.device
        dtype = self.dtype or key_states.dtype
        shape = (self.max_batch_size or batch, kv_heads, self.max_cache_len)
        self.key_cache[layer_idx] = torch.zeros(*shape, key_states.shape[-1], device=device, dtype=dtype)
        self.value_cache[layer_idx] = torch.zeros(*shape, value_states.shape[-1], device=device, dtype=dtype)
        if self.is_fp8:
            while len(self.key_scales) <= layer_idx:
                self.key_scales.append(None)
                self.value_scales.append(None)
            self.key_scales[layer_idx] = torch.zeros(*shape, 1, device=device, dtype=torch.float32)
            self.value_scales[layer_idx] = torch.zeros(*shape, 1, device=device, dtype=torch.float32)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if self._is_windowed(layer_idx):
            return self._windowed.update(key_states, value_states, layer_idx, cache_kwargs)
        return self._update_offloaded(key_states, value_states, layer_idx, cache_kwargs)

    def _update(self, key_states, value_states, layer_idx, cache_kwargs):
        if layer_idx >= len(self.key_cache) or self.key_cache[layer_idx] is None:
            self._allocate(layer_idx, key_states, value_states)
        keys, values = self.key_cache[layer_idx], self.value_cache[layer_idx]
        new_tokens = key_states.shape[-2]
        cache_position = (cache_kwargs or {}).get("cache_position")
        start = self._seen[layer_idx]
        if start + new_tokens > self.max_cache_len:
            raise ValueError(
                f"StaticCache is full: it holds {self.max_cache_len} positions, {start} are used and "
                f"{new_tokens} more were given; make it larger (max_cache_len)"
            )
        if cache_position is None:
            cache_position = torch.arange(start, start + new_tokens, device=keys.device)
        if self.is_fp8:
            cache_position = cache_position.to(keys.device)
            for stored, scales, states in ((keys, self.key_scales[layer_idx], key_states),
                                           (values, self.value_scales[layer_idx], value_states)):
                quantized, scale = fp8_quantize(states)
                stored.view(torch.uint8).index_copy_(2, cache_position, quantized.view(torch.uint8))  # (no float8 index_copy_)
                scales.index_copy_(2, cache_position, scale)
            self._seen[layer_idx] = start + new_tokens
            # attention reads the whole cache dequantized, in the dtype of the new keys/values
            return (fp8_dequantize(keys, self.key_scales[layer_idx], key_states.dtype),
                    fp8_dequantize(values, self.value_scales[layer_idx], value_states.dtype))
        keys.index_copy_(2, cache_position.to(keys.device), key_states.to(keys.dtype))
        values.index_copy_(2, cache_position.to(values.device), value_states.to(values.dtype))
        self._seen[layer_idx] = start + new_tokens
        if keys.dtype != key_states.dtype:  # stored in another dtype (dtype=...): attention gets its own
            return keys.to(key_states.dtype), values.to(value_states.dtype)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._is_windowed(layer_idx):
            return self._windowed.get_seq_length(layer_idx)
        return self._seen[layer_idx] if layer_idx < len(self._seen) else 0

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len

    def kv_length(self, layer_idx: int, query_length: int) -> int:
        if self._is_windowed(layer_idx):
            return self._windowed.kv_length(layer_idx, query_length)
        return self.max_cache_len

    def kv_offset(self, layer_idx: int) -> int:
        return self._windowed.kv_offset(layer_idx) if self._is_windowed(layer_idx) else 0

    def _tensors(self) -> list[list[torch.Tensor]]:
        # the FP8 scales are per-row tensors too: beam reordering and row selection move them along
        return [self.key_cache, self.value_cache, self.key_scales, self.value_scales]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._windowed.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._windowed.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._windowed.batch_select_indices(indices)

    def reset(self) -> None:
        for store in self._tensors():
            for tensor in store:
                if tensor is not None:
                    tensor.zero_()
        self._seen = [0] * len(self._seen)
        self._windowed.reset()


def as_cache(past_key_values: Any) -> Cache | None:
    """Accept a Cache, None, or the legacy tuple of (key, value) per layer."""
    if past_key_values is None or isinstance(past_key_values, Cache):
        return past_key_values
    if isinstance(past_key_values, (tuple, list)):
        return DynamicCache.from_legacy_cache(past_key_values)
    raise TypeError(f"past_key_values must be a herd Cache (e.g. DynamicCache), got {type(past_key_values).__name__}")
