"""Llama 3.2 Vision's decode step: Llama's self-attention layers, and gated cross-attention
layers that read the image.

The image is encoded once, at prefill; its cross-attention keys/values are copied into fixed
buffers sized from the request's images (`CrossAttentionKV`), so the step is captured as one
CUDA graph for any number of images and tiles (one graph per size). New tokens see the images
the last prompt token saw (as the reference's generate() repeats the mask's last row). A row
that sees no image gets zero from both gated branches of a cross-attention layer, as in the
reference forward; a prompt with no image at all skips the cross-attention layers.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from ...kernels import gemv
from ..fusion import fuse, kernel_weight
from ..kv import DecodeKV, LayerKV, attend
from . import CROSS, FULL, DecodePlan
from .llama import embed, fuse_layer, head, llama_layer, summed


class CrossLayerWeights(NamedTuple):
    """A cross-attention layer's projections as the kernels take them (decoding/fusion.py)."""

    q: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor  # gate and up fused
    down: torch.Tensor


def cross_attention_layer(layer, weights: CrossLayerWeights, hidden: torch.Tensor, kv: LayerKV,
                          row_sees_image: torch.Tensor) -> torch.Tensor:
    """MllamaCrossAttentionDecoderLayer.forward for one token per row: hidden (batch, hidden);
    row_sees_image (batch, 1)."""
    attn, mlp = layer.cross_attn, layer.mlp
    norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
    batch = hidden.shape[0]
    query = gemv.norm_linear(hidden, norm.weight, norm.eps, weights.q)  # (batch, heads * head_dim)
    query = attn.q_norm(query.view(batch, attn.num_heads, 1, attn.head_dim))
    attended = attend(query, kv, attn.scaling)
    attended = row_sees_image * summed(gemv.linear(attended, weights.o), attn.o_proj)
    hidden = hidden + layer.cross_attn_attn_gate.tanh() * attended
    activated = gemv.norm_gated_activation(hidden, post_norm.weight, post_norm.eps, weights.gate_up, mlp.act_fn)
    fed = row_sees_image * summed(gemv.linear(activated, weights.down), mlp.down_proj)
    return hidden + layer.cross_attn_mlp_gate.tanh() * fed


class MllamaPlan(DecodePlan):
    def __init__(self, model):
        super().__init__(model)
        backbone = model.model
        self.text_model = getattr(backbone, "language_model", backbone)  # MllamaModel's, or MllamaForCausalLM's
        self.vision_model = getattr(backbone, "vision_model", None)
        self.cross_layers = set(self.text_config.cross_attention_layers)
        self.fused: list[Any] = [None] * len(self.text_model.layers)
        self.weights: list[Any] = []

    def attention_kinds(self) -> list[str]:
        return [CROSS if index in self.cross_layers else FULL for index in range(len(self.text_model.layers))]

    def prepare(self) -> None:
        fused = []
        for index, (layer, previous) in enumerate(zip(self.text_model.layers, self.fused)):
            if index in self.cross_layers:
                fused.append(fuse(layer.mlp.gate_proj, layer.mlp.up_proj, previous=previous))
            else:
                fused.append(fuse_layer(layer.self_attn, layer.mlp, previous))
        self.fused = fused
        self.weights = [self._cross_weights(index, record) if index in self.cross_layers else record.weights
                        for index, record in enumerate(fused)]

    def _cross_weights(self, index: int, gate_up) -> CrossLayerWeights:
        layer = self.text_model.layers[index]
        return CrossLayerWeights(kernel_weight(layer.cross_attn.q_proj), kernel_weight(layer.cross_attn.o_proj),
                                 gate_up.weight, kernel_weight(layer.mlp.down_proj))

    def units(self) -> dict[str, Callable]:
        return {"embed": embed, "layer": llama_layer, "cross_attention_layer": cross_attention_layer, "head": head}

    def after_prefill(self, kv: DecodeKV, prefill_cache, step_inputs: dict[str, Any]) -> None:
        """Copy the image's keys/values from the prefill into the store's fixed buffers."""
        image_keys_values = prefill_cache.cross_attention_cache()
        if not image_keys_values:
            return  # no image: the cross-attention layers are skipped
        keys, values = next(iter(image_keys_values.values()))
        batch, image_tokens = keys.shape[0], keys.shape[2]
        mask = step_inputs.get("cross_attention_mask")
        if mask is None:
            visible_tokens = torch.ones(batch, image_tokens, dtype=torch.bool, device=keys.device)
        else:
            # (batch, images, tiles) of the last prompt token -> (batch, image tokens)
            tokens_per_tile = image_tokens // (mask.shape[2] * mask.shape[3])
            visible_tokens = mask[:, -1].bool().repeat_interleave(tokens_per_tile, dim=-1).reshape(batch, -1)
        kv.set_image(image_keys_values, visible_tokens)

    def shape_key(self, kv: DecodeKV) -> tuple:
        return () if kv.cross is None else kv.cross.shape_key

    def step(self, run, tokens, positions, kv: DecodeKV) -> torch.Tensor:
        hidden, cos, sin = run["embed"](self.text_model, tokens, positions)
        for index, layer in enumerate(self.text_model.layers):
            if index not in self.cross_layers:
                hidden, _ = run["layer"](layer, self.weights[index], hidden, cos, sin, kv.layer(index))
            elif kv.cross is not None:
                hidden = run["cross_attention_layer"](layer, self.weights[index], hidden, kv.layer(index),
                                                      kv.cross.row_sees_image)
        return run["head"](self.text_model.norm, self.model.lm_head, hidden)
