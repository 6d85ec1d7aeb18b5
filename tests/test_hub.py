"""Hub ids resolve from the local huggingface_hub cache without the network."""

from __future__ import annotations

import shutil

import pytest
import torch

import herd
from herd import hub
from tests.conftest import max_abs_diff, reference_llama, save_reference


def _fake_cache(tmp_path, repo_id="meta-llama/Tiny-Llama"):
    """A huggingface_hub cache laid out as snapshot_download leaves it."""
    reference = reference_llama()
    source = save_reference(reference, tmp_path / "src")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    return tmp_path / "hub", repo_id, reference


def test_hub_id_loads_offline_from_cache(tmp_path, monkeypatch):
    cache_dir, repo_id, reference = _fake_cache(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = herd.AutoModelForCausalLM.from_pretrained(repo_id, cache_dir=cache_dir, progress=False)
    config = herd.AutoConfig.from_pretrained(repo_id, cache_dir=cache_dir)
    assert config.num_hidden_layers == 2 and model.config.name_or_path == repo_id
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert max_abs_diff(model(ids).logits, reference(ids).logits) < 1e-4


def test_hub_cache_env_variable_is_honoured(tmp_path, monkeypatch):
    cache_dir, repo_id, _ = _fake_cache(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache_dir))
    assert hub.resolve(repo_id, local_files_only=True).name == "0123456789abcdef0123456789abcdef01234567"


def test_uncached_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        hub.resolve("someone/not-downloaded", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        hub.resolve("someone/not-downloaded", cache_dir=tmp_path, local_files_only=True)


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a Hub repository id"):
        herd.AutoModelForCausalLM.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


def test_local_folder_wins_and_subfolder(tmp_path):
    save_reference(reference_llama(), tmp_path / "repo" / "llm")
    assert hub.resolve(tmp_path / "repo", subfolder="llm") == tmp_path / "repo" / "llm"
    model = herd.AutoModelForCausalLM.from_pretrained(tmp_path / "repo", subfolder="llm", progress=False)
    assert model.config.vocab_size == 128
