"""Watermarking, as in transformers' generate(watermarking_config=...): two schemes and their detectors.

* WatermarkingConfig -> WatermarkLogitsProcessor (Kirchenbauer et al. 2023, "A Watermark for Large
  Language Models"): at every step a pseudo-random "green" share of the vocabulary, drawn from a
  torch.Generator seeded by the previous token(s), gets `bias` added to its scores.
  WatermarkDetector counts the green tokens of a text and turns the count into a z-score.
* SynthIDTextWatermarkingConfig -> SynthIDTextWatermarkLogitsProcessor (Dathathri et al. 2024,
  SynthID-Text): every candidate token gets `depth` pseudo-random bits (g-values) from a hash of the
  previous ngram_len - 1 tokens and itself; a tournament over those bits reshapes the probabilities.
  Its detector is a trained Bayesian model, which herd does not provide: SynthIDTextWatermarkDetector
  runs a detector module the user brings on the g-values and masks computed here.

The random draws are the same torch calls on the same kind of generator as transformers', so green
lists, g-values and hence scores are transformers' own, bit for bit. A CUDA generator draws other
numbers than a CPU one, so (as there) a watermark depends on the device it was made on, and the
detector must be given that device.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("herd")


# --- configurations -------------------------------------------------------------------------------
class BaseWatermarkingConfig:
    """What both watermarking configs share: their dict and JSON forms (generation_config.json holds
    the dict under "watermarking_config")."""

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> BaseWatermarkingConfig:
        """The config of `config_dict`, then with the kwargs that name one of its fields set."""
        config = cls(**config_dict)
        config.update(**kwargs)
        return config

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    def __iter__(self):
        yield from self.to_dict().items()

    def to_json_string(self) -> str:
        return json.dumps(self.__dict__, indent=2) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        with open(json_file_path, "w", encoding="utf-8") as file:
            file.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def update(self, **kwargs: Any) -> None:
        """Set the given fields; names that are not fields are ignored (as transformers does)."""
        for key, value in kwargs.items():
            if hasattr(self, key):
                setattr(self, key, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def validate(self) -> None:
        raise NotImplementedError

    def construct_processor(self, vocab_size: int, device: Any):
        raise NotImplementedError


def _bad_field(key: str, wanted: str, found: Any) -> ValueError:
    return ValueError(f"watermarking_config: {key} should be {wanted}, found {found!r}")


class WatermarkingConfig(BaseWatermarkingConfig):
    """The green-list watermark (https://huggingface.co/papers/2306.04634).

    greenlist_ratio: the share of the vocabulary that is green at each step. bias: what green
    tokens get added to their scores. hashing_key: the secret the green lists derive from (15485863,
    the millionth prime, is public: deploy another). seeding_scheme: "lefthash" (the green list
    depends on the previous token) or "selfhash" (on the previous context_width - 1 tokens and the
    candidate itself, tried for the 40 best candidates). context_width: how many tokens the seed
    reads (lefthash reads only the last of them, as transformers; fewer tokens than that: no bias).
    """

    def __init__(self, greenlist_ratio: float = 0.25, bias: float = 2.0, hashing_key: int = 15485863,
                 seeding_scheme: str = "lefthash", context_width: int = 1):
        self.greenlist_ratio = greenlist_ratio
        self.bias = bias
        self.hashing_key = hashing_key
        self.seeding_scheme = seeding_scheme
        self.context_width = context_width

    def validate(self) -> None:
        if self.seeding_scheme not in ("selfhash", "lefthash"):
            raise _bad_field("seeding_scheme", "'selfhash' or 'lefthash'", self.seeding_scheme)
        if not 0.0 <= self.greenlist_ratio <= 1.0:
            raise _bad_field("greenlist_ratio", "in [0, 1]", self.greenlist_ratio)
        if not isinstance(self.context_width, int) or self.context_width < 1:
            raise _bad_field("context_width", "a positive integer", self.context_width)

    def construct_processor(self, vocab_size: int, device: Any) -> WatermarkLogitsProcessor:
        return WatermarkLogitsProcessor(vocab_size=vocab_size, device=device, greenlist_ratio=self.greenlist_ratio,
                                        bias=self.bias, hashing_key=self.hashing_key,
                                        seeding_scheme=self.seeding_scheme, context_width=self.context_width)


class SynthIDTextWatermarkingConfig(BaseWatermarkingConfig):
    """SynthID-Text (https://www.nature.com/articles/s41586-024-08025-4).

    ngram_len: the hashed window (the previous ngram_len - 1 tokens and the candidate). keys: one
    secret per tournament layer (their number is the depth). context_history_size: how many past
    contexts are remembered, so a repeated context is not watermarked twice. sampling_table_seed
    and sampling_table_size: the table of random bits hashes are mapped to. skip_first_ngram_calls:
    leave the first ngram_len - 1 steps alone. debug_mode: replace the scores by uniform ones first
    (to test the watermark on its own).
    """

    def __init__(self, ngram_len: int, keys: list[int], context_history_size: int = 1024, sampling_table_seed: int = 0,
                 sampling_table_size: int = 2**16, skip_first_ngram_calls: bool = False, debug_mode: bool = False):
        self.ngram_len = ngram_len
        self.keys = keys
        self.sampling_table_size = sampling_table_size
        self.sampling_table_seed = sampling_table_seed
        self.context_history_size = context_history_size
        self.skip_first_ngram_calls = skip_first_ngram_calls
        self.debug_mode = debug_mode

    def validate(self) -> None:
        if self.sampling_table_size > 2**24:
            raise _bad_field("sampling_table_size", "at most 2**24", self.sampling_table_size)
        if not isinstance(self.ngram_len, int) or self.ngram_len < 1:
            raise _bad_field("ngram_len", "a positive integer", self.ngram_len)
        if not isinstance(self.keys, (list, tuple)) or not self.keys or any(not isinstance(k, int) for k in self.keys):
            raise _bad_field("keys", "a non-empty list of integers", self.keys)

    def construct_processor(self, vocab_size: int, device: Any) -> SynthIDTextWatermarkLogitsProcessor:
        return SynthIDTextWatermarkLogitsProcessor(
            ngram_len=self.ngram_len, keys=self.keys, sampling_table_size=self.sampling_table_size,
            sampling_table_seed=self.sampling_table_seed, context_history_size=self.context_history_size,
            device=device, skip_first_ngram_calls=self.skip_first_ngram_calls, debug_mode=self.debug_mode)


def as_watermarking_config(value: Any) -> BaseWatermarkingConfig | None:
    """generate()'s and generation_config.json's forms of watermarking_config -> a config (None stays None).

    A dict is a WatermarkingConfig, as transformers reads it, unless it has SynthID's required
    fields (ngram_len, keys): then it is a SynthIDTextWatermarkingConfig. (transformers 5.17 passes
    those to WatermarkingConfig too, so it cannot read back a SynthID config it saved; herd can.)
    Another library's config object is read through its to_dict().
    """
    if value is None or isinstance(value, BaseWatermarkingConfig):
        return value
    if not isinstance(value, dict) and callable(getattr(value, "to_dict", None)):
        value = value.to_dict()
    if not isinstance(value, dict):
        raise TypeError(f"watermarking_config must be a WatermarkingConfig, a SynthIDTextWatermarkingConfig or a dict, "
                        f"got {type(value).__name__}")
    kind = SynthIDTextWatermarkingConfig if {"ngram_len", "keys"} & value.keys() else WatermarkingConfig
    try:
        return kind.from_dict(value)
    except TypeError as error:  # an unknown or missing field
        raise ValueError(f"watermarking_config {value!r} is not a valid {kind.__name__}: {error}") from None


# --- the green-list watermark ---------------------------------------------------------------------
_TABLE_SIZE = 1_000_003  # selfhash maps tokens through a random permutation of this many entries
_SELFHASH_CANDIDATES = 40  # selfhash tests only the best 40 candidates per step (as the original code)


class WatermarkLogitsProcessor:
    """Adds `bias` to the scores of each row's green tokens (see WatermarkingConfig).

    The green list is the first int(vocab_size * greenlist_ratio) entries of
    torch.randperm(vocab_size) drawn right after seeding the generator with
        lefthash: hashing_key * last token
        selfhash: min over the last context_width tokens t of
                  hashing_key * (table[t] + 1) * (table[last] + 1)   (int64, wrapping as torch does)
    (modulo 2**64 - 1), where table is the generator's first torch.randperm(1_000_003) after seeding
    it with hashing_key. selfhash puts the candidate itself last, and keeps a candidate's bias only
    when the candidate is in its own green list.
    """

    def __init__(self, vocab_size: int, device: Any, greenlist_ratio: float = 0.25, bias: float = 2.0,
                 hashing_key: int = 15485863, seeding_scheme: str = "lefthash", context_width: int = 1):
        if seeding_scheme not in ("selfhash", "lefthash"):
            raise ValueError(f"seeding_scheme must be 'selfhash' or 'lefthash', got {seeding_scheme!r}")
        if not 0.0 < greenlist_ratio < 1.0:
            raise ValueError(f"greenlist_ratio must be strictly between 0 and 1, got {greenlist_ratio!r}")
        self.vocab_size = vocab_size
        self.greenlist_size = int(vocab_size * greenlist_ratio)
        self.bias = bias
        self.hash_key = hashing_key
        self.seeding_scheme = seeding_scheme
        self.context_width = context_width
        self.rng = torch.Generator(device=device)
        self._table = None

    @property
    def fixed_table(self) -> torch.Tensor:
        # Drawn on first use (lefthash never needs it): each green list reseeds the generator, so
        # when the table is drawn changes nothing.
        if self._table is None:
            self.rng.manual_seed(self.hash_key)
            self._table = torch.randperm(_TABLE_SIZE, generator=self.rng, device=self.rng.device)
        return self._table

    def seeds(self, contexts: torch.Tensor) -> list:
        """The generator seeds (Python ints, before the modulo) of contexts (..., width >= 1)."""
        if self.seeding_scheme == "lefthash":
            return _times(self.hash_key, contexts[..., -1].tolist())
        ranks = self.fixed_table[(contexts % _TABLE_SIZE).to(self.rng.device)] + 1  # (..., width)
        return (self.hash_key * ranks * ranks[..., -1:]).amin(dim=-1).tolist()

    def greenlist(self, seed: int) -> torch.Tensor:
        """The green token ids of a seed (on the generator's device)."""
        self.rng.manual_seed(seed % (2**64 - 1))
        return torch.randperm(self.vocab_size, generator=self.rng, device=self.rng.device)[: self.greenlist_size]

    def _lefthash_green(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        green = torch.zeros(scores.shape, dtype=torch.bool, device=self.rng.device)
        drawn = {}  # one draw per distinct last token: rows (beams above all) often share one
        for row, seed in enumerate(self.seeds(input_ids[:, -1:])):
            if seed not in drawn:
                drawn[seed] = self.greenlist(seed)
            green[row, drawn[seed]] = True
        return green

    def _selfhash_green(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        count = min(_SELFHASH_CANDIDATES, scores.shape[-1])
        # Each row sorted on its own, as transformers does, so equal scores come in its order.
        candidates = torch.stack([row.sort(dim=-1, descending=True)[1][:count] for row in scores])  # (rows, count)
        context = input_ids[:, input_ids.shape[1] - (self.context_width - 1) :]  # the width - 1 tokens before
        windows = torch.cat([context[:, None, :].expand(-1, count, -1), candidates[..., None]], dim=-1)
        candidates = candidates.to(self.rng.device)
        # (rows, count): is each candidate in the green list that its own window seeds? (no host sync)
        is_green = torch.stack([
            torch.stack([(self.greenlist(seed) == candidate).any() for seed, candidate in zip(row_seeds, row_candidates)])
            for row_seeds, row_candidates in zip(self.seeds(windows), candidates)
        ])
        green = torch.zeros(scores.shape, dtype=torch.bool, device=self.rng.device)
        return green.scatter(1, candidates, is_green)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] < self.context_width:
            logger.warning("watermarking: input_ids should have at least %d tokens but has %d; no bias at this step",
                           self.context_width, input_ids.shape[-1])
            return scores
        find_green = self._selfhash_green if self.seeding_scheme == "selfhash" else self._lefthash_green
        green = find_green(input_ids, scores).to(scores.device)
        return torch.where(green, scores + self.bias, scores)


def _times(key: int, tokens: list) -> list:
    """key * token for (nested lists of) token ids, in Python's exact integers."""
    return [_times(key, t) if isinstance(t, list) else key * t for t in tokens]


@dataclass
class WatermarkDetectorOutput:
    """What WatermarkDetector(..., return_dict=True) returns, one entry per row (numpy arrays)."""

    num_tokens_scored: np.ndarray | None = None
    num_green_tokens: np.ndarray | None = None
    green_fraction: np.ndarray | None = None
    z_score: np.ndarray | None = None
    p_value: np.ndarray | None = None
    prediction: np.ndarray | None = None
    confidence: np.ndarray | None = None


class WatermarkDetector:
    """Is a text green-list watermarked? Counts each row's green tokens and compares the count with
    what chance gives (greenlist_ratio of the tokens scored): a z-score above `z_threshold` says yes.

    Give it the watermarking config, model config (vocab size, bos) and device the text was made
    with. A leading bos (looked at in the first row) is not scored. ignore_repeated_ngrams=True
    scores each distinct n-gram once. (transformers 5.17 documents the same but counts n-grams
    that are torch tensors, which never compare equal as dict keys, so there it changes nothing;
    with the default False both count every n-gram.) max_cache_size: how many green-list look-ups
    are remembered.
    """

    def __init__(self, model_config: Any, device: Any, watermarking_config: WatermarkingConfig | dict,
                 ignore_repeated_ngrams: bool = False, max_cache_size: int = 128):
        config = as_watermarking_config(watermarking_config)
        if not isinstance(config, WatermarkingConfig):
            raise TypeError("WatermarkDetector detects the green-list watermark (WatermarkingConfig); SynthID text "
                            "needs a trained detector: see SynthIDTextWatermarkDetector")
        text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        if getattr(model_config, "is_encoder_decoder", False):
            self.bos_token_id = model_config.decoder_start_token_id
        else:
            self.bos_token_id = getattr(model_config, "bos_token_id", getattr(text_config, "bos_token_id", None))
        self.greenlist_ratio = config.greenlist_ratio
        self.ignore_repeated_ngrams = ignore_repeated_ngrams
        self.processor = config.construct_processor(text_config.vocab_size, device)
        self._is_green = functools.lru_cache(maxsize=max_cache_size)(self._is_green_uncached)

    def _is_green_uncached(self, context: tuple[int, ...], target: int) -> bool:
        (seed,) = self.processor.seeds(torch.tensor([context]))
        return bool((self.processor.greenlist(seed) == target).any())

    def _count_green(self, input_ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Per row: how many tokens were scored and how many of them are green."""
        selfhash = self.processor.seeding_scheme == "selfhash"
        # lefthash scores each token after its context_width predecessors; selfhash each window's last
        size = self.processor.context_width + (0 if selfhash else 1)
        scored, green = np.zeros(input_ids.shape[0]), np.zeros(input_ids.shape[0])
        for row, ngrams in enumerate(input_ids.unfold(1, size, 1).tolist()):
            ngrams = [tuple(ngram) for ngram in ngrams]
            if self.ignore_repeated_ngrams:
                ngrams = list(dict.fromkeys(ngrams))
            scored[row] = len(ngrams)
            green[row] = sum(self._is_green(ngram if selfhash else ngram[:-1], ngram[-1]) for ngram in ngrams)
        return scored, green

    def _compute_z_score(self, green_token_count: np.ndarray, total_num_tokens: np.ndarray) -> np.ndarray:
        # a binomial count's z-score: (green - expected) / standard deviation
        ratio = self.greenlist_ratio
        return (green_token_count - ratio * total_num_tokens) / np.sqrt(total_num_tokens * ratio * (1 - ratio))

    def _compute_pval(self, x: np.ndarray, loc: float = 0, scale: float = 1) -> np.ndarray:
        # the normal tail, through transformers' closed-form approximation of erf (so p-values agree)
        z = (x - loc) / scale
        return 1 - (0.5 * (1 + np.sign(z) * (1 - np.exp(-2 * z**2 / np.pi))))

    def __call__(self, input_ids: torch.Tensor, z_threshold: float = 3.0,
                 return_dict: bool = False) -> WatermarkDetectorOutput | np.ndarray:
        """input_ids (batch, length): best without the prompt. Returns the predictions (batch,) or,
        with return_dict=True, a WatermarkDetectorOutput."""
        if self.bos_token_id is not None and input_ids[0, 0] == self.bos_token_id:
            input_ids = input_ids[:, 1:]
        if input_ids.shape[-1] - self.processor.context_width < 1:
            raise ValueError(f"nothing to score: the first context_width={self.processor.context_width} tokens only "
                             "seed the green lists; at least one more is needed")
        scored, green = self._count_green(input_ids)
        z_score = self._compute_z_score(green, scored)
        prediction = z_score > z_threshold
        if not return_dict:
            return prediction
        p_value = self._compute_pval(z_score)
        return WatermarkDetectorOutput(num_tokens_scored=scored, num_green_tokens=green, green_fraction=green / scored,
                                       z_score=z_score, p_value=p_value, prediction=prediction, confidence=1 - p_value)


# --- SynthID-Text ---------------------------------------------------------------------------------
_LCG_MULTIPLIER = 6364136223846793005  # the hash is a linear congruential generator (newlib/musl constants)


def _fold_hash(hashes: torch.Tensor, data: torch.Tensor, multiplier: int = _LCG_MULTIPLIER,
               increment: int = 1) -> torch.Tensor:
    """Fold data (..., n) into hashes (...): hash = (hash + x) * multiplier + increment for each x in
    turn, in int64 that wraps around. Folding a then b equals folding a + b."""
    for i in range(data.shape[-1]):
        hashes = (hashes + data[..., i]) * multiplier + increment
    return hashes


class SynthIDTextWatermarkState:
    """What the processor remembers between steps: each row's last ngram_len - 1 tokens (zeros at the
    first step, as transformers) and the hashes of its recent contexts (newest first)."""

    def __init__(self, batch_size: int, ngram_len: int, context_history_size: int, device: Any):
        self.context = torch.zeros((batch_size, ngram_len - 1), dtype=torch.int64, device=device)
        self.context_history = torch.zeros((batch_size, context_history_size), dtype=torch.int64, device=device)
        self.num_calls = 0


class SynthIDTextWatermarkLogitsProcessor:
    """SynthID-Text's tournament sampling (see SynthIDTextWatermarkingConfig), as a logits processor.

    For every candidate token, hash(context, candidate, key) for each key indexes a table of random
    bits: its g-values. Layer by layer, probabilities move towards the candidates whose bit is 1:
    p <- p * (1 + g - E_p[g]). The result is returned as log-probabilities. A context seen in the
    last context_history_size steps of a row is left as it is. A new processor (each generate())
    starts with a fresh state.
    """

    def __init__(self, ngram_len: int, keys: list[int], sampling_table_size: int, sampling_table_seed: int,
                 context_history_size: int, device: Any, skip_first_ngram_calls: bool = False, debug_mode: bool = False):
        self.ngram_len = ngram_len
        self.keys = torch.tensor(keys, device=device)
        self.device = device
        # Random bits that hashes are mapped to (modulo the table's size), drawn as transformers draws them.
        generator = torch.Generator(device=device).manual_seed(sampling_table_seed)
        self.sampling_table = torch.randint(0, 2, (sampling_table_size,), generator=generator, device=device)
        self.context_history_size = context_history_size
        self.skip_first_ngram_calls = skip_first_ngram_calls
        self.debug_mode = debug_mode
        self.state: SynthIDTextWatermarkState | None = None

    def _init_state(self, batch_size: int) -> None:
        self.state = SynthIDTextWatermarkState(batch_size, self.ngram_len, self.context_history_size, self.device)

    # --- hashing ------------------------------------------------------------------------------
    def accumulate_hash(self, current_hash: torch.Tensor, data: torch.Tensor,
                        multiplier: int = _LCG_MULTIPLIER, increment: int = 1) -> torch.Tensor:
        """current_hash (...) with data (..., n) folded in (see _fold_hash)."""
        return _fold_hash(current_hash, data, multiplier, increment)

    def _with_keys(self, hashes: torch.Tensor) -> torch.Tensor:
        """hashes (...) -> (..., depth): each hash folded with each key."""
        return _fold_hash(hashes[..., None], self.keys[:, None])

    def compute_ngram_keys(self, ngrams: torch.Tensor) -> torch.Tensor:
        """ngrams (batch, num_ngrams, ngram_len) -> their hashes with each key (batch, num_ngrams, depth)."""
        if ngrams.dim() != 3 or ngrams.shape[2] != self.ngram_len:
            raise ValueError(f"ngrams must be (batch_size, num_ngrams, {self.ngram_len}), got {tuple(ngrams.shape)}")
        return self._with_keys(_fold_hash(torch.ones_like(ngrams[..., 0]), ngrams))

    def sample_g_values(self, ngram_keys: torch.Tensor) -> torch.Tensor:
        """The table's bits at the keys (int64, same shape)."""
        return self.sampling_table[ngram_keys % self.sampling_table.shape[0]]

    def compute_g_values(self, input_ids: torch.Tensor) -> torch.Tensor:
        """g-values of every n-gram of input_ids (batch, length) -> (batch, length - ngram_len + 1, depth)."""
        self._check_input_ids_shape(input_ids)
        return self.sample_g_values(self.compute_ngram_keys(input_ids.unfold(1, self.ngram_len, 1)))

    # --- generation ---------------------------------------------------------------------------
    def update_scores(self, scores: torch.Tensor, g_values: torch.Tensor) -> torch.Tensor:
        """The tournament: scores (batch, vocab) and g_values (batch, vocab, depth) -> log-probabilities.
        Tokens left with no probability get the dtype's lowest value rather than -inf."""
        probs = torch.softmax(scores, dim=1)
        for depth in range(g_values.shape[2]):
            g = g_values[:, :, depth]
            g_mass = (g * probs).sum(dim=1, keepdim=True)
            probs = probs * (1 + g - g_mass)
        log_probs = torch.log(probs)
        return torch.where(torch.isfinite(log_probs), log_probs, torch.finfo(log_probs.dtype).min)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._check_input_ids_shape(input_ids)
        batch_size, vocab_size = scores.shape
        if self.debug_mode:
            scores = torch.ones_like(scores)
        if self.state is None:
            self._init_state(batch_size)
        else:  # the token chosen at the previous step joins the context, the oldest leaves it
            self.state.context = torch.cat([self.state.context, input_ids[:, -1:]], dim=1)[:, 1:]
        self.state.num_calls += 1
        if self.skip_first_ngram_calls and self.state.num_calls < self.ngram_len:
            return scores

        context_hash = _fold_hash(torch.ones(batch_size, dtype=torch.long, device=self.device), self.state.context)
        candidates = torch.arange(vocab_size, device=self.device)
        candidate_hashes = (context_hash[:, None] + candidates) * _LCG_MULTIPLIER + 1  # (batch, vocab)
        g_values = self.sample_g_values(self._with_keys(candidate_hashes))  # (batch, vocab, depth)
        watermarked = self.update_scores(scores, g_values)

        # A context this row saw recently is not watermarked again (that would bias the text).
        repeated = (self.state.context_history == context_hash[:, None]).any(dim=1, keepdim=True)
        self.state.context_history = torch.cat([context_hash[:, None], self.state.context_history[:, :-1]], dim=1)
        return torch.where(repeated, scores, watermarked)

    # --- detection's helpers --------------------------------------------------------------------
    def compute_context_repetition_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, length - ngram_len + 1), bool: False where an n-gram's context (its first ngram_len - 1
        tokens) already came up in the previous context_history_size contexts, as generation skips it."""
        self._check_input_ids_shape(input_ids)
        contexts = input_ids[:, :-1].unfold(1, self.ngram_len - 1, 1)
        hashes = _fold_hash(torch.ones_like(contexts[..., 0]), contexts)  # (batch, num_contexts)
        history = self.context_history_size
        repeated = []
        for i in range(hashes.shape[1]):
            seen = (hashes[:, max(0, i - history) : i] == hashes[:, i : i + 1]).any(dim=1)
            if i < history:  # the history starts as zeros, so a hash of 0 counts as seen
                seen |= hashes[:, i] == 0
            repeated.append(seen)
        return ~torch.stack(repeated, dim=1)

    def compute_eos_token_mask(self, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
        """(batch, length), bool: True before each row's first eos, False from it on."""
        self._check_input_ids_shape(input_ids)
        return (input_ids == eos_token_id).long().cumsum(dim=1) == 0

    def expected_mean_g_value(self, vocab_size: int, coinflip_prob: float = 0.5) -> float:
        """The mean g-value one tournament layer gives watermarked text, for a uniform distribution."""
        return coinflip_prob + coinflip_prob * (1 - coinflip_prob) * (1 - (1 / vocab_size))

    def _check_input_ids_shape(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch_size, length), got {tuple(input_ids.shape)}")


class SynthIDTextWatermarkDetector:
    """Runs a SynthID detector module (transformers' BayesianDetectorModel, trained for the keys; herd has
    none) on a text's g-values: detector_module(g_values, mask), where the mask drops n-grams whose
    context repeats and those from the first eos on. Returns what the module returns."""

    def __init__(self, detector_module: Any, logits_processor: SynthIDTextWatermarkLogitsProcessor, tokenizer: Any):
        self.detector_module = detector_module
        self.logits_processor = logits_processor
        self.tokenizer = tokenizer

    def __call__(self, tokenized_outputs: torch.Tensor):
        processor = self.logits_processor
        # The masks line up with the n-grams, which start ngram_len - 1 tokens in.
        not_eos = processor.compute_eos_token_mask(tokenized_outputs, self.tokenizer.eos_token_id)[:, processor.ngram_len - 1 :]
        mask = processor.compute_context_repetition_mask(tokenized_outputs) * not_eos
        return self.detector_module(processor.compute_g_values(tokenized_outputs), mask)
