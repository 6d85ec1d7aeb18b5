"""Public surface of herd's model and config classes against transformers' (the oracle): the
methods and attributes user code calls on a model or config, on tiny configs."""

import json

import pytest
import torch

import herd

transformers = pytest.importorskip("transformers")

LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
MLLAMA_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, cross_attention_layers=[1], pad_token_id=0)
MLLAMA_VISION = dict(hidden_size=16, num_hidden_layers=1, num_global_layers=1, attention_heads=2, intermediate_size=32,
                     vision_output_dim=32, image_size=28, patch_size=14, intermediate_layers_indices=[0], max_num_tiles=4)
LLAMA4_TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, intermediate_size_mlp=32, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=2)
LLAMA4_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                     patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=16)

# (model class, config class, config kwargs)
MODELS = [
    ("LlamaModel", "LlamaConfig", LLAMA),
    ("LlamaForCausalLM", "LlamaConfig", LLAMA),
    ("LlamaForSequenceClassification", "LlamaConfig", LLAMA),
    ("LlamaForQuestionAnswering", "LlamaConfig", LLAMA),
    ("LlamaForTokenClassification", "LlamaConfig", LLAMA),
    ("MllamaTextModel", "MllamaTextConfig", MLLAMA_TEXT),
    ("MllamaForCausalLM", "MllamaTextConfig", MLLAMA_TEXT),
    ("MllamaVisionModel", "MllamaVisionConfig", MLLAMA_VISION),
    ("MllamaModel", "MllamaConfig", dict(text_config=MLLAMA_TEXT, vision_config=MLLAMA_VISION)),
    ("MllamaForConditionalGeneration", "MllamaConfig", dict(text_config=MLLAMA_TEXT, vision_config=MLLAMA_VISION)),
    ("Llama4TextModel", "Llama4TextConfig", LLAMA4_TEXT),
    ("Llama4ForCausalLM", "Llama4TextConfig", LLAMA4_TEXT),
    ("Llama4VisionModel", "Llama4VisionConfig", LLAMA4_VISION),
    ("Llama4ForConditionalGeneration", "Llama4Config", dict(text_config=LLAMA4_TEXT, vision_config=LLAMA4_VISION)),
]
CONFIGS = ["LlamaConfig", "MllamaConfig", "MllamaTextConfig", "MllamaVisionConfig", "Llama4Config", "Llama4TextConfig",
           "Llama4VisionConfig"]


def _pair(model_name, config_name, kwargs):
    torch.manual_seed(0)
    ours = getattr(herd, model_name)(getattr(herd, config_name)(**kwargs))
    theirs = getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs))
    return ours, theirs


@pytest.mark.parametrize("model_name,config_name,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_model_methods_match_transformers(model_name, config_name, kwargs):
    ours, theirs = _pair(model_name, config_name, kwargs)
    # can_generate is a classmethod on every model, not only on those that generate.
    assert type(ours).can_generate() == type(theirs).can_generate()
    assert (ours.generation_config is None) == (getattr(theirs, "generation_config", None) is None)
    assert ours.main_input_name == theirs.main_input_name
    assert ours.supports_gradient_checkpointing == theirs.supports_gradient_checkpointing
    if model_name not in ("MllamaForCausalLM", "Llama4ForCausalLM"):
        # transformers names these two's base_model_prefix "language_model" but stores the
        # backbone as `model`, so its base_model and get_decoder() give the model itself; herd
        # gives the backbone (the text model), which is what the methods are for.
        assert type(ours.base_model).__name__ == type(theirs.base_model).__name__
        assert type(ours.get_decoder()).__name__ == type(theirs.get_decoder()).__name__
    # Same parameter shapes and dtype: the same footprint, with and without buffers' part.
    assert ours.get_memory_footprint(return_buffers=False) == theirs.get_memory_footprint(return_buffers=False)
    assert ours.get_memory_footprint() > 0


def test_set_decoder_replaces_the_backbone():
    ours, theirs = _pair("LlamaForCausalLM", "LlamaConfig", LLAMA)
    new = herd.LlamaModel(herd.LlamaConfig(**LLAMA))
    ours.set_decoder(new)
    assert ours.get_decoder() is new and ours.model is new


@pytest.mark.parametrize("model_name,config_name,kwargs", [MODELS[1], MODELS[6], MODELS[11]],
                         ids=["llama", "mllama", "llama4"])
def test_gradient_checkpointing_same_gradients(model_name, config_name, kwargs):
    ours, theirs = _pair(model_name, config_name, kwargs)
    assert not ours.is_gradient_checkpointing and not theirs.is_gradient_checkpointing
    ours.train()
    ids = torch.randint(1, 60, (2, 7))

    def grads():
        ours.zero_grad()
        ours(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    plain = grads()
    ours.gradient_checkpointing_enable()
    theirs.gradient_checkpointing_enable()
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for name, grad in grads().items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-6)
    # Training with the cache on: it is switched off rather than written twice.
    assert ours(input_ids=ids, use_cache=True).past_key_values is None
    ours.gradient_checkpointing_disable()
    theirs.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing and not theirs.is_gradient_checkpointing


def test_enable_input_require_grads():
    ours, theirs = _pair("LlamaForCausalLM", "LlamaConfig", LLAMA)
    for model in (ours, theirs):
        model.get_input_embeddings().weight.requires_grad_(False)
        model.enable_input_require_grads()
        embeds = []
        handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: embeds.append(o))
        model(input_ids=torch.tensor([[1, 2, 3]]))
        assert embeds[-1].requires_grad
        model.disable_input_require_grads()
        model(input_ids=torch.tensor([[1, 2, 3]]))
        assert not embeds[-1].requires_grad
        handle.remove()


def test_save_pretrained_default_shard_size():
    import inspect

    ours = inspect.signature(herd.LlamaForCausalLM.save_pretrained).parameters["max_shard_size"].default
    assert ours == inspect.signature(transformers.LlamaForCausalLM.save_pretrained).parameters["max_shard_size"].default


# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_config_common_attributes(name):
    ours, theirs = getattr(herd, name)(), getattr(transformers, name)()
    for attribute in ("use_return_dict", "is_encoder_decoder", "chunk_size_feed_forward", "return_dict",
                      "output_attentions", "output_hidden_states", "num_labels", "id2label", "label2id"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    # to_dict keeps id2label's int keys, as transformers does (the JSON file has strings).
    assert ours.to_dict()["id2label"] == theirs.to_dict()["id2label"]
    for key in ("is_encoder_decoder", "chunk_size_feed_forward"):
        assert ours.to_dict()[key] == theirs.to_dict()[key]
    assert ours.get_text_config(decoder=True) is ours.get_text_config()
    assert type(ours.get_text_config(decoder=True)).__name__ == type(theirs.get_text_config(decoder=True)).__name__
    assert type(ours.get_text_config(encoder=True)).__name__ == type(theirs.get_text_config(encoder=True)).__name__


def test_config_update_and_json_files(tmp_path):
    ours, theirs = herd.LlamaConfig(**LLAMA), transformers.LlamaConfig(**LLAMA)
    for config in (ours, theirs):
        config.update({"hidden_size": 24, "output_hidden_states": True})
        assert config.hidden_size == 24 and config.output_hidden_states
    # to_diff_dict: transformers 5's rule (the base class's keys only when they differ; the model's own keys stay).
    assert ours.to_diff_dict()["vocab_size"] == 64 == theirs.to_diff_dict()["vocab_size"]
    assert "rms_norm_eps" in ours.to_diff_dict() and "id2label" not in ours.to_diff_dict()
    assert json.loads(ours.to_json_string(use_diff=False))["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    ours.to_json_file(json_file_path=tmp_path / "ours.json", use_diff=False)
    theirs.to_json_file(json_file_path=tmp_path / "theirs.json", use_diff=False)
    loaded = herd.LlamaConfig.from_json_file(tmp_path / "theirs.json")
    assert loaded.hidden_size == 24 and loaded.vocab_size == 64 and loaded.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    reloaded = transformers.LlamaConfig.from_json_file(tmp_path / "ours.json")
    assert reloaded.hidden_size == 24 and reloaded.vocab_size == 64
    # save_pretrained still writes the full config.
    ours.save_pretrained(tmp_path / "saved")
    assert "rms_norm_eps" in json.loads((tmp_path / "saved" / "config.json").read_text())
