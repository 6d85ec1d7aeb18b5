"""Llama 3.2 Vision (Mllama) configs: the tiled vision encoder, the text model with
cross-attention layers, and the composite MllamaConfig."""

from __future__ import annotations

from typing import Any

from ...configuration import PretrainedConfig, sub_config
from ...layers.rope import standardize_rope_parameters

DEFAULT_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]


class MllamaVisionConfig(PretrainedConfig):
    model_type = "mllama_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 1280,
        hidden_act: str = "gelu",
        num_hidden_layers: int = 32,
        num_global_layers: int = 8,
        attention_heads: int = 16,
        num_channels: int = 3,
        intermediate_size: int = 5120,
        vision_output_dim: int = 7680,
        image_size: int = 448,
        patch_size: int = 14,
        norm_eps: float = 1e-5,
        max_num_tiles: int = 4,
        intermediate_layers_indices: list[int] | None = None,
        supported_aspect_ratios: list[list[int]] | None = None,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ):
        # The reference also accepts num_attention_heads for attention_heads.
        attention_heads = kwargs.pop("num_attention_heads", attention_heads)
        self.hidden_size = hidden_size
        self.hidden_act = hidden_act
        self.num_hidden_layers = num_hidden_layers
        self.num_global_layers = num_global_layers
        self.attention_heads = attention_heads
        self.num_channels = num_channels
        self.intermediate_size = intermediate_size
        self.vision_output_dim = vision_output_dim
        self.image_size = image_size
        self.patch_size = patch_size
        self.norm_eps = norm_eps
        self.max_num_tiles = max_num_tiles
        self.intermediate_layers_indices = list(intermediate_layers_indices or [3, 7, 15, 23, 30])
        self.supported_aspect_ratios = [list(r) for r in (supported_aspect_ratios or DEFAULT_ASPECT_RATIOS)]
        self.initializer_range = initializer_range
        if self.supported_aspect_ratios == DEFAULT_ASPECT_RATIOS and max_num_tiles != 4:
            raise ValueError("max_num_tiles must be 4 for the default supported_aspect_ratios")
        # Python indices into the per-layer outputs: negative ones count from the last layer, as in transformers.
        bad = [i for i in self.intermediate_layers_indices if not -num_hidden_layers <= i < num_hidden_layers]
        if bad:
            raise ValueError(f"intermediate_layers_indices {bad} are outside the {num_hidden_layers} vision layers; "
                             f"use indices in [-{num_hidden_layers}, {num_hidden_layers - 1}]")
        if hidden_size % attention_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of attention_heads ({attention_heads})")
        super().__init__(**kwargs)

    @property
    def num_attention_heads(self) -> int:
        return self.attention_heads

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)


class MllamaTextConfig(PretrainedConfig):
    model_type = "mllama_text_model"
    base_config_key = "text_config"

    def __init__(
        self,
        vocab_size: int = 128256,
        hidden_size: int = 4096,
        hidden_act: str = "silu",
        num_hidden_layers: int = 40,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        intermediate_size: int = 14336,
        rope_parameters: dict[str, Any] | None = None,
        rms_norm_eps: float = 1e-5,
        max_position_embeddings: int = 131072,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        cross_attention_layers: list[int] | None = None,
        dropout: float = 0.0,
        bos_token_id: int = 128000,
        eos_token_id: int | list[int] | None = 128001,
        pad_token_id: int | None = 128004,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.hidden_act = hidden_act
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.cross_attention_layers = list(
            cross_attention_layers if cross_attention_layers is not None else [3, 8, 13, 18, 23, 28, 33, 38]
        )
        self.dropout = dropout
        self.head_dim = hidden_size // num_attention_heads
        if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}), num_attention_heads ({num_attention_heads}) and num_key_value_heads "
                f"({num_key_value_heads}) must divide evenly"
            )
        bad = [i for i in self.cross_attention_layers if not 0 <= i < num_hidden_layers]
        if bad:
            raise ValueError(f"cross_attention_layers {bad} are outside the {num_hidden_layers} text layers")
        kwargs.pop("head_dim", None)  # derived, as in the reference
        self.rope_parameters = standardize_rope_parameters(
            rope_parameters,
            rope_theta=kwargs.pop("rope_theta", 500000.0),
            rope_scaling=kwargs.pop("rope_scaling", None),
            max_position_embeddings=max_position_embeddings,
            head_dim=self.head_dim,
        )
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # The self-attention layers are Llama layers; these are the Llama fields Mllama fixes.
    attention_bias = property(lambda self: False)
    mlp_bias = property(lambda self: False)
    attention_dropout = property(lambda self: self.dropout)



class MllamaConfig(PretrainedConfig):
    model_type = "mllama"
    sub_configs = {"text_config": MllamaTextConfig, "vision_config": MllamaVisionConfig}

    def __init__(
        self,
        vision_config: dict[str, Any] | MllamaVisionConfig | None = None,
        text_config: dict[str, Any] | MllamaTextConfig | None = None,
        image_token_index: int = 128256,
        **kwargs: Any,
    ):
        self.vision_config = sub_config(MllamaVisionConfig, vision_config)
        self.text_config = sub_config(MllamaTextConfig, text_config)
        self.image_token_index = image_token_index
        super().__init__(**kwargs)

    @property
    def image_token_id(self) -> int:
        return self.image_token_index

