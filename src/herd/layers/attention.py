"""Attention backends and the mask description they share.

A model builds one `AttentionMask` per forward: what the mask *is* (causal, which key columns
are padding, which packed sequence each token belongs to, where the queries sit in the key
timeline). Each backend realises it its own way, once per forward: nothing at all for a plain
causal prefill under sdpa (`is_causal`), a boolean tensor for eager and sdpa otherwise (built for
QUERY_BLOCK query rows at a time on long prompts, against only the keys those rows can see), a
block mask for flex attention (built from the description tile by tile, never as a whole
(query x key) tensor).

Backends: "sdpa" (default), "eager" (plain matmul + softmax; the one that can return attention
weights, so the other backends fall back to it for a call that asks for them) and
"flex_attention" (where the installed torch has it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

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

    @property
    def is_causal_after_cache(self) -> bool:
        """Queries that continue a cache, causal, with nothing else to hide, the last query at the
        last key (a prefill chunk of an unpadded prompt on a full-attention layer, or a block of
        one attention chunk of a chunked layer): sdpa's lower-right causal bias expresses it."""
        return (
            self.causal
            and self.padding_mask is None
            and self.sequence_ids is None
            and self.custom is None
            and self.chunk_size is None
            and self.query_offset + self.query_length == self.kv_offset + self.kv_length
            and self.query_length > 1
        )

    def _batch_fields(self) -> list[torch.Tensor]:
        return [t for t in (self.padding_mask, self.sequence_ids, self.left_padding if self.chunk_size else None)
                if t is not None]

    def allowed(self, batch, query_index, key_index) -> torch.Tensor:
        """The rule at (batch row, query row of this call, key column of this call); the three
        broadcast against each other (index tensors, or scalars inside flex attention's mask_mod)."""
        query_position = query_index + self.query_offset
        key_position = key_index + self.kv_offset
        if self.causal:
            # positions counted from each row's first real token (chunks start there)
            shift = self.left_padding[batch] if self.chunk_size is not None and self.left_padding is not None else 0
            allowed = visible(query_position - shift, key_position - shift, self.chunk_size)
        else:
            allowed = (query_position >= 0) & (key_position >= 0)  # all True, in the broadcast shape
        if self.padding_mask is not None:
            allowed = allowed & self.padding_mask[batch, key_position]
        if self.sequence_ids is not None:
            allowed = allowed & (self.sequence_ids[batch, query_position] == self.sequence_ids[batch, key_position])
        return allowed

    def _on(self, device: torch.device) -> AttentionMask:
        """This description with its tensors on `device`."""
        moved = {name: getattr(self, name).to(device) for name in ("padding_mask", "sequence_ids", "left_padding")
                 if getattr(self, name) is not None}
        return replace(self, _realised={}, **moved) if moved else self

    def rows(self, device: torch.device, start: int, end: int) -> torch.Tensor:
        """(batch or 1, 1, end - start, kv_length): query rows [start, end) of the boolean mask
        (or of the custom mask), True where attention is allowed. Only these rows are built."""
        if self.custom is not None:
            return self.custom[..., start:end, :]
        on_device = self._on(device)
        rows = on_device._batch_fields()
        batch = torch.arange(rows[0].shape[0] if rows else 1, device=device)[:, None, None, None]
        query_index = torch.arange(start, end, device=device)[None, None, :, None]
        key_index = torch.arange(self.kv_length, device=device)[None, None, None, :]
        return on_device.allowed(batch, query_index, key_index)

    def boolean(self, device: torch.device) -> torch.Tensor | None:
        """(batch or 1, 1, query_length, kv_length), True where attention is allowed."""
        if "boolean" not in self._realised:
            self._realised["boolean"] = self.rows(device, 0, self.query_length)
        return self._realised["boolean"]

    def _row_shifts(self) -> list[int]:
        """Each row's left padding, where chunks start (one 0 when no row is padded)."""
        if "shifts" not in self._realised:
            shifts = self.left_padding.tolist() if self.left_padding is not None else [0]
            self._realised["shifts"] = sorted(set(shifts))
        return self._realised["shifts"]

    def query_blocks(self, rows: int) -> list[tuple[int, int]]:
        """Query rows [start, end) of at most `rows` each. With chunked attention and no padded row
        a block never crosses a chunk boundary: inside one chunk the chunk rule is plain causal
        attention from the chunk's start (see query_block)."""
        cuts = set(range(0, self.query_length, rows))
        if self.chunk_size is not None and self.custom is None and self._row_shifts() == [0]:
            first_cut = -self.query_offset % self.chunk_size
            cuts |= set(range(first_cut, self.query_length, self.chunk_size))
        cuts = sorted(cut for cut in cuts if 0 <= cut < self.query_length) + [self.query_length]
        return list(zip(cuts[:-1], cuts[1:]))

    def query_block(self, start: int, end: int) -> tuple[AttentionMask, int, int]:
        """The description of query rows [start, end) alone, with the key columns [key_start,
        key_end) that any of them can see (later keys are causally hidden; for chunked attention,
        keys before the earliest chunk start of the block's first query are hidden too). A block
        inside one chunk of unpadded rows becomes plain causal attention over its window (no
        chunk_size): what sdpa's lower-right causal bias expresses without a mask tensor."""
        key_start, key_end = 0, self.kv_length
        chunk_size = self.chunk_size
        if self.custom is None and self.causal:
            key_end = max(0, min(self.kv_length, self.query_offset + end - self.kv_offset))
            if chunk_size is not None:
                first, last = self.query_offset + start, self.query_offset + end - 1
                earliest = min((first - shift) // chunk_size * chunk_size + shift for shift in self._row_shifts())
                key_start = min(key_end, max(0, earliest - self.kv_offset))
                if self._row_shifts() == [0] and first // chunk_size == last // chunk_size and earliest >= self.kv_offset:
                    chunk_size = None  # every key of the window is in the block's chunk
        custom = self.custom[..., start:end, key_start:key_end] if self.custom is not None else None
        block = replace(self, query_length=end - start, kv_length=key_end - key_start,
                        query_offset=self.query_offset + start, kv_offset=self.kv_offset + key_start, custom=custom,
                        chunk_size=chunk_size, _realised={})
        return block, key_start, key_end

    def block_mask(self, batch: int, device: torch.device):
        """The flex-attention BlockMask for the same pattern, built from the description (see
        flex_block_mask): no (query_length x kv_length) tensor."""
        if "block" not in self._realised:
            self._realised["block"] = flex_block_mask(self, batch, device)
        return self._realised["block"]


FLEX_BLOCK = 128  # flex attention's tile (torch's default sparse block size)
# Rows of the mask built at a time when sorting tiles into empty / partial / full (elements per band).
FLEX_BAND_ELEMENTS = 1 << 24


def flex_block_mask(mask: AttentionMask, batch: int, device: torch.device):
    """A BlockMask for `mask`: which FLEX_BLOCK x FLEX_BLOCK tiles are empty, partial or full,
    found a band of query rows at a time (at most FLEX_BAND_ELEMENTS mask elements per row of the
    batch exist at once), and a mask_mod that evaluates the description inside partial tiles.

    torch's create_block_mask would evaluate mask_mod over the whole (query x key) grid when not
    compiled; this never does.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if mask.custom is not None and mask.custom.dtype != torch.bool:
        raise ValueError("flex_attention takes boolean masks only; pass a boolean 4D attention_mask")
    query_length, kv_length = mask.query_length, mask.kv_length
    query_blocks, kv_blocks = -(-query_length // FLEX_BLOCK), -(-kv_length // FLEX_BLOCK)
    band_blocks = max(1, FLEX_BAND_ELEMENTS // (kv_blocks * FLEX_BLOCK * FLEX_BLOCK))
    partial, full = [], []
    for first_block in range(0, query_blocks, band_blocks):
        start = first_block * FLEX_BLOCK
        end = min(query_length, start + band_blocks * FLEX_BLOCK)
        band = mask.rows(device, start, end).to(device).expand(batch, 1, end - start, kv_length)
        # out-of-range rows and columns pad with False: a tile that holds them is never full
        padded_rows = -(-(end - start) // FLEX_BLOCK) * FLEX_BLOCK
        band = nn.functional.pad(band, (0, kv_blocks * FLEX_BLOCK - kv_length, 0, padded_rows - (end - start)))
        tiles = band.view(batch, 1, padded_rows // FLEX_BLOCK, FLEX_BLOCK, kv_blocks, FLEX_BLOCK)
        any_allowed, all_allowed = tiles.any(dim=5).any(dim=3), tiles.all(dim=5).all(dim=3)  # (batch, 1, tiles, kv tiles)
        partial.append(any_allowed & ~all_allowed)
        full.append(all_allowed)
    partial_counts, partial_indices = _ordered_tiles(torch.cat(partial, dim=2))
    full_counts, full_indices = _ordered_tiles(torch.cat(full, dim=2))
    return BlockMask.from_kv_blocks(partial_counts, partial_indices, full_counts, full_indices, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=_mask_mod(mask, device), seq_lengths=(query_length, kv_length))


def _ordered_tiles(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, heads, query tiles, kv tiles) bool -> the count of True per row and their column
    indices first (BlockMask's layout)."""
    counts = tiles.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(tiles.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


def _mask_mod(mask: AttentionMask, device: torch.device):
    """flex attention's mask_mod: the description at one (batch, head, query, key) point."""
    on_device = mask._on(device)
    custom = mask.custom.to(device) if mask.custom is not None else None
    last_query, last_key = mask.query_length - 1, mask.kv_length - 1

    def mask_mod(b, h, q_idx, kv_idx):
        # indices past the ends (the last tile's padding) are masked by the kernel; clamp them so
        # that no lookup reads out of bounds
        q_idx, kv_idx = q_idx.clamp(max=last_query), kv_idx.clamp(max=last_key)
        if custom is not None:
            return custom[b if custom.shape[0] > 1 else 0, h if custom.shape[1] > 1 else 0, q_idx, kv_idx]
        return on_device.allowed(b, q_idx, kv_idx)

    return mask_mod


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
            # added, not filled in, as the reference does: the same softmax, and a query that may see
            # no key (a padded row) still passes gradient to its scores, as the reference's does
            bias = torch.zeros((), dtype=scores.dtype, device=scores.device).masked_fill(~allowed, torch.finfo(scores.dtype).min)
            scores = scores + bias
        else:
            scores = scores + allowed.to(scores.dtype)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=training)
    output = torch.matmul(weights, value)  # (batch, heads, q, dim)
    return output.transpose(1, 2).contiguous(), weights


def uses_lower_right_causal(mask: AttentionMask, device: torch.device) -> bool:
    """Whether sdpa gets torch's lower-right causal bias: on CUDA only, where its flash kernel
    reads it without a mask tensor (elsewhere torch would materialise it whole)."""
    return device.type == "cuda" and mask.is_causal_after_cache


def sdpa_attention(query, key, value, mask: AttentionMask, scaling: float, dropout: float = 0.0, training: bool = False):
    enable_gqa = query.shape[1] != key.shape[1]
    output = cudnn_after_cache(query, key, value, mask, scaling, training)
    if output is not None:
        return output, None
    if mask.is_plain_causal:
        # One query at the end needs no mask at all; a full prefill uses the built-in causal mask.
        attn_mask, is_causal = None, mask.query_length > 1
    elif uses_lower_right_causal(mask, query.device):
        from torch.nn.attention.bias import causal_lower_right

        # flash attention's own causal mode, aligned bottom-right: no mask tensor at all
        attn_mask, is_causal = causal_lower_right(mask.query_length, mask.kv_length), False
    else:
        attn_mask, is_causal = mask.boolean(query.device), False
        if attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(query.dtype)
    def run():
        return nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                          dropout_p=dropout if training else 0.0, is_causal=is_causal,
                                                          scale=scaling, enable_gqa=enable_gqa)

    if prefers_cudnn(query, is_causal and attn_mask is None and not training):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]
        with sdpa_kernel(backends, set_priority=True):
            output = run()
    else:
        output = run()
    return output.transpose(1, 2).contiguous(), None


# Long causal prefills on Hopper and later: cuDNN's fused attention ran 16k-32k-token causal prompts
# at 650 TFLOP/s on the H200 where torch's flash kernel ran 345 (bench/RESULTS.md, 2026-11-30 third
# session). Shorter ones keep the flash kernel (its numerics; the time there is the matmuls').
CUDNN_MIN_QUERIES = 4096


def prefers_cudnn(query: torch.Tensor, plain_causal: bool) -> bool:
    """Whether sdpa should try cuDNN's attention first: a causal prefill without a mask tensor of
    at least CUDNN_MIN_QUERIES queries, in half precision on a GPU of compute capability 9.0 or
    more, for inference (no gradient: cuDNN's backward has had NaN bugs, pytorch#196678) (torch
    falls back to the next backend where cuDNN refuses the call)."""
    return (
        plain_causal
        and query.is_cuda
        and not query.requires_grad
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-2] >= CUDNN_MIN_QUERIES
        and torch.backends.cudnn.is_available()
        and torch.cuda.get_device_capability(query.device) >= (9, 0)
    )


def cudnn_after_cache(query, key, value, mask: AttentionMask, scaling: float, training: bool = False,
                      merge=None) -> torch.Tensor | None:
    """A long causal chunk after a cache through cuDNN in two parts (`after_cache_in_two_parts`),
    (batch, q, heads, dim); None where that does not apply (not CUDA, short, training, another mask)
    or cuDNN refuses. `merge`: as after_cache_in_two_parts takes it."""
    if not (uses_lower_right_causal(mask, query.device) and not training and prefers_cudnn(query, True)):
        return None
    return after_cache_in_two_parts(query, key, value, scaling, cudnn_part, merge)


def after_cache_in_two_parts(query, key, value, scaling: float, attend_part, merge=None) -> torch.Tensor | None:
    """Causal queries continuing a cache (query i at key kv_length - q + i), as two attentions
    without a bias: every query over the keys before its chunk (no mask), and over the chunk's own
    keys (a top-left causal square), merged by their log-sum-exps. cuDNN's fused attention, twice
    flash's rate on long prefills, takes only those two masks. attend_part(query, key, value,
    scaling, causal) -> (output (batch, heads, q, dim), log-sum-exp (batch, heads, q)), or None
    where the backend refuses; None then. `merge(own_out, own_lse, cached_out, cached_lse)`: the
    merge (`merge_by_log_sum_exp` by default; the decode plans' prompt pass passes a kernel's).
    Returns (batch, q, heads, dim), contiguous."""
    own = query.shape[-2]
    cached = key.shape[-2] - own
    parts = [attend_part(query, key[:, :, cached:], value[:, :, cached:], scaling, True)]
    if cached:
        parts.append(attend_part(query, key[:, :, :cached], value[:, :, :cached], scaling, False))
    if any(part is None for part in parts):
        return None
    if len(parts) == 1:
        return parts[0][0].transpose(1, 2).contiguous()
    (own_out, own_lse), (cached_out, cached_lse) = parts
    return (merge or merge_by_log_sum_exp)(own_out, own_lse, cached_out, cached_lse)


def merge_by_log_sum_exp(own_out, own_lse, cached_out, cached_lse) -> torch.Tensor:
    """Two attentions of the same queries over disjoint keys, outputs (batch, heads, q, dim) and
    natural log-sum-exps (batch, heads, q), as one: each weighted by its share of the softmax's
    denominator, in float32. Returns (batch, q, heads, dim), contiguous, in the outputs' dtype."""
    own_lse, cached_lse = (lse.float().reshape(*own_out.shape[:3], 1) for lse in (own_lse, cached_lse))
    top = torch.maximum(own_lse, cached_lse)
    own_weight, cached_weight = torch.exp(own_lse - top), torch.exp(cached_lse - top)  # (batch, heads, q, 1)
    merged = (own_weight * own_out.float() + cached_weight * cached_out.float()) / (own_weight + cached_weight)
    return merged.to(own_out.dtype).transpose(1, 2).contiguous()


def cudnn_part(query, key, value, scaling: float, causal: bool):
    """One part of `after_cache_in_two_parts` through cuDNN; None where cuDNN refuses the call.
    Keys/values go in as stored (fewer heads than the queries: cuDNN 9 reads grouped-query
    attention itself, the same outputs as with them repeated per query head); repeated where a
    cuDNN refuses that."""
    groups = query.shape[1] // key.shape[1]
    attempts = [(key, value)] + ([(repeat_kv(key, groups), repeat_kv(value, groups))] if groups > 1 else [])
    for index, (keys, values) in enumerate(attempts):
        try:
            output, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                query, keys, values, None, True, 0.0, causal, False, scale=scaling)[:2]
            return output, lse
        except RuntimeError as error:
            if index == len(attempts) - 1:
                warnings.warn(f"cuDNN attention refused a prefill chunk after a cache ({str(error).splitlines()[0][:200]}); "
                              "flash attention runs it", RuntimeWarning, stacklevel=2)
    return None


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


# Query rows per attention call when a mask must be realised as a tensor (eager; sdpa with
# padding, chunks or a cache): the mask, and eager's scores, never exceed this many rows.
QUERY_BLOCK = 1024


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
    """Run one attention call; returns (batch, q, heads, dim) and the weights when asked.

    Long queries under eager, or under sdpa with a mask sdpa cannot express by itself, run
    QUERY_BLOCK rows at a time, each block against only the keys it can see: the realised mask
    is (rows, keys seen) per block, never (query_length x kv_length). Flex attention takes the
    description whole (a block mask); attention weights, when asked, are whole by definition.
    """
    backend = eager_attention if output_attentions else _BACKENDS[implementation]
    whole = (backend is flex_attention or output_attentions or mask.query_length <= QUERY_BLOCK
             or (backend is sdpa_attention and (mask.is_plain_causal or uses_lower_right_causal(mask, query.device))))
    if whole:
        return backend(query, key, value, mask, scaling, dropout, training)
    outputs = []
    for start, end in mask.query_blocks(QUERY_BLOCK):
        block, key_start, key_end = mask.query_block(start, end)
        output, _ = backend(query[:, :, start:end], key[:, :, key_start:key_end], value[:, :, key_start:key_end], block,
                            scaling, dropout, training)
        outputs.append(output)  # (batch, rows, heads, dim)
    return torch.cat(outputs, dim=1), None
