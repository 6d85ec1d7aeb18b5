"""Generation: configuration, logits processors, stopping, streamers and the decoding loop."""

from .configuration import GenerationConfig
from .streamers import BaseStreamer, TextIteratorStreamer, TextStreamer
from .utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput, GenerationMixin
from .watermarking import (
    BaseWatermarkingConfig,
    SynthIDTextWatermarkDetector,
    SynthIDTextWatermarkingConfig,
    SynthIDTextWatermarkLogitsProcessor,
    WatermarkDetector,
    WatermarkDetectorOutput,
    WatermarkingConfig,
    WatermarkLogitsProcessor,
)

__all__ = [
    "BaseStreamer",
    "BaseWatermarkingConfig",
    "GenerateBeamDecoderOnlyOutput",
    "GenerateDecoderOnlyOutput",
    "GenerationConfig",
    "GenerationMixin",
    "SynthIDTextWatermarkDetector",
    "SynthIDTextWatermarkLogitsProcessor",
    "SynthIDTextWatermarkingConfig",
    "TextIteratorStreamer",
    "TextStreamer",
    "WatermarkDetector",
    "WatermarkDetectorOutput",
    "WatermarkLogitsProcessor",
    "WatermarkingConfig",
]
