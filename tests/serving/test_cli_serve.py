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
    (["--tp", "2"], "--tp 2: serving over several GPUs is not available yet"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-model-len", "1"], "--max-model-len must be >= 2"),
    (["--allowed-local-media-path", "/no/such/folder"], "is not a folder"),
])
def test_serve_flags_are_checked_before_loading(capsys, tmp_path, flags, message):
    assert cli.main(["serve", str(tmp_path), *flags]) == 2
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


def test_chat_url_errors(tokenizer, monkeypatch, capsys):  # noqa: F811
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
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
    import openai

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", str(chat_model_folder), "--port", str(port),
                                "--served-model-name", "tiny", "--max-model-len", "64"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
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
        messages = [{"role": "user", "content": "Hello"}]
        answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
        assert answer.choices[0].message.content == _expected_reply(chat_model_folder, messages, 6)
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
