"""Mllama configs read the released Llama 3.2 Vision config.json like the reference."""

from __future__ import annotations

import json

import pytest

import herd
from herd import MllamaConfig, MllamaTextConfig, MllamaVisionConfig

RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
LLAMA_32_11B_VISION = {
    "architectures": ["MllamaForConditionalGeneration"], "image_token_index": 128256, "model_type": "mllama",
    "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
    "text_config": {
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "dropout": 0, "eos_token_id": 128001,
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
        "model_type": "mllama_text_model", "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8,
        "pad_token_id": 128004, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "torch_dtype": "bfloat16", "vocab_size": 128256},
    "vision_config": {
        "attention_heads": 16, "hidden_act": "gelu", "hidden_size": 1280, "image_size": 560,
        "intermediate_layers_indices": [3, 7, 15, 23, 30], "intermediate_size": 5120, "max_num_tiles": 4,
        "model_type": "mllama_vision_model", "norm_eps": 1e-05, "num_channels": 3, "num_global_layers": 8,
        "num_hidden_layers": 32, "patch_size": 14, "supported_aspect_ratios": RATIOS, "vision_output_dim": 7680},
}
TEXT_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "cross_attention_layers", "rms_norm_eps", "max_position_embeddings", "pad_token_id",
               "eos_token_id", "bos_token_id"]
VISION_FIELDS = ["hidden_size", "num_hidden_layers", "num_global_layers", "attention_heads", "intermediate_size",
                 "vision_output_dim", "image_size", "patch_size", "max_num_tiles", "intermediate_layers_indices",
                 "supported_aspect_ratios", "norm_eps", "max_aspect_ratio_id"]


def test_released_config_reads_like_reference(tmp_path):
    import transformers

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_32_11B_VISION))
    ours, reference = herd.AutoConfig.from_pretrained(tmp_path), transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(ours, MllamaConfig) and ours.image_token_id == reference.image_token_id == 128256
    for field in TEXT_FIELDS:
        assert getattr(ours.text_config, field) == getattr(reference.text_config, field), field
    for field in VISION_FIELDS:
        assert getattr(ours.vision_config, field) == getattr(reference.vision_config, field), field
    assert ours.text_config.rope_parameters == dict(reference.text_config.rope_parameters)
    assert MllamaTextConfig.from_pretrained(tmp_path).num_hidden_layers == 40  # the part of a full config
    assert MllamaVisionConfig.from_pretrained(tmp_path).image_size == 560
    ours.save_pretrained(tmp_path / "out")
    again = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    for field in TEXT_FIELDS:
        assert getattr(again.text_config, field) == getattr(reference.text_config, field), field
    assert herd.AutoConfig.from_pretrained(tmp_path / "out").to_dict() == ours.to_dict()


def test_defaults_match_reference():
    import transformers

    ours, reference = MllamaConfig(), transformers.MllamaConfig()
    for field in TEXT_FIELDS:
        assert getattr(ours.text_config, field) == getattr(reference.text_config, field), field
    for field in VISION_FIELDS:
        assert getattr(ours.vision_config, field) == getattr(reference.vision_config, field), field


@pytest.mark.parametrize("cls, kwargs, message", [
    (MllamaVisionConfig, dict(max_num_tiles=6), "max_num_tiles must be 4"),
    (MllamaVisionConfig, dict(num_hidden_layers=4), "intermediate_layers_indices"),
    (MllamaTextConfig, dict(num_hidden_layers=4), "cross_attention_layers"),
    (MllamaTextConfig, dict(num_attention_heads=5), "divide evenly"),
])
def test_bad_configs_are_clear_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)
