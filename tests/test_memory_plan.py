"""The memory plan: hand-computed bytes of tiny configs, the published Scout widths, `herd plan`."""

from __future__ import annotations

import pytest
import torch

from herd import bench
from herd.cli import main
from herd.memory_plan import plan_memory
from herd.models.llama import LlamaConfig
from herd.models.llama4 import Llama4TextConfig
from herd.models.mllama import MllamaConfig
from tests.conftest import TINY_LLAMA, reference_llama, save_reference

# TINY_LLAMA: vocab 128, hidden 32, intermediate 64, 2 layers, 4 heads, 2 KV heads -> head_dim 8.
LAYER_LINEARS = 32 * 32 * 2 + 16 * 32 * 2 + 64 * 32 * 3  # q, o; k, v; gate, up, down
LAYER_SCALE_ROWS = 32 * 2 + 16 * 2 + 64 * 2 + 32  # one float32 scale per output row
LAYER_NORMS = 32 * 2
EMBEDDING = 128 * 32


def tiny_llama(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY_LLAMA, "tie_word_embeddings": False, **overrides})


def kv_bytes(layers_positions: list[int], batch: int = 1, kv_heads: int = 2, head_dim: int = 8, itemsize: int = 2):
    return sum(2 * batch * positions * kv_heads * head_dim * itemsize for positions in layers_positions)


def test_llama_weights_and_kv_by_hand():
    plan = plan_memory(tiny_llama(), prompt_tokens=10, max_new_tokens=6, batch_size=3)
    numel = 2 * (LAYER_LINEARS + LAYER_NORMS) + EMBEDDING * 2 + 32
    assert plan.weights == numel * 2
    assert plan.vision == 0
    assert plan.kv_cache == 2 * 2 * 3 * 16 * 2 * 8 * 2 == kv_bytes([16, 16], batch=3)
    # the documented estimate: the prompt's tokens through one layer, plus float32 last-position logits
    assert plan.activations == 3 * 10 * (32 + 2 * 64 + (4 + 2 * 2) * 8) * 2 + 3 * 128 * 4
    assert plan.total == plan.weights + plan.kv_cache + plan.activations == plan.per_device


def test_tied_embeddings_counted_once():
    untied = plan_memory(tiny_llama())
    tied = plan_memory(tiny_llama(tie_word_embeddings=True))
    assert untied.weights - tied.weights == EMBEDDING * 2


def test_float32_doubles_weights_and_kv():
    bf16 = plan_memory(tiny_llama())
    fp32 = plan_memory(tiny_llama(), dtype=torch.float32)
    assert fp32.weights == 2 * bf16.weights and fp32.kv_cache == 2 * bf16.kv_cache


def test_int8_linears_are_one_byte_with_row_scales():
    plan = plan_memory(tiny_llama(), quantization="int8")
    layer = LAYER_LINEARS * 1 + LAYER_SCALE_ROWS * 4 + LAYER_NORMS * 2
    assert plan.weights == 2 * layer + (EMBEDDING * 2 + 32) * 2  # embeddings, lm_head and final norm in bf16
    assert plan.kv_cache == plan_memory(tiny_llama()).kv_cache  # the cache stays in the model's dtype


def test_tp_halves_weights_and_kv():
    one = plan_memory(tiny_llama())
    two = plan_memory(tiny_llama(), tp=2)
    assert two.total == one.total
    assert two.per_device == (one.weights + one.kv_cache) // 2 + one.activations


def test_llama4_chunked_layers_bounded_by_the_chunk():
    config = Llama4TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_local_experts=2, attention_chunk_size=16, max_position_embeddings=4096)
    assert config.layer_types == ["chunked_attention"] * 3 + ["full_attention"]
    plan = plan_memory(config, prompt_tokens=30, max_new_tokens=20)
    assert plan.kv_cache == kv_bytes([16, 16, 16, 50])
    short = plan_memory(config, prompt_tokens=4, max_new_tokens=6)
    assert short.kv_cache == kv_bytes([10] * 4)


def test_fp8_kv_cache_by_hand():
    """Full-attention layers: 1 byte per element + a float32 scale per kv head of each token, for
    keys and values; Llama 4's chunked layers stay bf16."""
    plan = plan_memory(tiny_llama(), prompt_tokens=10, max_new_tokens=6, batch_size=3, kv_cache_dtype="fp8")
    assert plan.kv_cache == 2 * (2 * 3 * 16 * 2 * (8 * 1 + 4))  # layers * (k+v * batch * positions * heads * bytes)
    config = Llama4TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_local_experts=2, attention_chunk_size=16, max_position_embeddings=4096)
    fp8 = plan_memory(config, prompt_tokens=30, max_new_tokens=20, kv_cache_dtype="float8_e4m3fn")
    assert fp8.kv_cache == kv_bytes([16, 16, 16]) + 2 * 50 * 2 * (8 + 4)
    # what the cache allocates: StaticCache's FP8 buffers and scales for the full layer
    from herd.cache import StaticCache

    cache = StaticCache(config, max_cache_len=50, dtype="fp8")
    cache.update(torch.zeros(1, 2, 1, 8, dtype=torch.bfloat16), torch.zeros(1, 2, 1, 8, dtype=torch.bfloat16), 3)
    allocated = [cache.key_cache[3], cache.value_cache[3], cache.key_scales[3], cache.value_scales[3]]
    assert sum(t.numel() * t.element_size() for t in allocated) == 2 * 50 * 2 * (8 + 4)


def test_a_long_prefill_counts_its_transients_by_hand():
    """A chunk after a cache: cuDNN's keys and values repeated per query head (4 heads of 8) and the
    parts merged in float32, the FP8 cache dequantized (2 kv heads); quantized Llama 4 experts
    dequantized for a prefill."""
    one_chunk = plan_memory(tiny_llama(), prompt_tokens=8192, prefill_chunk_size=8192)
    after_cache = plan_memory(tiny_llama(), prompt_tokens=8193, prefill_chunk_size=8192)
    repeated = 2 * 8193 * 4 * 8 * 2  # keys and values of 8193 positions, 4 heads of 8, bf16
    merged = 4 * 8192 * 4 * 8 * 4  # the two parts' outputs and their merge, float32
    assert after_cache.activations - one_chunk.activations == repeated + merged
    fp8 = plan_memory(tiny_llama(), prompt_tokens=8193, prefill_chunk_size=8192, kv_cache_dtype="fp8")
    assert fp8.activations - after_cache.activations == 2 * 8193 * 2 * 8 * 2
    # chunks below CUDNN_MIN_QUERIES run flash attention, which reads the kv heads as they are
    small_chunks = plan_memory(tiny_llama(), prompt_tokens=8193, prefill_chunk_size=1024)
    assert small_chunks.activations == plan_memory(tiny_llama(), prompt_tokens=1024, prefill_chunk_size=1024).activations
    config = Llama4TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_local_experts=2, attention_chunk_size=16, max_position_embeddings=4096)
    plain, int8 = (plan_memory(config, prompt_tokens=30, quantization=q) for q in (None, "int8"))
    assert int8.activations - plain.activations == 2 * 3 * 32 * 64 * 2  # experts x (gate, up, down) x 32 x 64 in bf16


def test_scout_at_a_million_tokens_on_one_h200():
    """The issue's goal: Scout's 48 layers, a 1M-token prompt. 12 full layers x 8 kv heads x 128:
    bf16 keys/values are 49152 bytes a token (49 GB at 1M); FP8 with scales 24960. FP8 weights
    (110 GB) leave too little beside them; int4 weights with the FP8 cache fit, and that plan is
    the peak measured on an H200 (111.3 GiB, bench/RESULTS.md 2026-11-30 sixth session)."""
    config = bench.architecture_config("llama4-scout-slice", 48)
    positions = 1_000_000 + 300
    bf16 = plan_memory(config, quantization="fp8", prompt_tokens=1_000_000, max_new_tokens=300, prefill_chunk_size=16384)
    fp8 = plan_memory(config, quantization="fp8", prompt_tokens=1_000_000, max_new_tokens=300, prefill_chunk_size=16384,
                      kv_cache_dtype="fp8")
    chunked = 36 * 8192 * 2 * 8 * 128 * 2
    assert bf16.kv_cache == 12 * positions * 2 * 8 * 128 * 2 + chunked
    assert fp8.kv_cache == 12 * positions * 2 * 8 * (128 + 4) + chunked
    assert not bf16.fits(141e9) and not fp8.fits(141e9)
    int4 = fp8._replanned(quantization="int4")
    assert int4.fits(141e9)
    assert f"--quantization int4 ({int4.per_device / 1e9:.1f} GB)" in fp8.suggestion(141e9)
    measured = plan_memory(config, quantization="int4", prompt_tokens=1_048_576, max_new_tokens=16,
                           prefill_chunk_size=16384, kv_cache_dtype="fp8")
    assert abs(measured.total / 2**30 - 111.3) < 1.5


def tiny_mllama() -> MllamaConfig:
    return MllamaConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         cross_attention_layers=[1], num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                         max_position_embeddings=131072),
        vision_config=dict(image_size=28, patch_size=14, max_num_tiles=4, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_global_layers=1, attention_heads=2, vision_output_dim=32,
                           intermediate_layers_indices=[0]))


def test_mllama_cross_layers_hold_the_image_tokens_only():
    plan = plan_memory(tiny_mllama(), prompt_tokens=10, max_new_tokens=5)
    image_tokens = 4 * ((28 // 14) ** 2 + 1)  # one image of every tile, a class token per tile
    assert plan.kv_cache == kv_bytes([15, image_tokens, 15])
    assert 0 < plan.vision < plan.weights


def test_suggestion_names_a_quantization_that_fits():
    plan = plan_memory(tiny_llama())
    int8 = plan_memory(tiny_llama(), quantization="int8")
    fp8 = plan_memory(tiny_llama(), quantization="fp8")
    capacity = (max(int8.per_device, fp8.per_device) + plan.per_device) // 2
    assert not plan.fits(capacity) and fp8.fits(capacity)
    line = plan.suggestion(capacity)
    assert "does not fit" in line and "--quantization fp8" in line and "\n" not in line
    assert plan.suggestion(plan.per_device).startswith("fits")


def test_suggestion_shorter_generation():
    plan = plan_memory(tiny_llama(), prompt_tokens=10, max_new_tokens=1000)
    capacity = plan.per_device - kv_bytes([500, 500])  # room for 510 positions less than asked
    line = plan.suggestion(capacity)
    assert "--max-new-tokens 500" in line


def test_scout_needs_fp8_on_one_h200():
    config = bench.architecture_config("llama4-scout-slice", 48)
    bf16 = plan_memory(config)
    assert 200e9 < bf16.weights < 230e9  # about 109B parameters
    assert not bf16.fits(141e9)
    assert "--quantization fp8" in bf16.suggestion(141e9)
    fp8 = plan_memory(config, quantization="fp8")
    assert fp8.fits(141e9)
    assert fp8.suggestion(141e9).startswith("fits")
    assert bf16.kv_cache < 1e9  # 384 positions, never max_position_embeddings


def _rows(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        if line.endswith(" GB") and "  " in line:
            name, value = line.rsplit("  ", 1)[0].strip(), line.split()[-2]
            rows[name] = value
    return rows


def test_cli_plan_of_a_checkpoint_folder(tmp_path, capsys):
    folder = save_reference(reference_llama(), tmp_path / "tiny")
    assert main(["plan", str(folder), "--dtype", "bf16", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    for name in ("weights", "of which vision", "KV cache", "activations (estimate)", "total", "per GPU (tp=1)"):
        assert name in rows, out
    assert "128 prompt + 8 new tokens" in out


def test_cli_plan_of_an_architecture(capsys):
    assert main(["plan", "llama3.2-1b", "--quantization", "int4", "--tp", "2", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    expected = plan_memory(bench.architecture_config("llama3.2-1b"), quantization="int4", batch_size=2, tp=2)
    assert rows["weights"] == f"{expected.weights / 1e9:.3f}"
    assert rows["per GPU (tp=2)"] == f"{expected.per_device / 1e9:.3f}"


def test_cli_plan_with_an_fp8_kv_cache(capsys):
    assert main(["plan", "llama4-scout-slice", "--layers", "48", "--quantization", "int4", "--kv-cache-dtype", "fp8",
                 "--prompt-tokens", "262144", "--max-new-tokens", "300", "--prefill-chunk-size", "16384"]) == 0
    out = capsys.readouterr().out
    expected = plan_memory(bench.architecture_config("llama4-scout-slice", 48), quantization="int4",
                           prompt_tokens=262144, max_new_tokens=300, kv_cache_dtype="fp8", prefill_chunk_size=16384)
    assert "fp8 KV cache" in out
    assert _rows(out)["KV cache"] == f"{expected.kv_cache / 1e9:.3f}"
    assert _rows(out)["activations (estimate)"] == f"{expected.activations / 1e9:.3f}"


@pytest.mark.parametrize("argv", [["plan", "llama3.2-1b", "--tp", "0"], ["plan", "llama3.2-1b", "--layers", "2", "--tp", "-1"]])
def test_cli_plan_rejects_bad_numbers(argv, capsys):
    assert main(argv) == 2
    assert "herd: error: --tp must be >= 1" in capsys.readouterr().err


def test_from_pretrained_refuses_weights_bigger_than_the_gpus_free_memory_before_allocating(tmp_path, monkeypatch):
    """On a GPU whose free memory cannot hold the weights, from_pretrained stops before reading a
    tensor, naming the sizes and what would fit (CUDA faked: the check runs before any allocation)."""
    import herd
    from herd import loading
    from tests.conftest import reference_llama, save_reference

    folder = save_reference(reference_llama(hidden_size=64, intermediate_size=128, vocab_size=128), tmp_path / "ckpt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100_000, 80_000_000_000))
    monkeypatch.setattr(loading, "load_checkpoint", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(torch.OutOfMemoryError, match=r"LlamaForCausalLM needs 0\.\d GB for its weights \(float32\) and "
                                                      r"cuda has 0\.0 GB free: does not fit"):
        herd.LlamaForCausalLM.from_pretrained(folder, device_map="cuda", progress=False)
