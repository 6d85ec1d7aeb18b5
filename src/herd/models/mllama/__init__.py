from .configuration_mllama import MllamaConfig, MllamaTextConfig, MllamaVisionConfig
from .image_processing_mllama import MllamaImageProcessor, MllamaImageProcessorPil
from .modeling_mllama import (
    MllamaForCausalLM,
    MllamaForConditionalGeneration,
    MllamaModel,
    MllamaPreTrainedModel,
    MllamaTextModel,
    MllamaVisionModel,
)
from .processing_mllama import MllamaProcessor
