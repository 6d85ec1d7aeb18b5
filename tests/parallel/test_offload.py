"""Offload on a GPU (skipped without CUDA): layers in CPU memory or on disk streamed to the GPU on
a side stream give the all-on-GPU tokens; Llama 4's routed experts on the host by either strategy;
a model split over two GPUs. The CPU side of the same code is in test_device_map.py."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.parallel import offload
from tests.conftest import reference_llama, save_reference
from tests.models.llama4.test_modeling_llama4 import reference_llama4

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HALF_ON_CPU = {"": 0, "model.layers.2": "cpu", "model.layers.3": "cpu"}


def _prompts(vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()


def _same_tokens(model, on_gpu, atol: float = 1e-5, **inputs) -> None:
    with torch.no_grad():
        got, expected = model(**inputs).logits, on_gpu(**inputs).logits
    assert got.device == expected.device and (got - expected).abs().max().item() <= atol
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(**inputs, **settings), on_gpu.generate(**inputs, **settings))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = save_reference(reference_llama(num_hidden_layers=4), tmp_path_factory.mktemp("llama") / "ckpt")
    return folder, herd.LlamaForCausalLM.from_pretrained(folder, device_map="cuda", progress=False)


@pytest.mark.parametrize("host", ["cpu", "disk"])
def test_half_the_layers_on_the_host_equal_all_on_gpu(llama, host):
    folder, on_gpu = llama
    device_map = {key: (host if value == "cpu" else value) for key, value in HALF_ON_CPU.items()}
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)
    streamer = model._offload.streamer
    assert [s.name for s in streamer.modules] == ["model.layers.2", "model.layers.3"]
    _same_tokens(model, on_gpu, input_ids=_prompts())
    assert streamer.copies > 0
    weight = model.model.layers[2].mlp.up_proj.weight
    assert weight.device.type == "cpu" and (weight.is_pinned() if host == "cpu" else True)  # back on the host


def test_streaming_runs_on_the_side_stream_ahead_of_use(llama, monkeypatch):
    folder, _ = llama
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=HALF_ON_CPU, progress=False)
    streamer = model._offload.streamer
    events = []
    copy_in, begin = offload.StreamedModule.copy_in, offload.WeightStreamer.begin

    def recorded_copy(self):
        events.append(("copy", self.name, torch.cuda.current_stream() == streamer.stream))
        copy_in(self)

    def recorded_begin(self, streamed):
        events.append(("run", streamed.name, None))
        begin(self, streamed)

    monkeypatch.setattr(offload.StreamedModule, "copy_in", recorded_copy)
    monkeypatch.setattr(offload.WeightStreamer, "begin", recorded_begin)
    with torch.no_grad():
        model(_prompts())
        model(_prompts())
    assert all(on_side for kind, _, on_side in events if kind == "copy")
    # layer 3's copy starts when layer 2 starts (overlapping its compute); layer 2's for the next
    # forward when layer 3 starts
    assert events[:4] == [("run", "model.layers.2", None), ("copy", "model.layers.2", True),
                          ("copy", "model.layers.3", True), ("run", "model.layers.3", None)]
    assert events[4:7] == [("copy", "model.layers.2", True), ("run", "model.layers.2", None),
                           ("copy", "model.layers.3", True)]


def test_auto_offloads_what_max_memory_leaves_out(llama):
    folder, on_gpu = llama
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map="auto", max_memory={0: 480_000, "cpu": "1GiB"},
                                                  progress=False)
    assert {0, "cpu"} <= set(model.hf_device_map.values())
    _same_tokens(model, on_gpu, input_ids=_prompts())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_split_over_two_gpus(llama):
    folder, on_gpu = llama
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map={"": 0, "model.layers.2": 1, "model.layers.3": 1,
                                                                      "model.norm": 1}, progress=False)
    assert model.model.layers[3].mlp.up_proj.weight.device == torch.device("cuda", 1)
    _same_tokens(model, on_gpu, input_ids=_prompts())


@pytest.mark.parametrize("strategy", offload.RoutedExpertsOffload.STRATEGIES)
def test_llama4_routed_experts_on_the_host(tmp_path, strategy):
    folder = tmp_path / "l4"
    reference_llama4().save_pretrained(folder)
    on_gpu = herd.Llama4ForCausalLM.from_pretrained(folder, device_map="cuda", progress=False)
    device_map = {"": 0, **{f"model.layers.{i}.feed_forward.experts": "cpu" for i in range(4)}}
    model = herd.Llama4ForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)
    assert model.model.layers[0].feed_forward.experts.gate_up_proj.device.type == "cpu"
    model._offload.selector.forced = strategy
    _same_tokens(model, on_gpu, atol=1e-4, input_ids=_prompts())  # CPU and GPU matmuls round differently


def test_llama4_selector_measures_both_on_the_gpu(tmp_path):
    folder = tmp_path / "l4"
    reference_llama4().save_pretrained(folder)
    device_map = {"": 0, **{f"model.layers.{i}.feed_forward.experts": "cpu" for i in range(4)}}
    model = herd.Llama4ForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)
    model.generate(_prompts(), max_new_tokens=4, do_sample=False)
    assert set(model._offload.selector.chosen) == {"prefill", "decode"} and set(model._offload.selector.timings["decode"]) == \
        {"cpu", "copy"}
