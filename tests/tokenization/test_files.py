"""Reading tokenizer folders: the pipeline rebuilt for LlamaTokenizer folders, the settings of
older and transformers-written folders, and the errors of folders herd cannot load.
"""

from __future__ import annotations

import json
import shutil

import pytest

from herd.tokenization import AutoTokenizer
from tests.tokenization.common import (  # noqa: F401  (pair: fixture)
    LLAMA31_CHAT_TEMPLATE,
    SYSTEM_CHAT,
    TEST_STRINGS,
    TOKENIZERS,
    load_both,
    pair,
    transformers,
)


def test_backend_pipeline_is_the_one_transformers_builds(pair):
    # For LlamaTokenizer-class folders transformers rebuilds normalizer, pre-tokenizer and decoder.
    herd_tok, ref_tok = pair
    ours, theirs = herd_tok.backend_tokenizer, ref_tok.backend_tokenizer
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        mine, reference = getattr(ours, part), getattr(theirs, part)
        assert (mine and json.loads(mine.__getstate__())) == (reference and json.loads(reference.__getstate__())), part
    for option in ("dropout", "unk_token", "fuse_unk", "byte_fallback", "ignore_merges", "continuing_subword_prefix"):
        assert getattr(ours.model, option) == getattr(theirs.model, option), option
    assert ours.get_added_tokens_decoder() == theirs.get_added_tokens_decoder()
    if herd_tok.folder_name == "spm-llama-style":  # small enough to compare whole
        assert json.loads(ours.to_str()) == json.loads(theirs.to_str())


def test_config_add_bos_token_is_ignored_with_tokenizer_json(tmp_path):
    # 5.17 drops add_bos_token/add_eos_token from tokenizer_config.json when tokenizer.json exists.
    folder = tmp_path / "tok"
    shutil.copytree(TOKENIZERS / "spm-llama-style", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, add_eos_token=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    herd_tok = AutoTokenizer.from_pretrained(folder)
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert herd_tok("hi")["input_ids"] == ref_tok("hi")["input_ids"] == [1, 12014]


def test_transformers_saved_folders_load(tmp_path):
    # Folders written by transformers: chat_template.jinja, "backend"/"is_local" keys, and for a
    # LlamaTokenizer no "legacy" key, which changes how transformers itself reloads it.
    _, original = load_both("spm-llama-style", chat_template=LLAMA31_CHAT_TEMPLATE)
    original.save_pretrained(tmp_path / "ref")
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ref")
    herd_tok = AutoTokenizer.from_pretrained(tmp_path / "ref")
    assert herd_tok.chat_template == ref_tok.chat_template == LLAMA31_CHAT_TEMPLATE
    assert herd_tok(TEST_STRINGS)["input_ids"] == ref_tok(TEST_STRINGS)["input_ids"]
    assert herd_tok("a</s>b")["input_ids"] != original("a</s>b")["input_ids"]  # transformers' round trip is lossy
    herd_tok.save_pretrained(tmp_path / "herd")
    config = json.loads((tmp_path / "herd" / "tokenizer_config.json").read_text())
    assert "is_local" not in config and "backend" not in config and "chat_template" not in config


def test_legacy_folders_with_special_tokens_map_and_json_template(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    shutil.copy(TOKENIZERS / "spm-llama-style" / "tokenizer.json", folder)
    config = {"tokenizer_class": "LlamaTokenizerFast", "legacy": True, "model_max_length": 2048}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special = {
        "bos_token": {"content": "<s>", "lstrip": False},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}"}))
    herd_tok = AutoTokenizer.from_pretrained(folder)
    assert herd_tok.special_tokens_map == ref_tok.special_tokens_map
    assert herd_tok.model_max_length == ref_tok.model_max_length == 2048
    assert herd_tok(TEST_STRINGS, padding=True)["input_ids"] == ref_tok(TEST_STRINGS, padding=True)["input_ids"]
    assert herd_tok.apply_chat_template(SYSTEM_CHAT, tokenize=False) == SYSTEM_CHAT[0]["content"]


# ----------------------------------------------------------------------------------------------
# Loading errors
# ----------------------------------------------------------------------------------------------


def test_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_lone_sentencepiece_model_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05<unk>not really a model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(
        FileNotFoundError,
        match="only supports tokenizer.json-based tokenizers.*SentencePiece|SentencePiece.*only supports tokenizer.json",
    ):
        AutoTokenizer.from_pretrained(tmp_path)


def test_malformed_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(ValueError, match="not a valid tokenizers file"):
        AutoTokenizer.from_pretrained(tmp_path)
    shutil.copy(TOKENIZERS / "spm-llama-style" / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>",')
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(ValueError, match="chat_template must be"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_missing_folder_and_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        AutoTokenizer.from_pretrained(tmp_path / "no" / "such" / "folder")
    with pytest.raises(FileNotFoundError, match="model.gguf is not in"):  # GGUF reading: tests/test_gguf.py
        AutoTokenizer.from_pretrained(TOKENIZERS / "llama3.1", gguf_file="model.gguf")


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--meta-llama--Tiny-Tokenizer"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(TOKENIZERS / "spm-llama-style", repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    herd_tok = AutoTokenizer.from_pretrained("meta-llama/Tiny-Tokenizer", cache_dir=tmp_path / "hub")
    assert herd_tok("Hello this is a test")["input_ids"] == [1, 22557, 456, 349, 264, 1369]
    assert herd_tok.name_or_path == "meta-llama/Tiny-Tokenizer"
