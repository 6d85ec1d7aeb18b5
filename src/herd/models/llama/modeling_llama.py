"""Llama 1/2/3.x: a pre-norm decoder of rotary self-attention and SwiGLU blocks.

What is notable here:
- Grouped-query attention: `num_key_value_heads` may be smaller than `num_attention_heads`
  (MQA when it is 1); keys/values are stored and read un-repeated.
- `head_dim` may differ from hidden_size / num_attention_heads (explicit in config.json).
- Rotary embeddings of every rope type (layers/rope.py), computed once per forward.
- Four heads on one backbone: causal LM (optionally tied to the input embeddings), sequence
  classification (pools the last non-pad token), extractive QA and token classification.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...cache import Cache
from ...generation import GenerationMixin
from ...layers.attention import AttentionMask, attention
from ...layers.mlp import GatedMLP
from ...layers.norm import RMSNorm
from ...layers.rope import RotaryEmbedding, apply_rotary
from ...losses import question_answering_loss, sequence_classification_loss, token_classification_loss
from ...modeling_outputs import (
    BaseModelOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from ...modeling_utils import (
    GradientCheckpointingLayer,
    CausalLMForward,
    DecoderStep,
    TextDecoderForward,
    PreTrainedModel,
    backbone_call,
    flag,
    reject_unknown_kwargs,
)
from .configuration_llama import LlamaConfig


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        past_key_values: Cache | None = None,
        cache_position: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq, _ = hidden_states.shape
        # (batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)
        query = self.q_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, key, cos, sin)
        if past_key_values is not None:
            # key/value grow to (batch, kv_heads, kv_length, head_dim)
            key, value = past_key_values.update(key, value, self.layer_idx, {"cache_position": cache_position})
        output, weights = attention(
            self.config._attn_implementation,
            query,
            key,
            value,
            mask,
            self.scaling,
            dropout=self.attention_dropout,
            training=self.training,
            output_attentions=output_attentions,
        )
        output = self.o_proj(output.reshape(batch, seq, -1))  # (batch, seq, hidden)
        return output, weights


class LlamaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, mask, past_key_values=None, cache_position=None, output_attentions=False):
        attended, weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, mask, past_key_values, cache_position, output_attentions
        )
        hidden_states = hidden_states + attended
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights


class LlamaPreTrainedModel(PreTrainedModel):
    config_class = LlamaConfig
    base_model_prefix = "model"


class LlamaModel(TextDecoderForward, LlamaPreTrainedModel):
    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope_parameters, config.head_dim, config.max_position_embeddings)
        self.post_init()

    def forward_layers(self, step: DecoderStep, attention_mask: torch.Tensor | None) -> BaseModelOutputWithPast | tuple:
        """forward() once its arguments are resolved (modeling_utils.TextDecoderForward)."""
        mask = step.self_attention_mask(attention_mask)
        position_embeddings = self.rotary_emb(step.position_ids, step.inputs_embeds.dtype)  # cos, sin: (batch, seq, head_dim)

        hidden_states, collected = step.inputs_embeds, step.collector()
        for layer in self.layers:
            collected.layer_input(hidden_states)
            hidden_states, weights = layer(hidden_states, position_embeddings, mask, step.past_key_values,
                                           step.cache_position, step.output_attentions)
            collected.layer_weights(weights)
        return collected.output(self.norm(hidden_states))


class LlamaForCausalLM(CausalLMForward, LlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class LlamaForSequenceClassification(LlamaPreTrainedModel):
    _head_weights = ("score",)

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast | tuple:
        reject_unknown_kwargs(kwargs)
        outputs = backbone_call(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.score(outputs.last_hidden_state)  # (batch, seq, num_labels)
        batch = logits.shape[0]
        pad_token_id = self.config.pad_token_id
        if pad_token_id is None:
            if batch != 1:
                raise ValueError("sequence classification of a batch needs config.pad_token_id to find each row's last token")
            last_token = torch.full((batch,), -1, device=logits.device)
        elif input_ids is not None:
            # The rightmost non-pad token, so left and right padding both work.
            is_real = (input_ids != pad_token_id).to(logits.device, torch.int32)
            last_token = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * is_real).argmax(-1)
        else:
            last_token = torch.full((batch,), -1, device=logits.device)  # inputs_embeds carry no pad ids
        pooled_logits = logits[torch.arange(batch, device=logits.device), last_token]  # (batch, num_labels)
        loss = sequence_classification_loss(pooled_logits, labels, self.config) if labels is not None else None
        output = SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if flag(return_dict, self.config.return_dict) else output.to_tuple()


class LlamaForQuestionAnswering(LlamaPreTrainedModel):
    # The reference keeps the pre-5.0 name of the backbone attribute for this head.
    base_model_prefix = "transformer"
    _head_weights = ("qa_outputs",)

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.transformer = LlamaModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> QuestionAnsweringModelOutput | tuple:
        reject_unknown_kwargs(kwargs)
        outputs = backbone_call(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.qa_outputs(outputs.last_hidden_state)  # (batch, seq, 2)
        start_logits, end_logits = (part.squeeze(-1).contiguous() for part in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions)
        output = QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if flag(return_dict, self.config.return_dict) else output.to_tuple()


class LlamaForTokenClassification(LlamaPreTrainedModel):
    _head_weights = ("score",)

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LlamaModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(config, "hidden_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=getattr(config, "token_classification_bias", True))
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> TokenClassifierOutput | tuple:
        reject_unknown_kwargs(kwargs)
        outputs = backbone_call(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.score(self.dropout(outputs.last_hidden_state))  # (batch, seq, num_labels)
        loss = token_classification_loss(logits, labels) if labels is not None else None
        output = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if flag(return_dict, self.config.return_dict) else output.to_tuple()


__all__ = [
    "LlamaPreTrainedModel",
    "LlamaModel",
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "LlamaForQuestionAnswering",
    "LlamaForTokenClassification",
]
