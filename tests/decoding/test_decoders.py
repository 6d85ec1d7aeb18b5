"""generate()'s decoders (decoding/decoders.py), the fast path's stores and plans.

On the CPU the same code runs uncompiled and uncaptured (FAST_DEVICES is widened for the test):
its tokens and logits must equal the plain path's. On CUDA (skipped without it): compiled and
captured, greedy tokens equal the plain path's in float32, bf16 logits agree within a stated
tolerance, and new prompt lengths / max_new_tokens do not recompile.
"""

from __future__ import annotations

import pytest
import torch

import herd
from herd.decoding import decoders, graphs
from herd.decoding.kv import ContiguousKV, DecodeKV, PrefillCache, RingKV
from tests.conftest import max_abs_diff, reference_llama, save_reference
from tests.models.llama4.test_modeling_llama4 import reference_llama4

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def fast_on_cpu(monkeypatch):
    monkeypatch.setattr(decoders, "FAST_DEVICES", ("cuda", "cpu"))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    reference = reference_llama(num_hidden_layers=3, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=1024)
    return save_reference(reference, tmp_path_factory.mktemp("fast") / "llama")


@pytest.fixture(scope="module")
def llama4_folder(tmp_path_factory):
    # 4 layers: MoE every other layer, the 4th a global NoPE layer; chunks of 8 tokens
    reference = reference_llama4(interleave_moe_layer_step=2, num_experts_per_tok=2, head_dim=16, floor_scale=4,
                                 num_hidden_layers=4, attention_chunk_size=8)
    folder = tmp_path_factory.mktemp("fast") / "llama4"
    reference.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama4_long_chunk_folder(tmp_path_factory):
    # chunks of 1024 positions: longer than the 256 and 512 buckets, so the ring is as long as the cache
    reference = reference_llama4(interleave_moe_layer_step=2, num_experts_per_tok=1, head_dim=16, floor_scale=4,
                                 num_hidden_layers=4, attention_chunk_size=1024, max_position_embeddings=2048)
    folder = tmp_path_factory.mktemp("fast") / "llama4-long-chunk"
    reference.save_pretrained(folder)
    return folder


def _prompts(batch: int, length: int, vocab: int = 128, seed: int = 0):
    ids = torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row in range(1, batch):  # left padding of different lengths
        mask[row, : (row * 3) % length] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _generate_both(model, ids, mask, **kwargs):
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None, **kwargs)
    fast_out = model.generate(ids, **kwargs)
    plain_out = model.generate(ids, disable_compile=True, **kwargs)
    return fast_out, plain_out


# --- buckets and the cache's bookkeeping ---------------------------------------------------------


@pytest.mark.parametrize("length, bucket", [(1, 256), (256, 256), (257, 512), (4096, 4096), (4097, 8192), (9000, 12288)])
def test_cache_buckets(length, bucket):
    assert graphs.cache_bucket(length) == bucket


def _ring_store(batch, ring, chunk, length=16):
    full = ContiguousKV([], batch, 1, 1, length, torch.float32, "cpu")
    ring_store = RingKV([0], batch, 1, 1, ring, chunk, torch.float32, "cpu")
    return DecodeKV(full, ring_store)


def test_fast_cache_ring_keeps_the_last_window_and_returns_window_plus_new():
    window = 4
    kv = _ring_store(1, window, window)
    cache = PrefillCache(kv)
    new = torch.arange(6.0).view(1, 1, 6, 1)  # positions 0..5 hold values 0..5
    returned, _ = cache.update(new, new, 0)
    assert returned.flatten().tolist() == [0, 1, 2, 3, 4, 5]
    # slots hold positions 2..5 at slot = position % 4
    assert kv.ring.keys[0].flatten().tolist() == [4, 5, 2, 3]
    assert cache.kv_length(0, 3) == 7 and cache.kv_offset(0) == 2
    returned, _ = cache.update(torch.full((1, 1, 3, 1), 9.0), torch.zeros(1, 1, 3, 1), 0)
    assert returned.flatten().tolist() == [2, 3, 4, 5, 9, 9, 9]
    kv.mark_prompt(torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1]]))
    assert kv.ring.positions.tolist() == [8, 5, 6, 7]


def test_decode_cache_masks_chunks_from_each_rows_first_real_token():
    window, length = 4, 16
    kv = _ring_store(2, window, window, length)
    # row 0: 6 real tokens (positions 0..5); row 1: 1 padding then 5 real tokens (positions 0..4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    kv.mark_prompt(mask)
    kv.begin_step(torch.tensor([6]), positions=torch.tensor([6, 5]))
    held = kv.ring.positions.tolist()  # slot -> cache position
    allowed = {row: sorted(held[s] for s in range(window) if kv.ring.allowed[row, s]) for row in range(2)}
    # row 0's token is position 6: its chunk (4..7) began at cache slot 4; row 1's token is
    # position 5 at cache slot 6: its chunk (4..7) began at cache slot 5.
    assert allowed == {0: [4, 5, 6], 1: [5, 6]}
    assert kv.full.real[1].tolist() == [False] + [True] * 6 + [False] * 9


# --- the fast path on the CPU (uncompiled, uncaptured) equals the plain path -------------------------


@pytest.mark.parametrize("batch, length, new", [(1, 5, 12), (3, 9, 20), (2, 1, 6)])
def test_llama_fast_path_tokens_equal_plain_path(fast_on_cpu, llama_folder, batch, length, new):
    model = herd.LlamaForCausalLM.from_pretrained(llama_folder, progress=False)
    ids, mask = _prompts(batch, length)
    fast_out, plain_out = _generate_both(model, ids, mask, max_new_tokens=new)
    assert torch.equal(fast_out, plain_out)
    assert decoders.fast_decoder(model).entry is not None  # the fast path really ran


def test_llama_fast_path_logits_equal_plain_path(fast_on_cpu, llama_folder):
    model = herd.LlamaForCausalLM.from_pretrained(llama_folder, progress=False)
    ids, mask = _prompts(3, 7)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None,
                  output_logits=True, output_scores=True, return_dict_in_generate=True)
    got = model.generate(ids, **kwargs)
    expected = model.generate(ids, disable_compile=True, **kwargs)
    assert len(got.logits) == len(expected.logits) == 10
    assert max(max_abs_diff(a, b) for a, b in zip(got.logits, expected.logits)) < 1e-5


def test_fused_weights_keep_the_checkpoint_layout(fast_on_cpu, llama_folder, tmp_path):
    model = herd.LlamaForCausalLM.from_pretrained(llama_folder, progress=False)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    memory = sum(p.numel() for p in model.parameters())
    model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3)
    attn = model.model.layers[0].self_attn
    # q/k/v now live in one tensor, and still read as before
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel() * 4
    assert sum(p.numel() for p in model.parameters()) == memory
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    model.save_pretrained(tmp_path / "saved")
    again = herd.LlamaForCausalLM.from_pretrained(tmp_path / "saved", progress=False)
    assert all(torch.equal(before[name], tensor) for name, tensor in again.state_dict().items())


def test_stopping_at_eos_trims_what_was_made_after_every_row_finished(fast_on_cpu, llama_folder, monkeypatch):
    model = herd.LlamaForCausalLM.from_pretrained(llama_folder, progress=False)
    ids, mask = _prompts(3, 6)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0,
                          eos_token_id=None, disable_compile=True)
    # make the token row 0 produces 4th the eos: rows stop at different steps
    eos = int(free[0, 6 + 3])
    for interval in (1, 4, 16):
        monkeypatch.setattr(decoders, "SYNC_INTERVAL", interval)
        kwargs = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=eos)
        got = model.generate(ids, **kwargs)
        expected = model.generate(ids, disable_compile=True, **kwargs)
        assert torch.equal(got, expected), interval


def test_plain_greedy_chooses_tokens_inside_the_step_and_agrees_with_per_token_choice(fast_on_cpu, llama_folder,
                                                                                       monkeypatch):
    """Greedy with nothing between the logits and the argmax runs greedy_steps (the argmax inside
    the captured step); with a processor in between (repetition penalty) it does not. Both equal
    the plain path, with two eos ids and a pad id that is neither."""
    model = herd.LlamaForCausalLM.from_pretrained(llama_folder, progress=False)
    ids, mask = _prompts(3, 5)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                          eos_token_id=None, disable_compile=True)
    eos = [int(free[1, 5 + 2]), int(free[2, 5 + 9])]
    calls = []
    original = decoders.FastDecoder.greedy_steps
    monkeypatch.setattr(decoders.FastDecoder, "greedy_steps", lambda self, *a: calls.append(a[1]) or original(self, *a))
    monkeypatch.setattr(decoders, "SYNC_INTERVAL", 4)
    for extra, in_graph in [({}, True), ({"repetition_penalty": 1.2}, False)]:
        calls.clear()
        kwargs = dict(attention_mask=mask, max_new_tokens=18, do_sample=False, pad_token_id=1, eos_token_id=eos, **extra)
        got = model.generate(ids, **kwargs)
        expected = model.generate(ids, disable_compile=True, **kwargs)
        assert torch.equal(got, expected), extra
        assert bool(calls) == in_graph
        assert all(steps <= 4 for steps in calls)


def test_sampling_with_a_seeded_generator_equals_the_plain_path(fast_on_cpu, llama_folder):
    model = herd.LlamaForCausalLM.from_pretrained(llama_folder, progress=False)
    ids, mask = _prompts(2, 5)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, temperature=0.8,
                  repetition_penalty=1.3, pad_token_id=0, eos_token_id=None)
    got = model.generate(ids, generator=torch.Generator().manual_seed(3), **kwargs)
    expected = model.generate(ids, generator=torch.Generator().manual_seed(3), disable_compile=True, **kwargs)
    assert torch.equal(got, expected)


def test_long_prompts_are_prefilled_in_chunks(fast_on_cpu, llama_folder, monkeypatch):
    monkeypatch.setattr(decoders, "PREFILL_CHUNK", 8)
    model = herd.LlamaForCausalLM.from_pretrained(llama_folder, progress=False)
    calls = []
    original = decoders.forward_tokens
    monkeypatch.setattr(decoders, "forward_tokens",
                        lambda model, tokens, *a, **k: calls.append(tokens.shape[1]) or original(model, tokens, *a, **k))
    ids, mask = _prompts(2, 21)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert calls == [8, 8, 5]
    monkeypatch.setattr(decoders, "forward_tokens", original)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                              eos_token_id=None, disable_compile=True)
    assert torch.equal(got, expected)


def test_the_fast_path_is_skipped_where_it_does_not_apply(fast_on_cpu, llama_folder, monkeypatch):
    model = herd.LlamaForCausalLM.from_pretrained(llama_folder, progress=False)
    config = herd.GenerationConfig(max_new_tokens=3)
    check = lambda **kw: decoders.why_not_fast(model, config, past_key_values=kw.get("cache"),
                                               extra_outputs=kw.get("extra", False))
    assert check() is None
    assert "cache" in check(cache=object())
    assert "attentions" in check(extra=True)
    config.disable_compile = True
    assert "disable_compile" in check()
    config.disable_compile = False
    monkeypatch.setenv("HERD_DISABLE_FAST_PATH", "1")
    assert "HERD_DISABLE_FAST_PATH" in check()
    monkeypatch.delenv("HERD_DISABLE_FAST_PATH")
    monkeypatch.setattr(decoders, "FAST_DEVICES", ("cuda",))
    assert "cpu" in check()


def test_llama4_fast_path_tokens_and_logits_equal_plain_path(fast_on_cpu, llama4_folder):
    model = herd.Llama4ForCausalLM.from_pretrained(llama4_folder, progress=False)
    ids, mask = _prompts(3, 11)
    # 25 new tokens cross several chunk boundaries of 8 positions
    kwargs = dict(attention_mask=mask, max_new_tokens=25, do_sample=False, pad_token_id=0, eos_token_id=None,
                  output_logits=True, return_dict_in_generate=True)
    got = model.generate(ids, **kwargs)
    expected = model.generate(ids, disable_compile=True, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert max(max_abs_diff(a, b) for a, b in zip(got.logits, expected.logits)) < 1e-5


def test_llama4_long_prompt_chunked_prefill_fills_the_ring(fast_on_cpu, llama4_folder, monkeypatch):
    monkeypatch.setattr(decoders, "PREFILL_CHUNK", 5)
    model = herd.Llama4ForCausalLM.from_pretrained(llama4_folder, progress=False)
    ids, mask = _prompts(2, 19)
    fast_out, plain_out = _generate_both(model, ids, mask, max_new_tokens=10)
    assert torch.equal(fast_out, plain_out)


def test_llama4_ring_longer_than_the_cache_is_cut_to_the_cache(fast_on_cpu, llama4_long_chunk_folder):
    model = herd.Llama4ForCausalLM.from_pretrained(llama4_long_chunk_folder, progress=False)
    ids, mask = _prompts(3, 13)
    fast_out, plain_out = _generate_both(model, ids, mask, max_new_tokens=15)
    assert torch.equal(fast_out, plain_out)
    kv = decoders.fast_decoder(model).entry.kv
    assert kv.ring.ring == 256 and kv.ring.chunk_size == 1024  # the 256-position bucket, not the chunk
    chunked = [keys.shape[2] for keys in kv.ring.keys.values()]
    assert chunked and set(chunked) == {256}


def test_a_ring_shorter_than_its_chunk_refuses_to_wrap():
    cache = PrefillCache(_ring_store(1, 4, 8, length=4))
    cache.update(torch.zeros(1, 1, 3, 1), torch.zeros(1, 1, 3, 1), 0)
    with pytest.raises(ValueError, match="ring holds 4 positions; 5"):
        cache.update(torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1), 0)


def test_routed_experts_equal_the_expert_loop(llama4_folder):
    from herd.kernels.routed_experts import routed_experts

    model = herd.Llama4ForCausalLM.from_pretrained(llama4_folder, progress=False)
    experts = model.model.layers[1].feed_forward.experts
    rows = torch.randn(6, experts.hidden_size)
    expert_ids = torch.tensor([3, 0, 3, 1, 2, 0])
    expected = torch.stack([experts.expert_forward(int(e), r[None])[0] for e, r in zip(expert_ids, rows)])
    got = routed_experts(rows, expert_ids, experts.gate_up_proj, experts.down_proj, experts.act_fn)
    assert max_abs_diff(got, expected) < 1e-5


# --- the FP8 KV cache on the fast path --------------------------------------------------------------


def _fp8_both(model, ids, mask, new, chunk):
    """Logits and tokens of the fast and the plain path, both with the FP8 KV cache, the prompt
    prefilled `chunk` tokens at a time."""
    kwargs = {"attention_mask": mask, "max_new_tokens": new, "do_sample": False, "pad_token_id": 0,
              "eos_token_id": None, "output_logits": True, "return_dict_in_generate": True,
              "cache_config": {"dtype": "fp8"}, "prefill_chunk_size": chunk}
    fast = model.generate(ids, **kwargs)
    plain = model.generate(ids, disable_compile=True, **kwargs)
    return fast, plain


def _assert_fp8_full_layers(model, full_layers):
    kv = decoders.fast_decoder(model).entry.kv
    assert sorted(kv.full.keys) == full_layers
    for index in full_layers:
        assert kv.full.keys[index].dtype == kv.full.values[index].dtype == torch.float8_e4m3fn
        assert kv.full.key_scales[index].dtype == torch.float32
        assert kv.full.key_scales[index].shape == kv.full.keys[index].shape[:3]  # a scale per (row, kv head, slot)
    return kv


def test_llama_fast_path_fp8_cache_equals_plain_fp8_cache(fast_on_cpu, llama_folder):
    """Left padding, a prompt of 21 prefilled 8 at a time: the fast path's FP8 cache gives the
    plain path's FP8-cache logits within float32 rounding, and the same tokens."""
    model = herd.LlamaForCausalLM.from_pretrained(llama_folder, progress=False)
    ids, mask = _prompts(3, 21)
    fast, plain = _fp8_both(model, ids, mask, new=10, chunk=8)
    assert torch.equal(fast.sequences, plain.sequences)
    assert max(max_abs_diff(a, b) for a, b in zip(fast.logits, plain.logits)) < 1e-5
    _assert_fp8_full_layers(model, [0, 1, 2])
    # it is not the float32 cache: the same generate() without cache_config gives other logits
    float32 = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                             eos_token_id=None, output_logits=True, return_dict_in_generate=True, prefill_chunk_size=8)
    assert max(max_abs_diff(a, b) for a, b in zip(float32.logits, fast.logits)) > 1e-4


def test_llama4_fast_path_fp8_cache_equals_plain_fp8_cache(fast_on_cpu, llama4_folder):
    """Llama 4: the global (NoPE) layer's keys/values in FP8, the chunked layers' rings in the
    model's dtype; a prompt of 19 prefilled 5 at a time, 14 new tokens across chunks of 8."""
    model = herd.Llama4ForCausalLM.from_pretrained(llama4_folder, progress=False)
    ids, mask = _prompts(3, 19)
    fast, plain = _fp8_both(model, ids, mask, new=14, chunk=5)
    assert torch.equal(fast.sequences, plain.sequences)
    assert max(max_abs_diff(a, b) for a, b in zip(fast.logits, plain.logits)) < 1e-5
    kv = _assert_fp8_full_layers(model, [3])
    assert all(keys.dtype == torch.float32 for keys in kv.ring.keys.values())


# --- on the GPU: compiled and captured ------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_fast_path_greedy_equals_plain_path_float32(llama_folder, llama4_folder, batch):
    torch.backends.cuda.matmul.allow_tf32 = False
    for cls, folder in ((herd.LlamaForCausalLM, llama_folder), (herd.Llama4ForCausalLM, llama4_folder)):
        model = cls.from_pretrained(folder, device_map="cuda", progress=False)
        ids, mask = _prompts(batch, 11)
        fast_out, plain_out = _generate_both(model, ids.cuda(), mask.cuda(), max_new_tokens=30)
        assert torch.equal(fast_out, plain_out), cls.__name__
        assert decoders.fast_decoder(model).captures >= 1


# Stated tolerance for bf16: the fast path's logits vs the plain path's, |diff| <= 0.02 * max |logit| + 0.05.
# Both round to bf16 at different points (fused matmuls, attention softmax in float32 on the scores).
BF16_TOLERANCE = (0.02, 0.05)


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "llama4"])
def test_cuda_fast_path_bf16_logits_within_tolerance(llama_folder, llama4_folder, family):
    cls, folder = (herd.LlamaForCausalLM, llama_folder) if family == "llama" else (herd.Llama4ForCausalLM, llama4_folder)
    model = cls.from_pretrained(folder, device_map="cuda", dtype=torch.bfloat16, progress=False)
    ids, mask = _prompts(3, 11)
    # Force the same tokens on both paths (the plain path's), so the logits compare position by position.
    plain = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, do_sample=False, pad_token_id=0,
                           eos_token_id=None, disable_compile=True, output_logits=True, return_dict_in_generate=True)
    decoder = decoders.fast_decoder(model)
    decoder.start(3, 64)
    with torch.no_grad():
        logits, _ = decoder.prefill(plain.sequences[:, :11], mask.cuda(), {})
        got = [logits]
        for step in range(11, 22):
            got.append(decoder.step(plain.sequences[:, step])[0])
    scale, offset = BF16_TOLERANCE
    for a, b in zip(got, plain.logits):
        assert max_abs_diff(a, b) <= scale * float(b.abs().max()) + offset
    print("bf16 max diff", max(max_abs_diff(a, b) for a, b in zip(got, plain.logits)))


# Stated tolerance for bf16 with the FP8 KV cache on both paths: twice BF16_TOLERANCE. The paths'
# bf16 keys/values differ by a rounding here and there, which an e4m3 rounding (a step of 1/8 of
# the value) can turn into a difference of one e4m3 step in a cached element.
FP8_BF16_TOLERANCE = (0.04, 0.1)


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "llama4"])
def test_cuda_fast_path_fp8_cache_bf16_logits_within_tolerance(llama_folder, llama4_folder, family):
    """The compiled, captured fast path with the FP8 cache (the q/k/v kernel's staged write, the
    attention kernel's FP8 loads) against the plain path's FP8 cache, teacher-forced, in bf16."""
    cls, folder = (herd.LlamaForCausalLM, llama_folder) if family == "llama" else (herd.Llama4ForCausalLM, llama4_folder)
    model = cls.from_pretrained(folder, device_map="cuda", dtype=torch.bfloat16, progress=False)
    ids, mask = _prompts(3, 11)
    plain = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, do_sample=False, pad_token_id=0,
                           eos_token_id=None, disable_compile=True, output_logits=True, return_dict_in_generate=True,
                           cache_config={"dtype": "fp8"})
    decoder = decoders.fast_decoder(model)
    decoder.kv_cache_dtype = torch.float8_e4m3fn
    decoder.start(3, 64)
    assert next(iter(decoder.entry.kv.full.keys.values())).dtype == torch.float8_e4m3fn
    with torch.no_grad():
        logits, _ = decoder.prefill(plain.sequences[:, :11], mask.cuda(), {})
        got = [logits]
        for step in range(11, 22):
            got.append(decoder.step(plain.sequences[:, step])[0])
    scale, offset = FP8_BF16_TOLERANCE
    for a, b in zip(got, plain.logits):
        assert max_abs_diff(a, b) <= scale * float(b.abs().max()) + offset
    print("fp8 cache bf16 max diff", max(max_abs_diff(a, b) for a, b in zip(got, plain.logits)))


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "llama4"])
def test_cuda_other_prompt_lengths_and_max_new_tokens_do_not_recompile(llama_folder, llama4_long_chunk_folder, family):
    import torch._dynamo

    cls, folder = (herd.LlamaForCausalLM, llama_folder) if family == "llama" else (herd.Llama4ForCausalLM, llama4_long_chunk_folder)
    model = cls.from_pretrained(folder, device_map="cuda", progress=False)
    # The first call compiles the decode step and the prefill's fused kernels (prompts of 64+ tokens).
    ids, mask = _prompts(1, 70)
    model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=5, do_sample=False)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert compiled >= 1
    for length, new in ((23, 40), (90, 100), (300, 100)):  # the last one moves to the 512 bucket
        ids, mask = _prompts(1, length, seed=length)
        model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new, do_sample=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled
    assert decoders.fast_decoder(model).captures == 2  # one graph per bucket, no recompile


@pytest.mark.parametrize("vocab", [1, 7, 256, 1000, 128256])
@pytest.mark.parametrize("batch", [1, 3])
def test_argmax_in_pieces_is_argmax(batch, vocab):
    """Random values, ties (the first index wins, across and within slices), -inf and NaN."""
    from herd.decoding.graphs import argmax_in_pieces

    torch.manual_seed(vocab)
    logits = torch.randn(batch, vocab)
    assert torch.equal(argmax_in_pieces(logits), logits.argmax(-1))
    tied = torch.randint(0, 3, (batch, vocab)).float()  # many equal maxima
    assert torch.equal(argmax_in_pieces(tied), tied.argmax(-1))
    masked = torch.full((batch, vocab), float("-inf"))
    assert torch.equal(argmax_in_pieces(masked), masked.argmax(-1))
    masked[:, -1] = 0.0
    assert torch.equal(argmax_in_pieces(masked), masked.argmax(-1))
    if vocab > 10:
        logits[:, vocab // 2] = float("nan")
        assert torch.equal(argmax_in_pieces(logits), logits.argmax(-1))


# --- cache_implementation and the choice of decoder ---------------------------------------------------


@pytest.mark.parametrize("implementation, cache_class", [(None, "DynamicCache"), ("dynamic", "DynamicCache"),
                                                         ("static", "StaticCache"), ("hybrid", "StaticCache")])
def test_cache_implementation_on_the_plain_path(llama4_folder, implementation, cache_class):
    """On the CPU: "dynamic" grows, "static" and "hybrid" preallocate (hybrid's chunked layers
    bounded), and every kind gives the same tokens."""
    model = herd.Llama4ForCausalLM.from_pretrained(llama4_folder, progress=False)
    ids, mask = _prompts(2, 11)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                         cache_implementation=implementation, return_dict_in_generate=True)
    assert type(out.past_key_values).__name__ == cache_class
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
    assert torch.equal(out.sequences, expected)


def test_where_the_fast_path_is_taken(fast_on_cpu, llama_folder):
    model = herd.LlamaForCausalLM.from_pretrained(llama_folder, progress=False)
    config = herd.GenerationConfig(max_new_tokens=3)
    for implementation in (None, "static", "hybrid"):
        config.cache_implementation = implementation
        assert decoders.why_not_fast(model, config, past_key_values=None, extra_outputs=False) is None
    config.cache_implementation = "dynamic"
    assert "dynamic" in decoders.why_not_fast(model, config, past_key_values=None, extra_outputs=False)
    chosen = decoders.choose_decoder(model, config, past_key_values=None, forward_kwargs={})
    assert isinstance(chosen, decoders.PlainDecoder)
    config.cache_implementation = "static"
    assert decoders.choose_decoder(model, config, past_key_values=None, forward_kwargs={}) is decoders.fast_decoder(model)


def test_no_plan_for_a_class_without_one(llama_folder):
    from herd.decoding.plans import plan_for

    model = herd.LlamaForSequenceClassification.from_pretrained(llama_folder, progress=False)
    assert plan_for(model) is None
    causal = herd.LlamaForCausalLM.from_pretrained(llama_folder, progress=False)
    subclass = type("MyLlama", (herd.LlamaForCausalLM,), {})
    causal.__class__ = subclass
    assert type(plan_for(causal)).__name__ == "LlamaPlan"  # subclasses keep their family's plan


def test_fusing_again_after_the_weights_were_replaced(fast_on_cpu, llama_folder):
    """A load or .to() after a fast generate() replaces the fused storage; the next call fuses again."""
    model = herd.LlamaForCausalLM.from_pretrained(llama_folder, progress=False)
    ids, mask = _prompts(2, 5)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    model.to(torch.float64)
    fast_out, plain_out = _generate_both(model, ids, mask, max_new_tokens=6)
    assert torch.equal(fast_out, plain_out)
    attn = model.model.layers[0].self_attn
    assert decoders.fast_decoder(model).plan.fused[0].qkv.weight.dtype == torch.float64
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel() * 8


@needs_cuda
def test_released_graphs_are_captured_again(llama_folder):
    """graphs.release_captured (what tensor parallel runs before destroy_process_group) frees every
    captured step; the next generate() captures again and gives the same tokens."""
    model = herd.LlamaForCausalLM.from_pretrained(llama_folder, device_map="cuda", progress=False)
    ids, mask = _prompts(2, 11)
    greedy = dict(attention_mask=mask.cuda(), max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    first = model.generate(ids.cuda(), **greedy)
    captures = decoders.fast_decoder(model).captures
    assert captures >= 1 and graphs.release_captured() >= 1
    assert torch.equal(model.generate(ids.cuda(), **greedy), first)
    assert decoders.fast_decoder(model).captures > captures
