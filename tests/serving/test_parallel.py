"""serving/parallel.py: a tensor-parallel engine (2 ranks, gloo on CPUs, one torchrun launch:
_tp_serve_worker.py) gives the one-process Engine's greedy tokens for concurrent requests of
different lengths, through chunked prefill and preemption; one HTTP completion from rank 0's
server gives the one-process answer (its prompt's logprobs too); the follower ran every call the leader announced and
returned at shutdown; the KV pools are the same size on both ranks. In one process: every kind of
call (two paged kinds, image tensors, image rows) reaches the follower's runner as the leader made
it. (`herd serve --tp` itself: test_cli_serve.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import herd
from herd.serving.engine import Engine, EngineRequest, SamplingParams
from herd.serving.paged import PrefillWork
from herd.serving.parallel import Follower, Leader, pack
from tests.conftest import SHARED_DATA, reference_llama, save_reference
from tests.serving.conftest import run_with_arrivals

WORKER = Path(__file__).with_name("_tp_serve_worker.py")
REPO = Path(__file__).resolve().parents[2]
TOKENIZER = SHARED_DATA / "tokenizers" / "llama3.1"
# blocks of 4 positions, 16 of them, prompts chunked by 8: the later requests preempt the newest
ENGINE = {"max_batch": 4, "block_size": 4, "num_blocks": 16, "prefill_chunk": 8, "max_model_len": 64}


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(1, 128, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _case(folder: Path) -> dict:
    # request id -> (arrival step, prompt, new tokens)
    lengths = {"a": (0, 3, 12), "b": (0, 21, 9), "c": (0, 30, 12), "d": (1, 9, 14), "e": (2, 17, 6), "f": (4, 1, 10)}
    requests = {rid: (step, _prompt(length, index), new) for index, (rid, (step, length, new)) in
                enumerate(lengths.items())}
    return {"folder": str(folder), "tokenizer": str(TOKENIZER), "engine": ENGINE, "requests": requests,
            "http_prompt": _prompt(11, 99), "http_new": 7}


def _one_process(model, case: dict) -> tuple[dict, dict]:
    """The one-process Engine's tokens for the case's requests (same arrivals), and its stats."""
    engine = Engine(model, **case["engine"])
    tokens = run_with_arrivals(engine, case["requests"])
    return tokens, engine.stats()


def _http_expected(model, case: dict) -> tuple[str, int, list]:
    """The completion text (after the echoed prompt), token count and prompt logprobs the one-process
    engine gives the HTTP request (greedy, stopping at the model's eos as the server does)."""
    engine = Engine(model, **case["engine"])
    engine.add_request(EngineRequest("http", case["http_prompt"],
                                     SamplingParams(max_tokens=case["http_new"], temperature=0.0, prompt_logprobs=1)))
    events = engine.run_to_completion()["http"]
    tokens = [event.token_id for event in events]
    text_tokens = tokens[:-1] if tokens[-1] in engine.eos_ids else tokens
    tokenizer = herd.AutoTokenizer.from_pretrained(TOKENIZER)
    prompt = tokenizer.decode(case["http_prompt"])
    return prompt + tokenizer.decode(text_tokens), len(tokens), events[0].prompt_logprobs


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-serve")
    folder = save_reference(reference_llama(seed=3), root / "llama")
    case = _case(folder)
    torch.save(case, root / "case.pt")
    out = root / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(WORKER), str(root / "case.pt"), str(out)], check=False, env=env, capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0:
        causes = [line for line in run.stderr.splitlines() if "rror" in line or "terminate" in line]
        pytest.fail("\n".join(causes[:40]) + "\n" + run.stderr[-6000:])
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    model = herd.AutoModelForCausalLM.from_pretrained(folder, progress=False)
    return case, ranks, _one_process(model, case), _http_expected(model, case)


def test_tensor_parallel_engine_gives_the_one_process_tokens(served):
    case, (leader, _), (expected, expected_stats), _ = served
    assert expected_stats["preemptions"] > 0  # the case goes through preemption (and chunks: prompts > 8)
    assert leader["tokens"] == expected
    assert all(len(leader["tokens"][rid]) == new for rid, (_, _, new) in case["requests"].items())
    assert leader["stats"]["preemptions"] == expected_stats["preemptions"]
    assert leader["stats"]["kv_blocks_used"] == 0


def test_http_completion_from_rank_0_gives_the_one_process_answer(served):
    """With echo + logprobs: the prompt's logprobs (every position's logits, gathered from both ranks'
    halves of the vocabulary) are the one-process engine's."""
    case, (leader, _), _, (text, count, prompt_logprobs) = served
    answer = leader["http"]
    assert answer["choices"][0]["text"] == text
    assert answer["usage"]["completion_tokens"] == count
    got = answer["choices"][0]["logprobs"]["token_logprobs"][: len(case["http_prompt"])]
    assert got[0] is None and got[1:] == pytest.approx([logprob for logprob, _ in prompt_logprobs[1:]], abs=1e-4)


def test_follower_ran_every_call_and_returned_at_shutdown(served):
    _, (leader, follower), _, _ = served
    assert follower["steps"] == leader["steps"] > 0


def test_pools_are_the_same_size_on_every_rank(served):
    _, (leader, follower), _, _ = served
    assert leader["num_blocks"] == follower["num_blocks"] == ENGINE["num_blocks"]
    assert leader["agreed"] == follower["agreed"] == 13  # the fewest (rank 0 offered 20, rank 1 13)


# --- the messages, in one process: what the follower's runner is asked equals what the leader's was ---


class _Loopback:
    """The channel without torch.distributed: messages packed as they are broadcast, kept in order."""

    rank = 1

    def __init__(self):
        self.messages = []

    def send(self, header, payload):
        self.messages.append(pack(header, payload))

    def receive(self):
        header, payload = self.messages.pop(0)
        return header.tolist(), payload.numpy()


class _Recording:
    """A PagedRunner's calls, block tables as the runner lays them out (rows padded with zeros)."""

    def __init__(self, kinds):
        self.layers_by_kind = {kind: [] for kind in kinds}
        self.calls = []

    def prefill(self, works):
        self.calls.append(("prefill", [(list(w.tokens), w.start, w.slots, w.kept_from, w.image_slot) for w in works]))

    def decode(self, tokens, positions, slots, tables, first, images=None):
        laid_out = {}
        for kind, rows in tables.items():
            width = max(len(blocks) for blocks in rows)
            laid_out[kind] = [list(blocks) + [0] * (width - len(blocks)) for blocks in rows]
        self.calls.append(("decode", list(tokens), list(positions), slots, laid_out, first,
                           images if images is not None and any(images) else None))


def test_follower_gets_each_call_as_the_leader_made_it():
    """Llama 4's two paged kinds, ragged block tables, a prefill with an image slot and a decode
    step with Mllama-style image rows go through the messages unchanged; shutdown ends the loop;
    image tensors are refused (no image model splits)."""
    kinds = ["full", "chunked"]
    channel = _Loopback()
    made, followed = _Recording(kinds), _Recording(kinds)
    leader = Leader(made, channel)
    with pytest.raises(ValueError, match="image inputs under tensor parallel"):
        leader.prefill([PrefillWork([5, 6], 0, {"full": [9, 10], "chunked": [0, 0]}, {"full": 0, "chunked": 0},
                                    {"pixel_values": torch.randn(1, 2, 1, 3, 4, 4)}, image_slot=3)])
    leader.prefill([PrefillWork([5, 6, 7, 8], 1, {"full": [9, 10, 11, 12], "chunked": [0, 0, 13, 14]},
                                {"full": 0, "chunked": 2}, image_slot=3)])
    # a batch of two chunks of different lengths from one position
    leader.prefill([PrefillWork([1, 2], 0, {"full": [4, 5], "chunked": [6, 7]}, {"full": 0, "chunked": 0}),
                    PrefillWork([3, 4, 5], 0, {"full": [20, 21, 22], "chunked": [30, 31, 32]},
                                {"full": 0, "chunked": 0})])
    leader.decode([3, 4, 5], [7, 2, 30], {"full": [40, 50, 60], "chunked": [1, 2, 3]},
                  {"full": [[4, 5], [6], [7, 8, 9]], "chunked": [[1, 2], [3], [0, 0, 8]]},
                  {"full": [0, 0, 0], "chunked": [0, 0, 16]}, images=[(2, 17), None, (1, 5)])
    leader.decode([1], [0], {"full": [4], "chunked": [4]}, {"full": [[1]], "chunked": [[1]]},
                  {"full": [0], "chunked": [0]}, images=[None])
    leader.shutdown()
    assert Follower(followed, channel).run() == leader.steps == 4
    assert followed.calls == made.calls
    with pytest.raises(RuntimeError, match="shut down"):
        leader.decode([1], [0], {"full": [4], "chunked": [4]}, {"full": [[1]], "chunked": [[1]]},
                      {"full": [0], "chunked": [0]})
