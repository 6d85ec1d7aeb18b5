"""Resolving a local folder or a Hugging Face Hub id to files on disk.

A local folder always works without the network. A Hub id is looked up in the local
huggingface_hub cache first, so a model downloaded once keeps working offline; only when it is
not there (and HF_HUB_OFFLINE is not set) is the Hub asked.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def save_folder(save_directory: str | os.PathLike, kwargs: dict) -> Path:
    """The folder a save_pretrained() writes into, created if needed; refuses push_to_hub
    (popped from kwargs) and a path that is a file."""
    if kwargs.pop("push_to_hub", False):
        raise NotImplementedError("herd does not push to the Hub; upload the saved folder with huggingface_hub")
    folder = Path(save_directory)
    if folder.is_file():
        raise ValueError(f"{folder} is a file; save_pretrained needs a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
