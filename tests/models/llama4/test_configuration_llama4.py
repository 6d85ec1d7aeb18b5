"""Llama 4 configs read like the reference's, including the released Scout and Maverick files."""

from __future__ import annotations

import json

import pytest
import torch

import herd
from herd import Llama4Config, Llama4TextConfig

SCOUT_TEXT = {
    "attention_bias": False, "attention_chunk_size": 8192, "attention_dropout": 0.0, "attn_scale": 0.1,
    "attn_temperature_tuning": True, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
    "floor_scale": 8192, "for_llm_compressor": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
    "intermediate_size_mlp": 16384, "max_position_embeddings": 10485760, "model_type": "llama4_text",
    "moe_layers": list(range(48)), "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(48)],
    "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8,
    "num_local_experts": 16, "output_router_logits": False, "pad_token_id": 200018, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "torch_dtype": "bfloat16",
    "use_cache": True, "use_qk_norm": True, "vocab_size": 202048,
}
MAVERICK_TEXT = {
    **SCOUT_TEXT, "interleave_moe_layer_step": 2, "moe_layers": list(range(1, 48, 2)), "num_local_experts": 128,
    "use_qk_norm": False, "rope_scaling": None, "max_position_embeddings": 1048576,
}
VISION = {"hidden_size": 1408, "image_size": 336, "intermediate_size": 5632, "num_attention_heads": 16,
          "num_hidden_layers": 34, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096,
          "projector_output_dim": 4096, "vision_output_dim": 4096, "rope_theta": 10000, "model_type": "llama4_vision_model"}


def _full(text):
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "boi_token_index": 200080,
            "eoi_token_index": 200081, "image_token_index": 200092, "text_config": text, "vision_config": VISION,
            "torch_dtype": "bfloat16", "transformers_version": "4.51.0.dev0"}


TEXT_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts_per_tok", "num_local_experts",
               "moe_layers", "no_rope_layers", "layer_types", "attention_chunk_size", "use_qk_norm",
               "attn_temperature_tuning", "floor_scale", "attn_scale", "rms_norm_eps", "eos_token_id", "pad_token_id"]


@pytest.mark.parametrize("text", [SCOUT_TEXT, MAVERICK_TEXT], ids=["scout", "maverick"])
def test_released_configs_read_like_reference(tmp_path, text):
    import transformers

    (tmp_path / "config.json").write_text(json.dumps(_full(text)))
    ours, reference = herd.AutoConfig.from_pretrained(tmp_path), transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(ours, Llama4Config)
    for field in TEXT_FIELDS:
        assert getattr(ours.text_config, field) == getattr(reference.text_config, field), field
    assert ours.text_config.rope_parameters == {k: v for k, v in reference.text_config.rope_parameters.items() if k != "type"}
    assert ours.image_token_id == reference.image_token_id == 200092
    assert ours.vision_config.patch_size == 14 and ours.vision_config.vision_output_dim == 4096
    text_only = Llama4TextConfig.from_pretrained(tmp_path)
    assert text_only.num_local_experts == text["num_local_experts"]
    # round trip, and transformers reads our file back
    ours.save_pretrained(tmp_path / "out")
    again = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    for field in TEXT_FIELDS:
        assert getattr(again.text_config, field) == getattr(reference.text_config, field), field
    assert herd.AutoConfig.from_pretrained(tmp_path / "out").to_dict() == ours.to_dict()


def test_scout_rope_with_equal_freq_factors_matches_reference():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from herd.layers.rope import compute_inv_freq

    ours, _ = compute_inv_freq(Llama4TextConfig(**SCOUT_TEXT).rope_parameters, 128, 10485760)
    reference, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.Llama4TextConfig(**SCOUT_TEXT), "cpu")
    assert torch.isfinite(ours).all() and torch.equal(ours, reference)


def test_defaults_match_reference():
    import transformers

    ours, reference = Llama4TextConfig(), transformers.Llama4TextConfig()
    for field in TEXT_FIELDS + ["max_position_embeddings", "interleave_moe_layer_step", "no_rope_layer_interval"]:
        assert getattr(ours, field) == getattr(reference, field), field
    assert ours.rope_parameters["rope_theta"] == 500000.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_local_experts=4, num_experts_per_tok=5), "num_experts_per_tok .* cannot exceed"),
    (dict(num_hidden_layers=4, moe_layers=[0, 4]), r"moe_layers \[4\] are outside"),
    (dict(num_hidden_layers=4, moe_layers=[-1]), "outside"),
    (dict(attention_chunk_size=0), "attention_chunk_size must be a positive"),
    (dict(num_hidden_layers=4, no_rope_layers=[1, 0]), "no_rope_layers has 2 entries"),
    (dict(num_hidden_layers=2, layer_types=["chunked_attention", "sliding"]), "layer_types"),
    (dict(num_attention_heads=6, num_key_value_heads=4), "multiple of num_key_value_heads"),
    (dict(attention_chunk_size=None), "attention_chunk_size is None"),
])
def test_inconsistent_configs_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Llama4TextConfig(**kwargs)
