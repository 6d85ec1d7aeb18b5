"""Differential fuzz of Llama's prompt pass (decoding/plans/llama.py, `LlamaPlan.prefilling`):
random tiny Llama configs and left-padded prompts fed in pieces, the pass against the reference
forward (herd's modeling_llama, the same weights) in float32 on the CPU: every real position's
logits and every layer's cached keys/values, to the fused matmuls' rounding (1e-5). The kernels
of kernels/prefill.py run in Triton's interpreter here (tests/conftest.py sets it; the test turns
on prefill.INTERPRET_ON_CPU), where their shapes let them (rotary: head_dim a power of two of at
least 16; below that, torch's code).

Plus one config drawn by hand, checked against transformers' own forward (the oracle).

Derandomized (the same examples on every run, no example database) so that CI is reproducible;
30 examples, so that the file runs in about 25 s on a 2-core CPU (the pass's kernels in Triton's
interpreter take most of it). A run that finds a mismatch shrinks it and prints the config and
inputs (and a blob for @reproduce_failure).
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import herd
from herd.cache import DynamicCache
from herd.decoding.decoders import fast_decoder, forward_tokens, positions_from_mask
from herd.decoding.plans import llama as llama_plan
from herd.kernels import prefill as prefill_kernels
from tests.conftest import reference_llama, save_reference

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB = 128  # tests/conftest.py's TINY_LLAMA
MAX_POSITIONS = 64
MAX_WIDTH = 10  # prompt length, padding included (Triton's interpreter runs one program per token)

FUZZ = settings(
    max_examples=30,
    derandomize=True,  # the same examples on every run (CI), whatever the profile loaded
    database=None,  # nothing written: a read-only checkout runs it too
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------- strategies


@st.composite
def rope_parameters(draw):
    """None (the default rope) or valid llama3 / linear / yarn parameters."""
    kind = draw(st.sampled_from([None, "llama3", "linear", "yarn"]), label="rope type")
    if kind is None:
        return None
    rope = {"rope_type": kind, "rope_theta": draw(st.sampled_from([10000.0, 500000.0]), label="rope theta")}
    if kind == "linear":
        rope["factor"] = draw(st.sampled_from([1.5, 2.0, 4.0]), label="factor")
    elif kind == "llama3":
        low = draw(st.sampled_from([1.0, 2.0]), label="low_freq_factor")
        rope.update(factor=draw(st.sampled_from([2.0, 8.0]), label="factor"), low_freq_factor=low,
                    high_freq_factor=low + draw(st.sampled_from([1.0, 3.0]), label="high - low"),
                    original_max_position_embeddings=draw(st.sampled_from([8, 16, 32]), label="original"))
    else:  # yarn: factor = max_position_embeddings / original_max_position_embeddings (as transformers expects)
        factor = draw(st.sampled_from([2.0, 4.0]), label="factor")
        rope.update(factor=factor, original_max_position_embeddings=int(MAX_POSITIONS / factor))
        if draw(st.booleans(), label="yarn betas"):
            rope.update(beta_fast=draw(st.sampled_from([16.0, 32.0])), beta_slow=draw(st.sampled_from([1.0, 2.0])))
        extra = draw(st.sampled_from([None, "attention_factor", "mscale"]), label="yarn scaling")
        if extra == "attention_factor":
            rope["attention_factor"] = draw(st.sampled_from([0.8, 1.3]))
        elif extra == "mscale":
            rope.update(mscale=draw(st.sampled_from([0.5, 1.0])), mscale_all_dim=draw(st.sampled_from([0.7, 1.0])))
    return rope


@st.composite
def llama_configs(draw):
    """Overrides of tests/conftest.py's TINY_LLAMA (transformers.LlamaConfig keywords)."""
    kind = draw(st.sampled_from(["mha", "gqa", "mqa"]), label="attention kind")
    if kind == "mha":
        heads = draw(st.sampled_from([1, 2, 3, 4]), label="heads")
        kv_heads = heads
    elif kind == "gqa":
        heads = draw(st.sampled_from([4, 6, 8]), label="heads")
        kv_heads = draw(st.sampled_from([d for d in range(2, heads) if heads % d == 0]), label="kv heads")
    else:
        heads, kv_heads = draw(st.sampled_from([2, 3, 4, 8]), label="heads"), 1
    head_dim = draw(st.sampled_from([8, 16, 32]), label="head_dim")
    if draw(st.booleans(), label="hidden = heads * head_dim"):
        hidden = heads * head_dim
    else:  # head_dim explicit, not hidden_size / heads (which transformers wants a whole number)
        widths = [h for h in (16, 24, 32, 48, 64, 96) if h % heads == 0 and h != heads * head_dim]
        hidden = draw(st.sampled_from(widths), label="hidden")
    config = dict(
        hidden_size=hidden,
        intermediate_size=draw(st.sampled_from([16, 40, 64, 96]), label="intermediate"),
        num_hidden_layers=draw(st.integers(1, 3), label="layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        attention_bias=draw(st.booleans(), label="attention_bias"),
        mlp_bias=draw(st.booleans(), label="mlp_bias"),
        hidden_act=draw(st.sampled_from(["silu", "gelu", "relu"]), label="hidden_act"),
        tie_word_embeddings=draw(st.booleans(), label="tie_word_embeddings"),
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5]), label="rms_norm_eps"),
        max_position_embeddings=MAX_POSITIONS,
    )
    rope = draw(rope_parameters(), label="rope")
    if rope is not None:
        config["rope_parameters"] = rope
    return config


@st.composite
def prompts(draw, vocab=VOCAB):
    """(ids, mask, pieces): 1-3 rows left padded by random amounts (never a whole row), and the
    ends of 1-3 pieces the prompt goes in as (each piece after the cache of those before)."""
    batch = draw(st.integers(1, 3), label="batch")
    width = draw(st.integers(1, MAX_WIDTH), label="width")
    pads = [draw(st.integers(0, width - 1), label=f"padding of row {row}") for row in range(batch)]
    count = draw(st.integers(1, min(3, width)), label="pieces")
    cuts = draw(st.lists(st.integers(1, width - 1), min_size=count - 1, max_size=count - 1, unique=True),
                label="piece ends") if count > 1 else []
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="ids seed"))
    ids = torch.randint(1, vocab, (batch, width), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad] = 0  # the pad token
        mask[row, :pad] = 0
    return ids, mask, tuple(sorted(cuts)) + (width,)


# ---------------------------------------------------------------- running both


@contextmanager
def herd_llama(overrides: dict, attn: str, seed: int = 0):
    """(transformers reference, herd model, its prepared plan) for a tiny random config."""
    reference = reference_llama(seed=seed, **overrides)
    with tempfile.TemporaryDirectory(prefix="herd-prefill-fuzz-") as folder:
        model = herd.LlamaForCausalLM.from_pretrained(save_reference(reference, Path(folder) / "llama"),
                                                      attn_implementation=attn)
        plan = fast_decoder(model).plan
        plan.prepare()
        yield reference, model, plan


def prefill(model, ids, mask, pieces, plan=None):
    """The prompt through forward_tokens in `pieces` (ends of each), the prompt pass around each
    where a plan is given: all positions' logits, and each layer's cached (keys, values). With a
    plan, checks that the pass's layers ran (not the reference's: weights it cannot take)."""
    cache, logits, start = DynamicCache(), [], 0
    layer_calls = []
    real_layer = llama_plan.llama_prefill_layer
    counting = mock.patch.object(llama_plan, "llama_prefill_layer",
                                 lambda *a, **k: layer_calls.append(1) or real_layer(*a, **k))
    # the kernels themselves, in Triton's interpreter (the library leaves CPU tensors to torch's code)
    interpreted = mock.patch.object(prefill_kernels, "INTERPRET_ON_CPU", True)
    with torch.no_grad(), counting, interpreted:
        for end in pieces:
            if plan is None:
                out = forward_tokens(model, ids[:, start:end], mask[:, :end], cache, logits_to_keep=0)
            else:
                with plan.prefilling():
                    out = forward_tokens(model, ids[:, start:end], mask[:, :end], cache, logits_to_keep=0)
            logits.append(out.logits)
            start = end
    expected_calls = len(pieces) * model.config.num_hidden_layers if plan is not None else 0
    assert len(layer_calls) == expected_calls, "the prompt pass did not run its own layers"
    return torch.cat(logits, dim=1), list(zip(cache.key_cache, cache.value_cache))


def assert_pass_equals_reference(model, plan, ids, mask, pieces):
    expected_logits, expected_cache = prefill(model, ids, mask, pieces)
    logits, cache = prefill(model, ids, mask, pieces, plan)
    real = mask.bool()  # padded positions' logits are read by nothing
    torch.testing.assert_close(logits[real], expected_logits[real], **TOL, msg=lambda m: f"logits: {m}")
    assert len(cache) == len(expected_cache) == model.config.num_hidden_layers
    for layer, ((keys, values), (expected_keys, expected_values)) in enumerate(zip(cache, expected_cache)):
        torch.testing.assert_close(keys, expected_keys, **TOL, msg=lambda m: f"layer {layer} keys: {m}")
        torch.testing.assert_close(values, expected_values, **TOL, msg=lambda m: f"layer {layer} values: {m}")


# ---------------------------------------------------------------- the fuzz


@FUZZ
@given(config=llama_configs(), attn=st.sampled_from(["sdpa", "eager"]), inputs=prompts(),
       seed=st.integers(0, 2**16))
def test_the_prompt_pass_equals_the_reference_forward_on_random_configs(config, attn, inputs, seed):
    ids, mask, pieces = inputs
    with herd_llama(config, attn, seed) as (_, model, plan):
        assert_pass_equals_reference(model, plan, ids, mask, pieces)


# ---------------------------------------------------------------- against transformers itself

BY_HAND = dict(
    hidden_size=48, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=6, num_key_value_heads=2, head_dim=16,  # GQA; head_dim 16, not 48 / 6
    attention_bias=True, mlp_bias=True, hidden_act="silu", tie_word_embeddings=True, rms_norm_eps=1e-5,
    max_position_embeddings=MAX_POSITIONS,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
)


def test_the_prompt_pass_equals_transformers_on_a_padded_prompt_in_two_pieces():
    ids = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 6)):  # row 2: the first piece is all padding
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    pieces = (5, 9)
    real = mask.bool()
    with herd_llama(BY_HAND, "sdpa", seed=3) as (reference, model, plan):
        logits, cache = prefill(model, ids, mask, pieces, plan)
        with torch.no_grad():
            expected = reference(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                                 use_cache=True)
    torch.testing.assert_close(logits[real], expected.logits[real], rtol=1e-4, atol=1e-4)
    for layer, (keys, values) in enumerate(cache):  # (batch, kv heads, seq, head_dim): real positions
        reference_layer = expected.past_key_values.layers[layer]
        torch.testing.assert_close(keys.transpose(1, 2)[real], reference_layer.keys.transpose(1, 2)[real],
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(values.transpose(1, 2)[real], reference_layer.values.transpose(1, 2)[real],
                                   rtol=1e-4, atol=1e-4)
