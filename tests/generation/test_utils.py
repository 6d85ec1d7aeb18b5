"""generate() returns exactly the reference's tokens on tiny random checkpoints."""

from __future__ import annotations

import logging

import pytest
import torch

import herd
from herd.generation import GenerationConfig
from tests.conftest import left_padded_prompts, max_abs_diff, reference_llama, save_reference

PAD = 0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # A larger vocabulary than the other tests' so that greedy paths differ between prompts.
    reference = reference_llama(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128, seed=7)
    folder = save_reference(reference, tmp_path_factory.mktemp("gen") / "ckpt")
    return reference, herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


def _prompts(lengths=(9, 5, 2), seed=0):
    """Left-padded prompts, a different amount of padding per row."""
    return left_padded_prompts(lengths, 256, seed, PAD)


def _both(pair, ids, mask, seed=None, **kwargs):
    reference, ours = pair
    outputs = []
    for model in (reference, ours):
        if seed is not None:
            torch.manual_seed(seed)
        outputs.append(model.generate(ids, attention_mask=mask, pad_token_id=PAD, **kwargs))
    return outputs


def test_greedy_single_prompt(pair):
    ids, mask = _prompts((6,))
    expected, got = _both(pair, ids, mask, max_new_tokens=15)
    assert got.shape == (1, 21) and torch.equal(got, expected)


def test_greedy_left_padded_batch_rows_equal_rows_alone(pair):
    _, ours = pair
    ids, mask = _prompts()
    expected, got = _both(pair, ids, mask, max_new_tokens=12)
    assert torch.equal(got, expected)
    for row in range(3):
        alone = ids[row : row + 1, mask[row].bool()]
        single = ours.generate(alone, max_new_tokens=12, pad_token_id=PAD)
        assert torch.equal(single[0, alone.shape[1] :], got[row, ids.shape[1] :])


def test_eos_inside_the_batch_pads_finished_rows(pair):
    reference, _ = pair
    ids, mask = _prompts()
    free = reference.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=PAD)
    eos = int(free[1, ids.shape[1] + 3])  # row 1 emits this fourth: make it an eos
    expected, got = _both(pair, ids, mask, max_new_tokens=10, eos_token_id=[eos, 255])
    assert torch.equal(got, expected)
    new = got[1, ids.shape[1] :].tolist()
    stop = new.index(eos)
    assert all(t == PAD for t in new[stop + 1 :])


def test_max_length_min_new_tokens_and_all_rows_stopping(pair):
    ids, mask = _prompts()
    for kwargs in (dict(max_length=14), dict(max_new_tokens=6, min_new_tokens=4, eos_token_id=[5, 6, 7]),
                   dict(max_new_tokens=8, min_length=12, eos_token_id=9)):
        expected, got = _both(pair, ids, mask, **kwargs)
        assert torch.equal(got, expected), kwargs


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_cache_implementations_give_same_tokens(pair, cache_implementation):
    _, ours = pair
    ids, mask = _prompts()
    expected = pair[0].generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=PAD)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=PAD, cache_implementation=cache_implementation)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kwargs", [
    dict(top_k=10),
    dict(temperature=0.7, top_p=0.9),
    dict(top_k=0, min_p=0.1, temperature=1.3),
    dict(repetition_penalty=1.5, top_k=20),
    dict(num_return_sequences=3, top_p=0.8),
])
def test_sampling_with_the_same_seed_gives_the_reference_tokens(pair, kwargs):
    # transformers 5.17 (the pinned oracle) also penalises left padding, which herd does not count
    # as part of a row (tests/generation/test_options.py): unpadded rows for the penalty
    ids, mask = _prompts((9, 9, 9)) if "repetition_penalty" in kwargs else _prompts()
    expected, got = _both(pair, ids, mask, seed=11, do_sample=True, max_new_tokens=10, **kwargs)
    assert torch.equal(got, expected)


def test_seeded_generator_is_reproducible_and_independent_of_global_seed(pair):
    _, ours = pair
    ids, mask = _prompts()
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        generator = torch.Generator().manual_seed(5)
        runs.append(ours.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=10, pad_token_id=PAD,
                                  generator=generator))
    assert torch.equal(runs[0], runs[1])


def test_repetition_penalty_greedy(pair):
    ids, mask = _prompts()
    expected, got = _both(pair, ids, mask, max_new_tokens=12, repetition_penalty=2.0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kwargs", [
    dict(num_beams=2),
    dict(num_beams=3, num_return_sequences=3),
    dict(num_beams=4, length_penalty=0.3, num_return_sequences=2),
    dict(num_beams=3, length_penalty=2.0, early_stopping=True),
    dict(num_beams=3, early_stopping="never", eos_token_id=[7, 11]),
])
def test_beam_search_matches_reference(pair, kwargs):
    ids, mask = _prompts()
    kwargs.setdefault("eos_token_id", None)
    if kwargs["eos_token_id"] is None:
        # Pick an eos that the beams do produce, so that beams finish early.
        free = pair[0].generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=PAD)
        kwargs["eos_token_id"] = int(free[0, -3])
    expected, got = _both(pair, ids, mask, max_new_tokens=9, **kwargs)
    assert got.shape == expected.shape and torch.equal(got, expected)


def test_beam_search_scores_and_beam_sampling(pair):
    ids, mask = _prompts((5, 3))
    expected, got = _both(pair, ids, mask, num_beams=3, max_new_tokens=6, return_dict_in_generate=True,
                          output_scores=True, output_logits=True)
    assert torch.equal(got.sequences, expected.sequences)
    assert max_abs_diff(got.sequences_scores, expected.sequences_scores) < 1e-4
    assert torch.equal(got.beam_indices, expected.beam_indices)
    assert len(got.scores) == len(expected.scores)
    assert all(max_abs_diff(a, b) < 1e-4 for a, b in zip(got.scores, expected.scores))
    expected, got = _both(pair, ids, mask, seed=3, num_beams=2, do_sample=True, top_k=20, max_new_tokens=6)
    assert torch.equal(got, expected)


def test_return_dict_scores_and_logits_match_reference(pair):
    ids, mask = _prompts()
    expected, got = _both(pair, ids, mask, max_new_tokens=5, return_dict_in_generate=True, output_scores=True,
                          output_logits=True, do_sample=True, top_k=5, seed=0)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(got.logits) == 5
    for mine, theirs in zip(got.scores, expected.scores):
        assert torch.equal(torch.isinf(mine), torch.isinf(theirs))
        finite = torch.isfinite(theirs)
        assert max_abs_diff(mine[finite], theirs[finite]) < 1e-4
    for mine, theirs in zip(got.logits, expected.logits):
        assert max_abs_diff(mine, theirs) < 1e-4
    assert isinstance(got.past_key_values, herd.Cache)


def test_generation_config_from_file_is_used(tmp_path):
    reference = reference_llama(max_position_embeddings=128)
    folder = save_reference(reference, tmp_path / "ckpt")
    GenerationConfig(max_new_tokens=3, eos_token_id=[2, 3], pad_token_id=PAD).save_pretrained(folder)
    model = herd.LlamaForCausalLM.from_pretrained(folder, progress=False)
    assert model.generation_config.eos_token_id == [2, 3]
    out = model.generate(torch.tensor([[5, 6, 7]]))
    assert out.shape[1] <= 6
    # a per-call value wins, and a passed GenerationConfig too
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=1).shape == (1, 4)
    assert model.generate(torch.tensor([[5, 6, 7]]), generation_config=GenerationConfig(max_new_tokens=2)).shape[1] <= 5


@pytest.fixture(scope="module")
def spm_pair(tmp_path_factory):
    """A tiny model over the real 32k SentencePiece-style vocabulary, with its tokenizer."""
    import transformers

    from tests.conftest import SHARED_DATA

    tokenizer = transformers.AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "spm-llama-style")
    tokenizer.pad_token = tokenizer.unk_token  # id 0, the PAD of these tests
    reference = reference_llama(vocab_size=32000, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=128, seed=3)
    folder = save_reference(reference, tmp_path_factory.mktemp("spm") / "ckpt")
    return reference, herd.LlamaForCausalLM.from_pretrained(folder, progress=False), tokenizer


def test_stop_strings_match_reference(spm_pair):
    reference, ours, tokenizer = spm_pair
    ids = tokenizer(["Hello there, my friend", "Hi"], return_tensors="pt", padding=True)
    free = reference.generate(**ids, max_new_tokens=12, pad_token_id=PAD)
    new_text = tokenizer.decode(free[0, ids.input_ids.shape[1]:])
    middle = len(new_text) // 2
    stops = [new_text[middle : middle + 3], new_text[middle - 1 : middle + 1], [new_text[middle - 4 : middle - 2], "zzzz"], "never-there"]
    for stop in stops:
        expected = reference.generate(**ids, max_new_tokens=12, pad_token_id=PAD, stop_strings=stop, tokenizer=tokenizer)
        got = ours.generate(**ids, max_new_tokens=12, pad_token_id=PAD, stop_strings=stop, tokenizer=tokenizer)
        assert torch.equal(got, expected), stop
        stopped_early = got.shape[1] < free.shape[1] or not torch.equal(got, free)
        assert stopped_early == (stop != "never-there"), stop
    with pytest.raises(ValueError, match="needs the tokenizer"):
        ours.generate(**ids, max_new_tokens=3, stop_strings="x")


def test_a_prompt_near_the_context_generates_up_to_it_and_warns_once(pair, caplog):
    _, ours = pair
    with caplog.at_level(logging.WARNING, logger="herd"):
        out = ours.generate(torch.ones(1, 120, dtype=torch.long), max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert out.shape == (1, 128)  # the context, not 140
    warnings = [record.getMessage() for record in caplog.records if "context" in record.getMessage()]
    assert warnings == ["prompt (120 tokens) + 20 new tokens exceeds the model's context of 128 positions: "
                        "generating at most 8 new tokens"]


def test_generate_errors(pair):
    _, ours = pair
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="the prompt has 130 tokens, 3 more than the model's context of 128"):
        ours.generate(torch.ones(1, 130, dtype=torch.long), max_new_tokens=20)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        ours.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ours.generate(ids, do_sample=True, temperature=-1.0)
    with pytest.raises(ValueError, match="nothing is left to generate"):
        ours.generate(torch.ones(1, 25, dtype=torch.long), max_length=20)
    with pytest.raises(TypeError, match="does not know: colour"):
        ours.generate(ids, colour="red")
    with pytest.raises(IndexError, match="outside the vocabulary"):
        ours.generate(torch.tensor([[1, 999]]), max_new_tokens=2)


def test_explicit_none_eos_disables_the_models_eos(pair):
    reference, ours = pair
    ids, mask = _prompts()
    free = reference.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD)
    ours.generation_config.eos_token_id = int(free[0, ids.shape[1] + 2])  # the model's eos appears early
    reference.generation_config.eos_token_id = ours.generation_config.eos_token_id
    try:
        stopped = ours.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD)
        unstopped = ours.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD, eos_token_id=None)
        assert torch.equal(unstopped, reference.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD,
                                                         eos_token_id=None))
        assert torch.equal(unstopped, free) and not torch.equal(stopped, free)
    finally:
        ours.generation_config.eos_token_id = reference.generation_config.eos_token_id = 2


def test_every_eos_id_of_generation_config_json_stops_its_row(pair, tmp_path, monkeypatch):
    """As Llama 3 Instruct ships it: config.json names one eos id, generation_config.json a list
    (128001, 128008, 128009); a row that emits any id of the list stops there, on the plain and
    the fast decoding path (the default on CUDA; run here uncompiled), as in the reference."""
    import transformers

    from herd.decoding import decoders

    reference, _ = pair
    ids, mask = _prompts()
    free = reference.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=PAD, eos_token_id=None)
    new = free[:, ids.shape[1] :]
    stops = {0: 3, 1: 5, 2: 1}  # row -> the step whose token becomes an eos id: each row its own id
    eos = [int(new[row, step]) for row, step in stops.items()]
    assert len(set(eos)) == 3 and all(not torch.isin(new[row, :step], torch.tensor(eos)).any()
                                      for row, step in stops.items())
    folder = save_reference(reference, tmp_path / "ckpt")
    GenerationConfig(eos_token_id=eos, pad_token_id=PAD, max_new_tokens=10).save_pretrained(folder)
    assert transformers.LlamaConfig.from_pretrained(folder).eos_token_id == 2  # config.json: one id only
    expected = transformers.LlamaForCausalLM.from_pretrained(folder).eval().generate(ids, attention_mask=mask)
    ours = herd.LlamaForCausalLM.from_pretrained(folder, progress=False)
    plain = ours.generate(ids, attention_mask=mask)
    monkeypatch.setattr(decoders, "FAST_DEVICES", ("cuda", "cpu"))
    fast = ours.generate(ids, attention_mask=mask)
    assert decoders.fast_decoder(ours).entry is not None  # the fast path really ran
    assert torch.equal(plain, expected) and torch.equal(fast, expected)
    for row, step in stops.items():
        tail = plain[row, ids.shape[1] :].tolist()
        assert tail[step] == eos[row] and all(t == PAD for t in tail[step + 1 :]), row
    assert plain.shape[1] == ids.shape[1] + max(stops.values()) + 1  # generation ends once every row is done


def test_a_batch_whose_padding_cannot_be_known_or_is_on_the_right_is_warned_about(pair, caplog):
    """As transformers warns: without an attention_mask a batch's padding is unknown when there is
    no pad id or the pad id is an eos id (Llama 3's pad_token = eos_token); right padding makes new
    tokens follow padding. A left-padded batch with its mask, or one row, gets no such warning."""
    _, ours = pair
    ids, mask = _prompts()
    kwargs = dict(max_new_tokens=2, do_sample=False)

    def padding_warnings(**call):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="herd"):
            ours.generate(**call, **kwargs)
        return [r.getMessage() for r in caplog.records if "attention_mask" in r.getMessage()]

    assert padding_warnings(input_ids=ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=2) == []
    assert padding_warnings(input_ids=ids, pad_token_id=PAD, eos_token_id=2) == []  # the mask inferred from PAD
    assert padding_warnings(input_ids=ids[:1], pad_token_id=2, eos_token_id=2) == []  # one row: nothing to infer
    warned = padding_warnings(input_ids=ids, pad_token_id=PAD, eos_token_id=[2, PAD])
    assert len(warned) == 1 and "cannot infer one (pad_token_id is an eos id)" in warned[0]
    warned = padding_warnings(input_ids=ids, pad_token_id=None, eos_token_id=2)
    assert len(warned) == 1 and "cannot infer one (there is no pad_token_id)" in warned[0]
    right_ids, right_mask = ids.flip(1), mask.flip(1)
    warned = padding_warnings(input_ids=right_ids, attention_mask=right_mask, pad_token_id=PAD, eos_token_id=2)
    assert len(warned) == 1 and "padded on the right" in warned[0]
    assert len(padding_warnings(input_ids=right_ids, pad_token_id=PAD, eos_token_id=2)) == 1  # inferred, on the right
