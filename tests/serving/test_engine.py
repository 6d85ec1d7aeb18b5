"""serving/engine.py: many requests through the paged engine give each request what model.generate()
gives it alone (greedy, float32, tiny random models), whatever the batching, chunking, preemption
and prefix reuse; sampling, logprobs, constraints, stop conditions, aborts and the async front."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

import herd
from herd.serving.engine import AsyncEngine, Engine, EngineRequest, QueueFull, SamplingParams
from tests.conftest import reference_llama, save_reference
from tests.models.llama4.test_modeling_llama4 import reference_llama4

VOCAB = 128


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    reference = reference_llama(max_position_embeddings=256)
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


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _expected(model, prompt: list[int], new: int) -> list[int]:
    """model.generate()'s greedy tokens for the prompt alone (no eos: always `new` tokens)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
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


@pytest.mark.parametrize("family", ["llama", "llama4"])
def test_concurrent_greedy_requests_get_generates_tokens(family, request):
    """14 requests of random lengths arriving at different steps, prompts chunked (llama4: longer
    than its 8-position attention chunks), small blocks: each request gets generate()'s tokens."""
    model = request.getfixturevalue(family)
    engine = Engine(model, max_batch=8, block_size=4, num_blocks=200, prefill_chunk=16, max_model_len=128)
    requests, arrivals = _concurrent_requests(14, seed=1, longest=40, most_new=12)
    events = _run(engine, arrivals)
    for request_id, request in requests.items():
        expected = _expected(model, request.prompt_ids, request.sampling.max_tokens)
        assert _tokens(events)[request_id] == expected, request_id
        assert events[request_id][-1].finish_reason == "length"
        assert all(e.prompt_tokens == len(request.prompt_ids) for e in events[request_id])
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0
    assert stats["generated_tokens"] == sum(r.sampling.max_tokens for r in requests.values())
