"""Shared pieces of the differential fuzz: strategies for tiny configs and inputs, model pairs, comparisons.

The tests of the areas where issue 19 found differences say which item they cover.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile

import torch
from hypothesis import strategies as st

TOL = 1e-4
PAD, BOS, EOS = 0, 1, 2

ACTIVATIONS = ["silu", "gelu", "relu"]  # drawn in every Llama config
MORE_ACTIVATIONS = ["relu2", "mish", "gelu_fast", "gelu_new", "leaky_relu", "quick_gelu", "gelu_pytorch_tanh"]  # item 5


def seeds():
    return st.integers(0, 2**16)


# ---------------------------------------------------------------- Llama configs


@st.composite
def rope_parameters(draw, head_dim: int):
    kind = draw(st.sampled_from(["default", "linear", "dynamic", "yarn", "longrope", "llama3"]))
    theta = draw(st.sampled_from([10000.0, 500000.0]))
    rope = {"rope_type": kind, "rope_theta": theta}
    if kind in ("linear", "dynamic"):
        rope["factor"] = draw(st.sampled_from([1.5, 2.0, 4.0]))
    elif kind == "yarn":
        rope.update(factor=draw(st.sampled_from([2.0, 4.0])), original_max_position_embeddings=16)
        if draw(st.booleans()):
            rope.update(beta_fast=draw(st.sampled_from([16.0, 32.0])), beta_slow=draw(st.sampled_from([1.0, 2.0])))
    elif kind == "longrope":
        half = head_dim // 2
        factor = st.floats(1.0, 4.0, allow_nan=False).map(lambda x: round(x, 2))
        rope.update(original_max_position_embeddings=16, short_factor=draw(st.lists(factor, min_size=half, max_size=half)),
                    long_factor=draw(st.lists(factor, min_size=half, max_size=half)))
    elif kind == "llama3":
        low = draw(st.sampled_from([1.0, 2.0]))
        rope.update(factor=draw(st.sampled_from([2.0, 8.0])), low_freq_factor=low,
                    high_freq_factor=low + draw(st.sampled_from([1.0, 3.0])), original_max_position_embeddings=16)
    return rope


@st.composite
def llama_configs(draw, activations=ACTIVATIONS, vocab=(32, 64, 128)):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    return dict(
        vocab_size=draw(st.sampled_from(vocab)),
        hidden_size=draw(st.sampled_from([16, 32, 48, 64])),
        intermediate_size=draw(st.sampled_from([16, 32, 64])),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=32,
        rope_parameters=draw(rope_parameters(head_dim)),
        attention_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        hidden_act=draw(st.sampled_from(activations)),
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])),
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )


@st.composite
def llama4_configs(draw):
    heads = draw(st.sampled_from([2, 4]))
    kv = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0]))
    layers = draw(st.integers(1, 3))
    experts = draw(st.sampled_from([1, 2, 4]))
    config = dict(
        vocab_size=draw(st.sampled_from([32, 64, 128])),
        hidden_size=draw(st.sampled_from([16, 32])),
        intermediate_size=draw(st.sampled_from([16, 32])),
        intermediate_size_mlp=draw(st.sampled_from([24, 48])),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=draw(st.sampled_from([4, 8])),
        num_local_experts=experts,
        num_experts_per_tok=draw(st.integers(1, min(2, experts))),
        interleave_moe_layer_step=draw(st.sampled_from([1, 2])),
        attention_chunk_size=draw(st.sampled_from([4, 8, 16])),
        use_qk_norm=draw(st.booleans()),
        attn_temperature_tuning=draw(st.booleans()),
        floor_scale=draw(st.sampled_from([4, 8192])),
        attn_scale=draw(st.sampled_from([0.1, 0.5])),
        max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    if draw(st.booleans()):  # explicit pattern (1: the layer uses rope); else transformers' default (every 4th NoPE)
        config["no_rope_layers"] = draw(st.lists(st.sampled_from([0, 1]), min_size=layers, max_size=layers))
    if draw(st.booleans()):
        config["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                     "rope_theta": 500000.0}
    return config


# ---------------------------------------------------------------- model pairs


def _randomize(model, gates=False):
    """Random norms, biases (and Mllama's gates) so that a wrong or missing one shows in the outputs."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if gates and "gate" in name and parameter.numel() == 1:
                parameter.uniform_(-1.0, 1.0)
            elif name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return model.eval()


class Pair:
    """A transformers model (the oracle) and herd's model loaded from its save_pretrained folder."""

    def __init__(self, reference, ours, folder):
        self._pristine = copy.deepcopy(reference)
        self.reference, self.ours, self.folder = reference, ours, folder

    def fresh_reference(self):
        """A reference with no state from earlier calls (transformers' dynamic rope keeps some: issue 19 item 8)."""
        return copy.deepcopy(self._pristine)


@contextlib.contextmanager
def model_pair(kind: str, config: dict, seed: int = 0, attn: str = "sdpa", **vision):
    import transformers

    import herd

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    if kind == "llama":
        reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
        ours_cls = herd.LlamaForCausalLM
    elif kind == "llama4":
        reference = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**config))
        ours_cls = herd.Llama4ForCausalLM
    else:
        reference = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(
            text_config=config, vision_config=vision["vision_config"], image_token_index=vision["image_token_index"]))
        ours_cls = herd.MllamaForConditionalGeneration
    _randomize(reference, gates=kind == "mllama")
    with tempfile.TemporaryDirectory(prefix="herd-fuzz-") as folder:
        reference.save_pretrained(folder)
        ours = ours_cls.from_pretrained(folder, attn_implementation=attn, progress=False)
        yield Pair(reference, ours, folder)


# ---------------------------------------------------------------- inputs


@st.composite
def left_padded(draw, vocab: int, max_batch=3, max_len=20, padded=None, low=3):
    """(ids, mask): rows of different lengths, left padded with PAD (mask 0)."""
    batch = draw(st.integers(1, max_batch))
    width = draw(st.integers(1, max_len))
    pad = draw(st.booleans()) if padded is None else padded
    lengths = [draw(st.integers(1, width)) if pad else width for _ in range(batch)]
    if pad and batch > 1 and max(lengths) == width and min(lengths) == width and width > 1:
        lengths[0] = width - 1
    generator = torch.Generator().manual_seed(draw(seeds()))
    ids = torch.full((batch, width), PAD)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(low, vocab, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask


# ---------------------------------------------------------------- comparisons


def max_abs_diff(a, b) -> float:
    if a.numel() == 0 and b.numel() == 0:
        return 0.0
    return (a.detach().float() - b.detach().float()).abs().max().item()


def assert_close(got, expected, tol=TOL, what="logits"):
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    diff = max_abs_diff(got, expected)
    assert diff < tol, f"{what}: max abs diff {diff:.3g} >= {tol}"


def assert_scores_close(got, expected, tol=TOL, what="scores"):
    """Processed scores: the same -inf (filtered) entries, and close finite values."""
    assert len(got) == len(expected), f"{what}: {len(got)} steps != {len(expected)}"
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape, f"{what}[{step}]: shape {tuple(a.shape)} != {tuple(b.shape)}"
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), f"{what}[{step}]: filtered entries differ"
        assert torch.equal(a[~finite], b[~finite]), f"{what}[{step}]: infinities differ"
        assert_close(a[finite], b[finite], tol, f"{what}[{step}]")
