"""`herd bench`'s model building, its bandwidth floor, and a run on the CPU (the GPU timings need CUDA)."""

from __future__ import annotations

import argparse

import pytest
import torch

import herd

from bench.compare import transformers_reference
from herd import bench, cli
from tests.conftest import max_abs_diff

# transformers' MllamaVisionEncoder calls its own layers with the keyword it deprecates (see
# tests/models/mllama/conftest.py): silence exactly that warning of the Mllama reference runs here.
pytestmark = pytest.mark.filterwarnings("ignore:`hidden_state` is deprecated:FutureWarning")


def test_named_architecture_matches_the_reference_on_the_same_weights():
    model = bench.build_model("llama3.2-1b", torch.float32, torch.device("cpu"), num_layers=1)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as published
    reference = transformers_reference(model, torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_abs_diff(model(ids).logits, reference(ids).logits) < 1e-4


def test_decode_bytes_counts_active_weights_and_kv_by_hand():
    model = bench.build_model("llama4-scout-slice", torch.bfloat16, torch.device("meta"), num_layers=2)
    config = model.config
    hidden, inter, experts = config.hidden_size, config.intermediate_size, config.num_local_experts
    attention = hidden * (40 * 128) * 2 + hidden * (8 * 128) * 2  # q, o; k, v
    one_expert = 3 * hidden * inter
    per_layer = attention + one_expert + one_expert + hidden * experts + 2 * hidden  # shared + routed + router + norms
    head = config.vocab_size * hidden + hidden  # untied head + final norm
    weights, kv = bench.decode_bytes(model, batch=1, context=100)
    assert weights == 2 * (2 * per_layer + head)
    assert kv == 2 * 2 * 8 * 128 * 100 * 2  # both layers, keys and values, 100 positions, bf16
    # batch 4, top-1: four distinct experts at most; a chunked layer reads at most its chunk
    weights4, kv4 = bench.decode_bytes(model, batch=4, context=10_000)
    assert weights4 == weights + 2 * 2 * 3 * one_expert
    assert config.layer_types == ["chunked_attention", "chunked_attention"]  # the 4th layer would be global
    assert kv4 == 4 * 2 * 2 * 8 * 128 * 8192 * 2  # rows, layers, keys+values, kv heads, head_dim, chunk, bf16


def test_bench_runs_on_the_cpu(capsys, monkeypatch):
    """Without CUDA the bench runs on the CPU (float32, its bandwidth floor from a CPU copy); a tiny
    architecture here, `herd bench llama3.2-1b --num-layers 1` the same way at the real widths."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(bench.ARCHITECTURES, "tiny-llama", ("llama", dict(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)))
    real_copy_bandwidth = bench.copy_bandwidth
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: real_copy_bandwidth(device, 1 << 24))  # 16 MiB: quick
    assert cli.main(["bench", "tiny-llama", "--num-layers", "2", "--prompt-length", "8", "--new-tokens", "6",
                     "--prefill-lengths", "8"]) == 0
    out = capsys.readouterr().out
    assert "(herd's plain path: the model is on cpu), float32, prompt 8, 6 new tokens" in out
    assert "layers 2" in out and "GB/s copy bandwidth measured" in out
    assert "| herd | 1 | " in out and "failed" not in out
    assert "| herd | 8 | " in out


@pytest.mark.parametrize("quantization, weight_bytes", [("int8", 1), ("fp8", 1), ("int4", 0.5)])
def test_quantized_random_models_count_their_stored_bytes(quantization, weight_bytes):
    """--quantization builds the linears (and Llama 4's experts) quantized; the floor counts their bytes."""
    from herd.quantization import QuantizedExperts, QuantizedLinear

    model = bench.build_model("llama4-scout-slice", torch.bfloat16, torch.device("meta"), num_layers=1,
                              quantization=quantization)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QuantizedLinear)
    assert isinstance(layer.feed_forward.experts, QuantizedExperts)
    assert layer.feed_forward.experts.scheme.format == quantization

    def layer_bytes(quantization):  # what one more layer adds to a step's reads (the head stays bf16)
        one, two = (bench.decode_bytes(bench.build_model("llama4-scout-slice", torch.bfloat16, torch.device("meta"),
                                                         num_layers=n, quantization=quantization), 1, 0)[0]
                    for n in (1, 2))
        return two - one

    ratio = layer_bytes(quantization) / layer_bytes(None)
    # 1 byte a weight + row scales; int4: half a byte + a bf16 scale and offset per 128 weights
    assert (0.25 <= ratio < 0.27) if quantization == "int4" else (0.5 <= ratio < 0.52), ratio
    projection = layer.self_attn.q_proj
    assert projection.weight.numel() * projection.weight.element_size() == \
        weight_bytes * projection.in_features * projection.out_features


def test_quantized_bench_runs_on_the_cpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(bench.ARCHITECTURES, "tiny-llama", ("llama", dict(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)))
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 1e10)
    assert cli.main(["bench", "tiny-llama", "--prompt-length", "8", "--new-tokens", "6", "--quantization", "int4"]) == 0
    out = capsys.readouterr().out
    assert "float32 with int4 weights" in out and "| herd | 1 | " in out and "failed" not in out


def test_bench_with_cuda_asked_for_and_none_says_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "llama3.2-1b", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "herd: error: CUDA is not available on this machine; use --device cpu\n"


def test_compare_with_an_unregistered_reference_points_to_the_script(capsys, monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.main(["bench", "llama3.2-1b", "--compare", "vllm"]) == 2
    captured = capsys.readouterr()
    assert "bench/compare.py" in captured.err and not captured.out  # an error: on stderr


# --- Llama 3.2 Vision (Mllama) -------------------------------------------------------------------

TINY_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                 num_key_value_heads=2, cross_attention_layers=[1, 3], pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 max_position_embeddings=256)
TINY_VISION = dict(hidden_size=16, num_hidden_layers=3, num_global_layers=2, attention_heads=2, intermediate_size=32,
                   vision_output_dim=48, image_size=28, patch_size=14, intermediate_layers_indices=[0, 2], max_num_tiles=4)


def tiny_mllama(dtype=torch.float32, device="cpu"):
    from herd.models.mllama import MllamaConfig

    config = MllamaConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, image_token_index=128)
    return bench.random_model(config, dtype, torch.device(device))


def _args(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_llama32_vision_is_built_at_the_published_widths():
    model = bench.build_model("llama3.2-11b-vision", torch.bfloat16, torch.device("meta"))
    assert type(model).__name__ == "MllamaForConditionalGeneration"
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (128256, 4096, 14336, 40)
    assert text.cross_attention_layers == [3, 8, 13, 18, 23, 28, 33, 38]
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (32, 8, 128)
    assert text.rope_parameters["rope_type"] == "llama3" and text.rope_parameters["factor"] == 8.0
    assert text.rope_parameters["rope_theta"] == 500000.0 and text.max_position_embeddings == 131072
    assert not text.tie_word_embeddings
    assert (vision.image_size, vision.patch_size, vision.max_num_tiles, vision.hidden_size) == (560, 14, 4, 1280)
    assert (vision.num_hidden_layers, vision.num_global_layers, vision.vision_output_dim) == (32, 8, 7680)
    assert model.config.image_token_index == 128256
    assert bench.image_tokens_per_row(model.config) == 4 * 1601
    assert 10.6e9 < sum(p.numel() for p in model.parameters()) < 10.7e9  # "11B"
    # a slice keeps the cross-attention layers among its first layers
    sliced = bench.build_model("llama3.2-11b-vision", torch.bfloat16, torch.device("meta"), num_layers=9)
    assert sliced.config.text_config.cross_attention_layers == [3, 8]
    assert type(sliced.model.language_model.layers[8]).__name__ == "MllamaCrossAttentionDecoderLayer"


def test_mllama_floor_counts_the_text_weights_a_step_reads_and_the_image_kv():
    model = tiny_mllama(torch.bfloat16, "meta")
    hidden, inter, head_dim, kv_heads = 32, 64, 8, 2
    mlp = 3 * hidden * inter
    self_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + mlp + 2 * hidden  # q, o, k, v, MLP, norms
    # q, o, q_norm, two gates, norms, MLP: not k/v/k_norm (the image's keys/values are cached)
    cross_layer = 2 * hidden * hidden + head_dim + 2 + 2 * hidden + mlp
    head = 128 * hidden + hidden  # lm_head + final norm; the embedding table (136 rows) is not read whole
    weights, kv = bench.decode_bytes(model, batch=1, context=100)
    assert weights == 2 * (3 * self_layer + 2 * cross_layer + head)  # nothing of the vision tower or projector
    image_tokens = 4 * ((28 // 14) ** 2 + 1)
    assert kv == 2 * (3 * 2 * kv_heads * head_dim * 100 + 2 * 2 * kv_heads * head_dim * image_tokens)
    weights3, kv3 = bench.decode_bytes(model, batch=3, context=100)
    assert (weights3, kv3) == (weights, 3 * kv)


def test_mllama_prompt_and_reference_share_herds_weights():
    model = tiny_mllama()
    inputs = bench.prompt_inputs(model, batch=2, length=7, seed=0)
    assert inputs["pixel_values"].shape == (2, 1, 4, 3, 28, 28)
    assert inputs["aspect_ratio_ids"].tolist() == [[6], [6]]  # 2x2 tiles
    assert inputs["aspect_ratio_mask"].shape == (2, 1, 4) and bool(inputs["aspect_ratio_mask"].all())
    assert inputs["cross_attention_mask"].shape == (2, 7, 1, 4) and bool(inputs["cross_attention_mask"].all())
    assert (inputs["input_ids"][:, 0] == 128).all() and (inputs["input_ids"][:, 1:] < 128).all()
    reference = transformers_reference(model, torch.float32)
    assert reference.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    with torch.no_grad():
        assert max_abs_diff(model(**inputs).logits, reference(**inputs).logits) < 1e-4


def test_transformers_static_cache_cannot_hold_mllamas_image_so_compare_refuses_it():
    """Why bench/compare.py does not run transformers-compiled on Mllama: transformers 5.17 writes the
    image's cross-attention keys/values into the StaticCache, past its end (on CUDA: a device-side assert)."""
    import pytest

    from bench.compare import static_compiled

    model = tiny_mllama()
    reference = transformers_reference(model, torch.float32)
    inputs = bench.prompt_inputs(model, batch=1, length=8, seed=0)
    with pytest.raises(IndexError, match="out of bounds"):
        reference.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    with pytest.raises(RuntimeError, match="cannot hold the 20 image keys/values"):
        static_compiled(reference, 12)
    assert static_compiled(reference, 20)["cache_implementation"] == "static"


def _row(library, batch, ms, error=None):
    if ms is None:
        return bench.Row(library, batch, None, None, 1.0, error=error)
    return bench.Row(library, batch, ms, batch / ms * 1e3, 1.0, 1.0, None)


def test_report_quotes_the_fastest_reference_and_shows_failed_rows():
    model = bench.build_model("llama3.2-1b", torch.bfloat16, torch.device("meta"), num_layers=1)
    args = _args("llama3.2-1b", "--compare", "transformers", "--batch-sizes", "1,16")
    rows = [
        _row("herd", 1, 2.0), _row("transformers", 1, 20.0), _row("transformers-compiled", 1, 5.0),
        _row("herd", 16, 4.0), _row("transformers", 16, 24.0),
        _row("transformers-compiled", 16, None, error="RuntimeError: boom"),
    ]
    prefill = [bench.PrefillRow("herd", 64, 10.0, 6400, 11.0), bench.PrefillRow("transformers", 64, 30.0, 2133, 31.0),
               bench.PrefillRow("transformers-compiled", 64, 20.0, 3200, 21.0)]
    text = bench.report(args, model, 1e12, rows, prefill, ["a note"])
    summary = next(line for line in text.splitlines() if line.startswith("herd speed-up"))
    assert "fastest reference" in summary
    assert "batch 1: 2.50x (transformers-compiled)" in summary  # not 10x against eager
    assert "batch 16: 6.00x (transformers)" in summary  # the compiled row failed: eager is the fastest that ran
    assert "| transformers-compiled | 16 | failed: RuntimeError: boom |" in text
    assert "prompt 64: 2.00x (transformers-compiled)" in text
    assert "- a note" in text


class _Broken(Exception):
    pass


def test_a_failing_reference_mode_is_a_failed_row_not_an_error(monkeypatch, capsys):
    from herd.models.llama import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128)
    model = bench.random_model(config, torch.float32, torch.device("cpu"))

    def broken(reference_model, max_length):
        raise _Broken("this mode crashes | here")

    reference = bench.Reference(build=lambda herd_model, dtype: herd_model, version=lambda: "0",
                                modes={"fake": lambda reference_model, max_length: {}, "fake-broken": broken})
    monkeypatch.setitem(bench.REFERENCES, "fake", reference)
    args = _args("llama3.2-1b", "--compare", "fake", "--prompt-length", "8", "--new-tokens", "4",
                 "--prefill-lengths", "8")
    text = bench.bench_model(args, model, bandwidth=1e12)
    assert "fake-broken batch 1: failed: _Broken: this mode crashes" in capsys.readouterr().out
    assert "| fake-broken | 1 | failed: _Broken: this mode crashes / here |" in text  # no stray table column
    assert "| fake-broken | 8 | failed: _Broken" in text
    assert "(fake)" in next(line for line in text.splitlines() if line.startswith("herd speed-up"))


def test_mllama_bench_runs_herd_and_both_transformers_modes():
    model = tiny_mllama()
    args = _args("tiny", "--compare", "transformers", "--prompt-length", "8", "--new-tokens", "4", "--dtype", "float32")
    text = bench.bench_model(args, model, bandwidth=1e12)
    libraries = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "| 1 |" in line]
    assert libraries == ["herd", "transformers", "transformers-compiled"]
    assert "20 image tokens" in text and "plain path: the model is on cpu" in text
    assert "| transformers-compiled | 1 | failed: RuntimeError: not run: transformers' StaticCache" in text
    assert "herd speed-up over the fastest reference row" in text


@pytest.mark.parametrize("kv_cache_dtype", [None, "fp8"])
def test_bench_at_a_long_context_on_the_cpu(capsys, monkeypatch, kv_cache_dtype):
    """herd bench ARCH --context N: one prompt of N tokens, prefilled in chunks; time to first token,
    decode speed at that context, and the memory plan's total for that run (peak memory on CUDA)."""
    from herd.decoding import decoders

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(bench.ARCHITECTURES, "tiny-llama4", ("llama4", dict(
        vocab_size=256, hidden_size=32, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2, attention_chunk_size=32,
        max_position_embeddings=128)))
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 1e10)
    pieces = []
    real_forward = decoders.forward_tokens
    monkeypatch.setattr(decoders, "forward_tokens", lambda m, t, *a, **k: pieces.append(t.shape[1]) or real_forward(m, t, *a, **k))
    argv = ["bench", "tiny-llama4", "--context", "300", "--prefill-chunk-size", "64", "--new-tokens", "5"]
    if kv_cache_dtype:
        argv += ["--kv-cache-dtype", kv_cache_dtype]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "at long context, float32" in out and "prefill chunk 64" in out and "failed" not in out
    assert ("fp8 KV cache" in out) == bool(kv_cache_dtype)
    assert pieces[-9:] == [64, 64, 64, 64, 44, 1, 1, 1, 1]  # the 300-token prompt in chunks, then 4 steps
    row = next(line for line in out.splitlines() if line.startswith("| 300 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    ttft, tokens_per_s, decode_ms, decode_tokens_per_s = (float(cell) for cell in cells[1:5])
    # ttft printed to the ms, tokens/s to the unit: 300 / tokens/s is off by up to 0.5 * 300 / tokens/s^2
    assert ttft > 0 and decode_ms > 0 and abs(300 / tokens_per_s - ttft) <= 6e-4 + 0.5 * 300 / tokens_per_s**2
    assert abs(decode_tokens_per_s - 1e3 / decode_ms) <= 0.01 * decode_tokens_per_s + 0.1
    config = bench.architecture_config("tiny-llama4")
    config.max_position_embeddings = 305  # raised for the prompt (random weights)
    from herd.memory_plan import plan_memory

    plan = plan_memory(config, dtype=torch.float32, prompt_tokens=300, max_new_tokens=5, kv_cache_dtype=kv_cache_dtype,
                       prefill_chunk_size=64)
    assert cells[-1] == f"{plan.total / 2**30:.1f}" and cells[-2] == "-"  # no peak on the CPU


def test_bench_context_rejects_bad_lengths(capsys):
    assert cli.main(["bench", "llama3.2-1b", "--context", "0"]) != 0
    assert "--context takes positive prompt lengths" in capsys.readouterr().err


def test_random_int4_experts_are_built_from_float_weights_of_the_experts_shape():
    """Random quantized experts are drawn at the float shape (experts, in, out), then packed: int4's
    stored rows are half the input rows."""
    from herd.models.llama4.modeling_llama4 import Llama4TextExperts
    from herd.quantization import QuantizedExperts, Scheme

    config = herd.Llama4TextConfig(hidden_size=64, intermediate_size=32, num_local_experts=2)
    with torch.device("meta"):
        experts = Llama4TextExperts(config)
    module = QuantizedExperts(experts, Scheme("int4", group_size=32), dtype=torch.float32).to_empty(device="cpu")
    bench._fill_quantized(module, torch.float32, torch.Generator().manual_seed(0))
    down = module.dequantized("down_proj", slice(None), torch.float32)
    assert down.shape == (2, 32, 64) and 0.01 < float(down.std()) < 0.03  # the drawn N(0, 0.02) weights
