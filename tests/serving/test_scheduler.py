"""serving/scheduler.py and serving/paged.py's BlockPool: block accounting and scheduling decisions,
without a model (the steps' computing is simulated by advancing `computed`)."""

from __future__ import annotations

import pytest

from herd.serving.engine import EngineRequest, SamplingParams
from herd.serving.paged import BlockPool, batch_bucket, block_digest
from herd.serving.scheduler import Scheduler, Sequence


def _sequence(length: int, name: str, first_token: int = 1) -> Sequence:
    request = EngineRequest(name, list(range(first_token, first_token + length)), SamplingParams(max_tokens=100))
    return Sequence(request=request, arrival=0, tokens=list(request.prompt_ids), prompt_length=length, generator=None,
                    stop_ids=frozenset())


def _scheduler(blocks=32, kinds=("full",), chunk_size=None, **overrides):
    options = dict(block_size=4, max_batch=8, prefill_chunk=8, max_waiting=100)
    return Scheduler(kinds=list(kinds), num_blocks=dict.fromkeys(kinds, blocks), chunk_size=chunk_size,
                     **{**options, **overrides})


def _compute(scheduler: Scheduler, plan) -> None:
    """What the engine does after running a plan: positions stored, a token appended when a row
    produced one."""
    for sequence in plan.decode:
        sequence.computed += 1
        scheduler.after_compute(sequence)
        sequence.tokens.append(7)
    for chunk in plan.prefill:
        chunk.sequence.computed = chunk.end
        scheduler.after_compute(chunk.sequence)
        if chunk.finishes_prompt:
            chunk.sequence.tokens.append(7)


def test_block_pool_reference_counts_and_lru_eviction():
    pool = BlockPool(3, caching=True)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert {a, b, c} == {1, 2, 3} and pool.allocate() is None  # block 0 is never handed out
    pool.register(a, b"A")
    pool.register(b, b"B")
    pool.share(a)  # a second holder
    pool.release(a)
    assert pool.used == 3
    pool.release(b)  # cached, released first
    pool.release(a)  # cached, released second
    pool.release(c)  # not cached: free
    assert pool.used == 0 and pool.available == 3
    assert pool.find(b"A") == a and pool.find(b"B") == b
    assert pool.allocate() == c  # a free block before any cached one
    assert pool.allocate() == b  # then the least recently released cached block, evicted
    assert pool.find(b"B") is None and pool.find(b"A") == a
    pool.share(a)  # taken back from the evictable list
    assert pool.used == 3 and pool.allocate() is None


def test_block_pool_without_caching_finds_nothing():
    pool = BlockPool(2, caching=False)
    block = pool.allocate()
    pool.register(block, b"A")
    assert pool.find(b"A") is None
    pool.release(block)
    assert pool.available == 2


def test_block_digests_name_the_whole_prefix():
    assert block_digest(b"", [1, 2]) == block_digest(b"", [1, 2])
    assert block_digest(b"", [1, 2]) != block_digest(b"", [2, 1])
    assert block_digest(block_digest(b"", [1, 2]), [3, 4]) != block_digest(block_digest(b"", [9, 2]), [3, 4])
    assert block_digest(b"image", [1, 2]) != block_digest(b"", [1, 2])


@pytest.mark.parametrize("rows,bucket", [(1, 1), (3, 4), (16, 16), (17, 32), (256, 256), (300, 512)])
def test_batch_buckets(rows, bucket):
    assert batch_bucket(rows) == bucket


def test_prefill_budget_splits_prompts_into_chunks_and_decode_rows_run_every_step():
    scheduler = _scheduler(prefill_chunk=8)
    long, short = _sequence(19, "long"), _sequence(3, "short")
    scheduler.add(long)
    scheduler.add(short)
    plan = scheduler.schedule()
    assert [(c.sequence.request_id, c.start, c.end) for c in plan.prefill] == [("long", 0, 8)]
    _compute(scheduler, plan)
    plan = scheduler.schedule()
    assert [(c.sequence.request_id, c.start, c.end) for c in plan.prefill] == [("long", 8, 16)]
    _compute(scheduler, plan)
    plan = scheduler.schedule()  # the long prompt's last 3 tokens, then the short prompt within the budget
    assert [(c.sequence.request_id, c.start, c.end) for c in plan.prefill] == [("long", 16, 19), ("short", 0, 3)]
    _compute(scheduler, plan)
    plan = scheduler.schedule()
    assert [s.request_id for s in plan.decode] == ["long", "short"] and not plan.prefill


def test_max_batch_limits_the_running_requests():
    scheduler = _scheduler(max_batch=2, prefill_chunk=100)
    for index in range(4):
        scheduler.add(_sequence(3, f"r{index}"))
    plan = scheduler.schedule()
    assert [c.sequence.request_id for c in plan.prefill] == ["r0", "r1"]
    assert len(scheduler.waiting) == 2


def test_decode_rows_that_need_a_block_preempt_the_newest_request():
    scheduler = _scheduler(blocks=4, prefill_chunk=100)
    old, new = _sequence(8, "old"), _sequence(7, "new")
    scheduler.add(old)
    scheduler.add(new)
    _compute(scheduler, scheduler.schedule())  # both prefilled: 2 blocks each, the pool is full
    assert scheduler.pools["full"].available == 0
    plan = scheduler.schedule()  # old's 9th position needs a third block: new is preempted
    assert [s.request_id for s in plan.decode] == ["old"]
    assert scheduler.preemptions == 1 and list(scheduler.waiting) == [new] and new.computed == 0
    assert new.tokens == list(range(1, 8)) + [7]  # its generated token is kept, to be recomputed with the prompt


def test_a_waiting_request_takes_its_cached_prefix():
    scheduler = _scheduler(prefill_chunk=100)
    first = _sequence(10, "first")
    scheduler.add(first)
    _compute(scheduler, scheduler.schedule())
    second = _sequence(9, "second")  # the same first 9 tokens
    scheduler.add(second)
    plan = scheduler.schedule()
    chunk = next(c for c in plan.prefill if c.sequence is second)
    assert chunk.start == 8 and second.cached_tokens == 8  # two whole blocks; the last token is computed
    assert second.blocks["full"][:2] == first.blocks["full"][:2]
    assert scheduler.pools["full"].refs[first.blocks["full"][0]] == 2
    assert scheduler.prefix_cache_hits == 8 and scheduler.prefix_cache_queries == 19


def test_chunked_layers_never_hold_more_than_their_window():
    """Chunks of 8 positions, blocks of 4: a request's chunked-layer blocks before its chunk's
    start go back, while its full-attention blocks stay."""
    scheduler = _scheduler(blocks=40, kinds=("full", "chunked"), chunk_size=8, prefill_chunk=6)
    sequence = _sequence(30, "long")
    scheduler.add(sequence)
    held = []
    while sequence.computed < 60:
        _compute(scheduler, scheduler.schedule())
        held.append(sum(1 for block in sequence.blocks["chunked"] if block))
        window_start = sequence.computed - sequence.computed % 8
        assert all(block == 0 for block in sequence.blocks["chunked"][: window_start // 4])
        assert all(sequence.blocks["full"])  # full-attention layers keep everything
    assert max(held) <= -(-(8 + 6) // 4) + 1
    assert scheduler.pools["chunked"].used == max(1, held[-1])
    assert not scheduler.pools["chunked"].caching


def test_with_chunked_layers_a_prefix_hit_is_whole_chunks():
    scheduler = _scheduler(blocks=40, kinds=("full", "chunked"), chunk_size=8, prefill_chunk=100)
    first = _sequence(23, "first")
    scheduler.add(first)
    _compute(scheduler, scheduler.schedule())
    second = _sequence(23, "second")  # 5 whole blocks (20 tokens) cached: 16, two chunks, reused
    scheduler.add(second)
    chunk = scheduler.schedule().prefill[0]
    assert (chunk.start, second.cached_tokens) == (16, 16)
    assert second.blocks["full"][:4] == first.blocks["full"][:4] and second.blocks["chunked"][:4] == [0] * 4
    assert scheduler.pools["full"].refs[first.blocks["full"][4]] == 1  # the fifth block was given back
