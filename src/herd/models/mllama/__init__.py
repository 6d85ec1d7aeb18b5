from .configuration_mllama import MllamaConfig, MllamaTextConfig, MllamaVisionConfig
from .modeling_mllama import (
    MllamaForCausalLM,
    MllamaForConditionalGeneration,
    MllamaModel,
    MllamaPreTrainedModel,
    MllamaTextModel,
    MllamaVisionModel,
)
