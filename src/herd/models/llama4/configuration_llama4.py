"""Llama 4 configs: the text model (mixture of experts, chunked attention, NoPE layers), the
vision encoder, and the composite Llama4Config that holds both."""

from __future__ import annotations

from typing import Any

from ...configuration import PretrainedConfig, check_attention_sizes, sub_config
from ...layers.rope import standardize_rope_parameters

LAYER_TYPES = ("chunked_attention", "full_attention")


class Llama4TextConfig(PretrainedConfig):
    model_type = "llama4_text"
    base_config_key = "text_config"

    def __init__(
        self,
        vocab_size: int = 202048,
        hidden_size: int = 5120,
        intermediate_size: int = 8192,
        intermediate_size_mlp: int = 16384,
        num_hidden_layers: int = 48,
        num_attention_heads: int = 40,
        num_key_value_heads: int | None = 8,
        head_dim: int | None = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096 * 32,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        attention_dropout: float = 0.0,
        num_experts_per_tok: int = 1,
        num_local_experts: int = 16,
        moe_layers: list[int] | None = None,
        interleave_moe_layer_step: int = 1,
        use_qk_norm: bool = True,
        output_router_logits: bool = False,
        router_aux_loss_coef: float = 0.001,
        router_jitter_noise: float = 0.0,
        rope_parameters: dict[str, Any] | None = None,
        no_rope_layers: list[int] | None = None,
        no_rope_layer_interval: int = 4,
        attention_chunk_size: int | None = 8192,
        layer_types: list[str] | None = None,
        attn_temperature_tuning: bool = True,
        floor_scale: int = 8192,
        attn_scale: float = 0.1,
        attention_bias: bool = False,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.intermediate_size_mlp = intermediate_size_mlp
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_dropout = attention_dropout
        self.num_experts_per_tok = num_experts_per_tok
        self.num_local_experts = num_local_experts
        self.interleave_moe_layer_step = interleave_moe_layer_step
        # Maverick interleaves dense and MoE layers; Scout is all MoE.
        self.moe_layers = (
            list(moe_layers)
            if moe_layers is not None
            else list(range(interleave_moe_layer_step - 1, num_hidden_layers, interleave_moe_layer_step))
        )
        self.use_qk_norm = use_qk_norm
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_jitter_noise = router_jitter_noise
        self.no_rope_layer_interval = no_rope_layer_interval
        # no_rope_layers[i] == 1 means layer i DOES use rope (the reference's naming); every
        # `no_rope_layer_interval`-th layer is a NoPE layer.
        self.no_rope_layers = (
            list(no_rope_layers)
            if no_rope_layers
            else [int((i + 1) % no_rope_layer_interval != 0) for i in range(num_hidden_layers)]
        )
        self.attention_chunk_size = attention_chunk_size
        self.layer_types = (
            list(layer_types)
            if layer_types is not None
            else ["chunked_attention" if uses_rope else "full_attention" for uses_rope in self.no_rope_layers]
        )
        self.attn_temperature_tuning = attn_temperature_tuning
        self.floor_scale = floor_scale
        self.attn_scale = attn_scale
        self.attention_bias = attention_bias
        self._check()
        self.rope_parameters = standardize_rope_parameters(
            rope_parameters,
            rope_theta=kwargs.pop("rope_theta", 500000.0),
            rope_scaling=kwargs.pop("rope_scaling", None),
            max_position_embeddings=max_position_embeddings,
            head_dim=self.head_dim,
        )
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _check(self) -> None:
        check_attention_sizes(self, ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp",
                                     "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                                     "num_local_experts", "num_experts_per_tok"))
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_local_experts ({self.num_local_experts})"
            )
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"moe_layers {bad} are outside the model's {self.num_hidden_layers} layers")
        if self.interleave_moe_layer_step < 1:
            raise ValueError(f"interleave_moe_layer_step must be >= 1, got {self.interleave_moe_layer_step}")
        if self.attention_chunk_size is not None and (not isinstance(self.attention_chunk_size, int) or self.attention_chunk_size < 1):
            raise ValueError(f"attention_chunk_size must be a positive integer (or None), got {self.attention_chunk_size!r}")
        if len(self.no_rope_layers) < self.num_hidden_layers:
            raise ValueError(f"no_rope_layers has {len(self.no_rope_layers)} entries for {self.num_hidden_layers} layers")
        if len(self.layer_types) != self.num_hidden_layers or any(t not in LAYER_TYPES for t in self.layer_types):
            raise ValueError(f"layer_types must list one of {LAYER_TYPES} per layer, got {self.layer_types}")
        if "chunked_attention" in self.layer_types and self.attention_chunk_size is None:
            raise ValueError("layer_types has chunked_attention layers but attention_chunk_size is None; set "
                             "attention_chunk_size (Llama 4 uses 8192) or make those layers full_attention in layer_types")



class Llama4VisionConfig(PretrainedConfig):
    model_type = "llama4_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 768,
        hidden_act: str = "gelu",
        num_hidden_layers: int = 34,
        num_attention_heads: int = 16,
        num_channels: int = 3,
        intermediate_size: int = 5632,
        vision_output_dim: int = 7680,
        image_size: int = 448,
        patch_size: int = 14,
        norm_eps: float = 1e-5,
        vision_feature_select_strategy: str = "default",
        initializer_range: float = 0.02,
        pixel_shuffle_ratio: float = 0.5,
        projector_input_dim: int = 4096,
        projector_output_dim: int = 4096,
        multi_modal_projector_bias: bool = False,
        projector_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        rope_parameters: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.hidden_size = hidden_size
        self.hidden_act = hidden_act
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.intermediate_size = intermediate_size
        self.vision_output_dim = vision_output_dim
        self.image_size = image_size
        self.patch_size = patch_size
        self.norm_eps = norm_eps
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.initializer_range = initializer_range
        self.pixel_shuffle_ratio = pixel_shuffle_ratio
        self.projector_input_dim = projector_input_dim
        self.projector_output_dim = projector_output_dim
        self.multi_modal_projector_bias = multi_modal_projector_bias
        self.projector_dropout = projector_dropout
        self.attention_dropout = attention_dropout
        self.rope_parameters = standardize_rope_parameters(
            rope_parameters,
            rope_theta=kwargs.pop("rope_theta", None),
            rope_scaling=kwargs.pop("rope_scaling", None),
            max_position_embeddings=(image_size // patch_size) ** 2,
        )
        super().__init__(**kwargs)


class Llama4Config(PretrainedConfig):
    model_type = "llama4"
    sub_configs = {"text_config": Llama4TextConfig, "vision_config": Llama4VisionConfig}

    def __init__(
        self,
        vision_config: dict[str, Any] | Llama4VisionConfig | None = None,
        text_config: dict[str, Any] | Llama4TextConfig | None = None,
        boi_token_index: int = 200080,
        eoi_token_index: int = 200081,
        image_token_index: int = 200092,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ):
        self.vision_config = sub_config(Llama4VisionConfig, vision_config)
        self.text_config = sub_config(Llama4TextConfig, text_config)
        self.boi_token_index = boi_token_index
        self.eoi_token_index = eoi_token_index
        self.image_token_index = image_token_index
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # The reference's alternative names for the special image tokens.
    image_token_id = property(lambda self: self.image_token_index)
    boi_token_id = property(lambda self: self.boi_token_index)
    eoi_token_id = property(lambda self: self.eoi_token_index)

