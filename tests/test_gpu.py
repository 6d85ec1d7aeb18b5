"""On CUDA: loading straight to the GPU, every backend, caches, bf16. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.cache import StaticCache
from tests.conftest import max_abs_diff, reference_llama, save_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    reference = reference_llama(num_hidden_layers=3, head_dim=16, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0})
    return save_reference(reference, tmp_path_factory.mktemp("gpu") / "ckpt"), reference


@pytest.fixture(autouse=True)
def exact_float32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _batch():
    ids = torch.randint(1, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_float32_on_cuda_matches_cpu_reference(checkpoint, attn):
    folder, reference = checkpoint
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map="cuda", attn_implementation=attn, progress=False)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    ids, mask = _batch()
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        got = model(ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
    assert max_abs_diff(got[mask.bool()], expected[mask.bool()]) < 1e-4


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_incremental_decoding_on_cuda(checkpoint, cache_kind):
    folder, _ = checkpoint
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map="cuda", progress=False)
    ids, mask = (t.cuda() for t in _batch())
    cache = None if cache_kind == "dynamic" else StaticCache(model.config, max_cache_len=24)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        out = model(ids[:, :12], attention_mask=mask[:, :12], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(12, 20):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    assert max_abs_diff(stepped[mask.bool()], full[mask.bool()]) < 1e-4


def test_bfloat16_on_cuda_matches_reference_on_cuda(checkpoint):
    import transformers

    folder, _ = checkpoint
    reference = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda").eval()
    model = herd.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda", progress=False)
    ids, mask = (t.cuda() for t in _batch())
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    assert got.dtype == torch.bfloat16
    assert max_abs_diff(got[mask.bool()], expected[mask.bool()]) < 2e-2


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_greedy_generation_on_cuda_matches_reference(checkpoint, cache_implementation):
    import transformers

    folder, _ = checkpoint
    reference = transformers.LlamaForCausalLM.from_pretrained(folder, device_map="cuda").eval()
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map="cuda", progress=False)
    ids, mask = (t.cuda() for t in _batch())
    ids = ids.masked_fill(mask == 0, 0)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         cache_implementation=cache_implementation)
    assert torch.equal(got, expected)
    beams_expected = reference.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, pad_token_id=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, pad_token_id=0), beams_expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_llama4_on_cuda_matches_reference(tmp_path, attn):
    import transformers

    from tests.models.llama4.test_modeling_llama4 import reference_llama4

    reference = reference_llama4(interleave_moe_layer_step=2, num_experts_per_tok=2, head_dim=16, floor_scale=4)
    reference.save_pretrained(tmp_path / "l4")
    model = herd.Llama4ForCausalLM.from_pretrained(tmp_path / "l4", device_map="cuda", attn_implementation=attn, progress=False)
    ids, mask = _batch()
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        got = model(ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
    assert max_abs_diff(got[mask.bool()], expected[mask.bool()]) < 1e-4
    on_gpu = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "l4", device_map="cuda").eval()
    ids, mask = ids.cuda().masked_fill(mask.cuda() == 0, 0), mask.cuda()
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = on_gpu.generate(ids, **kwargs)
    for cache_implementation in ("dynamic", "static", "hybrid"):
        assert torch.equal(model.generate(ids, cache_implementation=cache_implementation, **kwargs), expected)


def test_mllama_on_cuda_matches_reference(tmp_path):
    import transformers

    from tests.models.mllama.test_modeling_mllama import _inputs, _reference

    reference = _reference()
    reference.save_pretrained(tmp_path / "mllama")
    model = herd.MllamaForConditionalGeneration.from_pretrained(tmp_path / "mllama", device_map="cuda", progress=False)
    inputs = _inputs([[4, 1], [2]])
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = model(**{k: v.cuda() for k, v in inputs.items()}).logits.cpu()
    assert max_abs_diff(got, expected) < 1e-4
    on_gpu = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path / "mllama", device_map="cuda").eval()
    cuda_inputs = {k: v.cuda() for k, v in inputs.items()}
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**cuda_inputs, **kwargs), on_gpu.generate(**cuda_inputs, **kwargs))


def test_llama4_multimodal_on_cuda_matches_reference(tmp_path):
    import transformers

    from tests.models.llama4.test_modeling_llama4_multimodal import IMAGE, TEXT, VISION, _prompt

    torch.manual_seed(0)
    reference = transformers.Llama4ForConditionalGeneration(
        transformers.Llama4Config(text_config=TEXT, vision_config=VISION, image_token_index=IMAGE)).eval()
    reference.save_pretrained(tmp_path / "l4mm")
    model = herd.Llama4ForConditionalGeneration.from_pretrained(tmp_path / "l4mm", device_map="cuda", progress=False)
    ids, pixels = _prompt([2, 1])
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        got = model(input_ids=ids.cuda(), pixel_values=pixels.cuda()).logits.cpu()
    assert max_abs_diff(got, expected) < 1e-4
    on_gpu = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path / "l4mm", device_map="cuda").eval()
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids.cuda(), pixel_values=pixels.cuda(), **kwargs),
                       on_gpu.generate(ids.cuda(), pixel_values=pixels.cuda(), **kwargs))


def _built_under_cuda_context(cls, config):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls(config).eval()
    return model


def _family_configs():
    from tests.models.llama4.test_modeling_llama4_multimodal import IMAGE, TEXT, VISION
    from tests.models.mllama.test_modeling_mllama import IMAGE as MLLAMA_IMAGE, TEXT as MLLAMA_TEXT, VISION as MLLAMA_VISION

    llama = herd.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    llama4 = herd.Llama4Config(text_config=TEXT, vision_config=VISION, image_token_index=IMAGE)
    mllama = herd.MllamaConfig(text_config=MLLAMA_TEXT, vision_config=MLLAMA_VISION, image_token_index=MLLAMA_IMAGE)
    return [(herd.LlamaForCausalLM, llama), (herd.Llama4ForCausalLM, llama4.text_config),
            (herd.Llama4ForConditionalGeneration, llama4), (herd.MllamaForCausalLM, mllama.text_config),
            (herd.MllamaForConditionalGeneration, mllama)]


@pytest.mark.parametrize("index", range(5))
def test_a_model_built_under_torch_device_cuda_runs_there(index):
    """`with torch.device("cuda"): Model(config)` keeps every buffer (rotary frequencies) on the GPU,
    and computes what the same weights built on the CPU and moved compute."""
    cls, config = _family_configs()[index]
    model = _built_under_cuda_context(cls, config)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    moved = cls(config).eval()
    moved.load_state_dict(model.state_dict())
    moved.cuda()
    ids = torch.randint(3, 100, (2, 7), device="cuda")
    with torch.no_grad():
        got, expected = model(input_ids=ids).logits, moved(input_ids=ids).logits
    assert max_abs_diff(got, expected) < 1e-5
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mllama_fast_path_on_cuda_equals_the_plain_path(tmp_path, dtype):
    """Compiled and captured: float32 greedy tokens equal the plain path's; bf16 logits within the
    fast path's stated tolerance; a second image of the same shape reuses the captured graph."""
    from herd.decoding import decoders
    from tests.models.mllama.test_modeling_mllama import _inputs, _reference

    _reference().save_pretrained(tmp_path / "mllama")
    model = herd.MllamaForConditionalGeneration.from_pretrained(tmp_path / "mllama", device_map="cuda", dtype=dtype,
                                                                progress=False)
    for batch_images, image_at in (([[4, 1], [2]], (0, 5)), ([[3], []], (4,))):
        inputs = {k: v.cuda() for k, v in _inputs(batch_images, image_at=image_at).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                      return_dict_in_generate=True)
        fast = model.generate(**inputs, **kwargs)
        plain = model.generate(**inputs, disable_compile=True, **kwargs)
        if dtype == torch.float32:
            assert torch.equal(fast.sequences, plain.sequences)
        else:  # the first decode step's logits (the prefill is the same forward on both paths)
            step = plain.logits[1]
            assert max_abs_diff(fast.logits[1], step) <= 0.02 * float(step.abs().max()) + 0.05
    decoder = decoders.fast_decoder(model)
    captures = decoder.captures
    assert captures >= 1
    inputs["pixel_values"] = torch.randn_like(inputs["pixel_values"])
    model.generate(**inputs, **kwargs)
    assert decoder.captures == captures  # same image shape: the same graph
