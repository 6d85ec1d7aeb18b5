"""Generation: configuration, logits processors, stopping, streamers and the decoding loop."""

from .configuration import GenerationConfig
from .streamers import BaseStreamer, TextIteratorStreamer, TextStreamer
from .utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput, GenerationMixin

__all__ = [
    "BaseStreamer",
    "GenerateBeamDecoderOnlyOutput",
    "GenerateDecoderOnlyOutput",
    "GenerationConfig",
    "GenerationMixin",
    "TextIteratorStreamer",
    "TextStreamer",
]
