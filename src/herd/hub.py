"""Resolving a local folder or a Hugging Face Hub id to files on disk, and pushing to the Hub.

A local folder always works without the network. A Hub id is looked up in the local
huggingface_hub cache first, so a model downloaded once keeps working offline; only when it is
not there (and HF_HUB_OFFLINE is not set) is the Hub asked.

`push_to_hub(repo_id, ...)` (PushToHubMixin: models, configs, generation configs, tokenizers,
image processors, processors) uploads what save_pretrained writes, through huggingface_hub:
create_repo, then one upload_folder commit, with transformers' arguments and default commit
messages, a model card (README.md) kept or made, as transformers does.
`save_pretrained(folder, push_to_hub=True, repo_id=...)` saves, then uploads what it wrote.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Everything a herd model, tokenizer or processor may read from a repository.
_DEFAULT_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer.model",
]


def resolve(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    allow_patterns: list[str] | None = None,
    subfolder: str = "",
) -> Path:
    """Return a local folder holding the files of `name_or_path`.

    `name_or_path` is either an existing folder or a Hub repository id ("org/name").
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path / subfolder if subfolder else path
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"{name_or_path!s} is neither an existing folder nor a Hub repository id")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = allow_patterns or _DEFAULT_PATTERNS
    if subfolder:
        patterns = [f"{subfolder}/{p}" for p in patterns]
    kwargs = dict(repo_id=str(name_or_path), revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    try:
        folder = snapshot_download(**kwargs, local_files_only=True)
    except LocalEntryNotFoundError:
        folder = None
    if folder is None or not any(Path(folder).iterdir()):
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        if local_files_only or offline:
            raise FileNotFoundError(
                f"{name_or_path!s} is not a local folder and is not in the Hugging Face cache "
                f"(offline mode: local_files_only={local_files_only}, HF_HUB_OFFLINE={offline}). "
                "Download it once with network access, or pass a folder."
            )
        folder = snapshot_download(**kwargs, token=token)
    folder = Path(folder)
    return folder / subfolder if subfolder else folder


def save_folder(save_directory: str | os.PathLike) -> Path:
    """The folder a save_pretrained() writes into, created if needed; refuses a path that is a file."""
    folder = Path(save_directory)
    if folder.is_file():
        raise ValueError(f"{folder} is a file; save_pretrained needs a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ----------------------------------------------------------------------------------------------
# Pushing to the Hub
# ----------------------------------------------------------------------------------------------

# What a pushed model card says when the repository has none yet.
_MODEL_CARD_TEXT = ("This model card was written by herd's push_to_hub; the files load with herd and with "
                    "Hugging Face transformers.")


def _default_commit_message(obj: Any) -> str:
    """transformers' default commit message, chosen by the class's name."""
    name = type(obj).__name__
    for part, message in (("Model", "Upload model"), ("Config", "Upload config"), ("Tokenizer", "Upload tokenizer"),
                          ("FeatureExtractor", "Upload feature extractor"), ("Processor", "Upload processor")):
        if part in name:
            return message
    return f"Upload {name}"


def _model_card(api: Any, repo_id: str, tags: list[str] | None, token: str | bool | None) -> Any:
    """The repository's README.md model card (a new one if it has none), with `tags` added."""
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.errors import EntryNotFoundError

    try:
        card = ModelCard.load(api.hf_hub_download(repo_id, "README.md", token=token))
    except EntryNotFoundError:
        card = ModelCard.from_template(ModelCardData(tags=list(tags or []), library_name="transformers"),
                                       model_description=_MODEL_CARD_TEXT)
    if tags:
        card.data.tags = card.data.tags or []
        card.data.tags += [tag for tag in tags if tag not in card.data.tags]
    return card


def _upload(api: Any, obj: Any, folder: str | os.PathLike, repo_id: str, *, commit_message: str | None,
            commit_description: str | None = None, token: str | bool | None = None, revision: str | None = None,
            create_pr: bool = False, allow_patterns: list[str] | None = None) -> Any:
    """One commit of the folder's files (those of `allow_patterns` when given); its CommitInfo."""
    from huggingface_hub.errors import HfHubHTTPError

    if revision is not None and not revision.startswith("refs/pr"):
        try:
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        except HfHubHTTPError as error:
            # Without write access a pull request may still be opened against an existing branch.
            if not (create_pr and error.response is not None and error.response.status_code == 403):
                raise
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message or _default_commit_message(obj),
        commit_description=commit_description, token=token, revision=revision, create_pr=create_pr,
        allow_patterns=allow_patterns,
    )


class PushRequest:
    """save_pretrained(..., push_to_hub=True): the repository made before saving, the folder's
    files as they were then, and after saving one commit of the files it wrote or changed."""

    def __init__(self, save_directory: str | os.PathLike, kwargs: dict):
        from huggingface_hub import HfApi

        self.api = HfApi()
        self.commit_message = kwargs.pop("commit_message", None)
        self.commit_description = kwargs.pop("commit_description", None)
        self.create_pr = kwargs.pop("create_pr", False)
        self.token = kwargs.get("token")
        repo_id = kwargs.pop("repo_id", None) or Path(save_directory).name
        repo_kwargs = {key: kwargs.pop(key) for key in ("private", "token") if key in kwargs}
        self.repo_id = self.api.create_repo(repo_id, exist_ok=True, **repo_kwargs).repo_id
        self.folder = Path(save_directory)
        self.before = _file_times(self.folder)

    def upload(self, obj: Any, model_card: bool = False) -> Any:
        if model_card:
            _model_card(self.api, self.repo_id, None, self.token).save(self.folder / "README.md")
        changed = [name for name, mtime in _file_times(self.folder).items() if self.before.get(name) != mtime]
        return _upload(self.api, obj, self.folder, self.repo_id, commit_message=self.commit_message,
                       commit_description=self.commit_description, token=self.token, create_pr=self.create_pr,
                       allow_patterns=changed)


def _file_times(folder: Path) -> dict[str, int]:
    """Every file under `folder` (as a path relative to it, with /) and its modification time."""
    if not folder.is_dir():
        return {}
    return {path.relative_to(folder).as_posix(): path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def push_request(save_directory: str | os.PathLike, kwargs: dict) -> PushRequest | None:
    """For save_pretrained: pops push_to_hub and, when it is true, the upload's arguments (repo_id,
    default the folder's name; commit_message, commit_description, create_pr, private, token),
    creating the repository; None when not pushing."""
    if not kwargs.pop("push_to_hub", False):
        return None
    return PushRequest(save_directory, kwargs)


class PushToHubMixin:
    """`push_to_hub` for everything herd saves with save_pretrained."""

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ) -> Any:
        """Upload what save_pretrained writes to the Hub repository `repo_id` (created if needed),
        as one commit; returns huggingface_hub's CommitInfo.

        As transformers: `private` applies to a new repository; `revision` is the branch to push to
        (created from main if needed); `create_pr` opens a pull request instead of committing;
        `max_shard_size` splits a model's weights; `tags` go into the README.md model card, which is
        the repository's own when it has one. The default commit message follows the class
        ("Upload model", "Upload tokenizer", ...).
        """
        from huggingface_hub import HfApi

        api = HfApi()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        card = _model_card(api, repo_id, tags, token)
        with tempfile.TemporaryDirectory() as folder:
            saves_shards = "max_shard_size" in inspect.signature(self.save_pretrained).parameters
            self.save_pretrained(folder, **({"max_shard_size": max_shard_size} if saves_shards else {}))
            card.save(os.path.join(folder, "README.md"))
            return _upload(api, self, folder, repo_id, commit_message=commit_message,
                           commit_description=commit_description, token=token, revision=revision, create_pr=create_pr)
