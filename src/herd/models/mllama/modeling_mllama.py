"""Llama 3.2 Vision (Mllama): a tiled vision encoder feeding gated cross-attention layers that are
interleaved with the self-attention layers of a Llama 3.1 text model.

What is special here:
- Images arrive as up to `max_num_tiles` tiles each, plus an aspect-ratio id that selects learned
  tile embeddings. A local encoder (32 layers) runs on each tile's patches; a gated global
  encoder (8 layers) runs over all tiles of an image; selected local layers' outputs are
  concatenated to the final features (`intermediate_layers_indices`).
- Text tokens read image features only in the `cross_attention_layers`, through tanh-gated
  residuals. Keys/values of those layers are computed once from the image and cached.
- `cross_attention_mask` says which text tokens see which image's tiles. Rows that see no
  image (tokens before the first `<|image|>`) get a zero cross-attention mask (so no NaN), and
  both their cross-attention and cross-layer MLP outputs are zeroed: they learn nothing of the
  image. That is Meta's behaviour; transformers 5.17 zeroes only the MLP part (see the layer).
- The input embedding has 8 extra rows (the `<|image|>` token is id 128256, one past the
  lm_head's vocabulary).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...cache import Cache, as_cache
from ...generation import GenerationMixin
from ...layers.activations import get_activation
from ...layers.attention import AttentionMask, attention
from ...layers.mlp import GatedMLP
from ...layers.norm import RMSNorm
from ...layers.rope import RotaryEmbedding
from ...modeling_outputs import BaseModelOutput, BaseModelOutputWithPast, CausalLMOutputWithPast
from ...modeling_utils import (
    GradientCheckpointingLayer,
    PreTrainedModel,
    flag,
    language_model_output,
    prepare_decoder_step,
    reject_unknown_kwargs,
)
from ..llama.modeling_llama import LlamaDecoderLayer
from .configuration_mllama import MllamaConfig, MllamaTextConfig, MllamaVisionConfig

# ------------------------------------------------------------------------------------------------
# Vision encoder
# ------------------------------------------------------------------------------------------------


class MllamaPrecomputedAspectRatioEmbedding(nn.Module):
    """One learned vector per (aspect ratio, tile), added to every patch of that tile."""

    def __init__(self, config: MllamaVisionConfig, is_gated: bool = True):
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        self.hidden_size = config.hidden_size
        self.is_gated = is_gated
        self.embedding = nn.Embedding(config.max_aspect_ratio_id + 1, self.max_num_tiles * self.hidden_size)
        if is_gated:
            self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden_state: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # hidden_state (images, tiles, patches, hidden); aspect_ratio_ids (images, 1)
        embeddings = self.embedding(aspect_ratio_ids).reshape(-1, self.max_num_tiles, 1, self.hidden_size)
        if self.is_gated:
            embeddings = embeddings * self.gate.tanh()
        return hidden_state + embeddings


class MllamaPrecomputedPositionEmbedding(nn.Module):
    """Patch positions, blended (by a learned gate) with per-(aspect ratio, tile) position tables."""

    def __init__(self, config: MllamaVisionConfig):
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        self.num_patches = (config.image_size // config.patch_size) ** 2 + 1
        self.hidden_size = config.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(config.hidden_size**-0.5 * torch.randn(self.num_patches, self.hidden_size))
        self.tile_embedding = nn.Embedding(
            config.max_aspect_ratio_id + 1, self.max_num_tiles * self.num_patches * self.hidden_size
        )

    def forward(self, hidden_state: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        gate = self.gate.tanh()
        hidden_state = hidden_state + ((1 - gate) * self.embedding).view(1, 1, self.num_patches, self.hidden_size)
        tiles = self.tile_embedding(aspect_ratio_ids).reshape(
            hidden_state.shape[0], self.max_num_tiles, self.num_patches, self.hidden_size
        )
        return hidden_state + gate * tiles


class MllamaVisionMLP(nn.Module):
    def __init__(self, config: MllamaVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation_fn = get_activation(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class MllamaVisionAttention(nn.Module):
    def __init__(self, config: MllamaVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.attention_heads
        self.head_dim = config.hidden_size // config.attention_heads
        self.scaling = self.head_dim**-0.5
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        # (batch, seq, hidden) -> (batch, heads, seq, head_dim)
        query, key, value = (
            proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        output, _ = attention(_dense_backend(self.config), query, key, value, mask, self.scaling)
        return self.o_proj(output.reshape(batch, seq, -1))


def _dense_backend(config) -> str:
    """Vision and cross attention use additive float masks: flex attention takes those through sdpa."""
    implementation = config._attn_implementation or "sdpa"
    return "sdpa" if implementation == "flex_attention" else implementation


class MllamaVisionEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MllamaVisionConfig, is_gated: bool = False):
        super().__init__()
        self.is_gated = is_gated
        self.self_attn = MllamaVisionAttention(config)
        self.mlp = MllamaVisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        if is_gated:
            self.gate_attn = nn.Parameter(torch.ones(1) * math.pi / 4)
            self.gate_ffn = nn.Parameter(torch.ones(1) * math.pi / 4)

    def forward(self, hidden_states: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(hidden_states), mask)
        hidden_states = hidden_states + (self.gate_attn.tanh() * attended if self.is_gated else attended)
        fed = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + (self.gate_ffn.tanh() * fed if self.is_gated else fed)


class MllamaVisionEncoder(nn.Module):
    def __init__(self, config: MllamaVisionConfig, num_layers: int, is_gated: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionEncoderLayer(config, is_gated) for _ in range(num_layers))

    def forward(self, hidden_states: torch.Tensor, mask: AttentionMask) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the last hidden state and every layer's output."""
        outputs = []
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
            outputs.append(hidden_states)
        return hidden_states, outputs


def tile_padding_mask(aspect_ratio_mask: torch.Tensor, num_patches: int, padded_patches: int, dtype: torch.dtype) -> torch.Tensor:
    """(images, tiles) -> additive (images, 1, tiles * padded_patches, tiles * padded_patches).

    As in the reference, only pairs where both the query and the key are padding (an empty tile,
    or the rows padded to a multiple of 8) are masked; real patches still see padded ones.
    """
    images, tiles = aspect_ratio_mask.shape
    is_padding = 1 - aspect_ratio_mask.view(images, tiles, 1, 1).to(dtype).repeat(1, 1, padded_patches, 1)
    if padded_patches > num_patches:
        is_padding[:, :, num_patches:] = 1
    is_padding = is_padding.reshape(images, tiles * padded_patches, 1)
    return (is_padding @ is_padding.transpose(-1, -2) * torch.finfo(dtype).min).unsqueeze(1)


class MllamaPreTrainedModel(PreTrainedModel):
    config_class = MllamaConfig
    base_model_prefix = "model"

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        with torch.no_grad():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, MllamaVisionModel):
                module.class_embedding.normal_(0.0, module.hidden_size**-0.5)
            elif isinstance(module, MllamaPrecomputedPositionEmbedding):
                module.embedding.normal_(0.0, module.hidden_size**-0.5)
                module.gate.zero_()


class MllamaVisionModel(MllamaPreTrainedModel):
    config_class = MllamaVisionConfig
    base_model_prefix = "vision_model"
    _load_key_renames = (("vision_model.", ""), ("language_model.", None), ("multi_modal_projector.", None))

    def __init__(self, config: MllamaVisionConfig):
        if isinstance(config, MllamaConfig):
            config = config.vision_config
        super().__init__(config)
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.max_num_tiles = config.max_num_tiles
        self.hidden_size = config.hidden_size
        self.intermediate_layers_indices = config.intermediate_layers_indices
        self.num_patches = (config.image_size // config.patch_size) ** 2 + 1  # + the class token
        self.patch_embedding = nn.Conv2d(config.num_channels, self.hidden_size, config.patch_size, config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(self.hidden_size**-0.5 * torch.randn(self.hidden_size))
        self.gated_positional_embedding = MllamaPrecomputedPositionEmbedding(config)
        self.pre_tile_positional_embedding = MllamaPrecomputedAspectRatioEmbedding(config, is_gated=True)
        self.post_tile_positional_embedding = MllamaPrecomputedAspectRatioEmbedding(config, is_gated=True)
        self.layernorm_pre = nn.LayerNorm(self.hidden_size)
        self.layernorm_post = nn.LayerNorm(self.hidden_size)
        self.transformer = MllamaVisionEncoder(config, config.num_hidden_layers, is_gated=False)
        self.global_transformer = MllamaVisionEncoder(config, config.num_global_layers, is_gated=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embedding

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor,
                return_dict: bool | None = None, **kwargs: Any) -> BaseModelOutput | tuple:
        """pixel_values (batch, images, tiles, channels, height, width) ->
        last_hidden_state (batch, images, tiles, patches + 1, vision_output_dim)."""
        reject_unknown_kwargs(kwargs)
        if pixel_values.dim() != 6:
            raise ValueError(f"pixel_values must be (batch, images, tiles, channels, height, width), got {tuple(pixel_values.shape)}")
        if aspect_ratio_ids is None or aspect_ratio_mask is None:
            raise ValueError("pixel_values need aspect_ratio_ids and aspect_ratio_mask (the processor returns both)")
        batch, images, tiles, channels, height, width = pixel_values.shape
        if tiles != self.max_num_tiles:
            raise ValueError(f"pixel_values have {tiles} tiles per image, the model supports {self.max_num_tiles}")
        flat_images = batch * images
        pixel_values = pixel_values.reshape(flat_images * tiles, channels, height, width)
        aspect_ratio_ids = aspect_ratio_ids.reshape(flat_images, -1)
        weight = self.patch_embedding.weight

        patches = self.patch_embedding(pixel_values.to(weight.device, weight.dtype))  # (image tiles, hidden, h', w')
        hidden = patches.flatten(2).transpose(1, 2)  # (image tiles, patches, hidden)
        num_patches, dim = hidden.shape[1], hidden.shape[2]
        hidden = self.pre_tile_positional_embedding(hidden.reshape(flat_images, tiles, num_patches, dim), aspect_ratio_ids)
        hidden = hidden.reshape(flat_images * tiles, num_patches, dim)
        hidden = torch.cat([self.class_embedding.expand(hidden.shape[0], 1, dim), hidden], dim=1)
        num_patches += 1
        hidden = hidden.reshape(flat_images, tiles, num_patches, dim)
        hidden = self.gated_positional_embedding(hidden, aspect_ratio_ids)
        hidden = self.layernorm_pre(hidden)

        # Pad the patch axis to a multiple of 8 (the reference does, and its mask depends on it).
        padded_patches = num_patches + (8 - num_patches % 8) % 8
        hidden = nn.functional.pad(hidden, (0, 0, 0, padded_patches - num_patches))
        additive = tile_padding_mask(aspect_ratio_mask.reshape(flat_images, -1), self.num_patches, padded_patches, weight.dtype)
        mask = AttentionMask(tiles * padded_patches, tiles * padded_patches, causal=False, custom=additive)

        hidden = hidden.view(flat_images, tiles * padded_patches, dim)
        hidden, layer_outputs = self.transformer(hidden, mask)  # local: every patch of every tile of an image
        hidden = self.layernorm_post(hidden)
        hidden = self.post_tile_positional_embedding(hidden.reshape(flat_images, tiles, padded_patches, dim), aspect_ratio_ids)
        hidden, _ = self.global_transformer(hidden.reshape(flat_images, tiles * padded_patches, dim), mask)

        hidden = hidden.reshape(flat_images, tiles, padded_patches, dim)[:, :, :num_patches]
        hidden = hidden.reshape(batch, images, tiles, num_patches, dim)
        intermediate = torch.stack([layer_outputs[i] for i in self.intermediate_layers_indices], dim=-1)
        intermediate = intermediate.reshape(flat_images, tiles, padded_patches, -1)[:, :, :num_patches]
        intermediate = intermediate.reshape(batch, images, tiles, num_patches, -1)
        output = BaseModelOutput(last_hidden_state=torch.cat([hidden, intermediate], dim=-1))
        return output if flag(return_dict, self.config.return_dict) else output.to_tuple()


# ------------------------------------------------------------------------------------------------
# Text model with cross-attention layers
# ------------------------------------------------------------------------------------------------


class MllamaTextCrossAttention(nn.Module):
    def __init__(self, config: MllamaTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def image_keys_values(self, cross_attention_states: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features (batch * images * tiles, patches, hidden) -> keys/values (batch, kv_heads, image tokens, head_dim)."""
        keys = self.k_proj(cross_attention_states).view(batch, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        values = self.v_proj(cross_attention_states).view(batch, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        return self.k_norm(keys), values

    def forward(self, hidden_states, keys, values, mask: AttentionMask, output_attentions=False):
        batch, seq, _ = hidden_states.shape
        query = self.q_norm(self.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2))
        backend = "eager" if output_attentions else _dense_backend(self.config)
        output, weights = attention(backend, query, keys, values, mask, self.scaling, dropout=self.dropout,
                                    training=self.training, output_attentions=output_attentions)
        return self.o_proj(output.reshape(batch, seq, -1)), weights


class MllamaCrossAttentionDecoderLayer(GradientCheckpointingLayer):
    """Reads the image: tanh-gated cross-attention, then a tanh-gated MLP."""

    def __init__(self, config: MllamaTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.cross_attn = MllamaTextCrossAttention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden_states, keys, values, cross_mask, rows_seeing_images, output_attentions=False):
        attended, weights = self.cross_attn(self.input_layernorm(hidden_states), keys, values, cross_mask, output_attentions)
        if rows_seeing_images is not None:
            # A row that sees no image attends uniformly to every image token (its mask row is all
            # zeros, to avoid NaN); Meta's implementation zeroes that output, so text before the
            # first <|image|> learns nothing of the image. transformers 5.17 does not (it leaks an
            # average of the image into those rows); herd follows Meta here.
            attended = rows_seeing_images[:, 0] * attended
        hidden_states = hidden_states + self.cross_attn_attn_gate.tanh() * attended
        fed = self.mlp(self.post_attention_layernorm(hidden_states))
        if rows_seeing_images is not None:
            fed = rows_seeing_images[:, 0] * fed  # (batch, seq, 1): text that sees no image gets no MLP here
        return hidden_states + self.cross_attn_mlp_gate.tanh() * fed, weights


def prepare_cross_attention_mask(cross_attention_mask: torch.Tensor, tokens_per_tile: int, dtype: torch.dtype):
    """(batch, seq, images, tiles) of 0/1 -> additive (batch, 1, seq, image tokens) and rows_seeing_images (batch, 1, seq, 1).

    A row that sees no image would be all -inf (NaN after softmax): it is set to zeros instead, and
    its cross-layer MLP output is zeroed through `rows_seeing_images`, as in the reference.
    """
    batch, seq = cross_attention_mask.shape[:2]
    visible = cross_attention_mask.repeat_interleave(tokens_per_tile, dim=3).view(batch, seq, -1).unsqueeze(1)
    hidden = (1.0 - visible).to(dtype)
    additive = hidden.masked_fill(hidden.bool(), torch.finfo(dtype).min)
    rows_seeing_images = (additive != torch.finfo(dtype).min).any(dim=-1).type_as(additive)[..., None]
    return additive * rows_seeing_images, rows_seeing_images


class MllamaTextModel(MllamaPreTrainedModel):
    config_class = MllamaTextConfig
    base_model_prefix = "model"
    _load_key_renames = (("language_model.model.", ""), ("language_model.lm_head.", None), ("vision_model.", None),
                         ("multi_modal_projector.", None))

    def __init__(self, config: MllamaTextConfig):
        if isinstance(config, MllamaConfig):
            config = config.text_config
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        # 8 rows past the vocabulary: the <|image|> token (id 128256) and spares.
        self.embed_tokens = nn.Embedding(config.vocab_size + 8, config.hidden_size, self.padding_idx)
        self.cross_attention_layers = config.cross_attention_layers
        self.layers = nn.ModuleList(
            MllamaCrossAttentionDecoderLayer(config, i) if i in self.cross_attention_layers else LlamaDecoderLayer(config, i)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope_parameters, config.head_dim, config.max_position_embeddings)
        # The cache's positions are read from a self-attention layer: a cross-attention layer stores
        # none in it (config with cross_attention_layers starting at layer 0).
        self._first_self_attention_layer = next(
            (i for i in range(config.num_hidden_layers) if i not in self.cross_attention_layers), 0)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cross_attention_states: torch.FloatTensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        full_text_row_masked_out_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """`cross_attention_mask` here is the prepared additive mask (batch, 1, seq, image tokens)."""
        reject_unknown_kwargs(kwargs)
        step = prepare_decoder_step(
            self, self.embed_tokens, input_ids=input_ids, inputs_embeds=inputs_embeds, past_key_values=past_key_values,
            use_cache=use_cache, position_ids=position_ids, cache_position=cache_position,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
        )
        first_self = self._first_self_attention_layer
        if first_self and step.past_key_values is not None:
            past = step.past_key_values.get_seq_length(first_self)
            if past != step.past_length:  # layer 0 is a cross-attention layer: its count of positions is 0
                if cache_position is None:
                    step.cache_position = step.cache_position + (past - step.past_length)
                    if position_ids is None:
                        step.position_ids = step.cache_position.unsqueeze(0)
                step.past_length = past
        batch, seq, past_key_values = step.batch, step.seq, step.past_key_values
        mask = step.self_attention_mask(attention_mask, first_self)
        cross_mask = None
        if cross_attention_mask is not None:
            cross_mask = AttentionMask(seq, cross_attention_mask.shape[-1], causal=False, custom=cross_attention_mask)
        position_embeddings = self.rotary_emb(step.position_ids, step.inputs_embeds.dtype)
        cross_cache = past_key_values.cross_attention_cache() if past_key_values is not None else {}

        hidden_states, collected = step.inputs_embeds, step.collector()
        for index, layer in enumerate(self.layers):
            if isinstance(layer, MllamaCrossAttentionDecoderLayer):
                if cross_attention_states is not None:
                    keys, values = layer.cross_attn.image_keys_values(cross_attention_states, batch)
                    if past_key_values is not None:
                        cross_cache[index] = (keys, values)
                elif index in cross_cache:
                    keys, values = cross_cache[index]
                else:
                    continue  # no image anywhere (text-only prompt): the layer is skipped, as in the reference
                if cross_mask is None:  # images without a cross_attention_mask: every token sees every tile, as in the reference
                    cross_mask = AttentionMask(seq, keys.shape[2], causal=False)
                collected.layer_input(hidden_states)
                hidden_states, weights = layer(hidden_states, keys, values, cross_mask, full_text_row_masked_out_mask,
                                               step.output_attentions)
            else:
                collected.layer_input(hidden_states)
                hidden_states, weights = layer(hidden_states, position_embeddings, mask, past_key_values,
                                               step.cache_position, step.output_attentions)
            collected.layer_weights(weights)
        return collected.output(self.norm(hidden_states))


class MllamaForCausalLM(MllamaPreTrainedModel, GenerationMixin):
    """The text model alone: never loads the vision tower (its weights are not even read)."""

    config_class = MllamaTextConfig
    base_model_prefix = "model"
    _load_key_renames = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                         ("vision_model.", None), ("multi_modal_projector.", None))

    def __init__(self, config: MllamaTextConfig):
        if isinstance(config, MllamaConfig):
            config = config.text_config
        super().__init__(config)
        self.vocab_size = config.vocab_size
        self.model = MllamaTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cross_attention_states=None,
                cross_attention_mask=None, full_text_row_masked_out_mask=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                cache_position=None, logits_to_keep: int | torch.Tensor = 0, **kwargs: Any):
        reject_unknown_kwargs(kwargs)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cross_attention_states=cross_attention_states, cross_attention_mask=cross_attention_mask,
            full_text_row_masked_out_mask=full_text_row_masked_out_mask, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, cache_position=cache_position, return_dict=True,
        )
        # The reference returns float32 logits for this class.
        return language_model_output(self, outputs, labels, logits_to_keep, return_dict, float_logits=True,
                                     ignore_labels_past_vocab=True, loss_kwargs=kwargs)


# ------------------------------------------------------------------------------------------------
# The whole model
# ------------------------------------------------------------------------------------------------


class MllamaModel(MllamaPreTrainedModel):
    _load_key_renames = (("language_model.model.", "language_model."), ("language_model.lm_head.", None))
    _save_key_renames = (("language_model.", "language_model.model."),)

    def __init__(self, config: MllamaConfig):
        super().__init__(config)
        self.hidden_size = config.text_config.hidden_size
        self.vision_model = MllamaVisionModel(config.vision_config)
        self.language_model = MllamaTextModel(config.text_config)
        self.multi_modal_projector = nn.Linear(config.vision_config.vision_output_dim, config.text_config.hidden_size, bias=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.embed_tokens = value

    def get_image_features(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> torch.Tensor:
        """Image features projected to the text width: (batch * images * tiles, patches + 1, hidden)."""
        vision = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask, return_dict=True).last_hidden_state
        return self.multi_modal_projector(vision).reshape(-1, vision.shape[-2], self.hidden_size)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        reject_unknown_kwargs(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and cross_attention_states is not None:
            raise ValueError("pass pixel_values or cross_attention_states, not both")
        if pixel_values is not None:
            if aspect_ratio_ids is None:
                raise ValueError("pixel_values were given without aspect_ratio_ids (the processor returns both)")
            cross_attention_states = self.get_image_features(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        past_key_values = as_cache(past_key_values)
        rows_seeing_images = None
        if cross_attention_mask is not None:
            tokens = input_ids if input_ids is not None else inputs_embeds
            cross_attention_mask, rows_seeing_images = prepare_cross_attention_mask(
                cross_attention_mask, self.vision_model.num_patches, self.dtype
            )
            # The mask covers the whole sequence so far (herd's generate) or only this call's tokens
            # (transformers' generate after prefill): keep the rows of this call's tokens.
            if cross_attention_mask.shape[2] != tokens.shape[1]:
                past_length = 0 if past_key_values is None else past_key_values.get_seq_length(
                    self.language_model._first_self_attention_layer)
                current = torch.arange(tokens.shape[1], device=tokens.device) + past_length
                cross_attention_mask = cross_attention_mask[:, :, current]
                rows_seeing_images = rows_seeing_images[:, :, current]
        outputs = self.language_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cross_attention_states=cross_attention_states, cross_attention_mask=cross_attention_mask,
            full_text_row_masked_out_mask=rows_seeing_images, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, cache_position=cache_position, return_dict=True,
        )
        return outputs if flag(return_dict, self.config.return_dict) else outputs.to_tuple()


class MllamaForConditionalGeneration(MllamaPreTrainedModel, GenerationMixin):
    # Published checkpoints keep the pre-5.0 layout; the module tree follows transformers 5.
    _load_key_renames = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                         ("vision_model.", "model.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector."))
    _save_key_renames = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                         ("model.vision_model.", "vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."))
    # Inputs generate() passes to the model besides the tokens.
    _generation_input_names = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask",
                               "cross_attention_states")

    def __init__(self, config: MllamaConfig):
        super().__init__(config)
        self.vocab_size = config.text_config.vocab_size
        self.model = MllamaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        cross_attention_states: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        reject_unknown_kwargs(kwargs)
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, aspect_ratio_mask=aspect_ratio_mask,
            aspect_ratio_ids=aspect_ratio_ids, attention_mask=attention_mask, cross_attention_mask=cross_attention_mask,
            cross_attention_states=cross_attention_states, position_ids=position_ids, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, cache_position=cache_position, return_dict=True,
        )
        return language_model_output(self, outputs, labels, logits_to_keep, return_dict, ignore_labels_past_vocab=True,
                                     loss_kwargs=kwargs)

    def prepare_inputs_for_generation(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                                      pixel_values=None, aspect_ratio_ids=None, aspect_ratio_mask=None,
                                      cross_attention_mask=None, past_key_values=None, use_cache=False,
                                      logits_to_keep=0, is_first_iteration=False, **kwargs: Any) -> dict[str, Any]:
        """GenerationMixin's, with use_cache, logits_to_keep and the image inputs always among the
        keys (as transformers): after the first iteration with a cache, pixel_values,
        aspect_ratio_ids and aspect_ratio_mask are None (the cache holds the image's keys/values)."""
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, use_cache=use_cache, inputs_embeds=inputs_embeds,
            position_ids=position_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask,
            cross_attention_mask=cross_attention_mask, logits_to_keep=logits_to_keep,
            is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and use_cache:
            inputs.update(pixel_values=None, aspect_ratio_ids=None, aspect_ratio_mask=None)
        return inputs

    def _inputs_for_step(self, extra: dict[str, Any], first_step: bool, total_length: int) -> dict[str, Any]:
        """The image is encoded once, at prefill; later steps reuse the cached cross keys/values.
        New tokens see the images the last prompt token saw (the mask's last row, repeated)."""
        step = {k: v for k, v in extra.items() if first_step or k == "cross_attention_mask"}
        mask = extra.get("cross_attention_mask")
        if mask is not None and mask.shape[1] < total_length:
            grow = mask[:, -1:].expand(-1, total_length - mask.shape[1], *mask.shape[2:])
            extra["cross_attention_mask"] = step["cross_attention_mask"] = torch.cat([mask, grow], dim=1)
        return step


__all__ = [
    "MllamaPreTrainedModel",
    "MllamaVisionModel",
    "MllamaTextModel",
    "MllamaForCausalLM",
    "MllamaModel",
    "MllamaForConditionalGeneration",
]
