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


# --- one-line errors that name the fix ------------------------------------------------------------

import re  # noqa: E402

import pytest  # noqa: E402

from herd import cli  # noqa: E402


def _error_of(capsys, *argv):
    """(exit code, stderr) of cli.main, asserting the error is exactly one line."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.split("\r")[-1]  # what stays on the terminal after a progress bar clears itself
    assert err.count("\n") == 1 and err.startswith("herd: error: "), err
    return code, err.rstrip("\n")


def test_cuda_without_a_gpu(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _error_of(capsys, "generate", tmp_path, "hi", "--device", "cuda") == (
        2, "herd: error: CUDA is not available on this machine; use --device cpu")
    assert _error_of(capsys, "chat", tmp_path, "--device", "cuda:1")[0] == 2


def _hub_raises(monkeypatch, remote_error):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def snapshot_download(*args, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        raise remote_error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


@pytest.mark.parametrize("remote_error", ["local", "offline", "connect"])
def test_hub_id_without_network_and_not_cached(capsys, monkeypatch, remote_error):
    import httpx
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    error = {"local": LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known"),
             "offline": OfflineModeIsEnabled("offline"), "connect": httpx.ConnectError("no route")}[remote_error]
    _hub_raises(monkeypatch, error)
    assert _error_of(capsys, "generate", "meta-llama/Llama-3.2-1B", "hi") == (
        2, "herd: error: cannot download meta-llama/Llama-3.2-1B: no network and it is not in the local Hugging Face "
           "cache; pass a model folder or a .gguf file, or set HF_HUB_OFFLINE=1 to use only the cache")


def test_hub_id_offline_and_not_cached(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    _hub_raises(monkeypatch, AssertionError("the network must not be asked"))
    assert _error_of(capsys, "chat", "meta-llama/Llama-3.2-1B") == (
        2, "herd: error: meta-llama/Llama-3.2-1B is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
           "downloading it; pass a model folder or a .gguf file, or unset HF_HUB_OFFLINE to download it")


def test_folder_without_config_json_is_reported_as_such(capsys, chat_model_folder, tmp_path):  # noqa: F811
    folder = tmp_path / "tokenizer-only"
    herd.AutoTokenizer.from_pretrained(chat_model_folder).save_pretrained(folder)  # a tokenizer.json, no config.json
    for command in (["generate", folder, "hi"], ["chat", folder], ["info", folder]):
        assert _error_of(capsys, *command) == (
            2, f"herd: error: {folder} has no config.json, so it is not a model folder; pass a folder holding "
               "config.json, *.safetensors and tokenizer.json, a .gguf file or a Hub id")
    assert _error_of(capsys, "generate", tmp_path / "missing.gguf", "hi") == (
        2, f"herd: error: {tmp_path / 'missing.gguf'}: no such file; check the path")


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "-1", "--temperature must be >= 0; use --temperature 0 for greedy decoding"),
    ("--top-p", "0", "--top-p must be in (0, 1]; use --top-p 1 to turn it off"),
    ("--top-k", "-3", "--top-k must be >= 0; use --top-k 0 to turn it off"),
    ("--min-p", "1.5", "--min-p must be in [0, 1]; use --min-p 0 to turn it off"),
    ("--max-new-tokens", "0", "--max-new-tokens must be >= 1"),
])
def test_bad_generation_options_fail_before_loading(capsys, tmp_path, flag, value, message):
    for command in (["generate", tmp_path / "nothing-here", "hi"], ["chat", tmp_path / "nothing-here"]):
        assert _error_of(capsys, *command, flag, value) == (2, f"herd: error: {message}")


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "x", "hi", "--dtype", "fp8"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("herd: error: argument --dtype: unknown dtype 'fp8'; use auto, float32 (fp32), "
                                       "bfloat16 (bf16) or float16 (fp16); see `herd generate --help`\n")


def test_prompt_beyond_the_context_is_not_echoed(capsys, chat_model_folder):  # noqa: F811
    tokenizer = herd.AutoTokenizer.from_pretrained(chat_model_folder)
    long_prompt = "the sea " * 400
    length = tokenizer(long_prompt, return_tensors="pt").input_ids.shape[1]
    assert length > 512
    code, err = _error_of(capsys, "generate", chat_model_folder, long_prompt)
    assert (code, err) == (2, f"herd: error: the prompt is {length} tokens, {length - 511} more than the model's context "
                              "of 512 tokens leaves room for (one new token at least); shorten the prompt")
    assert capsys.readouterr().out == ""


def test_prompt_plus_max_new_tokens_beyond_the_context_generates_up_to_it(capsys, chat_model_folder):  # noqa: F811
    tokenizer = herd.AutoTokenizer.from_pretrained(chat_model_folder)
    length = tokenizer("The sea is", return_tensors="pt").input_ids.shape[1]
    assert cli.main(["generate", str(chat_model_folder), "The sea is", "--max-new-tokens", "600",
                          "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert (f"herd: note: the prompt ({length} tokens) + --max-new-tokens 600 exceed the model's context of 512 "
            f"tokens; generating at most {512 - length}") in captured.err
    assert captured.out.startswith("The sea is")


def test_errors_have_no_traceback_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "herd", "generate", str(tmp_path), "hi", "--temperature", "-1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "herd: error: --temperature must be >= 0; use --temperature 0 for greedy decoding\n"


# --- sampling flags, --version, python -m herd, dtypes, info, --verbose ---------------------------


def _options(*argv):
    return cli.build_parser().parse_args(["generate", "m", "p", *argv])


def test_sampling_flags_imply_sampling_and_temperature_zero_is_greedy(capsys):
    assert cli._generate_kwargs(_options("--top-p", "0.9")) == {"max_new_tokens": 256, "do_sample": True, "top_p": 0.9}
    assert cli._generate_kwargs(_options("--top-k", "5", "--min-p", "0.1")) == {
        "max_new_tokens": 256, "do_sample": True, "top_k": 5, "min_p": 0.1}
    assert cli._generate_kwargs(_options("--temperature", "0.7", "--top-k", "5")) == {
        "max_new_tokens": 256, "do_sample": True, "temperature": 0.7, "top_k": 5}
    assert cli._generate_kwargs(_options()) == {"max_new_tokens": 256}  # the model's own defaults
    assert capsys.readouterr().err == ""
    assert cli._generate_kwargs(_options("--temperature", "0", "--top-p", "0.9", "--top-k", "5")) == {
        "max_new_tokens": 256, "do_sample": False}
    assert capsys.readouterr().err == "herd: note: --top-p, --top-k ignored: --temperature 0 means greedy decoding\n"


def test_version_and_python_m_herd():
    result = subprocess.run([sys.executable, "-m", "herd", "--version"], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (0, f"herd {herd.__version__}\n")
    assert herd.__version__ == "0.1.0"


def test_info_shows_the_context_decodes_ids_and_takes_short_dtypes(capsys, chat_model_folder):  # noqa: F811
    assert cli.main(["info", str(chat_model_folder), "--ids", "1,2,3", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    text = herd.AutoTokenizer.from_pretrained(chat_model_folder).decode([1, 2, 3])
    assert "context:           512 tokens (max_position_embeddings)\n" in out
    assert f"text:              {text!r}\n" in out
    assert "dtype / device:    torch.bfloat16 / cpu\n" in out
    assert "next-token top 5:" in out
    for alias, name in (("fp16", "float16"), ("FP32", "float32"), ("bfloat16", "bfloat16")):
        assert cli.build_parser().parse_args(["info", "m", "--dtype", alias]).dtype == name
    assert _error_of(capsys, "info", chat_model_folder, "--ids", "1,x") == (
        2, "herd: error: --ids takes comma-separated token ids, e.g. --ids 1,2,3 (got '1,x')")
    assert _error_of(capsys, "info", chat_model_folder, "--ids", "1,999999") == (
        2, "herd: error: --ids 999999 is outside the vocabulary; token ids go from 0 to 128255")


def test_quantization_flag_loads_quantized_and_info_says_so(capsys, chat_model_folder):  # noqa: F811
    assert cli.main(["info", str(chat_model_folder), "--quantization", "int8"]) == 0
    assert "weights:           herd quantization: 14 int8 layers; the rest float32\n" in capsys.readouterr().out
    assert cli.main(["generate", str(chat_model_folder), "The sea is", "--max-new-tokens", "4", "--temperature", "0",
                     "--quantization", "fp8"]) == 0
    assert capsys.readouterr().out.startswith("The sea is")
    assert _error_of(capsys, "info", chat_model_folder, "--quantization", "int4")[1].startswith(
        "herd: error: int4 group_size 128 does not divide the 16 input features of model.layers.0.self_attn.q_proj")


def test_generate_verbose_prints_load_time_and_speeds(capsys, chat_model_folder):  # noqa: F811
    assert cli.main(["generate", str(chat_model_folder), "The sea is", "--max-new-tokens", "5", "--temperature", "0",
                     "--verbose"]) == 0
    err = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n")]
    err = [line for line in err if line.strip()]
    assert re.fullmatch(r"herd: loaded \S+ in [\d.]+ s \(torch.float32, cpu\)", err[0]), err
    assert re.fullmatch(r"herd: prompt \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\); "
                        r"decode 4 tokens in [\d.]+ s \([\d.]+ tokens/s\)", err[1]), err


# --- chat: errors, overflow and line editing ------------------------------------------------------


def test_chat_generation_error_is_one_line_and_the_session_goes_on(chat_model_folder, monkeypatch, capsys):  # noqa: F811
    import io

    model = herd.AutoModelForCausalLM.from_pretrained(chat_model_folder, progress=False)
    tokenizer = herd.AutoTokenizer.from_pretrained(chat_model_folder)
    real_generate, seen = model.generate, []

    def generate(input_ids, **kwargs):
        seen.append(input_ids.shape[1])
        if len(seen) == 2:
            raise RuntimeError("out of memory\nmore detail")
        return real_generate(input_ids, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setattr(cli, "_load", lambda args: (model, tokenizer))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nfails\nAnd then?\n/exit\n"))
    assert cli.main(["chat", str(chat_model_folder), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert ("(generation failed: RuntimeError: out of memory; the message was not added, the conversation is kept)\n"
            in out)
    first = _expected_reply(chat_model_folder, [{"role": "user", "content": "Hello"}], 3)
    kept = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.strip()},
            {"role": "user", "content": "And then?"}]
    ids = tokenizer.apply_chat_template(kept, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert seen[2] == ids.shape[1]  # the first turn kept, the failed message not


def test_chat_without_readline_still_works(monkeypatch):
    monkeypatch.setitem(sys.modules, "readline", None)  # `import readline` raises ImportError
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)
    cli._line_editing()


def test_commands_take_the_gpu_by_default_where_there_is_one(monkeypatch):
    """Fast by default: without --device, a command loads on cuda where there is a GPU, else on the CPU."""
    from types import SimpleNamespace

    from herd import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli._device(SimpleNamespace(device=None)) == "cuda"
    assert cli._device(SimpleNamespace(device="cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli._device(SimpleNamespace(device=None)) is None
