"""serving/sampling.py: each row's token from its own settings, against hand-computed values."""

from __future__ import annotations

import math

import torch

from herd.serving.engine import SamplingParams
from herd.serving.sampling import SamplingRow, _truncate, choose


def _row(tokens=(), generated=(), seed=0, constraint=None, **params):
    """A row whose tokens are `tokens` then `generated`."""
    generator = torch.Generator().manual_seed(seed)
    return SamplingRow(SamplingParams(max_tokens=1, **params), [*tokens, *generated], len(tokens), generator,
                       constraint)


def test_truncation_keeps_top_k_top_p_and_min_p_sets():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4))
    kept = _truncate(logits, top_k=torch.tensor([2, 0, 0, 3]), top_p=torch.tensor([1.0, 0.7, 1.0, 0.6]),
                     min_p=torch.tensor([0.0, 0.0, 0.25, 0.0]))
    finite = torch.isfinite(kept).tolist()
    assert finite[0] == [True, True, False, False]  # top-2
    assert finite[1] == [True, True, False, False]  # 0.5 + 0.3 reach 0.7
    assert finite[2] == [True, True, True, False]  # min_p 0.25 of 0.5: 0.125 and above
    assert finite[3] == [True, True, False, False]  # top-3 then top-p 0.6
    assert torch.equal(kept[0, :2], logits[0, :2])  # kept logits unchanged


def test_logit_bias_is_added_before_the_choice_and_the_logprobs():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0], [2.0, 1.0, 0.5, 0.0]])
    rows = [_row(temperature=0.0, logit_bias=((0, -100.0), (3, 2.5)), logprobs=4), _row(temperature=0.0, logprobs=1)]
    biased, plain = choose(logits, rows)
    assert biased.token_id == 3 and plain.token_id == 0  # 0.0 + 2.5 beats 1.0; the other row untouched
    expected = torch.log_softmax(torch.tensor([-98.0, 1.0, 0.5, 2.5]), -1)
    assert math.isclose(biased.logprob, expected[3].item(), abs_tol=1e-6)
    assert math.isclose(dict(biased.top_logprobs)[0], expected[0].item(), abs_tol=1e-4)


def test_penalties_follow_transformers_and_openai():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    # 7: an id past the head's rows (Mllama's <|image|> in a prompt) is not penalised
    choice = choose(logits, [_row(tokens=[0, 1, 7], temperature=0.0, repetition_penalty=2.0, logprobs=4)])[0]
    expected = torch.tensor([1.0, -4.0, 1.0, 0.5])  # positive divided, negative multiplied
    assert choice.top_logprobs[0][0] in (0, 2)
    values = dict(choice.top_logprobs)
    for token, logprob in enumerate(torch.log_softmax(expected, -1).tolist()):
        assert math.isclose(values[token], logprob, abs_tol=1e-6)
    # frequency (per occurrence among generated) and presence (once): token 2 twice, token 3 once
    choice = choose(logits, [_row(tokens=[9], generated=[2, 2, 3], temperature=0.0, frequency_penalty=0.5,
                                  presence_penalty=0.25, logprobs=4)])[0]
    expected = torch.tensor([2.0, -2.0, 1.0 - 1.0 - 0.25, 0.5 - 0.5 - 0.25])
    values = dict(choice.top_logprobs)
    for token, logprob in enumerate(torch.log_softmax(expected, -1).tolist()):
        assert math.isclose(values[token], logprob, abs_tol=1e-6)


def test_samples_follow_the_distribution_and_the_generator():
    probabilities = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = torch.log(probabilities)[None]
    generator = torch.Generator().manual_seed(0)
    row = SamplingRow(SamplingParams(max_tokens=1, temperature=1.0), [], 0, generator)
    draws = torch.tensor([choose(logits, [row])[0].token_id for _ in range(3000)])
    frequencies = torch.bincount(draws, minlength=4).float() / 3000
    assert torch.allclose(frequencies, probabilities, atol=0.03)
    assert frequencies[3] == 0
    again = SamplingRow(row.params, [], 0, torch.Generator().manual_seed(0))
    assert [choose(logits, [again])[0].token_id for _ in range(50)] == draws[:50].tolist()


def test_top_k_one_is_greedy_and_rows_are_independent():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    rows = [_row(temperature=0.0), _row(temperature=1.3, top_k=1, seed=5), _row(temperature=0.7, seed=6)]
    choices = choose(logits, rows)
    assert [c.token_id for c in choices[:2]] == logits[:2].argmax(dim=-1).tolist()
    alone = choose(logits[2:], [_row(temperature=0.7, seed=6)])[0]
    assert alone.token_id == choices[2].token_id


def test_constraint_mask_applies_before_the_choice():
    class OnlyThree:
        def fill_allowed(self, allowed):
            allowed[:] = False
            allowed[3] = True

    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0]])
    choice = choose(logits, [_row(temperature=0.0, constraint=OnlyThree(), logprobs=1)])[0]
    assert choice.token_id == 3 and choice.logprob == 0.0 and choice.top_logprobs == [(3, 0.0)]


def test_the_callers_logits_stay_as_they_were():
    """choose edits a copy where a row's bias or penalties change its logits; greedy rows without
    logprobs read the logits as given (no copy, no scaling) and get their argmax."""
    logits = torch.tensor([[0.1, 2.0, 0.3, -1.0], [1.5, 0.2, 0.1, 0.0], [0.0, 0.1, 0.2, 3.0]])
    kept = logits.clone()
    rows = [_row(temperature=0.0), _row(generated=[0], temperature=0.0, presence_penalty=2.0),
            _row(temperature=0.0, logit_bias=((0, 100.0),), logprobs=1)]
    choices = choose(logits, rows)
    assert torch.equal(logits, kept)
    assert [c.token_id for c in choices] == [1, 1, 0]
    assert [c.token_id for c in choose(logits[:1], rows[:1])] == [1]


def test_drawn_copies_give_the_same_choices():
    """What async scheduling does with a batch's draw: its tensors copied elsewhere (pinned host
    memory on a GPU) and put back in `tensors()`'s order give the same choices, logprobs included,
    as `choose`; rows without logprobs carry none."""
    from herd.serving.sampling import draw

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    rows = [_row(temperature=0, logprobs=3), _row(temperature=0), _row(seed=7, temperature=0.7, logprobs=0),
            _row(seed=8, temperature=1.0, logprobs=5)]
    drawn = draw(logits, rows)
    copied = drawn.with_tensors([tensor.clone() for tensor in drawn.tensors()]).choices(rows)
    rows_again = [_row(temperature=0, logprobs=3), _row(temperature=0), _row(seed=7, temperature=0.7, logprobs=0),
                  _row(seed=8, temperature=1.0, logprobs=5)]
    assert copied == choose(logits, rows_again)
    assert [len(c.top_logprobs) if c.top_logprobs is not None else None for c in copied] == [3, None, 0, 5]
    assert copied[1].logprob is None and copied[0].token_id == logits[0].argmax().item()
    plain = draw(logits, [_row(temperature=0)] * 4)
    assert plain.with_tensors([t.clone() for t in plain.tensors()]).choices([_row(temperature=0)] * 4) == \
        choose(logits, [_row(temperature=0)] * 4)
