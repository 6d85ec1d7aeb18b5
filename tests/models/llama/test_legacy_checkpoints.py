"""Llama 1 / Llama 2 era checkpoints and the task heads, against transformers (the oracle).

What the other Llama tests leave out: config.json as transformers 4.2x/4.3x wrote it (Llama 1's
pad_token_id -1 and max_sequence_length, float16, no rope_theta, no num_key_value_heads, no head_dim),
the legacy ways of extending a context (`from_pretrained(..., rope_scaling=...)`,
`config.rope_scaling = ...`, `rope_theta=`), dynamic NTK frequencies far past the trained length
(exact, as the reference computes them), longrope models cast to 16 bits after loading, labels
given to from_pretrained, the heads' tuples and losses, sharded checkpoints both ways.
"""

from __future__ import annotations

import json

import pytest
import torch

import herd
from tests.conftest import max_abs_diff, randomize_norms_and_biases

transformers = pytest.importorskip("transformers")

TOL = 1e-5
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)


def _checkpoint(folder, cls_name="LlamaForCausalLM", edit=None, dtype=None, **overrides):
    """A tiny transformers checkpoint in `folder`; `edit(config_dict)` then rewrites its config.json."""
    torch.manual_seed(0)
    model = randomize_norms_and_biases(getattr(transformers, cls_name)(transformers.LlamaConfig(**{**BASE, **overrides})))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    if edit is not None:
        path = folder / "config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    return folder


def _pair(folder, cls_name="LlamaForCausalLM", **kwargs):
    reference = getattr(transformers, cls_name).from_pretrained(folder, **kwargs).eval()
    ours = getattr(herd, cls_name).from_pretrained(folder, progress=False, **kwargs)
    return reference, ours


def _ids(batch=2, seq=12, seed=1):
    return torch.randint(3, BASE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def _flat(output):
    """A model output or tuple as a flat list of tensors (caches by their length only)."""
    items = output.to_tuple() if hasattr(output, "to_tuple") else output
    flat = []
    for item in items:
        if isinstance(item, (tuple, list)):
            flat.extend(_flat(item))
        elif torch.is_tensor(item):
            flat.append(item)
        else:  # a cache
            flat.append(f"cache of {item.get_seq_length()}")
    return flat


def _assert_same_outputs(got, expected, tol=TOL):
    got, expected = _flat(got), _flat(expected)
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected):
        if torch.is_tensor(theirs):
            assert torch.is_tensor(ours) and ours.shape == theirs.shape
            assert max_abs_diff(ours, theirs) < tol
        else:
            assert ours == theirs


# --- config.json of the Llama 1 / Llama 2 era ---------------------------------------------------------


def _as_written_by_4x(**keys):
    """config.json as transformers 4.2x/4.3x wrote it: no rope_parameters, head_dim or dtype."""
    def edit(config):
        for key in ("rope_parameters", "head_dim", "dtype"):
            config.pop(key, None)
        config.update(keys)
    return edit


def _llama1(config):
    # decapoda-style Llama 1 conversion: pad -1, max_sequence_length, float16, bos 0 / eos 1, no kv heads
    for key in ("rope_parameters", "head_dim", "dtype", "num_key_value_heads", "max_position_embeddings",
                "pretraining_tp", "attention_bias", "mlp_bias", "tie_word_embeddings", "attention_dropout"):
        config.pop(key, None)
    config.update(architectures=["LLaMAForCausalLM"], bos_token_id=0, eos_token_id=1, pad_token_id=-1,
                  max_sequence_length=2048, torch_dtype="float16", transformers_version="4.27.0.dev0")


LEGACY_FILES = {
    "llama1": (dict(num_key_value_heads=4), _llama1),
    "llama2_linear_type_key": (dict(), _as_written_by_4x(rope_scaling={"type": "linear", "factor": 2.0},
                                                         pretraining_tp=2, torch_dtype="float32")),
    "llama2_dynamic_no_theta": (dict(), _as_written_by_4x(rope_scaling={"type": "dynamic", "factor": 2.0})),
    "null_and_list_ids_extra_keys": (dict(), _as_written_by_4x(bos_token_id=None, eos_token_id=[2, 5],
                                                               pad_token_id=None, model_parallel=False, foo="bar")),
    "float16_biases_tied": (dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
                            _as_written_by_4x(torch_dtype="float16")),
}


@pytest.mark.parametrize("case", list(LEGACY_FILES))
def test_legacy_config_json_loads_as_the_reference(tmp_path, case):
    overrides, edit = LEGACY_FILES[case]
    folder = _checkpoint(tmp_path, edit=edit, **overrides)
    reference, ours = _pair(folder)
    assert ours.dtype == reference.dtype  # dtype "auto": the file's torch_dtype
    ids = _ids(seq=40)  # past max_position_embeddings (32): dynamic NTK grows
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, reference(ids).logits) < (TOL if ours.dtype == torch.float32 else 1e-3)
    greedy = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids[:, :8], **greedy), reference.generate(ids[:, :8], **greedy))


# --- legacy ways to change the rope after loading -----------------------------------------------------


@pytest.fixture(scope="module")
def llama2_folder(tmp_path_factory):
    # a Llama 2 style file: top-level rope_theta, no rope_scaling
    return _checkpoint(tmp_path_factory.mktemp("llama2"), edit=_as_written_by_4x(rope_theta=50000.0, rope_scaling=None))


@pytest.mark.parametrize("how", ["from_pretrained_argument", "config_attribute", "autoconfig_argument"])
@pytest.mark.parametrize("scaling", [{"type": "dynamic", "factor": 2.0}, {"type": "linear", "factor": 4.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8}])
def test_rope_scaling_given_at_load_equals_it_in_config_json(llama2_folder, tmp_path, how, scaling):
    """How Llama 2 contexts were extended. transformers 5.17 fails on the first two (KeyError 'rope_type');
    the oracle is the same rope_scaling written into config.json."""
    if how == "from_pretrained_argument":
        ours = herd.LlamaForCausalLM.from_pretrained(llama2_folder, rope_scaling=dict(scaling), progress=False)
    elif how == "config_attribute":
        config = herd.AutoConfig.from_pretrained(llama2_folder)
        config.rope_scaling = dict(scaling)
        ours = herd.LlamaForCausalLM.from_pretrained(llama2_folder, config=config, progress=False)
    else:
        config = herd.AutoConfig.from_pretrained(llama2_folder, rope_scaling=dict(scaling))
        ours = herd.LlamaForCausalLM.from_pretrained(llama2_folder, config=config, progress=False)
    edited = _checkpoint(tmp_path, edit=_as_written_by_4x(rope_theta=50000.0, rope_scaling=dict(scaling)))
    reference = transformers.LlamaForCausalLM.from_pretrained(edited).eval()
    assert ours.config.rope_theta == 50000.0  # the model's theta stays
    ids = _ids(batch=1, seq=48)
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, reference(ids).logits) < TOL


def test_rope_theta_given_at_load_and_scaling_reset(llama2_folder, tmp_path):
    ours = herd.LlamaForCausalLM.from_pretrained(llama2_folder, rope_theta=1000.0, progress=False)
    reference = transformers.LlamaForCausalLM.from_pretrained(
        _checkpoint(tmp_path, edit=_as_written_by_4x(rope_theta=1000.0))).eval()
    ids = _ids(batch=1, seq=20)
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, reference(ids).logits) < TOL
    config = herd.LlamaConfig(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=7.0)
    config.rope_scaling = None
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 7.0}


# --- rope frequencies the reference computes in float32 tensors, or in the module's dtype ----------


@pytest.mark.parametrize("theta, head_dim, trained, factor, length", [
    (10000.0, 128, 4096, 2.0, 40963), (500000.0, 128, 8192, 3.0, 8193), (10000.0, 8, 32, 2.0, 39)])
def test_dynamic_ntk_past_the_trained_length_is_the_reference_exactly(theta, head_dim, trained, factor, length):
    """The grown base is computed from the (tensor) length of the call, in float32, as there; Python
    float64 arithmetic was an ulp off at these lengths (an angle error of 1e-3 rad at 40k positions)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from herd.layers.rope import RotaryEmbedding

    config = dict(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=trained,
                  rope_parameters={"rope_type": "dynamic", "factor": factor, "rope_theta": theta})
    reference = LlamaRotaryEmbedding(transformers.LlamaConfig(**config))
    ours_config = herd.LlamaConfig(**config)
    ours = RotaryEmbedding(ours_config.rope_parameters, ours_config.head_dim, trained)  # as LlamaModel builds it
    position_ids = torch.arange(length - 3, length)[None]
    expected = reference(torch.zeros(1, 3, head_dim), position_ids)
    got = ours(position_ids, torch.float32)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_longrope_model_cast_after_loading_matches_reference(tmp_path, dtype):
    """model.half(): the reference's short longrope frequencies are a buffer, cast with the model; herd
    recomputed them in float32 (cos off by 5e-2 at 60 positions)."""
    half = 8
    folder = _checkpoint(tmp_path, hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                         rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                          "original_max_position_embeddings": 64,
                                          "short_factor": [1.0 + i / 8 for i in range(half)],
                                          "long_factor": [2.0 + i / 4 for i in range(half)]})
    reference, ours = _pair(folder)
    reference, ours = reference.to(dtype), ours.to(dtype)
    for length in (60, 80):  # the short factors, then the long ones
        position_ids = torch.arange(length)[None]
        expected = reference.model.rotary_emb(torch.zeros(1, length, 16, dtype=dtype), position_ids)
        got = ours.model.rotary_emb(position_ids, dtype)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), length
        with torch.no_grad():
            ids = _ids(batch=1, seq=length)
            assert torch.equal(ours(ids).logits, reference(ids).logits), length


# --- labels and the heads ----------------------------------------------------------------------------


def test_num_labels_argument_replaces_the_files_labels(tmp_path):
    folder = _checkpoint(tmp_path, "LlamaForSequenceClassification", num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    for load in (lambda lib: lib.AutoConfig.from_pretrained(folder, num_labels=5),
                 lambda lib: lib.LlamaConfig.from_dict(json.loads((folder / "config.json").read_text()), num_labels=5)):
        ours, reference = load(herd), load(transformers)
        assert ours.num_labels == reference.num_labels == 5
        assert ours.id2label == reference.id2label and ours.label2id == reference.label2id
    same = herd.AutoConfig.from_pretrained(folder, num_labels=3)
    assert same.id2label == {0: "a", 1: "b", 2: "c"}


def test_single_label_classification_with_one_label_is_refused():
    for lib in (herd, transformers):
        with pytest.raises(ValueError, match="num_labels"):
            lib.LlamaConfig(problem_type="single_label_classification", num_labels=1)


@pytest.fixture(scope="module")
def padded_batch():
    ids = _ids(batch=3, seq=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("return_dict", [True, False])
def test_heads_outputs_and_tuples_match_reference(tmp_path, padded_batch, attn, return_dict):
    ids, mask = padded_batch
    eager = attn == "eager"
    common = dict(attention_mask=mask, return_dict=return_dict, output_hidden_states=True, output_attentions=eager)
    cases = {
        "LlamaForSequenceClassification": dict(labels=torch.tensor([0, 2, 1])),
        "LlamaForQuestionAnswering": dict(start_positions=torch.tensor([[1], [3], [100]]), end_positions=torch.tensor([4, -1, 7])),
        "LlamaForTokenClassification": dict(labels=torch.randint(0, 3, (3, 8)).masked_fill(mask == 0, -100)),
        "LlamaForCausalLM": dict(labels=ids.masked_fill(mask == 0, -100), logits_to_keep=0),
        "LlamaModel": dict(),
    }
    for cls_name, extra in cases.items():
        folder = _checkpoint(tmp_path / cls_name, cls_name, num_labels=3)
        reference, ours = _pair(folder, cls_name, attn_implementation=attn)
        with torch.no_grad():
            _assert_same_outputs(ours(ids, **common, **extra), reference(ids, **common, **extra))


@pytest.mark.parametrize("problem_type, labels", [
    (None, torch.tensor([[0.5], [-1.0], [2.0]])),  # one label: regression, labels (batch, 1)
    (None, torch.tensor([1, 0, 2])),  # long labels with one output: regression too
    ("regression", torch.tensor([0.1, 0.2, 0.3])),
])
def test_sequence_regression_losses_match_reference(tmp_path, padded_batch, problem_type, labels):
    ids, mask = padded_batch
    folder = _checkpoint(tmp_path, "LlamaForSequenceClassification", num_labels=1, problem_type=problem_type)
    reference, ours = _pair(folder, "LlamaForSequenceClassification")
    with torch.no_grad():
        got, expected = ours(ids, attention_mask=mask, labels=labels), reference(ids, attention_mask=mask, labels=labels)
    assert abs(got.loss.item() - expected.loss.item()) < TOL
    assert ours.config.problem_type == reference.config.problem_type


@pytest.mark.parametrize("pad_token_id", [5, -1])
def test_sequence_classification_pad_ids_anywhere(tmp_path, pad_token_id):
    """A pad id inside a row, a row of pads only, and Llama 1's pad -1 (never in the input: the last token)."""
    folder = _checkpoint(tmp_path, "LlamaForSequenceClassification", num_labels=2, pad_token_id=pad_token_id)
    reference, ours = _pair(folder, "LlamaForSequenceClassification")
    ids = _ids(batch=3, seq=6)
    ids[0, 2] = 5
    ids[1, -2:] = 5
    ids[2, :] = 5
    with torch.no_grad():
        assert max_abs_diff(ours(ids).logits, reference(ids).logits) < TOL


# --- weights: 16-bit files, shards both ways -------------------------------------------------------


def test_sharded_float16_checkpoint_both_ways(tmp_path):
    folder = _checkpoint(tmp_path / "ref", dtype=torch.float16, tie_word_embeddings=True)
    transformers.LlamaForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    reference, ours = _pair(tmp_path / "sharded", low_cpu_mem_usage=True)
    assert ours.dtype == reference.dtype == torch.float16
    ids = _ids()
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.equal(ours(ids).logits, expected)
    ours.save_pretrained(tmp_path / "ours", max_shard_size="10KB")
    assert len(list((tmp_path / "ours").glob("model-*.safetensors"))) > 1
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert again.dtype == torch.float16 and again.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(again(ids).logits, expected)
