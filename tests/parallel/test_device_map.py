"""device_map on the CPU: explicit maps with cpu and disk parts and "auto" under a max_memory that
forces disk give the one-device logits and greedy tokens (Llama, Llama 4 with its routed experts
apart, Mllama with an image); hf_device_map as transformers writes it; disk weights memory-mapped
from the checkpoint; the errors. GPU runs (streaming, several GPUs) are in test_offload.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import herd
from herd.decoding.decoders import why_not_fast
from herd.parallel import offload
from herd.parallel.device_map import clean_device_map, units
from tests.conftest import reference_llama, save_reference
from tests.models.llama4.test_modeling_llama4 import reference_llama4
from tests.models.mllama.test_modeling_mllama import _inputs as mllama_inputs
from tests.models.mllama.test_modeling_mllama import _reference as reference_mllama

pytestmark = pytest.mark.filterwarnings("ignore:`hidden_state` is deprecated:FutureWarning")


def _prompts(vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


def assert_same_run(model, one_device, **inputs):
    """The split model gives the one-device model's logits and greedy tokens exactly (float32, CPU:
    the same operations on the same device)."""
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, one_device(**inputs).logits)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(**inputs, **settings), one_device.generate(**inputs, **settings))


def file_mapped(tensor: torch.Tensor, path: Path) -> bool:
    """Whether `tensor`'s memory lies in a mapping of `path` (/proc/self/maps): a copy would not."""
    start = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path.resolve())):
                low, high = (int(x, 16) for x in line.split()[0].split("-"))
                if low <= start < high:
                    return True
    return False


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = save_reference(reference_llama(), tmp_path_factory.mktemp("llama") / "ckpt")
    return folder, herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


EXPLICIT = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "disk",
            "model.rotary_emb": "cpu", "lm_head": "disk"}


def test_explicit_map_with_cpu_and_disk_layers(llama, tmp_path):
    folder, one_device = llama
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=EXPLICIT, offload_folder=tmp_path / "off",
                                                  progress=False)
    assert model.hf_device_map == EXPLICIT  # recorded as given, as transformers does
    assert_same_run(model, one_device, input_ids=_prompts())
    assert "device_map" in why_not_fast(model, model.generation_config, past_key_values=None, extra_outputs=False)


def test_disk_layers_are_read_from_the_checkpoint_in_place(llama, tmp_path):
    folder, _ = llama
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=EXPLICIT, offload_folder=tmp_path / "off",
                                                  progress=False)
    assert not (tmp_path / "off").exists()  # nothing copied to the offload folder
    shard = folder / "model.safetensors"
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert file_mapped(model.get_parameter(name), shard), name


def test_a_key_covers_its_children_and_the_longest_key_wins(llama):
    folder, one_device = llama
    device_map = {"": "cpu", "model.layers": "disk", "model.layers.1": "cpu"}
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)
    placed = model._offload.placement.unit_devices
    assert placed["model.layers.0"] == "disk" and placed["model.layers.1"] == "cpu" and placed["lm_head"] == "cpu"
    assert_same_run(model, one_device, input_ids=_prompts())


@pytest.mark.parametrize("tie, cpu_bytes", [(False, 60_000), (False, 100_000), (True, 60_000), (False, 20_000)])
def test_auto_within_max_memory_sends_the_rest_to_disk_as_transformers_does(tmp_path, tie, cpu_bytes):
    import transformers

    folder = save_reference(reference_llama(tie_word_embeddings=tie), tmp_path / "ckpt")
    expected = transformers.LlamaForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": cpu_bytes}, offload_folder=tmp_path / "theirs").hf_device_map
    assert "disk" in expected.values()
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": cpu_bytes},
                                                  progress=False)
    assert model.hf_device_map == expected
    assert_same_run(model, herd.LlamaForCausalLM.from_pretrained(folder, progress=False), input_ids=_prompts())


def test_auto_that_fits_one_device_is_not_split(llama):
    folder, _ = llama
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": "1GiB"}, progress=False)
    assert not hasattr(model, "hf_device_map") and not hasattr(model, "_offload")


def test_converted_disk_weights_go_to_the_offload_folder(tmp_path):
    reference = reference_llama().to(torch.bfloat16)
    folder = save_reference(reference, tmp_path / "bf16")
    one_device = herd.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, progress=False)
    with pytest.raises(ValueError, match="offload_folder=PATH"):
        herd.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=EXPLICIT, progress=False)
    model = herd.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=EXPLICIT,
                                                  offload_folder=tmp_path / "off", progress=False)
    weight = model.get_parameter("model.layers.0.mlp.up_proj.weight")
    assert weight.dtype == torch.float32
    assert file_mapped(weight, tmp_path / "off" / "model.layers.0.mlp.up_proj.weight.safetensors")
    assert_same_run(model, one_device, input_ids=_prompts())


def test_quantized_while_loading_to_disk_needs_the_offload_folder(llama, tmp_path):
    folder, _ = llama
    quantization = herd.TorchAoConfig("int8_weight_only")
    with pytest.raises(ValueError, match="quantized while loading.*offload_folder"):
        herd.LlamaForCausalLM.from_pretrained(folder, device_map=EXPLICIT, quantization_config=quantization,
                                              progress=False)
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=EXPLICIT, quantization_config=quantization,
                                                  offload_folder=tmp_path / "off", progress=False)
    one_device = herd.LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization, progress=False)
    assert (tmp_path / "off" / "model.layers.0.mlp.up_proj.weight.safetensors").is_file()
    assert_same_run(model, one_device, input_ids=_prompts())


@pytest.mark.parametrize("device_map, error, message", [
    ({"model.embed_tokens": "cpu", "model.layers": "cpu", "lm_head": "cpu"}, ValueError,
     "without a device: model.norm, model.rotary_emb"),
    ({"": "cpu", "lm_head": "tpu"}, ValueError, r"device_map\['lm_head'\] = 'tpu' is not a device"),
    ({"": "cpu", "model.layer.0": "disk"}, ValueError, "'model.layer.0' is not a module of LlamaForCausalLM"),
    ({"": "cpu", "lm_head.weight": "disk"}, ValueError, "names a weight; name the module that holds it"),
    ("everywhere", ValueError, "is not a strategy"),
    (-1, ValueError, "device_map=-1 is not a GPU index: use 0 or above"),
])
def test_map_errors(llama, device_map, error, message):
    folder, _ = llama
    with pytest.raises(error, match=message):
        herd.LlamaForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_a_gpu_without_cuda_is_an_error(llama):
    folder, _ = llama
    with pytest.raises(RuntimeError, match=r"device_map\['lm_head'\] names GPU 0, but torch sees no CUDA device"):
        herd.LlamaForCausalLM.from_pretrained(folder, device_map={"": "cpu", "lm_head": 0}, progress=False)


def test_max_memory_needs_a_strategy(llama):
    folder, _ = llama
    with pytest.raises(ValueError, match="max_memory applies to device_map='auto'"):
        herd.LlamaForCausalLM.from_pretrained(folder, device_map={"": "cpu"}, max_memory={"cpu": "1GB"}, progress=False)


def test_generate_warns_once_with_the_documented_estimate(llama, caplog):
    folder, _ = llama
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=EXPLICIT, progress=False)
    disk_bytes = sum(t.numel() * t.element_size() for name in ("model.layers.0", "model.norm", "lm_head")
                     for t in model.get_submodule(name).parameters())
    with caplog.at_level(logging.WARNING, logger="herd"):
        model.generate(_prompts(), max_new_tokens=2, do_sample=False)
        model.generate(_prompts(), max_new_tokens=2, do_sample=False)
    warnings = [r.getMessage() for r in caplog.records if "runs offloaded" in r.getMessage()]
    assert len(warnings) == 1
    assert f"{disk_bytes / 1e9:.2f} GB read from disk" in warnings[0]
    assert f"about {offload.DISK_BYTES_PER_S / disk_bytes:.1f} tokens/s" in warnings[0]


# --- Llama 4: routed experts apart from their layer --------------------------------------------


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama4") / "ckpt"
    reference_llama4(interleave_moe_layer_step=2).save_pretrained(folder)  # dense and MoE layers alternate
    return folder, herd.Llama4ForCausalLM.from_pretrained(folder, progress=False)


@pytest.mark.parametrize("strategy", offload.RoutedExpertsOffload.STRATEGIES)
def test_llama4_experts_on_host_by_either_strategy(llama4, strategy):
    folder, one_device = llama4
    moe = [i for i, layer in enumerate(one_device.model.layers) if layer.is_moe_layer]
    device_map = {"": "cpu", **{f"model.layers.{i}.feed_forward.experts": "disk" for i in moe}}
    model = herd.Llama4ForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)
    assert model.hf_device_map == device_map
    assert len(model._offload.experts) == len(moe)
    model._offload.selector.forced = strategy
    assert_same_run(model, one_device, input_ids=_prompts())


def test_llama4_experts_strategy_measured_once_per_kind_of_call(llama4):
    folder, one_device = llama4
    model = herd.Llama4ForCausalLM.from_pretrained(folder, device_map={"": "cpu", "model.layers.1.feed_forward.experts":
                                                                       "cpu", "model.layers.0": "disk"}, progress=False)
    assert_same_run(model, one_device, input_ids=torch.randint(3, 128, (2, 20)))  # prefill: 40 tokens, decode: 2
    selector = model._offload.selector
    assert set(selector.chosen) == {"prefill", "decode"}
    for kind, timings in selector.timings.items():
        assert set(timings) == {"cpu", "copy"} and selector.chosen[kind] == min(timings, key=timings.get)


def test_llama4_auto_under_max_memory(llama4):
    folder, one_device = llama4
    model = herd.Llama4ForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": 150_000},
                                                   progress=False)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert_same_run(model, one_device, input_ids=_prompts())


# --- Mllama: vision tower, cross-attention layers -------------------------------------------------


def test_mllama_with_an_image_split_over_cpu_and_disk(tmp_path):
    folder = tmp_path / "mllama"
    reference_mllama().save_pretrained(folder)
    one_device = herd.MllamaForConditionalGeneration.from_pretrained(folder, progress=False)
    device_map = {"model.vision_model": "disk", "model.multi_modal_projector": "cpu", "model.language_model": "cpu",
                  "model.language_model.layers.1": "disk", "model.language_model.layers.4": "disk", "lm_head": "disk"}
    model = herd.MllamaForConditionalGeneration.from_pretrained(folder, device_map=device_map, progress=False)
    assert model._offload.placement.unit_devices["model.language_model.layers.1"] == "disk"  # a cross-attention layer
    assert_same_run(model, one_device, **mllama_inputs([[4], [2]]))


# --- pieces ---------------------------------------------------------------------------------------


def test_units_of_each_family(llama, llama4):
    assert [u.name for u in units(llama[1])] == ["model.embed_tokens", "model.layers.0", "model.layers.1",
                                                 "model.norm", "model.rotary_emb", "lm_head"]
    assert [u.layer_index for u in units(llama4[1].model)][:3] == [None, 0, 1]
    with torch.device("meta"):
        mllama = herd.MllamaForConditionalGeneration(reference_mllama().config.__class__.__name__ and
                                                     herd.MllamaConfig(**reference_mllama().config.to_dict()))
    names = [u.name for u in units(mllama)]
    assert names[:2] == ["model.vision_model", "model.language_model.embed_tokens"]
    assert names[-2:] == ["model.multi_modal_projector", "lm_head"]


@pytest.mark.parametrize("device_map", [
    {"a.b": 0, "a.c": 0, "d": "cpu"},
    {"a.b": 0, "a.c": 1, "a.d.e": "cpu", "a.d.f": "cpu"},
    {"x.0": "disk", "x.1": "disk", "y": "disk"},
    {"m.layers.0": 0, "m.layers.0.ff.experts": "cpu", "m.layers.1": 0},
])
def test_clean_device_map_as_accelerate(device_map):
    from accelerate.utils.modeling import clean_device_map as accelerates

    assert clean_device_map(dict(device_map)) == accelerates(dict(device_map))


def test_tensor_mover_moves_what_a_layer_receives():
    from herd.layers.attention import AttentionMask

    mover = offload.TensorMover()
    mask = AttentionMask(3, 5, padding_mask=torch.ones(2, 5, dtype=torch.bool))
    mask.boolean(torch.device("cpu"))  # realised on the CPU: must not follow the move
    cos_sin = (torch.ones(1, 3, 8), torch.zeros(1, 3, 8))
    meta = torch.device("meta")
    moved_args = mover.to((torch.ones(2, 3, 4), cos_sin, mask, None, 7), meta)
    assert [t.device for t in (moved_args[0], *moved_args[1])] == [meta] * 3
    assert moved_args[2].padding_mask.device == meta and moved_args[2]._realised == {} and moved_args[3:] == (None, 7)
    assert mover.to(mask, meta) is moved_args[2]  # one move per forward
    assert mask.padding_mask.device.type == "cpu" and "boolean" in mask._realised


# --- strategies over GPUs, planned on the meta device (no GPU needed: torch is told there are two) ---


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def _meta_model(cls, config):
    with torch.device("meta"):
        return cls(config)


def _layers_on(placement, device) -> int:
    return sum(1 for name, d in placement.unit_devices.items() if ".layers." in name and d == device)


def test_strategies_over_two_gpus(two_gpus):
    from herd.parallel.device_map import infer_placement, sized_units

    model = _meta_model(herd.LlamaForCausalLM, herd.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                               num_hidden_layers=12, num_attention_heads=4))
    layer = next(s for s in sized_units(model, torch.float32) if s.kv)
    roomy = {0: 40 * layer.weights, 1: 40 * layer.weights}
    counts = {strategy: (_layers_on(p, 0), _layers_on(p, 1)) for strategy in ("auto", "sequential", "balanced_low_0")
              for p in [infer_placement(model, strategy, roomy, torch.float32)]}
    assert counts["sequential"] == (12, 0)  # GPU 0 first, while it has room
    # spread: an even share plus 1.25 layers of slack on all but the last GPU (accelerate's rule)
    assert counts["auto"][0] <= 6 + 1.25 and sum(counts["auto"]) == 12
    assert counts["balanced_low_0"][0] < counts["auto"][0] and sum(counts["balanced_low_0"]) == 12
    tight = infer_placement(model, "auto", {0: 5 * layer.weights, 1: 5 * layer.weights, "cpu": 4 * layer.weights},
                            torch.float32)
    order = [0, 1, "cpu", "disk"]
    devices = [tight.unit_devices[f"model.layers.{i}"] for i in range(12)]
    assert devices == sorted(devices, key=order.index) and {"cpu", "disk"} <= set(devices)  # in order, never back
    assert _layers_on(tight, 0) < _layers_on(tight, 1)  # GPU 0 keeps room for two streamed layers


def test_llama4_auto_keeps_routed_experts_on_the_host_when_only_they_do_not_fit(two_gpus):
    from herd.parallel.device_map import infer_placement, sized_units

    config = herd.Llama4TextConfig(vocab_size=128, hidden_size=64, intermediate_size=256, intermediate_size_mlp=128,
                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   num_local_experts=16, num_experts_per_tok=1)
    model = _meta_model(herd.Llama4ForCausalLM, config)
    sized = sized_units(model, torch.float32)
    without_experts = sum(s.weights - s.expert_bytes for s in sized)
    experts = max(s.expert_bytes for s in sized)
    # CPU memory for two layers' experts and room for the largest still to come (as accelerate keeps)
    placement = infer_placement(model, "auto", {0: without_experts + 2 * experts, "cpu": 3.5 * experts}, torch.float32)
    assert set(placement.unit_devices.values()) == {0}
    assert placement.inner == {f"model.layers.{i}.feed_forward.experts": "cpu" if i < 2 else "disk" for i in range(4)}
    assert placement.hf_device_map == {**dict.fromkeys(placement.unit_devices, 0), **placement.inner}
    # when one whole layer on the host streams less than every layer's routed experts, whole layers go
    nearly = sum(s.weights + s.kv for s in sized) - sized[1].weights // 2
    assert not infer_placement(model, "auto", {0: nearly + 3 * sized[1].weights, "cpu": 10 * experts},
                               torch.float32).inner


def test_a_map_that_overfills_a_gpu_fails_before_loading(two_gpus, monkeypatch):
    from herd.parallel.device_map import check_fits, explicit_placement

    config = herd.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4)
    model = _meta_model(herd.LlamaForCausalLM, config)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000, 80_000))
    placement = explicit_placement(model, {"": 0, "model.layers.3": 1})
    with pytest.raises(torch.OutOfMemoryError, match=r"puts 0\.00 GB of weights on cuda:0, which has 0\.00 GB free: "
                                                     r"move layers.*does not fit"):
        check_fits(model, placement, config, None, torch.float32)


def test_generate_refuses_a_kv_cache_the_gpu_cannot_hold(two_gpus, monkeypatch):
    from herd.memory_plan import layer_kv_bytes
    from herd.parallel.device_map import explicit_placement

    config = herd.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2)
    model = _meta_model(herd.LlamaForCausalLM, config)
    placement = explicit_placement(model, {"": 0, "model.layers.3": "cpu"})
    state = offload.OffloadState(placement, compute_devices={u.name: torch.device("cuda", 0) for u in units(model)})
    model._offload = state
    per_position = sum(layer_kv_bytes(config, torch.float32, 1))  # every layer computes on GPU 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * per_position, 10**12))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    offload.before_generate(model, 1, 100, 30)  # fits exactly
    with pytest.raises(torch.OutOfMemoryError, match="KV cache of 4 layers .* try max_new_tokens=70"):
        offload.before_generate(model, 1, 101, 30)


def test_a_gguf_file_on_disk_needs_the_offload_folder(monkeypatch):
    from herd import loading
    from scripts.make_smollm2_checkpoint import GGUF

    if not GGUF.is_file():
        pytest.skip(f"{GGUF} is not there")
    monkeypatch.setattr(loading, "load_checkpoint", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match="GGUF file are converted.*offload_folder=PATH"):
        herd.AutoModelForCausalLM.from_pretrained(GGUF, device_map={"": "cpu", "model.layers.3": "disk"},
                                                  progress=False)
