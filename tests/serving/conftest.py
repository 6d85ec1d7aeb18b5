"""Servers on loopback for the API tests: uvicorn in a background thread on a free 127.0.0.1 port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import torch

from herd.serving.server import ModelInfo, Server


class LiveServer:
    """A Server's app answering on http://127.0.0.1:<port> until stop()."""

    def __init__(self, server: Server):
        import uvicorn

        self.server = server
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(server.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(10)
        self.socket.close()


@contextlib.contextmanager
def live(server: Server):
    running = LiveServer(server).start()
    try:
        yield running
    finally:
        running.stop()


def model_info(model, tokenizer, processor=None, max_model_len=None) -> ModelInfo:
    config = model.config.get_text_config()
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    return ModelInfo(tokenizer=tokenizer, processor=processor, eos_token_ids=eos_ids,
                     vocab_size=config.vocab_size,
                     max_model_len=max_model_len or getattr(config, "max_position_embeddings", None))


class Recording:
    """An AsyncEngine that notes the requests it is given (`requests_seen`), for tests of what reaches it."""

    def __init__(self, engine):
        self.inner = engine
        self.requests_seen = []

    @property
    def engine(self):
        return self.inner.engine

    async def start(self):
        await self.inner.start()

    async def stop(self):
        await self.inner.stop()

    def stats(self):
        return self.inner.stats()

    def generate(self, request):
        self.requests_seen.append(request)
        return self.inner.generate(request)


def engine_server(model, tokenizer, *, processor=None, name="test-model", engine_kwargs=None, **server_kwargs) -> Server:
    """A Server over serving/engine.py's real Engine (continuous batching over the paged KV store)."""
    from herd.serving.engine import AsyncEngine, Engine

    engine = Engine(model, **{"max_model_len": 1024, **(engine_kwargs or {})})
    return Server(model_name=name, engine=Recording(AsyncEngine(engine)),
                  model=model_info(model, tokenizer, processor, max_model_len=engine.max_model_len), **server_kwargs)


@pytest.fixture(scope="session")
def smollm2(smollm2_folder):
    """(model, tokenizer): SmolLM2-135M-Instruct in float32 on the CPU."""
    import herd

    model = herd.AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32)
    tokenizer = herd.AutoTokenizer.from_pretrained(smollm2_folder)
    return model.eval(), tokenizer


def run_with_arrivals(engine, requests: dict) -> dict[str, list[int]]:
    """Greedy requests {id: (arrival step, prompt ids, new tokens)} through `engine`, each added at
    its step; every request's tokens."""
    from herd.serving.engine import EngineRequest, SamplingParams

    arrivals: dict[int, list] = {}
    for request_id, (step, prompt, new) in requests.items():
        request = EngineRequest(request_id, prompt, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
        arrivals.setdefault(step, []).append(request)
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.has_work() or any(s >= step for s in arrivals):
        for request in arrivals.pop(step, []):
            engine.add_request(request)
        for request_id, event in engine.step():
            tokens.setdefault(request_id, []).append(event.token_id)
        step += 1
    return tokens
