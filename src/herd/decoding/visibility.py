"""The one rule for which keys a query may attend to.

Positions here count from each row's first real token (left padding shifts a row's tokens to
later cache slots; the rule is about the row's own positions). A query at position q sees the
key at position k when
- the key is a real token (not padding, and written),
- k <= q (causal), and
- with chunked local attention (Llama 4's rope layers), k and q lie in the same chunk of
  `chunk_size` positions: k // chunk_size == q // chunk_size.

Used by the reference masks (layers/attention.py: boolean masks for eager and sdpa, block masks
for flex attention), by the decode step's ring of chunked-layer slots (decoding/kv.py) and by
the caches that keep only what a later query can still see (`kept_positions`).
"""

from __future__ import annotations

import torch


def visible(query_position: torch.Tensor, key_position: torch.Tensor, chunk_size: int | None = None,
            key_real: torch.Tensor | None = None) -> torch.Tensor:
    """True where the query may attend to the key; the arguments broadcast against each other."""
    allowed = key_position <= query_position
    if chunk_size is not None:
        same_chunk = key_position.div(chunk_size, rounding_mode="floor") == query_position.div(chunk_size, rounding_mode="floor")
        allowed = allowed & same_chunk
    if key_real is not None:
        allowed = allowed & key_real
    return allowed


def kept_positions(seen: int, chunk_size: int | None) -> int:
    """How many of the newest positions a cache keeps for a layer that has seen `seen`: all of
    them for full attention; for chunked attention the last chunk_size (a later query looks back
    at most chunk_size - 1 positions, within its own chunk)."""
    return seen if chunk_size is None else min(seen, chunk_size)
