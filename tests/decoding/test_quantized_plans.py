"""The decode plans over quantized weights: the fast path of a quantized model computes what the
plain path computes on the same weights dequantized (its fused q/k/v and gate/up stack data,
scales and offsets row by row; o, down and Llama 4's experts are read in their formats)."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.decoding import decoders
from herd.quantization import FbgemmFp8Config, QuantizedExperts, QuantizedLinear, TorchAoConfig
from tests.conftest import max_abs_diff
from tests.decoding.test_decoders import _prompts, fast_on_cpu, llama4_folder, llama_folder, needs_cuda  # noqa: F401

CONFIGS = {
    "int8": TorchAoConfig("int8_weight_only"),
    "int4": TorchAoConfig("int4_weight_only", group_size=32),
    "fp8": FbgemmFp8Config(),
}


def _dequantized_twin(cls, folder, quantized, **kwargs):
    """The float model with the quantized model's weights, dequantized."""
    twin = cls.from_pretrained(folder, progress=False, **kwargs)
    with torch.no_grad():
        for path, module in quantized.named_modules():
            if isinstance(module, QuantizedLinear):
                twin.get_submodule(path).weight.copy_(module.dequantize())
            elif isinstance(module, QuantizedExperts):
                for name in ("gate_up_proj", "down_proj"):
                    getattr(twin.get_submodule(path), name).copy_(module.dequantized(name, slice(None), torch.float32))
    return twin


@pytest.fixture
def exact_prefill(monkeypatch):
    """The prefill runs the model's own forward, whose CPU int kernels round activations to bf16 and
    whose FP8 rounds them to FP8: here it multiplies by the dequantized weight instead, so that what
    is compared is the plan's decode arithmetic alone."""
    def dequantized(self, rows):
        return torch.nn.functional.linear(rows, self.dequantize(rows.dtype))

    monkeypatch.setattr(QuantizedLinear, "_cpu_weight_only", dequantized)
    monkeypatch.setattr(QuantizedLinear, "_fp8_matmul", dequantized)
    monkeypatch.setattr(QuantizedExperts, "_project",
                        lambda self, x, name, expert: x @ self.dequantized(name, expert, x.dtype))


def _forced_logits(model, sequences, mask, prompt_length: int):
    """The fast path's logits along given tokens: prefill, then one step per token."""
    decoder = decoders.fast_decoder(model)
    decoder.start(sequences.shape[0], 64)
    with torch.no_grad():
        logits, _ = decoder.prefill(sequences[:, :prompt_length], mask, {})
        got = [logits]
        for step in range(prompt_length, sequences.shape[1] - 1):
            got.append(decoder.step(sequences[:, step])[0])
    return got


@pytest.fixture(scope="module")
def llama4_int4_folder(tmp_path_factory):
    """test_decoders' Llama 4 at widths that int4 groups of 32 divide (hidden 64, experts 32, dense MLP 64)."""
    from tests.models.llama4.test_modeling_llama4 import reference_llama4

    folder = tmp_path_factory.mktemp("int4") / "llama4"
    reference_llama4(interleave_moe_layer_step=2, num_experts_per_tok=2, head_dim=16, floor_scale=4, num_hidden_layers=4,
                     attention_chunk_size=8, hidden_size=64, intermediate_size=32,
                     intermediate_size_mlp=64).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "llama4"])
@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
def test_fast_path_over_quantized_weights_equals_the_dequantized_model(fast_on_cpu, exact_prefill, llama_folder,
                                                                       llama4_folder, llama4_int4_folder, family, name):
    cls, folder = (herd.LlamaForCausalLM, llama_folder) if family == "llama" else (herd.Llama4ForCausalLM, llama4_folder)
    if family == "llama4" and name == "int4":
        folder = llama4_int4_folder  # int4 experts and linears in groups of 32
    model = cls.from_pretrained(folder, quantization_config=CONFIGS[name], progress=False)
    twin = _dequantized_twin(cls, folder, model)
    ids, mask = _prompts(3, 9)
    plain = twin.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                          eos_token_id=None, disable_compile=True, output_logits=True, return_dict_in_generate=True)
    got = _forced_logits(model, plain.sequences, mask, 9)
    # On the CPU the plan's matmuls dequantize as the twin holds its weights: equal to float32
    # rounding. (FP8's fast path is weight-only: the twin, with float activations, is its reference.)
    assert max(max_abs_diff(a, b) for a, b in zip(got, plain.logits)) < 1e-4
    assert decoders.why_not_fast(model, model.generation_config, past_key_values=None, extra_outputs=False) is None


def test_block_scaled_fp8_takes_the_plain_path(fast_on_cpu, llama_folder):
    model = herd.LlamaForCausalLM.from_pretrained(llama_folder, quantization_config=FbgemmFp8Config(), progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    layer.scheme = type(layer.scheme)("fp8", block=(128, 128))
    assert "block-scaled" in decoders.why_not_fast(model, model.generation_config, past_key_values=None,
                                                   extra_outputs=False)


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "llama4"])
@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
def test_cuda_quantized_fast_path_logits_within_tolerance(llama_folder, llama4_folder, llama4_int4_folder, family, name):
    """bf16 on the GPU, the kernels dequantizing in their loops against the dequantized bf16 model
    on the plain path: the bf16 tolerance of test_decoders (different rounding points)."""
    cls, folder = (herd.LlamaForCausalLM, llama_folder) if family == "llama" else (herd.Llama4ForCausalLM, llama4_folder)
    if family == "llama4" and name == "int4":
        folder = llama4_int4_folder
    model = cls.from_pretrained(folder, quantization_config=CONFIGS[name], device_map="cuda", dtype=torch.bfloat16,
                                progress=False)
    twin = _dequantized_twin(cls, folder, model, device_map="cuda", dtype=torch.bfloat16)
    ids, mask = _prompts(3, 9)
    plain = twin.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8, do_sample=False, pad_token_id=0,
                          eos_token_id=None, disable_compile=True, output_logits=True, return_dict_in_generate=True)
    got = _forced_logits(model, plain.sequences, mask.cuda(), 9)
    for a, b in zip(got, plain.logits):
        assert max_abs_diff(a, b) <= 0.02 * float(b.abs().max()) + 0.05
    fast = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert fast.shape == (3, 17)


@pytest.mark.parametrize("family", ["llama", "llama4"])
@pytest.mark.parametrize("name", ["fp8", "int4"])
def test_quantized_plan_units_trace_whole(fast_on_cpu, monkeypatch, llama_folder, llama4_folder, llama4_int4_folder,
                                          family, name):
    """The compiled step traces each unit as one graph (fullgraph): nothing a quantized weight brings
    may break it (a data_ptr read inside a unit did, on the GPU). Dynamo's tracing alone runs here."""
    import torch._dynamo

    from herd.decoding import graphs

    monkeypatch.setattr(graphs, "compile_units", lambda units: {
        name: torch.compile(fn, fullgraph=True, dynamic=False, backend="eager") for name, fn in units.items()})
    torch._dynamo.reset()
    cls, folder = (herd.LlamaForCausalLM, llama_folder) if family == "llama" else (herd.Llama4ForCausalLM, llama4_folder)
    if family == "llama4" and name == "int4":
        folder = llama4_int4_folder
    model = cls.from_pretrained(folder, quantization_config=CONFIGS[name], progress=False)
    decoder = decoders.fast_decoder(model)
    decoder.compile_override = True  # compile (here: trace) on the CPU too
    ids, mask = _prompts(1, 5)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)
