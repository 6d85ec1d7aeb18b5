"""GenerationConfig: the knobs of `generate()`, read from generation_config.json.

Fields left unset (None) fall back, in order, to the model's generation_config.json and then to
the reference's global defaults (max_length 20, top_k 50, ...), exactly as transformers 5 does.
"""

from __future__ import annotations

import copy
import enum
import json
import logging
import os
from pathlib import Path
from typing import Any

from .. import hub
from ..configuration import pop_hub_kwargs
from .watermarking import BaseWatermarkingConfig, as_watermarking_config

# The reference's defaults for fields nobody set.
GLOBAL_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "use_cache": True,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "num_return_sequences": 1,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict_in_generate": False,
    "disable_compile": False,
}

# Every field generate() understands (others in a file are kept for the round trip).
FIELDS = (
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "early_stopping", "do_sample", "num_beams",
    "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "guidance_scale", "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "sequence_bias", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "renormalize_logits", "length_penalty", "num_return_sequences",
    "pad_token_id", "bos_token_id", "eos_token_id", "stop_strings", "use_cache", "cache_implementation",
    "output_scores", "output_logits", "output_attentions", "output_hidden_states", "return_dict_in_generate",
    "disable_compile", "prefill_chunk_size", "watermarking_config", "cache_config", "max_time", "max_cache_len",
)
_REMOVED = "was removed from transformers 5's generate() (it lives on as a Hub custom_generate method)"
_NOT_IMPLEMENTED = "is not implemented by herd"
# Options generate() refuses rather than silently ignores, and why.
UNSUPPORTED = {
    "force_words_ids": _REMOVED, "constraints": _REMOVED, "num_beam_groups": _REMOVED, "diversity_penalty": _REMOVED,
    "penalty_alpha": _REMOVED, "dola_layers": _REMOVED,
    "assistant_model": _NOT_IMPLEMENTED,
    "prompt_lookup_num_tokens": _NOT_IMPLEMENTED,
    # (these change transformers' tokens wherever they are set: refused in a generation_config.json too)
    "token_healing": _NOT_IMPLEMENTED,
    "use_mtp": "(multi-token prediction) is not implemented by herd: Llama models have no MTP layers",
}
# transformers' options of assisted (speculative) decoding and others herd does not implement, refused
# when a generate() call sets them (a generation_config.json's copy is kept, as transformers ignores
# them without an assistant model).
_ASSISTED = "is an option of assisted decoding, which herd does not implement"
PER_CALL_UNSUPPORTED = {
    **{name: _ASSISTED for name in (
        "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
        "max_matching_ngram_size", "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
        "assistant_ensemble_weight", "speculation_type", "is_assistant")},
    "compile_config": "is not supported by herd: its fast path compiles its own way (disable_compile=True turns it off)",
    "continuous_batching_config": "is not supported by generate(): herd's continuous batching is herd.serving.Engine",
    # (transformers 5.17 ignores it when decoding one row at a time and refuses it in beam search)
    "low_memory": "(sequential beam search) is not implemented by herd",
}
# transformers' fields that change nothing for a decoder-only model in transformers 5.17 either (the
# first token of an encoder-decoder's decoder): accepted in a call and dropped.
NO_EFFECT = ("decoder_start_token_id",)
# Values of unsupported fields that mean "off", as written in many generation_config.json files.
_OFF_VALUES = (None, 0, 0.0, 1.0, False, [], "")


def _is_off(value: Any) -> bool:
    """An unsupported field's value that means "off" (True is not 1: token_healing=True is on)."""
    return value is False if isinstance(value, bool) else value in _OFF_VALUES
# Arguments of generate() itself, refused inside a GenerationConfig (as the reference refuses them).
_GENERATE_ARGUMENTS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                       "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask")
# Flags only sampling uses, with the value that means "off" (None: any value is on).
_SAMPLING_ONLY = (("temperature", 1.0), ("top_p", 1.0), ("min_p", None), ("top_h", None), ("typical_p", 1.0),
                  ("top_k", 50), ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0))
_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states", "output_scores", "output_logits")

logger = logging.getLogger("herd")


class GenerationMode(str, enum.Enum):
    """The decoding method a GenerationConfig asks for (transformers' names and values). herd runs greedy
    search, sampling, beam search and beam sampling; generate() refuses the others by name."""

    CONTRASTIVE_SEARCH = "contrastive_search"
    GREEDY_SEARCH = "greedy_search"
    SAMPLE = "sample"
    ASSISTED_GENERATION = "assisted_generation"
    DOLA_GENERATION = "dola_generation"
    BEAM_SEARCH = "beam_search"
    BEAM_SAMPLE = "beam_sample"
    CONSTRAINED_BEAM_SEARCH = "constrained_beam_search"
    GROUP_BEAM_SEARCH = "group_beam_search"

    def __str__(self) -> str:
        return self.value


_warned: set[str] = set()  # warnings already given (each once per process, as the reference's warning_once)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _same_value(value: Any, default: Any) -> bool:
    """value == default, where True is not 1 and False is not 0."""
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return value == default


def _should_warn(outer: str, inner: str, user_set: set[str] | None) -> bool:
    """Whether a flag (`inner`) that `outer` makes useless deserves a warning: not when the caller set
    `outer` and left `inner` as it came (from the model's generation_config.json, say)."""
    if user_set is None:
        return True
    return not (outer in user_set and inner not in user_set)


class GenerationConfig(hub.PushToHubMixin):
    def __init__(self, **kwargs: Any):
        given = set(kwargs)
        for name in FIELDS:
            setattr(self, name, kwargs.pop(name, None))
        # a dict (as generation_config.json holds it) becomes its config object, as in transformers
        self.watermarking_config = as_watermarking_config(self.watermarking_config)
        kwargs.pop("transformers_version", None)
        kwargs.pop("herd_version", None)
        self._from_model_config = kwargs.pop("_from_model_config", False)
        # Unknown entries are kept (and written back) but not used.
        self._extra = kwargs
        # The fields the last update() set: validate() warns only about flags someone set (see update)
        self._user_set_attributes: set[str] | None = None
        # as the reference: flags the mode ignores, among those given, get a warning (once)
        self._report(self._minor_issues(given), strict=False)

    def __getattr__(self, name: str) -> Any:
        extra = self.__dict__.get("_extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(name)

    # --- building -----------------------------------------------------------------------------
    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """The special tokens of the model's (text) config, and, as transformers, the generation options an
        old config.json may hold (max_length, num_beams, repetition_penalty...): the outer config's, then
        its text config's for those it leaves unset. Values equal to the global defaults change nothing and
        are left out; an output_* flag set to True turns on return_dict_in_generate, as in transformers."""
        text_config = config.get_text_config()
        values: dict[str, Any] = {}
        for source in (config, text_config):
            for name in FIELDS:
                value = getattr(source, name, None)
                if name not in values and value is not None and not _same_value(value, GLOBAL_DEFAULTS.get(name)):
                    values[name] = value
        values.update(bos_token_id=getattr(text_config, "bos_token_id", None),
                      eos_token_id=getattr(text_config, "eos_token_id", None),
                      pad_token_id=getattr(text_config, "pad_token_id", None))
        if any(values.get(name) is True for name in _OUTPUT_FLAGS):
            values["return_dict_in_generate"] = True
        return cls(**values, _from_model_config=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, config_file_name: str | None = None,
                        **kwargs: Any) -> GenerationConfig | tuple[GenerationConfig, dict[str, Any]]:
        """The config in `config_file_name` (generation_config.json); kwargs override its values. With
        return_unused_kwargs=True, (config, unused kwargs), as from_dict."""
        folder = hub.resolve(pretrained_model_name_or_path, **pop_hub_kwargs(kwargs))
        path = folder / (config_file_name or hub.GENERATION_CONFIG_NAME)
        if not path.is_file():
            raise FileNotFoundError(f"no {path.name} in {folder}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        return cls.from_dict(values, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> GenerationConfig | tuple[GenerationConfig, dict[str, Any]]:
        """A config from a dict; kwargs override its values. return_unused_kwargs=True returns (config,
        unused): as in the reference every keyword becomes an entry of the config (unknown ones are kept
        as extra entries), so nothing is left unused."""
        return_unused = kwargs.pop("return_unused_kwargs", False)
        for telemetry in ("_from_auto", "_from_pipeline", "_commit_hash"):
            kwargs.pop(telemetry, None)
        config = cls(**{**config_dict, **kwargs})
        return (config, {}) if return_unused else config

    def to_dict(self) -> dict[str, Any]:
        """Every field, unset ones as None (as transformers' to_dict); to_diff_dict drops those."""
        out = {name: getattr(self, name) for name in FIELDS}
        if isinstance(out.get("sequence_bias"), dict):  # JSON has no tuple keys: the list form [[ids], bias]
            out["sequence_bias"] = [[list(ids), bias] for ids, bias in out["sequence_bias"].items()]
        if isinstance(out.get("watermarking_config"), BaseWatermarkingConfig):  # saved as its dict
            out["watermarking_config"] = out["watermarking_config"].to_dict()
        out.update(copy.deepcopy(self._extra))
        if self._from_model_config:
            out["_from_model_config"] = True
        return dict(sorted(out.items()))

    def to_diff_dict(self) -> dict[str, Any]:
        """The fields that are set: what generation_config.json holds."""
        return {key: value for key, value in self.to_dict().items() if value is not None}

    def to_json_string(self, use_diff: bool = True, ignore_metadata: bool = False) -> str:
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        Path(json_file_path).write_text(self.to_json_string(use_diff=use_diff))

    def save_pretrained(self, save_directory: str | os.PathLike, config_file_name: str | None = None, **kwargs: Any) -> None:
        """Write the set fields to generation_config.json. As the reference, a config that validate(strict=True)
        refuses (a flag its mode ignores, such as temperature without do_sample) is not saved."""
        try:
            self._check(strict=True, user_set=None, refuse_unsupported=False)
        except ValueError as error:
            raise ValueError(f"{error}\n\nFix these issues to save the configuration.") from None
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"save_pretrained needs a folder, but {folder} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        push = hub.push_request(folder, kwargs)
        (folder / (config_file_name or hub.GENERATION_CONFIG_NAME)).write_text(json.dumps(self.to_diff_dict(), indent=2) + "\n")
        if push is not None:
            push.upload(self)

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the fields named in kwargs; return the kwargs that are not generation fields.

        As the reference, flags made useless by the mode (temperature without do_sample...) get a warning
        when this call set them; the fields set are remembered, so that a later validate() (generate()'s)
        says nothing about flags that only came from the model's generation_config.json."""
        unused, used = {}, set()
        for key, value in kwargs.items():
            if key == "watermarking_config":
                self.watermarking_config = as_watermarking_config(value)
                used.add(key)
            elif key in FIELDS:
                setattr(self, key, value)
                used.add(key)
            elif key in UNSUPPORTED or key in PER_CALL_UNSUPPORTED:
                if not _is_off(value):
                    why = UNSUPPORTED.get(key) or PER_CALL_UNSUPPORTED[key]
                    raise NotImplementedError(f"generate({key}=...): {key} {why}")
            elif key in NO_EFFECT:
                pass
            else:
                unused[key] = value
        self._user_set_attributes = used
        self._report(self._minor_issues(used), strict=False)
        return unused

    def merged_with(self, fallback: GenerationConfig | None) -> GenerationConfig:
        """A copy where fields this config leaves unset come from `fallback`, then from the global defaults."""
        merged = copy.deepcopy(self)
        for name in FIELDS:
            if getattr(merged, name) is None and fallback is not None:
                setattr(merged, name, getattr(fallback, name))
            if getattr(merged, name) is None and name in GLOBAL_DEFAULTS:
                setattr(merged, name, GLOBAL_DEFAULTS[name])
        return merged

    def get_generation_mode(self, assistant_model: Any = None) -> GenerationMode:
        """The decoding method these flags select, as transformers decides it: beams or not, sampling or
        not; the modes herd refuses (constraints, contrastive search, beam groups, assisted decoding, DoLa)
        named too."""
        extra = self.__dict__.get("_extra", {})
        beams = self.num_beams is not None and self.num_beams > 1
        if extra.get("constraints") is not None or extra.get("force_words_ids") is not None:
            return GenerationMode.CONSTRAINED_BEAM_SEARCH
        if beams:
            if (extra.get("num_beam_groups") or 1) > 1:
                return GenerationMode.GROUP_BEAM_SEARCH
            return GenerationMode.BEAM_SAMPLE if self.do_sample is True else GenerationMode.BEAM_SEARCH
        if self.do_sample is True:
            mode = GenerationMode.SAMPLE
        elif self.top_k is not None and self.top_k > 1 and (extra.get("penalty_alpha") or 0) > 0:
            return GenerationMode.CONTRASTIVE_SEARCH
        else:
            mode = GenerationMode.GREEDY_SEARCH
        if (assistant_model is not None or extra.get("use_mtp") or extra.get("prompt_lookup_num_tokens") is not None
                or extra.get("assistant_early_exit") is not None):
            return GenerationMode.ASSISTED_GENERATION
        if extra.get("dola_layers") is not None:
            return GenerationMode.DOLA_GENERATION
        return mode

    # --- checks -------------------------------------------------------------------------------
    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None) -> None:
        """Clear errors for values generate() cannot honour, and, as the reference, a warning (once) for
        flags the mode ignores: sampling flags without do_sample=True, beam flags with one beam, output_*
        without return_dict_in_generate, cache settings with use_cache=False, a negative pad_token_id.
        strict=True makes those an error (ValueError) too.

        user_set_attributes: the fields the caller set; a flag inherited while the caller set the mode
        (do_sample=False over a model's temperature) gets no warning. None: the fields the last update()
        set, or every field when there was none."""
        user_set = user_set_attributes if user_set_attributes is not None else getattr(self, "_user_set_attributes", None)
        self._check(strict, user_set, refuse_unsupported=True)

    def _minor_issues(self, user_set: set[str] | None) -> dict[str, str]:
        """{flag: why it has no effect}, the reference's "minor issues"."""
        issues = {}
        if isinstance(self.pad_token_id, int) and self.pad_token_id < 0:
            issues["pad_token_id"] = (f"pad_token_id should be positive but is {self.pad_token_id}: batches with "
                                      "padding will fail; set pad_token_id explicitly")
        if self.do_sample is not True:
            for name, off in _SAMPLING_ONLY:
                value = getattr(self, name)
                if value is not None and value != off and _should_warn("do_sample", name, user_set):
                    issues[name] = (f"do_sample is not True, but {name} is {value!r}: it is only used when sampling; "
                                    f"set do_sample=True or unset {name}")
        if self.num_beams is None or self.num_beams == 1:
            for name, off in (("early_stopping", False), ("length_penalty", 1.0)):
                value = getattr(self, name)
                if value is not None and value is not off and value != off and _should_warn("num_beams", name, user_set):
                    issues[name] = (f"num_beams is {self.num_beams}, but {name} is {value!r}: it is only used by beam "
                                    f"search; set num_beams > 1 or unset {name}")
        if self.use_cache is False:
            for name in ("cache_implementation", "cache_config"):
                if getattr(self, name) is not None:
                    issues[name] = f"use_cache is False, but {name} is {getattr(self, name)!r}: it has no effect"
        if self.max_cache_len is not None and self.cache_implementation not in ("static", "hybrid") \
                and not self.cache_config:  # (cache_config's FP8 cache is a static one)
            issues["max_cache_len"] = (f"max_cache_len is only used with a static cache; it is ignored with "
                                       f"cache_implementation={self.cache_implementation!r}")
        if self.return_dict_in_generate is not True:
            for name in _OUTPUT_FLAGS:
                if getattr(self, name) is True:
                    issues[name] = f"return_dict_in_generate is not True, but {name} is: {name} is ignored"
        return issues

    @staticmethod
    def _report(issues: dict[str, str], strict: bool) -> None:
        if not issues:
            return
        details = "\n".join(f"- {name}: {why}" for name, why in issues.items())
        if strict:
            raise ValueError(f"GenerationConfig is invalid:\n{details}")
        _warn_once(f"The following generation flags are not valid and may be ignored: {list(issues)}\n{details}")

    def _check(self, strict: bool, user_set: set[str] | None, refuse_unsupported: bool) -> None:
        for key, value in self._extra.items():
            if refuse_unsupported and key in UNSUPPORTED and not _is_off(value):
                raise NotImplementedError(f"generation option {key}={value!r}: {key} {UNSUPPORTED[key]}")
            if key in _GENERATE_ARGUMENTS:
                raise ValueError(f"{key} is not a GenerationConfig field: pass it to generate() itself")
        num_beams = 1 if self.num_beams is None else self.num_beams
        num_return_sequences = 1 if self.num_return_sequences is None else self.num_return_sequences
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"max_length must be a positive integer, got {self.max_length!r}")
        chunk = self.prefill_chunk_size
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ValueError(f"prefill_chunk_size must be a positive integer (tokens per prefill forward), got {chunk!r}")
        if self.max_cache_len is not None and (not isinstance(self.max_cache_len, int) or isinstance(self.max_cache_len, bool)
                                               or self.max_cache_len < 1):
            raise ValueError(f"max_cache_len must be a positive integer (the static cache's positions), got {self.max_cache_len!r}")
        for name in ("min_new_tokens", "min_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {self.num_beams!r}")
        if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be a positive integer, got {self.num_return_sequences!r}")
        if num_beams == 1 and not self.do_sample and num_return_sequences > 1:
            raise ValueError(
                "greedy decoding gives one sequence per prompt: num_return_sequences > 1 needs do_sample=True or num_beams > 1"
            )
        if num_return_sequences > num_beams > 1:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.length_penalty is not None and not isinstance(self.length_penalty, (int, float)):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")
        if self.do_sample:
            if self.temperature is not None and (not isinstance(self.temperature, (int, float)) or not self.temperature > 0):
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature!r} (use do_sample=False for greedy)")
            if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
                raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
            # (top_p=0 keeps only the most likely token, as in transformers)
            if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
                raise ValueError(f"top_p must be in [0, 1], got {self.top_p!r}")
            if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
                raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
            if self.top_h is not None and not 0.0 < self.top_h <= 1.0:
                raise ValueError(f"top_h must be in (0, 1], got {self.top_h!r}")
            if self.typical_p is not None and not 0.0 < self.typical_p <= 1.0:
                raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p!r}")
            for name in ("epsilon_cutoff", "eta_cutoff"):
                value = getattr(self, name)
                if value is not None and not 0.0 <= value < 1.0:
                    raise ValueError(f"{name} must be in [0, 1) (0 turns it off), got {value!r}")
        for name in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.encoder_repetition_penalty is not None and not self.encoder_repetition_penalty > 0:
            raise ValueError(f"encoder_repetition_penalty must be > 0, got {self.encoder_repetition_penalty!r}")
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple)) or any(not isinstance(t, int) or t < 0 for t in value)):
                raise ValueError(f"{name} must be a list of token ids, got {value!r}")
        penalty = self.exponential_decay_length_penalty
        if penalty is not None and (not isinstance(penalty, (list, tuple)) or len(penalty) != 2
                                    or not isinstance(penalty[0], int) or not isinstance(penalty[1], (int, float))):
            raise ValueError(f"exponential_decay_length_penalty must be (start_index, decay_factor), got {penalty!r}")
        for name in ("forced_bos_token_id", "forced_eos_token_id"):
            value = getattr(self, name)
            ids = [value] if isinstance(value, int) else value
            if value is not None and (not isinstance(ids, (list, tuple)) or not ids or any(not isinstance(t, int) or t < 0 for t in ids)):
                raise ValueError(f"{name} must be a token id (or a list of ids for forced_eos_token_id), got {value!r}")
            if value is not None and self.suppress_tokens and set(ids) <= set(self.suppress_tokens):
                raise ValueError(f"every token of {name} ({sorted(set(ids))}) is also in suppress_tokens: all scores would be -inf")
        if self.early_stopping not in (None, True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.cache_implementation not in (None, "dynamic", "static", "hybrid"):
            raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {self.cache_implementation!r}")
        self._validate_cache_config()
        # (a dict may have been set on the attribute directly)
        self.watermarking_config = as_watermarking_config(self.watermarking_config)
        if self.watermarking_config is not None:
            self.watermarking_config.validate()
        self._report(self._minor_issues(user_set), strict)

    def _validate_cache_config(self) -> None:
        """cache_config={"dtype": "float8_e4m3fn"} (or "fp8"): the FP8 KV cache, a static cache."""
        from ..cache import FP8_KV_DTYPE, kv_cache_dtype

        if self.cache_config is None:
            return
        if not isinstance(self.cache_config, dict) or set(self.cache_config) - {"dtype"}:
            raise ValueError(f"cache_config takes {{'dtype': 'float8_e4m3fn'}} (the FP8 KV cache), got {self.cache_config!r}")
        dtype = kv_cache_dtype(self.cache_config.get("dtype"))
        if dtype == FP8_KV_DTYPE:
            self.cache_config = {**self.cache_config, "dtype": "float8_e4m3fn"}  # one spelling, JSON-writable
            if self.cache_implementation == "dynamic":
                raise ValueError("the FP8 KV cache is preallocated: use cache_implementation='static' or 'hybrid' "
                                 "(or leave it unset) with cache_config={'dtype': 'float8_e4m3fn'}")

    @property
    def kv_cache_dtype(self):
        """The KV cache's storage dtype cache_config asks for (None: the model's dtype)."""
        from ..cache import kv_cache_dtype

        return kv_cache_dtype((self.cache_config or {}).get("dtype"))

    def __repr__(self) -> str:
        return f"GenerationConfig {json.dumps(self.to_diff_dict(), indent=2)}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerationConfig) and self.to_dict() == other.to_dict()
