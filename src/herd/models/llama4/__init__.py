from .image_processing_llama4 import Llama4ImageProcessor, Llama4ImageProcessorFast
from .processing_llama4 import Llama4Processor
from .configuration_llama4 import Llama4Config, Llama4TextConfig, Llama4VisionConfig
from .modeling_llama4 import (
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4PreTrainedModel,
    Llama4TextModel,
    Llama4VisionModel,
)

__all__ = [
    "Llama4Config",
    "Llama4ForCausalLM",
    "Llama4ForConditionalGeneration",
    "Llama4ImageProcessor",
    "Llama4ImageProcessorFast",
    "Llama4PreTrainedModel",
    "Llama4Processor",
    "Llama4TextConfig",
    "Llama4TextModel",
    "Llama4VisionConfig",
    "Llama4VisionModel",
]
