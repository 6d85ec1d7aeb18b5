"""decoding/visibility.py: the one rule, by hand, and the masks built on it."""

from __future__ import annotations

import torch

from herd.decoding.visibility import kept_positions, visible
from herd.layers.attention import build_attention_mask


def test_causal_and_chunked_by_hand():
    q, k = torch.arange(6)[:, None], torch.arange(6)[None, :]
    assert torch.equal(visible(q, k), k <= q)
    chunked = visible(q, k, chunk_size=4)
    # positions 0-3 form one chunk, 4-5 the next: position 5 sees 4 and 5 only
    assert chunked[5].tolist() == [False, False, False, False, True, True]
    assert chunked[3].tolist() == [True, True, True, True, False, False]
    real = torch.tensor([True, False, True, True, True, True])
    assert visible(q, k, chunk_size=4, key_real=real)[3].tolist() == [True, False, True, True, False, False]


def test_kept_positions():
    assert kept_positions(10, None) == 10
    assert kept_positions(10, 4) == 4
    assert kept_positions(3, 4) == 3


def test_reference_mask_counts_chunks_from_each_rows_first_real_token():
    # row 1 has two padding tokens: its chunks of 2 start at column 2
    mask = build_attention_mask(torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]), batch_size=2, query_length=5,
                                past_length=0, kv_length=5, chunk_size=2)
    allowed = mask.boolean(torch.device("cpu"))  # (batch, 1, q, kv)
    assert allowed[0, 0, 4].tolist() == [False, False, False, False, True]  # position 4 starts a chunk
    # row 1's columns 2, 3, 4 are its positions 0, 1, 2: chunks {0, 1} and {2}
    assert allowed[1, 0, 4].tolist() == [False, False, False, False, True]
    assert allowed[1, 0, 3].tolist() == [False, False, True, True, False]
