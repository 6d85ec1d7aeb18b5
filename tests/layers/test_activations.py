"""herd's activations against transformers' ACT2FN table (the oracle), by name."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.layers.activations import get_activation
from tests.conftest import max_abs_diff, reference_llama, save_reference


def _reference_names():
    from transformers.activations import ACT2CLS

    return sorted(ACT2CLS)


@pytest.mark.parametrize("name", _reference_names())
def test_every_reference_activation_matches(name):
    from transformers.activations import ACT2FN

    reference, ours = ACT2FN[name], get_activation(name)
    if isinstance(ours, torch.nn.Module):  # learnable parameters: same values on both sides
        ours.load_state_dict(reference.state_dict())
    x = torch.randn(4, 7, 33, generator=torch.Generator().manual_seed(0)) * 4
    for dtype in (torch.float32, torch.bfloat16):
        if isinstance(ours, torch.nn.Module):  # parameters in the input's dtype (PReLU refuses mixed)
            reference, ours = reference.to(dtype), ours.to(dtype)
        expected, got = reference(x.to(dtype)), ours(x.to(dtype))
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown hidden_act 'nope'.*relu2"):
        get_activation("nope")


UNUSUAL = ["relu2", "mish", "gelu_fast", "leaky_relu", "gelu_new", "gelu_10", "laplace", "linear", "relu6",
           "hardswish", "sqrtsoftplus", "gelu_accurate", "prelu", "xielu"]


@pytest.mark.parametrize("name", UNUSUAL)
def test_tiny_llama_with_activation_matches_reference(tmp_path, name):
    reference = reference_llama(hidden_act=name)
    folder = save_reference(reference, tmp_path / "ckpt")
    ours = herd.LlamaForCausalLM.from_pretrained(folder, progress=False)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, reference(ids).logits) < 1e-4
