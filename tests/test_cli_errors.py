"""herd's command line used as a user would: paths that are not models, bad numbers,
contradictory flags, prompts from stdin, info on a quantized checkpoint, plan's checks, greedy output
against the library's generate(). In process (cli.main), on a tiny checkpoint."""

from __future__ import annotations

import io

import pytest

import herd
from herd import cli
from tests.conftest import SHARED_DATA, reference_llama, save_reference

LLAMA31 = SHARED_DATA / "tokenizers" / "llama3.1"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama (hidden 64: int4 needs group 64 or 32) over the Llama 3.1 vocabulary and chat template."""
    import transformers

    reference = reference_llama(vocab_size=128256, hidden_size=64, intermediate_size=96, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=64, seed=3, bos_token_id=128000,
                                eos_token_id=[128001, 128009], pad_token_id=None)
    path = save_reference(reference, tmp_path_factory.mktemp("audit9") / "ckpt")
    transformers.AutoTokenizer.from_pretrained(LLAMA31).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def library(folder):
    return (herd.AutoModelForCausalLM.from_pretrained(folder, progress=False),
            herd.AutoTokenizer.from_pretrained(folder))


def _run(capsys, *argv):
    """(exit code, stdout, the last line stderr leaves on a terminal)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.split("\r")[-1]


def _error(capsys, *argv):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("herd: error: "), (code, out, err)
    return err.removeprefix("herd: error: ").rstrip("\n")


# --- model arguments that are not models --------------------------------------------------------


def test_a_missing_path_is_no_such_folder_even_offline(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # it used to say "not in the local Hugging Face cache"
    missing = tmp_path / "no" / "model"
    for argv in (["generate", missing, "hi"], ["chat", missing], ["info", missing], ["plan", missing],
                 ["bench", missing], ["serve", missing]):
        assert _error(capsys, *argv) == (f"{missing}: no such folder; check the path (a model folder, a .gguf file "
                                         "or a Hub id org/name)")
    assert _error(capsys, "info", "./relative-missing").startswith("./relative-missing: no such folder")


def test_plan_and_bench_name_the_architectures_for_an_unknown_name(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for command in ("plan", "bench"):
        message = _error(capsys, command, "llama3.1-7b")
        assert message.startswith("llama3.1-7b is not a named architecture (llama3.2-1b, llama3.2-3b, llama3.1-8b,")
        assert message.endswith("; check the name")


# --- generate -----------------------------------------------------------------------------------


def _greedy(library, ids, max_new_tokens):
    model, tokenizer = library
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_plain_and_chat_equal_the_library(capsys, folder, library):
    _, tokenizer = library
    code, out, _ = _run(capsys, "generate", folder, "The sea is", "--max-new-tokens", 7, "--temperature", 0)
    ids = tokenizer("The sea is", return_tensors="pt").input_ids
    assert code == 0 and out == "The sea is" + _greedy(library, ids, 7) + "\n"  # the prompt, then its continuation

    code, out, _ = _run(capsys, "generate", folder, "Name a planet.", "--chat", "--max-new-tokens", 6, "--temperature", 0)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name a planet."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert code == 0 and out == _greedy(library, ids, 6) + "\n"  # only the answer: > out.txt holds the answer


def test_generate_reads_the_prompt_from_stdin_with_a_dash(capsys, monkeypatch, folder, library):
    _, tokenizer = library
    monkeypatch.setattr("sys.stdin", io.StringIO("The sea is\n"))  # as `herd generate MODEL - < prompt.txt`
    code, out, _ = _run(capsys, "generate", folder, "-", "--max-new-tokens", 5, "--temperature", 0)
    ids = tokenizer("The sea is", return_tensors="pt").input_ids  # the file's trailing newline dropped
    assert code == 0 and out == "The sea is" + _greedy(library, ids, 5) + "\n"


def test_an_empty_prompt_without_bos_is_a_clear_error(capsys, monkeypatch, folder, library):
    model, tokenizer = library
    real_call = type(tokenizer).__call__

    def no_bos(self, text, **kwargs):  # a tokenizer that adds no BOS (SmolLM2's): "" has no tokens
        encoded = real_call(self, text, **kwargs)
        encoded["input_ids"] = encoded["input_ids"][:, 1:]
        return encoded

    monkeypatch.setattr(type(tokenizer), "__call__", no_bos)
    monkeypatch.setattr(cli, "_load", lambda args: (model, tokenizer))
    assert _error(capsys, "generate", folder, "") == (
        "the prompt is empty (no tokens, and this tokenizer adds no BOS token); give some text, or use --chat "
        "to send it through the chat template")


def test_chat_flags_without_a_chat_template_fail_before_the_weights(capsys, monkeypatch, folder, tmp_path):
    import shutil
    import json

    plain = tmp_path / "no-template"
    shutil.copytree(folder, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights must not be loaded")

    monkeypatch.setattr(herd.AutoModelForCausalLM, "from_pretrained", no_weights)
    assert _error(capsys, "generate", plain, "hi", "--chat") == (
        f"{plain} has no chat template, which --chat needs; leave out --chat and --system to continue plain text")
    assert _error(capsys, "generate", plain, "hi", "--system", "Be brief.").startswith(
        f"{plain} has no chat template, which --system needs")
    assert _error(capsys, "chat", plain) == (
        f"{plain} has no chat template, which herd chat needs; use `herd generate` for plain text")


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1"),
    (["--max-new-tokens", "abc"], "argument --max-new-tokens: invalid int value: 'abc'; see `herd generate --help`"),
    (["--dtype", "bfloat"], "argument --dtype: unknown dtype 'bfloat'; use auto, float32 (fp32), bfloat16 (bf16) or "
                            "float16 (fp16); see `herd generate --help`"),
    (["--quantization", "int3"], "argument --quantization: invalid choice: 'int3' (choose from 'fp8', 'int8', "
                                 "'int4'); see `herd generate --help`"),
])
def test_bad_numbers_and_names_are_one_line(capsys, tmp_path, argv, message):
    assert _error(capsys, "generate", tmp_path, "hi", *argv) == message


# --- info ---------------------------------------------------------------------------------------


def test_info_counts_a_quantized_checkpoints_parameters_as_published(capsys, folder, library, tmp_path):
    model, tokenizer = library
    expected = model.num_parameters()
    quantized = herd.AutoModelForCausalLM.from_pretrained(folder, quantization_config=herd.TorchAoConfig(
        "int8_weight_only"), progress=False)
    quantized.save_pretrained(tmp_path / "int8")
    tokenizer.save_pretrained(tmp_path / "int8")
    for path in (folder, tmp_path / "int8"):
        code, out, _ = _run(capsys, "info", path)
        assert code == 0 and f"parameters:        {expected:,}\n" in out
    assert "weights:           herd quantization: 14 int8 layers; the rest float32\n" in out


def test_info_checks_ids_before_loading(capsys, monkeypatch, folder):
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights must not be loaded")

    monkeypatch.setattr(herd.AutoModelForCausalLM, "from_pretrained", no_weights)
    assert _error(capsys, "info", folder, "--ids", "-1") == "--ids -1 is outside the vocabulary; token ids go from 0 to 128255"
    for empty in ("", " , "):
        assert _error(capsys, "info", folder, "--ids", empty) == (
            f"--ids takes comma-separated token ids, e.g. --ids 1,2,3 (got {empty!r})")


def test_int4_takes_the_group_size_the_layers_allow(capsys, folder, library):
    model, tokenizer = library
    code, out, err = _run(capsys, "info", folder, "--quantization", "int4")
    assert code == 0 and "weights:           herd quantization: 14 int4 g32 layers; the rest float32\n" in out
    assert cli._int4_group_size(str(folder)) == 32  # hidden 64, 2 heads of 32, intermediate 96: 32 divides them all


# --- plan and bench -----------------------------------------------------------------------------


def test_plan_numbers_by_hand(capsys, folder):
    # weights: 16,490,816 float32 parameters x 4 bytes; KV cache: 2 layers x 1 kv head x 32 x (k, v) x 4 bytes
    # x (10 + 6) tokens x batch 2
    code, out, _ = _run(capsys, "plan", folder, "--prompt-tokens", 10, "--max-new-tokens", 6, "--batch-size", 2)
    assert code == 0
    assert "weights                      0.066 GB\n" in out and f"{16_490_816 * 4 / 1e9:.3f}" == "0.066"
    assert "KV cache                     0.000 GB\n" in out  # 16 kB
    code, out, _ = _run(capsys, "plan", "llama3.1-8b", "--prompt-tokens", 128, "--max-new-tokens", 256)
    kv = 32 * 8 * 128 * 2 * 2 * 384  # layers x kv heads x head_dim x (k, v) x bf16 x tokens
    assert f"KV cache                     {kv / 1e9:.3f} GB\n" in out


@pytest.mark.parametrize("argv, message", [
    (["llama3.1-8b", "--tp", "3"], "--tp 3 does not divide num_attention_heads=32 of this model: each rank must hold "
                                   "whole heads and equal slices; use --tp in [1, 2, 4, 8]"),
    (["llama3.1-8b", "--prefill-chunk-size", "0"], "--prefill-chunk-size must be >= 1 (prompt tokens per prefill "
                                                   "step); leave it out for 16384"),
    (["llama3.1-8b", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_plan_refuses_what_cannot_run(capsys, argv, message):
    assert _error(capsys, "plan", *argv) == message


@pytest.mark.parametrize("argv, message", [
    (["llama3.2-1b", "--batch-sizes", "0"], "--batch-sizes must be >= 1, got 0"),
    (["llama3.2-1b", "--prompt-length", "0"], "--prompt-length must be >= 1, got 0"),
    (["llama3.2-1b", "--layers", "0"], "--layers must be >= 1, got 0"),
    (["llama3.2-1b", "--compare", "nope"], "--compare nope: no reference is registered and herd never imports other "
                                           "libraries; run `python bench/compare.py llama3.2-1b --compare nope ...` "
                                           "from the repository"),
])
def test_bench_refuses_bad_numbers_on_stderr(capsys, argv, message):
    assert _error(capsys, "bench", *argv) == message


def test_bench_layers_with_a_checkpoint(capsys, folder):
    assert _error(capsys, "bench", folder, "--layers", "1") == (
        "--layers applies to a named architecture only; a checkpoint's config gives its layers")


# --- chat ---------------------------------------------------------------------------------------


def test_chat_url_checks(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert _error(capsys, "chat", "--url", "localhost8000") == (
        "--url localhost8000 is not an http(s) URL; pass the server's address, e.g. --url http://127.0.0.1:8000")
    assert _error(capsys, "chat", "--url", "http://127.0.0.1:9", "--quantization", "int8") == (
        "--quantization loads a local model and does not go with --url (the server has loaded its model); leave it "
        "out, or leave out --url to chat with a local model")
    assert _error(capsys, "chat", "--url", "http://127.0.0.1:9", "--dtype", "bf16", "--device", "cpu").startswith(
        "--dtype, --device load a local model and do not go with --url")


def test_chat_ends_at_end_of_input(capsys, monkeypatch, folder, library):
    model, tokenizer = library
    monkeypatch.setattr(cli, "_load", lambda args: (model, tokenizer))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello"))  # no newline, then Ctrl-D
    code, out, _ = _run(capsys, "chat", folder, "--max-new-tokens", 3, "--temperature", 0)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert code == 0 and _greedy(library, ids, 3) + "\n" in out


def test_help_describes_every_generation_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens MAX_NEW_TOKENS new tokens per answer at most (default 256" in text
    assert "- reads it from stdin" in text and "--seed SEED seed the sampling" in text


def test_seed_out_of_torchs_range_is_refused_before_loading(capsys, tmp_path):
    assert _error(capsys, "generate", tmp_path / "nothing", "hi", "--seed", str(2**64)) == (
        f"--seed {2**64} is out of range; use a number from 0 to 2**64 - 1")


def test_a_closed_pipe_ends_quietly(capsys, monkeypatch, folder, library):
    """`herd generate ... | head -c 5`: the reader left; no error line, SIGPIPE's exit code."""
    model, tokenizer = library

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_load", lambda args: (model, tokenizer))
    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert cli.main(["generate", str(folder), "The sea is", "--max-new-tokens", "3", "--temperature", "0"]) == 141
    assert capsys.readouterr().err == ""
