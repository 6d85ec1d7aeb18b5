"""The herd command line, end to end on a tiny checkpoint folder."""

from __future__ import annotations

import subprocess
import sys

import torch

import herd
from tests.test_pipelines import chat_model_folder  # noqa: F401  (fixture)


def _herd(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "herd.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=300)


def _expected_reply(folder, messages, max_new_tokens):
    model = herd.AutoModelForCausalLM.from_pretrained(folder, progress=False)
    tokenizer = herd.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_streams_the_greedy_continuation(chat_model_folder):  # noqa: F811
    result = _herd("generate", chat_model_folder, "The sea is", "--max-new-tokens", 6, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    model = herd.AutoModelForCausalLM.from_pretrained(chat_model_folder, progress=False)
    tokenizer = herd.AutoTokenizer.from_pretrained(chat_model_folder)
    ids = tokenizer("The sea is", return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    assert result.stdout == "The sea is" + tokenizer.decode(new, skip_special_tokens=True) + "\n"


def test_generate_with_system_prompt_uses_chat_template(chat_model_folder):  # noqa: F811
    result = _herd("generate", chat_model_folder, "Hi", "--system", "Be brief.", "--max-new-tokens", 5, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    expected = _expected_reply(chat_model_folder, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], 5)
    assert result.stdout == expected + "\n"


def test_chat_keeps_history_resets_and_exits(chat_model_folder):  # noqa: F811
    stdin = "Hello\nAnd then?\n/reset\nHello\n/exit\n"
    result = _herd("chat", chat_model_folder, "--max-new-tokens", 4, "--temperature", 0, stdin=stdin)
    assert result.returncode == 0, result.stderr
    first = _expected_reply(chat_model_folder, [{"role": "user", "content": "Hello"}], 4)
    second = _expected_reply(chat_model_folder, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.strip()},
                                                  {"role": "user", "content": "And then?"}], 4)
    assert result.stdout.count(first + "\n") >= 2  # asked twice: after /reset the first answer comes again
    assert second + "\n" in result.stdout
    assert "(history cleared)" in result.stdout


def test_errors_are_reported_without_traceback(tmp_path):
    result = _herd("generate", tmp_path, "hi")
    assert result.returncode == 2 and "herd: error:" in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_stops_the_answer_not_the_chat(chat_model_folder, monkeypatch, capsys):  # noqa: F811
    import io

    from herd import cli

    model = herd.AutoModelForCausalLM.from_pretrained(chat_model_folder, progress=False)
    tokenizer = herd.AutoTokenizer.from_pretrained(chat_model_folder)
    real_generate = model.generate
    calls = []

    def generate(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            kwargs["streamer"].put(torch.tensor([[1]]))
            raise KeyboardInterrupt  # the user presses Ctrl-C during the first answer
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setattr(cli, "_load", lambda args: (model, tokenizer))
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n/exit\n"))
    assert cli.main(["chat", str(chat_model_folder), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "(stopped)" in out and len(calls) == 2
