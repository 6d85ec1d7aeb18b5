"""Llama's prompt pass (decoding/plans/llama.py, `LlamaPlan.prefilling`): the reference forward's
layers with fused weights and kernels/prefill.py in between give the reference's logits and cache
contents (float32 on the CPU: equal to the fused matmuls' rounding), and the reference forward is
back in place afterwards."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.cache import DynamicCache
from herd.decoding.decoders import fast_decoder, forward_tokens
from herd.kernels import prefill
from herd.models.llama import modeling_llama
from tests.conftest import reference_llama, save_reference


def _model(tmp_path, **overrides):
    reference = reference_llama(num_hidden_layers=3, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                                **overrides)
    model = herd.LlamaForCausalLM.from_pretrained(save_reference(reference, tmp_path / "llama"),
                                                  attn_implementation=overrides.get("attn_implementation", "sdpa"))
    plan = fast_decoder(model).plan
    plan.prepare()
    return model, plan


def _prefill(model, ids, mask, pieces, plan=None):
    """The prompt through forward_tokens in `pieces` (ends of each piece), all positions' logits
    and the cache's keys/values per layer."""
    cache, logits, start = DynamicCache(), [], 0
    for end in pieces:
        context = plan.prefilling() if plan is not None else torch.no_grad()
        with torch.no_grad(), context:
            out = forward_tokens(model, ids[:, start:end], mask[:, :end], cache, logits_to_keep=0)
        logits.append(out.logits)
        start = end
    layers = list(zip(cache.key_cache, cache.value_cache))
    return torch.cat(logits, dim=1), layers


def _inputs(batch, length, vocab, padded=True):
    ids = torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(batch + length))
    mask = torch.ones_like(ids)
    if padded:
        for row in range(1, batch):  # left padding
            mask[row, : 2 * row] = 0
    return ids, mask


@pytest.mark.parametrize("overrides, pieces", [
    ({}, (11,)),
    ({}, (5, 11)),  # a piece after a cache
    ({"attention_bias": True, "mlp_bias": True}, (4, 8, 11)),
    ({"hidden_act": "gelu"}, (11,)),  # not SiLU: the activation in torch
    ({"attn_implementation": "eager"}, (6, 11)),
])
def test_the_prompt_pass_equals_the_reference_forward(tmp_path, overrides, pieces):
    model, plan = _model(tmp_path, **overrides)
    ids, mask = _inputs(3, pieces[-1], model.config.vocab_size)
    expected_logits, expected_cache = _prefill(model, ids, mask, pieces)
    logits, cache = _prefill(model, ids, mask, pieces, plan)
    real = mask.bool()  # padded positions' outputs are not compared (nothing reads them)
    torch.testing.assert_close(logits[real], expected_logits[real], rtol=1e-5, atol=1e-5)
    for (keys, values), (expected_keys, expected_values) in zip(cache, expected_cache):
        torch.testing.assert_close(keys, expected_keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values, expected_values, rtol=1e-5, atol=1e-5)


def test_the_prompt_pass_runs_inside_the_context_and_only_there(tmp_path, monkeypatch):
    model, plan = _model(tmp_path)
    calls, fused = [], []
    real = modeling_llama.LlamaDecoderLayer.forward
    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_silu_mul = prefill.silu_mul
    monkeypatch.setattr(prefill, "silu_mul", lambda *a: fused.append(1) or real_silu_mul(*a))
    ids, mask = _inputs(1, 6, model.config.vocab_size)
    _prefill(model, ids, mask, (6,), plan)
    assert calls == []  # the plan's layers ran, not the reference's
    assert len(fused) == model.config.num_hidden_layers  # SiLU * up in one kernel
    assert "forward_layers" not in vars(model.model)
    _prefill(model, ids, mask, (6,))
    assert len(calls) == model.config.num_hidden_layers
    with pytest.raises(RuntimeError, match="inside"), plan.prefilling():
        raise RuntimeError("inside")
    assert "forward_layers" not in vars(model.model)  # put back after an error too


def test_the_prompt_pass_leaves_attention_weights_and_hidden_states_to_the_reference(tmp_path):
    model, plan = _model(tmp_path, attn_implementation="eager")
    ids, mask = _inputs(2, 7, model.config.vocab_size)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        with plan.prefilling():
            out = model(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == len(expected.attentions) == model.config.num_hidden_layers
    assert torch.equal(out.logits, expected.logits)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, expected.hidden_states))
    with torch.no_grad(), plan.prefilling():  # no cache kept: the reference's layers too
        uncached = model(ids, attention_mask=mask, use_cache=False)
    assert torch.equal(uncached.logits, expected.logits)


def test_quantized_weights_keep_the_reference_forward(tmp_path):
    reference = reference_llama(num_hidden_layers=2, hidden_size=64, intermediate_size=128, head_dim=16,
                                num_attention_heads=4, num_key_value_heads=2)
    model = herd.LlamaForCausalLM.from_pretrained(save_reference(reference, tmp_path / "llama"),
                                                  quantization_config=herd.TorchAoConfig("int8_weight_only"))
    plan = fast_decoder(model).plan
    plan.prepare()
    with plan.prefilling():
        assert "forward_layers" not in vars(model.model)
