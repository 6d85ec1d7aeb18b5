"""The quantization configs' API against transformers' configs and compressed-tensors' own matching.

- which Linear layers a compressed-tensors config group quantizes: compressed_tensors'
  match_named_modules over a transformers Llama is the oracle (names match whole, `re:` patterns
  match the path's start, "Linear" by class);
- FbgemmFp8Config / TorchAoConfig: from_dict, to_dict and to_json_string as transformers writes
  them into config.json; what herd does not do is refused by name.
"""

from __future__ import annotations

import json

import pytest
import torch

from herd.quantization.config import CompressedTensorsConfig, FbgemmFp8Config, TorchAoConfig
from tests.conftest import TINY_LLAMA

FP8_CHANNEL = {"weights": {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False}}

# (targets, ignore): names whole (a parent module names none of its linears; layer 1 is not
# layer 10 or 11), regular expressions from the path's start, the class name "Linear"
MATCHING = [
    (["Linear"], ["lm_head"]),
    (["Linear"], ["model.layers.1.mlp.down_proj", "lm_head"]),
    (["Linear"], ["model.layers.1", "lm_head"]),
    (["Linear"], ["mlp", "LlamaMLP", "lm_head"]),
    (["Linear"], ["re:.*mlp.*", "lm_head"]),
    (["Linear"], ["re:model.layers.1.*", "lm_head"]),
    (["Linear"], ["re:.*layers\\.1\\..*"]),
    (["re:.*self_attn.*"], []),
    (["re:.*proj$"], ["re:.*q_proj"]),
    (["re:q_proj"], []),
    (["model.layers.0.mlp.down_proj", "model.layers.11.self_attn.o_proj"], []),
]


@pytest.fixture(scope="module")
def twelve_layers():
    import transformers

    config = transformers.LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 12})
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("targets, ignore", MATCHING)
def test_compressed_tensors_targets_and_ignore_match_compressed_tensors(twelve_layers, targets, ignore):
    match = pytest.importorskip("compressed_tensors.utils.match")
    expected = {name for name, module in match.match_named_modules(twelve_layers, targets, ignore)
                if isinstance(module, torch.nn.Linear)}
    config = CompressedTensorsConfig({"group_0": {**FP8_CHANNEL, "targets": targets}}, format="float-quantized",
                                     ignore=ignore)
    got = {name for name, module in twelve_layers.named_modules()
           if isinstance(module, torch.nn.Linear) and config.scheme_for(name) is not None}
    assert got == expected


def test_compressed_tensors_names_with_a_prefix_herd_renames():
    # a transformers 4 multimodal checkpoint names `language_model.lm_head` what herd's model calls lm_head
    config = CompressedTensorsConfig({"group_0": {**FP8_CHANNEL, "targets": ["Linear"]}}, format="float-quantized",
                                     ignore=["language_model.lm_head", "language_model.model.layers.0.mlp.up_proj"])
    assert config.scheme_for("lm_head") is None and config.scheme_for("model.layers.0.mlp.up_proj") is None
    assert config.scheme_for("model.layers.0.mlp.down_proj") is not None
    assert config.scheme_for("model.layers.10.mlp.up_proj") is not None


def test_fbgemm_config_round_trips_as_transformers_writes_it():
    import transformers

    reference = transformers.FbgemmFp8Config(activation_scale_ub=900.0, modules_to_not_convert=["lm_head", "mlp.down_proj"])
    ours = FbgemmFp8Config(activation_scale_ub=900.0, modules_to_not_convert=["lm_head", "mlp.down_proj"])
    assert ours.to_json_string() == reference.to_json_string()
    assert json.loads(ours.to_json_string()) == json.loads(json.dumps(reference.to_dict()))
    # what transformers wrote into config.json reads back, through the class as through transformers
    written = json.loads(reference.to_json_string())
    back = FbgemmFp8Config.from_dict(written)
    assert back.to_dict() == ours.to_dict() and back.activation_scale_ub == 900.0
    config, unused = FbgemmFp8Config.from_dict(written, return_unused_kwargs=True, activation_scale_ub=100.0, other=1)
    reference_config, reference_unused = transformers.FbgemmFp8Config.from_dict(
        written, return_unused_kwargs=True, activation_scale_ub=100.0, other=1)
    assert (config.activation_scale_ub, unused) == (reference_config.activation_scale_ub, reference_unused)
    assert config._scheme().activation_scale_ub == 100.0
    assert config.scheme_for("model.layers.3.mlp.down_proj") is None
    assert config.scheme_for("model.layers.3.mlp.up_proj") is not None
    with pytest.raises(ValueError, match="quant_method 'torchao' is not 'fbgemm_fp8'"):
        FbgemmFp8Config.from_dict({"quant_method": "torchao", "quant_type": "int8_weight_only"})


def test_torchao_config_dict_round_trip_and_embedding_flags():
    config = TorchAoConfig("int4_weight_only", group_size=64, modules_to_not_convert=["o_proj"])
    written = json.loads(config.to_json_string())
    assert written == {"quant_method": "torchao", "quant_type": "int4_weight_only", "group_size": 64,
                       "modules_to_not_convert": ["o_proj"], "include_input_output_embeddings": False,
                       "untie_embedding_weights": False}
    back = TorchAoConfig.from_dict(written)
    assert back.to_dict() == config.to_dict() and back.scheme_for("model.layers.0.self_attn.o_proj") is None
    assert back.scheme_for("model.layers.0.mlp.up_proj").group_size == 64
    # transformers would quantize the embeddings and lm_head too: herd does not, so it says so
    with pytest.raises(ValueError, match="include_input_output_embeddings=True.*never quantizes the embeddings"):
        TorchAoConfig("int8_weight_only", include_input_output_embeddings=True)
