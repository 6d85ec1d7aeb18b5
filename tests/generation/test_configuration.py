"""GenerationConfig: files, defaults, validation."""

from __future__ import annotations

import json

import pytest

from herd.generation import GenerationConfig


def test_reads_llama3_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
        "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.45.0.dev0"}))
    config = GenerationConfig.from_pretrained(tmp_path)
    assert config.eos_token_id == [128001, 128008, 128009] and config.do_sample and config.temperature == 0.6
    merged = config.merged_with(None)
    assert merged.top_k == 50 and merged.max_length == 20 and merged.top_p == 0.9
    config.save_pretrained(tmp_path / "out")
    assert GenerationConfig.from_pretrained(tmp_path / "out") == config


def test_user_values_win_over_model_defaults():
    model_defaults = GenerationConfig(temperature=0.6, max_new_tokens=100)
    call = GenerationConfig()
    unused = call.update(temperature=0.9, foo=1)
    assert unused == {"foo": 1}
    merged = call.merged_with(model_defaults)
    assert merged.temperature == 0.9 and merged.max_new_tokens == 100


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(do_sample=True, top_p=1.5), "top_p must be in"),
    (dict(do_sample=True, top_p=-0.1), "top_p must be in"),
    (dict(do_sample=True, top_k=-1), "top_k must be a non-negative"),
    (dict(do_sample=True, min_p=2.0), "min_p must be in"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(num_return_sequences=2), "num_return_sequences > 1 needs"),
    (dict(num_beams=2, num_return_sequences=3), "cannot exceed num_beams"),
    (dict(num_beams=0), "num_beams must be a positive"),
    (dict(cache_implementation="paged"), "cache_implementation"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(do_sample=True, typical_p=0.0), r"typical_p must be in \(0, 1\]"),
    (dict(do_sample=True, typical_p=1.5), r"typical_p must be in \(0, 1\]"),
    (dict(do_sample=True, top_h=0.0), "top_h must be in"),
    (dict(do_sample=True, epsilon_cutoff=1.0), "epsilon_cutoff must be in"),
    (dict(do_sample=True, eta_cutoff=-0.1), "eta_cutoff must be in"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be"),
    (dict(suppress_tokens=3), "suppress_tokens must be a list"),
    (dict(exponential_decay_length_penalty=(5,)), "exponential_decay_length_penalty must be"),
    (dict(forced_eos_token_id=[2], suppress_tokens=[2, 3]), "also in suppress_tokens"),
])
def test_bad_values_are_clear_errors(kwargs, message):
    config = GenerationConfig()
    config.update(**kwargs)
    with pytest.raises(ValueError, match=message):
        config.merged_with(None).validate()


@pytest.mark.parametrize("option, value, why", [
    ("num_beam_groups", 2, "removed from transformers 5"),
    ("constraints", ["x"], "removed from transformers 5"),
    ("prompt_lookup_num_tokens", 3, "not implemented by herd"),
])
def test_unsupported_options_are_refused_not_ignored(option, value, why):
    with pytest.raises(NotImplementedError, match=f"{option}.*{why}"):
        GenerationConfig().update(**{option: value})
    with pytest.raises(NotImplementedError, match=f"{option}.*{why}"):
        GenerationConfig(**{option: value}).validate()
    GenerationConfig().update(**{option: 0})  # "off" is fine


def test_get_generation_mode_as_in_transformers():
    """GenerationConfig.get_generation_mode() (herd had none): the same GenerationMode for every mix of
    the flags that choose it, the modes herd refuses included."""
    import itertools
    import logging

    import transformers

    from herd.generation import GenerationMode

    flags = dict(num_beams=[1, 3], do_sample=[None, True], top_k=[None, 4], penalty_alpha=[None, 0.6],
                 num_beam_groups=[None, 3], force_words_ids=[None, [[3]]], prompt_lookup_num_tokens=[None, 3],
                 dola_layers=[None, "low"])
    logging.disable(logging.WARNING)
    try:
        for values in itertools.product(*flags.values()):
            kwargs = {name: value for name, value in zip(flags, values) if value is not None}
            expected = transformers.GenerationConfig(**kwargs).get_generation_mode()
            got = GenerationConfig(**kwargs).get_generation_mode()
            assert isinstance(got, GenerationMode) and got == expected.value, kwargs
        assert GenerationConfig().get_generation_mode(assistant_model=object()) == "assisted_generation"
    finally:
        logging.disable(logging.NOTSET)
