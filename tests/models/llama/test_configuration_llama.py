"""LlamaConfig reads config.json of every transformers version and writes it back."""

from __future__ import annotations

import json

import pytest

import herd
from herd import LlamaConfig

REFERENCE_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
    rms_norm_eps=1e-6, use_cache=True, pad_token_id=None, bos_token_id=1, eos_token_id=2, pretraining_tp=1,
    tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0, mlp_bias=False, head_dim=128,
)


def test_defaults_match_reference():
    import transformers

    ours, reference = LlamaConfig(), transformers.LlamaConfig()
    for key, value in REFERENCE_DEFAULTS.items():
        assert getattr(ours, key) == value == getattr(reference, key), key
    assert ours.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0} == dict(reference.rope_parameters)


# config.json files as older and newer transformers versions wrote them (Llama 2 7B, Llama 3.1 8B,
# Llama 3.2 1B, a linear-scaled Llama 2, and a transformers 5 file).
LEGACY_LLAMA31 = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0",
    "use_cache": True, "vocab_size": 128256,
}
LEGACY_LLAMA2 = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}
LEGACY_LINEAR_TYPE_KEY = {**LEGACY_LLAMA2, "rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 20000.0}
LEGACY_DYNAMIC = {**LEGACY_LLAMA2, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
LLAMA32_1B = {
    **LEGACY_LLAMA31, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64,
    "tie_word_embeddings": True, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
V5_FILE = {
    **{k: v for k, v in LEGACY_LLAMA2.items() if k not in ("rope_scaling", "torch_dtype")}, "dtype": "bfloat16",
    "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                        "rope_theta": 10000.0, "beta_fast": 32.0, "beta_slow": 1.0},
}
CONFIG_FILES = {"llama3.1": LEGACY_LLAMA31, "llama2": LEGACY_LLAMA2, "linear-type-key": LEGACY_LINEAR_TYPE_KEY,
                "dynamic": LEGACY_DYNAMIC, "llama3.2-1b": LLAMA32_1B, "v5": V5_FILE}


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_reads_config_json_like_reference(tmp_path, name):
    import transformers

    (tmp_path / "config.json").write_text(json.dumps(CONFIG_FILES[name]))
    ours = herd.AutoConfig.from_pretrained(tmp_path)
    reference = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(ours, LlamaConfig)
    for key in REFERENCE_DEFAULTS:
        assert getattr(ours, key) == getattr(reference, key), key
    reference_rope = {k: v for k, v in reference.rope_parameters.items() if k != "type"}
    assert ours.rope_parameters == reference_rope
    assert ours.dtype == reference.dtype.__repr__().removeprefix("torch.")


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_round_trip_through_save_pretrained(tmp_path, name):
    import transformers

    (tmp_path / "config.json").write_text(json.dumps({**CONFIG_FILES[name], "my_custom_key": [1, 2]}))
    ours = LlamaConfig.from_pretrained(tmp_path)
    ours.save_pretrained(tmp_path / "out")
    again = LlamaConfig.from_pretrained(tmp_path / "out")
    assert again.to_dict() == ours.to_dict()
    assert again.my_custom_key == [1, 2]  # unknown keys survive
    # transformers reads our file back to the same rope and sizes
    reference = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert {k: v for k, v in reference.rope_parameters.items() if k != "type"} == ours.rope_parameters
    assert reference.num_key_value_heads == ours.num_key_value_heads and reference.head_dim == ours.head_dim


def test_to_dict_has_every_field():
    as_dict = LlamaConfig(num_key_value_heads=8, eos_token_id=[1, 2]).to_dict()
    for key in REFERENCE_DEFAULTS:
        assert key in as_dict, key
    assert as_dict["model_type"] == "llama" and as_dict["eos_token_id"] == [1, 2]
    assert as_dict["rope_parameters"]["rope_type"] == "default" and as_dict["rope_theta"] == 10000.0


def test_torch_dtype_spelling_and_labels():
    config = LlamaConfig(torch_dtype="float16", id2label={"0": "neg", "1": "pos"})
    assert config.dtype == "float16" and config.torch_dtype == "float16"
    assert config.num_labels == 2 and config.label2id == {"neg": 0, "pos": 1}
    config.num_labels = 5
    assert len(config.id2label) == 5
    assert LlamaConfig(num_labels=3).num_labels == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
        (dict(rope_scaling={"type": "su-rope", "factor": 2.0}), "unsupported rope_type"),
        (dict(rope_parameters={"rope_type": "linear"}), "needs factor"),
        (dict(num_attention_heads=6, num_key_value_heads=4, hidden_size=48), "multiple of num_key_value_heads"),
        (dict(hidden_size=0), "hidden_size must be a positive integer"),
        (dict(rope_parameters={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
                               "original_max_position_embeddings": 16}), "head_dim // 2"),
        (dict(problem_type="ranking"), "problem_type"),
    ],
)
def test_bad_configs_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**kwargs)


def test_missing_config_json_and_unknown_model_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        herd.AutoConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama"):
        herd.AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        herd.AutoModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        herd.AutoConfig.from_pretrained(tmp_path)


def test_llama_config_refuses_other_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="model_type 'mistral'.*LlamaConfig"):
        LlamaConfig.from_pretrained(tmp_path)
