"""Llama 4 text (Scout, Maverick): a decoder of mixture-of-experts blocks and two kinds of attention.

What is special here:
- Mixture of experts: a sigmoid router picks `num_experts_per_tok` of `num_local_experts`
  experts per token; the router's score scales the expert's *input* (not its output), and a
  shared expert runs on every token. Only the routed experts' weights are read: tokens are
  grouped by expert and each expert multiplies its own group. Maverick interleaves dense
  layers (`moe_layers`).
- Chunked local attention on the rope layers: a token sees only earlier tokens of its own chunk
  of `attention_chunk_size` positions, so the cache keeps just the last chunk for those layers.
  Every `no_rope_layer_interval`-th layer is a global NoPE layer: no rotary embedding, full
  causal attention, and (attn_temperature_tuning) queries scaled up with the position so that
  long contexts stay sharp.
- Rope on adjacent pairs of dimensions (complex multiplication), then an L2 norm of queries and
  keys (use_qk_norm) on the rope layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...generation import GenerationMixin
from ...layers.activations import get_activation
from ...layers.attention import AttentionMask, attention
from ...layers.mlp import GatedMLP
from ...layers.norm import RMSNorm
from ...layers.rope import ComplexRotaryEmbedding, apply_complex_rotary, derived_from_config
from ...modeling_outputs import BaseModelOutput, BaseModelOutputWithPast, ModelOutput
from ...modeling_utils import (
    GradientCheckpointingLayer,
    CausalLMForward,
    DecoderStep,
    TextDecoderForward,
    PreTrainedModel,
    check_input_ids,
    flag,
    reject_unknown_kwargs,
)
from .configuration_llama4 import Llama4Config, Llama4TextConfig, Llama4VisionConfig


@dataclass(repr=False)
class Llama4TextModelOutputWithPast(BaseModelOutputWithPast):
    """The text decoder's output; router_logits (one (batch * seq, experts) tensor per MoE layer)
    when output_router_logits asks for them. Keys (and the tuple form) in transformers' order for
    Llama4TextModel: attentions before hidden_states, router_logits last."""

    router_logits: tuple[torch.Tensor, ...] | None = None

    def keys(self) -> list[str]:
        order = ("last_hidden_state", "past_key_values", "attentions", "hidden_states", "router_logits")
        return [key for key in order if getattr(self, key) is not None]


@dataclass(repr=False)
class Llama4CausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None


class Llama4TextExperts(nn.Module):
    """All experts' weights, stored as real checkpoints store them:
    gate_up_proj (experts, hidden, 2 * intermediate), down_proj (experts, intermediate, hidden)."""

    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_size, 2 * self.intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.intermediate_size, self.hidden_size))
        self.act_fn = get_activation(config.hidden_act)

    def expert_forward(self, expert: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens (tokens, hidden); reads only this expert's weights."""
        gate, up = (hidden_states @ self.gate_up_proj[expert]).chunk(2, dim=-1)  # (tokens, intermediate) each
        return (up * self.act_fn(gate)) @ self.down_proj[expert]

    def forward(self, hidden_states: torch.Tensor, expert_ids: torch.Tensor, expert_scores: torch.Tensor) -> torch.Tensor:
        """hidden_states (tokens, hidden); expert_ids / expert_scores (tokens, top_k) -> (tokens, hidden).

        Each (token, expert) pair's input is scaled by its router score, the pairs are sorted by
        expert, and every expert with tokens runs once on its group.
        """
        tokens, top_k = expert_ids.shape
        flat_experts = expert_ids.reshape(-1)  # (tokens * top_k,)
        order = torch.argsort(flat_experts, stable=True)
        token_of_pair = torch.arange(tokens, device=hidden_states.device).repeat_interleave(top_k)[order]
        routed_in = hidden_states[token_of_pair] * expert_scores.reshape(-1, 1)[order]  # (pairs, hidden)
        group_sizes = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        outputs, start = [], 0
        for expert, size in enumerate(group_sizes):
            if size:
                outputs.append(self.expert_forward(expert, routed_in[start : start + size]))
                start += size
        routed_out = torch.cat(outputs, dim=0)  # (pairs, hidden), sorted by expert
        return torch.zeros_like(hidden_states).index_add_(0, token_of_pair, routed_out)


class Llama4Router(nn.Linear):
    """Scores every expert, keeps the top k, and squashes their scores with a sigmoid."""

    def __init__(self, config: Llama4TextConfig):
        super().__init__(config.hidden_size, config.num_local_experts, bias=False)
        self.top_k = config.num_experts_per_tok

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, hidden) -> expert ids (tokens, k), their scores (tokens, k), all logits (tokens, experts)."""
        router_logits = super().forward(hidden_states)
        top_logits, expert_ids = torch.topk(router_logits, self.top_k, dim=-1)
        expert_scores = torch.sigmoid(top_logits.float()).to(hidden_states.dtype)
        return expert_ids, expert_scores, router_logits


class Llama4TextMoe(nn.Module):
    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.experts = Llama4TextExperts(config)
        self.router = Llama4Router(config)
        self.shared_expert = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, self.hidden_size)  # (tokens, hidden)
        expert_ids, expert_scores, _ = self.router(flat)
        output = self.shared_expert(flat) + self.experts(flat, expert_ids, expert_scores)
        return output.view(shape)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight, in float32 (Llama 4's query/key norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class Llama4TextAttention(nn.Module):
    def __init__(self, config: Llama4TextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.uses_rope = bool(config.no_rope_layers[layer_idx])
        self.uses_qk_norm = config.use_qk_norm and self.uses_rope
        self.uses_temperature_tuning = config.attn_temperature_tuning and not self.uses_rope
        self.eps = config.rms_norm_eps
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def temperature(self, positions: torch.Tensor) -> torch.Tensor:
        """The query scale at these positions (any shape), float32:
        1 + attn_scale * log(1 + floor((position + 1) / floor_scale)). 1 until floor_scale - 1,
        then a step up every floor_scale positions (Scout: 8192, attn_scale 0.1)."""
        return torch.log1p(torch.floor((positions.float() + 1.0) / self.config.floor_scale)) * self.config.attn_scale + 1.0

    def _temperature(self, past_length: int, seq: int, device: torch.device) -> torch.Tensor:
        """(seq,) query scale of this call's tokens, at cache positions past_length onwards."""
        return self.temperature(torch.arange(seq, device=device) + past_length)

    def forward(self, hidden_states, freqs, mask: AttentionMask, past_key_values=None, cache_position=None,
                output_attentions=False):
        batch, seq, _ = hidden_states.shape
        # (batch, seq, heads, head_dim): rope, norm and temperature act in this layout
        query = self.q_proj(hidden_states).view(batch, seq, -1, self.head_dim)
        key = self.k_proj(hidden_states).view(batch, seq, -1, self.head_dim)
        value = self.v_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if self.uses_rope:
            query, key = apply_complex_rotary(query, key, freqs)
        if self.uses_qk_norm:
            query, key = l2_norm(query, self.eps), l2_norm(key, self.eps)
        if self.uses_temperature_tuning:
            # Positions count from the cache's start (padding included), as in the reference.
            past_length = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
            scale = self._temperature(past_length, seq, hidden_states.device).view(1, seq, 1, 1)
            query = (query * scale).to(query.dtype)
        query, key = query.transpose(1, 2), key.transpose(1, 2)  # (batch, heads, seq, head_dim)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx, {"cache_position": cache_position})
        output, weights = attention(
            self.config._attn_implementation, query, key, value, mask, self.scaling,
            dropout=self.attention_dropout, training=self.training, output_attentions=output_attentions,
        )
        return self.o_proj(output.reshape(batch, seq, -1)), weights


class Llama4TextDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: Llama4TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Llama4TextAttention(config, layer_idx)
        self.is_moe_layer = layer_idx in config.moe_layers
        self.uses_chunked_attention = config.layer_types[layer_idx] == "chunked_attention"
        if self.is_moe_layer:
            self.feed_forward = Llama4TextMoe(config)
        else:
            self.feed_forward = GatedMLP(config.hidden_size, config.intermediate_size_mlp, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, freqs, mask, past_key_values=None, cache_position=None, output_attentions=False):
        attended, weights = self.self_attn(
            self.input_layernorm(hidden_states), freqs, mask, past_key_values, cache_position, output_attentions
        )
        hidden_states = hidden_states + attended
        hidden_states = hidden_states + self.feed_forward(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights


class Llama4PreTrainedModel(PreTrainedModel):
    config_class = Llama4TextConfig
    base_model_prefix = "model"

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Llama4TextExperts):
            std = self.config.get_text_config().initializer_range
            with torch.no_grad():
                module.gate_up_proj.normal_(0.0, std)
                module.down_proj.normal_(0.0, std)

    # A full Llama4ForConditionalGeneration checkpoint: keep the language model, never read the
    # vision tower or the projector.
    _load_key_renames = (("vision_model.", None), ("multi_modal_projector.", None), ("language_model.", ""))


class Llama4TextModel(TextDecoderForward, Llama4PreTrainedModel):
    def __init__(self, config: Llama4TextConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(Llama4TextDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ComplexRotaryEmbedding(config.rope_parameters, config.head_dim, config.max_position_embeddings)
        # The first layer of each attention kind: where the cache is asked for that kind's sizes.
        self.first_layer_of_kind = {}
        for index, layer in enumerate(self.layers):
            self.first_layer_of_kind.setdefault(layer.uses_chunked_attention, index)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None, cache_position=None,
                output_router_logits: bool | None = None, **kwargs: Any):
        """TextDecoderForward's forward, and with output_router_logits (or the config's) each MoE
        layer's router logits (before top-k), in `router_logits`; the output in transformers' key
        order for this model (Llama4TextModelOutputWithPast)."""
        arguments = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         cache_position=cache_position, **kwargs)
        router_logits: list[torch.Tensor] = []
        hooks, wanted = [], flag(output_router_logits, self.config.output_router_logits)
        if wanted:
            def keep_logits(_module, _inputs, routed):  # the router returns (expert_ids, expert_scores, logits)
                router_logits.append(routed[2])

            hooks = [layer.feed_forward.router.register_forward_hook(keep_logits)
                     for layer in self.layers if layer.is_moe_layer]
        try:
            output = super().forward(return_dict=True, **arguments)
        finally:
            for hook in hooks:
                hook.remove()
        output = Llama4TextModelOutputWithPast(**{key: getattr(output, key) for key in output.keys()},
                                               router_logits=tuple(router_logits) if wanted else None)
        return output if flag(return_dict, self.config.return_dict) else output.to_tuple()

    def forward_layers(self, step: DecoderStep, attention_mask: torch.Tensor | None) -> BaseModelOutputWithPast | tuple:
        """forward() once its arguments are resolved (modeling_utils.TextDecoderForward)."""
        # One mask description per attention kind present, each as the cache holds its first layer.
        masks = {chunked: step.self_attention_mask(attention_mask, layer_idx,
                                                   self.config.attention_chunk_size if chunked else None)
                 for chunked, layer_idx in self.first_layer_of_kind.items()}
        freqs = self.rotary_emb(step.position_ids)  # complex (batch or 1, seq, head_dim // 2)

        hidden_states, collected = step.inputs_embeds, step.collector()
        for layer in self.layers:
            collected.layer_input(hidden_states)
            hidden_states, weights = layer(hidden_states, freqs, masks[layer.uses_chunked_attention], step.past_key_values,
                                           step.cache_position, step.output_attentions)
            collected.layer_weights(weights)
        return collected.output(self.norm(hidden_states))


class Llama4ForCausalLM(CausalLMForward, Llama4PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Llama4TextConfig):
        if isinstance(config, Llama4Config):
            config = config.text_config
        super().__init__(config)
        self.model = Llama4TextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                cache_position=None, logits_to_keep: int | torch.Tensor = 0, output_router_logits: bool | None = None,
                **kwargs: Any):
        """CausalLMForward's forward. output_router_logits is accepted and changes nothing, as in
        transformers: its Llama4ForCausalLM returns neither the router logits nor an auxiliary loss."""
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                               use_cache=use_cache, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states, return_dict=return_dict,
                               cache_position=cache_position, logits_to_keep=logits_to_keep, **kwargs)


__all__ = ["Llama4PreTrainedModel", "Llama4TextModel", "Llama4ForCausalLM"]


# ------------------------------------------------------------------------------------------------
# Vision encoder and the multimodal model
# ------------------------------------------------------------------------------------------------


def vision_rotary_frequencies(config: Llama4VisionConfig) -> torch.Tensor:
    """2D rotary frequencies of the patch grid, complex64 (patches + 1, head_dim // 2).

    Half of each head's dimensions rotate with the patch's column, half with its row (positions
    counted from 1); the class token, last in the sequence, is not rotated.
    """
    side = config.image_size // config.patch_size
    head_dim = config.hidden_size // config.num_attention_heads
    freq_dim = head_dim // 2
    index = torch.arange(side * side + 1)
    column, row = (index % side + 1).float(), (index // side + 1).float()  # (patches + 1,)
    inv_freq = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, freq_dim, 2)[: freq_dim // 2].float() / freq_dim))
    # (patches + 1, head_dim // 2): x angles then y angles, each frequency used for one complex pair
    angles = torch.cat([column[:, None] * inv_freq, row[:, None] * inv_freq], dim=-1)
    angles[-1] = 0.0  # the class token
    return torch.polar(torch.ones_like(angles), angles)


class Llama4UnfoldConvolution(nn.Module):
    """Patchify as unfold + linear (the checkpoint stores `patch_embedding.linear.weight`)."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.unfold = nn.Unfold(kernel_size=config.patch_size, stride=config.patch_size)
        self.linear = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (tiles, channels, h, w) -> (tiles, channels * p * p, patches) -> (tiles, patches, hidden)
        return self.linear(self.unfold(pixel_values).permute(0, 2, 1))


class Llama4VisionAttention(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.attention_dropout = config.attention_dropout
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=True)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor, freqs: torch.Tensor, output_attentions: bool = False):
        tiles, patches, _ = hidden_states.shape
        # (tiles, patches, heads, head_dim): the 2D rope acts in this layout
        query, key, value = (
            proj(hidden_states).view(tiles, patches, self.num_heads, self.head_dim)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        query, key = apply_complex_rotary(query, key, freqs[None])
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        mask = AttentionMask(patches, patches, causal=False)  # every patch sees every patch of its tile
        implementation = "sdpa" if self.config._attn_implementation == "flex_attention" else self.config._attn_implementation
        output, weights = attention(implementation, query, key, value, mask, self.head_dim**-0.5,
                                    dropout=self.attention_dropout, training=self.training,
                                    output_attentions=output_attentions)
        return self.o_proj(output.reshape(tiles, patches, -1)), weights


class Llama4VisionMLP(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(hidden_states)))


class Llama4VisionEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.self_attn = Llama4VisionAttention(config)
        self.mlp = Llama4VisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, freqs: torch.Tensor, output_attentions: bool = False):
        attended, weights = self.self_attn(self.input_layernorm(hidden_states), freqs, output_attentions)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)), weights


class Llama4VisionEncoder(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(Llama4VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


def pixel_shuffle(features: torch.Tensor, ratio: float) -> torch.Tensor:
    """(tiles, patches, channels) -> (tiles, patches * ratio^2, channels / ratio^2): merge neighbouring
    patches into fewer, wider tokens (ratio 0.5: each 2x2 block of patches becomes one token)."""
    tiles, patches, channels = features.shape
    side = int(math.isqrt(patches))
    grid = features.view(tiles, side, side, channels)
    grid = grid.view(tiles, side, int(side * ratio), int(channels / ratio)).permute(0, 2, 1, 3).contiguous()
    grid = grid.view(tiles, int(side * ratio), int(side * ratio), int(channels / ratio**2)).permute(0, 2, 1, 3).contiguous()
    return grid.view(tiles, -1, grid.shape[-1])


class Llama4VisionMLP2(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.intermediate_size, config.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(config.projector_output_dim, config.projector_output_dim, bias=False)
        self.dropout = config.projector_dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = nn.functional.gelu(self.fc1(hidden_states))
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        return nn.functional.gelu(self.fc2(hidden_states))


class Llama4VisionPixelShuffleMLP(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.pixel_shuffle_ratio = config.pixel_shuffle_ratio
        self.mlp = Llama4VisionMLP2(config)

    def forward(self, encoded_patches: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(encoded_patches, self.pixel_shuffle_ratio))


class Llama4VisionModel(Llama4PreTrainedModel):
    config_class = Llama4VisionConfig
    base_model_prefix = "vision_model"
    _load_key_renames = (("vision_model.", ""), ("language_model.", None), ("multi_modal_projector.", None))

    def __init__(self, config: Llama4VisionConfig):
        if isinstance(config, Llama4Config):
            config = config.vision_config
        super().__init__(config)
        self.hidden_size = config.hidden_size
        self.num_patches = (config.image_size // config.patch_size) ** 2 + 1  # + the class token
        scale = config.hidden_size**-0.5
        self.patch_embedding = Llama4UnfoldConvolution(config)
        self.class_embedding = nn.Parameter(scale * torch.randn(self.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(scale * torch.randn(self.num_patches, self.hidden_size))
        self.register_buffer("rotary_frequencies", derived_from_config(lambda: vision_rotary_frequencies(config)),
                             persistent=False)
        self.layernorm_pre = nn.LayerNorm(self.hidden_size)
        self.layernorm_post = nn.LayerNorm(self.hidden_size)
        self.model = Llama4VisionEncoder(config)
        self.vision_adapter = Llama4VisionPixelShuffleMLP(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        with torch.no_grad():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embedding

    def forward(self, pixel_values: torch.Tensor, attention_mask=None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None, **kwargs: Any):
        """pixel_values (tiles, channels, height, width) -> (tiles, patches * ratio^2, projector_output_dim)."""
        kwargs.pop("vision_feature_select_strategy", None)
        reject_unknown_kwargs(kwargs)
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (tiles, channels, height, width), got {tuple(pixel_values.shape)}")
        output_attentions = flag(output_attentions, self.config.output_attentions)
        output_hidden_states = flag(output_hidden_states, self.config.output_hidden_states)
        weight = self.patch_embedding.linear.weight
        # The image processor may hand bfloat16 pixels to a float32 model: use the tower's dtype.
        hidden = self.patch_embedding(pixel_values.to(weight.device, weight.dtype))  # (tiles, patches, hidden)
        hidden = torch.cat([hidden, self.class_embedding.expand(hidden.shape[0], 1, -1)], dim=1)  # class token last
        hidden = self.layernorm_pre(hidden + self.positional_embedding_vlm.to(hidden.dtype))
        all_hidden, all_attentions = [], []
        for layer in self.model.layers:
            all_hidden.append(hidden)
            hidden, weights = layer(hidden, self.rotary_frequencies, output_attentions)
            all_attentions.append(weights)
        all_hidden.append(hidden)
        hidden = self.layernorm_post(hidden)[:, :-1, :]  # drop the class token
        output = BaseModelOutput(
            last_hidden_state=self.vision_adapter(hidden),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return output if flag(return_dict, self.config.return_dict) else output.to_tuple()


class Llama4MultiModalProjector(nn.Module):
    def __init__(self, config: Llama4Config):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.vision_output_dim, config.text_config.hidden_size, bias=False)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_1(image_features)


class Llama4ForConditionalGeneration(Llama4PreTrainedModel, GenerationMixin):
    """Early fusion: image features replace the embeddings of the `<|image|>` placeholder tokens."""

    config_class = Llama4Config
    base_model_prefix = "model"
    _load_key_renames = ()  # the module tree is the checkpoint's layout
    _generation_input_names = ("pixel_values",)

    def __init__(self, config: Llama4Config):
        super().__init__(config)
        self.vision_model = Llama4VisionModel(config.vision_config)
        self.multi_modal_projector = Llama4MultiModalProjector(config)
        self.language_model = Llama4ForCausalLM(config.text_config)
        self.vocab_size = config.text_config.vocab_size
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.language_model.set_output_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor, vision_feature_select_strategy: str | None = None,
                           **kwargs: Any):
        """The vision tower's output (before the projector), as the reference returns it (a tuple
        with return_dict=False)."""
        kwargs.setdefault("return_dict", True)
        return self.vision_model(pixel_values, **kwargs)

    def get_placeholder_mask(self, input_ids, inputs_embeds: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """(batch, seq, 1) True at image placeholder tokens; their count must match the image feature rows."""
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_index, device=inputs_embeds.device))
            placeholders = (inputs_embeds == image_embedding).all(-1)
        else:
            placeholders = input_ids == self.config.image_token_index
        count = int(placeholders.sum())
        rows = image_features.numel() // inputs_embeds.shape[-1]
        if count * inputs_embeds.shape[-1] != image_features.numel():
            raise ValueError(
                f"the prompt has {count} image placeholder tokens but the images give {rows} feature rows; "
                "build the prompt with the processor so that each image expands to its tokens"
            )
        return placeholders.unsqueeze(-1)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, vision_feature_select_strategy=None, labels=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, cache_position=None,
                logits_to_keep: int | torch.Tensor = 0, output_router_logits: bool | None = None, **kwargs: Any):
        # output_router_logits changes nothing here, as in transformers (no router logits, no auxiliary loss).
        reject_unknown_kwargs(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and inputs_embeds is not None:
            raise ValueError("pass pixel_values with input_ids, not with inputs_embeds")
        image_features = None
        if inputs_embeds is None:
            check_input_ids(input_ids, self.get_input_embeddings().num_embeddings)
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (batch, seq, hidden)
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values).last_hidden_state
            projected = self.multi_modal_projector(image_features.view(-1, image_features.shape[-1]))
            projected = projected.to(inputs_embeds.device, inputs_embeds.dtype)  # (image tokens, hidden)
            placeholders = self.get_placeholder_mask(input_ids, inputs_embeds, projected)
            inputs_embeds = inputs_embeds.masked_scatter(placeholders, projected)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, labels=labels, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, cache_position=cache_position, logits_to_keep=logits_to_keep,
            return_dict=True, **kwargs,  # the loss's keyword arguments
        )
        output = Llama4CausalLMOutputWithPast(
            loss=outputs.loss, logits=outputs.logits, past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions, image_hidden_states=image_features,
        )
        return output if flag(return_dict, self.config.return_dict) else output.to_tuple()


__all__ = __all__ + ["Llama4VisionModel", "Llama4ForConditionalGeneration"]
