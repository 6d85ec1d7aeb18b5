"""Attention backends and the mask description they share.

A model builds one `AttentionMask` per forward: what the mask *is* (causal, which key columns
are padding, which packed sequence each token belongs to, where the queries sit in the key
timeline). Each backend realises it its own way, once per forward: nothing at all for a plain
causal prefill under sdpa (`is_causal`), a boolean tensor for eager and sdpa otherwise, a block
mask for flex attention.

Backends: "sdpa" (default), "eager" (plain matmul + softmax; the one that can return attention
weights, so the other backends fall back to it for a call that asks for them) and
"flex_attention" (where the installed torch has it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..decoding.visibility import visible

ATTENTION_BACKENDS = ("sdpa", "eager", "flex_attention")


def has_flex_attention() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def check_attn_implementation(name: str | None) -> str:
    name = name or "sdpa"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attn_implementation {name!r}; herd has {', '.join(ATTENTION_BACKENDS)}")
    if name == "flex_attention" and not has_flex_attention():
        raise ValueError(f"attn_implementation='flex_attention' needs torch >= 2.5 (installed: {torch.__version__})")
    return name


@dataclass
class AttentionMask:
    """What a self-attention mask is, independent of any backend.

    Positions are absolute (0 = the first token the cache has seen). Query i sits at position
    `query_offset + i`; key column j holds position `kv_offset + j` (kv_offset > 0 only for a
    cache that keeps a window). Causal attention lets a query see positions <= its own.
    `padding_mask` (batch, kv_offset + kv_length), True for real tokens, hides padded positions.
    `chunk_size` (Llama 4's local layers) further limits a query to keys of its own chunk of
    positions, chunks counted from each row's first real token (`left_padding`, (batch,)).
    `sequence_ids` (batch, query_length) keeps packed sequences apart. `custom` is a user-given
    4D mask (boolean, or additive float), used as is.
    """

    query_length: int
    kv_length: int
    query_offset: int = 0
    padding_mask: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None
    custom: torch.Tensor | None = None
    causal: bool = True
    kv_offset: int = 0
    chunk_size: int | None = None
    left_padding: torch.Tensor | None = None
    _realised: dict = field(default_factory=dict, repr=False)

    @property
    def is_plain_causal(self) -> bool:
        """True when sdpa's built-in causal mask (or no mask) is exactly right."""
        return (
            self.causal
            and self.padding_mask is None
            and self.sequence_ids is None
            and self.custom is None
            and self.chunk_size is None
            and self.kv_offset == 0
            and self.query_offset + self.query_length == self.kv_length
            # sdpa's is_causal aligns its triangle top-left: right only with no keys before the
            # queries (a prefill) or one query (a decode step), not for a chunk after a cache
            and (self.query_offset == 0 or self.query_length == 1)
        )

    def boolean(self, device: torch.device) -> torch.Tensor | None:
        """(batch or 1, 1, query_length, kv_length), True where attention is allowed."""
        if self.custom is not None:
            return self.custom
        if "boolean" not in self._realised:
            query_position = torch.arange(self.query_length, device=device) + self.query_offset  # (q,)
            key_position = torch.arange(self.kv_length, device=device) + self.kv_offset  # (kv,)
            if self.causal:
                # Positions counted from each row's first real token: (batch or 1, 1, q, 1) and (.., 1, kv)
                shift = torch.zeros(1, dtype=torch.long, device=device)
                if self.chunk_size is not None and self.left_padding is not None:
                    shift = self.left_padding.to(device)
                query_position = (query_position[None, :] - shift[:, None])[:, None, :, None]
                key_position = (key_position[None, :] - shift[:, None])[:, None, None, :]
                allowed = visible(query_position, key_position, self.chunk_size)
            else:
                allowed = torch.ones(1, 1, self.query_length, self.kv_length, dtype=torch.bool, device=device)
            if self.padding_mask is not None:
                columns = self.padding_mask[:, self.kv_offset : self.kv_offset + self.kv_length]
                allowed = allowed & columns[:, None, None, :].to(device)
            if self.sequence_ids is not None:
                same = self.sequence_ids[:, :, None] == self.sequence_ids[:, None, :]  # (batch, q, kv) with q == kv
                allowed = allowed & same[:, None].to(device)
            self._realised["boolean"] = allowed
        return self._realised["boolean"]

    def block_mask(self, batch: int, device: torch.device):
        """The flex-attention BlockMask for the same pattern."""
        if "block" not in self._realised:
            from torch.nn.attention.flex_attention import create_block_mask

            dense = self.boolean(device)
            if dense.dtype != torch.bool:
                raise ValueError("flex_attention takes boolean masks only; pass a boolean 4D attention_mask")
            dense = dense.expand(batch, 1, self.query_length, self.kv_length)

            def mask_mod(b, h, q_idx, kv_idx):
                return dense[b, 0, q_idx, kv_idx]

            self._realised["block"] = create_block_mask(
                mask_mod, batch, None, self.query_length, self.kv_length, device=device
            )
        return self._realised["block"]


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    *,
    batch_size: int,
    query_length: int,
    past_length: int,
    kv_length: int,
    position_ids: torch.Tensor | None = None,
    has_cache: bool = False,
    kv_offset: int = 0,
    chunk_size: int | None = None,
) -> AttentionMask:
    """Describe the causal mask of one forward from the user's 2D (or 4D) attention_mask.

    `kv_offset`: the position of the first key the cache returns (a windowed cache drops older
    ones). `chunk_size`: chunked local attention (Llama 4).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        expected = (query_length, kv_length)
        if tuple(attention_mask.shape[-2:]) != expected:
            raise ValueError(f"4D attention_mask must end in (query_length, kv_length) = {expected}, got {tuple(attention_mask.shape)}")
        return AttentionMask(query_length, kv_length, past_length, custom=attention_mask)

    padding_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size:
            raise ValueError(
                f"attention_mask must be (batch, past + new tokens) = ({batch_size}, {past_length + query_length}), "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask.shape[1] != past_length + query_length:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} columns, but the cache holds {past_length} "
                f"positions and {query_length} new tokens were given (expected {past_length + query_length})"
            )
        padding_mask = attention_mask.bool()
        if kv_offset + kv_length > padding_mask.shape[1]:  # a static cache: columns not yet written are not real tokens
            padding_mask = nn.functional.pad(padding_mask, (0, kv_offset + kv_length - padding_mask.shape[1]), value=False)
        if bool(padding_mask.all()):
            padding_mask = None
    left_padding = None
    if chunk_size is not None and attention_mask is not None:
        # Chunks start at each row's first real token: count the leading padding.
        left_padding = (attention_mask.long().cumsum(dim=-1) == 0).sum(dim=-1)

    # Packed sequences: position ids that restart inside a row start a new sequence. Only
    # meaningful when the whole sequence is in this call (no cache, no padding mask).
    sequence_ids = None
    if position_ids is not None and attention_mask is None and not has_cache and query_length > 1:
        position_ids = position_ids.expand(batch_size, -1)
        starts = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1) != 1
        if bool(starts[:, 1:].any()):
            sequence_ids = starts.cumsum(-1)
    return AttentionMask(query_length, kv_length, past_length, padding_mask=padding_mask, sequence_ids=sequence_ids,
                         kv_offset=kv_offset, chunk_size=chunk_size, left_padding=left_padding)


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * groups, seq, dim)."""
    if groups == 1:
        return states
    batch, kv_heads, seq, dim = states.shape
    return states[:, :, None].expand(batch, kv_heads, groups, seq, dim).reshape(batch, kv_heads * groups, seq, dim)


def eager_attention(query, key, value, mask: AttentionMask, scaling: float, dropout: float = 0.0, training: bool = False):
    """query (batch, heads, q, dim), key/value (batch, kv_heads, kv, dim) -> (batch, q, heads, dim), weights."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (batch, heads, q, kv)
    if not (mask.is_plain_causal and mask.query_length == 1):
        allowed = mask.boolean(query.device)
        if allowed.dtype == torch.bool:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        else:
            scores = scores + allowed.to(scores.dtype)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=training)
    output = torch.matmul(weights, value)  # (batch, heads, q, dim)
    return output.transpose(1, 2).contiguous(), weights


def sdpa_attention(query, key, value, mask: AttentionMask, scaling: float, dropout: float = 0.0, training: bool = False):
    enable_gqa = query.shape[1] != key.shape[1]
    if mask.is_plain_causal:
        # One query at the end needs no mask at all; a full prefill uses the built-in causal mask.
        attn_mask, is_causal = None, mask.query_length > 1
    else:
        attn_mask, is_causal = mask.boolean(query.device), False
        if attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(query.dtype)
    output = nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout if training else 0.0,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=enable_gqa,
    )
    return output.transpose(1, 2).contiguous(), None


_compiled_flex = None


def flex_attention(query, key, value, mask: AttentionMask, scaling: float, dropout: float = 0.0, training: bool = False):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    block_mask = mask.block_mask(query.shape[0], query.device)
    enable_gqa = query.shape[1] != key.shape[1]
    if query.device.type == "cuda" and query.shape[-1] >= 16:
        # Flex attention is only fused when compiled (and its kernel wants head_dim >= 16);
        # compile it once per process.
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex, dynamic=False)
        output = _compiled_flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=enable_gqa)
    else:
        with warnings.catch_warnings():
            # On the CPU (and for tiny heads) the unfused implementation: no compiler needed.
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            output = flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=enable_gqa)
    return output.transpose(1, 2).contiguous(), None


_BACKENDS = {"eager": eager_attention, "sdpa": sdpa_attention, "flex_attention": flex_attention}


def attention(
    implementation: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: AttentionMask,
    scaling: float,
    *,
    dropout: float = 0.0,
    training: bool = False,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run one attention call; returns (batch, q, heads, dim) and the weights when asked."""
    backend = eager_attention if output_attentions else _BACKENDS[implementation]
    return backend(query, key, value, mask, scaling, dropout, training)
