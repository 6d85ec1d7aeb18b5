"""generate() against transformers where an audit of the plain (CPU) path found differences: a call
without a prompt starts from bos, an eos id given as a 0-d tensor, the fill of beams a user's criteria
ended when there is no eos, the scores handed to stopping criteria, top_p=0, and the generation
options an old config.json holds.

Known deliberate differences, not tested here as equalities (see the tests named):
- encoder_repetition_penalty with several rows per prompt (beams, or num_return_sequences when
  sampling): transformers 5.17 rewards the prompts of the first batch-size rows only; herd every row's
  own prompt (test_options.py::test_prompt_reward_reaches_every_beam).
- repetition_penalty on left-padded rows: herd skips the padding, as transformers 5.23 does
  (test_options.py::test_repetition_penalty_does_not_count_left_padding).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import herd
from tests.conftest import left_padded_prompts, reference_llama, save_reference

PAD = 0
VOCAB = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    reference = reference_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64, seed=4)
    return save_reference(reference, tmp_path_factory.mktemp("generate_audit") / "ckpt")


@pytest.fixture(scope="module")
def pair(checkpoint):
    import transformers

    return (transformers.LlamaForCausalLM.from_pretrained(checkpoint).eval(),
            herd.LlamaForCausalLM.from_pretrained(checkpoint, progress=False))


def _prompts():
    return left_padded_prompts((7, 4, 2), VOCAB, 1, PAD)


def _both(pair, seed=0, **kwargs):
    outputs = []
    for model in pair:
        torch.manual_seed(seed)
        outputs.append(model.generate(**kwargs))
    return outputs


def _close(mine, theirs, what):
    assert mine.shape == theirs.shape and torch.equal(torch.isfinite(mine), torch.isfinite(theirs)), what
    finite = torch.isfinite(theirs)
    assert not finite.any() or (mine[finite] - theirs[finite]).abs().max().item() < 1e-4, what


def _same(got, expected):
    """Equal sequences; scores, sequences_scores and beam_indices too where returned."""
    if torch.is_tensor(expected):
        assert got.shape == expected.shape and torch.equal(got, expected), f"\n{got}\n!=\n{expected}"
        return
    _same(got.sequences, expected.sequences)
    assert (got.scores is None) == (expected.scores is None)
    if expected.scores is not None:
        assert len(got.scores) == len(expected.scores)
        for step, (mine, theirs) in enumerate(zip(got.scores, expected.scores)):
            _close(mine, theirs, f"scores[{step}]")
    if getattr(expected, "sequences_scores", None) is not None:
        _close(got.sequences_scores, expected.sequences_scores, "sequences_scores")
    if getattr(expected, "beam_indices", None) is not None:
        assert torch.equal(got.beam_indices, expected.beam_indices)


SCORES = dict(return_dict_in_generate=True, output_scores=True)


@pytest.mark.parametrize("kwargs", [
    dict(max_new_tokens=4),
    dict(max_new_tokens=3, num_beams=2, **SCORES),
    dict(max_new_tokens=3, do_sample=True, bos_token_id=5, **SCORES),
    dict(max_new_tokens=3, attention_mask=torch.ones(2, 1, dtype=torch.long)),  # two rows, from the mask
], ids=["greedy", "beams", "sampling_own_bos", "batch_from_a_model_input"])
def test_generate_without_a_prompt_starts_from_bos(pair, kwargs):
    """No input_ids nor inputs_embeds: transformers starts each row from bos_token_id (herd refused)."""
    expected, got = _both(pair, seed=3, **kwargs)
    _same(got, expected)
    sequences = got if torch.is_tensor(got) else got.sequences
    assert sequences[:, 0].tolist() == [kwargs.get("bos_token_id", 1)] * sequences.shape[0]
    with pytest.raises(ValueError, match="or a bos_token_id"):
        pair[1].generate(max_new_tokens=2, bos_token_id=None)


@pytest.mark.parametrize("mode", [{}, dict(num_beams=2)], ids=["greedy", "beams"])
def test_eos_token_id_as_a_0d_tensor(pair, mode):
    ids, mask = _prompts()
    free = pair[1].generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=6, eos_token_id=None, **mode)
    eos = torch.tensor(int(free[0, ids.shape[1] + 2]))  # a token row 0 makes: the row stops there
    expected, got = _both(pair, input_ids=ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=6,
                          eos_token_id=eos, **mode, **SCORES)
    _same(got, expected)
    assert not torch.equal(got.sequences[0], free[0])


class _LastTokenIn:
    """Stops a row (or beam) whose last token is one of `tokens` (an eos by another name)."""

    def __init__(self, tokens):
        self.tokens = torch.tensor(tokens)

    def __call__(self, input_ids, scores, **kwargs):
        return torch.isin(input_ids[:, -1], self.tokens)


@pytest.mark.parametrize("pad, eos", [(5, None), (5, 63), (None, None), (PAD, None)])
def test_beams_a_criterion_ended_are_filled_as_in_transformers(pair, pad, eos):
    """Finished beams shorter than the longest are filled with pad (eos when pad is 0 or unset), but with
    -1 whenever there is no eos id, whatever the pad (herd filled with pad)."""
    import transformers

    ids, mask = _prompts()
    free = pair[1].generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=8, eos_token_id=None,
                            num_beams=3)[:, ids.shape[1]:].tolist()
    criteria = transformers.StoppingCriteriaList([_LastTokenIn([free[0][2], free[1][1]])])
    expected, got = _both(pair, input_ids=ids, attention_mask=mask, pad_token_id=pad, eos_token_id=eos,
                          max_new_tokens=7, num_beams=3, num_return_sequences=2, stopping_criteria=criteria, **SCORES)
    _same(got, expected)
    if eos is None:
        assert (got.sequences == -1).any()  # some beams did end early


class _Recorder:
    """Records what each call gets as `scores`; stops nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, scores, **kwargs):
        seen = None if scores is None else (type(scores).__name__, len(scores), tuple(scores[-1].shape))
        self.calls.append((tuple(input_ids.shape), seen))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("mode", [{}, dict(do_sample=True), dict(num_beams=2)], ids=["greedy", "sampling", "beams"])
@pytest.mark.parametrize("returned", [{}, SCORES], ids=["no_scores", "output_scores"])
def test_stopping_criteria_get_the_scores_transformers_hands_them(pair, mode, returned):
    """transformers calls criteria with every step's processed scores so far (a tuple) when generate()
    returns them, else with None; herd gave the step's scores tensor (its rows, under greedy and
    sampling) or None (beams)."""
    import transformers

    ids, mask = _prompts()
    calls = []
    for model in pair:
        recorder = _Recorder()
        torch.manual_seed(0)
        model.generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=3, eos_token_id=None,
                       stopping_criteria=transformers.StoppingCriteriaList([recorder]), **mode, **returned)
        calls.append(recorder.calls)
    assert calls[1] == calls[0]


def test_top_p_zero_keeps_the_most_likely_token(pair):
    """top_p=0 is valid in transformers (TopPLogitsWarper keeps the min_tokens_to_keep best); herd refused it."""
    ids, mask = _prompts()
    expected, got = _both(pair, seed=5, input_ids=ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=4,
                          do_sample=True, top_p=0.0, top_k=0, **SCORES)
    _same(got, expected)
    assert all(bool((torch.isfinite(step).sum(dim=-1) == 1).all()) for step in got.scores)
    with pytest.raises(ValueError, match="top_p must be in"):
        pair[1].generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=True, top_p=-0.1)


def test_generation_options_of_an_old_config_json(checkpoint, tmp_path):
    """Without generation_config.json, transformers takes the generation options an old config.json holds
    (GenerationConfig.from_model_config); herd took only the special tokens."""
    import transformers

    folder = tmp_path / "legacy"
    shutil.copytree(checkpoint, folder)
    (folder / "generation_config.json").unlink()
    values = json.loads((folder / "config.json").read_text())
    values.update(max_length=12, num_beams=2, repetition_penalty=1.3, no_repeat_ngram_size=2, eos_token_id=[3, 9])
    (folder / "config.json").write_text(json.dumps(values))
    reference = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    ours = herd.LlamaForCausalLM.from_pretrained(folder, progress=False)
    for name in ("max_length", "num_beams", "repetition_penalty", "no_repeat_ngram_size", "eos_token_id",
                 "bos_token_id", "pad_token_id"):
        assert getattr(ours.generation_config, name) == getattr(reference.generation_config, name), name
    ids = torch.tensor([[5, 9, 17, 3, 8]])
    expected, got = _both((reference, ours), input_ids=ids)
    _same(got, expected)
    assert got.shape == (1, 12)
    # the reference's defaults write nothing: a config.json with only defaults adds no option
    from herd.generation import GenerationConfig

    plain = GenerationConfig.from_model_config(herd.LlamaConfig(use_cache=True, output_attentions=False))
    assert {key for key in plain.to_diff_dict() if not key.startswith("_")} <= {"bos_token_id", "eos_token_id",
                                                                                "pad_token_id"}


@pytest.mark.parametrize("mode", [{}, dict(num_beams=2)], ids=["greedy", "beams"])
@pytest.mark.parametrize("max_cache_len", [30, 5])
def test_max_cache_len_sizes_a_static_cache(pair, mode, max_cache_len):
    """generate(max_cache_len=N) with a static cache: sized max(N, max_length - 1) as transformers sizes it
    (herd refused the argument as unknown). The reference is made fresh: it keeps the largest size of its
    earlier calls (herd sizes each call's cache from that call)."""
    pair[0].__dict__.pop("_previous_max_cache_length", None)
    ids, mask = _prompts()
    expected, got = _both(pair, input_ids=ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=3,
                          cache_implementation="static", max_cache_len=max_cache_len, **mode, **SCORES)
    _same(got, expected)
    size = got.past_key_values.get_max_cache_shape()
    assert size == expected.past_key_values.get_max_cache_shape() == max(max_cache_len, ids.shape[1] + 2)


def test_max_cache_len_without_a_static_cache_warns(pair, caplog):
    ids, mask = _prompts()
    expected = pair[0].generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=3)
    with caplog.at_level("WARNING", logger="herd"):
        got = pair[1].generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=3, max_cache_len=40)
    assert torch.equal(got, expected)
    assert "max_cache_len" in caplog.text
    with pytest.raises(ValueError, match="max_cache_len must be a positive integer"):
        pair[1].generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static", max_cache_len=0)


@pytest.mark.parametrize("kwargs", [dict(trust_remote_code=True), dict(decoder_start_token_id=3)],
                         ids=["trust_remote_code", "decoder_start_token_id"])
def test_arguments_transformers_ignores_for_a_decoder_only_model(pair, kwargs):
    """Accepted with transformers' tokens (herd refused them as unknown arguments)."""
    ids, mask = _prompts()
    expected, got = _both(pair, input_ids=ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=3, **kwargs)
    _same(got, expected)


@pytest.mark.parametrize("name, value", [
    ("num_assistant_tokens", 4), ("assistant_confidence_threshold", 0.3), ("max_matching_ngram_size", 2),
    ("token_healing", True), ("use_mtp", True), ("low_memory", True), ("compile_config", object()),
    ("constraints", True), ("force_words_ids", [[5]]),
])
def test_transformers_options_herd_does_not_implement_are_refused_by_name(pair, name, value):
    """A one-line NotImplementedError naming the option (True is not the "off" value 1: token_healing=True
    and constraints=True ran as if unset)."""
    ids, mask = _prompts()
    with pytest.raises(NotImplementedError, match=rf"^generate\({name}=\.\.\.\): {name} [^\n]+$"):
        pair[1].generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=2, **{name: value})
    pair[1].generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=2, **{name: None})  # None: off


@pytest.mark.parametrize("name", ["token_healing", "use_mtp"])
def test_options_that_change_the_tokens_are_refused_in_a_generation_config_too(pair, name):
    """transformers heals the prompt's last token or runs multi-token prediction wherever the flag is set
    (a generation_config.json, a GenerationConfig given): herd kept it as an unknown entry and ignored it."""
    from herd.generation import GenerationConfig

    ids, mask = _prompts()
    with pytest.raises(NotImplementedError, match=f"{name}=True: {name} "):
        pair[1].generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=2,
                         generation_config=GenerationConfig(**{name: True}))


def test_prefill_chunk_size_without_a_cache_is_refused(pair):
    """transformers refuses chunked prefill with use_cache=False; herd ran the prompt whole, ignoring it."""
    ids, mask = _prompts()
    for model in pair:
        with pytest.raises(ValueError, match="(?i)prefill chunking without a cache|prefill_chunk_size needs a cache"):
            model.generate(ids, attention_mask=mask, pad_token_id=PAD, max_new_tokens=2, prefill_chunk_size=2,
                           use_cache=False)


@pytest.mark.parametrize("warper", [{}, dict(eta_cutoff=0.02)], ids=["plain_sampling", "eta_cutoff"])
def test_fast_path_sampling_past_a_finished_batch(pair, monkeypatch, warper):
    """The fast path checks whether every row finished only every few tokens, and samples on in between.
    There forced_eos_token_id at the last position with exponential_decay_length_penalty gives the
    finished rows NaN scores (-inf + inf): the draw (and eta_cutoff's entropy) failed where transformers,
    stopping as soon as every row is done, gives its tokens."""
    from herd.decoding import decoders

    monkeypatch.setattr(decoders, "FAST_DEVICES", ("cuda", "cpu"))
    ids, mask = _prompts()
    kwargs = dict(input_ids=ids, attention_mask=mask, pad_token_id=PAD, do_sample=True, max_new_tokens=3,
                  eos_token_id=list(range(1, VOCAB)), forced_eos_token_id=9,  # rows end at their first non-pad token
                  exponential_decay_length_penalty=(1, 1.5), **warper)
    expected, got = _both(pair, seed=1, **kwargs)
    _same(got, expected)
    assert got.shape[1] < ids.shape[1] + 3  # every row finished before the last position
    assert decoders.fast_decoder(pair[1]).entry is not None  # the fast path ran


def test_from_pretrained_takes_a_generation_config(checkpoint, tmp_path):
    """from_pretrained(folder, generation_config=GenerationConfig(...)) replaces generation_config.json, as in
    transformers (herd refused the argument)."""
    import transformers

    from herd.generation import GenerationConfig

    folder = tmp_path / "with_json"
    shutil.copytree(checkpoint, folder)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 3, "max_new_tokens": 9}))
    reference = transformers.LlamaForCausalLM.from_pretrained(
        folder, generation_config=transformers.GenerationConfig(max_new_tokens=4, num_beams=2)).eval()
    given = GenerationConfig(max_new_tokens=4, num_beams=2)
    ours = herd.LlamaForCausalLM.from_pretrained(folder, generation_config=given, progress=False)
    assert ours.generation_config == given and ours.generation_config is not given  # (a copy)
    ids = torch.tensor([[5, 9, 17, 3, 8]])
    expected, got = _both((reference, ours), input_ids=ids)
    _same(got, expected)
    assert got.shape == (1, 9)
