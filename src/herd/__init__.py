"""herd: the Llama family in plain PyTorch, with the transformers API.

The public names are spelled as transformers spells them, so code written for transformers
runs with only the import changed.
"""

__version__ = "0.1.0"

from .auto import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoProcessor,
)
from .cache import Cache, DynamicCache, StaticCache
from .configuration import PretrainedConfig, PreTrainedConfig
from . import generation
from .generation import *  # noqa: F403 - its __all__: the generation API, as transformers exports it
from .loading import CheckpointError, UnsafeCheckpointError
from .modeling_utils import PreTrainedModel
from .models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    LlamaPreTrainedModel,
)
from .models.llama4 import (
    Llama4Config,
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4ImageProcessor,
    Llama4ImageProcessorFast,
    Llama4PreTrainedModel,
    Llama4Processor,
    Llama4TextConfig,
    Llama4TextModel,
    Llama4VisionConfig,
    Llama4VisionModel,
)
from .image_utils import BatchFeature
from .models.mllama import (
    MllamaConfig,
    MllamaForCausalLM,
    MllamaForConditionalGeneration,
    MllamaImageProcessor,
    MllamaImageProcessorPil,
    MllamaModel,
    MllamaPreTrainedModel,
    MllamaProcessor,
    MllamaTextConfig,
    MllamaTextModel,
    MllamaVisionConfig,
    MllamaVisionModel,
)
from .pipelines import ImageTextToTextPipeline, TextGenerationPipeline, pipeline
from .quantization import CompressedTensorsConfig, FbgemmFp8Config, TorchAoConfig
from .seeding import set_seed
from .tokenization import AutoTokenizer, BatchEncoding, LlamaTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast

__all__ = [
    "CompressedTensorsConfig", "FbgemmFp8Config", "TorchAoConfig",
    "AutoConfig",
    "AutoImageProcessor",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoModelForQuestionAnswering",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoProcessor",
    "AutoTokenizer",
    "BatchEncoding",
    "BatchFeature",
    "Cache",
    "CheckpointError",
    "DynamicCache",
    "set_seed",
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
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaForQuestionAnswering",
    "LlamaForSequenceClassification",
    "LlamaForTokenClassification",
    "LlamaModel",
    "LlamaPreTrainedModel",
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "MllamaConfig",
    "MllamaForCausalLM",
    "MllamaForConditionalGeneration",
    "MllamaImageProcessor",
    "MllamaImageProcessorPil",
    "MllamaModel",
    "MllamaPreTrainedModel",
    "MllamaProcessor",
    "MllamaTextConfig",
    "MllamaTextModel",
    "MllamaVisionConfig",
    "MllamaVisionModel",
    "PreTrainedConfig",
    "PreTrainedModel",
    "PreTrainedTokenizerFast",
    "PretrainedConfig",
    "StaticCache",
    "ImageTextToTextPipeline",
    "TextGenerationPipeline",
    "UnsafeCheckpointError",
    "pipeline",

    *generation.__all__,]
