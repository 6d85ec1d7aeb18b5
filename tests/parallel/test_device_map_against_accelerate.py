"""device_map against transformers + accelerate on the CPU: every form of device_map and
max_memory that transformers reads, the maps it writes to `hf_device_map`, the errors, and the
one-device logits and greedy tokens for each valid map. GPU maps are checked at the planning level
with torch told there are two GPUs (no GPU is used)."""

from __future__ import annotations

import logging

import pytest
import torch

import herd
from herd.parallel.device_map import capacities, explicit_placement, memory_size
from tests.conftest import reference_llama, save_reference
from tests.models.llama4.test_modeling_llama4 import reference_llama4
from tests.models.mllama.test_modeling_mllama import _reference as reference_mllama
from tests.parallel.test_device_map import _prompts, assert_same_run

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = save_reference(reference_llama(), tmp_path_factory.mktemp("llama") / "ckpt")
    return folder, herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    folder = save_reference(reference_llama(tie_word_embeddings=True), tmp_path_factory.mktemp("tied") / "ckpt")
    return folder, herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


def theirs(folder, cls="LlamaForCausalLM", **kwargs):
    """transformers' model (its hf_device_map, or None when it does not split the model)."""
    import transformers

    logging.disable(logging.WARNING)
    try:
        return getattr(transformers, cls).from_pretrained(folder, **kwargs)
    finally:
        logging.disable(logging.NOTSET)


def hf_map(model):
    return getattr(model, "hf_device_map", None)


# --- max_memory sizes: accelerate's convert_file_size_to_int ------------------------------------


@pytest.mark.parametrize("size", ["10GiB", "10gib", "1.5GiB", "500MB", "500mb", "1GB", "8Gb", "8gb", "100KB",
                                  "100kB", "100kb", "97KiB", "3MiB", " 2 GB", 123, 0, "0.06MB"])
def test_sizes_as_accelerate_reads_them(size):
    from accelerate.utils import convert_file_size_to_int

    assert memory_size(size, "max_memory['cpu']") == convert_file_size_to_int(size)


@pytest.mark.parametrize("size", ["1000", "5G", "1TB", "lots", "-1GB", -5, "GB"])
def test_sizes_accelerate_refuses_are_refused(size):
    from accelerate.utils import convert_file_size_to_int

    with pytest.raises(ValueError):
        convert_file_size_to_int(size)
    with pytest.raises(ValueError, match=r"max_memory\['cpu'\] = .* is not a size: use a number of bytes or .*'10GiB'"):
        memory_size(size, "max_memory['cpu']")


@pytest.mark.parametrize("cpu", ["60KB", "60kb", "0.06MB", "58KiB", 60_000.0])
def test_string_sizes_give_transformers_map(llama, tmp_path, cpu):
    folder, _ = llama
    expected = hf_map(theirs(folder, device_map="auto", max_memory={"cpu": cpu}, offload_folder=tmp_path / "t"))
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": cpu}, progress=False)
    assert hf_map(model) == expected


def test_max_memory_keys_and_sizes_over_two_simulated_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # GPUs first in index order, then the CPU; disk is never limited (as accelerate's get_max_memory orders them)
    assert capacities({"cpu": "1GB", 1: "8Gb", "disk": "1GB", 0: "2GiB"}) == {
        0: 2 * 2**30, 1: 10**9, "cpu": 10**9}
    with pytest.raises(RuntimeError, match=r"max_memory\[2\] names GPU 2, but torch sees 2 GPU\(s\)"):
        capacities({2: "1GB"})
    with pytest.raises(ValueError, match="max_memory key 'gpu' is not a device: use a GPU index"):
        capacities({"gpu": "1GB"})


# --- strategies within max_memory: the map transformers writes, the one-device outputs -----------


@pytest.mark.parametrize("strategy", ["auto", "balanced", "balanced_low_0", "sequential"])
def test_each_strategy_within_cpu_memory_as_transformers(llama, tmp_path, strategy):
    folder, one_device = llama
    expected = hf_map(theirs(folder, device_map=strategy, max_memory={"cpu": 60_000}, offload_folder=tmp_path / "t"))
    assert {"cpu", "disk"} <= set(expected.values())
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=strategy, max_memory={"cpu": 60_000},
                                                  progress=False)
    assert hf_map(model) == expected and list(hf_map(model)) == list(expected)  # same keys in the same order
    assert_same_run(model, one_device, input_ids=_prompts())


def test_llama4_auto_maps_as_transformers(tmp_path):
    folder = tmp_path / "l4"
    reference_llama4(interleave_moe_layer_step=2).save_pretrained(folder)
    one_device = herd.Llama4ForCausalLM.from_pretrained(folder, progress=False)
    for cpu in (100_000, 150_000):
        expected = hf_map(theirs(folder, "Llama4ForCausalLM", device_map="auto", max_memory={"cpu": cpu},
                                 offload_folder=tmp_path / "t"))
        model = herd.Llama4ForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": cpu},
                                                       progress=False)
        assert hf_map(model) == expected and list(hf_map(model)) == list(expected)
    assert_same_run(model, one_device, input_ids=_prompts())


def test_mllama_auto_map_as_transformers(tmp_path):
    folder = tmp_path / "mllama"
    reference_mllama().save_pretrained(folder)
    expected = hf_map(theirs(folder, "MllamaForConditionalGeneration", device_map="auto",
                             max_memory={"cpu": 300_000}, offload_folder=tmp_path / "t"))
    model = herd.MllamaForConditionalGeneration.from_pretrained(folder, device_map="auto", max_memory={"cpu": 300_000},
                                                                progress=False)
    assert hf_map(model) == expected and list(hf_map(model)) == list(expected)
    assert expected["model.vision_model"] == "cpu" and expected["lm_head"] == "disk"


# --- single devices and explicit maps ------------------------------------------------------------


@pytest.mark.parametrize("device_map", ["cpu", torch.device("cpu"), {"": "cpu"}, {"": torch.device("cpu")},
                                        {"model": "cpu", "lm_head": "cpu"}, "auto"])
def test_one_device_maps_are_not_split(llama, device_map):
    folder, one_device = llama
    assert hf_map(theirs(folder, device_map=device_map)) is None
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)
    assert hf_map(model) is None and next(model.parameters()).device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(model(_prompts()).logits, one_device(_prompts()).logits)


@pytest.mark.parametrize("device_map", [
    {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"},
    {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "lm_head": "cpu"},
])
def test_a_map_may_leave_out_the_rotary_embedding_as_transformers(llama, device_map):
    """transformers checks only the state dict's tensors; the rotary embedding has none (inv_freq
    is not saved)."""
    folder, one_device = llama
    reference = theirs(folder, device_map=device_map)
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)
    assert hf_map(model) == hf_map(reference) == device_map
    assert model._offload.placement.unit_devices["model.rotary_emb"] == "cpu"
    assert_same_run(model, one_device, input_ids=_prompts())
    with torch.no_grad():
        torch.testing.assert_close(model(_prompts()).logits, reference(_prompts()).logits, rtol=1e-5, atol=1e-5)


def test_the_rotary_embedding_left_out_goes_to_the_first_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = herd.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4)
    with torch.device("meta"):
        model = herd.LlamaForCausalLM(config)
    placement = explicit_placement(model, {"model.embed_tokens": "cpu", "model.layers": 1, "model.norm": 1,
                                           "lm_head": "cpu", "model.layers.0.mlp": 0})
    assert placement.unit_devices == {"model.embed_tokens": "cpu", "model.layers.0": 1, "model.layers.1": 1,
                                      "model.norm": 1, "model.rotary_emb": 0, "lm_head": "cpu"}  # the model's order


def test_a_whole_model_and_a_head_on_disk_as_transformers(llama):
    folder, one_device = llama
    device_map = {"model": "cpu", "lm_head": "disk"}
    reference = theirs(folder, device_map=device_map)
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)
    assert hf_map(model) == hf_map(reference) == device_map
    assert_same_run(model, one_device, input_ids=_prompts())
    with torch.no_grad():
        torch.testing.assert_close(model(_prompts()).logits, reference(_prompts()).logits, rtol=1e-5, atol=1e-5)


def test_torch_device_values_in_a_split_map(llama):
    """transformers 5.17 fails on this map (safetensors is handed the torch.device); herd reads it."""
    folder, one_device = llama
    device_map = {"model": torch.device("cpu"), "lm_head": "disk"}
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)
    assert hf_map(model) == device_map and model._offload.placement.unit_devices["lm_head"] == "disk"
    assert_same_run(model, one_device, input_ids=_prompts())


@pytest.mark.parametrize("device_map", [
    {"": "cpu", "model.layers.0.mlp": "disk"},
    {"": "disk", "model.layers.1.self_attn": "cpu", "model.norm": "cpu"},
    {"": "cpu", "model.layers.0.mlp.down_proj": "disk", "model.layers.1.input_layernorm": "disk"},
])
def test_submodule_maps_give_the_one_device_run(llama, device_map):
    folder, one_device = llama
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)
    assert hf_map(model) == device_map  # recorded as given, as transformers does
    assert_same_run(model, one_device, input_ids=_prompts())


@pytest.mark.parametrize("device_map", [{"": "cpu", "lm_head": "disk"}, {"": "cpu", "model.embed_tokens": "disk"},
                                        {"": "disk"}])
def test_tied_head_with_its_embedding_elsewhere(tied, device_map):
    folder, one_device = tied
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)
    assert hf_map(model) == device_map
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_run(model, one_device, input_ids=_prompts())


def test_tied_auto_as_transformers(tied, tmp_path):
    folder, one_device = tied
    expected = hf_map(theirs(folder, device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "t"))
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": "60KB"},
                                                  progress=False)
    assert hf_map(model) == expected and list(hf_map(model)) == list(expected)
    assert expected["lm_head"] == expected["model.embed_tokens"] == "cpu"
    assert_same_run(model, one_device, input_ids=_prompts())


# --- errors ----------------------------------------------------------------------------------------


def test_a_map_missing_a_weight_is_refused_as_transformers(llama):
    folder, _ = llama
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "lm_head": "cpu"}
    with pytest.raises(ValueError, match="does not give any device for the following parameters: model.norm.weight"):
        theirs(folder, device_map=device_map)
    with pytest.raises(ValueError, match=r"leaves 2 module\(s\) of LlamaForCausalLM without a device: model.norm, "
                                         "model.rotary_emb; add them to the map, or a key ''"):
        herd.LlamaForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)


def test_disk_as_a_string_is_refused_as_transformers(llama):
    folder, _ = llama
    with pytest.raises(ValueError, match="needs to be a device name"):
        theirs(folder, device_map="disk")
    with pytest.raises(ValueError, match=r"device_map='disk' is not a device name; .* device_map=\{'': 'disk'\}"):
        herd.LlamaForCausalLM.from_pretrained(folder, device_map="disk", progress=False)


@pytest.mark.parametrize("device_map", ["meta", torch.device("meta")])
def test_meta_is_refused_with_the_way_to_an_empty_model(llama, device_map):
    """Deliberate: transformers returns a model without weights; herd's from_pretrained reads them."""
    folder, _ = llama
    with pytest.raises(ValueError, match=r"would load no weights; .*with torch.device\('meta'\)"):
        herd.LlamaForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_a_gpu_index_without_cuda_names_the_problem(llama):
    folder, _ = llama
    with pytest.raises(RuntimeError):
        theirs(folder, device_map=0)
    with pytest.raises(RuntimeError, match="device_map=0 names GPU 0, but torch sees no CUDA device; use .*'cpu'"):
        herd.LlamaForCausalLM.from_pretrained(folder, device_map=0, progress=False)


def test_a_bad_max_memory_size_names_the_units(llama, tmp_path):
    folder, _ = llama
    with pytest.raises(ValueError, match="not in a valid format"):
        theirs(folder, device_map="auto", max_memory={"cpu": "5G"})
    with pytest.raises(ValueError, match=r"max_memory\['cpu'\] = '5G' is not a size"):
        herd.LlamaForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": "5G"}, progress=False)
