"""Hub ids resolve from the local huggingface_hub cache without the network."""

from __future__ import annotations

import shutil
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------
# push_to_hub, with huggingface_hub's HfApi methods replaced (no network)
# ----------------------------------------------------------------------------------------------


class FakeHub:
    """Records the Hub calls of herd (upload_folder) and of transformers (create_commit) in one
    form: (what, {arguments}), the uploaded files as a sorted list of paths; keeps each upload's
    files under `uploads/<n>` and serves `readme` (or no README) to model-card lookups."""

    def __init__(self, tmp_path, readme: str | None = None):
        self.calls, self.readme, self.root = [], readme, tmp_path / "uploads"

    def install(self, monkeypatch):
        import huggingface_hub
        import huggingface_hub.repocard
        from huggingface_hub import HfApi
        from huggingface_hub.errors import EntryNotFoundError

        def create_repo(api, repo_id, **kwargs):
            self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/someone/{repo_id.split('/')[-1]}")

        def create_branch(api, **kwargs):
            self.calls.append(("create_branch", kwargs))

        def upload_folder(api, *, folder_path, allow_patterns=None, **kwargs):
            folder = Path(folder_path)
            names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            if allow_patterns is not None:
                names = [name for name in names if name in allow_patterns]
            self._keep(folder, names)
            self.calls.append(("commit", {"files": names, **kwargs}))
            return "commit-info"

        def create_commit(api, *, operations, **kwargs):
            self.calls.append(("commit", {"files": sorted(op.path_in_repo for op in operations), **kwargs}))
            return "commit-info"

        def download_readme(*args, **kwargs):
            if self.readme is None:
                raise EntryNotFoundError("no README.md")
            path = self.root.parent / "remote_README.md"
            path.write_text(self.readme)
            return str(path)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "hf_hub_download", lambda api, *args, **kwargs: download_readme())
        monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", download_readme)  # transformers' model card
        return self

    def _keep(self, folder, names):
        target = self.root / str(len(list(self.root.glob("*"))) if self.root.exists() else 0)
        for name in names:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / name, target / name)
        self.last_upload = target

    def take(self):
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    return FakeHub(tmp_path).install(monkeypatch)


def _objects(tmp_path):
    """(transformers' object, herd's) pairs: a model, its config and generation config, a tokenizer."""
    import transformers

    from tests.conftest import SHARED_DATA

    reference = reference_llama()
    model = herd.LlamaForCausalLM.from_pretrained(save_reference(reference, tmp_path / "ckpt"), progress=False)
    tokenizers = [cls.from_pretrained(SHARED_DATA / "tokenizers" / "llama3.1")
                  for cls in (transformers.AutoTokenizer, herd.AutoTokenizer)]
    return {"model": (reference, model), "config": (reference.config, model.config),
            "generation_config": (reference.generation_config, model.generation_config), "tokenizer": tokenizers}


PUSHES = {
    "defaults": dict(repo_id="tiny"),
    "private, tags, shards": dict(repo_id="org/tiny", private=True, tags=["llama", "herd"], max_shard_size="20KB"),
    "branch and pull request": dict(repo_id="tiny", revision="dev", create_pr=True, commit_message="Add weights",
                                    commit_description="why", token="hf_x"),
}


@pytest.mark.filterwarnings("ignore")
def test_push_to_hub_makes_the_calls_transformers_makes(tmp_path, fake_hub):
    import transformers

    transformers.logging.set_verbosity_error()
    for kind, (theirs, ours) in _objects(tmp_path).items():
        for label, arguments in PUSHES.items():
            arguments = dict(arguments)
            repo_id = arguments.pop("repo_id")
            assert theirs.push_to_hub(repo_id, **arguments) == "commit-info"
            expected = fake_hub.take()
            assert ours.push_to_hub(repo_id, **arguments) == "commit-info"
            assert fake_hub.take() == expected, (kind, label)
    # the model's upload is a folder herd (and transformers) loads back: weights sharded at 20KB
    theirs, ours = _objects(tmp_path)["model"]
    ours.push_to_hub("tiny", max_shard_size="20KB")
    files = sorted(p.name for p in fake_hub.last_upload.iterdir())
    assert "model.safetensors.index.json" in files and "README.md" in files
    loaded = herd.LlamaForCausalLM.from_pretrained(fake_hub.last_upload, progress=False)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert max_abs_diff(loaded(ids).logits, theirs(ids).logits) < 1e-4


@pytest.mark.filterwarnings("ignore")
def test_save_pretrained_push_to_hub_uploads_what_it_wrote(tmp_path, fake_hub):
    import transformers

    transformers.logging.set_verbosity_error()
    objects = _objects(tmp_path)
    for kind in ("model", "config", "tokenizer"):
        recorded = []
        for obj in objects[kind]:
            folder = tmp_path / f"{kind}-{len(recorded)}" / "saved"  # the default repository name: the folder's
            folder.mkdir(parents=True)
            (folder / "notes.txt").write_text("not part of the save")  # there before: not uploaded
            kwargs = dict(repo_id="someone/saved", commit_message="Save") if kind == "config" else dict(private=True)
            obj.save_pretrained(str(folder), push_to_hub=True, **kwargs)
            recorded.append(fake_hub.take())
        expected, got = recorded
        assert got == expected, kind


def test_push_to_hub_keeps_the_repository_model_card(tmp_path, monkeypatch):
    hub_calls = FakeHub(tmp_path, readme="---\nlicense: mit\ntags:\n- mine\n---\n\n# My model\n").install(monkeypatch)
    config = herd.LlamaConfig(vocab_size=128)
    config.push_to_hub("me/model", tags=["new"])
    readme = (hub_calls.last_upload / "README.md").read_text()
    assert "# My model" in readme and "license: mit" in readme
    assert "- mine" in readme and "- new" in readme


def test_push_to_hub_processor_and_image_processor(tmp_path, fake_hub):
    from herd.models.mllama import MllamaImageProcessor, MllamaProcessor
    from tests.conftest import SHARED_DATA

    tokenizer = herd.AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "llama3.1")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    processor = MllamaProcessor(MllamaImageProcessor(), tokenizer, chat_template="{{ messages }}")
    processor.push_to_hub("me/processor")
    (_, repo), (_, commit) = fake_hub.take()
    assert repo == {"repo_id": "me/processor", "private": None, "token": None, "exist_ok": True}
    assert commit["commit_message"] == "Upload processor" and commit["repo_id"] == "someone/processor"
    assert commit["files"] == ["README.md", "chat_template.jinja", "processor_config.json", "tokenizer.json",
                               "tokenizer_config.json"]
    loaded = MllamaProcessor.from_pretrained(fake_hub.last_upload)
    assert loaded.chat_template == "{{ messages }}"
    processor.image_processor.push_to_hub("me/images", create_pr=True)
    (_, _), (_, commit) = fake_hub.take()
    assert commit["files"] == ["README.md", "preprocessor_config.json"] and commit["create_pr"] is True
    assert commit["commit_message"] == "Upload processor"  # transformers' message for a class named *Processor
