"""Tensor-parallel plans: per family, how each module of the text decoder is split across ranks.

A plan maps module paths (relative to the text decoder; `*` is one path component, a layer index)
to a style; modules no pattern names are replicated (norms, rotary tables, Llama 4's router,
Mllama's cross-attention gates and q/k norms). Styles (tensor_parallel.py applies them):

- "colwise":   a linear split by output features (its weight's rows, with their scales and bias);
               each rank computes its own heads / its own part of the intermediate activations.
- "rowwise":   a linear split by input features (its weight's columns); each rank's product is a
               partial sum, all-reduced (so the next block sees the whole hidden state).
- "partial":   as "rowwise", but the all-reduce is left to an enclosing module that sums this
               output with others first (Llama 4's shared expert, summed with the routed experts).
- "experts":   Llama 4's routed experts split along their intermediate size: gate_up_proj
               (experts, hidden, 2 * inter) by its gate and up columns, down_proj (experts, inter,
               hidden) by its rows; partial sums like "partial".
- "reduce":    the module's output is all-reduced (the MoE block: shared + routed experts, once).
- "attention": an attention module whose local head counts change (the projections carry the split).
- "vocab":     an embedding split by vocabulary rows: a masked lookup, then an all-reduce.
- "vocab_gather": the lm_head split by vocabulary rows; the logits are all-gathered, so every rank
               returns the full (batch, seq, vocab) logits.

The head ("lm_head") sits beside the text decoder; `plan_for` places both at their paths in a
model class.
"""

from __future__ import annotations

# The embedding and self-attention every family's decoder shares: heads split across the ranks.
SELF_ATTENTION = {
    "embed_tokens": "vocab",
    "layers.*.self_attn": "attention",
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
}

LLAMA_DECODER = {
    **SELF_ATTENTION,
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}

LLAMA4_DECODER = {
    **SELF_ATTENTION,
    # dense layers (Maverick interleaves them)
    "layers.*.feed_forward.gate_proj": "colwise",
    "layers.*.feed_forward.up_proj": "colwise",
    "layers.*.feed_forward.down_proj": "partial",
    # MoE layers
    "layers.*.feed_forward.shared_expert.gate_proj": "colwise",
    "layers.*.feed_forward.shared_expert.up_proj": "colwise",
    "layers.*.feed_forward.shared_expert.down_proj": "partial",
    "layers.*.feed_forward.experts": "experts",
    # one all-reduce per feed-forward block, dense or MoE (shared + routed experts summed first)
    "layers.*.feed_forward": "reduce",
}

MLLAMA_DECODER = {
    **LLAMA_DECODER,  # its self-attention layers are Llama's
    "layers.*.cross_attn": "attention",
    "layers.*.cross_attn.q_proj": "colwise",
    "layers.*.cross_attn.k_proj": "colwise",
    "layers.*.cross_attn.v_proj": "colwise",
    "layers.*.cross_attn.o_proj": "rowwise",
}

HEAD = {"lm_head": "vocab_gather"}


def plan_for(model) -> dict[str, str] | None:
    """The plan of a model's class, keyed on module paths from the model's root, or None when its
    family has none."""
    from ..models.llama import LlamaForCausalLM, LlamaModel
    from ..models.llama4 import Llama4ForCausalLM, Llama4TextModel
    from ..models.mllama import MllamaForCausalLM, MllamaTextModel

    # class -> (its text decoder's path, the decoder's plan, whether it has an lm_head)
    layouts = {
        LlamaForCausalLM: ("model", LLAMA_DECODER, True),
        LlamaModel: ("", LLAMA_DECODER, False),
        Llama4ForCausalLM: ("model", LLAMA4_DECODER, True),
        Llama4TextModel: ("", LLAMA4_DECODER, False),
        MllamaForCausalLM: ("model", MLLAMA_DECODER, True),
        MllamaTextModel: ("", MLLAMA_DECODER, False),
    }
    layout = next((layouts[cls] for cls in type(model).__mro__ if cls in layouts), None)
    if layout is None:
        return None
    prefix, decoder, has_head = layout
    plan = {(f"{prefix}.{path}" if prefix else path): style for path, style in decoder.items()}
    return {**plan, **HEAD} if has_head else plan
