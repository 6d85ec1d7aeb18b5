"""Llama configurations real checkpoints carry that the fuzz (tests/fuzz) does not draw, against transformers.

Rope keys beyond the fuzz's (yarn's attention_factor and a missing original_max_position_embeddings, longrope's
factor / attention_factor and a top-level original_max_position_embeddings as Phi-3 style configs write it),
config.json as Llama 2 checkpoints write it (rope_scaling with "type", pretraining_tp > 1, head_dim null), checked
end to end: logits of one forward past the original context and a greedy generate that crosses it.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import herd
from tests.fuzz._diff import _randomize, assert_close

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SHORT, LONG = [1.0, 1.5, 2.0, 1.2], [2.0, 3.0, 1.1, 4.0]


def _legacy(scaling, theta):
    """config.json as pre-5.0 checkpoints write it: top-level rope_theta and a rope_scaling dict (or null)."""
    def edit(config):
        config.pop("rope_parameters", None)
        config.update(rope_theta=theta, rope_scaling=scaling)
    return edit


CASES = {
    "yarn_without_original_length": (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}), None),
    "yarn_attention_factor": (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                    "attention_factor": 0.7, "original_max_position_embeddings": 8}), None),
    # head_dim 16: with 8 the correction range is the same for original lengths 8 and 32
    "yarn_top_level_original_length": (dict(hidden_size=64, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                             "rope_theta": 10000.0}),
                                       lambda c: c.update(original_max_position_embeddings=8)),
    "longrope_factor_from_lengths": (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT,
                                                           "long_factor": LONG, "original_max_position_embeddings": 8}), None),
    # factor (not max_position_embeddings / original) sets the attention factor, unless that is given
    "longrope_explicit_factor": (dict(rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT, "long_factor": LONG, "factor": 3.0,
        "original_max_position_embeddings": 8}), None),
    "longrope_attention_factor": (dict(rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT, "long_factor": LONG, "factor": 3.0,
        "attention_factor": 1.3, "original_max_position_embeddings": 8}), None),
    "longrope_top_level_original_length": (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                                 "short_factor": SHORT, "long_factor": LONG}),
                                           lambda c: c.update(original_max_position_embeddings=8)),
    "legacy_linear_type_key": (dict(), _legacy({"type": "linear", "factor": 2.0}, 500000.0)),
    "legacy_llama3": (dict(), _legacy({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8}, 500000.0)),
    "legacy_null_scaling_int_theta": (dict(), _legacy(None, 500)),
    "llama2_pretraining_tp_and_null_head_dim": (dict(), lambda c: c.update(pretraining_tp=2, head_dim=None)),
    "partial_head_dim_eos_list": (dict(head_dim=4, eos_token_id=[2, 5]), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_greedy_generate_match_reference(tmp_path, case):
    import transformers

    overrides, edit = CASES[case]
    torch.manual_seed(0)
    _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **overrides}))).save_pretrained(tmp_path)
    if edit is not None:
        path = tmp_path / "config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ours = herd.LlamaForCausalLM.from_pretrained(tmp_path, progress=False)
    ids = torch.randint(3, BASE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(ids).logits, copy.deepcopy(reference)(ids).logits)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = copy.deepcopy(reference).generate(ids[:, :6], **greedy)
    assert torch.equal(ours.generate(ids[:, :6], **greedy), expected)
