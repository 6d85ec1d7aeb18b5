"""Llama-architecture GGUF files (llama.cpp's format), read with the `gguf` package.

A GGUF file holds a model's config, its tokenizer and its (often quantized) weights in one file.
herd reads all three into a LlamaForCausalLM.

Which weights stay quantized (the rule from_pretrained applies):
- In a 16-bit model (`dtype=torch.bfloat16` or `torch.float16`), each decoder linear stored as
  Q4_0 or Q4_1 (q/k/v/o/gate/up/down_proj) is kept 4-bit: it loads as herd's int4 format with
  group 32 (formats.py), block for block, with no second rounding. A Q4_1 block (fp16 d, fp16 m,
  16 bytes of nibbles, value = q * d + m) is scale d, offset m; a Q4_0 block (fp16 d, value =
  (q - 8) * d) is scale d, offset -8d. ggml puts values 0..15 of a block in the low nibbles of its
  16 bytes and values 16..31 in the high ones; herd packs columns 2j, 2j + 1 into byte j, so the
  nibbles are re-packed. The scales and offsets stay float16 (the scheme's scale_dtype), also in a
  bf16 model, whose 8-bit mantissa would round them: `dequantize()` then equals gguf's own
  dequantization bit for bit (for Q4_0, value for value: its zeros are +0 where gguf's
  (q - 8) * d can give -0). The weights are exact; torch's int4 CPU kernel still multiplies with
  bf16 activations, scales and zero points, as formats.py says. The model's config gets a HerdQuantConfig quantization_config
  (int4, group 32) whose modules_to_not_convert lists the linears stored otherwise.
- With float32 (the default for GGUF files, as in transformers) every weight is dequantized, so
  the model is a plain float one.
- Everything else is dequantized to the model's dtype: F16/BF16, K-quants, Q5_*, and Q8_0, which
  has one scale per 32 values where herd's int8 has one per row (re-quantizing it would round a
  second time); and always the embeddings (`token_embd`) and the output head (`output.weight`),
  which herd never quantizes (config.ALWAYS_KEPT).

What is notable:
- Names: llama.cpp's tensor names (`blk.N.attn_q.weight`, `token_embd.weight`, ...) are renamed
  to the Hugging Face layout; the weights then go through herd's one loading path
  (`loading.load_checkpoint`: shape check, dtype, device, one report of what does not fit).
- Rotary layout: llama.cpp's converter reorders the rows of q_proj and k_proj within each head,
  from the Hugging Face "rotate half" layout (first half, second half) to interleaved pairs
  (x0, x_{d/2}, x1, ...). Reading undoes it: per head, rows (2, d/2) -> (d/2, 2) back (for a
  kept Q4 weight, on the rows of its data, scales and offsets alike).
- Shapes: GGUF lists dimensions fastest-first (ggml's `ne`), the reverse of torch's order.
- Tied embeddings: a file without `output.weight` ties the lm_head to `token_embd.weight`.
- Rope scaling: `llama.rope.scaling.*` is read (transformers' GGUF reader drops it). Llama 3.1's
  scaling is stored only as per-frequency divisors (the `rope_freqs.weight` tensor that llama.cpp
  applies); herd turns them back into rope_type "llama3" parameters that give the same divisors.
- Tensor types: whatever the `gguf` package dequantizes, plus F64; any other type is refused by name.
- Tokenizer: `tokenizer.ggml.model == "gpt2"` (SmolLM2, Llama 3) is byte-level BPE, rebuilt with
  the `tokenizers` library from the vocabulary and merges; control tokens (token type 3) become
  special added tokens. The pre-tokenizer follows `tokenizer.ggml.pre` as llama.cpp does (SmolLM's
  single digits, Llama 3's split pattern, where a piece that is itself a token stays whole:
  ignore_merges); other pre-tokenizers are refused by name. SentencePiece vocabularies ("llama",
  Llama 2) become BPE with byte fallback, their merges derived from the pieces' scores (GGUF stores
  no merges). Without `tokenizer.ggml.add_bos_token`, BOS is added where llama.cpp adds it by default
  (SentencePiece and the Llama 3 family); transformers' GGUF tokenizer never adds it.
- Only `general.architecture == "llama"` is read; other architectures are refused by name.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

GGUF_SUFFIX = ".gguf"

# llama.cpp tensor name (layer part as N) -> Hugging Face name.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# The decoder's linear layers: the ones whose Q4_0/Q4_1 weights a 16-bit model keeps quantized.
_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_Q4_GROUP = 32  # values per Q4_0/Q4_1 block: herd's int4 group size for them
# Tensors derived from the config (llama.cpp stores Llama 3.1's rope frequencies): never loaded.
_SKIPPED = {"rope_freqs.weight"}

# token types of tokenizer.ggml.token_type (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

# How Llama 3 (tokenizer.ggml.pre "llama-bpe") splits text before byte-level BPE, as its tokenizer.json.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    """How llama.cpp (llama-vocab.cpp) treats a byte-level BPE vocabulary of one tokenizer.ggml.pre."""

    split: str  # "gpt2": GPT-2's pattern; "digits": each digit alone, then GPT-2's; "llama3": _LLAMA3_PATTERN
    whole_words: bool = False  # a split piece that is itself a token is kept whole (ignore_merges)
    adds_bos: bool = False  # BOS added when the file has no tokenizer.ggml.add_bos_token


_LLAMA3_FAMILY = _PreTokenizer("llama3", whole_words=True, adds_bos=True)
# tokenizer.ggml.pre -> its treatment; None (no key) and "default" read as GPT-2's pattern.
_PRE_TOKENIZERS = {
    **dict.fromkeys((None, "default", "gpt-2", "phi-2", "mpt", "olmo"), _PreTokenizer("gpt2")),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "minerva-7b"), _PreTokenizer("digits")),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "midm-2.0"), _LLAMA3_FAMILY),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizer("llama3")),
}


class GGUFError(ValueError):
    """A GGUF file herd cannot read (another architecture, an unsupported tokenizer, a broken file)."""


def gguf_path(name_or_path: str | os.PathLike, gguf_file: str | os.PathLike | None = None) -> Path | None:
    """The GGUF file meant by from_pretrained(name_or_path, gguf_file=...), or None for a plain folder."""
    path = Path(name_or_path).expanduser()
    if gguf_file is not None:
        if not path.is_dir():
            raise FileNotFoundError(f"gguf_file={str(gguf_file)!r} needs a local folder, but {path} is not one")
        file = path / gguf_file
        if not file.is_file():
            present = sorted(p.name for p in path.glob(f"*{GGUF_SUFFIX}"))
            raise FileNotFoundError(
                f"{gguf_file} is not in {path} (GGUF files there: {', '.join(present) or 'none'})"
            )
        return file
    if path.suffix.lower() == GGUF_SUFFIX:
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return path
    return None


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The GGUFFile of `path`, parsed once: config, tokenizer and weights loads of one file share it
    (parsing the metadata of a 50k-token vocabulary takes seconds)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _open_cached(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open_cached(path: Path, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)


def _reverse_rotary_permutation(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. Per head, llama.cpp's rows are (half, 2): pairs interleaved;
    the Hugging Face rotate-half layout is (2, half): first halves, then second halves."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama3_factors(theta: float, head_dim: int, parameters: dict[str, Any]) -> np.ndarray:
    """The divisor of each rotary frequency under Llama 3.1's rope scaling with these parameters (what
    llama.cpp's converter writes into rope_freqs.weight): herd's own llama3 frequencies against the
    plain ones."""
    from ..layers.rope import compute_inv_freq

    original = parameters["original_max_position_embeddings"]
    plain, _ = compute_inv_freq({"rope_type": "default", "rope_theta": theta}, head_dim, original)
    scaled, _ = compute_inv_freq({**parameters, "rope_theta": theta}, head_dim, original)
    return (plain.double() / scaled.double()).numpy()


def _llama3_rope_from_factors(factors: np.ndarray, theta: float, head_dim: int, path: Path) -> dict[str, Any]:
    """rope_parameters of rope_type "llama3" that give the divisors `factors` (rope_freqs.weight).

    GGUF keeps Llama 3.1's rope scaling only as these divisors, not as its parameters. Llama 3.1,
    3.2 and 3.3 use low_freq_factor 1, high_freq_factor 4 and 8192 original positions, the
    converter's defaults, tried first; other parameters are fitted to the ramp's divisors (only the
    two boundary wavelengths, original / high and original / low, matter, so 8192 original positions
    with the fitted factors give the same frequencies).
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv_freq.shape:
        raise GGUFError(f"{path}: rope_freqs.weight has {factors.size} values, not head_dim / 2 = {inv_freq.size}")
    factor = float(factors.max())
    original = 8192
    candidates = [(1.0, 4.0)]
    on_ramp = (factors > 1) & (factors < factor)
    if on_ramp.sum() >= 2 and factor > 1:
        # on the ramp, s = (1/divisor - 1/factor) / (1 - 1/factor) is linear in 1/wavelength:
        # s = original / (high - low) * (1/wavelength) - low / (high - low)
        share = (1 / factors[on_ramp] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv_freq[on_ramp] / (2 * math.pi), share, 1)
        width = original / slope  # high - low
        low = -intercept * width
        candidates += [(float(f"{low:.6g}"), float(f"{low + width:.6g}")), (low, low + width)]
    for low, high in candidates:
        parameters = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                      "original_max_position_embeddings": original}
        if 0 < low <= high and np.allclose(_llama3_factors(theta, head_dim, parameters), factors, rtol=1e-5, atol=0):
            return parameters
    raise GGUFError(f"{path}: rope_freqs.weight does not follow Llama 3.1's rope scaling, the only per-frequency "
                    "scaling herd reads; load the original checkpoint instead")


_LINEAR_MODULES = frozenset(_LAYER_NAMES[part] for part in _LINEARS)  # "self_attn.q_proj", ...


def _is_linear_weight(key: str) -> bool:
    """A decoder linear's weight, by its Hugging Face name (model.layers.N.self_attn.q_proj.weight)."""
    parts = key.split(".")
    return (len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[5] == "weight"
            and f"{parts[3]}.{parts[4]}" in _LINEAR_MODULES)


class _Shape:
    def __init__(self, shape: tuple[int, ...]):
        self._shape = shape

    def get_shape(self) -> list[int]:
        return list(self._shape)


class GGUFFile:
    """One GGUF file: its config, tokenizer and weights.

    It also reads like a safetensors file for `loading.load_checkpoint` (`keys`, `get_slice(key).
    get_shape()`, `get_tensor(key)`, a context manager), its keys already in the Hugging Face layout.
    """

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        try:
            # parsing the metadata (a whole vocabulary) takes seconds: say so on a terminal
            with tqdm(total=1, desc=f"Reading {self.path.name}", unit="file", leave=False,
                      disable=not sys.stderr.isatty()) as bar:
                self._reader = gguf.GGUFReader(str(self.path))
                bar.update(1)
        except (ValueError, OSError, IndexError, KeyError) as error:
            raise GGUFError(f"cannot read {self.path}: it is truncated or not a GGUF file ({error})") from None
        self.architecture = self._value("general.architecture")
        if self.architecture != "llama":
            raise GGUFError(
                f"{self.path} holds a {self.architecture!r} model; herd reads only Llama-architecture GGUF files"
            )
        self._tensors = {self._hf_name(tensor.name): tensor for tensor in self._reader.tensors}
        self._kept: frozenset[str] = frozenset()  # module paths read as packed int4 (see with_q4_kept)

    # -- metadata --

    def _value(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        if field is None or not field.data:
            return default
        value = field.contents()
        return value

    def _llama(self, key: str, default: Any = None) -> Any:
        return self._value(f"llama.{key}", default)

    def _llama_int(self, key: str, default: int | None = None) -> int:
        """An integer llama.* value; a per-layer list must hold one value (herd's Llama has no per-layer sizes)."""
        value = self._llama(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise GGUFError(f"{self.path}: llama.{key} differs between layers ({sorted(set(value))}); "
                                "herd's Llama has one value for all layers")
            value = value[0]
        if value is None:
            raise GGUFError(f"{self.path} has no llama.{key}, which a Llama model needs; the file is incomplete")
        return int(value)

    def config_dict(self) -> dict[str, Any]:
        """LlamaConfig arguments from the llama.* and tokenizer.ggml.* metadata."""
        hidden_size = self._llama_int("embedding_length")
        heads = self._llama_int("attention.head_count")
        head_dim = self._llama("attention.key_length") or self._llama("rope.dimension_count") or hidden_size // heads
        vocab_size = self._llama("vocab_size")
        if vocab_size is None:
            tokens = self._reader.fields.get("tokenizer.ggml.tokens")
            vocab_size = len(tokens.data) if tokens is not None else self._stored_shape("model.embed_tokens.weight")[0]
        config: dict[str, Any] = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": int(vocab_size),
            "hidden_size": hidden_size,
            "intermediate_size": self._llama_int("feed_forward_length"),
            "num_hidden_layers": self._llama_int("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._llama_int("attention.head_count_kv", heads),
            "head_dim": int(head_dim),
            "max_position_embeddings": int(self._llama("context_length", 2048)),
            # llama.cpp requires the key; without it, LlamaConfig's default (1e-6), as transformers reads it
            "rms_norm_eps": float(self._llama("attention.layer_norm_rms_epsilon", 1e-6)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
        }
        rope = {"rope_type": "default", "rope_theta": float(self._llama("rope.freq_base", 10000.0))}
        scaling = self._llama("rope.scaling.type")
        factors = self._rope_factors()
        if factors is not None and scaling not in (None, "none"):
            raise GGUFError(f"{self.path} has both rope_freqs.weight and llama.rope.scaling.type={scaling!r}; "
                            "herd reads one rope scaling; load the original checkpoint instead")
        if factors is not None:
            rope.update(_llama3_rope_from_factors(factors, rope["rope_theta"], int(head_dim), self.path))
        elif scaling not in (None, "none"):
            rope["rope_type"] = scaling
            rope["factor"] = float(self._llama("rope.scaling.factor", 1.0))
            original = self._llama("rope.scaling.original_context_length")
            if original is not None:
                rope["original_max_position_embeddings"] = int(original)
        config["rope_parameters"] = rope
        config.update(self.special_token_ids())
        return config

    def _rope_factors(self) -> np.ndarray | None:
        """llama.cpp's per-frequency rope divisors (rope_freqs.weight, Llama 3.1 and later), or None
        when the file has none or they are all 1."""
        tensor = self._tensors.get("rope_freqs.weight")
        if tensor is None:
            return None
        factors = np.asarray(self._dequantized(tensor), dtype=np.float64).reshape(-1)
        return None if np.all(factors == 1.0) else factors

    def special_token_ids(self) -> dict[str, int]:
        """bos/eos/pad/unk token ids, the generation config's as well as the tokenizer's."""
        ids = {}
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                          ("unk", "unknown_token_id")):
            value = self._value(f"tokenizer.ggml.{key}")
            if value is not None:
                ids[f"{name}_token_id"] = int(value)
        return ids

    # -- tokenizer --

    def tokenizer(self) -> tuple[Any, dict[str, Any]]:
        """(tokenizers.Tokenizer, settings for PreTrainedTokenizerFast) from tokenizer.ggml.*."""
        from tokenizers import AddedToken

        kind = self._value("tokenizer.ggml.model")
        tokens = self._value("tokenizer.ggml.tokens")
        if not tokens:
            raise GGUFError(f"{self.path} holds no tokenizer (no tokenizer.ggml.tokens)")
        types = self._value("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if kind == "gpt2":
            pre = self._pre_tokenizer()
            backend = self._byte_level_bpe(tokens, pre)
            adds_bos = pre.adds_bos
        elif kind == "llama":
            backend = self._sentencepiece_bpe(tokens, types)
            adds_bos = True  # llama.cpp's default for SentencePiece vocabularies
        else:
            raise GGUFError(
                f"{self.path} has a {kind!r} tokenizer; herd reads GGUF tokenizers of kind 'gpt2' (byte-level "
                "BPE) and 'llama' (SentencePiece BPE). Load the tokenizer from a folder with tokenizer.json instead."
            )
        special = (_CONTROL, _UNKNOWN) if kind == "llama" else (_CONTROL,)
        backend.add_tokens([
            AddedToken(token, special=token_type in special, normalized=False)
            for token, token_type in zip(tokens, types)
            if token_type in special or token_type == _USER_DEFINED
        ])

        settings: dict[str, Any] = {
            # without the key, llama.cpp's default for the vocabulary (Llama 3 and SentencePiece: BOS)
            "add_bos_token": bool(self._value("tokenizer.ggml.add_bos_token", adds_bos)),
            "add_eos_token": bool(self._value("tokenizer.ggml.add_eos_token", False)),
        }
        for name, token_id in self.special_token_ids().items():
            if 0 <= token_id < len(tokens):
                settings[name.removesuffix("_id")] = tokens[token_id]
        template = self._value("tokenizer.chat_template")
        if template is not None:
            settings["chat_template"] = template
        context = self._llama("context_length")
        if context is not None:
            settings["model_max_length"] = int(context)
        return backend, settings

    def _pre_tokenizer(self) -> _PreTokenizer:
        pre = self._value("tokenizer.ggml.pre")
        if pre not in _PRE_TOKENIZERS:
            known = ", ".join(sorted(name for name in _PRE_TOKENIZERS if name))
            raise GGUFError(
                f"{self.path} has a byte-level BPE tokenizer with pre-tokenizer {pre!r}, which herd does not "
                f"rebuild (it does {known}); load the tokenizer from the model's tokenizer.json instead"
            )
        return _PRE_TOKENIZERS[pre]

    def _byte_level_bpe(self, tokens: list[str], pre: _PreTokenizer) -> Any:
        """GPT-2-style BPE over bytes mapped to printable characters, split first as llama.cpp splits
        for the file's tokenizer.ggml.pre (SmolLM's single digits, Llama 3's pattern)."""
        from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE

        merges = [tuple(merge.split(" ", 1)) for merge in self._value("tokenizer.ggml.merges", [])]
        vocab = {token: i for i, token in enumerate(tokens)}
        backend = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=pre.whole_words))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
        if pre.split == "digits":
            backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre.split == "llama3":
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ])
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        return backend

    def _sentencepiece_bpe(self, tokens: list[str], types: list[int]) -> Any:
        """A SentencePiece BPE vocabulary (Llama 2): spaces as "▁", unknown bytes as <0xNN> tokens.

        GGUF keeps the pieces' scores but no merges: a piece made of two pieces is a merge, ranked by
        the merged piece's score (how tokenizers' SentencePiece extractor converts such models).
        """
        from tokenizers import Tokenizer, decoders, normalizers
        from tokenizers.models import BPE

        scores = self._value("tokenizer.ggml.scores") or [0.0] * len(tokens)
        ids = {token: i for i, token in enumerate(tokens)}
        merges = []
        for token, token_type, score in zip(tokens, types, scores):
            if token_type != _NORMAL:
                continue
            for cut in range(1, len(token)):
                left, right = token[:cut], token[cut:]
                if left in ids and right in ids:
                    merges.append((-score, ids[left], ids[right], left, right))
        merges.sort()
        unk_id = self._value("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None else None
        backend = Tokenizer(BPE(ids, [(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=True))
        prefix = bool(self._value("tokenizer.ggml.add_space_prefix", True))
        replace = normalizers.Replace(" ", "\u2581")
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix else replace
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        return backend

    # -- which weights stay quantized --

    def q4_linears(self) -> list[str]:
        """Module paths of the decoder linears stored as Q4_0 or Q4_1 (the ones a 16-bit model keeps)."""
        import gguf

        q4 = (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1)
        return [key.removesuffix(".weight") for key, tensor in self._tensors.items()
                if _is_linear_weight(key) and tensor.tensor_type in q4]

    def quantization_config(self) -> dict[str, Any] | None:
        """The quantization_config (herd's int4, group 32, float16 scales) of a 16-bit model of this
        file, the other linears listed in modules_to_not_convert; None when no linear is Q4_0/Q4_1."""
        kept = set(self.q4_linears())
        if not kept:
            return None
        others = [key.removesuffix(".weight") for key in self._tensors if _is_linear_weight(key)]
        from .config import HerdQuantConfig

        return HerdQuantConfig("int4", _Q4_GROUP, modules_to_not_convert=[p for p in others if p not in kept],
                               scale_dtype="float16").to_dict()

    def with_q4_kept(self) -> GGUFFile:
        """This file read with its Q4_0/Q4_1 linears packed rather than dequantized: each one's
        `weight` is replaced by the tensors of herd's int4 format, `weight` (uint8, out x in/2),
        `weight_scale` and `weight_offset` (float16, out x in/32). A view: the file is parsed once."""
        view = copy.copy(self)
        view._kept = frozenset(self.q4_linears())
        return view

    def __str__(self) -> str:
        return str(self.path)

    # -- weights, read like a safetensors file --

    def _hf_name(self, name: str) -> str:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        match = _LAYER_PATTERN.fullmatch(name)
        if match and match.group(2) in _LAYER_NAMES:
            layer, part, leaf = match.groups()
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{leaf}"
        return name  # unknown: reported as unexpected by the loader (or skipped, see _SKIPPED)

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def keys(self) -> list[str]:
        names = []
        for name in self._tensors:
            if name in _SKIPPED:
                continue
            names.append(name)
            if name.removesuffix(".weight") in self._kept and name.endswith(".weight"):
                names += [f"{name}_scale", f"{name}_offset"]
        return names

    def _packed_part(self, key: str) -> tuple[str, str] | None:
        """(the stored weight's key, "weight" | "weight_scale" | "weight_offset") for a key of a kept
        Q4 linear; None for any other key."""
        module, _, leaf = key.rpartition(".")
        if module in self._kept and leaf in ("weight", "weight_scale", "weight_offset"):
            return f"{module}.weight", leaf
        return None

    def get_slice(self, key: str) -> _Shape:
        packed = self._packed_part(key)
        if packed is not None:
            out_features, in_features = self._stored_shape(packed[0])
            return _Shape((out_features, in_features // 2) if packed[1] == "weight"
                          else (out_features, in_features // _Q4_GROUP))
        return _Shape(self._stored_shape(key))

    def _stored_shape(self, key: str) -> tuple[int, ...]:
        # ggml lists dimensions fastest-first: reversed, they are torch's (out_features, in_features).
        return tuple(int(n) for n in reversed(self._tensors[key].shape))

    def _hf_rows(self, key: str, rows: np.ndarray) -> np.ndarray:
        """Rows of q_proj / k_proj (weight, bias, or a packed weight's data, scales, offsets) back in
        the Hugging Face order; other tensors as they are."""
        heads = int(self._llama("attention.head_count"))
        if ".self_attn.q_proj." in key:
            return _reverse_rotary_permutation(rows, heads)
        if ".self_attn.k_proj." in key:
            return _reverse_rotary_permutation(rows, int(self._llama("attention.head_count_kv", heads)))
        return rows

    def get_tensor(self, key: str) -> torch.Tensor:
        packed = self._packed_part(key)
        if packed is not None:
            return torch.from_numpy(np.ascontiguousarray(self._hf_rows(key, self._q4_part(*packed))))
        weight = self._dequantized(self._tensors[key]).reshape(self._stored_shape(key))
        weight = self._hf_rows(key, weight)
        return torch.from_numpy(np.array(weight, dtype=np.float32))  # a copy: the file is mapped read-only

    def _dequantized(self, tensor: Any) -> np.ndarray:
        """A tensor's values as gguf dequantizes them (F64 read as it is); a type gguf cannot
        dequantize is named, with what to do."""
        import gguf

        if tensor.tensor_type == gguf.GGMLQuantizationType.F64:
            return np.asarray(tensor.data, dtype=np.float64)
        try:
            return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise GGUFError(
                f"{self.path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf "
                f"package cannot dequantize; quantize the model to a readable type (F32, F16, BF16, Q8_0, "
                f"Q4_0, Q4_1, Q5_0, Q5_1, a K-quant or an IQ type) or load the original checkpoint"
            ) from None

    def _q4_part(self, key: str, part: str) -> np.ndarray:
        """One of herd's int4 tensors of the Q4_0/Q4_1 weight `key`, from its blocks (in the file's
        row order): the packed values, or the float16 scales or offsets (out, in / 32)."""
        import gguf

        tensor = self._tensors[key]
        out_features, in_features = self._stored_shape(key)
        is_q4_1 = tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
        # Q4_0 block: fp16 d, 16 bytes of nibbles; Q4_1 block: fp16 d, fp16 m, 16 bytes of nibbles
        block_bytes = 20 if is_q4_1 else 18
        blocks = np.asarray(tensor.data).reshape(out_features, in_features // _Q4_GROUP, block_bytes)
        if part == "weight":
            nibbles = blocks[..., block_bytes - 16:]  # byte j: value j (low nibble), value j + 16 (high)
            values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # values 0..31 in order
            return (values[..., 0::2] | (values[..., 1::2] << 4)).reshape(out_features, in_features // 2)
        d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
        if part == "weight_scale":
            return d
        if is_q4_1:
            return np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
        return d * np.float16(-8)  # (q - 8) * d = q * d + (-8 d); times 8 is exact in float16
