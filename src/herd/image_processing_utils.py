"""The image processor base: settings, and reading and writing them in a folder as transformers does.

A family's image processor subclasses `BaseImageProcessor`, declares its settings in `defaults`
(name -> default) and implements `preprocess`. The base owns everything about files:
`from_pretrained` (a folder, a Hub id or a JSON file), `from_dict`, `to_dict`, `to_json_string`
and `save_pretrained`, which writes preprocessor_config.json the way transformers 5.17 does
(sorted keys, two-space indent, `image_processor_type` = the class name).
"""

from __future__ import annotations

import copy
import enum
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from . import hub
from .configuration import pop_hub_kwargs


IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"

# Keys of a saved config that describe the file rather than a setting.
CONFIG_KEYS_NOT_SETTINGS = ("image_processor_type", "processor_class", "auto_map", "_processor_class")


# ----------------------------------------------------------------------------------------------
# Reading config files
# ----------------------------------------------------------------------------------------------


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise OSError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise OSError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def read_image_processor_config_file(path: Path) -> dict:
    config = _read_json_object(path)
    # A processor_config.json nests the image processor's settings.
    return dict(config["image_processor"]) if isinstance(config.get("image_processor"), dict) else config


def read_image_processor_config(folder: Path) -> dict:
    """The image processor settings of a folder, found where transformers 5.17 looks first."""
    processor_file = folder / PROCESSOR_FILE
    if processor_file.is_file():
        nested = _read_json_object(processor_file).get("image_processor")
        if isinstance(nested, dict):
            return dict(nested)
    image_processor_file = folder / IMAGE_PROCESSOR_FILE
    if image_processor_file.is_file():
        return _read_json_object(image_processor_file)
    raise OSError(
        f"{folder} has no image processor config: expected {IMAGE_PROCESSOR_FILE}, or {PROCESSOR_FILE} with an "
        "'image_processor' entry"
    )


def _json_ready(value: Any) -> Any:
    """Plain JSON values: tuples become lists, numpy scalars and arrays Python ones, enums their value."""
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, enum.Enum):  # PIL's Resampling filters are saved as their number
        return value.value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# ----------------------------------------------------------------------------------------------
# The base class
# ----------------------------------------------------------------------------------------------


class BaseImageProcessor(hub.PushToHubMixin):
    """Settings from `defaults`, folder I/O, and `__call__` = `preprocess`."""

    # Setting name -> default; a subclass lists every setting it saves.
    defaults: ClassVar[dict[str, Any]] = {}
    # Keys transformers accepts for every image processor but this one does not use: dropped, not saved.
    ignored_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs: Any):
        # None means "the default", as in transformers (a processor's call arguments work the same way).
        for name, default in self.defaults.items():
            value = kwargs.pop(name, None)
            setattr(self, name, copy.deepcopy(default) if value is None else value)
        for key in CONFIG_KEYS_NOT_SETTINGS + self.ignored_settings:
            kwargs.pop(key, None)
        # Unknown settings of a saved config are kept (and saved back), as transformers does.
        self._extra_settings = kwargs

    def __getattr__(self, name: str) -> Any:
        """A saved config's unknown setting reads as an attribute, as in transformers."""
        extra = self.__dict__.get("_extra_settings", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __call__(self, images: Any, **kwargs: Any) -> Any:
        return self.preprocess(images, **kwargs)

    def preprocess(self, images: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement preprocess()")

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # -- saving --

    def to_dict(self) -> dict[str, Any]:
        """The settings, as saved in preprocessor_config.json."""
        config = {name: getattr(self, name) for name in self.defaults}
        config["image_processor_type"] = type(self).__name__
        config.update(copy.deepcopy(self._extra_settings))
        return _json_ready(config)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Write preprocessor_config.json into `save_directory` (created if needed)."""
        folder = hub.save_folder(save_directory)
        push = hub.push_request(folder, kwargs)
        path = folder / IMAGE_PROCESSOR_FILE
        path.write_text(self.to_json_string(), encoding="utf-8")
        if push is not None:
            push.upload(self)
        return [str(path)]

    # -- loading --

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs: Any) -> BaseImageProcessor:
        """An image processor from a config dict, with keyword arguments overriding it (transformers' names)."""
        return cls(**{**image_processor_dict, **kwargs})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> BaseImageProcessor:
        """Load from a JSON file, or a folder or Hub id: processor_config.json's "image_processor" entry, else
        preprocessor_config.json.

        Keyword arguments: revision, cache_dir, token, local_files_only, subfolder, and any setting
        (max_image_tiles=..., size=...) to override the saved one.
        """
        kwargs = dict(kwargs)
        hub_kwargs = pop_hub_kwargs(kwargs)
        if hub_kwargs.get("subfolder") is None:
            hub_kwargs.pop("subfolder", None)
        for ignored in ("trust_remote_code", "use_fast", "_from_auto", "return_unused_kwargs"):
            kwargs.pop(ignored, None)
        path = Path(pretrained_model_name_or_path)
        if path.is_file():
            config = read_image_processor_config_file(path)
        else:
            config = read_image_processor_config(hub.resolve(pretrained_model_name_or_path, **hub_kwargs))
        return cls.from_dict(config, **kwargs)
