"""One rank of the tensor-parallel serving test, started by torchrun (test_parallel.py):
`python -m torch.distributed.run --standalone --nproc-per-node 2 _tp_serve_worker.py CASE OUT`.

Every rank loads the tiny Llama with tp_plan="auto" and builds the same Engine; rank 0 leads
(serving/parallel.py) and runs the case's requests through the engine (arriving at the steps the
case gives), then one completion over HTTP from a live Server (echo + logprobs: the prompt's
logprobs too), then shuts the followers down.
Rank 1 follows until then. Each rank writes what it saw to OUT/rank{RANK}.pt.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def lead(engine, case: dict) -> dict:
    import httpx

    import herd
    from herd.serving.engine import AsyncEngine
    from herd.serving.server import ModelInfo, Server
    from tests.serving.conftest import live, run_with_arrivals

    tokens = run_with_arrivals(engine, case["requests"])
    stats = engine.stats()

    tokenizer = herd.AutoTokenizer.from_pretrained(case["tokenizer"])
    info = ModelInfo(tokenizer=tokenizer, vocab_size=engine.vocab_size, max_model_len=engine.max_model_len)
    server = Server(model_name="tiny", engine=AsyncEngine(engine), model=info)
    with live(server) as running:
        # echo + logprobs: the prompt's chunks keep every position's logits, on both ranks
        body = {"model": "tiny", "prompt": case["http_prompt"], "max_tokens": case["http_new"], "temperature": 0,
                "echo": True, "logprobs": 1}
        answer = httpx.post(f"{running.url}/v1/completions", json=body, timeout=60).json()
    engine.runner.shutdown()
    return {"tokens": tokens, "stats": stats, "http": answer, "steps": engine.runner.steps}


def main(case_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    import herd
    from herd.serving.engine import Engine
    from herd.serving.parallel import Follower, Leader, agreed_block_count

    case = torch.load(case_path, weights_only=True)
    rank = int(os.environ["RANK"])
    model = herd.AutoModelForCausalLM.from_pretrained(case["folder"], tp_plan="auto", progress=False)
    engine = Engine(model, **case["engine"])
    num_blocks = engine.scheduler.pools["full"].total
    agreed = agreed_block_count(model, 20 - 7 * rank)  # as if rank 1 had less free memory
    if rank == 0:
        engine.runner = Leader(engine.runner)
        result = lead(engine, case)
    else:
        result = {"steps": Follower(engine.runner).run()}  # returns when rank 0 shuts it down
    result.update(rank=rank, num_blocks=num_blocks, agreed=agreed)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
