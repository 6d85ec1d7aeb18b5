"""Key/value caches behind one small interface.

Attention asks a cache one thing: "store these keys/values for this layer, and give me back
everything this layer may attend to". Masks ask how long that is (`kv_length`). The model never
asks which kind of cache it holds.

- `DynamicCache` grows by concatenation: the default, no size to choose up front.
- `StaticCache` is preallocated to `max_cache_len`, with fixed shapes so that a decode step can
  be compiled and graph-captured once; keys past what was written are hidden by the causal mask.

Later kinds (Llama 4's bounded chunk ring, Mllama's cross-attention cache, a paged cache) plug
in by implementing the same four methods.
"""

from __future__ import annotations

from typing import Any

import torch


class Cache:
    """The interface every cache implements."""

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

    # Generation helpers, shared by every kind that stores per-row tensors.
    def _tensors(self) -> list[list[torch.Tensor]]:
        return [self.key_cache, self.value_cache]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder batch rows (beam search)."""
        for store in self._tensors():
            for i, tensor in enumerate(store):
                if tensor is not None and tensor.numel():
                    store[i] = tensor.index_select(0, beam_idx.to(tensor.device))

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


class DynamicCache(Cache):
    """A cache that grows by one concatenation per step; holds every position of every layer."""

    def __init__(self, config: Any = None, **kwargs: Any):
        self.key_cache: list[torch.Tensor] = []
        self.value_cache: list[torch.Tensor] = []

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if layer_idx > len(self.key_cache):
            raise ValueError(f"cache layers must be filled in order: got layer {layer_idx} after {len(self.key_cache)}")
        if layer_idx == len(self.key_cache):
            self.key_cache.append(key_states)
            self.value_cache.append(value_states)
        else:
            self.key_cache[layer_idx] = torch.cat([self.key_cache[layer_idx], key_states], dim=-2)
            self.value_cache[layer_idx] = torch.cat([self.value_cache[layer_idx], value_states], dim=-2)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.key_cache):
            return 0
        return self.key_cache[layer_idx].shape[-2]

    def crop(self, max_length: int) -> None:
        """Keep only the first `max_length` positions (negative: drop that many from the end)."""
        if max_length < 0:
            max_length = self.get_seq_length() + max_length
        for store in self._tensors():
            for i, tensor in enumerate(store):
                store[i] = tensor[..., :max_length, :]

    # The tuple-of-(key, value)-per-layer format older code passes around.
    def __len__(self) -> int:
        return len(self.key_cache)

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def to_legacy_cache(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple(self)

    @classmethod
    def from_legacy_cache(cls, past_key_values) -> DynamicCache:
        cache = cls()
        for layer_idx, (keys, values) in enumerate(past_key_values or ()):
            cache.update(keys, values, layer_idx)
        return cache


class StaticCache(Cache):
    """A cache preallocated to `max_cache_len` positions; writes go to `cache_position`.

    Buffers are allocated at the first update, from the keys' batch size, heads, dtype and device,
    unless `max_batch_size` / `dtype` / `device` are given up front.
    """

    def __init__(
        self,
        config: Any = None,
        max_cache_len: int | None = None,
        max_batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ):
        max_cache_len = max_cache_len or kwargs.pop("max_length", None)
        if max_cache_len is None:
            raise ValueError("StaticCache needs max_cache_len (prompt length + max_new_tokens)")
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be >= 1, got {max_cache_len}")
        self.max_cache_len = int(max_cache_len)
        self.max_batch_size = max_batch_size or kwargs.pop("batch_size", None)
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        num_layers = getattr(config.get_text_config(), "num_hidden_layers", 0) if config is not None else 0
        self.key_cache: list[torch.Tensor | None] = [None] * num_layers
        self.value_cache: list[torch.Tensor | None] = [None] * num_layers
        self._seen: list[int] = [0] * num_layers

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

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
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
        keys.index_copy_(2, cache_position.to(keys.device), key_states.to(keys.dtype))
        values.index_copy_(2, cache_position.to(values.device), value_states.to(values.dtype))
        self._seen[layer_idx] = start + new_tokens
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen[layer_idx] if layer_idx < len(self._seen) else 0

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len

    def kv_length(self, layer_idx: int, query_length: int) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        for store in self._tensors():
            for tensor in store:
                if tensor is not None:
                    tensor.zero_()
        self._seen = [0] * len(self._seen)


def as_cache(past_key_values: Any) -> Cache | None:
    """Accept a Cache, None, or the legacy tuple of (key, value) per layer."""
    if past_key_values is None or isinstance(past_key_values, Cache):
        return past_key_values
    if isinstance(past_key_values, (tuple, list)):
        return DynamicCache.from_legacy_cache(past_key_values)
    raise TypeError(f"past_key_values must be a herd Cache (e.g. DynamicCache), got {type(past_key_values).__name__}")
