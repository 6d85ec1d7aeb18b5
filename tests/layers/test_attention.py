"""The mask description and the three backends realising it."""

from __future__ import annotations

import pytest
import torch

from herd.layers.attention import AttentionMask, attention, build_attention_mask


def test_causal_mask_with_offset_and_padding_by_hand():
    padding = torch.tensor([[0, 1, 1, 1, 1]])
    mask = build_attention_mask(padding, batch_size=1, query_length=2, past_length=3, kv_length=5)
    expected = torch.tensor([[False, True, True, True, False], [False, True, True, True, True]])
    assert torch.equal(mask.boolean(torch.device("cpu"))[0, 0], expected)


def test_static_cache_columns_beyond_written_are_hidden():
    mask = build_attention_mask(torch.ones(1, 3), batch_size=1, query_length=1, past_length=2, kv_length=6)
    assert torch.equal(mask.boolean(torch.device("cpu"))[0, 0, 0], torch.tensor([True, True, True, False, False, False]))
    no_padding = build_attention_mask(None, batch_size=1, query_length=1, past_length=2, kv_length=6)
    assert not no_padding.is_plain_causal  # kv_length > seen: sdpa must get a mask


def test_plain_causal_needs_no_tensor():
    mask = build_attention_mask(torch.ones(2, 4), batch_size=2, query_length=4, past_length=0, kv_length=4)
    assert mask.is_plain_causal and mask.padding_mask is None


def test_packed_sequences_by_hand():
    position_ids = torch.tensor([[0, 1, 0, 1, 2]])
    mask = build_attention_mask(None, batch_size=1, query_length=5, past_length=0, kv_length=5, position_ids=position_ids)
    allowed = mask.boolean(torch.device("cpu"))[0, 0]
    assert allowed[3].tolist() == [False, False, True, True, False]
    assert allowed[1].tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("query_length,past", [(6, 0), (1, 5), (3, 4)])
def test_backends_agree_with_padding_and_gqa(query_length, past):
    torch.manual_seed(0)
    batch, heads, kv_heads, dim = 2, 4, 2, 8
    kv_length = past + query_length
    query = torch.randn(batch, heads, query_length, dim)
    key, value = torch.randn(batch, kv_heads, kv_length, dim), torch.randn(batch, kv_heads, kv_length, dim)
    padding = torch.ones(batch, kv_length, dtype=torch.long)
    padding[1, :2] = 0
    outputs = {}
    for backend in ("eager", "sdpa", "flex_attention"):
        mask = build_attention_mask(padding, batch_size=batch, query_length=query_length, past_length=past, kv_length=kv_length)
        outputs[backend], _ = attention(backend, query, key, value, mask, dim**-0.5)
    real_rows = slice(None) if past >= 2 else slice(2, None)
    for backend in ("sdpa", "flex_attention"):
        assert (outputs[backend][:, real_rows] - outputs["eager"][:, real_rows]).abs().max() < 1e-5, backend
    # by hand for row 0, last query: softmax over every visible key, head h reads kv head h // 2
    for head in range(heads):
        keys, values = key[0, head // 2], value[0, head // 2]  # (kv_length, dim)
        weights = (keys @ query[0, head, -1] * dim**-0.5).softmax(-1)
        assert (outputs["eager"][0, -1, head] - weights @ values).abs().max() < 1e-5


def test_output_attentions_falls_back_to_weights():
    query = key = value = torch.randn(1, 2, 3, 4)
    mask = AttentionMask(3, 3)
    _, weights = attention("sdpa", query, key, value, mask, 0.5, output_attentions=True)
    assert weights.shape == (1, 2, 3, 3)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 2, 3))
    assert weights[0, 0, 0, 1:].abs().max() == 0


def test_custom_4d_mask_is_used_as_is():
    custom = torch.ones(1, 1, 3, 3, dtype=torch.bool)  # bidirectional
    mask = build_attention_mask(custom, batch_size=1, query_length=3, past_length=0, kv_length=3)
    query = key = value = torch.randn(1, 2, 3, 4)
    out, weights = attention("eager", query, key, value, mask, 0.5, output_attentions=True)
    assert (weights[0, 0, 0] > 0).all()
    with pytest.raises(ValueError, match="4D attention_mask"):
        build_attention_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), batch_size=1, query_length=3, past_length=0, kv_length=3)


# --- long prompts: masks realised per block of query rows, flex block masks from the description ---


@pytest.fixture(scope="module")
def long_llama4(tmp_path_factory):
    """(reference, folder, ids, mask): tiny Llama 4 with a 48-token attention chunk and a left-padded
    batch of 300 and 217 tokens."""
    from tests.conftest import left_padded_prompts
    from tests.models.llama4.test_modeling_llama4 import reference_llama4

    reference = reference_llama4(attention_chunk_size=48, interleave_moe_layer_step=2, max_position_embeddings=512)
    folder = tmp_path_factory.mktemp("long-llama4") / "ckpt"
    reference.save_pretrained(folder)
    ids, mask = left_padded_prompts((300, 217), vocab=128, seed=3)
    return reference, folder, ids, mask


def _logits(folder, attn, ids, mask):
    import herd

    model = herd.Llama4ForCausalLM.from_pretrained(folder, attn_implementation=attn, progress=False)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def test_flex_chunked_attention_over_hundreds_of_tokens_equals_sdpa_and_reference(long_llama4):
    from tests.conftest import max_abs_diff

    reference, folder, ids, mask = long_llama4
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
    real = mask.bool()
    flex = _logits(folder, "flex_attention", ids, mask)
    sdpa = _logits(folder, "sdpa", ids, mask)
    assert max_abs_diff(flex[real], sdpa[real]) < 1e-4
    assert max_abs_diff(flex[real], expected[real]) < 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_a_long_prompt_never_builds_a_whole_mask(long_llama4, monkeypatch, attn):
    """The largest mask tensor realised has at most one block of query rows (and, for chunked
    layers, only the keys a block can see), and the logits are those of transformers."""
    from herd.layers import attention as attention_module
    from tests.conftest import max_abs_diff

    reference, folder, ids, mask = long_llama4
    block, chunk = 64, 48
    monkeypatch.setattr(attention_module, "QUERY_BLOCK", block)
    monkeypatch.setattr(attention_module, "FLEX_BAND_ELEMENTS", block * 384)  # 128-row bands over 384 key columns
    shapes = []
    real_rows = AttentionMask.rows

    def spy(self, device, start, end):
        rows = real_rows(self, device, start, end)
        shapes.append((rows.shape[-2], rows.shape[-1], self.chunk_size))
        return rows

    monkeypatch.setattr(AttentionMask, "rows", spy)
    got = _logits(folder, attn, ids, mask)
    seq = ids.shape[1]
    assert shapes and max(rows for rows, _, _ in shapes) <= (128 if attn == "flex_attention" else block) < seq
    if attn != "flex_attention":
        assert max(keys for _, keys, size in shapes if size) <= block + 2 * chunk  # chunked layers: a window
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_abs_diff(got[real], expected[real]) < 1e-4


def test_unpadded_chunked_blocks_stay_inside_one_chunk_and_are_plain_causal(long_llama4, monkeypatch):
    """Without padding, a chunked layer's query blocks end at chunk boundaries and each is causal
    attention over its own chunk's keys (what sdpa's lower-right causal bias runs on CUDA without
    a mask tensor); the logits are transformers'."""
    from herd.layers import attention as attention_module
    from tests.conftest import max_abs_diff

    reference, folder, ids, _ = long_llama4
    ids = ids[:1]  # the 300-token row: no padding
    monkeypatch.setattr(attention_module, "QUERY_BLOCK", 64)
    blocks = []
    real_query_block = AttentionMask.query_block

    def spy(self, start, end):
        block, key_start, key_end = real_query_block(self, start, end)
        if self.chunk_size:
            blocks.append((block.query_offset, block.query_length, block.kv_offset, block.kv_length, block))
        return block, key_start, key_end

    monkeypatch.setattr(AttentionMask, "query_block", spy)
    got = _logits(folder, "sdpa", ids, None)
    assert blocks
    for query_offset, rows, kv_offset, kv_length, block in blocks:
        assert query_offset // 48 == (query_offset + rows - 1) // 48 and rows <= 64  # one chunk, one block at most
        assert kv_offset == query_offset // 48 * 48 and kv_offset + kv_length == query_offset + rows  # its chunk so far
        assert block.chunk_size is None and block.is_causal_after_cache
    with torch.no_grad():
        assert max_abs_diff(got, reference(ids).logits) < 1e-4


def test_query_block_by_hand():
    """Rows 5..8 of a chunk-4 mask over a cache that dropped its first 2 positions, rows left padded by 0 and 1."""
    padding = torch.tensor([[1] * 12, [0] + [1] * 11])
    mask = build_attention_mask(padding, batch_size=2, query_length=10, past_length=2, kv_length=10, kv_offset=2,
                                chunk_size=4)
    block, key_start, key_end = mask.query_block(3, 7)  # queries at positions 5..8
    # row 0's chunk of position 5 starts at 4, row 1's (shifted by one) at 5: keys from position 4 (column 2)
    assert (key_start, key_end) == (2, 7)
    whole = mask.boolean(torch.device("cpu"))
    assert torch.equal(block.boolean(torch.device("cpu")), whole[:, :, 3:7, 2:7])
    assert not whole[:, :, 3:7, :2].any() and not whole[:, :, 3:7, 7:].any()  # nothing visible was cut


@pytest.mark.parametrize("padded", [False, True])
def test_flex_block_mask_tiles_by_hand(padded):
    """300 queries after 100 cached positions, chunk 64: the block mask's tiles are those of the dense mask."""
    from herd.layers.attention import flex_block_mask

    padding = torch.ones(2, 400, dtype=torch.long)
    if padded:
        padding[1, :37] = 0
    mask = build_attention_mask(padding, batch_size=2, query_length=300, past_length=100, kv_length=400, chunk_size=64)
    block_mask = flex_block_mask(mask, 2, torch.device("cpu"))
    dense = mask.boolean(torch.device("cpu")).expand(2, 1, 300, 400)
    assert torch.equal(block_mask.to_dense().bool()[..., :3, :4],
                       torch.nn.functional.pad(dense, (0, 112, 0, 84)).view(2, 1, 3, 128, 4, 128).any(5).any(3))
    q, k = torch.meshgrid(torch.arange(300), torch.arange(400), indexing="ij")
    for b in range(2):
        assert torch.equal(block_mask.mask_mod(torch.tensor(b), torch.tensor(0), q, k), dense[b, 0])


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_flex_decode_steps_across_chunk_boundaries_give_the_reference_tokens(tmp_path, cache_implementation):
    """Block masks at decode (one query row over a cache, a window on the chunked layers)."""
    import herd
    from tests.conftest import left_padded_prompts
    from tests.models.llama4.test_modeling_llama4 import reference_llama4

    reference = reference_llama4(interleave_moe_layer_step=2)  # attention chunk of 8
    reference.save_pretrained(tmp_path / "ckpt")
    ours = herd.Llama4ForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="flex_attention", progress=False)
    ids, mask = left_padded_prompts((13, 6), vocab=128, seed=5)
    kwargs = dict(attention_mask=mask, max_new_tokens=19, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = reference.generate(ids, **kwargs)
    assert torch.equal(ours.generate(ids, cache_implementation=cache_implementation, **kwargs), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_prefill_chunk_after_a_cache_uses_the_lower_right_causal_bias_on_cuda(monkeypatch):
    """sdpa over 2048 queries after 6000 cached keys: no mask tensor, the boolean path's output."""
    from herd.layers import attention as attention_module

    torch.manual_seed(0)
    past, new, heads, kv_heads, dim = 6000, 2048, 8, 2, 128
    query = torch.randn(1, heads, new, dim, device="cuda", dtype=torch.bfloat16)
    key, value = (torch.randn(1, kv_heads, past + new, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = build_attention_mask(None, batch_size=1, query_length=new, past_length=past, kv_length=past + new)
    assert mask.is_causal_after_cache
    built = []
    real_rows = AttentionMask.rows
    monkeypatch.setattr(AttentionMask, "rows", lambda self, *a: built.append(1) or real_rows(self, *a))
    fast, _ = attention("sdpa", query, key, value, mask, dim**-0.5)
    assert not built
    monkeypatch.setattr(attention_module, "uses_lower_right_causal", lambda mask, device: False)
    blocked, _ = attention("sdpa", query, key, value, mask, dim**-0.5)
    assert built and (fast.float() - blocked.float()).abs().max() < 2e-2


def test_cudnn_is_tried_for_long_causal_prefills_only():
    """cuDNN's attention first only for a long causal prefill in half precision on a GPU; never on the CPU."""
    from herd.layers.attention import CUDNN_MIN_QUERIES, prefers_cudnn

    long_query = torch.zeros(1, 2, CUDNN_MIN_QUERIES, 16, dtype=torch.bfloat16)
    assert not prefers_cudnn(long_query, True)  # the CPU
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        assert prefers_cudnn(long_query.cuda(), True)
        assert not prefers_cudnn(long_query.cuda(), False)  # a mask tensor, or not causal
        assert not prefers_cudnn(long_query[:, :, :-1].cuda(), True)
        assert not prefers_cudnn(long_query.float().cuda(), True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_long_causal_prefill_on_the_gpu_equals_the_flash_kernels():
    """The sdpa path of a 4096-token causal prefill with grouped-query heads (cuDNN's kernel where the
    GPU has it) equals torch's flash kernel within bf16 rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from herd.layers.attention import AttentionMask, sdpa_attention

    generator = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
    key, value = (torch.randn(1, 2, 4096, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
                  for _ in range(2))
    output, _ = sdpa_attention(query, key, value, AttentionMask(4096, 4096), 128**-0.5)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                                    scale=128**-0.5, enable_gqa=True)
    torch.testing.assert_close(output, expected.transpose(1, 2), rtol=2e-2, atol=2e-2)


def _math_part(query, key, value, scaling, causal):
    """attend_part in float64: the output and the log-sum-exp of the scores, top-left causal if asked."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.double().repeat_interleave(groups, 1), value.double().repeat_interleave(groups, 1)
    scores = query.double() @ key.transpose(2, 3) * scaling  # (batch, heads, q, k)
    if causal:
        q, k = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(q, k, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ value, torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("past", [0, 1, 37])
def test_a_chunk_after_a_cache_in_two_parts_equals_the_lower_right_causal_mask(past):
    """The cached keys without a mask and the chunk's own keys under a top-left causal square,
    merged by log-sum-exp: each query sees exactly the keys up to its own position."""
    from herd.layers.attention import after_cache_in_two_parts

    generator = torch.Generator().manual_seed(past)
    new, heads, kv_heads, dim = 9, 4, 2, 8
    query = torch.randn(1, heads, new, dim, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(1, kv_heads, past + new, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    merged = after_cache_in_two_parts(query, key, value, 0.3, _math_part)
    mask = build_attention_mask(None, batch_size=1, query_length=new, past_length=past, kv_length=past + new)
    expected, _ = attention("eager", query, key, value, mask, 0.3)  # (batch, q, heads, dim)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)  # (batch, q, heads, dim); eager: float32 softmax
    assert after_cache_in_two_parts(query, key, value, 0.3, lambda *args: None) is None  # a backend that refuses


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="cuDNN's fused attention: a GPU of compute capability 9.0 or more")
def test_a_long_chunk_after_a_cache_runs_on_cudnn_and_equals_the_flash_kernel(monkeypatch):
    """4096 queries after 6000 cached keys: both parts through cuDNN (none refused), the merge equal
    to flash's lower-right causal attention within bf16 rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    from herd.layers import attention as attention_module

    generator = torch.Generator(device="cuda").manual_seed(1)
    past, new, heads, kv_heads, dim = 6000, 4096, 8, 2, 128
    query = torch.randn(1, heads, new, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    key, value = (torch.randn(1, kv_heads, past + new, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
                  for _ in range(2))
    answered = []
    real_part = attention_module.cudnn_part
    monkeypatch.setattr(attention_module, "cudnn_part", lambda *args: answered.append(real_part(*args)) or answered[-1])
    mask = build_attention_mask(None, batch_size=1, query_length=new, past_length=past, kv_length=past + new)
    output, _ = attention("sdpa", query, key, value, mask, dim**-0.5)
    assert len(answered) == 2 and all(part is not None for part in answered)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=causal_lower_right(new, past + new), scale=dim**-0.5, enable_gqa=True)
    torch.testing.assert_close(output, expected.transpose(1, 2), rtol=2e-2, atol=2e-2)
