"""Checkpoint loading and saving: shards, dtypes, devices, and one clear error per problem."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import herd
from herd.loading import CheckpointError, UnsafeCheckpointError, parse_size
from herd.modeling_utils import resolve_device
from tests.conftest import max_abs_diff, reference_llama, save_reference

TOL = 1e-4


def _ids():
    return torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def test_sharded_checkpoint_loads_same_as_single(tmp_path):
    reference = reference_llama()
    folder = save_reference(reference, tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 3 and (folder / "model.safetensors.index.json").is_file()
    model = herd.AutoModelForCausalLM.from_pretrained(folder, progress=False)
    with torch.no_grad():
        assert max_abs_diff(model(_ids()).logits, reference(_ids()).logits) < TOL


def test_dtype_auto_takes_checkpoint_dtype(tmp_path):
    reference = reference_llama().to(torch.bfloat16)
    folder = save_reference(reference, tmp_path / "bf16")
    assert herd.LlamaForCausalLM.from_pretrained(folder, progress=False).dtype == torch.bfloat16
    assert herd.LlamaForCausalLM.from_pretrained(folder, dtype="auto", progress=False).dtype == torch.bfloat16
    assert herd.LlamaForCausalLM.from_pretrained(folder, dtype="float32", progress=False).dtype == torch.float32
    assert herd.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float16, progress=False).dtype == torch.float16
    # without a dtype entry in config.json, the tensors decide
    config = json.loads((folder / "config.json").read_text())
    del config["dtype"]
    (folder / "config.json").write_text(json.dumps(config))
    assert herd.LlamaForCausalLM.from_pretrained(folder, progress=False).dtype == torch.bfloat16


@pytest.mark.parametrize("device_map", [None, "cpu", torch.device("cpu"), "auto", {"": "cpu"}])
def test_device_map_on_cpu(tmp_path, device_map):
    folder = save_reference(reference_llama(), tmp_path / "ckpt")
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map=device_map, progress=False)
    expected = "cuda" if device_map == "auto" and torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in model.parameters()} == {expected}
    assert model.model.rotary_emb.inv_freq.device.type == expected


def test_device_map_errors():
    # a split map resolves to where its offloaded parts compute (the parallel/ tests cover the rest)
    assert resolve_device({"model.layers.0": "cpu", "lm_head": "disk"}) == torch.device("cpu")
    with pytest.raises(ValueError, match="is not a device"):
        resolve_device({"model.layers.0": "cpu", "lm_head": "gpu0"})
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loads_straight_to_cuda(tmp_path):
    reference = reference_llama()
    folder = save_reference(reference, tmp_path / "ckpt")
    model = herd.LlamaForCausalLM.from_pretrained(folder, device_map="cuda", progress=False)
    assert model.device.type == "cuda"
    with torch.no_grad():
        assert max_abs_diff(model(_ids().cuda()).logits.cpu(), reference(_ids()).logits) < 1e-3


def test_tied_embeddings_share_storage_and_save_once(tmp_path):
    reference = reference_llama(tie_word_embeddings=True)
    folder = save_reference(reference, tmp_path / "tied")
    model = herd.LlamaForCausalLM.from_pretrained(folder, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in saved and "model.embed_tokens.weight" in saved


@pytest.mark.parametrize("cls_name", ["LlamaForCausalLM", "LlamaModel", "LlamaForSequenceClassification",
                                      "LlamaForQuestionAnswering", "LlamaForTokenClassification"])
def test_save_pretrained_loads_back_in_transformers(tmp_path, cls_name):
    import transformers

    reference = reference_llama(cls_name, num_labels=3, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0})
    folder = save_reference(reference, tmp_path / "ref")
    ours = getattr(herd, cls_name).from_pretrained(folder, progress=False)
    ours.save_pretrained(tmp_path / "ours", max_shard_size="30KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    back = getattr(transformers, cls_name).from_pretrained(tmp_path / "ours").eval()
    ids = _ids()
    with torch.no_grad():
        expected, got = reference(ids), back(ids)
    for key in ("logits", "last_hidden_state", "start_logits"):
        if key in expected:
            assert max_abs_diff(got[key], expected[key]) == 0, key
    # and herd reads its own output again
    again = getattr(herd, cls_name).from_pretrained(tmp_path / "ours", progress=False)
    assert again.config.to_dict() == ours.config.to_dict()


def test_save_pretrained_refuses_pickle():
    model = herd.LlamaForCausalLM(herd.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                                                   num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained("/tmp/never", safe_serialization=False)


# --- errors ------------------------------------------------------------------------------------


def _rewrite_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_weights_are_listed(tmp_path):
    folder = save_reference(reference_llama(), tmp_path / "ckpt")
    _rewrite_weights(folder, lambda t: (t.pop("model.layers.1.mlp.up_proj.weight"), t.pop("model.norm.weight")))
    with pytest.raises(CheckpointError, match=r"missing weights \(2\): model.layers.1.mlp.up_proj.weight, model.norm.weight"):
        herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


def test_missing_untied_lm_head_is_an_error(tmp_path):
    folder = save_reference(reference_llama(), tmp_path / "ckpt")
    _rewrite_weights(folder, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="missing weights.*lm_head.weight"):
        herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


def test_unexpected_weights_are_listed(tmp_path):
    folder = save_reference(reference_llama(), tmp_path / "ckpt")
    _rewrite_weights(folder, lambda t: t.update({"model.layers.7.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected weights \(1\): model.layers.7.mlp.extra.weight"):
        herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


def test_derived_rotary_buffers_in_old_checkpoints_are_ignored(tmp_path):
    reference = reference_llama()
    folder = save_reference(reference, tmp_path / "ckpt")
    _rewrite_weights(folder, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}))
    model = herd.LlamaForCausalLM.from_pretrained(folder, progress=False)
    with torch.no_grad():
        assert max_abs_diff(model(_ids()).logits, reference(_ids()).logits) < TOL


def test_shape_mismatch_names_expected_and_found(tmp_path):
    folder = save_reference(reference_llama(), tmp_path / "ckpt")
    _rewrite_weights(folder, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch for model.layers.0.self_attn.k_proj.weight: "
                                              r"the model expects \[16, 32\], the checkpoint has \[32, 32\]"):
        herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


def test_config_disagreeing_with_weights(tmp_path):
    folder = save_reference(reference_llama(), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.embed_tokens.weight: the model expects \[100, 32\]"):
        herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "truncated_data"])
def test_corrupt_safetensors_is_a_clear_error(tmp_path, damage):
    folder = save_reference(reference_llama(), tmp_path / "ckpt")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "truncated_data":
        path.write_bytes(data[:-100])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64 + data[64:])
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated|not a safetensors"):
        herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


def test_index_naming_absent_shard(tmp_path):
    folder = save_reference(reference_llama(), tmp_path / "ckpt", max_shard_size="20KB")
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"names shards that are not there: {victim.name}"):
        herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path):
    folder = save_reference(reference_llama(), tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    # A pickle that would create a file if it were ever unpickled.
    canary = tmp_path / "unpickled"
    payload = f"cos\nsystem\n(S'touch {canary}'\ntR."
    (folder / "pytorch_model.bin").write_bytes(payload.encode())
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model.bin.*never unpickles.*safetensors"):
        herd.LlamaForCausalLM.from_pretrained(folder, progress=False)
    assert not canary.exists()


def test_no_weights_at_all(tmp_path):
    folder = save_reference(reference_llama(), tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model weights"):
        herd.LlamaForCausalLM.from_pretrained(folder, progress=False)


def test_unknown_arguments_and_unsupported_options(tmp_path):
    folder = save_reference(reference_llama(), tmp_path / "ckpt")
    with pytest.raises(TypeError, match="neither loading options nor config fields: colour"):
        herd.LlamaForCausalLM.from_pretrained(folder, colour="red", progress=False)
    with pytest.raises(ValueError, match="quant_method None, which herd does not load"):
        herd.LlamaForCausalLM.from_pretrained(folder, quantization_config={"bits": 4}, progress=False)
    with pytest.raises(NotImplementedError, match="load_in_4bit.*TorchAoConfig"):
        herd.LlamaForCausalLM.from_pretrained(folder, load_in_4bit=True, progress=False)
    with pytest.raises(ValueError, match="unknown attn_implementation 'flash'"):
        herd.LlamaForCausalLM.from_pretrained(folder, attn_implementation="flash", progress=False)
    with pytest.raises(ValueError, match="unknown dtype"):
        herd.LlamaForCausalLM.from_pretrained(folder, dtype="float99", progress=False)


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("10KiB") == 10 * 1024
    assert parse_size("200MB") == 200_000_000
    assert parse_size(123) == 123
    assert parse_size("8Gb") == 1_000_000_000  # a lowercase b counts bits, as transformers reads it
    for bad in ("lots", "5G", "1000", "-1GB"):
        with pytest.raises(ValueError, match=r"max_shard_size = .* is not a size"):
            parse_size(bad)


# --- memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_sharded_load_peaks_well_under_twice_the_model_size(tmp_path, dtype_name):
    """Loading streams tensors: peak resident memory grows by about the model, not twice it.

    The checkpoint is float32; loading it as bfloat16 converts tensor by tensor, so the float32
    copy never exists whole in memory either.
    """
    import transformers

    config = transformers.LlamaConfig(vocab_size=16000, hidden_size=768, intermediate_size=2048,
                                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)
    with torch.device("meta"):
        meta_model = transformers.LlamaForCausalLM(config)
    # Random tensors written straight to shards (building the model for real would cost the memory we measure).
    state = {name: torch.randn(p.shape) * 0.02 for name, p in meta_model.state_dict().items()}
    model_bytes = sum(t.numel() * 4 for t in state.values())
    folder = tmp_path / "big"
    folder.mkdir()
    herd.loading.save_checkpoint(state, folder, max_shard_size="20MB")
    config.save_pretrained(folder)
    del state
    # ru_maxrss is useless here (importing torch peaks higher than the load): sample the resident
    # size every millisecond in a thread while loading, relative to just before.
    script = textwrap.dedent(f"""
        import threading, time, torch, herd
        def rss():
            return int(open('/proc/self/statm').read().split()[1]) * 4096
        # The first module built on the meta device imports torch's meta kernels (~80 MB, once per
        # process, whatever the model's size): pay that before measuring.
        with torch.device("meta"):
            torch.nn.Embedding(2, 2)
        peak, done = [0], [False]
        def sample():
            while not done[0]:
                peak[0] = max(peak[0], rss())
                time.sleep(0.001)
        before = rss()
        thread = threading.Thread(target=sample)
        thread.start()
        model = herd.LlamaForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.{dtype_name}, progress=False)
        # Tensors may stay memory-mapped from the file until first read: read them all.
        total = sum(float(p.sum()) for p in model.parameters())
        done[0] = True
        thread.join()
        print(max(peak[0], rss()) - before)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peak_growth = int(result.stdout.strip().splitlines()[-1])
    loaded_bytes = model_bytes // 2 if dtype_name == "bfloat16" else model_bytes
    print(f"{dtype_name}: model {loaded_bytes / 1e6:.0f} MB, peak RSS grew {peak_growth / 1e6:.0f} MB")
    assert model_bytes > 250_000_000
    assert peak_growth > 0.8 * loaded_bytes  # the measurement does see the model being loaded
    assert peak_growth < 1.5 * loaded_bytes, f"peak grew {peak_growth / 1e6:.0f} MB for a {loaded_bytes / 1e6:.0f} MB model"


def test_save_pretrained_over_its_own_source_folder(tmp_path):
    # float32 weights stay memory-mapped from the source files; overwriting them must not corrupt the model.
    reference = reference_llama()
    folder = save_reference(reference, tmp_path / "ckpt")
    model = herd.LlamaForCausalLM.from_pretrained(folder, progress=False)
    model.save_pretrained(folder, max_shard_size="20KB")
    with torch.no_grad():
        expected = reference(_ids()).logits
        assert max_abs_diff(model(_ids()).logits, expected) < TOL
        again = herd.LlamaForCausalLM.from_pretrained(folder, progress=False)
        assert max_abs_diff(again(_ids()).logits, expected) < TOL
    assert not (folder / "model.safetensors").exists()  # the old single file is gone, the shards replace it


def test_per_expert_linears_read_as_stacked_experts_in_any_slice(tmp_path):
    """loading.StackedExperts over two shards: gate/up/down Linears (out, in) of 3 experts, one
    with a per-tensor scale, read as (experts, in, out) stacks and their (experts, 1, out) scales;
    any slice (experts, input rows, columns across gate and up) equals the same slice of the
    stacks built by hand, and only the per-expert keys of stacks the model holds are taken."""
    from safetensors import safe_open

    from herd.loading import StackedExperts, expert_stacks

    generator = torch.Generator().manual_seed(0)
    hidden, inter, experts = 6, 4, 3
    prefix = "model.layers.1.feed_forward.experts"
    tensors = {}
    for e in range(experts):
        for projection, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            tensors[f"{prefix}.{e}.{projection}_proj.weight"] = torch.randn(shape, generator=generator)
            rows = shape[0]
            scale = torch.rand(1, generator=generator) if e == 1 else torch.rand(rows, 1, generator=generator)
            tensors[f"{prefix}.{e}.{projection}_proj.weight_scale"] = scale
    keys = sorted(tensors)
    files = {tmp_path / "a.safetensors": keys[: len(keys) // 2], tmp_path / "b.safetensors": keys[len(keys) // 2:]}
    for path, part in files.items():
        save_file({key: tensors[key] for key in part}, str(path))
    held = {f"{prefix}.gate_up_proj", f"{prefix}.down_proj", f"{prefix}.gate_up_proj_scale", f"{prefix}.down_proj_scale"}
    stacks = expert_stacks(files, lambda key: key in held)
    assert set(stacks) == held
    assert expert_stacks(files, lambda key: False) == {}  # a model without stacked experts: keys left alone

    def by_hand(name: str, tensor: str) -> torch.Tensor:
        parts = [("down",)] if name == "down_proj" else [("gate", "up")]
        out = []
        for e in range(experts):
            columns = []
            for projection in parts[0]:
                value = tensors[f"{prefix}.{e}.{projection}_proj.{tensor}"]
                rows = tensors[f"{prefix}.{e}.{projection}_proj.weight"].shape[0]
                columns.append(value.t() if tensor == "weight" else value.reshape(1, -1).expand(1, rows))
            out.append(torch.cat(columns, dim=1))
        return torch.stack(out)

    readers = {path: safe_open(str(path), framework="pt") for path in files}
    reader = StackedExperts(stacks, readers)
    for name in ("gate_up_proj", "down_proj"):
        for suffix, tensor in (("", "weight"), ("_scale", "weight_scale")):
            stacked = reader.get_slice(f"{prefix}.{name}{suffix}")
            expected = by_hand(name, tensor)
            assert list(expected.shape) == stacked.get_shape()
            assert torch.equal(reader.get_tensor(f"{prefix}.{name}{suffix}"), expected)
            width = expected.shape[2]
            for index in [(slice(None), slice(None), slice(1, width - 1)), (slice(1, 3),), (slice(None), slice(0, 1)),
                          (slice(None), slice(None), slice(width // 2, width))]:
                assert torch.equal(stacked[index], expected[index]), (name, suffix, index)
