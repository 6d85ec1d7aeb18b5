"""Logits processors: the reference's order and arithmetic, each a small callable.

Each takes (input_ids (batch, seq), scores (batch, vocab)) and returns new scores. Filtered
tokens get -inf, as in the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .configuration import GenerationConfig

logger = logging.getLogger("herd")

# What herd's own processors are: plain callables of (input_ids, scores) -> scores.
Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LogitsProcessor:
    """A user's logits processor, as in transformers: `__call__(input_ids (batch, seq), scores
    (batch, vocab))` returns new scores. (herd's own processors are plain callables of the same
    signature.)"""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define __call__(input_ids, scores)")


class LogitsProcessorList(list):
    """Processors applied in order; generate(logits_processor=...) runs them after herd's own."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores
FILTERED = -float("inf")


def repetition_penalty(penalty: float, left_padding: torch.Tensor | None = None) -> Processor:
    """Tokens already in the sequence: negative scores multiplied by `penalty`, positive ones divided.

    left_padding (batch,): how many leading positions of each row are padding. They are not part
    of the row's sequence, so they are not penalised: a padded row gets the scores it gets alone
    (as in transformers from 5.23, which skips them; 5.17 penalised the pad token too)."""

    def process(input_ids, scores):
        if left_padding is None:
            seen = torch.gather(scores, 1, input_ids)
            penalised = torch.where(seen < 0, seen * penalty, seen / penalty)
            return scores.scatter(1, input_ids, penalised)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        counted = (positions[None, :] >= left_padding.to(input_ids.device)[:, None]).to(scores.dtype)  # (batch, seq)
        present = torch.zeros_like(scores).scatter_add(1, input_ids, counted) > 0  # (batch, vocab)
        return torch.where(present, torch.where(scores < 0, scores * penalty, scores / penalty), scores)

    return process


def suppress_eos_before(min_length: int, eos_ids: torch.Tensor, prompt_length: int = 0) -> Processor:
    """No eos until the sequence (minus `prompt_length`) has `min_length` tokens."""

    def process(input_ids, scores):
        if input_ids.shape[-1] - prompt_length < min_length:
            eos_mask = torch.isin(torch.arange(scores.shape[-1], device=scores.device), eos_ids.to(scores.device))
            scores = scores.masked_fill(eos_mask, FILTERED)
        return scores

    return process


def temperature(value: float) -> Processor:
    return lambda input_ids, scores: scores / value


def top_k(k: int, min_tokens_to_keep: int = 1, filter_value: float = FILTERED) -> Processor:
    k = max(k, min_tokens_to_keep)

    def process(input_ids, scores):
        kth_best = torch.topk(scores, min(k, scores.shape[-1]))[0][..., -1, None]
        return scores.masked_fill(scores < kth_best, filter_value)

    return process


def top_p(p: float, min_tokens_to_keep: int = 1, filter_value: float = FILTERED) -> Processor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p."""

    def process(input_ids, scores):
        sorted_scores, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - p)
        remove_sorted[..., -min_tokens_to_keep:] = False
        remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
        return scores.masked_fill(remove, filter_value)

    return process


def min_p(p: float, min_tokens_to_keep: int = 1, filter_value: float = FILTERED) -> Processor:
    """Drop tokens less likely than p times the most likely one."""

    def process(input_ids, scores):
        probs = scores.softmax(dim=-1)
        remove = probs < p * probs.amax(dim=-1, keepdim=True)
        keep = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
        remove.scatter_(-1, keep, False)
        return scores.masked_fill(remove, filter_value)

    return process


def typical_p(mass: float, min_tokens_to_keep: int = 1, filter_value: float = FILTERED) -> Processor:
    """Keep the tokens whose surprise is closest to the distribution's entropy, until they hold `mass`."""

    def process(input_ids, scores):
        log_probs = scores.log_softmax(dim=-1)
        entropy = -(log_probs * log_probs.exp()).nansum(-1, keepdim=True)
        distance = (-log_probs - entropy).abs()
        sorted_distance, order = torch.sort(distance, descending=False)
        cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last_kept = (cumulative < mass).sum(dim=1).clamp(max=scores.shape[-1] - 1)
        remove_sorted = sorted_distance > sorted_distance.gather(1, last_kept[:, None])
        remove_sorted[..., :min_tokens_to_keep] = False
        return scores.masked_fill(remove_sorted.scatter(1, order, remove_sorted), filter_value)

    return process


def _drop_below(threshold, scores: torch.Tensor, min_tokens_to_keep: int, filter_value: float = FILTERED) -> torch.Tensor:
    """Filter tokens with probability under `threshold`, sparing the `min_tokens_to_keep` best."""
    kth_best = torch.topk(scores, min(min_tokens_to_keep, scores.shape[-1]))[0][..., -1, None]
    return scores.masked_fill((scores.softmax(dim=-1) < threshold) & (scores < kth_best), filter_value)


def epsilon_cutoff(epsilon: float, min_tokens_to_keep: int = 1, filter_value: float = FILTERED) -> Processor:
    return lambda input_ids, scores: _drop_below(epsilon, scores, min_tokens_to_keep, filter_value)


def _entropy(scores: torch.Tensor) -> torch.Tensor:
    # torch's Categorical, as the reference uses, so the arithmetic (clamping -inf) is identical; without
    # its argument check, so that a finished row's invalid (NaN) scores do not fail the call (generate()
    # draws padding for it; a running row's NaN still fails at the draw, as in transformers).
    return torch.distributions.Categorical(logits=scores, validate_args=False).entropy()


def eta_cutoff(epsilon: float, min_tokens_to_keep: int = 1, filter_value: float = FILTERED) -> Processor:
    """Epsilon cutoff whose threshold shrinks with the entropy: min(eps, sqrt(eps) * exp(-entropy))."""
    epsilon_tensor = torch.tensor(epsilon)

    def process(input_ids, scores):
        eps = epsilon_tensor.to(scores.device)
        eta = torch.min(eps, eps.sqrt() * torch.exp(-_entropy(scores)))[..., None]
        return _drop_below(eta, scores, min_tokens_to_keep, filter_value)

    return process


def top_h(fraction: float, candidates: int = 100, filter_value: float = FILTERED) -> Processor:
    """Among the best `candidates` tokens, keep the most likely ones while their summed entropy terms stay
    within `fraction` of the candidates' entropy (the best token always)."""

    def process(input_ids, scores):
        best_scores, best_ids = torch.topk(scores, min(candidates, scores.shape[-1]), dim=-1)
        distribution = torch.distributions.Categorical(logits=best_scores, validate_args=False)  # (as _entropy)
        probs = distribution.probs
        budget = (distribution.entropy() * fraction)[:, None]
        keep_best = (-probs * probs.log()).cumsum(dim=-1) <= budget
        keep_best[:, 0] = True
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter(1, best_ids, keep_best)
        return scores.masked_fill(~keep, filter_value)

    return process


def _as_bias_dict(sequence_bias) -> dict[tuple[int, ...], float]:
    """{(ids...): bias} from the dict form or the list form [[ids], bias] (generation_config.json)."""
    if isinstance(sequence_bias, dict):
        pairs = list(sequence_bias.items())
    elif isinstance(sequence_bias, (list, tuple)):
        pairs = [(entry[0], entry[1]) if isinstance(entry, (list, tuple)) and len(entry) == 2 else (None, None)
                 for entry in sequence_bias]
    else:
        pairs = []
    if not pairs or any(not isinstance(ids, (list, tuple)) or not ids or not isinstance(bias, float)
                        or any(not isinstance(t, int) or t < 0 for t in ids) for ids, bias in pairs):
        raise ValueError(f"sequence_bias must map non-empty token id sequences to float biases, got {sequence_bias!r}")
    return {tuple(ids): bias for ids, bias in pairs}


def sequence_bias(biases: dict[tuple[int, ...], float]) -> Processor:
    """Add a bias to a sequence's last token when the tokens before it end the input (single tokens: always).

    Biases are summed into one tensor in the order given, then added to the scores, as in the reference.
    """
    single = {ids[0]: bias for ids, bias in biases.items() if len(ids) == 1}
    longer = [(ids, bias) for ids, bias in biases.items() if len(ids) > 1]

    def process(input_ids, scores):
        too_big = [t for ids in biases for t in ids if t >= scores.shape[-1]]
        if too_big:
            raise ValueError(f"the model's vocabulary has {scores.shape[-1]} tokens; sequence_bias names tokens {too_big}")
        single_bias = torch.zeros(scores.shape[-1], device=scores.device)
        if single:
            single_bias[list(single)] = torch.tensor(list(single.values()), device=scores.device)
        bias = torch.zeros_like(scores) + single_bias
        for ids, value in longer:
            if len(ids) > input_ids.shape[1]:
                continue
            prefix = torch.tensor(ids[:-1], dtype=input_ids.dtype, device=input_ids.device)
            matches = (input_ids[:, -len(prefix) :] == prefix).all(dim=1)
            bias[:, ids[-1]] += torch.where(matches, torch.tensor(value, device=scores.device), torch.tensor(0.0, device=scores.device))
        return scores + bias

    return process


def bad_words(bad_words_ids: list[list[int]], eos_ids: torch.Tensor | None) -> Processor:
    """Never complete a bad word: a sequence bias of -inf (a lone eos is not banned, as in the reference)."""
    if not isinstance(bad_words_ids, list) or not bad_words_ids or any(
        not isinstance(word, list) or any(not isinstance(t, int) or t < 0 for t in word) for word in bad_words_ids
    ):
        raise ValueError(f"bad_words_ids must be a non-empty list of lists of token ids, got {bad_words_ids!r}")
    eos_list = eos_ids.tolist() if eos_ids is not None else []
    words = [word for word in bad_words_ids if not (len(word) == 1 and word[0] in eos_list)]
    return sequence_bias({tuple(word): FILTERED for word in words})


def _ban_ngram_completions(ngrams: torch.Tensor, input_ids: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Ban every token that, after the sequence's last n-1 tokens, would complete one of `ngrams`
    (rows, windows, n)."""
    current_prefix = input_ids[:, input_ids.shape[-1] - n + 1 :]  # the last n-1 tokens
    repeats_prefix = (ngrams[..., :-1] == current_prefix[:, None]).all(dim=-1)  # (rows, windows)
    vocab = scores.shape[-1]
    # Windows whose prefix differs point at an extra column (vocab), dropped afterwards.
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(repeats_prefix, ngrams[..., -1], vocab), True)
    return scores.masked_fill(banned[:, :vocab], FILTERED)


def no_repeat_ngram(n: int) -> Processor:
    """Ban every token that would repeat an n-gram already in the sequence."""

    def process(input_ids, scores):
        if input_ids.shape[-1] < n:
            return scores
        return _ban_ngram_completions(input_ids.unfold(1, n, 1), input_ids, scores, n)

    return process


def prompt_repetition_reward(penalty: float, prompt_ids: torch.Tensor) -> Processor:
    """encoder_repetition_penalty on a decoder-only model: the inverse of repetition_penalty for the
    tokens of the prompt (prompt_ids (rows, prompt)), so a penalty above 1 favours them."""
    inverse = 1.0 / penalty

    def process(input_ids, scores):
        seen = torch.gather(scores, 1, prompt_ids)
        rewarded = torch.where(seen < 0, seen * inverse, seen / inverse)
        return scores.scatter(1, prompt_ids, rewarded)

    return process


def prompt_no_repeat_ngram(n: int, prompt_ids: torch.Tensor) -> Processor:
    """encoder_no_repeat_ngram_size on a decoder-only model: ban every token that would complete an
    n-gram of the prompt (prompt_ids (rows, prompt)) after the sequence's last n-1 tokens."""
    ngrams = prompt_ids.unfold(1, n, 1) if prompt_ids.shape[1] >= n else None  # (rows, windows, n)

    def process(input_ids, scores):
        return scores if ngrams is None else _ban_ngram_completions(ngrams, input_ids, scores, n)

    return process


def force_tokens_at(length: int, token_ids: int | list[int]) -> Processor:
    """When the sequence has `length` tokens, only `token_ids` are possible (score 0, the rest -inf)."""

    def process(input_ids, scores):
        if input_ids.shape[-1] != length:
            return scores
        forced = torch.full_like(scores, FILTERED)
        forced[:, token_ids] = 0
        return forced

    return process


def remove_invalid_values(input_ids, scores):
    """nan -> 0 and +-inf -> the dtype's largest/smallest finite value."""
    finite = torch.finfo(scores.dtype)
    cleaned = torch.where(scores != scores, 0.0, scores)
    cleaned = torch.where(scores == float("inf"), finite.max, cleaned)
    return torch.where(scores == -float("inf"), finite.min, cleaned)


def exponential_decay_length_penalty(start: int, factor: float, eos_ids: torch.Tensor, prompt_length: int) -> Processor:
    """After `start` new tokens, raise eos scores by |score| * (factor ** tokens_past_start - 1)."""
    regulation_start = start + prompt_length

    def process(input_ids, scores):
        length = input_ids.shape[-1]
        if length <= regulation_start:
            return scores
        eos = eos_ids.to(scores.device)
        penalties = torch.zeros_like(scores)
        penalties[:, eos] = scores[:, eos].abs() * (pow(factor, length - regulation_start) - 1)
        return scores + penalties

    return process


def suppress_tokens(token_ids, at_length: int | None = None) -> Processor:
    """`token_ids` get -inf (only when the sequence has `at_length` tokens, if given)."""
    token_ids = torch.tensor(list(token_ids), dtype=torch.long)

    def process(input_ids, scores):
        if at_length is not None and input_ids.shape[-1] != at_length:
            return scores
        mask = torch.isin(torch.arange(scores.shape[-1], device=scores.device), token_ids.to(scores.device))
        return torch.where(mask, FILTERED, scores)

    return process


def renormalize(input_ids, scores):
    return scores.log_softmax(dim=-1)


def classifier_free_guidance(scale: float, model, negative_ids: torch.Tensor | None = None,
                             negative_mask: torch.Tensor | None = None, use_cache: bool = True) -> Processor:
    """guidance_scale: scores pushed away from an unconditional run of the same model, as transformers
    does for decoder-only models: log_softmax(scores) and the unconditional run's log_softmax
    mixed as scale * (conditional - unconditional) + unconditional. The unconditional run starts
    from `negative_ids` (a negative prompt) or, without one, from the last prompt token, and keeps
    its own cache."""
    state = {"ids": negative_ids, "mask": negative_mask, "cache": None, "first": True}

    def unconditional_logits(input_ids):
        if state["first"]:
            if state["ids"] is None:
                state["ids"] = input_ids[:, -1:]
            if state["mask"] is None:
                state["mask"] = torch.ones_like(state["ids"], dtype=torch.long)
            ids, state["first"] = state["ids"], False
        else:
            state["mask"] = torch.cat([state["mask"], torch.ones_like(input_ids[:, -1:], dtype=torch.long)], dim=1)
            ids = input_ids[:, -1:] if use_cache else torch.cat([state["ids"], input_ids[:, -1:]], dim=1)
            state["ids"] = ids
        out = model(ids, attention_mask=state["mask"], use_cache=use_cache, past_key_values=state["cache"],
                    return_dict=True)
        state["cache"] = out.past_key_values
        return out.logits[:, -1]

    def process(input_ids, scores):
        scores = torch.nn.functional.log_softmax(scores, dim=-1)
        unconditional = torch.nn.functional.log_softmax(unconditional_logits(input_ids).float(), dim=-1)
        return scale * (scores - unconditional) + unconditional

    return process


def _as(reference_class: str, process: Processor) -> Processor:
    """Name the transformers class a processor of build_logits_processors stands for: a user's
    processor of that class takes its place (see _merge_user_processors)."""
    process.reference_class = reference_class
    return process


def _merge_user_processors(processors: list, custom: list) -> list:
    """As the reference merges generate(logits_processor=...) into its own list: a user's processor of
    the same class as one of generate()'s takes that one's place (a warning says so); the others
    follow generate()'s, before the sampling warpers (which a user's processor never replaces)."""
    merged = []
    for default in processors:
        name = getattr(default, "reference_class", type(default).__name__)
        same = next((c for c in custom if type(c).__name__ == name), None)
        if same is not None:
            logger.warning("generate(logits_processor=...) has a %s, which generate() also makes from its options: "
                           "the one passed in is used instead", name)
        merged.append(default if same is None else same)
    return merged + [c for c in custom if not any(c is m for m in merged)]


def build_logits_processors(config: GenerationConfig, eos_ids: torch.Tensor | None, prompt_length: int,
                            left_padding: torch.Tensor | None = None,
                            prompt_ids: torch.Tensor | None = None, vocab_size: int | None = None,
                            device: torch.device | None = None, *, leading: list | tuple = (),
                            custom: list | tuple = ()) -> list[Processor]:
    """The processors `config` asks for, in the reference's order (_get_logits_processor): the order
    changes the scores (e.g. a bias before or after a penalty), so it is kept exactly.

    `leading`: what runs first (classifier-free guidance); `custom`: the user's
    generate(logits_processor=...), merged in as the reference does (_merge_user_processors): after
    the processors, before the sampling warpers, watermarking and renormalisation.

    vocab_size (the model's, from its text config) and device (the prompt's) are what a watermark
    needs: its green lists are drawn over that vocabulary, with a generator on that device.

    `config.max_length` is the final length (prompt included) and `config.min_length` already
    accounts for min_new_tokens (see GenerationMixin._check_lengths).
    """
    processors: list[Processor] = [_as("UnbatchedClassifierFreeGuidanceLogitsProcessor", p) for p in leading]
    if config.sequence_bias is not None:
        processors.append(_as("SequenceBiasLogitsProcessor", sequence_bias(_as_bias_dict(config.sequence_bias))))
    # prompt_ids (rows, prompt): a decoder-only model's "encoder input" is its prompt
    if config.encoder_repetition_penalty is not None and config.encoder_repetition_penalty != 1.0:
        processors.append(_as("EncoderRepetitionPenaltyLogitsProcessor",
                              prompt_repetition_reward(config.encoder_repetition_penalty, prompt_ids)))
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(_as("RepetitionPenaltyLogitsProcessor", repetition_penalty(config.repetition_penalty, left_padding)))
    if config.no_repeat_ngram_size:
        processors.append(_as("NoRepeatNGramLogitsProcessor", no_repeat_ngram(config.no_repeat_ngram_size)))
    if config.encoder_no_repeat_ngram_size:
        processors.append(_as("EncoderNoRepeatNGramLogitsProcessor",
                              prompt_no_repeat_ngram(config.encoder_no_repeat_ngram_size, prompt_ids)))
    if config.bad_words_ids is not None:
        processors.append(_as("NoBadWordsLogitsProcessor", bad_words(config.bad_words_ids, eos_ids)))
    # A min_length the prompt already reaches bans nothing (min_new_tokens=0 gives one): left out so that
    # plain greedy decoding keeps its processor-free fast path.
    if eos_ids is not None and config.min_length and config.min_length > prompt_length:
        processors.append(_as("MinLengthLogitsProcessor", suppress_eos_before(config.min_length, eos_ids)))
    if eos_ids is not None and config.min_new_tokens:
        processors.append(_as("MinNewTokensLengthLogitsProcessor",
                              suppress_eos_before(config.min_new_tokens, eos_ids, prompt_length)))
    # generate(prefix_allowed_tokens_fn=...), at transformers' place in the order
    prefix_allowed_tokens_fn = getattr(config, "_prefix_allowed_tokens_fn", None)
    if prefix_allowed_tokens_fn is not None:
        processors.append(PrefixConstrainedLogitsProcessor(prefix_allowed_tokens_fn, config.num_beams))
    if config.forced_bos_token_id is not None:
        processors.append(_as("ForcedBOSTokenLogitsProcessor", force_tokens_at(1, config.forced_bos_token_id)))
    if config.forced_eos_token_id is not None:
        processors.append(_as("ForcedEOSTokenLogitsProcessor",
                              force_tokens_at(config.max_length - 1, config.forced_eos_token_id)))
    if config.remove_invalid_values is True:
        processors.append(_as("InfNanRemoveLogitsProcessor", remove_invalid_values))
    if config.exponential_decay_length_penalty is not None:
        if eos_ids is None:
            raise ValueError("exponential_decay_length_penalty needs an eos_token_id (it raises the eos scores)")
        start, factor = config.exponential_decay_length_penalty
        processors.append(_as("ExponentialDecayLengthPenalty", exponential_decay_length_penalty(start, factor, eos_ids, prompt_length)))
    if config.suppress_tokens is not None:
        processors.append(_as("SuppressTokensLogitsProcessor", suppress_tokens(config.suppress_tokens)))
    if config.begin_suppress_tokens is not None:
        # The first new token; one later when a forced bos takes that place after a prompt of one token
        # (or none: inputs_embeds alone).
        begin = prompt_length + (1 if prompt_length <= 1 and config.forced_bos_token_id is not None else 0)
        processors.append(_as("SuppressTokensAtBeginLogitsProcessor", suppress_tokens(config.begin_suppress_tokens, at_length=begin)))
    processors = _merge_user_processors(processors, list(custom))
    if config.do_sample:
        # Beam sampling keeps one more candidate than there are eos ids, so a beam can continue.
        keep = 1 if config.num_beams == 1 else (len(eos_ids) + 1 if eos_ids is not None else 2)
        if config.temperature != 1.0:
            processors.append(temperature(config.temperature))
        if config.top_h is not None:
            processors.append(top_h(config.top_h))
        if config.top_k:
            processors.append(top_k(config.top_k, keep))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(top_p(config.top_p, keep))
        if config.min_p is not None:
            processors.append(min_p(config.min_p, keep))
        if config.typical_p is not None and config.typical_p < 1.0:
            processors.append(typical_p(config.typical_p, keep))
        if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
            processors.append(epsilon_cutoff(config.epsilon_cutoff, keep))
        if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
            processors.append(eta_cutoff(config.eta_cutoff, keep))
    # Watermarking comes after every other change to the scores (transformers #34630), but before
    # renormalising: the watermark's bias ends up inside the normalised log-probabilities.
    if config.watermarking_config is not None:
        if vocab_size is None or device is None:
            raise ValueError("watermarking needs the model's vocab_size and the device to draw its green lists on")
        processors.append(config.watermarking_config.construct_processor(vocab_size, device))
    if config.renormalize_logits is True:  # always last
        processors.append(renormalize)
    return processors


def apply_processors(processors: list[Processor], input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for process in processors:
        scores = process(input_ids, scores)
    return scores


# --- transformers' named processor classes -------------------------------------------------------
# Users build these themselves (LogitsProcessorList([TopKLogitsWarper(10), ...]) passed as
# generate(logits_processor=...)): each wraps the function above that generate() uses, with
# transformers' constructor arguments.


def _ids_list(eos_token_id) -> list[int]:
    if isinstance(eos_token_id, torch.Tensor):
        return eos_token_id.flatten().tolist()
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


class _FunctionProcessor(LogitsProcessor):
    """A LogitsProcessor running one of the functions above (a warper's `filter_value` goes to its function:
    every token the warper removes gets it, one already at -inf included, as in the reference)."""

    _process: Processor

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self._process(input_ids, scores)


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` has to be a strictly positive integer, but is {value}")


class RepetitionPenaltyLogitsProcessor(_FunctionProcessor):
    def __init__(self, penalty: float, prompt_ignore_length: int | None = None):
        if not isinstance(penalty, float) or not penalty > 0:
            raise ValueError(f"`penalty` has to be a strictly positive float, but is {penalty}")
        self.penalty, self.prompt_ignore_length = penalty, prompt_ignore_length
        process = repetition_penalty(penalty)
        # prompt_ignore_length: the first tokens (the prompt) are not penalised
        self._process = (process if not prompt_ignore_length
                         else lambda ids, scores: process(ids[:, prompt_ignore_length:], scores))


class TemperatureLogitsWarper(_FunctionProcessor):
    def __init__(self, temperature: float):
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"`temperature` (={temperature}) has to be a strictly positive float")
        self.temperature = temperature
        self._process = globals()["temperature"](temperature)


class TopKLogitsWarper(_FunctionProcessor):
    def __init__(self, top_k: int, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
        _positive_int("top_k", top_k)
        self.top_k, self.filter_value = max(top_k, min_tokens_to_keep), filter_value
        self._process = top_k_function(top_k, min_tokens_to_keep, filter_value)


class TopPLogitsWarper(_FunctionProcessor):
    def __init__(self, top_p: float, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
        top_p = float(top_p)
        if not 0 <= top_p <= 1.0:
            raise ValueError(f"`top_p` has to be a float >= 0 and <= 1, but is {top_p}")
        _positive_int("min_tokens_to_keep", min_tokens_to_keep)
        self.top_p, self.filter_value, self.min_tokens_to_keep = top_p, filter_value, min_tokens_to_keep
        self._process = top_p_function(top_p, min_tokens_to_keep, filter_value)


class MinPLogitsWarper(_FunctionProcessor):
    def __init__(self, min_p: float, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
        if not 0 <= min_p <= 1.0:
            raise ValueError(f"`min_p` has to be a float in the [0, 1] interval, but is {min_p}")
        _positive_int("min_tokens_to_keep", min_tokens_to_keep)
        self.min_p, self.filter_value, self.min_tokens_to_keep = min_p, filter_value, min_tokens_to_keep
        self._process = min_p_function(min_p, min_tokens_to_keep, filter_value)


class TypicalLogitsWarper(_FunctionProcessor):
    def __init__(self, mass: float = 0.9, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
        mass = float(mass)
        if not 0 < mass < 1:
            raise ValueError(f"`typical_p` has to be a float > 0 and < 1, but is {mass}")
        _positive_int("min_tokens_to_keep", min_tokens_to_keep)
        self.mass, self.filter_value, self.min_tokens_to_keep = mass, filter_value, min_tokens_to_keep
        self._process = typical_p(mass, min_tokens_to_keep, filter_value)


class EpsilonLogitsWarper(_FunctionProcessor):
    def __init__(self, epsilon: float, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1):
        epsilon = float(epsilon)
        if not 0 < epsilon < 1:
            raise ValueError(f"`epsilon_cutoff` has to be a float > 0 and < 1, but is {epsilon}")
        _positive_int("min_tokens_to_keep", min_tokens_to_keep)
        self.epsilon, self.filter_value, self.min_tokens_to_keep = epsilon, filter_value, min_tokens_to_keep
        self._process = epsilon_cutoff(epsilon, min_tokens_to_keep, filter_value)


class EtaLogitsWarper(_FunctionProcessor):
    def __init__(self, epsilon: float, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1,
                 device: str = "cpu"):
        epsilon = float(epsilon)
        if not 0 < epsilon < 1:
            raise ValueError(f"`eta_cutoff` has to be a float > 0 and < 1, but is {epsilon}")
        _positive_int("min_tokens_to_keep", min_tokens_to_keep)
        self.epsilon, self.filter_value, self.min_tokens_to_keep = epsilon, filter_value, min_tokens_to_keep
        self._process = eta_cutoff(epsilon, min_tokens_to_keep, filter_value)


class TopHLogitsWarper(_FunctionProcessor):
    def __init__(self, top_h: float, filter_value: float = -float("inf")):
        if not 0.0 < top_h <= 1.0:
            raise ValueError(f"`top_h` has to be a float in the (0, 1] interval, but is {top_h}")
        self.top_h, self.filter_value = top_h, filter_value
        self._process = globals()["top_h"](top_h, filter_value=filter_value)  # (the argument hides the function)


class NoRepeatNGramLogitsProcessor(_FunctionProcessor):
    def __init__(self, ngram_size: int):
        _positive_int("ngram_size", ngram_size)
        self.ngram_size = ngram_size
        self._process = no_repeat_ngram(ngram_size)


class EncoderRepetitionPenaltyLogitsProcessor(_FunctionProcessor):
    """encoder_repetition_penalty as a class: the tokens of `encoder_input_ids` (rows, length; for a
    decoder-only model, the prompt) rewarded by `penalty` (a penalty above 1 favours them)."""

    def __init__(self, penalty: float, encoder_input_ids: torch.LongTensor):
        if not isinstance(penalty, float) or not penalty > 0:
            raise ValueError(f"`penalty` has to be a strictly positive float, but is {penalty}")
        self.penalty, self.encoder_input_ids = 1 / penalty, encoder_input_ids
        self._process = prompt_repetition_reward(penalty, encoder_input_ids)


class EncoderNoRepeatNGramLogitsProcessor(_FunctionProcessor):
    """encoder_no_repeat_ngram_size as a class: no n-gram of `encoder_input_ids` (rows, length) is
    completed; with several rows (beams) per input row, each row's own input's n-grams."""

    def __init__(self, encoder_ngram_size: int, encoder_input_ids: torch.LongTensor):
        if not isinstance(encoder_ngram_size, int) or isinstance(encoder_ngram_size, bool) or encoder_ngram_size < 1:
            raise ValueError(f"`encoder_ngram_size` has to be a strictly positive integer, but is {encoder_ngram_size}")
        if encoder_input_ids.dim() == 1:
            encoder_input_ids = encoder_input_ids.unsqueeze(0)
        self.ngram_size, self.batch_size = encoder_ngram_size, encoder_input_ids.shape[0]
        self.encoder_input_ids = encoder_input_ids
        self._by_rows: dict[int, Processor] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = scores.shape[0]
        if rows not in self._by_rows:
            repeated = self.encoder_input_ids.repeat_interleave(rows // self.batch_size, dim=0).to(scores.device)
            self._by_rows[rows] = prompt_no_repeat_ngram(self.ngram_size, repeated)
        return self._by_rows[rows](input_ids, scores)


class UnbatchedClassifierFreeGuidanceLogitsProcessor(_FunctionProcessor):
    """guidance_scale as a class: the scores mixed with an unconditional run of `model` that starts
    from `unconditional_ids` (a negative prompt) or the last prompt token (see classifier_free_guidance)."""

    def __init__(self, guidance_scale: float, model, unconditional_ids: torch.LongTensor | None = None,
                 unconditional_attention_mask: torch.LongTensor | None = None, use_cache: bool = True):
        self.guidance_scale, self.model = guidance_scale, model
        self._process = classifier_free_guidance(guidance_scale, model, unconditional_ids, unconditional_attention_mask,
                                                 use_cache)


class MinLengthLogitsProcessor(_FunctionProcessor):
    def __init__(self, min_length: int, eos_token_id, device: str = "cpu"):
        self.min_length, self.eos_token_id = min_length, torch.tensor(_ids_list(eos_token_id), device=device)
        self._process = suppress_eos_before(min_length, self.eos_token_id)


class MinNewTokensLengthLogitsProcessor(_FunctionProcessor):
    def __init__(self, prompt_length_to_skip: int, min_new_tokens: int, eos_token_id, device: str = "cpu"):
        self.prompt_length_to_skip, self.min_new_tokens = prompt_length_to_skip, min_new_tokens
        self.eos_token_id = torch.tensor(_ids_list(eos_token_id), device=device)
        self._process = suppress_eos_before(min_new_tokens, self.eos_token_id, prompt_length_to_skip)


class NoBadWordsLogitsProcessor(_FunctionProcessor):
    def __init__(self, bad_words_ids: list[list[int]], eos_token_id=None):
        self.bad_word_ids = bad_words_ids
        eos = None if eos_token_id is None else torch.tensor(_ids_list(eos_token_id))
        self._process = bad_words(bad_words_ids, eos)


class SequenceBiasLogitsProcessor(_FunctionProcessor):
    def __init__(self, sequence_bias):
        self.sequence_bias = sequence_bias
        self._process = globals()["sequence_bias"](_as_bias_dict(sequence_bias))


class SuppressTokensLogitsProcessor(_FunctionProcessor):
    def __init__(self, suppress_tokens, device: str = "cpu"):
        self.suppress_tokens = torch.tensor(list(suppress_tokens), device=device)
        self._process = globals()["suppress_tokens"](list(suppress_tokens))


class SuppressTokensAtBeginLogitsProcessor(_FunctionProcessor):
    def __init__(self, begin_suppress_tokens, begin_index, device: str = "cpu"):
        self.begin_suppress_tokens = torch.tensor(list(begin_suppress_tokens), device=device)
        self.begin_index = begin_index
        self._process = suppress_tokens(list(begin_suppress_tokens), at_length=begin_index)


class ForcedBOSTokenLogitsProcessor(_FunctionProcessor):
    def __init__(self, bos_token_id: int):
        self.bos_token_id = bos_token_id
        self._process = force_tokens_at(1, bos_token_id)


class ForcedEOSTokenLogitsProcessor(_FunctionProcessor):
    def __init__(self, max_length: int, eos_token_id, device: str = "cpu"):
        self.max_length, self.eos_token_id = max_length, torch.tensor(_ids_list(eos_token_id), device=device)
        self._process = force_tokens_at(max_length - 1, _ids_list(eos_token_id))


class InfNanRemoveLogitsProcessor(_FunctionProcessor):
    _process = staticmethod(remove_invalid_values)


class LogitNormalization(_FunctionProcessor):
    _process = staticmethod(renormalize)


class ExponentialDecayLengthPenalty(_FunctionProcessor):
    def __init__(self, exponential_decay_length_penalty: tuple[int, float], eos_token_id, input_ids_seq_length: int):
        self.regulation_start = exponential_decay_length_penalty[0] + input_ids_seq_length
        self.regulation_factor = exponential_decay_length_penalty[1]
        start, factor = exponential_decay_length_penalty
        self._process = exponential_decay_length_penalty_function(
            start, factor, torch.tensor(_ids_list(eos_token_id)), input_ids_seq_length)


class PrefixConstrainedLogitsProcessor(LogitsProcessor):
    """generate(prefix_allowed_tokens_fn=...): at each step only the tokens that
    `prefix_allowed_tokens_fn(batch_id, input_ids_of_the_row)` returns are allowed (the rest -inf)."""

    def __init__(self, prefix_allowed_tokens_fn, num_beams: int):
        self._prefix_allowed_tokens_fn, self._num_beams = prefix_allowed_tokens_fn, num_beams

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = torch.full_like(scores, FILTERED)
        rows = input_ids.view(-1, self._num_beams, input_ids.shape[-1])
        for batch_id, beams in enumerate(rows):
            for beam_id, sent in enumerate(beams):
                allowed = self._prefix_allowed_tokens_fn(batch_id, sent)
                if len(allowed) == 0:
                    raise ValueError(
                        f"`prefix_allowed_tokens_fn` returned an empty list for batch ID {batch_id}: no token is allowed")
                mask[batch_id * self._num_beams + beam_id, allowed] = 0
        return scores + mask


# (the classes above take the functions' names for their arguments)
top_k_function, top_p_function, min_p_function = top_k, top_p, min_p
exponential_decay_length_penalty_function = exponential_decay_length_penalty
