"""Llama 4's decode step (Scout, Maverick; text, and the text of the multimodal model: its
images went in with the prompt).

Per layer: q/k/v as one matmul, rope on adjacent pairs in real arithmetic (the reference's
complex multiplication, which compilers do not fuse), the query/key L2 norm on rope layers and
the temperature of NoPE layers from the cache position, the new key/value written at the
store's slot (a ring for chunked layers), attention over the store, then a dense gated MLP or
the mixture of experts: a router max (top-1) or top-k, routed experts read by index
(kernels/routed_experts.py) and the shared expert as one gate/up matmul. The compiled step
fuses the elementwise work around the matmuls.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ...kernels import gemv
from ...kernels.routed_experts import routed_experts
from ...quantization.experts import QuantizedExperts
from ..kv import DecodeKV, LayerKV, attend, store_token
from . import CHUNKED, FULL, DecodePlan
from .llama import LayerWeights, fuse_layer, summed


def embed(text_model, tokens: torch.Tensor, positions: torch.Tensor):
    """tokens, positions (batch,) -> hidden (batch, hidden) and the rotation's cos/sin
    (batch, 1, head_dim // 2) each, float32."""
    hidden = text_model.embed_tokens(tokens)
    rotary = text_model.rotary_emb
    inv_freq, scaling = rotary._inv_freq_for(positions)
    angles = positions[:, None, None].float() * inv_freq.float()
    return hidden, angles.cos() * scaling, angles.sin() * scaling


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., head_dim): dimensions 2i and 2i + 1 turned by the angle of pair i (Llama 4's layout)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """As the reference's query/key norm: RMS normalisation without a weight, in float32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def gated_mlp(mlp, gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    gate, up = gemv.linear(x, gate_up).chunk(2, dim=-1)
    return gemv.linear(mlp.act_fn(gate) * up, down)


def mixture_of_experts(moe, shared_gate_up: torch.Tensor, shared_down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Llama4TextMoe.forward for x (batch, hidden) without host syncs."""
    batch, hidden = x.shape
    router_logits = nn.functional.linear(x, moe.router.weight)  # (batch, experts)
    if moe.router.top_k == 1:
        # a max fuses into the kernel after the router, where topk would be a library call (both
        # pick the largest logit)
        top_logits, expert_ids = router_logits.max(dim=-1, keepdim=True)
    else:
        top_logits, expert_ids = torch.topk(router_logits, moe.router.top_k, dim=-1)
    expert_scores = torch.sigmoid(top_logits.float()).to(x.dtype)  # (batch, top_k)
    routed_in = (x[:, None, :] * expert_scores[..., None]).reshape(-1, hidden)  # (batch * top_k, hidden)
    experts = moe.experts
    if isinstance(experts, QuantizedExperts):  # their stored tensors per projection
        gate_up, down = experts.stored("gate_up_proj"), experts.stored("down_proj")
    else:
        gate_up, down = experts.gate_up_proj, experts.down_proj
    routed_out = routed_experts(routed_in, expert_ids.reshape(-1), gate_up, down, experts.act_fn).view(batch, -1, hidden)
    return gated_mlp(moe.shared_expert, shared_gate_up, shared_down, x) + routed_out.sum(dim=1)


def llama4_layer(layer, weights: LayerWeights, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kv: LayerKV, cache_position: torch.Tensor) -> torch.Tensor:
    """Llama4TextDecoderLayer.forward for one token per row: hidden (batch, hidden). weights: the
    layer's projections as the kernels take them (gate/up and down: the shared expert's in MoE layers)."""
    attn = layer.self_attn
    config = attn.config
    batch = hidden.shape[0]
    projected = gemv.linear(layer.input_layernorm(hidden), weights.qkv)
    # (batch, heads + 2 kv_heads, head_dim) -> query (batch, heads, head_dim), key/value (batch, kv_heads, head_dim);
    # the counts from the shapes: this rank's heads under tensor parallel
    kv_heads = kv.keys.shape[1]
    heads = projected.shape[1] // attn.head_dim - 2 * kv_heads
    query, key, value = projected.view(batch, -1, attn.head_dim).split([heads, kv_heads, kv_heads], dim=1)
    if attn.uses_rope:
        query, key = rotate_pairs(query, cos, sin), rotate_pairs(key, cos, sin)
    if attn.uses_qk_norm:
        query, key = l2_norm(query, attn.eps), l2_norm(key, attn.eps)
    if attn.uses_temperature_tuning:
        # positions count from the cache's start (padding included), as in the reference;
        # cache_position (1,) shared by the rows, or (batch,) one per row (a paged store)
        scale = attn.temperature(cache_position)
        query = (query * scale.view(-1, 1, 1)).to(query.dtype)
    store_token(kv, key, value)
    attended = attend(query[:, :, None], kv, attn.scaling)
    hidden = summed(gemv.linear(attended.reshape(batch, -1), weights.o), attn.o_proj, hidden)
    normed = layer.post_attention_layernorm(hidden)
    if layer.is_moe_layer:
        fed = mixture_of_experts(layer.feed_forward, weights.gate_up, weights.down, normed)
    else:
        fed = gated_mlp(layer.feed_forward, weights.gate_up, weights.down, normed)
    return summed(fed, layer.feed_forward, hidden)  # tensor parallel: one all-reduce per feed-forward block


def head(norm, lm_head, hidden: torch.Tensor) -> torch.Tensor:
    """(batch, hidden) -> float32 logits (batch, vocab)."""
    return lm_head(norm(hidden)).float()


class Llama4Plan(DecodePlan):
    def __init__(self, model):
        super().__init__(model)
        language_model = getattr(model, "language_model", model)  # the multimodal model's text part
        self.text_model = language_model.model
        self.lm_head = language_model.lm_head
        self.fused = [None] * len(self.text_model.layers)

    def attention_kinds(self) -> list[str]:
        return [CHUNKED if layer.uses_chunked_attention else FULL for layer in self.text_model.layers]

    def prepare(self) -> None:
        self.fused = [
            fuse_layer(layer.self_attn, layer.feed_forward.shared_expert if layer.is_moe_layer else layer.feed_forward,
                       previous)
            for layer, previous in zip(self.text_model.layers, self.fused)
        ]

    def units(self) -> dict[str, Callable]:
        return {"embed": embed, "layer": llama4_layer, "head": head}

    def step(self, run, tokens, positions, kv: DecodeKV) -> torch.Tensor:
        hidden, cos, sin = run["embed"](self.text_model, tokens, positions)
        for index, layer in enumerate(self.text_model.layers):
            hidden = run["layer"](layer, self.fused[index].weights, hidden, cos, sin, kv.layer(index), kv.cache_position)
        return run["head"](self.text_model.norm, self.lm_head, hidden)
