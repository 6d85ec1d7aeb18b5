"""A memory plan before anything is allocated: weights, KV cache and activations of a generation.

The weights are counted on a model built on the meta device exactly as from_pretrained builds it
(the model in `dtype`, then the quantization's modules swapped in), so every format's bytes (data,
scales) are the ones a load would allocate; nothing is read but the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

GB = 1e9
QUANTIZATION_NAMES = ("fp8", "int8", "int4")
_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


@dataclass
class MemoryPlan:
    """Byte counts of one generation. `weights` includes `vision` (the vision tower and projector).

    `per_device` assumes tensor parallelism over `tp` devices splits every weight (layers,
    embeddings and head alike) and the KV cache evenly; the activations are counted whole on
    each device.
    """

    weights: int
    vision: int
    kv_cache: int
    activations: int
    tp: int = 1
    # what the plan was made of (for suggestion())
    config: Any = field(default=None, repr=False)
    dtype: torch.dtype = field(default=torch.bfloat16, repr=False)
    quantization: Any = field(default=None, repr=False)
    prompt_tokens: int = field(default=128, repr=False)
    max_new_tokens: int = field(default=256, repr=False)
    batch_size: int = field(default=1, repr=False)
    kv_cache_dtype: torch.dtype | None = field(default=None, repr=False)
    prefill_chunk_size: int | None = field(default=None, repr=False)

    def _replanned(self, **changes) -> MemoryPlan:
        """The plan of the same generation with some arguments of plan_memory changed."""
        arguments = dict(dtype=self.dtype, quantization=self.quantization, prompt_tokens=self.prompt_tokens,
                         max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, tp=self.tp,
                         kv_cache_dtype=self.kv_cache_dtype, prefill_chunk_size=self.prefill_chunk_size)
        return plan_memory(self.config, **{**arguments, **changes})

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    @property
    def per_device(self) -> int:
        return -(-(self.weights + self.kv_cache) // self.tp) + self.activations

    def fits(self, capacity_bytes: float) -> bool:
        """Whether one device of `capacity_bytes` holds its share (per_device)."""
        return self.per_device <= capacity_bytes

    def suggestion(self, capacity_bytes: float) -> str:
        """One line: that it fits, or what would (a quantization, tensor parallel, fewer new tokens)."""
        need = f"{self.per_device / GB:.1f} GB" + (" per GPU" if self.tp > 1 else "")
        if self.fits(capacity_bytes):
            return f"fits: {need} of {capacity_bytes / GB:.1f} GB"
        options = []
        current = self.quantization if isinstance(self.quantization, str) else None
        if self.quantization is None or current is not None:
            start = 0 if current is None else QUANTIZATION_NAMES.index(current) + 1
            for name in QUANTIZATION_NAMES[start:]:
                try:
                    other = self._replanned(quantization=name)
                except ValueError:  # a format these widths do not take (int4's group size)
                    continue
                if other.fits(capacity_bytes):
                    options.append(f"--quantization {name} ({other.per_device / GB:.1f} GB)")
                    break
        if self.kv_cache_dtype is None:
            fp8_kv = self._replanned(kv_cache_dtype=torch.float8_e4m3fn)
            if fp8_kv.fits(capacity_bytes):
                options.append(f"--kv-cache-dtype fp8 ({fp8_kv.per_device / GB:.1f} GB)")
        for tp in (2, 4, 8):
            if tp > self.tp and _with_tp(self, tp).fits(capacity_bytes):
                options.append(f"--tp {tp} ({_with_tp(self, tp).per_device / GB:.1f} GB per GPU)")
                break
        shorter = self._max_new_tokens_that_fit(capacity_bytes)
        if shorter is not None:
            options.append(f"--max-new-tokens {shorter}")
        if not options:
            return f"does not fit: needs {need}, {capacity_bytes / GB:.1f} GB available; no single change here makes it fit"
        return f"does not fit: needs {need}, {capacity_bytes / GB:.1f} GB available; try " + " or ".join(options)

    def _max_new_tokens_that_fit(self, capacity_bytes: float) -> int | None:
        """The largest max_new_tokens (at least 1, below the asked one) that fits, or None."""

        def fits(new: int) -> bool:
            kv = kv_cache_bytes(self.config, self.dtype, self.prompt_tokens + new, self.batch_size, self.kv_cache_dtype)
            return -(-(self.weights + kv) // self.tp) + self.activations <= capacity_bytes

        low, high = 1, self.max_new_tokens - 1
        if high < low or not fits(low):
            return None
        while low < high:  # the largest that fits, in [low, high]
            middle = (low + high + 1) // 2
            if fits(middle):
                low = middle
            else:
                high = middle - 1
        return low


def _with_tp(plan: MemoryPlan, tp: int) -> MemoryPlan:
    return replace(plan, tp=tp)


def _model_class(config):
    """The class from_pretrained would build: the image-text model for a config with a vision
    tower, else the causal LM; (class, config it takes)."""
    from .auto import IMAGE_TEXT_TO_TEXT_CLASSES, AutoModelForCausalLM, _import

    if getattr(config, "vision_config", None) is not None and config.model_type in IMAGE_TEXT_TO_TEXT_CLASSES:
        cls = _import(IMAGE_TEXT_TO_TEXT_CLASSES[config.model_type])
    else:
        cls = AutoModelForCausalLM._class_for(config)
    if not isinstance(config, cls.config_class) and isinstance(config.get_text_config(), cls.config_class):
        config = config.get_text_config()  # as from_pretrained: the text model of a multimodal config
    return cls, config


def _quantization_config(config, quantization):
    if quantization is None:
        stored = getattr(config, "quantization_config", None)
        if stored is None:
            return None
        from .quantization import from_dict

        return from_dict(stored)  # a checkpoint stored quantized
    if isinstance(quantization, str):
        from .quantization import config_from_name

        return config_from_name(quantization)
    return quantization


def weight_bytes(config, dtype: torch.dtype = torch.bfloat16, quantization=None) -> tuple[int, int]:
    """(all weight bytes, those of the vision tower and projector) of the model from_pretrained
    builds for `config`, counted on the meta device; tied weights once."""
    from .quantization import weight_tensors

    cls, model_config = _model_class(config)
    with torch.device("meta"):
        model = cls(model_config)
    model = model.to(dtype)
    chosen = _quantization_config(model_config, quantization)
    if chosen is not None:
        from .quantization import apply_quantization

        apply_quantization(model, chosen, dtype)
    model.tie_weights()
    tied = model._tied_names() if hasattr(model, "_tied_names") else set()
    seen: set[int] = set()
    total = vision = 0
    for name, tensor in weight_tensors(model):
        if id(tensor) in seen or name in tied:
            continue
        seen.add(id(tensor))
        nbytes = tensor.numel() * tensor.element_size()
        total += nbytes
        if any(part in name for part in _VISION_PREFIXES):
            vision += nbytes
    return total, vision


def _head_dim(text) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def kv_cache_bytes(config, dtype: torch.dtype, positions: int, batch_size: int = 1,
                   kv_cache_dtype: torch.dtype | str | None = None) -> int:
    """Keys + values of every layer for `positions` tokens per row (layer_kv_bytes, summed)."""
    return sum(layer_kv_bytes(config, dtype, positions, batch_size, kv_cache_dtype))


def layer_kv_bytes(config, dtype: torch.dtype, positions: int, batch_size: int = 1,
                   kv_cache_dtype: torch.dtype | str | None = None) -> list[int]:
    """Keys + values of each text layer for `positions` tokens per row: a full-attention layer holds
    them all, a Llama 4 chunked-attention layer at most attention_chunk_size, an Mllama
    cross-attention layer the image tokens of one image (never max_position_embeddings).

    kv_cache_dtype "float8_e4m3fn" (the FP8 KV cache, generate's cache_config): full-attention
    layers hold one byte per element plus a float32 scale per key/value head of each token; the
    chunked and cross-attention layers stay in `dtype`."""
    from .bench import image_tokens_per_row
    from .cache import FP8_KV_DTYPE, kv_cache_dtype as storage_dtype

    text = config.get_text_config()
    heads = 2 * batch_size * text.num_key_value_heads  # keys and values of every kv head
    one_token = heads * _head_dim(text) * dtype.itemsize
    full_token = one_token
    if storage_dtype(kv_cache_dtype) == FP8_KV_DTYPE:
        full_token = heads * (_head_dim(text) * FP8_KV_DTYPE.itemsize + torch.float32.itemsize)
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    chunk = getattr(text, "attention_chunk_size", None)
    cross = set(getattr(text, "cross_attention_layers", None) or [])
    image_tokens = image_tokens_per_row(config)
    sizes = []
    for index, kind in enumerate(layer_types):
        if index in cross:
            sizes.append(one_token * image_tokens)
        elif kind == "chunked_attention" and chunk:
            sizes.append(one_token * min(positions, chunk))
        else:
            sizes.append(full_token * positions)
    return sizes


def activation_bytes(config, dtype: torch.dtype, prompt_tokens: int, batch_size: int = 1,
                     prefill_chunk_size: int | None = None, kv_cache_dtype: torch.dtype | str | None = None,
                     quantized_experts: bool = False) -> int:
    """An estimate of the prefill's peak activations: one prefill chunk (the prompt, at most
    `prefill_chunk_size` tokens: generate's, decoding.decoders.PREFILL_CHUNK by default on the
    fast path) of every row through one layer, holding the hidden
    state, the MLP's gate and up outputs (2 x the widest intermediate size) and the q/k/v
    projections, in `dtype`; plus the float32 logits of the last position of each row; plus what
    one layer holds for a moment while a chunk attends to the cache before it and while
    quantized experts run a prefill (`_prefill_transient_bytes`)."""
    from .decoding.decoders import PREFILL_CHUNK

    text = config.get_text_config()
    head_dim = _head_dim(text)
    intermediate = max(getattr(text, "intermediate_size", 0) or 0, getattr(text, "intermediate_size_mlp", 0) or 0)
    qkv = (text.num_attention_heads + 2 * text.num_key_value_heads) * head_dim
    chunk = prefill_chunk_size or PREFILL_CHUNK
    tokens = min(prompt_tokens, chunk) * batch_size
    return (tokens * (text.hidden_size + 2 * intermediate + qkv) * dtype.itemsize + batch_size * text.vocab_size * 4
            + _prefill_transient_bytes(text, dtype, prompt_tokens, batch_size, chunk, kv_cache_dtype, quantized_experts))


def _prefill_transient_bytes(text, dtype: torch.dtype, prompt_tokens: int, batch_size: int, chunk: int,
                             kv_cache_dtype, quantized_experts: bool) -> int:
    """Short-lived tensors of one layer during a long prefill: the last chunk's cached keys and
    values repeated per query head for cuDNN (layers.attention.cudnn_part, chunks of
    CUDNN_MIN_QUERIES+ after a cache on Hopper) and its two parts' outputs merged in float32; with
    the FP8 KV cache, the cache dequantized; a Llama 4 layer's quantized routed experts dequantized
    for the chunk's grouped matmul (kernels.routed_experts). Their sum, not their maximum, is what
    closed the gap between plan and measured peak (Scout int4 at 128k and 1M tokens, the 8B at
    120k: bench/RESULTS.md, 2026-11-30 sixth session)."""
    from .cache import FP8_KV_DTYPE, kv_cache_dtype as storage_dtype
    from .layers.attention import CUDNN_MIN_QUERIES

    head_dim, heads, kv_heads = _head_dim(text), text.num_attention_heads, text.num_key_value_heads
    attention = 0
    if prompt_tokens > chunk:  # a chunk after a cache
        if chunk >= CUDNN_MIN_QUERIES:
            if heads > kv_heads:
                attention += 2 * batch_size * prompt_tokens * heads * head_dim * dtype.itemsize
            # the two parts' outputs merged in float32 (layers.attention.after_cache_in_two_parts): 4 at once
            attention += 4 * batch_size * chunk * heads * head_dim * 4
        if storage_dtype(kv_cache_dtype) == FP8_KV_DTYPE:
            attention += 2 * batch_size * prompt_tokens * kv_heads * head_dim * dtype.itemsize
    experts = 0
    if quantized_experts and getattr(text, "num_local_experts", 0):
        inter = text.intermediate_size
        experts = text.num_local_experts * 3 * text.hidden_size * inter * dtype.itemsize  # gate, up and down
    return attention + experts


def plan_memory(config, *, dtype: torch.dtype = torch.bfloat16, quantization=None, prompt_tokens: int = 128,
                max_new_tokens: int = 256, batch_size: int = 1, tp: int = 1,
                kv_cache_dtype: torch.dtype | str | None = None, prefill_chunk_size: int | None = None) -> MemoryPlan:
    """The memory a generation of `batch_size` rows of `prompt_tokens` + `max_new_tokens` needs.

    quantization: None (the checkpoint's own, if config records one), "fp8" / "int8" / "int4"
    (as `herd bench --quantization`), or a quantization config object. tp: the number of devices
    of tensor parallelism (per_device divides the weights and the KV cache by it: the plan's
    assumption of an even split). kv_cache_dtype: "float8_e4m3fn" (or "fp8") for the FP8 KV cache
    (see kv_cache_bytes). The activations are an estimate for prefill chunks of
    `prefill_chunk_size` tokens: see activation_bytes.
    """
    if tp < 1 or batch_size < 1 or prompt_tokens < 0 or max_new_tokens < 0:
        raise ValueError("tp and batch_size must be >= 1, prompt_tokens and max_new_tokens >= 0")
    weights, vision = weight_bytes(config, dtype, quantization)
    from .cache import kv_cache_dtype as storage_dtype

    kv_cache_dtype = storage_dtype(kv_cache_dtype)
    kv = kv_cache_bytes(config, dtype, prompt_tokens + max_new_tokens, batch_size, kv_cache_dtype)
    quantized = _quantization_config(_model_class(config)[1], quantization) is not None
    activations = activation_bytes(config, dtype, prompt_tokens, batch_size, prefill_chunk_size, kv_cache_dtype,
                                   quantized_experts=quantized)
    return MemoryPlan(weights, vision, kv, activations, tp, config, dtype, quantization, prompt_tokens,
                      max_new_tokens, batch_size, kv_cache_dtype, prefill_chunk_size)


def table(plan: MemoryPlan) -> str:
    """The plan as a small table, in GB (1e9 bytes)."""
    rows = [("weights", plan.weights), ("  of which vision", plan.vision), ("KV cache", plan.kv_cache),
            ("activations (estimate)", plan.activations), ("total", plan.total),
            (f"per GPU (tp={plan.tp})", plan.per_device)]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value / GB:10.3f} GB" for name, value in rows)
