"""Tokenizers with the transformers API, built on the Hugging Face `tokenizers` library.

- `files`: reading a tokenizer folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json).
- `chat_templates`: the one chat-template folder reader (for tokenizers and processors), the jinja2
  sandbox, conversation checks, tool schemas and rendering.
- `encodings`: `BatchEncoding`, and the `BatchDict` base it shares with processors' `BatchFeature`.
- `tokenizer`: `PreTrainedTokenizerFast` (alias `LlamaTokenizer`, `LlamaTokenizerFast`) and `AutoTokenizer`.
"""

# The names below stay importable from herd.tokenization as they were before it became a package.
from tokenizers import AddedToken

from .encodings import BatchEncoding, as_numpy_array, tensor_type_name
from .files import (
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    CHAT_TEMPLATE_JSON_FILE,
    SENTENCEPIECE_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
)
from .tokenizer import (
    LARGE_INTEGER,
    PADDING_STRATEGIES,
    SPECIAL_TOKEN_NAMES,
    TRUNCATION_STRATEGIES,
    VERY_LARGE_INTEGER,
    AutoTokenizer,
    LlamaTokenizer,
    LlamaTokenizerFast,
    PreTrainedTokenizerFast,
)

__all__ = [
    "AddedToken",
    "AutoTokenizer",
    "BatchEncoding",
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "PreTrainedTokenizerFast",
]
