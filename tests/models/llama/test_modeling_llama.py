"""Parity of herd's Llama models with transformers on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

import herd
from tests.conftest import max_abs_diff, reference_llama, save_reference

TOL = 1e-4

ROPE_CASES = {
    "default": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "theta": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "dynamic": dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    "yarn": dict(
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
    ),
    "yarn-mscale": dict(
        rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0,
            "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "truncate": False,
        }
    ),
    "longrope": dict(
        rope_parameters={
            "rope_type": "longrope", "original_max_position_embeddings": 16, "rope_theta": 10000.0,
            "short_factor": [1.0, 1.1, 1.3, 1.7], "long_factor": [1.5, 2.0, 3.0, 4.0],
        }
    ),
    "llama3": dict(
        rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0,
        }
    ),
}

ARCH_CASES = {
    "gqa": dict(),
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_key_value_heads=1),
    "head_dim": dict(head_dim=16),  # != hidden_size / heads = 8
    "biases": dict(attention_bias=True, mlp_bias=True),
    "tied": dict(tie_word_embeddings=True),
    "three_layers_gelu": dict(num_hidden_layers=3, hidden_act="gelu"),
}


def _load_pair(tmp_path, cls_name="LlamaForCausalLM", attn="sdpa", **overrides):
    reference = reference_llama(cls_name, **overrides)
    folder = save_reference(reference, tmp_path / "ckpt")
    ours = getattr(herd, cls_name).from_pretrained(folder, attn_implementation=attn, progress=False)
    return reference, ours


def _ids(batch=2, seq=12, vocab=128, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, seq), generator=generator)


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_causal_lm_logits_match_reference(tmp_path, case):
    reference, ours = _load_pair(tmp_path, **ARCH_CASES[case])
    ids = _ids()
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids).logits
    assert got.shape == expected.shape
    assert max_abs_diff(got, expected) < TOL


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_every_rope_type_matches_reference(tmp_path, case):
    # 40 tokens: past original_max_position_embeddings (16) of yarn/longrope/llama3, and past
    # max_position_embeddings (32) so that dynamic NTK rescales.
    reference, ours = _load_pair(tmp_path, max_position_embeddings=32, **ROPE_CASES[case])
    for seq in (8, 40):
        ids = _ids(batch=1, seq=seq)
        with torch.no_grad():
            assert max_abs_diff(ours(ids).logits, reference(ids).logits) < TOL, f"seq={seq}"


@pytest.mark.parametrize("case", ["dynamic", "longrope", "llama3"])
def test_rope_types_match_reference_when_decoding_past_original_length(tmp_path, case):
    reference, ours = _load_pair(tmp_path, max_position_embeddings=32, **ROPE_CASES[case])
    ids = _ids(batch=1, seq=40)
    ref_cache, our_cache = None, None
    with torch.no_grad():
        # prefill 12 tokens, then one at a time past both lengths
        for start, stop in [(0, 12)] + [(t, t + 1) for t in range(12, 40)]:
            r = reference(ids[:, start:stop], past_key_values=ref_cache, use_cache=True)
            o = ours(ids[:, start:stop], past_key_values=our_cache, use_cache=True)
            ref_cache, our_cache = r.past_key_values, o.past_key_values
            assert max_abs_diff(o.logits, r.logits) < TOL, f"step at {start}"


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_left_padded_batch_with_attention_mask(tmp_path, attn):
    reference, ours = _load_pair(tmp_path, attn=attn)
    ids = _ids(batch=3, seq=10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_abs_diff(got[real], expected[real]) < TOL
    # each row gives what it gives alone, without its padding
    for row in range(3):
        alone = ids[row : row + 1, mask[row].bool()]
        with torch.no_grad():
            single = ours(alone).logits[0]
        assert max_abs_diff(single, got[row][real[row]]) < TOL


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_backends_agree_and_match_reference(tmp_path, attn):
    reference, ours = _load_pair(tmp_path, attn=attn)
    ids = _ids(batch=2, seq=9)
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, reference(ids).logits) < TOL


def test_hidden_states_and_attentions_match_eager_reference(tmp_path):
    reference, ours = _load_pair(tmp_path, attn="sdpa")
    reference.set_attn_implementation("eager")
    ids = _ids(batch=2, seq=7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        got = ours(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    for ours_h, ref_h in zip(got.hidden_states, expected.hidden_states):
        assert max_abs_diff(ours_h[mask.bool()], ref_h[mask.bool()]) < TOL
    assert len(got.attentions) == len(expected.attentions) == 2
    for ours_a, ref_a in zip(got.attentions, expected.attentions):
        assert ours_a.shape == ref_a.shape == (2, 4, 7, 7)
        assert max_abs_diff(ours_a[0], ref_a[0]) < TOL
        assert max_abs_diff(ours_a[1, :, 2:], ref_a[1, :, 2:]) < TOL
    # rows of attention weights sum to one, masked columns get nothing
    assert torch.allclose(got.attentions[0].sum(-1)[1, :, 2:], torch.ones(4, 5))
    assert got.attentions[0][1, :, 2:, :2].abs().max() == 0


def test_config_flags_request_outputs(tmp_path):
    reference = reference_llama()
    folder = save_reference(reference, tmp_path / "ckpt")
    ours = herd.LlamaForCausalLM.from_pretrained(folder, output_hidden_states=True, progress=False)
    out = ours(_ids(batch=1, seq=4))
    assert out.hidden_states is not None and len(out.hidden_states) == 3
    assert out.attentions is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_match_reference(tmp_path, dtype):
    reference = reference_llama()
    folder = save_reference(reference, tmp_path / "ckpt")
    import transformers

    reference = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ours = herd.LlamaForCausalLM.from_pretrained(folder, dtype=dtype, progress=False)
    assert ours.dtype == dtype and ours.config.dtype == str(dtype).removeprefix("torch.")
    ids = _ids()
    with torch.no_grad():
        got, expected = ours(ids).logits, reference(ids).logits
    assert got.dtype == expected.dtype == dtype
    tolerance = TOL if dtype == torch.float32 else 2e-2
    assert max_abs_diff(got, expected) < tolerance


def test_labels_loss_ignores_minus_100(tmp_path):
    reference, ours = _load_pair(tmp_path)
    ids = _ids(batch=2, seq=8)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 5:] = -100
    with torch.no_grad():
        got, expected = ours(ids, labels=labels), reference(ids, labels=labels)
    assert abs(got.loss.item() - expected.loss.item()) < TOL
    # hand check: mean next-token cross entropy over the kept labels
    logits = got.logits[:, :-1].reshape(-1, 128)
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    by_hand = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert abs(got.loss.item() - by_hand.item()) < 1e-5


@pytest.mark.parametrize("loss_kwargs", [
    dict(num_items_in_batch=7),  # a trainer accumulating gradients: the sum over tokens divided by it
    dict(num_items_in_batch=torch.tensor(11)),
    dict(ignore_index=5),
    dict(shift_labels="given"),
])
def test_trainers_loss_arguments_as_transformers(tmp_path, loss_kwargs):
    reference, ours = _load_pair(tmp_path)
    ids = _ids(batch=2, seq=8)
    labels = ids.clone()
    labels[0, :3] = loss_kwargs.get("ignore_index", -100)
    if loss_kwargs.get("shift_labels") == "given":
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].clone()
        shifted[1, 2] = -100
        loss_kwargs = dict(shift_labels=shifted)
    with torch.no_grad():
        got, expected = ours(ids, labels=labels, **loss_kwargs), reference(ids, labels=labels, **loss_kwargs)
    assert abs(got.loss.item() - expected.loss.item()) < TOL
    # each argument changes the loss (ignore_index: against the same labels with 5 a class like others)
    plain = ours(ids, labels=labels.masked_fill(labels == 5, 4) if "ignore_index" in loss_kwargs else labels).loss
    assert abs(got.loss.item() - plain.item()) > 1e-3


def test_logits_to_keep(tmp_path):
    reference, ours = _load_pair(tmp_path)
    ids = _ids(batch=2, seq=8)
    with torch.no_grad():
        full = ours(ids).logits
        last = ours(ids, logits_to_keep=1).logits
        picked = ours(ids, logits_to_keep=torch.tensor([0, 5])).logits
        ref_last = reference(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 128)
    assert max_abs_diff(last, full[:, -1:]) < TOL and max_abs_diff(last, ref_last) < TOL
    assert max_abs_diff(picked, full[:, [0, 5]]) < TOL


def test_inputs_embeds_same_as_input_ids(tmp_path):
    _, ours = _load_pair(tmp_path)
    ids = _ids(batch=2, seq=6)
    with torch.no_grad():
        embeds = ours.get_input_embeddings()(ids)
        assert max_abs_diff(ours(inputs_embeds=embeds).logits, ours(ids).logits) < TOL


def test_return_dict_false_gives_tuple(tmp_path):
    _, ours = _load_pair(tmp_path)
    ids = _ids(batch=1, seq=5)
    with torch.no_grad():
        out = ours(ids, return_dict=False, use_cache=False)
        as_dict = ours(ids, use_cache=False)
    assert isinstance(out, tuple) and len(out) == 1
    assert max_abs_diff(out[0], as_dict.logits) == 0
    assert as_dict[0] is as_dict.logits and as_dict["logits"] is as_dict.logits
    assert list(as_dict.keys()) == ["logits"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_position_ids_packed_sequences_match_reference(tmp_path, attn):
    reference, ours = _load_pair(tmp_path, attn=attn)
    reference.set_attn_implementation(attn)
    ids = _ids(batch=1, seq=10)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    with torch.no_grad():
        # Packed sequences are recognised without a cache (as in the reference).
        got = ours(ids, position_ids=position_ids, use_cache=False).logits
        expected = reference(ids, position_ids=position_ids, use_cache=False).logits
        second_alone = ours(ids[:, 4:7]).logits
    assert max_abs_diff(got, expected) < TOL
    assert max_abs_diff(got[:, 4:7], second_alone) < TOL


# --- the other heads ---------------------------------------------------------------------------


def test_base_model_matches_reference(tmp_path):
    reference, ours = _load_pair(tmp_path, "LlamaModel")
    ids = _ids()
    with torch.no_grad():
        assert max_abs_diff(ours(ids).last_hidden_state, reference(ids).last_hidden_state) < TOL


@pytest.mark.parametrize("padding", ["left", "right"])
def test_sequence_classification_pools_last_real_token(tmp_path, padding):
    reference, ours = _load_pair(tmp_path, "LlamaForSequenceClassification", num_labels=3)
    ids = _ids(batch=3, seq=8)
    lengths = [8, 5, 2]
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        if padding == "left":
            mask[row, 8 - length :] = 1
        else:
            mask[row, :length] = 1
    ids[mask == 0] = 0  # pad_token_id
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, labels=labels)
        expected = reference(ids, attention_mask=mask, labels=labels)
    assert got.logits.shape == (3, 3)
    assert max_abs_diff(got.logits, expected.logits) < TOL
    assert abs(got.loss.item() - expected.loss.item()) < TOL
    # by hand: the score of the last real token of each row
    with torch.no_grad():
        hidden = ours.model(ids, attention_mask=mask).last_hidden_state
    last = [7, 7, 7] if padding == "left" else [7, 4, 1]
    by_hand = ours.score(hidden[torch.arange(3), last])
    assert max_abs_diff(got.logits, by_hand) < TOL


def test_sequence_classification_regression_and_multilabel_losses(tmp_path):
    for num_labels, labels in ((1, torch.tensor([0.5, -1.0])), (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))):
        reference, ours = _load_pair(tmp_path / str(num_labels), "LlamaForSequenceClassification", num_labels=num_labels)
        ids = _ids(batch=2, seq=6)
        with torch.no_grad():
            got, expected = ours(ids, labels=labels), reference(ids, labels=labels)
        assert abs(got.loss.item() - expected.loss.item()) < TOL
        assert ours.config.problem_type == reference.config.problem_type


def test_sequence_classification_without_pad_token_refuses_batches(tmp_path):
    _, ours = _load_pair(tmp_path, "LlamaForSequenceClassification", pad_token_id=None)
    with pytest.raises(ValueError, match="pad_token_id"):
        ours(_ids(batch=2, seq=4))
    assert ours(_ids(batch=1, seq=4)).logits.shape == (1, 2)


def test_question_answering_matches_reference(tmp_path):
    reference, ours = _load_pair(tmp_path, "LlamaForQuestionAnswering")
    ids = _ids(batch=2, seq=9)
    start, end = torch.tensor([1, 3]), torch.tensor([4, 20])  # 20 is out of range: ignored
    with torch.no_grad():
        got = ours(ids, start_positions=start, end_positions=end)
        expected = reference(ids, start_positions=start, end_positions=end)
    assert got.start_logits.shape == got.end_logits.shape == (2, 9)
    assert max_abs_diff(got.start_logits, expected.start_logits) < TOL
    assert max_abs_diff(got.end_logits, expected.end_logits) < TOL
    assert abs(got.loss.item() - expected.loss.item()) < TOL


def test_token_classification_matches_reference(tmp_path):
    reference, ours = _load_pair(tmp_path, "LlamaForTokenClassification", num_labels=5)
    ids = _ids(batch=2, seq=7)
    labels = torch.randint(0, 5, (2, 7))
    labels[0, 0] = -100
    with torch.no_grad():
        got, expected = ours(ids, labels=labels), reference(ids, labels=labels)
    assert got.logits.shape == (2, 7, 5)
    assert max_abs_diff(got.logits, expected.logits) < TOL
    assert abs(got.loss.item() - expected.loss.item()) < TOL


def test_head_loaded_from_causal_lm_checkpoint_is_initialised_with_warning(tmp_path, caplog):
    reference = reference_llama()
    folder = save_reference(reference, tmp_path / "ckpt")
    with caplog.at_level("WARNING", logger="herd"):
        model = herd.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=4, progress=False)
    assert "score.weight" in caplog.text
    assert model.score.weight.shape == (4, 32) and model.score.weight.device.type == "cpu"
    # the backbone did load: same hidden states as the causal LM's backbone
    ids = _ids(batch=1, seq=5)
    with torch.no_grad():
        assert max_abs_diff(model.model(ids).last_hidden_state, reference.model(ids).last_hidden_state) < TOL
    qa = herd.AutoModelForQuestionAnswering.from_pretrained(folder, progress=False)
    with torch.no_grad():
        assert max_abs_diff(qa.transformer(ids).last_hidden_state, reference.model(ids).last_hidden_state) < TOL


# --- input errors ------------------------------------------------------------------------------


def test_input_ids_outside_vocabulary_is_a_clear_error(tmp_path):
    _, ours = _load_pair(tmp_path)
    with pytest.raises(IndexError, match="token id 128.*vocabulary"):
        ours(torch.tensor([[1, 2, 128]]))
    with pytest.raises(IndexError, match="token id -1"):
        ours(torch.tensor([[1, -1]]))


def test_bad_shapes_are_clear_errors(tmp_path):
    _, ours = _load_pair(tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        ours()
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\)"):
        ours(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask has 2 columns"):
        ours(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        ours(inputs_embeds=torch.zeros(1, 3, 7))
    with pytest.raises(TypeError, match="unexpected arguments: bogus"):
        ours(torch.tensor([[1, 2]]), bogus=1)


def test_model_built_from_config_is_randomly_initialised_and_runs():
    config = herd.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, tie_word_embeddings=True)
    model = herd.LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    std = model.model.layers[0].self_attn.q_proj.weight.std().item()
    assert 0.01 < std < 0.03  # initializer_range 0.02
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
    assert herd.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).dtype == torch.bfloat16
