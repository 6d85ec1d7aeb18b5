"""Llama 1/2/3.x's decode step (and the self-attention layers of Mllama, which are Llama's).

Per layer, at batch 1 (quantized weights: 1 to 4) on a GPU (kernels/gemv.py, kernels/decode_attention.py):
1. q/k/v of rms_norm(x) in one kernel, rotary and the cache write in its epilogue;
2. split attention over the cache, each key/value read once for the query heads that share it;
3. o with the residual add (under tensor parallel: o's partial products summed across ranks first;
   beyond one row the sum's kernel also normalises for the next projection: `project_add_norm`);
4. gate/up of rms_norm(x) with SiLU(gate) * up, in one kernel;
5. down with the residual add (likewise).
Elsewhere the same arithmetic in torch, which the compiled step fuses its own way.

The prompt pass (`LlamaPlan.prefilling`): while the fast decoder or the server prefills, the
reference forward's layers run as `llama_prefill_layer`: the same arithmetic, rounded at the same
points, with the fused q/k/v and gate/up weights as single library matmuls and the elementwise work
between them in kernels/prefill.py (residual add + RMSNorm, rotary, SiLU * up, the two-part
attention's merge), instead of a dozen separate torch ops per layer over every prompt token.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch
from torch import nn

from ...kernels import gemv, prefill
from ...layers.attention import attention, cudnn_after_cache
from ...parallel.tensor_parallel import all_reduce, all_reduce_norm, gather_logits, reduce_group, settled
from ..fusion import Fused, fuse, kernel_weight
from ..kv import DecodeKV, LayerKV, attend
from . import FULL, DecodePlan


class LayerWeights(NamedTuple):
    """A layer's projections, those that share an input fused (decoding/fusion.py): tensors only
    (a weight is a tensor, or a gemv.QuantizedWeight of tensors), the compiled step's inputs (the
    same code serves every layer)."""

    qkv: torch.Tensor  # (q + k + v features, hidden)
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor  # (2 * intermediate, hidden)
    gate_up_bias: torch.Tensor | None
    o: torch.Tensor  # (hidden, q features)
    down: torch.Tensor  # (hidden, intermediate)


class FusedLayer(NamedTuple):
    qkv: Fused
    gate_up: Fused
    o: torch.Tensor
    down: torch.Tensor

    @property
    def weights(self) -> LayerWeights:
        return LayerWeights(self.qkv.weight, self.qkv.bias, self.gate_up.weight, self.gate_up.bias, self.o, self.down)


def fuse_layer(attn, mlp, previous: FusedLayer | None = None) -> FusedLayer:
    """Fuse q/k/v of attention `attn` and gate/up of the gated MLP `mlp`."""
    return FusedLayer(
        fuse(attn.q_proj, attn.k_proj, attn.v_proj, previous=previous and previous.qkv),
        fuse(mlp.gate_proj, mlp.up_proj, previous=previous and previous.gate_up),
        kernel_weight(attn.o_proj),
        kernel_weight(mlp.down_proj),
    )


def embed(text_model, tokens: torch.Tensor, positions: torch.Tensor):
    """tokens, positions (batch,) -> hidden (batch, hidden), cos/sin (batch, 1, head_dim)."""
    hidden = text_model.embed_tokens(tokens)
    cos, sin = text_model.rotary_emb(positions[:, None], hidden.dtype)
    return hidden, cos, sin


def llama_layer(layer, weights: LayerWeights, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: LayerKV, normed: torch.Tensor | None = None, next_norm=None,
                next_weight=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LlamaDecoderLayer.forward for one token per row: hidden (batch, hidden) -> (batch, hidden),
    and its RMSNorm by `next_norm` (the next layer's input norm or the final norm, feeding
    `next_weight`) where tensor parallel's sum computes it (`project_add_norm`), else None.
    `normed`: this layer's input normalised by the previous layer's sum, or None."""
    attn, mlp = layer.self_attn, layer.mlp
    norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
    batch = hidden.shape[0]
    query = gemv.norm_qkv_rotary(hidden, norm.weight, norm.eps, weights.qkv, weights.qkv_bias, cos, sin,
                                 kv.keys, kv.values, kv.slot, kv.key_scales, kv.value_scales,
                                 normed=normed)  # (batch, heads * head_dim)
    query = query.view(batch, attn.num_heads, 1, attn.head_dim)
    attended = attend(query, kv, attn.scaling)
    hidden, post_normed = project_add_norm(attended, weights.o, hidden, attn.o_proj, post_norm, weights.gate_up)
    activated = gemv.norm_gated_activation(hidden, post_norm.weight, post_norm.eps, weights.gate_up,
                                           mlp.act_fn, weights.gate_up_bias, normed=post_normed)  # (batch, intermediate)
    return project_add_norm(activated, weights.down, hidden, mlp.down_proj, next_norm, next_weight)


def project_add(x: torch.Tensor, weight, residual: torch.Tensor, linear) -> torch.Tensor:
    """residual + linear(x), with `weight` the linear's kernel weight. Under tensor parallel a
    linear split by its input features gives each rank a partial product: those are summed
    (all-reduce) before the residual is added, so it is added once, not once per rank; without
    it, the residual add is fused into the matmul kernel."""
    if reduce_group(linear) is None:
        return gemv.linear_add(x, weight, residual, linear.bias)
    return summed(gemv.linear(x, weight, linear.bias), linear, residual)  # the bias: rank 0's alone


def project_add_norm(x: torch.Tensor, weight, residual: torch.Tensor, linear, norm,
                     next_weight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(project_add's result, its RMSNorm by `norm`) where tensor parallel's sum can normalise in
    the same kernel and the next projection (`next_weight`) would not fuse the norm itself (more
    rows than the few-row kernel takes: the library matmul's input is normalised apart, one
    kernel per norm); else, or without a `norm`, (project_add's result, None)."""
    group = reduce_group(linear)
    if group is None or norm is None or gemv.kernel_applies(residual, norm.weight, next_weight):
        return project_add(x, weight, residual, linear), None
    partial = gemv.linear(x, weight, linear.bias)
    fused = all_reduce_norm(partial, group, residual, norm.weight, norm.eps)
    return fused if fused is not None else (summed(partial, linear, residual), None)


def summed(partial: torch.Tensor, module, residual: torch.Tensor | None = None) -> torch.Tensor:
    """A module's output, all-reduced where tensor parallel makes it a partial sum (a linear split
    by its input features, Llama 4's feed-forward block); as it is otherwise. Plus `residual`
    when given (under tensor parallel added after the sum, in the same kernel where it can)."""
    group = reduce_group(module)
    if group is None:
        return partial if residual is None else residual + partial
    return all_reduce(partial, group, residual=residual)


def llama_prefill_layer(layer, weights: LayerWeights, hidden: torch.Tensor, normed: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, mask, cache, cache_position: torch.Tensor, next_norm,
                        kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaDecoderLayer.forward for a prompt chunk: hidden (batch, seq, hidden) and `normed`, its
    input norm -> (the layer's output, its norm by `next_norm`: the next layer's input norm or the
    final norm). Keys/values go to `cache` as the reference's do (its update gives back what the
    chunk attends to); `kv_heads`: this rank's key (= value) heads."""
    attn, mlp = layer.self_attn, layer.mlp
    batch, seq, width = hidden.shape
    head_dim = attn.head_dim
    qkv = gemv.linear(normed.view(-1, width), weights.qkv, weights.qkv_bias).view(batch, seq, -1, head_dim)
    query, key, value = qkv.split([qkv.shape[2] - 2 * kv_heads, kv_heads, kv_heads], dim=2)  # (batch, seq, heads, dim)
    query, key = prefill.rotary(query, key, cos, sin)  # (batch, heads, seq, head_dim)
    key, value = cache.update(key, value.transpose(1, 2), attn.layer_idx, {"cache_position": cache_position})
    attended = prompt_attention(attn, query, key, value, mask)  # (batch, seq, heads, head_dim)
    attended = settled(summed(gemv.linear(attended.reshape(batch * seq, -1), weights.o, attn.o_proj.bias), attn.o_proj))
    post_norm = layer.post_attention_layernorm
    hidden, normed = prefill.add_rms_norm(hidden, attended.view(batch, seq, width), post_norm.weight, post_norm.eps)
    gate_up = gemv.linear(normed.view(-1, width), weights.gate_up, weights.gate_up_bias)  # (tokens, 2 * intermediate)
    gate, up = gate_up.chunk(2, dim=-1)
    activated = prefill.silu_mul(gate, up) if mlp.act_fn is nn.functional.silu else mlp.act_fn(gate) * up
    down = settled(summed(gemv.linear(activated, weights.down, mlp.down_proj.bias), mlp.down_proj))
    return prefill.add_rms_norm(hidden, down.view(batch, seq, width), next_norm.weight, next_norm.eps)


def prompt_attention(attn, query, key, value, mask) -> torch.Tensor:
    """The reference attention of a prompt chunk -> (batch, seq, heads, head_dim); a long chunk
    after a cache on cuDNN has its two parts merged by one kernel (kernels/prefill.py)."""
    implementation = attn.config._attn_implementation
    if implementation == "sdpa":
        output = cudnn_after_cache(query, key, value, mask, attn.scaling, merge=prefill.merge_attention_parts)
        if output is not None:
            return output
    return attention(implementation, query, key, value, mask, attn.scaling)[0]


def head(norm, lm_head, hidden: torch.Tensor, normed: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, hidden) -> float32 logits (batch, vocab) (under tensor parallel this rank's
    vocabulary rows, gathered). `normed`: norm(hidden) when the last sum computed it."""
    logits = gemv.norm_linear(hidden, norm.weight, norm.eps, lm_head.weight, lm_head.bias, out_dtype=torch.float32,
                              normed=normed)
    return gather_logits(lm_head, logits)


class LlamaPlan(DecodePlan):
    def __init__(self, model):
        super().__init__(model)
        self.text_model = model.model
        self.fused: list[FusedLayer | None] = [None] * len(self.text_model.layers)
        self.weights: list[LayerWeights] = []
        self.prompt_pass = False  # `prefilling` replaces the reference's layers (set by prepare)

    def attention_kinds(self) -> list[str]:
        return [FULL] * len(self.text_model.layers)

    def prepare(self) -> None:
        self.fused = [fuse_layer(layer.self_attn, layer.mlp, previous)
                      for layer, previous in zip(self.text_model.layers, self.fused)]
        self.weights = [fused.weights for fused in self.fused]
        # the prompt pass multiplies plain weights; quantized ones keep their modules' arithmetic
        self.prompt_pass = bool(self.weights) and all(
            isinstance(weight, torch.Tensor) for weights in self.weights
            for weight in (weights.qkv, weights.gate_up, weights.o, weights.down))

    def units(self) -> dict[str, Callable]:
        return {"embed": embed, "layer": llama_layer, "head": head}

    @contextmanager
    def prefilling(self):
        """While inside, the text model's forward runs its layers as `prefill_layers` (an instance
        attribute over LlamaModel.forward_layers: the model file stays the reference)."""
        text_model = self.text_model
        if not self.prompt_pass or "forward_layers" in vars(text_model):
            yield  # not prepared, quantized weights, or already inside: the reference forward
            return
        text_model.forward_layers = self.prefill_layers
        try:
            yield
        finally:
            del text_model.forward_layers

    def prefill_layers(self, step, attention_mask: torch.Tensor | None):
        """LlamaModel.forward_layers with `llama_prefill_layer`; the reference's own where a
        forward asks for more than the last hidden state (attention weights, every layer's input),
        keeps no cache or runs in training mode."""
        text_model = self.text_model
        if step.output_attentions or step.output_hidden_states or text_model.training or step.past_key_values is None:
            return type(text_model).forward_layers(text_model, step, attention_mask)
        mask = step.self_attention_mask(attention_mask)
        cos, sin = text_model.rotary_emb(step.position_ids, step.inputs_embeds.dtype)  # (batch, seq, head_dim)
        layers = text_model.layers
        first = layers[0].input_layernorm
        hidden, normed = prefill.add_rms_norm(step.inputs_embeds, None, first.weight, first.eps)
        for index, layer in enumerate(layers):
            following = layers[index + 1].input_layernorm if index + 1 < len(layers) else text_model.norm
            hidden, normed = llama_prefill_layer(layer, self.weights[index], hidden, normed, cos, sin, mask,
                                                 step.past_key_values, step.cache_position, following,
                                                 self.kv_shape[0])
        return step.collector().output(normed)

    def step(self, run, tokens, positions, kv: DecodeKV) -> torch.Tensor:
        hidden, cos, sin = run["embed"](self.text_model, tokens, positions)
        layers, normed = self.text_model.layers, None
        for index, layer in enumerate(layers):
            # the norm that follows and the weight it feeds: tensor parallel's sums may compute it
            following = ((layers[index + 1].input_layernorm, self.weights[index + 1].qkv) if index + 1 < len(layers)
                         else (self.text_model.norm, self.model.lm_head.weight))
            hidden, normed = run["layer"](layer, self.weights[index], hidden, cos, sin, kv.layer(index), normed,
                                          *following)
        return run["head"](self.text_model.norm, self.model.lm_head, hidden, normed)
