"""`herd bench`'s model building and its bandwidth floor (the timing itself needs a GPU)."""

from __future__ import annotations

import torch

from bench.compare import transformers_reference
from herd import bench, cli
from tests.conftest import max_abs_diff


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


def test_bench_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        return
    assert cli.main(["bench", "llama3.2-1b"]) == 2
    assert "needs CUDA" in capsys.readouterr().out


def test_compare_with_an_unregistered_reference_points_to_the_script(capsys, monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.main(["bench", "llama3.2-1b", "--compare", "vllm"]) == 2
    assert "bench/compare.py" in capsys.readouterr().out
