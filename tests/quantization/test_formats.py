"""Quantized weights (herd.quantization): the quantizers against hand-computed values, the
linear formats against their dequantized arithmetic, loading / saving tiny models, Llama 4's
experts, and top-1 agreement with the float32 model on real trained weights (SmolLM2-135M)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import herd
from herd.quantization import FbgemmFp8Config, Int4WeightOnlyConfig, QuantizedExperts, QuantizedLinear, TorchAoConfig
from herd.quantization.formats import (Scheme, pack_int4, quantize_activation_rows, quantize_fp8_rows,
                                       quantize_int4_groups, quantize_int8_rows, unpack_int4)
from tests.conftest import reference_llama, save_reference

CONFIGS = {
    "fp8": FbgemmFp8Config(),
    "int8": TorchAoConfig("int8_weight_only"),
    "int4": TorchAoConfig("int4_weight_only", group_size=32),
}


# --- quantizers ----------------------------------------------------------------------------------


def test_int4_packing_puts_even_columns_in_the_low_nibble():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.tolist() == [[1 | 2 << 4, 15]]
    assert torch.equal(unpack_int4(packed), q)


def test_int4_groups_hand_computed():
    weight = torch.tensor([[0.0, 1.5, 3.0, 0.3] * 8, [-1.0] * 31 + [2.0]])  # two rows, one group of 32
    packed, scale, offset = quantize_int4_groups(weight, 32, torch.float32)
    assert scale.tolist() == [[pytest.approx(0.2)], [pytest.approx(0.2)]]  # (max - min) / 15
    assert offset.tolist() == [[0.0], [-1.0]]
    q = unpack_int4(packed)
    assert q[0, :4].tolist() == [0, 8, 15, 2]  # round(w / 0.2) for 0, 1.5 (7.5 -> 8), 3, 0.3 (1.5 -> 2)
    assert q[1, -1].item() == 15 and q[1, 0].item() == 0


@pytest.mark.parametrize("quantize, top", [(quantize_int8_rows, 127.0), (quantize_fp8_rows, 448.0)])
def test_row_quantizers_map_each_rows_amax_to_the_top(quantize, top):
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    data, scale = quantize(weight)
    assert scale.shape == (16, 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale[:, 0], weight.abs().amax(dim=1) / top)
    assert data.float().abs().amax(dim=1).tolist() == [top] * 16
    error = (data.float() * scale - weight).abs()
    # int8: half a step; e4m3: 3 mantissa bits, a relative error of at most 1/16
    bound = scale / 2 if top == 127.0 else weight.abs() / 16 + 1e-6
    assert (error <= bound + 1e-6).all()


def test_activation_rows_are_bounded_by_the_scale_ub():
    x = torch.tensor([[1.0, -2.0, 4.0], [1000.0, 3000.0, 0.5]])
    x_q, scale = quantize_activation_rows(x, scale_ub=1200.0)
    assert scale[:, 0].tolist() == [pytest.approx(4.0 / 448.0), pytest.approx(1200.0 / 448.0)]
    assert x_q[1, 1].float().item() == 448.0  # 3000 is clipped at the bound


# --- the formats' arithmetic -------------------------------------------------------------------------


def _linear(scheme: Scheme, in_features=64, out_features=32, bias=True, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    layer = QuantizedLinear(in_features, out_features, bias, scheme, dtype=dtype)
    from herd.quantization.formats import quantize_weight

    for name, value in quantize_weight(weight, scheme, dtype).items():
        setattr(layer, name, value)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features, generator=generator).to(dtype))
    return layer, weight


@pytest.mark.parametrize("scheme", [Scheme("int8"), Scheme("int4", group_size=32), Scheme("int4", group_size=64)])
def test_weight_only_cpu_kernels_equal_the_dequantized_matmul(scheme):
    """torch's CPU kernels run with bf16 activations: equal to the dequantized matmul within bf16
    rounding of the inputs."""
    layer, _ = _linear(scheme)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.linear(x.bfloat16().float(), layer.dequantize(), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)
    assert layer(x).shape == (3, 5, 32)


def test_fp8_with_dynamic_activations_is_the_scaled_product():
    layer, _ = _linear(Scheme("fp8", activations="dynamic", activation_scale_ub=1200.0), bias=False)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    x_q, x_scale = quantize_activation_rows(x, 1200.0)
    expected = (x_q.double() * x_scale.double()) @ (layer.weight.double() * layer.weight_scale.double()).t()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def _halves_by_inputs(layer: QuantizedLinear) -> list[QuantizedLinear]:
    """Two linears holding the first and second half of `layer`'s input features, as tensor
    parallel splits o and down: per-row scales whole, int4's packed bytes, scales and offsets by group."""
    scheme, half = layer.scheme, layer.in_features // 2
    halves = []
    for part in range(2):
        piece = QuantizedLinear(half, layer.out_features, False, scheme, dtype=layer.compute_dtype)
        if scheme.format == "int4":
            groups = layer.weight_scale.shape[1] // 2
            piece.weight = layer.weight[:, part * half // 2:(part + 1) * half // 2].contiguous()
            piece.weight_scale = layer.weight_scale[:, part * groups:(part + 1) * groups].contiguous()
            piece.weight_offset = layer.weight_offset[:, part * groups:(part + 1) * groups].contiguous()
        else:
            piece.weight = layer.weight[:, part * half:(part + 1) * half].contiguous()
            piece.weight_scale = layer.weight_scale
        halves.append(piece)
    return halves


@pytest.mark.parametrize("scheme", [Scheme("int8"), Scheme("int4", group_size=32)])
def test_weight_only_linears_split_by_inputs_need_nothing_across_ranks(scheme):
    """What tensor parallel relies on for o and down: torch's int8 / int4 CPU kernels round x to
    bf16 element by element (a split changes nothing there) and quantize no activation, so two
    halves of the input features, fed the halves of x, sum to the whole linear's output within
    bf16 rounding (the kernels' own, 8 bits) of the products' magnitude."""
    layer, _ = _linear(scheme, bias=False)
    halves = _halves_by_inputs(layer)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    split = halves[0](x[:, :32]) + halves[1](x[:, 32:])
    magnitude = x.bfloat16().float().abs() @ layer.dequantize().abs().t()  # sum of |x_k w_k|
    assert ((split - layer(x)).abs() <= 2.0**-7 * magnitude).all()


def test_fp8_split_by_inputs_scales_each_half_by_the_whole_rows_amax():
    """FP8 activations per token, split by input features as tensor parallel splits o and down:
    with `reduce_activation_amax` giving each half the whole row's amax (under tensor parallel a
    MAX all-reduce; here the other half's amax), the halves sum to the whole linear's output within
    float32 rounding; each half scaled by its own amax differs."""
    layer, _ = _linear(Scheme("fp8", activations="dynamic", activation_scale_ub=1200.0), bias=False)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    x[::2, :4] *= 10  # the largest entry of some rows in the first half
    pieces = [x[:, :32], x[:, 32:]]
    whole = layer(x)
    halves = _halves_by_inputs(layer)
    alone = halves[0](pieces[0]) + halves[1](pieces[1])
    assert (alone - whole).abs().max() > 1e-3
    for part, half in enumerate(halves):
        other = pieces[1 - part].abs().amax(dim=-1, keepdim=True)
        half.reduce_activation_amax = lambda amax, other=other: torch.maximum(amax, other)
    torch.testing.assert_close(halves[0](pieces[0]) + halves[1](pieces[1]), whole, rtol=1e-5, atol=1e-6)


def test_fp8_block_scales_dequantize_by_block():
    layer = QuantizedLinear(6, 5, False, Scheme("fp8", block=(2, 4)))
    layer.weight = torch.ones(5, 6).to(torch.float8_e4m3fn)
    layer.weight_scale = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    expected = torch.tensor([[0, 0, 0, 0, 1, 1]] * 2 + [[2, 2, 2, 2, 3, 3]] * 2 + [[4, 4, 4, 4, 5, 5]], dtype=torch.float32)
    assert torch.equal(layer.dequantize(), expected)


# --- loading, saving ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_reference(reference_llama(hidden_size=64, intermediate_size=128, vocab_size=128),
                          tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_quantized_save_and_load_back_unchanged(tiny_folder, tmp_path, name):
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    plain = herd.LlamaForCausalLM.from_pretrained(tiny_folder, progress=False)
    model = herd.LlamaForCausalLM.from_pretrained(tiny_folder, quantization_config=CONFIGS[name], progress=False)
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, QuantizedLinear) and isinstance(model.model.layers[1].mlp.down_proj, QuantizedLinear)
    assert type(model.lm_head) is torch.nn.Linear  # the head stays as it is
    logits, reference = model(ids).logits, plain(ids).logits
    assert (logits - reference).abs().max() < 0.3 * reference.abs().max()  # random weights quantize badly
    # The plumbing exactly: the float model with the dequantized weights gives the same logits, up
    # to the bf16 activations of the CPU int kernels (FP8: the activations' own quantization).
    with torch.no_grad():
        for path, module in model.named_modules():
            if isinstance(module, QuantizedLinear):
                plain.get_submodule(path).weight.copy_(module.dequantize())
    tolerance = 0.1 if name == "fp8" else 0.03
    assert (logits - plain(ids).logits).abs().max() < tolerance * reference.abs().max()
    assert model.config.quantization_config["quant_method"] in ("fbgemm_fp8", "herd")

    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" in json.loads((tmp_path / "saved" / "config.json").read_text())
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as stored:
        data = stored.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert data.dtype == attention.q_proj.weight.dtype and data.dtype in (torch.float8_e4m3fn, torch.int8, torch.uint8)
    again = herd.LlamaForCausalLM.from_pretrained(tmp_path / "saved", progress=False)
    for key, value in model.state_dict().items():  # loaded as stored: nothing quantized twice
        assert torch.equal(again.state_dict()[key], value), key
    assert torch.equal(again(ids).logits, logits)
    assert torch.equal(again.generate(ids[:1], max_new_tokens=6, do_sample=False),
                       model.generate(ids[:1], max_new_tokens=6, do_sample=False))


def test_fp8_on_the_cpu_says_which_path_runs(tiny_folder, caplog):
    """FP8 weights loaded for the CPU: a warning that each matmul converts them, and what runs
    faster there (int8); int8 itself loads without it."""
    import logging

    with caplog.at_level(logging.WARNING, logger="herd"):
        herd.LlamaForCausalLM.from_pretrained(tiny_folder, quantization_config=FbgemmFp8Config(), progress=False)
    assert "FP8 weights on the CPU" in caplog.text and "int8_weight_only" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="herd"):
        herd.LlamaForCausalLM.from_pretrained(tiny_folder, quantization_config=TorchAoConfig("int8_weight_only"),
                                              progress=False)
    assert "FP8" not in caplog.text


def test_modules_to_not_convert_and_config_object_forms(tiny_folder):
    config = TorchAoConfig(Int4WeightOnlyConfig(group_size=64), modules_to_not_convert=["o_proj", "model.layers.1.mlp"])
    model = herd.LlamaForCausalLM.from_pretrained(tiny_folder, quantization_config=config, progress=False)
    layers = model.model.layers
    assert type(layers[0].self_attn.o_proj) is torch.nn.Linear
    assert type(layers[1].mlp.up_proj) is torch.nn.Linear and isinstance(layers[0].mlp.up_proj, QuantizedLinear)
    assert layers[0].mlp.up_proj.scheme.group_size == 64


def test_a_group_size_that_does_not_divide_a_layer_is_an_error_naming_it(tiny_folder):
    with pytest.raises(ValueError, match=r"does not divide the 128 input features of model.layers.0.mlp.down_proj"):
        # hidden 64 is divided by 64, the MLP's 128 by 256 is not
        herd.LlamaForCausalLM.from_pretrained(tiny_folder, quantization_config=TorchAoConfig(
            "int4_weight_only", group_size=256, modules_to_not_convert=["self_attn", "gate_proj", "up_proj"]), progress=False)
    with pytest.raises(ValueError, match="group_size must be one of"):
        TorchAoConfig("int4_weight_only", group_size=48)
    with pytest.raises(ValueError, match="herd runs int4_weight_only, int8_weight_only"):
        TorchAoConfig("int8_dynamic_activation_int4_weight")


def test_an_unknown_quant_method_in_a_checkpoint_is_an_error_naming_it(tiny_folder, tmp_path):
    model = herd.LlamaForCausalLM.from_pretrained(tiny_folder, progress=False)
    model.config.quantization_config = {"quant_method": "awq", "bits": 4}
    model.save_pretrained(tmp_path / "awq")
    with pytest.raises(ValueError, match="quant_method 'awq', which herd does not load"):
        herd.LlamaForCausalLM.from_pretrained(tmp_path / "awq", progress=False)


def test_llama4_experts_in_fp8_and_int8(tmp_path):
    from tests.models.llama4.test_modeling_llama4 import reference_llama4

    reference_llama4().save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    plain = herd.Llama4ForCausalLM.from_pretrained(tmp_path / "ckpt", progress=False)
    for config in (FbgemmFp8Config(), TorchAoConfig("int8_weight_only")):
        model = herd.Llama4ForCausalLM.from_pretrained(tmp_path / "ckpt", quantization_config=config, progress=False)
        feed_forward = model.model.layers[0].feed_forward
        assert isinstance(feed_forward.experts, QuantizedExperts)
        assert type(feed_forward.router) is not QuantizedLinear  # the router keeps its weights
        experts = feed_forward.experts
        assert experts.gate_up_proj.element_size() == 1 and experts.gate_up_proj_scale.shape == (4, 1, 32)
        reference = plain(ids).logits
        assert (model(ids).logits - reference).abs().max() < 0.1 * reference.abs().max()
        assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 16)
        # counted as published, experts included; none of the quantized weights is trainable
        assert model.num_parameters() == plain.num_parameters()
        quantized_entries = sum(p.numel() for p in plain.parameters()) - sum(p.numel() for p in model.parameters())
        assert model.num_parameters(only_trainable=True) == plain.num_parameters() - quantized_entries
        model.save_pretrained(tmp_path / type(config).__name__)
        again = herd.Llama4ForCausalLM.from_pretrained(tmp_path / type(config).__name__, progress=False)
        assert torch.equal(again.model.layers[0].feed_forward.experts.down_proj, experts.down_proj)


def test_llama4_experts_in_int4_groups(tmp_path):
    from tests.models.llama4.test_modeling_llama4 import reference_llama4

    # widths int4 groups of 32 divide: hidden 64, expert width 32, dense MLP 64
    reference_llama4(hidden_size=64, intermediate_size=32, intermediate_size_mlp=64, interleave_moe_layer_step=2,
                     num_experts_per_tok=2).save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = herd.Llama4ForCausalLM.from_pretrained(tmp_path / "ckpt", progress=False)
    config = TorchAoConfig("int4_weight_only", group_size=32)
    model = herd.Llama4ForCausalLM.from_pretrained(tmp_path / "ckpt", quantization_config=config, progress=False)
    experts = model.model.layers[1].feed_forward.experts
    assert isinstance(experts, QuantizedExperts) and experts.scheme.format == "int4"
    # (experts, in / 2, out) packed, a scale and an offset per 32 input rows of each column
    assert experts.gate_up_proj.dtype == torch.uint8 and experts.gate_up_proj.shape == (4, 32, 64)
    assert experts.down_proj_scale.shape == experts.down_proj_offset.shape == (4, 1, 64)
    original = plain.model.layers[1].feed_forward.experts.down_proj.detach().clone()
    step = (original.amax(dim=1, keepdim=True) - original.amin(dim=1, keepdim=True)) / 15  # (experts, 1, out)
    assert ((experts.dequantized("down_proj", slice(None), torch.float32) - original).abs() <= step / 2 + 1e-6).all()
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (2, 16)
    # Experts alone in int4 (their reference path multiplies by the dequantized weights in float32):
    # the float model holding those dequantized weights gives the same logits.
    only_experts = TorchAoConfig("int4_weight_only", group_size=32, modules_to_not_convert=[
        "self_attn", "shared_expert", "feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj"])
    quantized = herd.Llama4ForCausalLM.from_pretrained(tmp_path / "ckpt", quantization_config=only_experts, progress=False)
    with torch.no_grad():
        for index in (1, 3):
            for name in ("gate_up_proj", "down_proj"):
                getattr(plain.model.layers[index].feed_forward.experts, name).copy_(
                    quantized.model.layers[index].feed_forward.experts.dequantized(name, slice(None), torch.float32))
    torch.testing.assert_close(quantized(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "int4")
    again = herd.Llama4ForCausalLM.from_pretrained(tmp_path / "int4", progress=False)
    for name in ("gate_up_proj", "gate_up_proj_scale", "gate_up_proj_offset"):
        assert torch.equal(getattr(again.model.layers[1].feed_forward.experts, name), getattr(experts, name))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="group_size 64 does not divide the input width of model.layers.1.feed_forward.experts"):
        herd.Llama4ForCausalLM.from_pretrained(tmp_path / "ckpt", progress=False, quantization_config=TorchAoConfig(
            "int4_weight_only", group_size=64, modules_to_not_convert=["mlp", "shared_expert", "self_attn"]))


# --- real trained weights --------------------------------------------------------------------------

# Teacher-forced top-1 agreement with the float32 model over four chats (a written answer after
# each prompt, 152 answer positions), measured 11-30 on CPU: bf16 alone 0.967, fp8 0.836 (FBGEMM's
# activation bound of 1200 clips SmolLM2's largest activations; 0.855 without the bound, 0.875
# with float activations), int8 0.974, int4 g32 0.980 (the weights came from a Q4_1 file, which
# g32 re-quantizes almost exactly), int4 g64 0.711. Thresholds: a few positions below.
AGREEMENT = {"fp8": (FbgemmFp8Config(), 0.80), "int8": (TorchAoConfig("int8_weight_only"), 0.94),
             "int4 g32": (TorchAoConfig("int4_weight_only", group_size=32), 0.95),
             "int4 g64": (TorchAoConfig("int4_weight_only", group_size=64), 0.66)}
CHATS = [
    ("What is the capital of France? Explain briefly.",
     "The capital of France is Paris. It has been the political and cultural centre of the country for "
     "centuries, and it is home to the government, the president and many museums."),
    ("Write a short poem about the sea.",
     "The sea is wide and deep and blue,\nIt sings a song both old and new.\nThe waves roll in upon the "
     "shore,\nAnd whisper tales of times before."),
    ("How do I sort a list in Python?",
     "You can sort a list in Python with the built-in sorted() function, which returns a new list, or with "
     "the list's sort() method, which sorts it in place. Both accept key and reverse arguments."),
    ("Give me three tips for learning to cook.",
     "1. Start with simple recipes and master the basics.\n2. Taste your food as you cook and adjust the "
     "seasoning.\n3. Keep your knives sharp and your workspace clean."),
]


@pytest.fixture(scope="module")
def smollm2_sequences(smollm2_folder):
    """(answer start, token ids, the float32 model's top-1 at each answer position) per chat."""
    tokenizer = herd.AutoTokenizer.from_pretrained(smollm2_folder)
    model = herd.AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32, progress=False)
    sequences = []
    for question, answer in CHATS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_dict=False)
        ids = torch.tensor([prompt + tokenizer.encode(answer, add_special_tokens=False)])
        with torch.no_grad():
            top1 = model(ids).logits[0, len(prompt) - 1 : -1].argmax(-1)
        sequences.append((len(prompt), ids, top1))
    return sequences


@pytest.mark.parametrize("name", list(AGREEMENT))
def test_top1_agreement_on_smollm2(smollm2_folder, smollm2_sequences, name):
    config, threshold = AGREEMENT[name]
    model = herd.AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32, quantization_config=config,
                                                      progress=False)
    hits = total = 0
    for answer_start, ids, top1 in smollm2_sequences:
        with torch.no_grad():
            quantized_top1 = model(ids).logits[0, answer_start - 1 : -1].argmax(-1)
        hits += (quantized_top1 == top1).sum().item()
        total += top1.numel()
    assert hits / total >= threshold, (name, hits / total)


@pytest.mark.parametrize("name, limit", [("fp8", 0.7), ("int4 g32", 0.55)])
def test_saved_checkpoint_size_against_bf16(smollm2_folder, tmp_path, name, limit):
    model = herd.AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.bfloat16,
                                                      quantization_config=AGREEMENT[name][0], progress=False)
    model.save_pretrained(tmp_path / "q")
    bf16_bytes = 2 * herd.AutoModelForCausalLM.from_pretrained(smollm2_folder, progress=False).num_parameters()
    saved = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert saved < limit * bf16_bytes, saved / bf16_bytes
