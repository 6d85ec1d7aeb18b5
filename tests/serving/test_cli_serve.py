"""`herd serve` and `herd chat --url` from the command line."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from herd import cli
from herd.serving import engine as engine_module
from tests.test_cli import _expected_reply
from tests.test_pipelines import chat_model_folder  # noqa: F401  (fixture)

from .conftest import live
from .test_server import make_server, tokenizer  # noqa: F401  (fixture)


def _herd(*args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "herd.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HERD_API_KEY": ""})


@pytest.mark.parametrize("flags, message", [
    (["--tp", "2", "--device", "cpu"], "--device does not go with --tp 2"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be >= 1"),
    (["--max-model-len", "1"], "--max-model-len must be >= 2"),
    (["--allowed-local-media-path", "/no/such/folder"], "is not a folder"),
    (["--kv-cache-dtype", "bad"], "--kv-cache-dtype: invalid choice: 'bad'"),
])
def test_serve_flags_are_checked_before_loading(capsys, tmp_path, flags, message):
    try:
        code = cli.main(["serve", str(tmp_path), *flags])
    except SystemExit as exit_:  # the parser's own checks (choices) exit from argparse
        code = exit_.code
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("herd: error:") and message in error and error.count("\n") == 1


def chat_cli(monkeypatch, capsys, *args, stdin="/exit\n"):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    monkeypatch.setenv("HERD_API_KEY", "")
    code = cli.main(["chat", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_chat_url_streams_answers_and_keeps_the_history(tokenizer, monkeypatch, capsys):  # noqa: F811
    server = make_server(tokenizer)
    with live(server) as running:
        # a real terminal session once (a subprocess), the rest in this process
        result = _herd("chat", "--url", running.url, stdin="SAY:Hello there!\nSAY:Again.\n/reset\n/exit\n")
        seen = server.engine.engine.requests_seen
        assert result.returncode == 0, result.stderr
        assert "Hello there!\n" in result.stdout and "Again.\n" in result.stdout
        assert "(history cleared)" in result.stdout and "Chatting with llama at" in result.stdout
        second_prompt = tokenizer.decode(seen[-1].prompt_ids)
        assert "SAY:Hello there!" in second_prompt and "Hello there!" in second_prompt.split("SAY:Hello there!")[1]
        # a refused request keeps the session going
        code, out, _ = chat_cli(monkeypatch, capsys, "--url", running.url, "--max-new-tokens", "100000",
                                stdin="SAY:x\nSAY:fine\n/exit\n")
        assert code == 0 and "(the server refused: max_tokens:" in out and "fine\n" not in out
        code, out, _ = chat_cli(monkeypatch, capsys, "--url", running.url, stdin="SAY:fine\n/exit\n")
        assert code == 0 and "fine\n" in out


HELLO = [{"role": "user", "content": "Hello"}]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _hello_when_healthy(process, port: int):
    """Once the `herd serve` subprocess answers /health with 200: its greedy answer to HELLO (6 tokens)."""
    import openai

    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() \
            is not None else "timed out"
        time.sleep(0.2)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    return client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)


def test_chat_url_errors(tokenizer, monkeypatch, capsys):  # noqa: F811
    port = _free_port()
    code, _, err = chat_cli(monkeypatch, capsys, "--url", f"http://127.0.0.1:{port}")
    assert code == 2 and "cannot reach a server" in err
    with live(make_server(tokenizer, api_key="k")) as running:
        code, _, err = chat_cli(monkeypatch, capsys, "--url", running.url)
        assert code == 2 and "--api-key" in err
        assert chat_cli(monkeypatch, capsys, "--url", running.url, "--api-key", "k")[0] == 0
    code, _, err = chat_cli(monkeypatch, capsys)
    assert code == 2 and "needs a model" in err


@pytest.mark.skipif(not hasattr(engine_module, "Engine"), reason="serving/engine.py has no Engine yet (serve-engine)")
def test_serve_answers_like_generate_and_drains(chat_model_folder):  # noqa: F811
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", str(chat_model_folder), "--port", str(port),
                                "--served-model-name", "tiny", "--max-model-len", "64"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        answer = _hello_when_healthy(process, port)
        assert answer.choices[0].message.content == _expected_reply(chat_model_folder, HELLO, 6)
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr


class _Exec(BaseException):
    """os.execv replaced: what would have run."""


def test_serve_tp_outside_torchrun_starts_torchrun(tmp_path, monkeypatch):
    def execv(program, command):
        raise _Exec(command)

    (tmp_path / "config.json").write_text("{}")  # nothing loads here: torchrun's ranks will
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(os, "execv", execv)
    with pytest.raises(_Exec) as started:
        cli.main(["serve", str(tmp_path), "--tp", "2", "--port", "8123"])
    assert started.value.args[0] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node=2", "-m", "herd", "serve", str(tmp_path), "--tp", "2",
                                     "--port", "8123"]


@pytest.fixture(scope="module")
def tp_chat_model_folder(tmp_path_factory):
    """chat_model_folder's model with heads that split in 2 (4 heads, 2 key/value heads)."""
    import transformers

    from tests.conftest import reference_llama, save_reference
    from tests.test_pipelines import LLAMA31

    reference = reference_llama(vocab_size=128256, hidden_size=16, intermediate_size=32, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=512, seed=2,
                                bos_token_id=128000, eos_token_id=[128001, 128009], pad_token_id=None)
    folder = save_reference(reference, tmp_path_factory.mktemp("tp-serve") / "ckpt")
    transformers.AutoTokenizer.from_pretrained(LLAMA31).save_pretrained(folder)
    return folder


def test_serve_tp_2_answers_like_one_process_and_stops_every_rank(tp_chat_model_folder):
    """`herd serve --tp 2` on CPUs (gloo): herd starts torchrun, rank 0 answers like generate() in
    one process, and Ctrl-C stops both ranks (the follower through rank 0's shutdown message)."""
    port = _free_port()
    env = {**os.environ, "HERD_API_KEY": "", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", str(tp_chat_model_folder), "--tp", "2",
                                "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "64",
                                "--max-batch", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    try:
        answer = _hello_when_healthy(process, port)
        assert answer.choices[0].message.content == _expected_reply(tp_chat_model_folder, HELLO, 6)
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=90)
    # torchrun itself reports the Ctrl-C it got (a SignalException); the ranks stop without errors
    assert "herd: rank 1 stopped with rank 0" in stderr and "herd: error" not in stderr, stderr[-4000:]
    assert stderr.count("Traceback") == stderr.count("SignalException: Process"), stderr[-4000:]



def test_no_async_scheduling_reaches_the_engine(monkeypatch):
    """--no-async-scheduling builds the engine with async scheduling off; without it the engine
    decides (on a GPU on, except under --tp)."""
    import herd.serving.engine

    seen = []
    monkeypatch.setattr(herd.serving.engine, "Engine", lambda model, **options: seen.append(options))
    for flags in ([], ["--no-async-scheduling"]):
        cli._serving_engine(None, cli.build_parser().parse_args(["serve", "model", *flags]))
    assert [options["async_scheduling"] for options in seen] == [None, False]
