"""generate()'s public surface against transformers (the oracle): GenerationConfig, generate()'s
arguments, the logits processor / stopping criteria classes users build, and the streamers."""

from __future__ import annotations

import asyncio
import inspect

import pytest
import torch
import transformers

import herd
import herd.generation as hg

from .conftest import left_padded_prompts, reference_llama, save_reference


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = reference_llama()
    folder = save_reference(reference, tmp_path_factory.mktemp("tiny") / "model")
    return herd.LlamaForCausalLM.from_pretrained(folder).eval(), reference


# --- GenerationConfig --------------------------------------------------------------------------

def test_generation_config_to_dict_lists_unset_fields_as_none():
    ours, theirs = hg.GenerationConfig().to_dict(), transformers.GenerationConfig().to_dict()
    for key in ("max_new_tokens", "temperature", "top_k", "top_p", "do_sample", "max_time", "eos_token_id"):
        assert key in theirs and theirs[key] is None
        assert key in ours and ours[key] is None
    assert set(ours) <= set(theirs)


def test_generation_config_json_methods(tmp_path):
    for cls in (hg.GenerationConfig, transformers.GenerationConfig):
        config = cls.from_dict({"max_new_tokens": 5, "do_sample": True})
        assert config.max_new_tokens == 5 and config.do_sample is True
        text = config.to_json_string()
        assert '"max_new_tokens": 5' in text and '"temperature"' not in text  # use_diff: only what is set
        config.to_json_file(tmp_path / f"{cls.__module__}.json")
        assert '"max_new_tokens": 5' in (tmp_path / f"{cls.__module__}.json").read_text()
        assert config.to_diff_dict()["max_new_tokens"] == 5
        config.save_pretrained(tmp_path / cls.__module__)
        assert cls.from_pretrained(tmp_path / cls.__module__).max_new_tokens == 5


def test_generate_max_time(pair):
    ours, reference = pair
    ids = torch.tensor([[5, 6, 7]])
    expected = reference.generate(ids, max_new_tokens=4, max_time=100.0, do_sample=False)
    assert torch.equal(ours.generate(ids, max_new_tokens=4, max_time=100.0, do_sample=False), expected)
    # a time limit already passed: transformers and herd both stop after the first new token
    assert ours.generate(ids, max_new_tokens=8, max_time=0.0).shape[1] == \
        reference.generate(ids, max_new_tokens=8, max_time=0.0).shape[1]


# --- generate()'s arguments --------------------------------------------------------------------

def test_generate_named_parameters_in_transformers_order():
    theirs = [name for name in inspect.signature(transformers.GenerationMixin.generate).parameters
              if name not in ("self", "kwargs")]
    ours = list(inspect.signature(herd.GenerationMixin.generate).parameters)
    assert ours[1:len(theirs) + 1] == theirs


def test_generate_synced_gpus_and_processors_as_keywords(pair):
    ours, reference = pair
    ids = torch.tensor([[5, 6, 7]])
    kwargs = dict(max_new_tokens=5, do_sample=False, synced_gpus=False)
    processors = lambda module: module.LogitsProcessorList([module.NoRepeatNGramLogitsProcessor(2)])  # noqa: E731
    criteria = lambda module: module.StoppingCriteriaList([module.MaxLengthCriteria(6)])  # noqa: E731
    expected = reference.generate(ids, logits_processor=processors(transformers),
                                  stopping_criteria=criteria(transformers), **kwargs)
    got = ours.generate(ids, logits_processor=processors(hg), stopping_criteria=criteria(hg), **kwargs)
    assert torch.equal(got, expected)


def test_generate_prefix_allowed_tokens_fn(pair):
    ours, reference = pair
    ids, mask = left_padded_prompts((4, 2))

    def allowed(batch_id, sent):
        return [10 + batch_id, 20 + int(sent[-1]) % 7, 30]

    for extra in (dict(), dict(num_beams=2)):
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                      prefix_allowed_tokens_fn=allowed, **extra)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                            prefix_allowed_tokens_fn=allowed, **extra)
        assert torch.equal(got, expected), extra


@pytest.mark.parametrize("name", ["assistant_model", "custom_generate"])
def test_generate_refuses_what_herd_does_not_implement_by_name(pair, name):
    ours, _ = pair
    with pytest.raises(NotImplementedError, match=name):
        ours.generate(torch.tensor([[5, 6]]), max_new_tokens=2, **{name: "something"})


@pytest.mark.parametrize("name,value", [("penalty_alpha", 0.6), ("num_beam_groups", 2), ("constraints", ["x"])])
def test_generate_refuses_removed_strategies_by_name(pair, name, value):
    ours, _ = pair
    with pytest.raises(NotImplementedError, match=name):
        ours.generate(torch.tensor([[5, 6]]), max_new_tokens=2, **{name: value})


# --- the classes users build -------------------------------------------------------------------

PROCESSORS = [
    ("RepetitionPenaltyLogitsProcessor", (1.3,), {}),
    ("RepetitionPenaltyLogitsProcessor", (1.3,), {"prompt_ignore_length": 3}),
    ("TemperatureLogitsWarper", (0.7,), {}),
    ("TopKLogitsWarper", (5,), {}),
    ("TopKLogitsWarper", (5,), {"filter_value": -100.0, "min_tokens_to_keep": 8}),
    ("TopPLogitsWarper", (0.8,), {}),
    ("TopPLogitsWarper", (0.8,), {"filter_value": -50.0, "min_tokens_to_keep": 3}),
    ("MinPLogitsWarper", (0.1,), {}),
    ("TypicalLogitsWarper", (), {"mass": 0.7}),
    ("EpsilonLogitsWarper", (0.01,), {}),
    ("EtaLogitsWarper", (0.01,), {}),
    ("TopHLogitsWarper", (0.5,), {}),
    ("NoRepeatNGramLogitsProcessor", (2,), {}),
    ("MinLengthLogitsProcessor", (20, [1, 2]), {}),
    ("MinNewTokensLengthLogitsProcessor", (4, 10, 2), {}),
    ("NoBadWordsLogitsProcessor", ([[3], [4, 5]],), {"eos_token_id": 2}),
    ("SequenceBiasLogitsProcessor", ([[[3], 2.0], [[4, 5], -1.5]],), {}),
    ("SuppressTokensLogitsProcessor", ([1, 2, 3],), {}),
    ("SuppressTokensAtBeginLogitsProcessor", ([1, 2], 12), {}),
    ("ForcedBOSTokenLogitsProcessor", (7,), {}),
    ("ForcedEOSTokenLogitsProcessor", (13, 2), {}),
    ("InfNanRemoveLogitsProcessor", (), {}),
    ("LogitNormalization", (), {}),
    ("ExponentialDecayLengthPenalty", ((2, 1.5), 2, 5), {}),
]


@pytest.mark.parametrize("name,args,kwargs", PROCESSORS, ids=[f"{p[0]}-{i}" for i, p in enumerate(PROCESSORS)])
def test_logits_processor_classes_match(name, args, kwargs):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 16, (3, 12), generator=generator)
    input_ids[:, -1] = 4  # so that the bias / bad word [4, 5] applies
    scores = torch.randn(3, 32, generator=generator) * 3
    if name == "InfNanRemoveLogitsProcessor":
        scores[0, 0], scores[1, 1], scores[2, 2] = float("nan"), float("inf"), -float("inf")
    expected = getattr(transformers, name)(*args, **kwargs)(input_ids, scores.clone())
    got = getattr(hg, name)(*args, **kwargs)(input_ids, scores.clone())
    torch.testing.assert_close(got, expected, equal_nan=True)


def test_eos_and_stop_string_criteria_match():
    tokenizer = transformers.AutoTokenizer.from_pretrained(_tokenizer_folder()) if _tokenizer_folder() else None
    ids = torch.tensor([[5, 6, 2], [5, 6, 7]])
    for eos in (2, [2, 9], torch.tensor([2])):
        assert torch.equal(hg.EosTokenCriteria(eos)(ids, None), transformers.EosTokenCriteria(eos)(ids, None))
    assert torch.equal(hg.MaxLengthCriteria(3, max_position_embeddings=64)(ids, None),
                       transformers.MaxLengthCriteria(3, max_position_embeddings=64)(ids, None))
    if tokenizer is None:
        pytest.skip("no tokenizer in shared/data")
    for text in ("a cat sat on the mat", "dogs run fast", "nothing here"):
        rows = tokenizer([text], return_tensors="pt").input_ids
        for stops in ("mat", ["fast", "xyz"]):
            assert torch.equal(hg.StopStringCriteria(tokenizer, stops)(rows, None).bool(),
                               transformers.StopStringCriteria(tokenizer, stops)(rows, None).bool())


def _tokenizer_folder():
    from .conftest import SHARED_DATA

    for candidate in sorted(SHARED_DATA.glob("**/tokenizer.json")):
        return candidate.parent
    return None


def test_async_text_iterator_streamer():
    class Tokenizer:
        def decode(self, ids, **kwargs):
            return "".join(f"w{i} " for i in ids)

    for module in (hg, transformers):
        assert list(inspect.signature(module.AsyncTextIteratorStreamer).parameters) == \
            ["tokenizer", "skip_prompt", "timeout", "decode_kwargs"]

    async def collect(module):
        streamer = module.AsyncTextIteratorStreamer(Tokenizer(), skip_prompt=True)

        def produce():
            streamer.put(torch.tensor([[1, 2]]))  # the prompt
            for token in (3, 4, 5):
                streamer.put(torch.tensor([token]))
            streamer.end()

        task = asyncio.get_running_loop().run_in_executor(None, produce)
        pieces = [piece async for piece in streamer]
        await task
        return pieces

    assert asyncio.run(collect(hg)) == asyncio.run(collect(transformers))


# --- output classes ----------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"num_beams": 2}], ids=["greedy", "beams"])
def test_generate_output_fields_with_every_output_flag(tmp_path, extra):
    reference = reference_llama(attn_implementation="eager")  # sdpa has no attention weights
    ours = herd.LlamaForCausalLM.from_pretrained(save_reference(reference, tmp_path / "m")).eval()
    ids = torch.tensor([[5, 6, 7], [9, 10, 11]])
    kwargs = dict(max_new_tokens=3, return_dict_in_generate=True, output_scores=True, output_logits=True,
                  output_attentions=True, output_hidden_states=True, **extra)
    expected, got = reference.generate(ids, **kwargs), ours.generate(ids, **kwargs)
    assert type(got).__name__ == type(expected).__name__
    assert list(got.keys()) == list(expected.keys())
    torch.testing.assert_close(got.sequences, expected.sequences)
    for name in ("attentions", "hidden_states"):
        assert len(getattr(got, name)) == len(getattr(expected, name))
        for step_got, step_expected in zip(getattr(got, name), getattr(expected, name)):
            assert len(step_got) == len(step_expected)
            for ours_t, theirs_t in zip(step_got, step_expected):
                torch.testing.assert_close(ours_t, theirs_t, atol=1e-5, rtol=1e-4)
