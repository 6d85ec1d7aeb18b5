"""Decode plans: how one decode step of each family runs.

A plan reads the model's modules (the model never imports it) and says:
- `prepare()`: what it does to the weights once (fuse q/k/v and gate/up in place);
- `units()`: the pieces of the step that compile, as plain functions (regional compilation);
- `step(run, tokens, positions, kv)`: one new token per row -> float32 logits (batch, vocab),
  with `run` the units (compiled or not) and `kv` the step's key/value stores;
- `attention_kinds()`: per layer, which store its keys/values live in;
- `after_prefill(...)`: what the step needs from the prompt besides the cache (Mllama's image);
- `prefilling()`: a context in which the model's forward prefills the plan's way (Llama's prompt
  pass; the reference forward by default).

A new family adds one module here and one line to `PLANS`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch

# What a layer attends with: its own keys in a full cache, a ring of chunk slots, or an image
# (named beside the stores, which keep the kinds apart: the FP8 KV cache is the full layers' alone)
from ..kv import CHUNKED, CROSS, FULL, DecodeKV  # noqa: F401


class DecodePlan:
    """The interface every family's plan implements."""

    def __init__(self, model):
        self.model = model
        self.text_config = model.config.get_text_config()

    def attention_kinds(self) -> list[str]:
        raise NotImplementedError

    @property
    def chunk_size(self) -> int | None:
        return getattr(self.text_config, "attention_chunk_size", None)

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(kv_heads, head_dim) of the self-attention caches: this rank's heads under tensor parallel."""
        config = self.text_config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return config.num_key_value_heads // (self.model.tp_size or 1), head_dim

    def prepare(self) -> None:
        raise NotImplementedError

    def units(self) -> dict[str, Callable]:
        raise NotImplementedError

    def step(self, run: dict[str, Callable], tokens: torch.Tensor, positions: torch.Tensor, kv: DecodeKV) -> torch.Tensor:
        raise NotImplementedError

    def after_prefill(self, kv: DecodeKV, prefill_cache: Any, step_inputs: dict[str, Any]) -> None:
        """Nothing beyond the cache, for text-only families."""

    def prefilling(self):
        """The reference forward prefills (a family whose plan has a prompt pass replaces this)."""
        return nullcontext()

    def shape_key(self, kv: DecodeKV) -> tuple:
        """What besides (batch, cache length) a captured graph depends on."""
        return ()


def plan_for(model) -> DecodePlan | None:
    """The decode plan of a model's class, or None when its family has none."""
    from ...models.llama import LlamaForCausalLM
    from ...models.llama4 import Llama4ForCausalLM, Llama4ForConditionalGeneration
    from ...models.mllama import MllamaForCausalLM, MllamaForConditionalGeneration
    from .llama import LlamaPlan
    from .llama4 import Llama4Plan
    from .mllama import MllamaPlan

    plans = {
        LlamaForCausalLM: LlamaPlan,
        Llama4ForCausalLM: Llama4Plan,
        Llama4ForConditionalGeneration: Llama4Plan,
        MllamaForCausalLM: MllamaPlan,
        MllamaForConditionalGeneration: MllamaPlan,
    }
    plan = next((plans[cls] for cls in type(model).__mro__ if cls in plans), None)  # subclasses too
    return plan(model) if plan is not None else None
