"""`generate()`: one decoding loop for greedy and sampled decoding, and beam search.

The loop runs over a decoder (decoding/decoders.py), chosen once per call: the reference forward
over a growing cache, or on a GPU a family's decode plan compiled and graph-captured. Both
prefill, step and (greedy) run blocks of steps behind one interface; everything else (logits
processing, choosing tokens, stopping, streaming) is shared.

What we match in the reference, token for token: the order of logits processors, padding of
finished rows with pad_token_id (eos when there is none), position ids from the attention mask
(so left-padded rows get what they would get alone), and the beam search's bookkeeping.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..cache import Cache
from ..decoding.decoders import PlainDecoder, choose_decoder, positions_from_mask
from ..modeling_outputs import ModelOutput
from ..parallel.offload import before_generate
from ..parallel import same_tokens_on_every_rank
from .configuration import FIELDS, GenerationConfig
from .logits_process import apply_processors, build_logits_processors, classifier_free_guidance
from .stopping import MaxTimeCriteria, StopChecks, StopStrings, ends_with_eos

logger = logging.getLogger("herd")


@dataclass(repr=False)
class GenerateDecoderOnlyOutput(ModelOutput):
    sequences: torch.LongTensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    past_key_values: Cache | None = None


@dataclass(repr=False)
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    sequences: torch.LongTensor | None = None
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.LongTensor | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    past_key_values: Cache | None = None


# Inputs prepare_inputs_for_generation passes only at the first iteration (or without a cache): the
# cache holds what they produced. transformers' MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL names.
_PREFILL_ONLY_INPUTS = ("pixel_values", "pixel_mask", "input_features", "input_features_mask", "pixel_values_videos",
                        "num_local_patches", "high_res_pixel_values", "image_patches_indices", "image_patches",
                        "image_sizes", "image_sizes_videos", "pixel_attention_mask", "pixel_values_images")


class GenerationMixin:
    """Adds `generate()` to a causal language model."""

    # Inputs besides the tokens that generate() passes on to the model (a multimodal model's images).
    _generation_input_names: tuple[str, ...] = ()

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The forward's keyword arguments for one generation step, as transformers 5.17 builds them.

        The last `next_sequence_length` tokens (all of them when None) as `input_ids`, or at the first
        iteration the prompt's `inputs_embeds` when given (`input_ids` then None); `past_key_values`
        when given; `position_ids` / `token_type_ids` when given, cut to the same length;
        `attention_mask` as given; then every other keyword argument (`use_cache`,
        `logits_to_keep`...) except `labels`, and the images (`pixel_values`) only at the first
        iteration or without a cache. Tensors move to the model's device. No `cache_position`:
        transformers 5.17 no longer makes one (herd's forwards derive it from the cache). Unlike
        transformers, a compilable (static) cache keeps the 2D attention_mask rather than a 4D one:
        herd's attention builds its mask from the 2D description.
        """
        inputs: dict[str, Any] = {}
        if inputs_embeds is not None and is_first_iteration:
            first = inputs_embeds if next_sequence_length is None else inputs_embeds[:, -next_sequence_length:, :]
            inputs["input_ids"] = None
            inputs["inputs_embeds"] = first = first.clone(memory_format=torch.contiguous_format)
        else:
            first = input_ids if next_sequence_length is None else input_ids[:, -next_sequence_length:]
            inputs["input_ids"] = first = first.clone(memory_format=torch.contiguous_format)
        length = first.shape[1]
        if past_key_values is not None:
            inputs["past_key_values"] = past_key_values
        for name in ("position_ids", "token_type_ids"):
            value = kwargs.pop(name, None)
            if value is not None:  # (batch, seq) or (..., seq): the last `length` positions
                inputs[name] = value if value.shape[-1] == length else \
                    value[..., -length:].clone(memory_format=torch.contiguous_format)
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        images_now = is_first_iteration or not kwargs.get("use_cache", True)
        for key, value in kwargs.items():
            if key in ("labels", "next_sequence_length") or (key in _PREFILL_ONLY_INPUTS and not images_now):
                continue
            inputs.setdefault(key, value)
        if self.device.type != "meta" and first.device != self.device:
            inputs = {key: value.to(self.device) if torch.is_tensor(value) else value for key, value in inputs.items()}
        return inputs

    def _inputs_for_step(self, extra: dict[str, Any], first_step: bool, total_length: int) -> dict[str, Any]:
        """What of `extra` the model gets at a step: by default everything at prefill, nothing after
        (the cache already holds what it produced)."""
        return dict(extra) if first_step else {}

    # --- set-up -----------------------------------------------------------------------------
    def _generation_setup(self, generation_config: GenerationConfig | None, kwargs: dict[str, Any]):
        base = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
        model_config = getattr(self, "generation_config", None)

        def set_by_nobody(name):  # not in the call, the given config or the model's config
            return kwargs.get(name) is None and getattr(base, name) is None and getattr(model_config, name, None) is None

        # The reference then reads max_length as "20 new tokens", and lets min_new_tokens replace
        # min_length without a warning.
        default_max_length, default_min_length = set_by_nobody("max_length"), set_by_nobody("min_length")
        config = base.merged_with(model_config)
        # Per-call arguments win last, an explicit None included (eos_token_id=None: never stop early).
        model_kwargs = config.update(**kwargs)
        config = config.merged_with(None)
        # ...also over a global default: top_k=None turns top-k filtering off (as in transformers),
        # where the default would filter to the 50 best tokens.
        if "top_k" in kwargs and kwargs["top_k"] is None:
            config.top_k = None
        config._default_max_length, config._default_min_length = default_max_length, default_min_length
        config.validate()
        return config, model_kwargs

    def _bos_prompt(self, config: GenerationConfig, model_kwargs: dict[str, Any]) -> torch.LongTensor:
        """generate() without input_ids or inputs_embeds starts every row from bos_token_id, as transformers
        does: one row, or as many as the first tensor among the model inputs has (images, say)."""
        if config.bos_token_id is None:
            raise ValueError("generate() needs input_ids (the prompt tokens) or inputs_embeds, or a bos_token_id "
                             "to start from")
        generate_arguments = ("logits_processor", "stopping_criteria", "negative_prompt_ids",
                              "negative_prompt_attention_mask")
        batch_size = next((value.shape[0] for name, value in model_kwargs.items()
                           if name not in generate_arguments and torch.is_tensor(value)), 1)
        return torch.full((batch_size, 1), int(config.bos_token_id), dtype=torch.long, device=self.device)

    def _check_lengths(self, config: GenerationConfig, prompt_length: int, embeds_length: int | None = None) -> int:
        """The final length (prompt + new tokens), refused when the model cannot see that far.

        Like the reference: max_new_tokens wins; a max_length nobody set means the default number
        of NEW tokens (20), capped at the context; a max_length someone set is the total. Sets
        config.max_length and config.min_length (min_new_tokens wins over min_length) to the totals
        the logits processors use.

        Lengths count the prompt's ids; `embeds_length`: the positions of generate(inputs_embeds=...)'s
        prompt. When they differ (no input_ids: no prompt ids), a max_length or min_length someone set
        counts the embeddings too, as in the reference.
        """
        text_config = self.config.get_text_config()
        context = getattr(text_config, "max_position_embeddings", None)
        embeds_length = prompt_length if embeds_length is None else embeds_length
        extra = embeds_length - prompt_length  # positions beyond the ids'
        if context is not None:
            context -= extra
        if config.max_new_tokens is not None:
            max_length = prompt_length + config.max_new_tokens
        elif extra and not getattr(config, "_default_max_length", False):
            max_length = config.max_length - embeds_length
        elif getattr(config, "_default_max_length", False):
            max_length = prompt_length + config.max_length
            max_length = min(max_length, context) if context is not None else max_length
        else:
            max_length = config.max_length
        if max_length <= prompt_length and extra:  # (a max_length someone set, less the embeddings)
            raise ValueError(f"max_length ({config.max_length}) leaves no new tokens after the prompt's {embeds_length} "
                             f"inputs_embeds positions and {prompt_length} input_ids; set max_new_tokens instead")
        if max_length <= prompt_length:
            raise ValueError(
                f"the prompt has {prompt_length} tokens and max_length is {max_length}: nothing is left to "
                "generate; set max_new_tokens instead"
            )
        rope_type = getattr(text_config, "rope_parameters", {}).get("rope_type")
        if context is not None and rope_type != "dynamic" and max_length > context:
            if prompt_length >= context:
                raise ValueError(
                    f"the prompt has {embeds_length} tokens, {prompt_length - context + 1} more than the model's "
                    f"context of {context + extra} positions (max_position_embeddings) leaves room for one new token; "
                    "shorten the prompt"
                )
            # As transformers users expect: generate up to the context (the answer ends for length).
            logger.warning("prompt (%d tokens) + %d new tokens exceeds the model's context of %d positions: "
                           "generating at most %d new tokens", embeds_length, max_length - prompt_length,
                           context + extra, context - prompt_length)
            max_length = context
        if config.min_new_tokens and config.min_new_tokens > max_length - prompt_length:
            # as transformers: generation runs (to the length limit, eos suppressed throughout), with a warning
            logger.warning("min_new_tokens (%d) exceeds the %d new tokens the length limit allows: no eos will be "
                           "generated; lower min_new_tokens or raise max_new_tokens", config.min_new_tokens,
                           max_length - prompt_length)
        if config.min_new_tokens is not None:
            if not getattr(config, "_default_min_length", True):
                logger.warning("both min_new_tokens (=%s) and min_length (=%s) are set: min_new_tokens takes precedence",
                               config.min_new_tokens, config.min_length)
            config.min_length = prompt_length + config.min_new_tokens
        elif extra:
            config.min_length = max(config.min_length - embeds_length, 0)
        config.max_length = max_length
        return max_length

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: Any = None,
        stopping_criteria: Any = None,
        prefix_allowed_tokens_fn: Any = None,
        synced_gpus: bool | None = None,
        assistant_model: Any = None,
        streamer: Any = None,
        negative_prompt_ids: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        custom_generate: Any = None,
        tokenizer: Any = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ):
        """Generate continuations of `inputs` (batch, prompt) and return prompt + new tokens.

        Arguments (transformers' names and order) and outputs follow transformers' `generate`;
        `generator` (a seeded torch.Generator) makes sampling reproducible without touching the
        global seed. synced_gpus is accepted and unused: herd's ranks always step together.
        """
        # Refused by name rather than run some other way: herd has no assisted decoding and no Hub code.
        if assistant_model is not None:
            raise NotImplementedError("generate(assistant_model=...): assisted decoding is not implemented by herd")
        if custom_generate is not None:
            raise NotImplementedError("generate(custom_generate=...): herd does not run custom generation methods")
        # (a permission for Hub code, which herd never runs: the modes that would need it are refused by name)
        kwargs.pop("trust_remote_code", None)
        kwargs.update(logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                      negative_prompt_ids=negative_prompt_ids,
                      negative_prompt_attention_mask=negative_prompt_attention_mask)
        config, model_kwargs = self._generation_setup(generation_config, kwargs)
        config._prefix_allowed_tokens_fn = prefix_allowed_tokens_fn
        if config.prefill_chunk_size is not None and config.use_cache is False:
            # (as transformers: chunks of the prompt go through the model only into a cache)
            raise ValueError("prefill_chunk_size needs a cache to prefill into: it cannot be used with use_cache=False")
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        inputs_embeds = model_kwargs.pop("inputs_embeds", None)
        if inputs_embeds is not None:
            # As transformers: the embeddings go through the model at prefill, the tokens after them as ids;
            # without input_ids the prompt is no tokens at all (the output holds only the new ones).
            if inputs_embeds.dim() != 3:
                raise ValueError(f"inputs_embeds must be (batch, seq, hidden), got {tuple(inputs_embeds.shape)}")
            if input_ids is None:
                input_ids = torch.ones((inputs_embeds.shape[0], 0), dtype=torch.long, device=self.device)
            config.use_cache = True  # (as transformers: the embeddings are only for the first forward)
        if input_ids is None:
            input_ids = self._bos_prompt(config, model_kwargs)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        input_ids = input_ids.to(self.device)
        attention_mask = model_kwargs.pop("attention_mask", None)
        past_key_values = model_kwargs.pop("past_key_values", None)
        extra = {name: model_kwargs.pop(name) for name in self._generation_input_names if model_kwargs.get(name) is not None}
        for name in self._generation_input_names:
            model_kwargs.pop(name, None)
        if inputs_embeds is not None:  # (a per-row input: repeated for each beam or returned sequence with the rest)
            extra["inputs_embeds"] = inputs_embeds.to(self.device)
        # the prompt's positions: the embeddings', when given
        prompt_shape = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
        # (use_cache is a generation field: config.update took it, the decoders read it)
        # (labels: not an input of generation; logits_to_keep: herd keeps the last position's anyway)
        for key in ("output_attentions", "output_hidden_states", "return_dict", "labels", "logits_to_keep"):
            model_kwargs.pop(key, None)
        position_ids = model_kwargs.pop("position_ids", None)
        # The user's own processors (merged into herd's as transformers merges them: build_logits_processors)
        # and stopping criteria.
        custom_processors = list(model_kwargs.pop("logits_processor", None) or [])
        negative_prompt = model_kwargs.pop("negative_prompt_ids", None), model_kwargs.pop("negative_prompt_attention_mask", None)
        stopping_criteria = list(model_kwargs.pop("stopping_criteria", None) or [])
        if config.max_time is not None:  # generate(max_time=seconds), as transformers adds it
            stopping_criteria.append(MaxTimeCriteria(config.max_time))
        if model_kwargs:
            raise UnknownGenerateArguments(sorted(model_kwargs))

        eos_ids = _as_id_tensor(config.eos_token_id, input_ids.device)
        pad_token_id = config.pad_token_id
        if pad_token_id is None and eos_ids is not None:
            pad_token_id = int(eos_ids[0])
        mask_given = attention_mask is not None
        if attention_mask is None:
            has_padding = config.pad_token_id is not None and bool((input_ids == config.pad_token_id).any())
            pad_is_eos = eos_ids is not None and config.pad_token_id is not None and config.pad_token_id in eos_ids.tolist()
            attention_mask = (input_ids != config.pad_token_id).long() if has_padding and not pad_is_eos else torch.ones_like(input_ids)
            if inputs_embeds is not None:  # no ids to find padding in
                attention_mask = torch.ones(prompt_shape, dtype=torch.long, device=input_ids.device)
        attention_mask = attention_mask.to(input_ids.device)
        if attention_mask.shape != prompt_shape:
            what = "input_ids" if inputs_embeds is None else "inputs_embeds' (batch, seq)"
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match {what} {tuple(prompt_shape)}")
        _warn_about_padding(attention_mask, mask_given, config.pad_token_id, eos_ids)
        if position_ids is not None:  # herd derives positions from the attention mask: only those are accepted
            real = attention_mask.bool()
            derived = positions_from_mask(attention_mask)
            if position_ids.shape != attention_mask.shape or not torch.equal(position_ids.to(derived.device)[real], derived[real]):
                raise NotImplementedError("generate(position_ids=...) other than the attention mask's positions (0, 1, ... "
                                          "from each row's first real token) is not supported by herd: leave position_ids out")

        stop_strings = StopStrings(tokenizer, config.stop_strings) if config.stop_strings else None
        # stop_checks: every per-token rule besides eos, or None (then greedy may run in blocks)
        stop_checks = StopChecks(stop_strings, stopping_criteria) if stop_strings or stopping_criteria else None
        max_length = self._check_lengths(config, input_ids.shape[1], prompt_shape[1])
        extra_positions = prompt_shape[1] - input_ids.shape[1]  # the embeddings' beyond the ids (inputs_embeds)
        before_generate(self, input_ids.shape[0] * max(config.num_beams, 1), max_length + extra_positions, prompt_shape[1])
        # Classifier-free guidance runs first, as in transformers: the others see its log-probabilities.
        guidance = []
        if config.guidance_scale is not None and config.guidance_scale != 1:
            negative_ids, negative_mask = (None if t is None else t.to(self.device) for t in negative_prompt)
            guidance = [classifier_free_guidance(config.guidance_scale, self, negative_ids, negative_mask,
                                                 config.use_cache is not False)]
        config._custom_processors = custom_processors
        config._leading_processors = guidance
        return self._generate(input_ids, attention_mask, config, eos_ids, pad_token_id, max_length, stop_checks,
                              past_key_values, streamer, generator, extra)

    def _generate(self, input_ids, attention_mask, config, eos_ids, pad_token_id, max_length, stop_checks,
                  past_key_values, streamer, generator, extra):
        if config.num_beams > 1:
            if streamer is not None:
                raise ValueError("streamers work with greedy and sampled decoding, not beam search")
            extra = _expand_rows(extra, input_ids.shape[0], config.num_beams)
            return self._beam_search(input_ids, attention_mask, config, eos_ids, pad_token_id, max_length,
                                     stop_checks, past_key_values, generator, extra)
        if config.num_return_sequences > 1:
            extra = _expand_rows(extra, input_ids.shape[0], config.num_return_sequences)
            input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        return self._sample(input_ids, attention_mask, config, eos_ids, pad_token_id, max_length, stop_checks,
                            past_key_values, streamer, generator, extra)

    # --- greedy and sampling ------------------------------------------------------------------
    def _sample(self, input_ids, attention_mask, config, eos_ids, pad_token_id, max_length, stop_checks,
                past_key_values, streamer, generator, extra):
        prompt_length = input_ids.shape[1]
        processors = build_logits_processors(config, eos_ids, prompt_length, _left_padding(attention_mask, prompt_length),
                                             input_ids, self.config.get_text_config().vocab_size, input_ids.device,
                                             leading=config._leading_processors, custom=config._custom_processors)
        want = config.return_dict_in_generate
        scores, raw_logits, attentions, hidden_states = [], [], [], []
        forward_kwargs = {}
        if want and config.output_attentions:
            forward_kwargs["output_attentions"] = True
        if want and config.output_hidden_states:
            forward_kwargs["output_hidden_states"] = True
        if "inputs_embeds" in extra:
            decoder = _EmbedsDecoder(self, config, past_key_values, forward_kwargs,
                                     extra["inputs_embeds"].shape[1] - prompt_length)
        else:
            decoder = choose_decoder(self, config, past_key_values=past_key_values, forward_kwargs=forward_kwargs)
        # a static cache of max_length - 1 positions, as transformers sizes it (the last token never goes in)
        cache = decoder.start(input_ids.shape[0], _cache_length(config, max_length - 1 if isinstance(decoder, PlainDecoder) else max_length))
        # The host asks "is every row done?" only every few tokens on the fast path (each question
        # waits for the device); rows that finished meanwhile get padding, trimmed off at the end.
        sync_interval = decoder.sync_interval if stop_checks is None and streamer is None else 1

        if streamer is not None:
            streamer.put(input_ids.cpu())
        can_finish = eos_ids is not None or stop_checks is not None  # else every row runs to max_length
        # as transformers: finished rows get padding when an eos is one of the rules (the user's
        # EosTokenCriteria counts too)
        pad_finished = eos_ids is not None or (stop_checks is not None and any(
            hasattr(criteria, "eos_token_id") for criteria in stop_checks.criteria))
        # The fast path's logits live in the graph's output until the next step; keep a copy only
        # where they outlive it.
        keep_logits = want and (config.output_scores or config.output_logits)
        # Plain greedy decoding chooses tokens in blocks of sync_interval (on the fast path inside
        # the captured graph: a block is that many replays and nothing else).
        greedy_blocks = (not config.do_sample and not processors and streamer is None and not keep_logits
                         and stop_checks is None and not forward_kwargs)  # (blocks keep no attentions)
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        any_unfinished = []  # per new token: was some row still running after it? (device scalars)
        # Tokens the cache has not seen yet: the whole prompt.
        logits, outputs = decoder.prefill(input_ids[:, cache.get_seq_length() :], attention_mask, extra)
        pending = None  # (batch,): the last chosen tokens, the next step's input
        while True:
            if logits is None:
                block = decoder.greedy_steps(pending, min(sync_interval, max_length - input_ids.shape[1]))
            else:
                next_scores = apply_processors(processors, input_ids, logits)
                if config.do_sample:
                    probs = nn.functional.softmax(next_scores, dim=-1)
                    if can_finish:
                        probs = _drawable(probs, unfinished)
                    block = torch.multinomial(probs, num_samples=1, generator=generator)
                    block = same_tokens_on_every_rank(self, block)  # tensor parallel: rank 0's draw
                else:
                    block = next_scores.argmax(dim=-1, keepdim=True)  # (batch, 1)
                if want:
                    scores.append(next_scores) if config.output_scores else None
                    raw_logits.append(logits) if config.output_logits else None
                    attentions.append(outputs.attentions) if config.output_attentions else None
                    hidden_states.append(outputs.hidden_states) if config.output_hidden_states else None
            if can_finish:
                block, unfinished = _finish_rows(block, unfinished, eos_ids, pad_token_id, any_unfinished, pad_finished)
            input_ids = torch.cat([input_ids, block], dim=-1)
            if streamer is not None:
                streamer.put(block[:, 0].cpu())
            if stop_checks is not None:  # one token per step here: a stop string ends the row after it
                # (the criteria get what transformers hands them: every step's scores so far when
                # they are returned (output_scores), else None)
                unfinished &= ~stop_checks(input_ids, tuple(scores) if want and config.output_scores else None)
                any_unfinished[-1] = unfinished.any()
            new_tokens = input_ids.shape[1] - prompt_length
            if input_ids.shape[1] >= max_length:
                break
            if can_finish and new_tokens % sync_interval == 0 and not bool(any_unfinished[-1]):
                break
            pending = block[:, -1]
            if greedy_blocks:
                logits = None
            else:
                logits, outputs = decoder.step(pending, copy=keep_logits)

        # Tokens made after every row had finished (between two host checks) are dropped.
        if sync_interval > 1 and can_finish:
            still_running = torch.stack(any_unfinished).tolist()
            kept = still_running.index(False) + 1 if False in still_running else len(still_running)
            input_ids = input_ids[:, : prompt_length + kept]
            scores, raw_logits = scores[:kept], raw_logits[:kept]
        if streamer is not None:
            streamer.end()
        if not want:
            return input_ids
        return GenerateDecoderOnlyOutput(
            sequences=input_ids,
            scores=tuple(scores) if config.output_scores else None,
            logits=tuple(raw_logits) if config.output_logits else None,
            attentions=tuple(attentions) if config.output_attentions else None,
            hidden_states=tuple(hidden_states) if config.output_hidden_states else None,
            past_key_values=cache if config.use_cache is not False else None,  # as transformers
        )

    def compute_transition_scores(self, sequences: torch.Tensor, scores: tuple[torch.Tensor, ...],
                                  beam_indices: torch.Tensor | None = None, normalize_logits: bool = False) -> torch.Tensor:
        """(rows, steps): the score each generated token had when it was chosen, from generate()'s
        `sequences` and `scores` (return_dict_in_generate=True, output_scores=True), and after beam
        search its `beam_indices` (which beam row each step of a sequence came from). With
        normalize_logits the scores are log-softmaxed over the vocabulary first. Steps after a beam
        finished are 0; as transformers computes them.
        """
        per_step = torch.stack(tuple(scores), dim=1)  # (scored rows, steps, vocab)
        if normalize_logits:
            per_step = nn.functional.log_softmax(per_step, dim=-1)
        if beam_indices is None:  # greedy or sampling: each sequence is its own row at every step
            beam_indices = torch.arange(per_step.shape[0], device=per_step.device)[:, None].expand(-1, len(scores))
        beam_indices = beam_indices.to(per_step.device)
        ran = beam_indices >= 0
        steps = int(ran.sum(dim=-1).max())
        rows, ran = beam_indices[:, :steps].clamp(min=0).long(), ran[:, :steps]
        tokens = sequences[:, sequences.shape[-1] - steps :].to(per_step.device)
        chosen = per_step[rows, torch.arange(steps, device=per_step.device)[None, :], tokens]
        return chosen.masked_fill(~ran, 0)

    # --- beam search --------------------------------------------------------------------------
    def _beam_search(self, input_ids, attention_mask, config, eos_ids, pad_token_id, max_length, stop_checks,
                     past_key_values, generator, extra):
        """Beam search with the reference's bookkeeping, so it returns the same beams.

        Each step keeps the best `beams_to_keep` = max(2, 1 + #eos) * num_beams continuations of all
        beams; the best `num_beams` that did not stop continue; those that stopped compete, with
        their length-penalised scores, for the `num_beams` finished slots.
        """
        num_beams, length_penalty, early_stopping = config.num_beams, config.length_penalty, config.early_stopping
        batch_size, prompt_length = input_ids.shape
        vocab_size = self.config.get_text_config().vocab_size
        device = input_ids.device
        beams_to_keep = max(2, 1 + (len(eos_ids) if eos_ids is not None else 0)) * num_beams
        is_top_beam = torch.arange(beams_to_keep, device=device) < num_beams  # (beams_to_keep,)
        # (batch * beams,): the processors see every beam of a row as a row of its own
        processors = build_logits_processors(config, eos_ids, prompt_length,
                                             _left_padding(attention_mask.repeat_interleave(num_beams, dim=0), prompt_length),
                                             input_ids.repeat_interleave(num_beams, dim=0), vocab_size, device,
                                             leading=config._leading_processors, custom=config._custom_processors)
        # The reference fills unused positions with pad (eos when pad is 0 or unset), and with -1 when there is
        # no eos (then only stop strings or the user's criteria end beams early), whatever the pad.
        fill_value = (int(pad_token_id) if pad_token_id else int(eos_ids[0])) if eos_ids is not None else -1

        flat_ids = input_ids.repeat_interleave(num_beams, dim=0)  # (batch * beams, prompt)
        attention_mask = attention_mask.repeat_interleave(num_beams, dim=0)
        # output_attentions / output_hidden_states: each step's, for every beam row, as transformers returns them
        want = config.return_dict_in_generate
        forward_kwargs = {name: True for name in ("output_attentions", "output_hidden_states")
                          if want and getattr(config, name)}
        if "inputs_embeds" in extra:
            decoder = _EmbedsDecoder(self, config, past_key_values, forward_kwargs,
                                     extra["inputs_embeds"].shape[1] - prompt_length)
        else:
            decoder = PlainDecoder(self, config, past_key_values, forward_kwargs)
        cache = decoder.start(batch_size * num_beams, _cache_length(config, max_length - 1))  # (as in _sample)

        running = torch.full((batch_size, num_beams, max_length), fill_value, dtype=torch.long, device=device)
        running[:, :, :prompt_length] = flat_ids.view(batch_size, num_beams, -1)
        finished = running.clone()
        running_scores = torch.zeros(batch_size, num_beams, device=device)
        running_scores[:, 1:] = -1e9  # all beams start equal: only the first may expand at step one
        finished_scores = torch.full((batch_size, num_beams), -1e9, device=device)
        is_finished = torch.zeros(batch_size, num_beams, dtype=torch.bool, device=device)
        can_improve = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
        # int32, as transformers returns beam_indices
        running_origin = torch.full((batch_size, num_beams, max_length - prompt_length), -1, dtype=torch.int32, device=device)
        finished_origin = running_origin.clone()
        all_scores, raw_logits, attentions, hidden_states = [], [], [], []

        cur_len = prompt_length
        logits, outputs = decoder.prefill(flat_ids, attention_mask, extra)
        while True:
            log_probs = nn.functional.log_softmax(logits, dim=-1)
            flat_running = running[:, :, :cur_len].reshape(batch_size * num_beams, cur_len)
            log_probs = apply_processors(processors, flat_running, log_probs)
            if config.return_dict_in_generate:
                all_scores.append(log_probs) if config.output_scores else None
                raw_logits.append(logits) if config.output_logits else None
                attentions.append(outputs.attentions) if config.output_attentions else None
                hidden_states.append(outputs.hidden_states) if config.output_hidden_states else None
            # (batch, beams * vocab): every continuation of every beam, with its running score
            candidates = (log_probs.view(batch_size, num_beams, vocab_size) + running_scores[:, :, None]).view(batch_size, -1)
            if config.do_sample:
                picked = torch.multinomial(nn.functional.softmax(candidates, dim=-1), beams_to_keep, generator=generator)
                picked = same_tokens_on_every_rank(self, picked)
                picked_scores = candidates.gather(1, picked)
            else:
                picked_scores, picked = torch.topk(candidates, beams_to_keep)
            source_beam = picked // vocab_size  # (batch, beams_to_keep)
            token = picked % vocab_size
            picked_sequences = _gather(running, source_beam)
            picked_sequences[:, :, cur_len] = token
            picked_origin = _gather(running_origin, source_beam)
            picked_origin[:, :, cur_len - prompt_length] = source_beam + torch.arange(batch_size, device=device)[:, None] * num_beams

            flat_picked = picked_sequences[:, :, : cur_len + 1].reshape(-1, cur_len + 1)
            stops = ends_with_eos(flat_picked, eos_ids)
            if stop_checks is not None:
                stops |= stop_checks(flat_picked, tuple(all_scores) if want and config.output_scores else None)
            if cur_len + 1 >= max_length:
                stops[:] = True
            stops = stops.view(batch_size, beams_to_keep)

            # The best continuations that did not stop keep running.
            open_scores = picked_scores + stops.float() * -1e9
            keep = torch.topk(open_scores, num_beams)[1]
            running, running_scores, running_origin = _gather(picked_sequences, keep), _gather(open_scores, keep), _gather(picked_origin, keep)

            # Those among the top num_beams that stopped compete for the finished slots.
            just_finished = stops & is_top_beam[None, :]
            penalised = picked_scores / ((cur_len + 1 - prompt_length) ** length_penalty)
            batch_full = is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
            penalised = penalised + batch_full.float() * -1e9 + (~can_improve).float() * -1e9 + (~just_finished).float() * -1e9
            merged_scores = torch.cat([finished_scores, penalised], dim=1)
            best = torch.topk(merged_scores, num_beams)[1]
            finished = _gather(torch.cat([finished, picked_sequences], dim=1), best)
            finished_scores = _gather(merged_scores, best)
            finished_origin = _gather(torch.cat([finished_origin, picked_origin], dim=1), best)
            is_finished = _gather(torch.cat([is_finished, just_finished], dim=1), best)

            cache.reorder_cache(running_origin[:, :, cur_len - prompt_length].reshape(-1).long())
            cur_len += 1
            can_improve = _can_still_improve(can_improve, running_scores, finished_scores, is_finished, cur_len,
                                             max_length, prompt_length, early_stopping, length_penalty)
            exists_open_beam = not (bool(is_finished.all()) and early_stopping is True)
            if not bool(can_improve.any()) or not exists_open_beam or bool(stops.all()):
                break
            logits, outputs = decoder.step(running[:, :, cur_len - 1].reshape(-1))

        keep_n = config.num_return_sequences
        sequences = finished[:, :keep_n].reshape(batch_size * keep_n, -1)
        sequence_scores = finished_scores[:, :keep_n].reshape(-1)
        origin = finished_origin[:, :keep_n].reshape(batch_size * keep_n, -1)
        generated = int((origin >= 0).sum(dim=1).max())
        sequences, origin = sequences[:, : prompt_length + generated], origin[:, :generated]
        if not config.return_dict_in_generate:
            return sequences
        return GenerateBeamDecoderOnlyOutput(
            sequences=sequences,
            sequences_scores=sequence_scores if config.output_scores else None,
            scores=tuple(all_scores) if config.output_scores else None,
            logits=tuple(raw_logits) if config.output_logits else None,
            beam_indices=origin,
            attentions=tuple(attentions) if config.output_attentions else None,
            hidden_states=tuple(hidden_states) if config.output_hidden_states else None,
            past_key_values=cache if config.use_cache is not False else None,  # as transformers
        )


class UnknownGenerateArguments(TypeError, ValueError):
    """generate() got arguments that are neither generation options nor model inputs (a TypeError, as
    Python's own for unknown keywords, and a ValueError, as transformers raises)."""

    def __init__(self, names: list[str]):
        import difflib
        import inspect

        known = [*FIELDS, *inspect.signature(GenerationMixin.generate).parameters, "attention_mask", "input_ids",
                 "inputs_embeds", "past_key_values", "output_attentions", "output_hidden_states"]
        hints = [f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, known, n=1, cutoff=0.8)) else name
                 for name in names]
        super().__init__(f"generate() got arguments it does not know: {', '.join(hints)}")


class _EmbedsDecoder(PlainDecoder):
    """generate(inputs_embeds=...): the plain decoder, whose prefill runs the prompt's embeddings
    (extra["inputs_embeds"], (rows, positions, hidden)) rather than its ids; the cache holds their
    positions besides those of the ids that follow."""

    def __init__(self, model, config, past_key_values, forward_kwargs, embeds_beyond_ids: int):
        super().__init__(model, config, past_key_values, forward_kwargs)
        self.embeds_beyond_ids = embeds_beyond_ids

    def start(self, batch: int, max_length: int):
        return super().start(batch, max_length + self.embeds_beyond_ids)

    def prefill(self, tokens, attention_mask, extra: dict[str, Any]):
        extra = dict(extra)
        embeds = extra.pop("inputs_embeds")
        self.attention_mask, self.extra = attention_mask, extra
        embeds = embeds[:, self.cache.get_seq_length() :]  # (a cache passed in holds the first ones)
        step_inputs = self.model._inputs_for_step(extra, True, attention_mask.shape[1])
        positions = positions_from_mask(attention_mask)[:, -embeds.shape[1] :]
        outputs = self.model(inputs_embeds=embeds, attention_mask=attention_mask,
                             position_ids=positions, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                             return_dict=True, **step_inputs, **self.forward_kwargs)
        return outputs.logits[:, -1, :].to(torch.float32), outputs


def _warn_about_padding(attention_mask: torch.Tensor, mask_given: bool, pad_token_id: int | None,
                        eos_ids: torch.Tensor | None) -> None:
    """A batch gives each row what it gets alone only with left padding and a known attention mask.
    Where generate() cannot know which positions are padding (no mask, and no pad id, or a pad id
    that is also an eos id, as with Llama 3's pad_token = eos_token), or the prompts are padded on
    the right (new tokens then follow padding), it says so, as transformers does."""
    if attention_mask.shape[0] < 2:
        return
    if not mask_given and (pad_token_id is None or (eos_ids is not None and pad_token_id in eos_ids.tolist())):
        reason = "there is no pad_token_id" if pad_token_id is None else "pad_token_id is an eos id"
        logger.warning("generate() got a batch without an attention_mask and cannot infer one (%s): every position "
                       "counts as a real token. Pass the tokenizer's attention_mask so that padded rows give what "
                       "they give alone.", reason)
    elif bool((attention_mask[:, -1] == 0).any()):  # the mask given, or inferred from pad_token_id
        logger.warning("generate() got prompts padded on the right (attention_mask ends in 0): new tokens would follow "
                       "the padding. Pad on the left (tokenizer padding_side='left').")


def _left_padding(attention_mask: torch.Tensor, prompt_length: int | None = None) -> torch.Tensor | None:
    """(batch,): how many leading positions of each row are padding, or None when no row has any (or
    when the mask is not the prompt ids' (`prompt_length`): inputs_embeds without their ids)."""
    if prompt_length is not None and attention_mask.shape[-1] != prompt_length:
        return None
    leading = (attention_mask.long().cumsum(dim=-1) == 0).sum(dim=-1)
    return leading if bool(leading.any()) else None


def _finish_rows(block: torch.Tensor, unfinished: torch.Tensor, eos_ids, pad_token_id, any_unfinished: list,
                 pad_finished: bool | None = None):
    """Stopping at eos for a block of new tokens (batch, steps): tokens after a row's first eos (in
    this block or before it) become padding. Returns the block and which rows still run after it;
    appends, per token, whether any row still ran (device scalars: no host sync)."""
    eos_so_far = torch.isin(block, eos_ids).long().cumsum(dim=1) > 0 if eos_ids is not None else torch.zeros_like(block, dtype=torch.bool)
    if pad_token_id is not None and (eos_ids is not None if pad_finished is None else pad_finished):
        # as transformers: finished rows are padded only when eos is one of the stopping rules (rows
        # that only a stop string or a user's other criteria ended run on until every row is done)
        eos_before = torch.cat([torch.zeros_like(eos_so_far[:, :1]), eos_so_far[:, :-1]], dim=1)
        block = torch.where(~unfinished[:, None] | eos_before, pad_token_id, block)
    running = unfinished[:, None] & ~eos_so_far  # (batch, steps)
    any_unfinished.extend(running.any(dim=0).unbind(0))
    return block, running[:, -1]


def _cache_length(config: GenerationConfig, length: int) -> int:
    """The positions a fresh cache is sized for: `length`, or max_cache_len when that is larger and the
    cache is a static one (cache_implementation "static"/"hybrid" or cache_config's FP8), as transformers
    sizes it (a dynamic cache grows as it needs and ignores max_cache_len, with a warning at validate())."""
    static = config.cache_implementation in ("static", "hybrid") or config.kv_cache_dtype is not None
    return max(length, config.max_cache_len) if static and config.max_cache_len is not None else length


def _drawable(probs: torch.Tensor, unfinished: torch.Tensor) -> torch.Tensor:
    """probs (rows, vocab) that torch.multinomial accepts in the rows that already finished: their
    draw becomes padding, but their scores can be all -inf or NaN (forced_eos_token_id at the last
    position with exponential_decay_length_penalty gives -inf + inf), and the fast path steps on past
    a batch's end until its next check. A finished row draws from token 0 alone; a running row's
    probabilities are left as they are (an invalid one fails, as in transformers), and every row's
    draw takes the same random numbers as without this (one uniform number per row)."""
    only_first = torch.zeros_like(probs[:1])
    only_first[0, 0] = 1.0
    return torch.where(unfinished[:, None], probs, only_first)


def _gather(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Pick beams: tensor (batch, beams, ...) at indices (batch, k) -> (batch, k, ...)."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return tensor.gather(1, indices.expand(*indices.shape[:2], *tensor.shape[2:]))


def _can_still_improve(can_improve, running_scores, finished_scores, is_finished, cur_len, max_length,
                       prompt_length, early_stopping, length_penalty):
    """Could the best running beam still beat the worst finished one? (the reference's heuristic)"""
    if early_stopping == "never" and length_penalty > 0.0:
        best_length = max_length - prompt_length
    else:
        best_length = cur_len - prompt_length
    best_running = running_scores[:, :1] / (best_length**length_penalty)
    worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], -1.0e9)
    return can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)


def _expand_rows(extra: dict[str, Any], batch_size: int, repeats: int) -> dict[str, Any]:
    """Repeat per-row inputs (images, masks) for each returned sequence or beam of a row."""
    return {
        name: value.repeat_interleave(repeats, dim=0) if torch.is_tensor(value) and value.shape[0] == batch_size else value
        for name, value in extra.items()
    }


def _as_id_tensor(ids: int | list[int] | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """(ids,): an id, a list of ids or a tensor of them (0-d included, as transformers takes them); None when none."""
    if ids is None:
        return None
    if torch.is_tensor(ids):
        ids = ids.reshape(-1).tolist()
    ids = [ids] if isinstance(ids, int) else list(ids)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None
