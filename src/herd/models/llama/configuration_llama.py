"""LlamaConfig: Llama 1, 2, 3, 3.1, 3.2 and 3.3 text models."""

from __future__ import annotations

from typing import Any

from ...configuration import PretrainedConfig, check_attention_sizes
from ...layers.rope import standardize_rope_parameters


class LlamaConfig(PretrainedConfig):
    model_type = "llama"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        pretraining_tp: int | None = 1,
        tie_word_embeddings: bool = False,
        rope_parameters: dict[str, Any] | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        head_dim: int | None = None,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.pretraining_tp = pretraining_tp
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self._check_sizes()
        # Legacy keys (`rope_theta`, `rope_scaling`) and the transformers 5 `rope_parameters`
        # end up in one complete dict.
        self.rope_parameters = standardize_rope_parameters(
            rope_parameters,
            rope_theta=kwargs.pop("rope_theta", None),
            rope_scaling=kwargs.pop("rope_scaling", None),
            max_position_embeddings=max_position_embeddings,
            original_max_position_embeddings=kwargs.get("original_max_position_embeddings"),
            head_dim=self.head_dim,
        )
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _check_sizes(self) -> None:
        check_attention_sizes(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"))

    @property
    def rope_theta(self) -> float:
        return self.rope_parameters["rope_theta"]

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        # `config.rope_theta = ...` and from_pretrained(..., rope_theta=...), as Llama 2 era code writes them
        self.rope_parameters = {**self.rope_parameters, "rope_theta": value}

    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        """The legacy spelling: None for plain rope, else the scaling dict."""
        return None if self.rope_parameters["rope_type"] == "default" else dict(self.rope_parameters)

    @rope_scaling.setter
    def rope_scaling(self, value: dict[str, Any] | None) -> None:
        # `config.rope_scaling = {"type": "dynamic", "factor": 2.0}` and the same as a from_pretrained
        # argument (how Llama 2 contexts were extended): the rope of a config.json with that
        # rope_scaling and this config's rope_theta.
        self.rope_parameters = standardize_rope_parameters(
            None,
            rope_theta=self.rope_theta,
            rope_scaling=value,
            max_position_embeddings=self.max_position_embeddings,
            original_max_position_embeddings=getattr(self, "original_max_position_embeddings", None),
            head_dim=self.head_dim,
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # Written in both spellings so that transformers 4.x (rope_theta/rope_scaling) and 5.x
        # (rope_parameters) read the same rope back.
        out["rope_theta"] = self.rope_theta
        if self.rope_scaling is not None:
            out["rope_scaling"] = self.rope_scaling
        return dict(sorted(out.items()))
