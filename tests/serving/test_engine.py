"""serving/engine.py: many requests through the paged engine give each request what model.generate()
gives it alone (greedy, float32, tiny random models), whatever the batching, chunking, preemption
and prefix reuse; sampling, logprobs, constraints, stop conditions, aborts and the async front."""

from __future__ import annotations

import asyncio
import copy
import random

import pytest
import torch

import herd
from herd.serving.engine import (
    AsyncEngine,
    Engine,
    EngineRequest,
    QueueFull,
    SamplingParams,
    kv_block_bytes,
    pool_blocks,
)
from herd.serving.paged import PrefillWork, prefill_batches
from herd.serving.scheduler import PLACEHOLDER
from tests.conftest import reference_llama, save_reference
from tests.models.llama4.test_modeling_llama4 import reference_llama4

VOCAB = 128
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    reference = reference_llama(max_position_embeddings=256, head_dim=16)  # 16: the Triton kernels' smallest head
    folder = save_reference(reference, tmp_path_factory.mktemp("engine") / "llama")
    return herd.AutoModelForCausalLM.from_pretrained(folder, progress=False)


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    # 4 layers: the 4th a global NoPE layer, the others chunked with chunks of 8 positions; MoE every other layer
    reference = reference_llama4(interleave_moe_layer_step=2, num_experts_per_tok=2, head_dim=16, floor_scale=4,
                                 num_hidden_layers=4, attention_chunk_size=8, max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("engine") / "llama4"
    reference.save_pretrained(folder)
    return herd.AutoModelForCausalLM.from_pretrained(folder, progress=False)


@pytest.fixture(scope="module")
def llama4_vision(tmp_path_factory):
    from tests.models.llama4.test_modeling_llama4_multimodal import pair

    return pair.__wrapped__(tmp_path_factory)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def scheduling(request, monkeypatch):
    """Engines built in the test with async scheduling off, then on (the CPU's default is off; on
    a GPU it is on): the tokens must not depend on it."""
    original = Engine.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("async_scheduling", request.param)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "__init__", init)
    return request.param


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _expected(model, prompt: list[int], new: int, **options) -> list[int]:
    """model.generate()'s greedy tokens for the prompt alone (no eos: always `new` tokens); on a GPU
    the plain path's (the reference forward). `options`: more of generate()'s (cache_config)."""
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=0, disable_compile=True, **options)
    return out[0, len(prompt) :].tolist()


def _greedy(prompt, new, request_id, **sampling):
    return EngineRequest(request_id, prompt, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, **sampling))


def _run(engine: Engine, arrivals: dict[int, list[EngineRequest]]):
    """Requests added at the step given by `arrivals`; each request's events."""
    events: dict[str, list] = {}
    step = 0
    while engine.has_work() or any(s >= step for s in arrivals):
        for request in arrivals.pop(step, []):
            engine.add_request(request)
        for request_id, event in engine.step():
            events.setdefault(request_id, []).append(event)
        step += 1
    return events


def _tokens(events):
    return {request_id: [e.token_id for e in request_events] for request_id, request_events in events.items()}


def _concurrent_requests(count: int, seed: int, longest: int, most_new: int):
    rng = random.Random(seed)
    requests, arrivals = {}, {}
    for index in range(count):
        prompt = _prompt(rng.randint(1, longest), seed * 100 + index)
        request = _greedy(prompt, rng.randint(1, most_new), f"r{index}")
        requests[request.request_id] = request
        arrivals.setdefault(rng.randint(0, 6), []).append(request)
    return requests, arrivals


@pytest.mark.parametrize("family", ["llama", "llama4", "mllama"])
@pytest.mark.parametrize("prefill_chunk", [16, 128])
def test_concurrent_greedy_requests_get_generates_tokens(family, prefill_chunk, request, monkeypatch, scheduling):
    """14 requests of random lengths arriving at different steps, prompts chunked (llama4: longer
    than its 8-position attention chunks), small blocks: each request gets generate()'s tokens.
    With room for several prompts a step, their chunks go through the model as one padded batch."""
    model = request.getfixturevalue(family)
    engine = Engine(model, max_batch=8, block_size=4, num_blocks=200, prefill_chunk=prefill_chunk, max_model_len=128)
    batch_rows = []
    prefill = engine.runner.prefill
    monkeypatch.setattr(engine.runner, "prefill", lambda works: batch_rows.append(len(works)) or prefill(works))
    requests, arrivals = _concurrent_requests(14, seed=1, longest=40, most_new=12)
    events = _run(engine, arrivals)
    if prefill_chunk > 40:
        assert max(batch_rows) > 2
    for request_id, queued in requests.items():
        expected = _expected(model, queued.prompt_ids, queued.sampling.max_tokens)
        assert _tokens(events)[request_id] == expected, request_id
        assert events[request_id][-1].finish_reason == "length"
        assert all(e.prompt_tokens == len(queued.prompt_ids) for e in events[request_id])
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0
    assert stats["generated_tokens"] == sum(r.sampling.max_tokens for r in requests.values())


@pytest.mark.parametrize("family, seed", [("llama", 1), ("llama4", 3)])
def test_fp8_kv_cache_requests_get_generates_fp8_cache_tokens(family, seed, request, monkeypatch):
    """kv_cache_dtype="fp8": the full-attention pools in e4m3 with a float32 scale per (kv head,
    slot), Llama 4's chunked layers in the model's dtype (as generate()'s FP8 cache keeps them).
    14 requests arriving at different steps, prompts longer than a step's 24 tokens chunked,
    shorter ones batched: each gets generate()'s tokens with cache_config={"dtype": "fp8"}, which
    for some differ from the model-dtype cache's (the FP8 rounding shows; the seeds are ones where
    it does: Llama 4 has one FP8 layer of 4, whose rounding moves a greedy token less often)."""
    model = request.getfixturevalue(family)
    engine = Engine(model, max_batch=8, block_size=4, num_blocks=200, prefill_chunk=24, max_model_len=128,
                    kv_cache_dtype="fp8")
    kv = engine.runner.kv
    for layer, kind in kv.kind_of.items():
        fp8 = kind == "full"
        assert kv.keys[layer].dtype == kv.values[layer].dtype == (torch.float8_e4m3fn if fp8 else model.dtype)
        assert (layer in kv.key_scales and kv.value_scales[layer].shape == kv.keys[layer].shape[:3]) == fp8
    batch_rows = []
    prefill = engine.runner.prefill
    monkeypatch.setattr(engine.runner, "prefill", lambda works: batch_rows.append(len(works)) or prefill(works))
    requests, arrivals = _concurrent_requests(14, seed=seed, longest=40, most_new=12)
    events = _tokens(_run(engine, arrivals))
    assert max(batch_rows) > 1 and max(len(r.prompt_ids) for r in requests.values()) > 24
    differs = False
    for request_id, queued in requests.items():
        prompt, new = queued.prompt_ids, queued.sampling.max_tokens
        expected = _expected(model, prompt, new, cache_config={"dtype": "fp8"})
        assert events[request_id] == expected, request_id
        differs |= expected != _expected(model, prompt, new)
    assert differs
    assert engine.stats()["kv_blocks_used"] == 0


def test_fp8_kv_cache_fits_twice_the_blocks(monkeypatch):
    """The default pool (on CUDA: CUDA_MEMORY_FRACTION of the free memory) counts FP8 bytes and
    scales: at head_dim 128 a full layer's block takes 132 bytes per head of each position where
    bf16 takes 256, so 256 / 132 = 1.94 times the blocks fit; Llama 4's chunked layers' windows
    stay in bf16 (taken first, as before)."""
    from types import SimpleNamespace

    from herd.models.llama import LlamaConfig
    from herd.serving import engine as engine_module

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32)
    plain = kv_block_bytes(config, 16, torch.bfloat16)
    fp8 = kv_block_bytes(config, 16, torch.bfloat16, torch.float8_e4m3fn)
    assert plain == {"full": 2 * 8 * 16 * 128 * 2, "chunked": 2 * 8 * 16 * 128 * 2}
    assert fp8 == {"full": 2 * 8 * 16 * (128 + 4), "chunked": plain["chunked"]}
    assert kv_block_bytes(config, 16, torch.bfloat16, torch.float8_e4m3fn, tp_size=2)["full"] == fp8["full"] // 2
    budget = 100 * 2**30
    assert pool_blocks(budget, {"full": 32}, plain, 0) == budget // (32 * plain["full"])
    assert pool_blocks(budget, {"full": 32}, fp8, 0) == budget // (32 * fp8["full"])
    scout = {"full": 12, "chunked": 36}  # the chunked layers' pool of 1000 blocks first, then the full layers'
    assert pool_blocks(budget, scout, fp8, 1000) == (budget - 1000 * 36 * plain["chunked"]) // (12 * fp8["full"])

    # the engine's own count, as on a GPU with 100 GiB free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (budget, 2 * budget))

    def default_blocks(kv_cache_dtype):
        engine = SimpleNamespace(model=SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16,
                                                       config=config),
                                 block_size=16, max_batch=256, kv_cache_dtype=kv_cache_dtype)
        return Engine._default_blocks(engine, {"full": 32}, 2048, 0)

    blocks, fp8_blocks = default_blocks(None), default_blocks(torch.float8_e4m3fn)
    assert blocks == int(budget * engine_module.CUDA_MEMORY_FRACTION // (32 * plain["full"]))
    assert fp8_blocks == int(budget * engine_module.CUDA_MEMORY_FRACTION // (32 * fp8["full"]))
    assert fp8_blocks / blocks == pytest.approx(256 / 132, rel=1e-4)


def test_kv_cache_dtype_spellings_and_refusal(llama):
    for spelling in ("fp8", "fp8_e4m3", "float8_e4m3fn", torch.float8_e4m3fn):
        engine = Engine(llama, max_batch=2, block_size=4, num_blocks=16, max_model_len=32, kv_cache_dtype=spelling)
        assert engine.runner.kv.keys[0].dtype == torch.float8_e4m3fn
    assert Engine(llama, max_batch=2, block_size=4, num_blocks=16, max_model_len=32).runner.kv.keys[0].dtype == \
        llama.dtype
    for bad in ("int8", "bf16", torch.bfloat16):
        with pytest.raises(ValueError, match=r"kv_cache_dtype \(herd serve --kv-cache-dtype\) .* is not supported"):
            Engine(llama, max_batch=2, block_size=4, num_blocks=16, max_model_len=32, kv_cache_dtype=bad)


@pytest.mark.parametrize("family", ["llama", "llama4"])
def test_a_batch_of_chunks_equals_each_chunk_alone(family, request):
    """Chunks of three requests from the same position (the first chunks from 0, then the rest
    from 8, past Llama 4's first attention chunk), of three lengths: the batch gives each row's
    logits and stores each row's keys/values as the chunks one at a time do; padded positions
    touch no request's slots."""
    model = request.getfixturevalue(family)
    prompts = [_prompt(8 + extra, 40 + extra) for extra in (3, 9, 1)]

    def run(batched: bool):
        engine = Engine(model, max_batch=4, block_size=4, num_blocks=200, max_model_len=64)
        runner = engine.runner
        kinds = list(runner.layers_by_kind)
        slots = [{kind: [40 + 50 * row + p for p in range(len(prompt))] for kind in kinds}
                 for row, prompt in enumerate(prompts)]
        logits = []
        for start in (0, 8):
            kept_from = {kind: start if kind == "chunked" else 0 for kind in kinds}
            works = [PrefillWork(prompt if start else prompt[:8], start,
                                 {kind: row_slots[kind][: len(prompt) if start else 8] for kind in kinds}, kept_from)
                     for prompt, row_slots in zip(prompts, slots)]
            results = runner.prefill(works) if batched else [runner.prefill([work])[0] for work in works]
            logits.append(torch.stack([result.logits for result in results]))
        return logits, runner.kv

    (first_batched, rest_batched), kv_batched = run(True)
    (first_alone, rest_alone), kv_alone = run(False)
    torch.testing.assert_close(first_batched, first_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rest_batched, rest_alone, rtol=1e-5, atol=1e-5)
    for layer in kv_alone.keys:
        for batched, alone in ((kv_batched.keys[layer], kv_alone.keys[layer]),
                               (kv_batched.values[layer], kv_alone.values[layer])):
            # every slot past block 0 (the padding's scratch block) as the chunks alone left it
            torch.testing.assert_close(batched[:, :, 4:], alone[:, :, 4:], rtol=1e-5, atol=1e-5)


def test_prefill_batches_group_chunks_from_one_position():
    def work(length, start=0, images=None):
        return PrefillWork(list(range(length)), start, {"full": list(range(length))}, {"full": 0}, images)

    works = [work(10), work(9), work(3), work(12, start=4), work(8), work(5, images={"pixel_values": None}), work(2)]
    batches = prefill_batches(works)
    assert sorted(i for batch in batches for i in batch) == list(range(len(works)))
    assert [5] in batches and [3] in batches  # images alone; the only chunk from position 4 alone
    assert [0, 1, 4] in batches  # 10, 9, 8 tokens: padded to 30 for 27 real, within a quarter
    assert [2, 6] in batches  # 3 and 2 tokens: 10 + 2 padded to 36 would be too much padding
    assert prefill_batches(works, max_padding=0.0) == [[5], [0], [1], [4], [2], [6], [3]]


def test_warm_up_runs_every_bucket_with_padding_rows_alone(llama, monkeypatch):
    """warm_up: nothing on the CPU (nothing is captured there); where buckets are captured, one
    decode step of padding rows per bucket, in order, with progress; the steps write to block 0
    alone, so requests afterwards still get generate()'s tokens. Buckets past 256 are multiples of 256."""
    engine = Engine(llama, max_batch=8, block_size=4, num_blocks=64, max_model_len=64)
    assert engine.runner.buckets() == []
    engine.warm_up(lambda *_: pytest.fail("nothing is captured on the CPU"))
    monkeypatch.setattr(engine.runner, "buckets", lambda: [1, 2, 4, 8])
    rows, seen = [], []
    decode = engine.runner.decode
    monkeypatch.setattr(engine.runner, "decode", lambda tokens, *rest, **images: rows.append(len(tokens)) or decode(
        tokens, *rest, **images))
    engine.warm_up(lambda bucket, index, count: seen.append((bucket, index, count)))
    assert rows == [1, 2, 4, 8] and seen == [(1, 0, 4), (2, 1, 4), (4, 2, 4), (8, 3, 4)]
    requests = [_greedy(_prompt(length, length), 5, f"r{length}") for length in (3, 11)]
    tokens = _tokens(_run(engine, {0: requests}))
    assert tokens == {r.request_id: _expected(llama, r.prompt_ids, 5) for r in requests}
    monkeypatch.setattr(engine.runner, "capture", True)
    monkeypatch.setattr(engine.runner, "max_rows", 1024)
    assert type(engine.runner).buckets(engine.runner) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024]


def test_chunked_prefill_gives_the_unchunked_tokens_and_logprobs(llama4):
    requests = [_greedy(_prompt(length, length), 6, f"r{length}", logprobs=2) for length in (5, 19, 33)]
    results = []
    for chunk in (3, 512):
        engine = Engine(llama4, max_batch=4, block_size=4, num_blocks=64, prefill_chunk=chunk, max_model_len=64)
        results.append(_run(engine, {0: list(requests)}))
    chunked, whole = results
    assert _tokens(chunked) == _tokens(whole)
    for request_id in whole:
        for a, b in zip(chunked[request_id], whole[request_id]):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_preemption_under_a_tiny_pool_gives_the_same_tokens(llama, scheduling):
    """20 blocks of 4 positions for 8 requests that need up to 11 each: the newest are preempted and
    recomputed, and every request still gets generate()'s tokens."""
    engine = Engine(llama, max_batch=8, block_size=4, num_blocks=16, prefill_chunk=64, max_model_len=64)
    requests, arrivals = {}, {0: []}
    for index in range(8):
        request = _greedy(_prompt(10 + 3 * index, 50 + index), 14, f"r{index}")
        requests[request.request_id] = request
        arrivals[0].append(request)
    events = _run(engine, arrivals)
    assert engine.stats()["preemptions"] > 0
    for request_id, request in requests.items():
        assert _tokens(events)[request_id] == _expected(llama, request.prompt_ids, 14), request_id
    assert engine.stats()["kv_blocks_used"] == 0


def test_prefix_blocks_are_shared_and_counted(llama, scheduling):
    engine = Engine(llama, max_batch=4, block_size=4, num_blocks=64, prefill_chunk=64, max_model_len=64)
    shared = _prompt(18, 7)
    first = _greedy(shared + [5, 6], 3, "first")
    second = _greedy(shared + [9], 3, "second")
    engine.add_request(first)
    engine.step()  # first prefilled: its 5 full blocks are cached
    first_blocks = list(engine.scheduler.running[0].blocks["full"])
    engine.add_request(second)
    engine.step()
    second_sequence = engine.sequences["second"]
    assert second_sequence.blocks["full"][:4] == first_blocks[:4]  # the 16 tokens of whole blocks of the shared prefix
    events = _run(engine, {})
    assert events["second"][-1].cached_prompt_tokens == 16
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 16 and stats["prefix_cache_queries"] == 20 + 19
    assert [e.token_id for e in events["second"]][-2:] == _expected(llama, second.prompt_ids, 3)[-2:]


def test_a_prefix_hit_gives_the_same_tokens_as_a_cold_run(llama, scheduling):
    prompt = _prompt(23, 8)
    engine = Engine(llama, max_batch=4, block_size=4, num_blocks=64, prefill_chunk=64, max_model_len=64)
    cold = _tokens(_run(engine, {0: [_greedy(prompt, 8, "cold")]}))["cold"]
    warm = _run(engine, {0: [_greedy(prompt, 8, "warm")]})
    assert warm["warm"][0].cached_prompt_tokens == 20
    assert [e.token_id for e in warm["warm"]] == cold == _expected(llama, prompt, 8)


def test_llama4_prefix_hits_are_whole_attention_chunks(llama4):
    prompt = _prompt(23, 9)
    engine = Engine(llama4, max_batch=4, block_size=4, num_blocks=64, prefill_chunk=64, max_model_len=64)
    cold = _tokens(_run(engine, {0: [_greedy(prompt, 8, "cold")]}))["cold"]
    warm = _run(engine, {0: [_greedy(prompt, 8, "warm")]})
    assert warm["warm"][0].cached_prompt_tokens == 16  # 20 cached, rounded down to two chunks of 8
    assert [e.token_id for e in warm["warm"]] == cold == _expected(llama4, prompt, 8)


def test_abort_frees_blocks_at_once(llama, scheduling):
    engine = Engine(llama, max_batch=4, block_size=4, num_blocks=64, prefill_chunk=64, max_model_len=64)
    for index in range(3):
        engine.add_request(_greedy(_prompt(9, index), 30, f"r{index}"))
    engine.add_request(_greedy(_prompt(9, 9), 30, "queued"))
    for _ in range(3):
        engine.step()
    used = engine.stats()["kv_blocks_used"]
    assert used > 0
    engine.abort("r1")
    assert 0 < engine.stats()["kv_blocks_used"] < used
    for request_id in ("r0", "r2", "queued"):
        engine.abort(request_id)
    stats = engine.stats()
    assert stats["kv_blocks_used"] == stats["running"] == stats["waiting"] == 0
    events = engine.step()
    assert sorted(request_id for request_id, _ in events) == ["queued", "r0", "r1", "r2"]
    assert all(e.finish_reason == "abort" and e.token_id is None for _, e in events)
    assert not engine.has_work()


def test_a_seeded_sampled_request_is_the_same_alone_and_in_a_batch(llama, scheduling):
    params = dict(max_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    prompt = _prompt(11, 3)

    def run(neighbours: int):
        engine = Engine(llama, max_batch=8, block_size=4, num_blocks=128, prefill_chunk=64, max_model_len=64)
        arrivals = {0: [EngineRequest("seeded", prompt, SamplingParams(**params, ignore_eos=True))]}
        for index in range(neighbours):
            arrivals.setdefault(index % 3, []).append(
                EngineRequest(f"n{index}", _prompt(5 + index, 70 + index),
                              SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)))
        return _tokens(_run(engine, arrivals))["seeded"]

    alone = run(0)
    assert run(5) == alone
    other_seed = Engine(llama, max_batch=2, block_size=4, num_blocks=64, max_model_len=64)
    other = _run(other_seed, {0: [EngineRequest("s", prompt, SamplingParams(**{**params, "seed": 99}, ignore_eos=True))]})
    assert _tokens(other)["s"] != alone  # the seed matters (12 tokens of a random model)


def test_logprobs_are_the_processed_distributions(llama):
    """Greedy without penalties: the model's own log_softmax; with a temperature: of logits / T."""
    prompt = _prompt(9, 4)
    logits = llama(torch.tensor([prompt])).logits[0, -1].float()
    for temperature in (0.0, 0.5):
        engine = Engine(llama, max_batch=2, block_size=4, num_blocks=64, max_model_len=64)
        request = EngineRequest("r", prompt, SamplingParams(max_tokens=1, temperature=temperature, seed=0, logprobs=3))
        event = _run(engine, {0: [request]})["r"][0]
        expected = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
        assert event.logprob == pytest.approx(expected[event.token_id].item(), abs=1e-5)
        values, ids = expected.topk(3)
        assert [token for token, _ in event.top_logprobs] == ids.tolist()
        assert [value for _, value in event.top_logprobs] == pytest.approx(values.tolist(), abs=1e-5)


def test_prompt_logprobs_are_the_models_log_softmax_over_the_prompt(llama):
    """sampling.prompt_logprobs: on the first token's event, None for the first prompt token, then each
    token's logprob and the k best from log_softmax of the model's logits one position before (with
    a temperature and a bias that the generated tokens' logprobs use, not the prompt's). The same
    in chunks of 3 (collected chunk by chunk), with the prompt's blocks in the prefix cache (not read
    for it) and beside a request that does not ask."""
    prompt = _prompt(13, 21)
    expected = torch.log_softmax(llama(torch.tensor([prompt])).logits[0].float(), dim=-1)
    for chunk in (3, 64):
        engine = Engine(llama, max_batch=4, block_size=4, num_blocks=64, prefill_chunk=chunk, max_model_len=64)
        _run(engine, {0: [_greedy(prompt, 2, "warm")]})  # the prompt's blocks are cached now
        params = SamplingParams(max_tokens=2, temperature=0.7, seed=1, prompt_logprobs=3, logit_bias=((5, 3.0),))
        events = _run(engine, {0: [EngineRequest("r", prompt, params), _greedy(prompt, 2, "plain")]})
        first, second = events["r"]
        assert first.cached_prompt_tokens == 0 and events["plain"][0].cached_prompt_tokens == 12
        assert second.prompt_logprobs is None and events["plain"][0].prompt_logprobs is None
        entries = first.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        for position, (logprob, top) in enumerate(entries[1:]):
            row = expected[position]
            assert logprob == pytest.approx(row[prompt[position + 1]].item(), abs=1e-5)
            values, ids = row.topk(3)
            assert [token for token, _ in top] == ids.tolist()
            assert [value for _, value in top] == pytest.approx(values.tolist(), abs=1e-5)
    engine = Engine(llama, max_batch=2, block_size=4, num_blocks=64, max_model_len=64)
    alone = _run(engine, {0: [_greedy(prompt[:1], 1, "one", prompt_logprobs=0)]})["one"][0]
    assert alone.prompt_logprobs == [None]
    engine = Engine(llama, max_batch=2, block_size=4, num_blocks=64, max_model_len=64)
    none = _run(engine, {0: [_greedy(prompt, 1, "k0", prompt_logprobs=0)]})["k0"][0].prompt_logprobs
    assert [top for _, top in none[1:]] == [[]] * 12 and none[5][0] == pytest.approx(entries[5][0], abs=1e-5)


class EvenTokensThenStop:
    """A constraint: only even ids; finished after three tokens."""

    def __init__(self):
        self.accepted = []

    def fill_allowed(self, allowed):
        allowed[1::2] = False

    def accept(self, token_id):
        self.accepted.append(token_id)

    def is_finished(self):
        return len(self.accepted) == 3


def test_a_constraint_masks_tokens_and_finishes_the_request(llama):
    engine = Engine(llama, max_batch=2, block_size=4, num_blocks=64, max_model_len=64)
    constraint = EvenTokensThenStop()
    request = EngineRequest("r", _prompt(6, 5), SamplingParams(max_tokens=10, temperature=1.0, seed=1),
                            constraint=constraint)
    events = _run(engine, {0: [request]})["r"]
    assert [e.token_id for e in events] == constraint.accepted
    assert all(token % 2 == 0 for token in constraint.accepted)
    assert [e.finish_reason for e in events] == [None, None, "stop"]


class FailsAfter(EvenTokensThenStop):
    """A constraint whose grammar raises in `method` once it has accepted `count` tokens."""

    def __init__(self, method: str, count: int):
        super().__init__()
        self.method, self.count = method, count

    def fill_allowed(self, allowed):
        if self.method == "fill_allowed" and len(self.accepted) >= self.count:
            raise RuntimeError("grammar exploded")

    def accept(self, token_id):
        if self.method == "accept" and len(self.accepted) >= self.count:
            raise RuntimeError("grammar exploded")
        self.accepted.append(token_id)

    def is_finished(self):
        return False


@pytest.mark.parametrize("method", ["fill_allowed", "accept"])
def test_a_failing_constraint_ends_its_request_only(llama, method, scheduling):
    """A request whose grammar raises ends with an "error" event naming the failure, its blocks go
    back, and the requests batched with it get their tokens as if it had never been there."""
    prompts = {"a": _prompt(5, 40), "b": _prompt(9, 41)}
    engine = Engine(llama, max_batch=4, block_size=4, num_blocks=64, max_model_len=64)
    bad = EngineRequest("bad", _prompt(6, 42), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                        constraint=FailsAfter(method, 2))
    events = _run(engine, {0: [bad, *(_greedy(prompt, 6, name) for name, prompt in prompts.items())]})
    failed = events["bad"]
    assert [e.finish_reason for e in failed] == [None, None, "error"] and failed[-1].token_id is None
    assert "grammar exploded" in failed[-1].error
    for name, prompt in prompts.items():
        assert [e.token_id for e in events[name]] == _expected(llama, prompt, 6)
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.sequences


def test_a_failing_model_run_fails_its_own_rows_and_the_engine_goes_on(llama, monkeypatch, scheduling):
    """A prefill batch that raises fails the requests in it (an "error" event each), the decode rows
    of the same step keep their tokens, and the engine serves later requests; the AsyncEngine hands
    the failure to that request's stream as an exception."""
    engine = Engine(llama, max_batch=4, block_size=4, num_blocks=64, max_model_len=64)
    prefill = engine.runner.prefill
    doomed = _prompt(7, 44)

    def failing_prefill(works):
        if any(work.tokens[: len(doomed)] == doomed for work in works):
            raise torch.cuda.OutOfMemoryError("out of memory in the prefill")
        return prefill(works)

    monkeypatch.setattr(engine.runner, "prefill", failing_prefill)
    early, late = _prompt(5, 45), _prompt(6, 46)
    events = _run(engine, {0: [_greedy(early, 6, "early")], 2: [_greedy(doomed, 6, "doomed")],
                           4: [_greedy(late, 3, "late")]})
    assert [e.finish_reason for e in events["doomed"]] == ["error"] and "OutOfMemoryError" in events["doomed"][0].error
    assert [e.token_id for e in events["early"]] == _expected(llama, early, 6)
    assert [e.token_id for e in events["late"]] == _expected(llama, late, 3)
    assert engine.stats()["kv_blocks_used"] == 0

    async def main():
        front = AsyncEngine(engine)
        await front.start()
        with pytest.raises(RuntimeError, match="the request failed: OutOfMemoryError"):
            [event async for event in front.generate(_greedy(doomed, 3, "again"))]
        kept = [event.token_id async for event in front.generate(_greedy(late, 3, "after"))]
        await front.stop()
        return kept

    assert asyncio.run(main()) == _expected(llama, late, 3)


def test_async_scheduling_returns_a_steps_tokens_with_the_next_step(llama):
    """Async scheduling: a step's tokens stay on the device (a placeholder in the sequence) and come
    out of the next step, which has already read them there; the CPU's default is off."""
    assert Engine(llama, max_batch=2, block_size=4, num_blocks=64, max_model_len=64).async_scheduling is False
    prompt = _prompt(6, 60)
    engine = Engine(llama, max_batch=2, block_size=4, num_blocks=64, max_model_len=64, async_scheduling=True)
    engine.add_request(_greedy(prompt, 3, "r"))
    assert engine.step() == []  # the prompt, its first token still in flight
    assert engine.sequences["r"].tokens[-1] == PLACEHOLDER
    expected = _expected(llama, prompt, 3)
    steps = [engine.step() for _ in range(3)]
    assert [[(i, e.token_id) for i, e in events] for events in steps] == [[("r", t)] for t in expected]
    assert steps[-1][0][1].finish_reason == "length" and not engine.has_work()


def test_async_scheduling_takes_logprobs_on_the_device(llama):
    """Rows asking for logprobs stay asynchronous (the logprobs are copied with the tokens): the same
    tokens, logprobs and top alternatives as the synchronous engine's, sampled rows included."""
    from herd.serving import engine as module

    launched = []
    launch = module._InFlight.launch.__func__

    def counting(cls, drawn, *args):
        launched.append(drawn.own is not None)
        return launch(cls, drawn, *args)

    runs = {}
    for overlap in (False, True):
        engine = Engine(llama, max_batch=4, block_size=4, num_blocks=64, max_model_len=64, async_scheduling=overlap)
        requests = [EngineRequest("greedy", _prompt(7, 90), SamplingParams(max_tokens=6, temperature=0, logprobs=3,
                                                                          ignore_eos=True)),
                    EngineRequest("sampled", _prompt(5, 91), SamplingParams(max_tokens=6, temperature=0.8, seed=5,
                                                                           logprobs=0, ignore_eos=True))]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(module._InFlight, "launch", classmethod(counting))
            events = _run(engine, {0: requests})
        runs[overlap] = {name: [(e.token_id, e.logprob, e.top_logprobs) for e in got] for name, got in events.items()}
    assert runs[True] == runs[False] and launched and all(launched)
    assert all(len(top) == 3 for _, _, top in runs[True]["greedy"]) and runs[True]["sampled"][0][2] == []


def test_async_scheduling_with_an_eos_and_host_drawn_rows_gives_the_sync_tokens(llama):
    """Requests that stop at an eos (one more row computed and dropped), requests whose rows the host
    draws (penalties: those steps wait for the tokens before them), logprobs (taken on the device,
    copied with the tokens) and plain ones, arriving at different steps: the same events as without
    async scheduling, logprobs included, every block back at the end."""
    prompts = [_prompt(5 + 3 * i, 80 + i) for i in range(6)]
    stop_at = _expected(llama, prompts[0], 8)[2]

    def requests():
        options = [dict(stop_token_ids=(stop_at,)), dict(repetition_penalty=1.3), dict(logprobs=2),
                   dict(frequency_penalty=0.5), {}, dict(stop_token_ids=(stop_at,))]
        return {step: [EngineRequest(f"r{i}", prompts[i], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                                          **options[i]))
                       for i in range(6) if i % 3 == step] for step in range(3)}

    runs = {}
    for overlap in (False, True):
        engine = Engine(llama, max_batch=4, block_size=4, num_blocks=64, max_model_len=64, async_scheduling=overlap)
        events = _run(engine, requests())
        runs[overlap] = {name: [(e.token_id, e.finish_reason, e.logprob) for e in got] for name, got in events.items()}
        assert engine.stats()["kv_blocks_used"] == 0 and not engine.sequences
        assert engine.generated_tokens == sum(len(got) for got in events.values())
    assert runs[True] == runs[False]
    assert runs[True]["r0"][-1][:2] == (stop_at, "stop") and len(runs[True]["r0"]) == 3


def test_eos_ids_of_the_generation_config_and_stop_token_ids_end_a_request(llama, scheduling):
    prompt = _prompt(7, 6)
    free = _expected(llama, prompt, 6)
    original = llama.generation_config.eos_token_id
    try:
        llama.generation_config.eos_token_id = [VOCAB - 1, free[3]]  # a list: any id of it stops
        engine = Engine(llama, max_batch=2, block_size=4, num_blocks=64, max_model_len=64)
        stopped = _run(engine, {0: [EngineRequest("eos", prompt, SamplingParams(max_tokens=6, temperature=0))]})["eos"]
        assert [e.token_id for e in stopped] == free[: free.index(free[3]) + 1]
        assert stopped[-1].finish_reason == "stop"
        ignoring = _run(engine, {0: [EngineRequest("all", prompt, SamplingParams(max_tokens=6, temperature=0,
                                                                                  ignore_eos=True))]})["all"]
        assert [e.token_id for e in ignoring] == free and ignoring[-1].finish_reason == "length"
    finally:
        llama.generation_config.eos_token_id = original
    engine = Engine(llama, max_batch=2, block_size=4, num_blocks=64, max_model_len=64)
    by_id = _run(engine, {0: [_greedy(prompt, 6, "s", stop_token_ids=(free[1],))]})["s"]
    assert [e.token_id for e in by_id] == free[: free.index(free[1]) + 1] and by_id[-1].finish_reason == "stop"


def test_the_context_ends_a_request_with_length(llama, scheduling):
    engine = Engine(llama, max_batch=2, block_size=4, num_blocks=64, max_model_len=16)
    events = _run(engine, {0: [_greedy(_prompt(12, 1), 50, "r")]})["r"]
    assert len(events) == 4 and events[-1].finish_reason == "length"


def test_queue_full_and_bad_requests(llama):
    engine = Engine(llama, max_batch=2, block_size=4, num_blocks=64, max_model_len=32, max_waiting=2)
    engine.add_request(_greedy([1, 2], 3, "a"))
    engine.add_request(_greedy([1, 2], 3, "b"))
    with pytest.raises(QueueFull):
        engine.add_request(_greedy([1, 2], 3, "c"))
    with pytest.raises(ValueError, match="already running"):
        engine.add_request(_greedy([1, 2], 3, "a"))
    cases = [
        (_greedy(list(range(1, 33)), 3, "long"), "prompt_ids has 32 tokens; max_model_len is 32"),
        (_greedy([], 3, "empty"), "prompt_ids is empty"),
        (_greedy([VOCAB], 3, "oov"), "outside the vocabulary"),
        (_greedy([1], 0, "zero"), "sampling.max_tokens"),
        (EngineRequest("t", [1], SamplingParams(max_tokens=1, temperature=-1)), "sampling.temperature"),
        (EngineRequest("p", [1], SamplingParams(max_tokens=1, top_p=0)), "sampling.top_p"),
        (EngineRequest("i", [1], SamplingParams(max_tokens=1), model_inputs={"pixel_values": torch.zeros(1)}),
         "text-only model"),
    ]
    fresh = Engine(llama, max_batch=2, block_size=4, num_blocks=64, max_model_len=32)
    for request, message in cases:
        with pytest.raises(ValueError, match=message):
            fresh.add_request(request)
    with pytest.raises(ValueError, match="num_blocks=3 cannot hold one request"):
        Engine(llama, block_size=4, num_blocks=3, max_model_len=32)


def test_async_engine_streams_and_cancellation_frees_blocks(llama, scheduling):
    prompts = {f"r{i}": _prompt(5 + 4 * i, 30 + i) for i in range(3)}

    async def main():
        engine = AsyncEngine(Engine(llama, max_batch=4, block_size=4, num_blocks=64, max_model_len=64))
        await engine.start()

        async def collect(request_id):
            return [event async for event in engine.generate(_greedy(prompts[request_id], 5, request_id))]

        results = await asyncio.gather(*(collect(request_id) for request_id in prompts))
        stream = engine.generate(_greedy(_prompt(9, 2), 40, "cancelled"))
        first = await stream.__anext__()
        assert first.finish_reason is None
        await stream.aclose()
        started, received = asyncio.Event(), []

        async def consume():
            async for event in engine.generate(_greedy(_prompt(9, 3), 50, "task")):
                received.append(event)
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()  # the client went away: the request is aborted
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(received) < 50
        for _ in range(100):
            if engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats()
        with pytest.raises(ValueError, match="prompt_ids is empty"):
            engine.generate(_greedy([], 3, "bad"))
        await engine.stop()
        return results, stats

    results, stats = asyncio.run(main())
    for request_id, events in zip(prompts, results):
        assert [e.token_id for e in events] == _expected(llama, prompts[request_id], 5)
        assert events[-1].finish_reason == "length"
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0


def test_llama4_requests_with_images_among_text_requests(llama4_vision, scheduling):
    """Llama 4 with images: each image request's features go in with its whole prompt; the
    tokens equal generate()'s with the same image, text requests batched alongside."""
    from tests.models.llama4.test_modeling_llama4_multimodal import (
        _prompt as image_prompt,
    )

    _, model, _ = llama4_vision
    requests, expected, arrivals = {}, {}, {}
    for index, tiles in enumerate([[1], [], [2, 1], [3], []]):
        ids, pixels = image_prompt(tiles, length=30, seed=index)
        inputs = {"pixel_values": pixels} if pixels is not None else None
        request = EngineRequest(f"r{index}", ids[0].tolist(), SamplingParams(max_tokens=6, temperature=0,
                                                                             ignore_eos=True), model_inputs=inputs)
        requests[request.request_id] = request
        arrivals.setdefault(index % 2, []).append(request)
        out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        expected[request.request_id] = out[0, ids.shape[1] :].tolist()
    engine = Engine(model, max_batch=4, block_size=4, num_blocks=64, prefill_chunk=8, max_model_len=64)
    assert _tokens(_run(engine, arrivals)) == expected
    assert engine.stats()["kv_blocks_used"] == 0


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    from tests.models.mllama.test_modeling_mllama import pair

    return pair.__wrapped__(tmp_path_factory)[1]


@pytest.mark.parametrize("image_rows", [8, 1])
def test_mllama_requests_with_images_among_text_requests(mllama, image_rows, monkeypatch, scheduling):
    """Llama 3.2 Vision: each request's image keys/values kept in its own slot outside the pages;
    text before the first image sees nothing; rows with and without images in one decode batch.
    With one image slot, image requests wait for it. Each request gets generate()'s tokens."""
    from herd.serving import engine as engine_module
    from tests.models.mllama.test_modeling_mllama import _inputs

    monkeypatch.setattr(engine_module, "MLLAMA_IMAGE_ROWS", image_rows)
    cases = [([[4]], (0, 5)), ([[4, 1]], (0, 5)), ([[3]], (6,)), (None, None), ([[2]], (11,))]
    requests, expected, arrivals = {}, {}, {}
    for index, (images, image_at) in enumerate(cases):
        if images is None:
            inputs = {"input_ids": torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(index))}
        else:
            inputs = _inputs(images, image_at=image_at)
        model_inputs = {name: value for name, value in inputs.items() if name != "input_ids"} or None
        request = EngineRequest(f"r{index}", inputs["input_ids"][0].tolist(),
                                SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), model_inputs=model_inputs)
        requests[request.request_id] = request
        arrivals.setdefault(index % 2, []).append(request)
        out = mllama.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected[request.request_id] = out[0, inputs["input_ids"].shape[1] :].tolist()
    engine = Engine(mllama, max_batch=4, block_size=4, num_blocks=64, prefill_chunk=8, max_model_len=64)
    assert _tokens(_run(engine, arrivals)) == expected
    assert engine.stats()["kv_blocks_used"] == 0 and len(engine.scheduler.free_image_slots) == min(4, image_rows)


@needs_cuda
@pytest.mark.parametrize("kv_cache_dtype", [None, "fp8"])
@pytest.mark.parametrize("family", ["llama", "llama4"])
def test_on_cuda_compiled_and_captured_steps_give_generates_tokens(family, kv_cache_dtype, request):
    """On a GPU the decode step is compiled and captured per batch bucket (1..8 rows here: the
    few-row Triton kernels up to 4, the library matmuls above; the paged attention kernel):
    float32 greedy tokens equal the reference forward's. With the FP8 KV cache (the staged
    q/k/v write, the paged kernel's FP8 loads): the plain FP8 cache's."""
    model = copy.deepcopy(request.getfixturevalue(family)).to("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    engine = Engine(model, max_batch=8, block_size=4, num_blocks=200, prefill_chunk=16, max_model_len=128,
                    kv_cache_dtype=kv_cache_dtype)
    assert engine.runner.capture and engine.runner.use_compile
    requests, arrivals = _concurrent_requests(14, seed=1, longest=40, most_new=12)
    events = _run(engine, arrivals)
    options = {"cache_config": {"dtype": kv_cache_dtype}} if kv_cache_dtype else {}
    for request_id, queued in requests.items():
        expected = _expected(model, queued.prompt_ids, queued.sampling.max_tokens, **options)
        assert _tokens(events)[request_id] == expected, request_id
    assert {rows for rows, _ in engine.runner.graphs} >= {1, 8}
    assert engine.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("family, kv_cache_dtype", [("llama", None), ("llama4", None), ("mllama", None),
                                                    ("llama", "fp8"), ("mllama", "fp8")])
def test_the_decode_step_over_the_paged_store_traces_whole(family, kv_cache_dtype, request):
    """What the GPU compiles: each unit of the plan over a PagedKV traced as one graph (fullgraph;
    Dynamo's tracing alone runs here, with the eager backend), giving the same tokens. With the
    FP8 KV cache too (Mllama's image keys/values beside it in the model's dtype)."""
    import torch._dynamo

    model = request.getfixturevalue(family)
    engine = Engine(model, max_batch=4, block_size=4, num_blocks=64, prefill_chunk=16, max_model_len=64,
                    kv_cache_dtype=kv_cache_dtype)
    torch._dynamo.reset()
    engine.runner.run = {name: torch.compile(fn, fullgraph=True, dynamic=False, backend="eager")
                         for name, fn in engine.runner.plan.units().items()}
    requests = [_greedy(_prompt(length, length), 4, f"r{length}") for length in (3, 11)]
    if family == "mllama":
        from tests.models.mllama.test_modeling_mllama import _inputs

        inputs = _inputs([[2]], image_at=(0, 5))
        requests.append(EngineRequest("image", inputs.pop("input_ids")[0].tolist(),
                                      SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), model_inputs=inputs))
    events = _tokens(_run(engine, {0: requests}))
    options = {"cache_config": {"dtype": kv_cache_dtype}} if kv_cache_dtype else {}
    for request_ in requests[:2]:
        assert events[request_.request_id] == _expected(model, request_.prompt_ids, 4, **options)
    assert len(events) == len(requests)


def test_async_engine_stop_aborts_what_is_in_flight(llama):
    async def main():
        engine = AsyncEngine(Engine(llama, max_batch=2, block_size=4, num_blocks=64, max_model_len=64))
        await engine.start()
        stream = engine.generate(_greedy(_prompt(5, 1), 50, "long"))
        first = await stream.__anext__()
        await engine.stop()
        rest = [event async for event in stream]
        return first, rest, engine.stats()

    first, rest, stats = asyncio.run(main())
    assert first.finish_reason is None
    assert rest[-1].finish_reason == "abort" and rest[-1].token_id is None
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
