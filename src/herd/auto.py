"""model_type -> classes. A new family plugs in with one line per table.

Classes are named as "module:Class" strings and imported on first use, so importing herd stays
cheap and a family's modules load only when asked for.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from .configuration import HUB_KWARGS, PretrainedConfig, pop_hub_kwargs

CONFIG_CLASSES = {
    "llama": "herd.models.llama:LlamaConfig",
    "llama4": "herd.models.llama4:Llama4Config",
    "llama4_text": "herd.models.llama4:Llama4TextConfig",
    "llama4_vision_model": "herd.models.llama4:Llama4VisionConfig",
    "mllama": "herd.models.mllama:MllamaConfig",
    "mllama_text_model": "herd.models.mllama:MllamaTextConfig",
    "mllama_vision_model": "herd.models.mllama:MllamaVisionConfig",
}

MODEL_CLASSES = {
    "llama": "herd.models.llama:LlamaModel",
    "llama4_text": "herd.models.llama4:Llama4TextModel",
    "llama4_vision_model": "herd.models.llama4:Llama4VisionModel",
    "mllama": "herd.models.mllama:MllamaModel",
    "mllama_text_model": "herd.models.mllama:MllamaTextModel",
    "mllama_vision_model": "herd.models.mllama:MllamaVisionModel",
}
CAUSAL_LM_CLASSES = {
    "llama": "herd.models.llama:LlamaForCausalLM",
    "llama4": "herd.models.llama4:Llama4ForCausalLM",  # the text model of a multimodal checkpoint
    "llama4_text": "herd.models.llama4:Llama4ForCausalLM",
    "mllama": "herd.models.mllama:MllamaForCausalLM",  # the text model of a vision checkpoint, as in the reference
    "mllama_text_model": "herd.models.mllama:MllamaForCausalLM",
}
PROCESSOR_CLASSES = {
    "llama4": "herd.models.llama4:Llama4Processor",
    "mllama": "herd.models.mllama:MllamaProcessor",
}
IMAGE_PROCESSOR_CLASSES = {
    "llama4": "herd.models.llama4:Llama4ImageProcessorFast",
    "mllama": "herd.models.mllama:MllamaImageProcessor",
}
# Class names written in preprocessor/processor configs -> model_type.
_PROCESSOR_NAMES = {
    "MllamaProcessor": "mllama",
    "Llama4Processor": "llama4",
    "Llama4ImageProcessor": "llama4",
    "Llama4ImageProcessorFast": "llama4",
    "MllamaImageProcessor": "mllama",
    "MllamaImageProcessorFast": "mllama",
    "MllamaImageProcessorPil": "mllama",
}
IMAGE_TEXT_TO_TEXT_CLASSES = {
    "llama4": "herd.models.llama4:Llama4ForConditionalGeneration",
    "mllama": "herd.models.mllama:MllamaForConditionalGeneration",
}
SEQUENCE_CLASSIFICATION_CLASSES = {
    "llama": "herd.models.llama:LlamaForSequenceClassification",
}
QUESTION_ANSWERING_CLASSES = {
    "llama": "herd.models.llama:LlamaForQuestionAnswering",
}
TOKEN_CLASSIFICATION_CLASSES = {
    "llama": "herd.models.llama:LlamaForTokenClassification",
}


def _import(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _lookup(table: dict[str, str], model_type: str, what: str) -> Any:
    if model_type not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ValueError(f"unsupported model_type {model_type!r} for {what}; herd supports: {known}")
    return _import(table[model_type])


class AutoConfig:
    def __init__(self) -> None:
        raise OSError("AutoConfig is not instantiated: use AutoConfig.from_pretrained(...) or AutoConfig.for_model(...)")

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> PretrainedConfig:
        return _lookup(CONFIG_CLASSES, model_type, "AutoConfig")(**kwargs)

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> PretrainedConfig:
        hub_kwargs = pop_hub_kwargs(kwargs)
        from .quantization.gguf import gguf_path, open_gguf

        gguf_file = gguf_path(pretrained_model_name_or_path, kwargs.pop("gguf_file", None))
        if gguf_file is not None:
            config_dict = open_gguf(gguf_file).config_dict()
        else:
            config_dict = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
        model_type = config_dict.get("model_type")
        if not model_type:
            raise ValueError(f"config.json of {pretrained_model_name_or_path} has no model_type")
        config_class = _lookup(CONFIG_CLASSES, model_type, "AutoConfig")
        return config_class.from_dict(config_dict, **kwargs)

    @staticmethod
    def register(model_type: str, config_class: type, exist_ok: bool = False) -> None:
        if model_type in CONFIG_CLASSES and not exist_ok:
            raise ValueError(f"model_type {model_type!r} is already registered")
        CONFIG_CLASSES[model_type] = f"{config_class.__module__}:{config_class.__qualname__}"


class _AutoModel:
    _table: dict[str, str] = {}

    def __init__(self) -> None:
        raise OSError(f"{type(self).__name__} is not instantiated: use .from_pretrained(...) or .from_config(...)")

    @classmethod
    def _class_for(cls, config: PretrainedConfig) -> Any:
        return _lookup(cls._table, config.model_type, cls.__name__)

    @classmethod
    def from_config(cls, config: PretrainedConfig, **kwargs: Any):
        return cls._class_for(config).from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        config = kwargs.pop("config", None)
        if config is None:
            hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, gguf_file=kwargs.get("gguf_file"),
                                                **hub_kwargs)
            config._from_auto = True  # the folder's own config, not one the caller chose
        return cls._class_for(config).from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    @classmethod
    def register(cls, config_class: type, model_class: type, exist_ok: bool = False) -> None:
        model_type = config_class.model_type
        if model_type in cls._table and not exist_ok:
            raise ValueError(f"{cls.__name__} already has a class for {model_type!r}")
        cls._table[model_type] = f"{model_class.__module__}:{model_class.__qualname__}"


class AutoModel(_AutoModel):
    _table = MODEL_CLASSES


class AutoModelForCausalLM(_AutoModel):
    _table = CAUSAL_LM_CLASSES


class AutoModelForImageTextToText(_AutoModel):
    _table = IMAGE_TEXT_TO_TEXT_CLASSES


class AutoModelForSequenceClassification(_AutoModel):
    _table = SEQUENCE_CLASSIFICATION_CLASSES


class AutoModelForQuestionAnswering(_AutoModel):
    _table = QUESTION_ANSWERING_CLASSES


class AutoModelForTokenClassification(_AutoModel):
    _table = TOKEN_CLASSIFICATION_CLASSES


def _processor_model_type(pretrained_model_name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> str:
    """model_type from config.json, else from the class names a preprocessor/processor config records."""
    import json

    from . import hub

    folder = hub.resolve(pretrained_model_name_or_path, **hub_kwargs)
    config_path = folder / "config.json"
    if config_path.is_file():
        model_type = json.loads(config_path.read_text()).get("model_type")
        if model_type:
            return model_type
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = folder / name
        if path.is_file():
            values = json.loads(path.read_text())
            for key in ("processor_class", "image_processor_type"):
                if values.get(key) in _PROCESSOR_NAMES:
                    return _PROCESSOR_NAMES[values[key]]
    raise ValueError(f"cannot tell which processor {pretrained_model_name_or_path} needs: no config.json model_type and "
                     "no known processor_class in its preprocessor/processor config")


class AutoProcessor:
    def __init__(self) -> None:
        raise OSError("AutoProcessor is not instantiated: use AutoProcessor.from_pretrained(...)")

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        model_type = _processor_model_type(pretrained_model_name_or_path, hub_kwargs)
        if model_type not in PROCESSOR_CLASSES:
            # Text-only models: the tokenizer is their processor, as in the reference.
            from .tokenization import AutoTokenizer

            return AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return _import(PROCESSOR_CLASSES[model_type]).from_pretrained(pretrained_model_name_or_path, **kwargs)


class AutoImageProcessor:
    def __init__(self) -> None:
        raise OSError("AutoImageProcessor is not instantiated: use AutoImageProcessor.from_pretrained(...)")

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        model_type = _processor_model_type(pretrained_model_name_or_path, hub_kwargs)
        return _lookup(IMAGE_PROCESSOR_CLASSES, model_type, "AutoImageProcessor").from_pretrained(
            pretrained_model_name_or_path, **kwargs
        )
