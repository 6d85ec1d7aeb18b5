"""Less common generate() options and GenerationConfig, against transformers (the oracle).

Tiny float32 Llama on the CPU, greedy and seeded sampling: tokens and processed scores (output_scores)
and raw logits (output_logits) equal; the warpers' filter_value; GenerationConfig's validate()
warnings and errors, update(), from_pretrained/save_pretrained/to_json_string round trips.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

import herd
from herd.generation import GenerationConfig
from herd.generation import configuration as herd_configuration
from tests.conftest import left_padded_prompts, reference_llama, save_reference

PAD = 0
VOCAB = 192
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=96)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = reference_llama(**SMALL, seed=11)
    folder = save_reference(reference, tmp_path_factory.mktemp("audit9") / "ckpt")
    return reference, herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


@pytest.fixture(scope="module")
def prompts():
    return left_padded_prompts((8, 5, 2), VOCAB, 3, PAD)


@pytest.fixture(scope="module")
def free(pair, prompts):
    """The reference's greedy tokens with no option (batch, 6): what the options below aim at."""
    ids, mask = prompts
    return pair[0].generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=6)[:, ids.shape[1]:].tolist()


def _run(model, ids, mask, seed, kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(ids, attention_mask=mask, pad_token_id=PAD, return_dict_in_generate=True,
                          output_scores=True, output_logits=True, **kwargs)


def _same(got, expected):
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == len(got.logits)
    for mine, theirs in zip(got.scores, expected.scores):
        assert torch.equal(torch.isneginf(mine), torch.isneginf(theirs))
        assert torch.equal(torch.isposinf(mine), torch.isposinf(theirs))
        finite = torch.isfinite(theirs)
        assert (mine[finite] - theirs[finite]).abs().max().item() < 1e-4
    for mine, theirs in zip(got.logits, expected.logits):
        assert (mine - theirs).abs().max().item() < 1e-4


# name -> (seed or None for greedy, kwargs built from the free greedy tokens `w`)
CASES = {
    "encoder_repetition_penalty_below_one": (None, lambda w: dict(encoder_repetition_penalty=0.4)),
    "encoder_and_plain_repetition_penalty": (4, lambda w: dict(do_sample=True, encoder_repetition_penalty=2.0,
                                                               repetition_penalty=0.8, top_k=0)),
    "no_repeat_ngram_3_sampling": (5, lambda w: dict(do_sample=True, no_repeat_ngram_size=3, max_new_tokens=10)),
    "bad_words_overlapping": (None, lambda w: dict(bad_words_ids=[[w[0][0], w[0][1]], [w[0][1], w[0][2], w[0][3]],
                                                                  [w[0][1]], [w[1][2], w[1][3]]])),
    "bad_words_lone_eos_kept": (None, lambda w: dict(bad_words_ids=[[w[0][0]], [w[1][1]]], eos_token_id=w[1][1])),
    "sequence_bias_overlapping": (None, lambda w: dict(sequence_bias={(w[0][0],): -1.0, (w[0][0], w[0][1]): -6.0,
                                                                      (w[0][1],): 0.5, (w[1][0], w[1][1]): -20.0})),
    "forced_eos_int_with_max_length": (None, lambda w: dict(max_length=12, max_new_tokens=None, forced_eos_token_id=9)),
    "forced_eos_list_and_bos": (None, lambda w: dict(forced_eos_token_id=[5, 6], forced_bos_token_id=4,
                                                     eos_token_id=[5])),
    "exponential_decay_int_eos": (None, lambda w: dict(exponential_decay_length_penalty=(0, 1.5), eos_token_id=w[0][4])),
    "min_length_several_eos": (None, lambda w: dict(min_length=11, eos_token_id=[w[0][1], w[1][1], w[2][1]])),
    "min_new_tokens_several_eos_sampling": (6, lambda w: dict(do_sample=True, min_new_tokens=3, top_k=0,
                                                              eos_token_id=[w[0][1], w[1][1], w[2][1]])),
    "suppress_and_begin_suppress": (None, lambda w: dict(suppress_tokens=[w[0][1], w[1][2]],
                                                         begin_suppress_tokens=[w[0][0], w[2][0]])),
    "top_k_top_p_temperature": (8, lambda w: dict(do_sample=True, top_k=6, top_p=0.7, temperature=0.6)),
    "top_k_top_p_hot": (8, lambda w: dict(do_sample=True, top_k=3, top_p=0.95, temperature=2.5)),
    "typical_epsilon_eta": (9, lambda w: dict(do_sample=True, typical_p=0.9, epsilon_cutoff=0.003, eta_cutoff=0.002,
                                              top_k=0)),
    "min_p_renormalize": (10, lambda w: dict(do_sample=True, min_p=0.2, renormalize_logits=True)),
    "remove_invalid_values_greedy": (None, lambda w: dict(remove_invalid_values=True, min_new_tokens=2,
                                                          eos_token_id=[w[0][0], w[1][0]])),
    "eos_list_finishing_rows": (None, lambda w: dict(eos_token_id=[w[0][2], w[1][3]])),
    "beam_sample_several_eos": (12, lambda w: dict(do_sample=True, num_beams=2, top_k=4, top_p=0.8,
                                                   eos_token_id=[w[0][2], w[1][3], 3])),
    "num_return_sequences_with_ngram": (13, lambda w: dict(do_sample=True, num_return_sequences=2,
                                                           no_repeat_ngram_size=2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_uncommon_options_match_reference(pair, prompts, free, case):
    reference, ours = pair
    ids, mask = prompts
    if "repetition_penalty" in case:
        # unpadded: transformers 5.17 penalises the left padding's pad id too, herd does not (deliberate,
        # test_options.py::test_repetition_penalty_does_not_count_left_padding)
        ids, mask = left_padded_prompts((7, 7, 7), VOCAB, 4, PAD)
    seed, build = CASES[case]
    kwargs = dict(max_new_tokens=6)
    kwargs.update(build(free))
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    expected = _run(reference, ids, mask, seed, kwargs)
    got = _run(ours, ids, mask, seed, kwargs)
    _same(got, expected)


def test_pad_token_unset_finishes_rows_with_the_first_eos(pair, prompts, free):
    """No pad_token_id anywhere: finished rows are filled with the first eos id, as in the reference."""
    reference, ours = pair
    ids, mask = prompts
    saved = reference.generation_config.pad_token_id, ours.generation_config.pad_token_id
    try:
        reference.generation_config.pad_token_id = ours.generation_config.pad_token_id = None
        kwargs = dict(max_new_tokens=6, eos_token_id=[free[1][1], free[0][3]])
        expected = reference.generate(ids, attention_mask=mask, **kwargs)
        got = ours.generate(ids, attention_mask=mask, **kwargs)
    finally:
        reference.generation_config.pad_token_id, ours.generation_config.pad_token_id = saved
    assert torch.equal(got, expected)
    assert got[1, ids.shape[1] + 2:].tolist() == [free[1][1]] * 4  # row 1 stopped at its second token


def test_max_time_zero_stops_after_one_token(pair, prompts):
    reference, ours = pair
    ids, mask = prompts
    expected = reference.generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=6, max_time=0.0)
    got = ours.generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=6, max_time=0.0)
    assert torch.equal(got, expected) and got.shape[1] == ids.shape[1] + 1


# --- the warpers' filter_value -----------------------------------------------------------------

@pytest.mark.parametrize("name, args", [
    ("TopKLogitsWarper", dict(top_k=3, filter_value=-100.0, min_tokens_to_keep=2)),
    ("TopPLogitsWarper", dict(top_p=0.5, filter_value=-7.0, min_tokens_to_keep=2)),
    ("MinPLogitsWarper", dict(min_p=0.3, filter_value=-50.0)),
    ("TypicalLogitsWarper", dict(mass=0.3, filter_value=-9.0)),
    ("EpsilonLogitsWarper", dict(epsilon=0.05, filter_value=-5.0, min_tokens_to_keep=4)),
    ("EtaLogitsWarper", dict(epsilon=0.2, filter_value=-3.0)),
    ("TopHLogitsWarper", dict(top_h=0.5, filter_value=-3.0)),
])
def test_filter_value_replaces_every_removed_token(name, args):
    """Tokens a warper removes get filter_value, those already at -inf too (herd kept those at -inf)."""
    from transformers.generation import logits_process as reference

    from herd.generation import logits_process as ours

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 40, generator=generator) * 3
    ids = torch.randint(0, 40, (3, 6), generator=generator)
    for logits in (scores, scores.masked_fill(scores < -1, -float("inf"))):
        expected = getattr(reference, name)(**args)(ids, logits.clone())
        got = getattr(ours, name)(**args)(ids, logits.clone())
        assert torch.equal(got, expected), name
    assert not torch.isneginf(got).any()  # the -inf scores were removed and got filter_value


# --- GenerationConfig ----------------------------------------------------------------------------

# how each library's strict validation names a field in its error: "- `name`" (transformers), "- name:" (herd)
REFERENCE_ISSUE = r"^- `(\w+)`"
OUR_ISSUE = r"^- (\w+):"


def _issues(config, pattern: str) -> set[str]:
    """The fields that config.validate(strict=True) names in its error (none when it passes)."""
    try:
        config.validate(strict=True)
    except ValueError as error:
        return set(re.findall(pattern, str(error), flags=re.M))
    return set()


CONTRADICTIONS = [
    dict(do_sample=False, temperature=0.5),
    dict(temperature=0.7, top_p=0.9, top_k=10, min_p=0.1, typical_p=0.5, epsilon_cutoff=0.1, eta_cutoff=0.1),
    dict(do_sample=True, temperature=0.5, top_k=50, top_p=1.0),
    dict(num_beams=1, early_stopping=True, length_penalty=2.0),
    dict(num_beams=2, early_stopping=True, length_penalty=2.0),
    dict(output_scores=True, output_logits=True),
    dict(output_scores=True, return_dict_in_generate=True),
    dict(use_cache=False, cache_implementation="static"),
    dict(pad_token_id=-1),
    dict(max_new_tokens=5, eos_token_id=[1, 2]),
]


@pytest.mark.parametrize("kwargs", CONTRADICTIONS, ids=lambda kwargs: "-".join(kwargs))
def test_validate_flags_what_the_reference_flags(kwargs, caplog):
    import transformers

    expected = _issues(transformers.GenerationConfig(**kwargs), REFERENCE_ISSUE)
    config = GenerationConfig(**kwargs)
    assert _issues(config, OUR_ISSUE) == expected
    herd_configuration._warned.clear()
    with caplog.at_level(logging.WARNING, logger="herd"):
        config.validate()  # not strict: a warning, no error
    assert all(name in caplog.text for name in expected) and (bool(expected) == ("not valid" in caplog.text))


def test_construction_warns_about_the_flags_given(caplog):
    herd_configuration._warned.clear()
    with caplog.at_level(logging.WARNING, logger="herd"):
        GenerationConfig(do_sample=True, temperature=0.5)
    assert "may be ignored" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="herd"):
        GenerationConfig(temperature=0.5, length_penalty=2.0)
    assert "may be ignored: ['temperature', 'length_penalty']" in caplog.text


def test_validate_on_a_config_with_unset_fields():
    """Fields left unset (None) are valid, as in the reference (herd refused num_beams=None)."""
    GenerationConfig().validate()
    GenerationConfig(max_new_tokens=4).validate(strict=True)
    with pytest.raises(ValueError, match="not a GenerationConfig field"):
        GenerationConfig(logits_processor=[]).validate()


def test_save_pretrained_refuses_what_strict_validation_refuses(tmp_path):
    import transformers

    for cls in (transformers.GenerationConfig, GenerationConfig):
        with pytest.raises(ValueError, match="Fix these issues to save"):
            cls(temperature=0.3).save_pretrained(tmp_path / cls.__module__)
        cls(do_sample=True, temperature=0.3).save_pretrained(tmp_path / cls.__module__)


def test_generate_warns_only_about_flags_the_caller_set(pair, prompts, caplog):
    """As the reference's generate() (update() then validate(), warning about flags the call set, or that
    nobody set the mode for): do_sample=False over a model's sampling defaults is quiet, temperature
    named in a greedy call warns. (Expected flags worked out from transformers' _should_warn.)"""
    _, ours = pair
    ids, mask = prompts
    saved = ours.generation_config
    cases = [  # (model's generation_config, call, flags the warning names)
        (dict(temperature=0.6, top_p=0.9), {}, {"temperature", "top_p"}),
        (dict(temperature=0.6, top_p=0.9), dict(do_sample=False), set()),
        (dict(temperature=0.6, top_p=0.9), dict(do_sample=True), set()),
        (dict(temperature=0.6, top_p=0.9), dict(temperature=0.4), {"temperature", "top_p"}),
        (dict(do_sample=True, temperature=0.6, top_p=0.9), dict(do_sample=False), set()),
        (dict(do_sample=True, temperature=0.6, top_p=0.9), dict(do_sample=False, temperature=0.4), {"temperature"}),
        (dict(do_sample=True, temperature=0.6), dict(output_scores=True), {"output_scores"}),
    ]
    try:
        for model_defaults, kwargs, flagged in cases:
            ours.generation_config = GenerationConfig(eos_token_id=2, bos_token_id=1, pad_token_id=PAD, **model_defaults)
            herd_configuration._warned.clear()
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="herd"):
                ours.generate(ids, attention_mask=mask, max_new_tokens=2, **kwargs)
            named = set(re.findall(r"may be ignored: \[(.*?)\]", caplog.text)[0].replace("'", "").split(", ")) \
                if "may be ignored" in caplog.text else set()
            assert named == flagged, (model_defaults, kwargs)
    finally:
        ours.generation_config = saved


def test_update_returns_what_is_not_a_field():
    import transformers

    for cls in (transformers.GenerationConfig, GenerationConfig):
        config = cls()
        assert config.update(do_sample=True, temperature=0.5, colour="red", attention_mask=None) == \
            {"colour": "red", "attention_mask": None}
        assert config.temperature == 0.5 and config.do_sample is True


def test_file_with_unknown_keys_round_trips(tmp_path):
    import transformers

    values = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "eos_token_id": [2, 3], "max_new_tokens": 12,
              "my_custom_key": {"a": 1}, "sequence_bias": [[[5, 6], -2.0]], "transformers_version": "4.40.0"}
    (tmp_path / "generation_config.json").write_text(json.dumps(values))
    expected = transformers.GenerationConfig.from_pretrained(tmp_path, top_k=3, foo=1, return_unused_kwargs=True)
    got = GenerationConfig.from_pretrained(tmp_path, top_k=3, foo=1, return_unused_kwargs=True)
    assert isinstance(got, tuple) and got[1] == expected[1]
    got, expected = got[0], expected[0]
    assert got.my_custom_key == expected.my_custom_key == {"a": 1} and got.foo == expected.foo == 1

    def without_version(text):
        return {key: value for key, value in json.loads(text).items() if key != "transformers_version"}

    assert without_version(got.to_json_string()) == without_version(expected.to_json_string())
    got.save_pretrained(tmp_path / "ours")
    assert GenerationConfig.from_pretrained(tmp_path / "ours") == got
    # transformers reads what herd wrote
    again = transformers.GenerationConfig.from_pretrained(tmp_path / "ours")
    assert without_version(again.to_json_string()) == without_version(expected.to_json_string())
    assert "return_unused_kwargs" not in got.to_dict()
