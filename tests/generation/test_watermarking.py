"""Watermarking (generate(watermarking_config=...)) and its detectors, against transformers.

Green lists and g-values come from seeded torch generators, so the watermarked scores must be
transformers' own: the processors are compared bit for bit on the same inputs, and generate() token
for token and score for score. Each generate() check also asserts that the watermark changed the
scores, so a processor that silently does nothing fails.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import herd
from herd.generation import watermarking as wm
from tests.conftest import left_padded_prompts, reference_llama, save_reference
from tests.generation.test_options import _run, _same_scores  # the same comparison as every generate option

PAD = 0
VOCAB = 100

# name -> (config class name, fields): the same fields build herd's and transformers' config
KINDS = {
    "lefthash": ("WatermarkingConfig", dict()),
    "lefthash_width2": ("WatermarkingConfig", dict(context_width=2, bias=3.0, greenlist_ratio=0.4)),
    "selfhash": ("WatermarkingConfig", dict(seeding_scheme="selfhash")),
    "selfhash_width3": ("WatermarkingConfig", dict(seeding_scheme="selfhash", context_width=3, hashing_key=12345)),
    "synthid": ("SynthIDTextWatermarkingConfig", dict(ngram_len=3, keys=[654, 400, 836, 123])),
    "synthid_skip_short_history": ("SynthIDTextWatermarkingConfig",
                                   dict(ngram_len=2, keys=[7, 11], context_history_size=3, skip_first_ngram_calls=True,
                                        sampling_table_seed=5, sampling_table_size=1000)),
}


def _configs(kind):
    import transformers

    name, fields = KINDS[kind]
    return getattr(herd, name)(**fields), getattr(transformers, name)(**fields)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    reference = reference_llama(vocab_size=VOCAB, max_position_embeddings=128, seed=11)
    return save_reference(reference, tmp_path_factory.mktemp("watermark") / "ckpt"), reference


@pytest.fixture(scope="module")
def pair(checkpoint):
    folder, reference = checkpoint
    return reference, herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


SEARCHES = {
    "greedy": dict(),
    "sampling": dict(do_sample=True),  # top_k=50 by default: selfhash meets -inf among its 40 candidates
    "beams": dict(num_beams=2),
    "beam_sampling": dict(do_sample=True, num_beams=2, top_k=0),
}


@pytest.mark.parametrize("search", sorted(SEARCHES))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_generate_matches_reference(pair, kind, search):
    reference, ours = pair
    ids, mask = left_padded_prompts((9, 5, 2), VOCAB, seed=1, pad=PAD)
    mine, theirs = _configs(kind)
    kwargs = dict(SEARCHES[search], max_new_tokens=8)
    seed = 3 if kwargs.get("do_sample") else None
    expected = _run(reference, ids, mask, seed, dict(kwargs, watermarking_config=theirs))
    got = _run(ours, ids, mask, seed, dict(kwargs, watermarking_config=mine))
    assert torch.equal(got.sequences, expected.sequences)
    _same_scores(got.scores, expected.scores)
    plain = _run(ours, ids, mask, seed, kwargs)
    assert any(not torch.equal(a, b) for a, b in zip(got.scores, plain.scores)), "the watermark changed nothing"


@pytest.mark.parametrize("kind", ["lefthash_width2", "selfhash_width3"])
def test_a_dict_is_a_watermarking_config(pair, kind):
    """generate(watermarking_config={...}) reads the dict as transformers does (a WatermarkingConfig)."""
    reference, ours = pair
    ids, mask = left_padded_prompts((6, 3), VOCAB, seed=2, pad=PAD)
    fields = KINDS[kind][1]
    expected = _run(reference, ids, mask, 4, dict(do_sample=True, max_new_tokens=6, watermarking_config=dict(fields)))
    got = _run(ours, ids, mask, 4, dict(do_sample=True, max_new_tokens=6, watermarking_config=dict(fields)))
    assert torch.equal(got.sequences, expected.sequences)
    _same_scores(got.scores, expected.scores)


def test_with_renormalize_and_warpers_in_the_reference_order(pair):
    """Watermarking after the warpers (temperature, top_k) and before renormalize_logits: another order
    gives other scores. (Unpadded rows: transformers 5.17 penalises left padding, herd does not.)"""
    reference, ours = pair
    ids, mask = left_padded_prompts((7, 7), VOCAB, seed=3, pad=PAD)
    for kind in ("selfhash", "synthid"):
        mine, theirs = _configs(kind)
        kwargs = dict(do_sample=True, temperature=0.7, top_k=30, renormalize_logits=True, max_new_tokens=6,
                      repetition_penalty=1.3)
        expected = _run(reference, ids, mask, 8, dict(kwargs, watermarking_config=theirs))
        got = _run(ours, ids, mask, 8, dict(kwargs, watermarking_config=mine))
        assert torch.equal(got.sequences, expected.sequences)
        _same_scores(got.scores, expected.scores)


def test_a_context_wider_than_the_prompt_waits(pair, caplog):
    """Fewer tokens than context_width: no bias (and a warning) until there are enough, as transformers."""
    reference, ours = pair
    ids = torch.tensor([[17], [42]])
    mine, theirs = (cls(context_width=3) for cls in (herd.WatermarkingConfig, __import__("transformers").WatermarkingConfig))
    expected = _run(reference, ids, torch.ones_like(ids), None, dict(max_new_tokens=5, watermarking_config=theirs))
    with caplog.at_level(logging.WARNING, logger="herd"):
        got = _run(ours, ids, torch.ones_like(ids), None, dict(max_new_tokens=5, watermarking_config=mine))
    assert "at least 3 tokens" in caplog.text
    assert torch.equal(got.sequences, expected.sequences)
    _same_scores(got.scores, expected.scores)
    plain = _run(ours, ids, torch.ones_like(ids), None, dict(max_new_tokens=5))
    assert torch.equal(got.scores[0], plain.scores[0]) and torch.equal(got.scores[1], plain.scores[1])
    assert not torch.equal(got.scores[2], plain.scores[2])


def test_num_return_sequences_and_eos(pair):
    """Rows repeated for num_return_sequences, finishing at eos at different steps (then padded)."""
    reference, ours = pair
    ids, mask = left_padded_prompts((5, 3), VOCAB, seed=4, pad=PAD)
    for kind in ("lefthash", "synthid"):
        mine, theirs = _configs(kind)
        kwargs = dict(do_sample=True, num_return_sequences=3, max_new_tokens=10, eos_token_id=list(range(1, 12)))
        expected = _run(reference, ids, mask, 6, dict(kwargs, watermarking_config=theirs))
        got = _run(ours, ids, mask, 6, dict(kwargs, watermarking_config=mine))
        assert torch.equal(got.sequences, expected.sequences)
        _same_scores(got.scores, expected.scores)
        assert bool((got.sequences[:, -1] == PAD).any())  # some row did stop early


def test_the_model_default_from_generation_config_json(pair, tmp_path):
    """A watermarking_config in a checkpoint's generation_config.json applies without being passed."""
    import transformers

    reference, _ = pair
    reference.generation_config.watermarking_config = transformers.WatermarkingConfig(seeding_scheme="selfhash", bias=5.0)
    try:
        folder = save_reference(reference, tmp_path / "wm")
        expected = reference.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, output_scores=True,
                                      return_dict_in_generate=True)
    finally:
        reference.generation_config.watermarking_config = None
    ours = herd.LlamaForCausalLM.from_pretrained(folder, progress=False)
    assert ours.generation_config.watermarking_config == herd.WatermarkingConfig(seeding_scheme="selfhash", bias=5.0)
    got = ours.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    _same_scores(got.scores, expected.scores)


# --- the processors on their own -------------------------------------------------------------------

def _inputs(seed, batch=4, length=9, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, vocab, generator=generator) * 3
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    ids[1, -1] = ids[2, -1]  # two rows with the same last token (lefthash draws their list once)
    return ids, scores


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fields", [
    dict(), dict(context_width=2), dict(greenlist_ratio=0.6, bias=0.5, hashing_key=99991),
    dict(seeding_scheme="selfhash"), dict(seeding_scheme="selfhash", context_width=2),
    dict(seeding_scheme="selfhash", context_width=4, greenlist_ratio=0.1, hashing_key=2**40 + 3),
])
def test_green_list_processor_equals_reference_bit_for_bit(seed, fields):
    from transformers.generation.logits_process import WatermarkLogitsProcessor

    ids, scores = _inputs(seed)
    filtered = scores.masked_fill(scores < 1.0, -float("inf"))  # fewer than 40 finite candidates: ties at -inf
    for values in (scores, filtered):
        theirs = WatermarkLogitsProcessor(VOCAB, "cpu", **fields)(ids, values.clone())
        ours = wm.WatermarkLogitsProcessor(VOCAB, "cpu", **fields)(ids, values.clone())
        assert torch.equal(ours, theirs)
        assert not torch.equal(ours, values)


def test_green_list_by_hand():
    """lefthash: the first int(vocab * ratio) of randperm(vocab) right after seeding with key * last token."""
    processor = wm.WatermarkLogitsProcessor(50, "cpu", greenlist_ratio=0.2, bias=1.5, hashing_key=7)
    ids, scores = torch.tensor([[4, 9], [1, 3]]), torch.zeros(2, 50)
    got = processor(ids, scores)
    for row, last in enumerate((9, 3)):
        green = torch.randperm(50, generator=torch.Generator().manual_seed(7 * last))[:10]
        expected = torch.zeros(50)
        expected[green] = 1.5
        assert torch.equal(got[row], expected)


def test_synthid_processor_equals_reference_step_by_step():
    """The state across steps (context, history of contexts, call count) as transformers keeps it, with
    repeated contexts (skipped), debug_mode and skip_first_ngram_calls."""
    from transformers.generation.logits_process import (
        SynthIDTextWatermarkLogitsProcessor as Reference,
    )

    for fields in (dict(ngram_len=3, keys=[654, 400, 836], context_history_size=1024),
                   dict(ngram_len=2, keys=[1, 2, 3, 4, 5], context_history_size=2, skip_first_ngram_calls=True),
                   dict(ngram_len=4, keys=[9], context_history_size=16, debug_mode=True)):
        table = dict(sampling_table_size=2**12, sampling_table_seed=3)
        theirs = Reference(**fields, **table, device="cpu")
        ours = wm.SynthIDTextWatermarkLogitsProcessor(**fields, **table, device="cpu")
        ids, _ = _inputs(0, batch=3, length=4)
        generator = torch.Generator().manual_seed(1)
        repeats = 0
        for step in range(12):
            scores = torch.randn(3, VOCAB, generator=generator)
            scores[0, :5] = -float("inf")  # as after top_k: no probability there
            expected, got = theirs(ids, scores.clone()), ours(ids, scores.clone())
            assert torch.equal(got, expected), (fields, step)
            unchanged = torch.ones_like(scores) if fields.get("debug_mode") else scores  # debug_mode: uniform first
            repeats += int((got == unchanged).all(dim=1).sum())
            # tokens 1, 2, 1, 2, ... on row 0: its contexts repeat
            nxt = torch.tensor([[1 + step % 2], [int(torch.randint(0, VOCAB, (1,), generator=generator))], [step]])
            ids = torch.cat([ids, nxt], dim=1)
        assert repeats > 0  # some step left a row alone (a repeated context, a skipped call)
        assert torch.equal(ours.state.context_history, theirs.state.context_history)


def test_synthid_detection_helpers_equal_reference():
    from transformers.generation.logits_process import (
        SynthIDTextWatermarkLogitsProcessor as Reference,
    )

    fields = dict(ngram_len=3, keys=[5, 6, 7], sampling_table_size=2**16, sampling_table_seed=0, context_history_size=4,
                  device="cpu")
    theirs, ours = Reference(**fields), wm.SynthIDTextWatermarkLogitsProcessor(**fields)
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))
    ids[0, 5:] = torch.tensor([8, 9] * 7 + [3])  # a context repeating every 2 tokens
    ids[1, 12] = ids[2, 3] = 42  # eos at different places
    assert torch.equal(ours.compute_g_values(ids), theirs.compute_g_values(ids))
    mask = ours.compute_context_repetition_mask(ids)
    assert torch.equal(mask, theirs.compute_context_repetition_mask(ids)) and not bool(mask.all())
    assert torch.equal(ours.compute_eos_token_mask(ids, 42), theirs.compute_eos_token_mask(ids, 42))
    assert ours.expected_mean_g_value(VOCAB) == theirs.expected_mean_g_value(VOCAB)
    ngrams = ids.unfold(1, 3, 1)
    assert torch.equal(ours.compute_ngram_keys(ngrams), theirs.compute_ngram_keys(ngrams))


def test_synthid_detector_runs_the_given_module_on_reference_inputs():
    """herd has no trained Bayesian detector; SynthIDTextWatermarkDetector feeds the module the same
    g-values and mask as transformers'."""
    from transformers import SynthIDTextWatermarkDetector as Reference
    from transformers.generation.logits_process import (
        SynthIDTextWatermarkLogitsProcessor as ReferenceProcessor,
    )

    class Tokenizer:
        eos_token_id = 42

    fields = dict(ngram_len=3, keys=[5, 6], sampling_table_size=2**16, sampling_table_seed=0, context_history_size=8,
                  device="cpu")
    module = lambda g_values, mask: (g_values, mask)
    ids = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(3))
    ids[0, 9] = 42
    ours = herd.SynthIDTextWatermarkDetector(module, wm.SynthIDTextWatermarkLogitsProcessor(**fields), Tokenizer())
    theirs = Reference(module, ReferenceProcessor(**fields), Tokenizer())
    (g_ours, mask_ours), (g_theirs, mask_theirs) = ours(ids), theirs(ids)
    assert torch.equal(g_ours, g_theirs) and torch.equal(mask_ours, mask_theirs)
    assert not bool(mask_ours[0].all())


# --- the detector ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [dict(bias=4.0), dict(bias=4.0, context_width=2),
                                    dict(bias=4.0, seeding_scheme="selfhash"),
                                    dict(bias=4.0, seeding_scheme="selfhash", context_width=3)])
def test_detector_equals_reference(pair, fields):
    """z-scores (and every other output) equal transformers' on watermarked and on plain text; the
    watermarked text is detected, the plain one is not."""
    import transformers

    reference, ours = pair
    ids, mask = left_padded_prompts((6, 6), VOCAB, seed=5, pad=PAD)
    kwargs = dict(max_new_tokens=40, do_sample=True, top_k=0)
    torch.manual_seed(0)
    marked = ours.generate(ids, attention_mask=mask, watermarking_config=herd.WatermarkingConfig(**fields), **kwargs)
    torch.manual_seed(0)
    plain = ours.generate(ids, attention_mask=mask, **kwargs)
    detector = herd.WatermarkDetector(ours.config, "cpu", herd.WatermarkingConfig(**fields))
    expected_detector = transformers.WatermarkDetector(reference.config, "cpu", transformers.WatermarkingConfig(**fields))
    outputs = {}
    for name, text in (("marked", marked[:, 6:]), ("plain", plain[:, 6:])):
        got, expected = detector(text, return_dict=True), expected_detector(text, return_dict=True)
        for field in ("num_tokens_scored", "num_green_tokens", "green_fraction", "z_score", "p_value", "prediction",
                      "confidence"):
            assert np.array_equal(getattr(got, field), getattr(expected, field)), field
        assert np.array_equal(detector(text, z_threshold=1.0), expected_detector(text, z_threshold=1.0))
        outputs[name] = got
    assert outputs["marked"].prediction.all() and not outputs["plain"].prediction.any()


def test_detector_drops_a_leading_bos_and_refuses_too_little():
    config = herd.LlamaConfig(vocab_size=VOCAB, bos_token_id=1)
    detector = herd.WatermarkDetector(config, "cpu", dict(context_width=2))
    text = torch.tensor([[1, 5, 6, 7, 8]])
    assert detector(text, return_dict=True).num_tokens_scored.tolist() == [2.0]  # 5 6 seed, 7 and 8 scored
    with pytest.raises(ValueError, match="nothing to score"):
        detector(torch.tensor([[1, 5, 6]]))
    with pytest.raises(TypeError, match="green-list watermark"):
        herd.WatermarkDetector(config, "cpu", herd.SynthIDTextWatermarkingConfig(ngram_len=2, keys=[1]))


def test_detector_ignore_repeated_ngrams_counts_each_ngram_once():
    """Documented by transformers but without effect there (its n-grams are tensors, which never compare
    equal as dict keys); herd scores each distinct n-gram once."""
    config = herd.LlamaConfig(vocab_size=VOCAB, bos_token_id=1)
    text = torch.tensor([[5, 6] * 6])  # n-grams (5, 6) and (6, 5), 11 of them
    every = herd.WatermarkDetector(config, "cpu", herd.WatermarkingConfig())(text, return_dict=True)
    once = herd.WatermarkDetector(config, "cpu", herd.WatermarkingConfig(), ignore_repeated_ngrams=True)(text, return_dict=True)
    processor = wm.WatermarkLogitsProcessor(VOCAB, "cpu")
    green = [bool((processor.greenlist(15485863 * a) == b).any()) for a, b in ((5, 6), (6, 5))]
    assert once.num_tokens_scored.tolist() == [2.0] and once.num_green_tokens.tolist() == [float(sum(green))]
    assert every.num_tokens_scored.tolist() == [11.0]
    assert every.num_green_tokens.tolist() == [float(6 * green[0] + 5 * green[1])]


# --- configuration -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["selfhash_width3", "synthid"])
def test_generation_config_json_round_trip(tmp_path, kind):
    """Saved as transformers saves it (the config's dict under "watermarking_config") and read back."""
    import transformers

    mine, theirs = _configs(kind)
    herd.GenerationConfig(watermarking_config=mine, max_new_tokens=5).save_pretrained(tmp_path / "herd")
    transformers.GenerationConfig(watermarking_config=theirs, max_new_tokens=5).save_pretrained(tmp_path / "tf")
    saved = json.loads((tmp_path / "herd" / "generation_config.json").read_text())
    assert saved["watermarking_config"] == json.loads((tmp_path / "tf" / "generation_config.json").read_text())["watermarking_config"]
    for folder in ("herd", "tf"):
        read = herd.GenerationConfig.from_pretrained(tmp_path / folder)
        assert type(read.watermarking_config) is type(mine) and read.watermarking_config == mine
    if kind == "selfhash_width3":  # (transformers cannot read a SynthID config back: it makes a WatermarkingConfig of it)
        assert transformers.GenerationConfig.from_pretrained(tmp_path / "herd").watermarking_config.to_dict() == mine.to_dict()


def test_config_objects_as_transformers_has_them(tmp_path):
    import transformers

    for kind in ("lefthash_width2", "synthid_skip_short_history"):
        mine, theirs = _configs(kind)
        assert mine.to_dict() == theirs.to_dict() and list(mine) == list(theirs)
        assert json.loads(mine.to_json_string()) == json.loads(theirs.to_json_string())
        mine.to_json_file(tmp_path / "mine.json")
        theirs.to_json_file(tmp_path / "theirs.json")
        assert (tmp_path / "mine.json").read_text() == (tmp_path / "theirs.json").read_text()
    config = herd.WatermarkingConfig.from_dict({"bias": 1.0}, context_width=4, unrelated=1)
    assert config.bias == 1.0 and config.context_width == 4 and not hasattr(config, "unrelated")
    assert isinstance(herd.GenerationConfig(watermarking_config={"ngram_len": 2, "keys": [3]}).watermarking_config,
                      herd.SynthIDTextWatermarkingConfig)
    # transformers' own config objects are read through their dict
    converted = herd.GenerationConfig(watermarking_config=transformers.WatermarkingConfig(bias=1.25))
    assert converted.watermarking_config == herd.WatermarkingConfig(bias=1.25)


@pytest.mark.parametrize("value, message", [
    (dict(seeding_scheme="middlehash"), "seeding_scheme"),
    (dict(greenlist_ratio=1.5), "greenlist_ratio"),
    (dict(context_width=0), "context_width"),
    (herd.SynthIDTextWatermarkingConfig(ngram_len=2, keys=[1], sampling_table_size=2**25), "sampling_table_size"),
    (dict(colour="green"), "not a valid WatermarkingConfig"),
    ("lefthash", "must be a WatermarkingConfig"),
])
def test_bad_watermarking_configs_are_clear_errors(pair, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        pair[1].generate(torch.tensor([[5, 6]]), max_new_tokens=2, watermarking_config=value)


def test_processor_refuses_a_ratio_that_leaves_nothing_to_choose():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        wm.WatermarkLogitsProcessor(VOCAB, "cpu", greenlist_ratio=1.0)


# --- CUDA ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_processors_on_cuda_equal_reference_on_cuda():
    """CUDA generators draw other numbers than CPU ones: on the GPU herd must draw what transformers
    draws there (green lists, selfhash's table, SynthID's table)."""
    from transformers.generation import logits_process as ref

    ids, scores = (t.cuda() for t in _inputs(0))
    for fields in (dict(context_width=2), dict(seeding_scheme="selfhash", context_width=3)):
        theirs = ref.WatermarkLogitsProcessor(VOCAB, ids.device, **fields)(ids, scores.clone())
        ours = wm.WatermarkLogitsProcessor(VOCAB, ids.device, **fields)(ids, scores.clone())
        assert torch.equal(ours, theirs) and ours.device == ids.device
        on_cpu = wm.WatermarkLogitsProcessor(VOCAB, "cpu", **fields)(ids.cpu(), scores.cpu())
        assert not torch.equal(ours.cpu(), on_cpu)  # the device's own draws, not the CPU's
    fields = dict(ngram_len=3, keys=[5, 6, 7], sampling_table_size=2**16, sampling_table_seed=0, context_history_size=8)
    theirs = ref.SynthIDTextWatermarkLogitsProcessor(**fields, device=ids.device)
    ours = wm.SynthIDTextWatermarkLogitsProcessor(**fields, device=ids.device)
    for step in range(4):
        assert torch.equal(ours(ids, scores.clone()), theirs(ids, scores.clone()))
        ids = torch.cat([ids, ids[:, step : step + 1]], dim=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["lefthash_width2", "selfhash_width3", "synthid"])
def test_generate_on_cuda_matches_reference_on_cuda(checkpoint, kind):
    """generate() on the GPU (the decoder chooses its path) and the detector there, against transformers."""
    import transformers

    folder, reference = checkpoint
    ours = herd.LlamaForCausalLM.from_pretrained(folder, device_map="cuda", progress=False)
    reference = reference.to("cuda")
    try:
        ids, mask = (t.cuda() for t in left_padded_prompts((9, 5, 2), VOCAB, seed=1, pad=PAD))
        mine, theirs = _configs(kind)
        for search in ("greedy", "beams"):
            kwargs = dict(SEARCHES[search], max_new_tokens=8)
            expected = _run(reference, ids, mask, None, dict(kwargs, watermarking_config=theirs))
            got = _run(ours, ids, mask, None, dict(kwargs, watermarking_config=mine))
            assert torch.equal(got.sequences, expected.sequences), search
            _same_scores(got.scores, expected.scores, atol=1e-4)
        if kind != "synthid":
            text = got.sequences[:, 9:]
            detector = herd.WatermarkDetector(ours.config, "cuda", mine)
            expected_detector = transformers.WatermarkDetector(reference.config, "cuda", theirs)
            assert np.array_equal(detector(text, return_dict=True).z_score, expected_detector(text, return_dict=True).z_score)
    finally:
        reference.to("cpu")
