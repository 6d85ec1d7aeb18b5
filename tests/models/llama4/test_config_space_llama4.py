"""Llama 4 text configurations the fuzz (tests/fuzz/test_llama4.py) does not draw, against transformers.

Explicit moe_layers (against interleave_moe_layer_step), explicit layer_types that differ from the rope pattern,
no_rope_layer_interval, every expert routed, rope types other than llama3 on Llama 4's complex rotary, and a
config.json without the derived lists (moe_layers, no_rope_layers, layer_types) as older exports write it.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import herd
from tests.fuzz._diff import _randomize, assert_close

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=1, attention_chunk_size=8, floor_scale=4, attn_scale=0.5,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _drop(*keys):
    return lambda config: [config.pop(key, None) for key in keys]


CASES = {
    "moe_layers_explicit": (dict(moe_layers=[0, 3]), None),
    "moe_layers_against_the_step": (dict(interleave_moe_layer_step=2, moe_layers=[0, 2]), None),
    "moe_step_3_derived_lists_absent": (dict(interleave_moe_layer_step=3, no_rope_layer_interval=2),
                                        _drop("moe_layers", "no_rope_layers", "layer_types")),
    "every_expert_routed": (dict(num_experts_per_tok=4), None),
    "layer_types_all_full": (dict(layer_types=["full_attention"] * 4), None),
    "layer_types_all_chunked": (dict(layer_types=["chunked_attention"] * 4), None),
    "no_rope_layer_interval_2": (dict(no_rope_layer_interval=2), None),
    "dynamic_rope_past_max_positions": (dict(max_position_embeddings=12, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), None),
    "yarn_rope": (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                        "original_max_position_embeddings": 8}), None),
    "legacy_rope_scaling": (dict(), lambda c: (c.pop("rope_parameters", None), c.update(rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8}))),
}


def _pair(tmp_path, overrides, edit=None):
    import transformers

    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(**{**BASE, **overrides})
    _randomize(transformers.Llama4ForCausalLM(config)).save_pretrained(tmp_path)
    if edit is not None:
        path = tmp_path / "config.json"
        saved = json.loads(path.read_text())
        edit(saved)
        path.write_text(json.dumps(saved))
    return transformers.Llama4ForCausalLM.from_pretrained(tmp_path).eval(), tmp_path


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_greedy_generate_match_reference(tmp_path, case):
    reference, folder = _pair(tmp_path, *CASES[case])
    ours = herd.Llama4ForCausalLM.from_pretrained(folder, progress=False)
    ids = torch.randint(3, BASE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(ids).logits, copy.deepcopy(reference)(ids).logits)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = copy.deepcopy(reference).generate(ids[:, :7], **greedy)
    assert torch.equal(ours.generate(ids[:, :7], **greedy), expected)


def test_chunked_layers_without_a_chunk_size_are_refused_naming_the_fix(tmp_path):
    """attention_chunk_size null with chunked_attention layers: transformers fails in its cache; herd refuses at load."""
    reference, folder = _pair(tmp_path, dict(attention_chunk_size=None))
    ids = torch.randint(3, BASE["vocab_size"], (1, 5))
    with pytest.raises(TypeError):
        reference(ids)
    with pytest.raises(ValueError, match="attention_chunk_size.*layer_types"):
        herd.Llama4ForCausalLM.from_pretrained(folder, progress=False)
