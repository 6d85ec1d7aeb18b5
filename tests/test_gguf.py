"""GGUF files (herd.quantization.gguf) against transformers' own GGUF loading (the oracle).

The real case is SmolLM2-135M-Instruct in 4-bit (Q4_1, Q8_0 embeddings), loaded once per module by
both libraries. Tiny files written with gguf.GGUFWriter test the q/k row order, tied and untied
heads, and the errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import herd
from herd.quantization.gguf import GGUFError
from tests.conftest import SHARED_DATA, max_abs_diff, reference_llama

gguf = pytest.importorskip("gguf")

FOLDER = SHARED_DATA / "models" / "smollm2-135m-instruct"
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "Ünïcödé: café, naïve, 東京, Привет, 🙂👍🏽",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
    "def f(x):\n    return x ** 2  # square",
    "don't won't I'm you're",
]


@pytest.fixture(scope="module")
def real():
    if not (FOLDER / NAME).is_file():
        pytest.skip(f"{FOLDER / NAME} is not there")
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=NAME).eval()
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(FOLDER, gguf_file=NAME)
    ours = herd.AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=NAME, progress=False)
    tokenizer = herd.AutoTokenizer.from_pretrained(FOLDER, gguf_file=NAME)
    return reference, reference_tokenizer, ours, tokenizer


CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                 "bos_token_id", "eos_token_id", "pad_token_id")


def test_config_matches_reference(real):
    reference, _, ours, _ = real
    for field in CONFIG_FIELDS:
        assert getattr(ours.config, field) == getattr(reference.config, field), field
    assert ours.config.rope_parameters["rope_theta"] == reference.config.rope_parameters["rope_theta"] == 100000.0
    assert type(ours).__name__ == "LlamaForCausalLM" and ours.dtype == torch.float32
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # no output.weight in the file
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours.generation_config, field) == getattr(reference.generation_config, field), field


def test_every_weight_equals_reference(real):
    reference, _, ours, _ = real
    expected = reference.state_dict()
    got = ours.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_logits_match_reference(real):
    reference, reference_tokenizer, ours, _ = real
    ids = reference_tokenizer("The capital of France is a city where", return_tensors="pt").input_ids
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, reference(ids).logits) < 1e-4


def test_greedy_chat_generation_matches_reference(real):
    reference, reference_tokenizer, ours, tokenizer = real
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    reference_ids = reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                            return_dict=True)["input_ids"]
    assert ids.tolist() == reference_ids.tolist()
    ours_out = ours.generate(ids, max_new_tokens=20, do_sample=False)
    reference_out = reference.generate(ids, max_new_tokens=20, do_sample=False)
    assert ours_out.tolist() == reference_out.tolist()
    assert "Paris" in tokenizer.decode(ours_out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_match_reference(real, text):
    _, reference_tokenizer, _, tokenizer = real
    assert tokenizer(text).input_ids == reference_tokenizer(text).input_ids
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_settings_and_chat_template(real):
    _, reference_tokenizer, _, tokenizer = real
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"  # ids 1 and 2
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.chat_template == reference_tokenizer.chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == reference_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer(rendered).input_ids == reference_tokenizer(rendered).input_ids
    assert len(tokenizer) == len(reference_tokenizer) == 49152


def test_digits_are_split_like_llama_cpp(real):
    # tokenizer.ggml.pre = "smollm": llama.cpp (and SmolLM2's own tokenizer.json) split every digit;
    # transformers' GGUF tokenizer does not, so here herd differs from it on purpose.
    _, _, _, tokenizer = real
    assert tokenizer.convert_ids_to_tokens(tokenizer("in 2024").input_ids) == ["in", "Ġ", "2", "0", "2", "4"]


@pytest.fixture(scope="module")
def kept(real):
    """The same file in bfloat16, loaded by path with the model class: its Q4_1 linears kept 4-bit."""
    return herd.LlamaForCausalLM.from_pretrained(FOLDER / NAME, dtype=torch.bfloat16, progress=False)


def test_direct_path_and_class_loading(real, kept):
    _, _, ours, tokenizer = real
    assert kept.dtype == torch.bfloat16
    assert torch.equal(kept.model.layers[3].self_attn.k_proj.dequantize(torch.bfloat16),
                       ours.model.layers[3].self_attn.k_proj.weight.bfloat16())
    assert herd.AutoTokenizer.from_pretrained(str(FOLDER / NAME))("Hi there").input_ids == tokenizer("Hi there").input_ids


# --- Q4_0 / Q4_1 linears kept 4-bit in a 16-bit model ----------------------------------------------

LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


def _unpermute_like_transformers(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of _permute_like_llama_cpp: per head, rows (half, 2) back to (2, half)."""
    return weight.reshape(n_heads, weight.shape[0] // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_dequantized(path, config) -> dict[str, torch.Tensor]:
    """gguf's own dequantization of every decoder linear, rows in the Hugging Face order, by module path."""
    out = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        layer, _, rest = tensor.name.removeprefix("blk.").partition(".")
        part = rest.removesuffix(".weight")
        if part not in LINEARS:
            continue
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))
        if part == "attn_q":
            weight = _unpermute_like_transformers(weight, config.num_attention_heads)
        elif part == "attn_k":
            weight = _unpermute_like_transformers(weight, config.num_key_value_heads)
        out[f"model.layers.{layer}.{LINEARS[part]}"] = (torch.from_numpy(np.array(weight, dtype=np.float32)),
                                                       tensor.tensor_type)
    return out


def test_q4_1_linears_kept_4bit_in_bf16_dequantize_exactly(kept):
    """Each Q4_1 decoder linear becomes herd int4 group 32 with float16 scales; its dequantized
    weight is gguf's dequantization bit for bit (q/k rows un-permuted); the Q8_0 embedding (and
    the head tied to it) is dequantized."""
    from herd.quantization import QuantizedLinear

    expected = _gguf_dequantized(FOLDER / NAME, kept.config)
    assert len(expected) == 7 * kept.config.num_hidden_layers
    for path, (weight, tensor_type) in expected.items():
        module = kept.get_submodule(path)
        assert tensor_type == gguf.GGMLQuantizationType.Q4_1
        assert isinstance(module, QuantizedLinear) and module.scheme.format == "int4", path
        assert module.scheme.group_size == 32 and module.weight_scale.dtype == torch.float16, path
        assert torch.equal(module.dequantize().view(torch.int32), weight.view(torch.int32)), path  # every bit
    assert type(kept.model.embed_tokens) is torch.nn.Embedding and kept.model.embed_tokens.weight.dtype == torch.bfloat16
    assert type(kept.lm_head) is torch.nn.Linear and kept.lm_head.weight is kept.model.embed_tokens.weight
    entry = kept.config.quantization_config
    assert (entry["quant_method"], entry["format"], entry["group_size"]) == ("herd", "int4", 32)
    assert entry["modules_to_not_convert"] == [] and entry["scale_dtype"] == "float16"


def test_q4_kept_model_generates_as_the_bf16_dequantized_model(real, kept):
    """The int4 model (torch's CPU kernel, bf16 activations) and the same weights dequantized to a
    bf16 model make the same choices wherever the float32 model's choice is clear. Both round in
    bf16, and how (AMX or not, the kernel's sum order) depends on the CPU: on an AMX Xeon the first
    answer token of this chat is a near tie (float32 logits 25.33 against 25.24) that the int4
    model takes the other way, so exact greedy equality would test the CPU, not the weights."""
    import copy

    _, _, ours, tokenizer = real
    dequantized = copy.deepcopy(ours).to(torch.bfloat16)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    answer = dequantized.generate(ids, max_new_tokens=20, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids.shape[1]:], skip_special_tokens=True)
    with torch.no_grad():  # teacher-forced on the dequantized model's answer: (positions, vocab) each
        kept_logits, dequantized_logits, exact = (model(answer).logits[0, ids.shape[1] - 1:-1].float()
                                                  for model in (kept, dequantized, ours))
    top2 = exact.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 0.5  # bf16 moves these logits by about 1.2 at most here
    assert clear.sum() >= 5  # of the 8 answer tokens ("The capital of France is Paris." and its end)
    assert torch.equal(kept_logits.argmax(-1)[clear], dequantized_logits.argmax(-1)[clear])
    # and the kept model's own greedy decoding (prefill, then one row a step through the cache)
    # follows its forward over the whole sequence where the choice is clear (the CPU kernel's
    # rounding depends on the row count: this chat's near tie may go either way)
    out = kept.generate(ids, max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        forward = kept(out).logits[0, ids.shape[1] - 1:-1].float()
        top2 = ours(out).logits[0, ids.shape[1] - 1:-1].float().topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 0.5
    assert clear.sum() >= 6
    assert torch.equal(out[0, ids.shape[1]:][clear], forward.argmax(-1)[clear])


def _write_quantized_tiny_llama(path, reference, types: dict[str, "gguf.GGMLQuantizationType"]) -> None:
    """_write_tiny_llama's file (untied head), then each tensor in `types` (by GGUF name) quantized."""
    plain = path.with_name("plain.gguf")
    _write_tiny_llama(plain, reference, tied=False)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    reader = gguf.GGUFReader(str(plain))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, value)
        else:
            writer.add_key_value(field.name, value, field.types[0])
    for tensor in reader.tensors:
        array = np.array(tensor.data).reshape(tuple(reversed(tensor.shape.tolist())))
        qtype = types.get(tensor.name)
        if qtype is None:
            writer.add_tensor(tensor.name, array)
        else:
            writer.add_tensor(tensor.name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_q4_0_kept_exactly_others_dequantized_and_saved_back(tmp_path):
    """A tiny file with Q4_0 linears (value = (q - 8) d: scale d, offset -8d), one Q4_1 and one Q8_0
    linear, a Q4_0 embedding and output head: the Q4 linears are int4 and dequantize to gguf's
    values, the rest are float; saved and loaded back, nothing changes."""
    from herd.quantization import QuantizedLinear

    Q = gguf.GGMLQuantizationType
    reference = reference_llama(tie_word_embeddings=False)
    types = {f"blk.{layer}.{part}.weight": Q.Q4_0 for layer in range(2) for part in LINEARS}
    types.update({"blk.0.ffn_up.weight": Q.Q4_1, "blk.1.attn_v.weight": Q.Q8_0,
                  "token_embd.weight": Q.Q4_0, "output.weight": Q.Q4_0})
    path = tmp_path / "q4_0.gguf"
    _write_quantized_tiny_llama(path, reference, types)
    expected = _gguf_dequantized(path, reference.config)

    for dtype in (torch.float16, torch.bfloat16):
        model = herd.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, progress=False)
        assert model.config.quantization_config["modules_to_not_convert"] == ["model.layers.1.self_attn.v_proj"]
        for module_path, (weight, tensor_type) in expected.items():
            module = model.get_submodule(module_path)
            if tensor_type == Q.Q8_0:
                assert type(module) is torch.nn.Linear and torch.equal(module.weight, weight.to(dtype)), module_path
                continue
            assert isinstance(module, QuantizedLinear) and module.scheme.group_size == 32, module_path
            # equal values (a Q4_0 zero is +0 here where gguf's (q - 8) * d can give -0)
            assert torch.equal(module.dequantize(), weight), module_path
        assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
        ids = torch.tensor([[0, 5, 9, 3, 70, 2]])
        generated = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert generated.shape == (1, 11)

    model.save_pretrained(tmp_path / "saved")
    again = herd.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", progress=False)
    assert again.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == again.state_dict()[name].dtype and torch.equal(tensor, again.state_dict()[name]), name
    assert again.generate(ids, max_new_tokens=5, do_sample=False).tolist() == generated.tolist()

    # float32 (the default): every weight dequantized, plain nn.Linear, as transformers reads the file
    import transformers

    model = herd.AutoModelForCausalLM.from_pretrained(path, progress=False)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    assert getattr(model.config, "quantization_config", None) is None
    assert not any(isinstance(module, QuantizedLinear) for module in model.modules())
    for name, tensor in oracle.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


# --- tiny synthetic files ----------------------------------------------------------------------------


def _permute_like_llama_cpp(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf: per head, the rotate-half rows (2, half) become (half, 2)."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)



def add_byte_level_vocab(writer, tokens: list[str], merges: list[str]) -> None:
    """A gpt2-style (byte-level BPE) vocabulary: tokens 0 and 1 the control tokens <s> (bos) and </s> (eos)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)

def _write_tiny_llama(path, reference, *, tied: bool) -> None:
    config = reference.config
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(config.vocab_size)
    add_byte_level_vocab(writer, ["<s>", "</s>"] + [chr(ord("a") + i % 26) * (1 + i // 26)
                                                    for i in range(config.vocab_size - 2)], ["a a"])
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in reference.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", array)
        elif name == "model.norm.weight":
            writer.add_tensor("output_norm.weight", array)
        elif name == "lm_head.weight":
            if not tied:
                writer.add_tensor("output.weight", array)
        else:
            parts = name.split(".")  # model.layers.N[.self_attn|.mlp].module.leaf
            layer, module, leaf = parts[2], parts[-2], parts[-1]
            if module == "q_proj":
                array = _permute_like_llama_cpp(array, config.num_attention_heads)
            elif module == "k_proj":
                array = _permute_like_llama_cpp(array, config.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{names[module]}.{leaf}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_rotary_rows_and_tied_head(tmp_path, tied):
    import transformers

    reference = reference_llama(tie_word_embeddings=tied)
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama(path, reference, tied=tied)
    ours = herd.AutoModelForCausalLM.from_pretrained(path, progress=False)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    assert ours.config.tie_word_embeddings is tied
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) is tied
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name  # the q/k rows are back in HF order
        assert torch.equal(ours.state_dict()[name], oracle.state_dict()[name]), name
    ids = torch.tensor([[0, 5, 9, 3, 70, 2]])
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, reference(ids).logits) < 1e-5


# --- errors ------------------------------------------------------------------------------------------


def test_other_architecture_is_refused(tmp_path):
    path = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(path), arch="qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for load in (herd.AutoModelForCausalLM.from_pretrained, herd.AutoTokenizer.from_pretrained,
                 herd.LlamaForCausalLM.from_pretrained):
        with pytest.raises(GGUFError, match="holds a 'qwen2' model; herd reads only Llama-architecture GGUF files"):
            load(path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        herd.AutoModelForCausalLM.from_pretrained(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError, match="absent.gguf is not in"):
        herd.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="absent.gguf")
    with pytest.raises(FileNotFoundError, match="absent.gguf is not in"):
        herd.AutoTokenizer.from_pretrained(tmp_path, gguf_file="absent.gguf")


def test_broken_file_is_refused(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        herd.AutoModelForCausalLM.from_pretrained(path)


def test_sentencepiece_vocabulary_matches_reference(tmp_path):
    """tokenizer.ggml.model = "llama" (Llama 2 style): pieces with scores, byte tokens, no merges."""
    import transformers

    words = ["▁the", "▁a", "▁cat", "▁sat", "▁on", "▁mat", "he", "th", "▁t", "▁c", "at", "▁s", "▁o", "on", "▁m",
             "ma", "t", "h", "e", "a", "c", "s", "o", "n", "m", "▁", "x", "é", "▁hello", "hel", "lo", "l", "ll", "▁h"]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + words
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), arch="llama")
    for add, value in [(writer.add_block_count, 1), (writer.add_context_length, 64), (writer.add_embedding_length, 8),
                       (writer.add_feed_forward_length, 16), (writer.add_head_count, 2), (writer.add_head_count_kv, 2),
                       (writer.add_vocab_size, len(pieces))]:
        add(value)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(words))
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(words))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_tensor("token_embd.weight", np.zeros((len(pieces), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    ours = herd.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    assert ours.bos_token == "<s>" and ours.eos_token == "</s>" and ours.unk_token == "<unk>"
    for text in ["the cat sat on the mat", "hello  world\n", "théé x", "<s>the</s> cat", " leading", "Zq"]:
        ids = ours(text).input_ids
        # add_bos_token is true in the file: herd (like llama.cpp) adds <s>; transformers' GGUF
        # tokenizer ignores the flag. The rest (merges from scores, byte fallback) must agree.
        assert ids[0] == 1 and ids[1:] == reference(text).input_ids, text
        if "<" not in text:
            assert ours.decode(ids, skip_special_tokens=True) == text


# --- other tensor types and metadata ----------------------------------------------------------------


def _with_metadata(source, path, extra: dict) -> None:
    """A copy of the GGUF file `source` with the key-values of `extra` ({key: (value, GGUFValueType)}) set."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in extra:
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, field.contents())
        else:
            writer.add_key_value(field.name, field.contents(), field.types[0])
    for key, (value, value_type) in extra.items():
        writer.add_key_value(key, value, value_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)  # bytes as stored
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_f16_bf16_q5_q8_tensors_and_metadata_match_reference(tmp_path):
    """F16, BF16, Q5_0, Q5_1 and Q8_0 tensors (embeddings and head too) dequantize as gguf and
    transformers read them, in float32 and bfloat16; rope theta, eps, context length and the
    bos/eos/pad ids come from the metadata as transformers reads them."""
    import transformers

    Q, V = gguf.GGMLQuantizationType, gguf.GGUFValueType
    reference = reference_llama(tie_word_embeddings=False)
    types = {"blk.0.attn_q.weight": Q.F16, "blk.0.attn_k.weight": Q.BF16, "blk.0.attn_v.weight": Q.Q5_0,
             "blk.0.attn_output.weight": Q.Q5_1, "blk.0.ffn_gate.weight": Q.Q8_0, "blk.1.attn_k.weight": Q.Q5_1,
             "blk.1.ffn_down.weight": Q.Q5_0, "token_embd.weight": Q.F16, "output.weight": Q.BF16}
    _write_quantized_tiny_llama(tmp_path / "types.gguf", reference, types)
    _with_metadata(tmp_path / "types.gguf", tmp_path / "m.gguf", {
        "tokenizer.ggml.padding_token_id": (1, V.UINT32), "llama.rope.freq_base": (500000.0, V.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32), "llama.context_length": (4096, V.UINT32)})
    expected = _gguf_dequantized(tmp_path / "m.gguf", reference.config)
    for dtype in (torch.float32, torch.bfloat16):
        ours = herd.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=dtype, progress=False)
        oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=dtype).eval()
        assert getattr(ours.config, "quantization_config", None) is None  # no Q4 linear: nothing kept quantized
        for name, tensor in oracle.state_dict().items():
            assert ours.state_dict()[name].dtype == dtype and torch.equal(ours.state_dict()[name], tensor), name
        for module_path, (weight, tensor_type) in expected.items():
            assert torch.equal(ours.get_submodule(module_path).weight, weight.to(dtype)), (module_path, tensor_type)
    for field in CONFIG_FIELDS:
        assert getattr(ours.config, field) == getattr(oracle.config, field), field
    assert (ours.config.pad_token_id, ours.config.max_position_embeddings) == (1, 4096)
    assert ours.config.rms_norm_eps == pytest.approx(1e-5)
    assert ours.config.rope_parameters == oracle.config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    ids = torch.tensor([[0, 5, 9, 3, 70, 2]])
    assert ours.generate(ids, max_new_tokens=4, do_sample=False).tolist() == \
        oracle.generate(ids, max_new_tokens=4, do_sample=False).tolist()


@pytest.mark.parametrize("kind, extra, expected", [
    ("linear", {}, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    ("yarn", {"llama.rope.scaling.original_context_length": 32},
     {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}),
])
def test_rope_scaling_metadata_is_read_as_llama_cpp_applies_it(tmp_path, kind, extra, expected):
    # transformers' GGUF reader drops llama.rope.scaling.* (its config says "default"); llama.cpp
    # applies it, and so does herd: hand-written expectation
    V = gguf.GGUFValueType
    _write_tiny_llama(tmp_path / "plain.gguf", reference_llama(), tied=True)
    _with_metadata(tmp_path / "plain.gguf", tmp_path / "m.gguf", {
        "llama.rope.scaling.type": (kind, V.STRING), "llama.rope.scaling.factor": (4.0, V.FLOAT32),
        **{key: (value, V.UINT32) for key, value in extra.items()}})
    assert herd.AutoConfig.from_pretrained(tmp_path, gguf_file="m.gguf").rope_parameters == expected


MORE_TEXTS = ["  multiple   spaces  ", "A\u00a0non-breaking space", "x\u200by zero width", "emoji 🧑\u200d💻 zwj",
              "'quotes' \"double\" `back`", "CAPS AND lower MiXeD", "url https://example.com/a?b=c&d=e", "中文字符和日本語のテキスト",
              "\t\t\n \n", "", "ok<|im_end|>more", "!!!???...", "über-straße", "I'M YOU'RE", "a\r\nb\rc"]


def test_more_texts_encode_and_decode_as_reference(real):
    """Unicode spaces, zero-width joiners, CJK, CR, special tokens inside text (no digits: herd splits
    them as llama.cpp does, see test_digits_are_split_like_llama_cpp)."""
    _, reference_tokenizer, _, tokenizer = real
    for text in MORE_TEXTS:
        ids = reference_tokenizer(text).input_ids
        assert tokenizer(text).input_ids == ids, text
        assert tokenizer.convert_ids_to_tokens(ids) == reference_tokenizer.convert_ids_to_tokens(ids), text
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == \
                reference_tokenizer.decode(ids, skip_special_tokens=skip), text
