from .configuration_llama4 import Llama4Config, Llama4TextConfig, Llama4VisionConfig
from .modeling_llama4 import Llama4ForCausalLM, Llama4PreTrainedModel, Llama4TextModel

__all__ = [
    "Llama4Config",
    "Llama4ForCausalLM",
    "Llama4PreTrainedModel",
    "Llama4TextConfig",
    "Llama4TextModel",
    "Llama4VisionConfig",
]
