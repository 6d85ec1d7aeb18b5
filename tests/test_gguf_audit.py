"""GGUF files beyond tests/test_gguf.py: every tensor type gguf can read, Llama 3.1 rope scaling
(rope_freqs.weight), metadata variants, and tokenizers written the way llama.cpp's converter writes
them (gguf-py's own BpeVocab / SpecialVocab) from real tokenizer.json files.

Oracles: transformers' GGUF loading for weights; a transformers model built from the HF config for
what transformers' GGUF reader drops (rope scaling); the original tokenizer.json (through the
`tokenizers` library or transformers) for tokenization, where llama.cpp follows it and transformers'
GGUF tokenizer does not.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

import herd
from herd.quantization.gguf import GGUFError
from tests.conftest import SHARED_DATA, randomize_norms_and_biases
from tests.test_gguf import add_byte_level_vocab

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType
TOKENIZERS = SHARED_DATA / "tokenizers"

NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# byte offsets of the float16 scales in one block, kept small and finite in random blocks
FP16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
               Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ2_XXS: (0,), Q.IQ2_XS: (0,),
               Q.IQ2_S: (0,), Q.IQ3_XXS: (0,), Q.IQ3_S: (0,), Q.IQ1_S: (0,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
               Q.TQ1_0: (52,), Q.TQ2_0: (64,)}


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama(**overrides):
    config = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
    config.update(overrides)
    torch.manual_seed(0)
    return randomize_norms_and_biases(transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)))


def _permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf: per head, the rotate-half rows (2, half) become (half, 2)."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _random_blocks(rows: int, columns: int, qtype, rng) -> np.ndarray:
    """The bytes of a (rows, columns) tensor of `qtype` with random values and small finite scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, columns // block, size), dtype=np.uint8)
    for offset in FP16_FIELDS.get(qtype, ()):
        raw[..., offset + 1] = rng.integers(0x14, 0x1E, size=raw[..., offset].shape)  # |d| ~ 1e-5 .. 4e-3
    if qtype == Q.MXFP4:
        raw[..., 0] = rng.integers(118, 124, size=raw[..., 0].shape)  # e8m0 scales 2^-9 .. 2^-4
    return raw.reshape(rows, -1)


def _write(path, model, *, random_types=(), tokens=None, rope_freqs=None, skip=()) -> None:
    """`model` as llama.cpp's converter writes it (q/k rows permuted, untied head written unless the
    config ties it), tensors named in `random_types` replaced by random blocks of that type, metadata
    keys in `skip` left out."""
    config = model.config
    head_dim = config.head_dim
    writer = gguf.GGUFWriter(str(path), arch="llama")
    meta = [("block_count", config.num_hidden_layers), ("context_length", config.max_position_embeddings),
            ("embedding_length", config.hidden_size), ("feed_forward_length", config.intermediate_size),
            ("head_count", config.num_attention_heads), ("head_count_kv", config.num_key_value_heads),
            ("rope_freq_base", float(config.rope_parameters["rope_theta"])),
            ("layer_norm_rms_eps", config.rms_norm_eps), ("vocab_size", config.vocab_size),
            ("rope_dimension_count", head_dim)]
    if head_dim != config.hidden_size // config.num_attention_heads:
        meta += [("key_length", head_dim), ("value_length", head_dim)]
    for name, value in meta:
        if name not in skip:
            getattr(writer, f"add_{name}")(value)
    add_byte_level_vocab(writer, tokens or ["<s>", "</s>"] + [f"t{i}" for i in range(config.vocab_size - 2)], ["t 1"])
    rng = np.random.default_rng(0)
    random_types = dict(random_types)

    def add(name, array):
        if name in random_types:
            writer.add_tensor(name, _random_blocks(*array.shape, random_types[name], rng), raw_dtype=random_types[name])
        else:
            writer.add_tensor(name, array)

    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            add("token_embd.weight", array)
        elif name == "model.norm.weight":
            add("output_norm.weight", array)
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                add("output.weight", array)
        else:
            parts = name.split(".")  # model.layers.N[.self_attn|.mlp].module.leaf
            module = parts[-2]
            if module in ("q_proj", "k_proj"):
                array = _permute(array, config.num_attention_heads if module == "q_proj" else config.num_key_value_heads)
            add(f"blk.{parts[2]}.{NAMES[module]}.{parts[-1]}", array)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    _finish(writer)


def _assert_weights_and_logits_equal(ours, oracle, ids):
    expected = oracle.state_dict()
    assert set(ours.state_dict()) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, oracle(ids).logits)


# --- weights: every type gguf dequantizes, GQA/MQA, head_dim apart from hidden / heads ----------------


def test_every_readable_tensor_type_in_an_mqa_model_with_its_own_head_dim(tmp_path):
    """K-quants, IQ types, ternary and MXFP4 blocks (random bytes: gguf cannot quantize them), one
    key/value head, head_dim 32 (key_length; hidden / heads is 64): float32 weights and logits equal
    transformers' exactly, greedy tokens too."""
    reference = _llama(vocab_size=300, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=32, rope_theta=500000.0)
    random_types = {"blk.0.attn_q.weight": Q.Q4_K, "blk.0.attn_k.weight": Q.Q6_K, "blk.0.attn_v.weight": Q.Q2_K,
                    "blk.0.attn_output.weight": Q.Q8_0, "blk.0.ffn_gate.weight": Q.Q3_K,
                    "blk.0.ffn_up.weight": Q.Q5_K, "blk.0.ffn_down.weight": Q.IQ4_NL,
                    "blk.1.attn_q.weight": Q.IQ4_XS, "blk.1.attn_k.weight": Q.IQ2_XXS, "blk.1.attn_v.weight": Q.IQ3_S,
                    "blk.1.attn_output.weight": Q.IQ2_XS, "blk.1.ffn_gate.weight": Q.IQ1_S,
                    "blk.1.ffn_up.weight": Q.TQ2_0, "blk.1.ffn_down.weight": Q.MXFP4,
                    "token_embd.weight": Q.Q4_K, "output.weight": Q.Q6_K}
    # o_proj has 128 input features: too few for a 256-value K-quant block, as in real files
    random_types["blk.1.attn_output.weight"] = Q.Q4_0
    _write(tmp_path / "types.gguf", reference, random_types=random_types)
    ours = herd.AutoModelForCausalLM.from_pretrained(tmp_path / "types.gguf", progress=False)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="types.gguf").eval()
    assert (ours.config.head_dim, ours.config.num_key_value_heads) == (oracle.config.head_dim, 1) == (32, 1)
    ids = torch.tensor([[0, 5, 9, 3, 70, 2, 250, 299]])
    _assert_weights_and_logits_equal(ours, oracle, ids)
    assert ours.generate(ids, max_new_tokens=6, do_sample=False).tolist() == \
        oracle.generate(ids, max_new_tokens=6, do_sample=False).tolist()


def test_metadata_left_out_reads_as_transformers_reads_it(tmp_path):
    """No rms epsilon, rope dimension count or vocab size in the file: LlamaConfig's defaults and the
    token list's length, as transformers reads them (herd used to take eps 1e-5)."""
    reference = _llama(rms_norm_eps=1e-6)
    _write(tmp_path / "m.gguf", reference, skip=("layer_norm_rms_eps", "rope_dimension_count", "vocab_size"))
    ours = herd.AutoModelForCausalLM.from_pretrained(tmp_path / "m.gguf", progress=False)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    for field in ("rms_norm_eps", "head_dim", "vocab_size"):
        assert getattr(ours.config, field) == getattr(oracle.config, field), field
    _assert_weights_and_logits_equal(ours, oracle, torch.tensor([[0, 5, 9, 3, 70, 2]]))


def test_missing_required_metadata_is_named(tmp_path):
    _write(tmp_path / "m.gguf", _llama(), skip=("feed_forward_length",))
    with pytest.raises(GGUFError, match="has no llama.feed_forward_length"):
        herd.AutoModelForCausalLM.from_pretrained(tmp_path / "m.gguf", progress=False)


def _copy_with(source, path, replace: dict) -> None:
    """A copy of the GGUF file `source` with the tensors in `replace` ({name: (array, raw_dtype)}) replaced."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, field.contents())
        else:
            writer.add_key_value(field.name, field.contents(), field.types[0])
    for tensor in reader.tensors:
        array, raw_dtype = replace.get(tensor.name, (np.array(tensor.data), tensor.tensor_type))
        writer.add_tensor(tensor.name, array, raw_dtype=raw_dtype)
    _finish(writer)


def test_f64_tensor_is_read_and_unreadable_types_are_named(tmp_path):
    """F64 (which gguf does not dequantize) is read as it is; a type gguf cannot dequantize at all
    is refused naming the tensor and the type (it used to say "the file may be truncated")."""
    reference = _llama()
    _write(tmp_path / "plain.gguf", reference)
    q = reference.state_dict()["model.layers.0.self_attn.q_proj.weight"].double().numpy()
    _copy_with(tmp_path / "plain.gguf", tmp_path / "f64.gguf", {"blk.0.attn_q.weight": (_permute(q, 4), None)})
    stored = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "f64.gguf")).tensors}
    assert stored["blk.0.attn_q.weight"] == Q.F64
    ours = herd.AutoModelForCausalLM.from_pretrained(tmp_path / "f64.gguf", progress=False)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name

    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    _copy_with(tmp_path / "plain.gguf", tmp_path / "q8_1.gguf",
               {"blk.0.attn_k.weight": (np.zeros((32, 64 // block * size), np.uint8), Q.Q8_1)})
    with pytest.raises(GGUFError, match=r"tensor blk\.0\.attn_k\.weight is stored as Q8_1, which the gguf package "
                                        r"cannot dequantize; quantize the model to a readable type"):
        herd.AutoModelForCausalLM.from_pretrained(tmp_path / "q8_1.gguf", progress=False)


# --- Llama 3.1 rope scaling: rope_freqs.weight ------------------------------------------------------


def _llama_cpp_rope_freqs(theta, head_dim, factor, low, high, original) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf computes it for rope_type "llama3"."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    divisors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            divisors.append(1)
        elif wavelen > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(divisors, dtype=torch.float32).numpy()


@pytest.mark.parametrize("theta, head_dim, factor, low, high, original", [
    (500000.0, 16, 8.0, 1.0, 4.0, 8192),  # Llama 3.1's parameters
    (10000.0, 32, 16.0, 2.0, 8.0, 4096),  # others: fitted to the ramp
])
def test_llama3_rope_freqs_give_the_original_models_logits(tmp_path, theta, head_dim, factor, low, high, original):
    """llama.cpp stores Llama 3.1's rope scaling only as rope_freqs.weight. herd reads it back as
    rope_type "llama3" and gives the logits of the transformers model built from the HF config;
    transformers' own GGUF loader drops it (plain rope: off by about 3e-4 at 300 positions)."""
    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original}
    reference = _llama(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=131072, rope_parameters=rope, num_hidden_layers=1)
    rope_freqs = _llama_cpp_rope_freqs(theta, head_dim, factor, low, high, original)
    _write(tmp_path / "l31.gguf", reference, rope_freqs=rope_freqs)
    ours = herd.AutoModelForCausalLM.from_pretrained(tmp_path / "l31.gguf", progress=False)
    assert ours.config.rope_parameters["rope_type"] == "llama3" and ours.config.rope_parameters["factor"] == factor
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        assert (ours(ids).logits - expected).abs().max().item() < 1e-5
        oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="l31.gguf").eval()
        assert oracle.config.rope_parameters["rope_type"] == "default"  # transformers' reader drops it
        assert (oracle(ids).logits - expected).abs().max().item() > 1e-5


def test_rope_freqs_of_another_shape_are_refused(tmp_path):
    reference = _llama()
    _write(tmp_path / "m.gguf", reference, rope_freqs=[1.0, 3.0, 1.5, 7.0])  # head_dim 16: 8 wanted
    with pytest.raises(GGUFError, match="rope_freqs.weight has 4 values, not head_dim / 2 = 8"):
        herd.AutoModelForCausalLM.from_pretrained(tmp_path / "m.gguf", progress=False)
    _write(tmp_path / "m.gguf", reference, rope_freqs=[1.0, 3.0, 1.0, 7.0, 2.0, 1.0, 5.0, 7.0])
    with pytest.raises(GGUFError, match="does not follow Llama 3.1's rope scaling"):
        herd.AutoModelForCausalLM.from_pretrained(tmp_path / "m.gguf", progress=False)


# --- tokenizers written as llama.cpp's converter writes them --------------------------------------------


def _tiny_weights(writer, vocab: int, hidden: int = 8) -> None:
    for name, value in [("block_count", 1), ("context_length", 64), ("embedding_length", hidden),
                        ("feed_forward_length", 16), ("head_count", 2), ("head_count_kv", 2),
                        ("layer_norm_rms_eps", 1e-5), ("vocab_size", vocab)]:
        getattr(writer, f"add_{name}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((vocab, hidden), np.float32))



def _write_byte_level(folder, path, *, pre="llama-bpe") -> None:
    """A tokenizer.json folder as convert_hf_to_gguf writes it: gguf-py's BpeVocab (tokens, added
    tokens as CONTROL) and SpecialVocab (merges, bos/eos ids, add_bos_token, chat template)."""
    from gguf.vocab import BpeVocab, SpecialVocab

    vocab = BpeVocab(folder)
    tokens = [text if isinstance(text, str) else text.decode() for text, _, _ in vocab.all_tokens()]
    types = [int(kind) for _, _, kind in vocab.all_tokens()]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    _tiny_weights(writer, len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    _finish(writer)


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    folder = TOKENIZERS / "llama3.1"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{folder} is not there")
    path = tmp_path_factory.mktemp("llama31") / "llama31.gguf"
    _write_byte_level(folder, path)
    return transformers.AutoTokenizer.from_pretrained(folder), herd.AutoTokenizer.from_pretrained(path)


def test_llama3_vocabulary_words_stay_whole_as_in_llama_cpp(llama31):
    """Llama 3's tokenizer.json (and llama.cpp, pre "llama-bpe") keep a split piece that is itself a
    token whole (ignore_merges): " культуры" is one token, not three. herd's GGUF tokenizer used to
    run the merges, giving other ids for about 0.5% of the vocabulary's words."""
    truth, ours = llama31
    words = [truth.decode([i]) for i in range(0, 128000, 13)]
    assert ours(words, add_special_tokens=False).input_ids == truth(words, add_special_tokens=False).input_ids
    assert ours(" культуры").input_ids == truth(" культуры").input_ids == [128000, 126332]


LLAMA3_TEXTS = ["Hello world", "  two spaces", "The year 2024 and 1234567 items, 3.14159", "I'M YOU'RE don't it's",
                "tabs\tand\nnew\n\nlines\r\n", "Ünïcödé: café, 東京, Привет, 🙂👍🏽", "emoji 🧑\u200d💻 zwj", "",
                "<|begin_of_text|>hi<|eot_id|>", "text<|start_header_id|>user<|end_header_id|>\n\nHi", "   ",
                "def f(x):\n    return x ** 2  # square", "<|reserved_special_token_5|>x"]


def test_llama3_tokenizer_settings_ids_and_chat_template_match_tokenizer_json(llama31):
    truth, ours = llama31
    assert (ours.bos_token, ours.eos_token, len(ours)) == (truth.bos_token, truth.eos_token, len(truth))
    for text in LLAMA3_TEXTS:
        ids = truth(text).input_ids
        assert ours(text).input_ids == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == truth.decode(ids, skip_special_tokens=skip), text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    rendered = truth.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered
    assert ours.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        truth.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def _write_sentencepiece(folder, path, *, add_bos: bool | None) -> None:
    """A SentencePiece-style BPE folder (tokenizer.json) as a GGUF "llama" vocabulary: pieces with
    scores in merge order (what a tokenizer.model holds), <0xNN> pieces as BYTE, <unk> UNKNOWN,
    <s> and </s> CONTROL."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab, merges = tokenizer["model"]["vocab"], tokenizer["model"]["merges"]
    rank = {}
    for i, merge in enumerate(merges):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        rank.setdefault(left + right, i)
    pieces = sorted(vocab, key=vocab.get)
    special = {added["content"] for added in tokenizer["added_tokens"]}
    # token types: 1 normal, 2 unknown, 3 control, 6 byte
    types = [2 if p == "<unk>" else 3 if p in special else 6 if re.fullmatch(r"<0x[0-9A-F]{2}>", p) else 1
             for p in pieces]
    scores = [-float(rank.get(p, len(merges) + i)) if kind == 1 else 0.0
              for i, (p, kind) in enumerate(zip(pieces, types))]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    _tiny_weights(writer, len(pieces))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_unk_token_id(vocab["<unk>"])
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    _finish(writer)


SPM_TEXTS = ["Hello world", " Hello", "  two spaces", "   ", "a  b", "tabs\tand\nnew\n\nlines\r\n", "<s>the</s> cat",
             "Ünïcödé: café, naïve, 東京, Привет, 🙂👍🏽", "def f(x):\n    return x ** 2  # square", "▁already", "Zq"]


def test_sentencepiece_vocabulary_and_bos_default_follow_llama_cpp(tmp_path):
    """A 32k SentencePiece BPE vocabulary: ids as its tokenizer.json gives them (SentencePiece's own
    behaviour, which llama.cpp follows: " Hello" is "▁" "▁Hello"), byte fallback for unknown
    characters. A file without tokenizer.ggml.add_bos_token adds BOS, llama.cpp's default for such
    vocabularies (herd used to add none); the flag, when there, decides."""
    from tokenizers import Tokenizer

    folder = TOKENIZERS / "spm-llama-style"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{folder} is not there")
    truth = Tokenizer.from_file(str(folder / "tokenizer.json"))  # BOS added by its post-processor
    _write_sentencepiece(folder, tmp_path / "default.gguf", add_bos=None)
    _write_sentencepiece(folder, tmp_path / "nobos.gguf", add_bos=False)
    ours = herd.AutoTokenizer.from_pretrained(tmp_path / "default.gguf")
    without = herd.AutoTokenizer.from_pretrained(tmp_path / "nobos.gguf")
    for text in SPM_TEXTS:
        ids = truth.encode(text).ids
        assert ids[0] == 1 and ours(text).input_ids == ids, text
        assert without(text).input_ids == ids[1:], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == truth.decode(ids, skip_special_tokens=skip), text


def _write_tiny_byte_level(path, *, pre, add_bos: bool | None) -> None:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    _tiny_weights(writer, 6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["<|begin_of_text|>", "a", "b", "c", "ab", "abc"])
    writer.add_token_types([3, 1, 1, 1, 1, 1])
    writer.add_token_merges(["a b"])  # no merge makes "abc"
    writer.add_bos_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    _finish(writer)


@pytest.mark.parametrize("pre, add_bos, expected", [
    ("llama-bpe", None, [0, 5]),  # llama.cpp: BOS by default, a piece in the vocabulary stays whole
    ("llama-bpe", False, [5]),
    ("gpt-2", None, [4, 3]),  # no BOS by default, merges only
    ("gpt-2", True, [0, 4, 3]),
])
def test_bos_default_and_whole_pieces_follow_the_pre_tokenizer(tmp_path, pre, add_bos, expected):
    """Llama 3's first tokenizer.json had no BOS template, so the converter wrote no add_bos_token;
    llama.cpp adds BOS for pre "llama-bpe" then (Meta's tokenizer does too), and herd now does the
    same (transformers' GGUF tokenizer never adds it). Other byte-level vocabularies add none unless
    the file says so."""
    _write_tiny_byte_level(tmp_path / "t.gguf", pre=pre, add_bos=add_bos)
    assert herd.AutoTokenizer.from_pretrained(tmp_path / "t.gguf")("abc").input_ids == expected


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    """A byte-level BPE whose pre-tokenizer herd does not rebuild (Mistral Nemo's "tekken") is
    refused by name rather than split with GPT-2's pattern."""
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), arch="llama")
    _tiny_weights(writer, 4)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("tekken")
    writer.add_token_list(["a", "b", "ab", "<s>"])
    writer.add_token_types([1, 1, 1, 3])
    writer.add_token_merges(["a b"])
    _finish(writer)
    with pytest.raises(GGUFError, match="pre-tokenizer 'tekken', which herd does not rebuild .*tokenizer.json"):
        herd.AutoTokenizer.from_pretrained(tmp_path / "t.gguf")
