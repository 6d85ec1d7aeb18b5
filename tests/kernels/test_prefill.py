"""kernels/prefill.py: the prefill's fused elementwise kernels against the torch arithmetic they replace.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET; float32 and
float16: it has no bfloat16 arithmetic), on a GPU compiled (bfloat16 too). Where the arithmetic is
the same (adds, products, casts) results must equal torch's bit for bit; the norm's mean of squares
(summation order) and exp (silu, the merge's weights) may move a value by units in the last place
of its dtype before its last product, which must then round as torch's (`_product_within`). In
the interpreter exp is NumPy's: up to 2 float32 ulps from torch's CPU exp, and torch's CPU silu
differs from NumPy's x / (1 + exp(-x)) by up to 4; on the GPU both sides call libdevice's expf.
Every kernel test checks that the kernel did launch; the torch fallback is checked on CPU tensors
outside the interpreter."""

from __future__ import annotations

import pytest
import torch

from herd.kernels import prefill
from herd.layers.norm import rms_norm
from herd.layers.rope import apply_rotary

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(prefill.triton is None, reason="needs Triton")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _ulps(actual: torch.Tensor, expected: torch.Tensor) -> int:
    """The largest distance between actual and expected in units in the last place of their dtype
    (how many representable values apart: the bit patterns in sign-magnitude order)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, expected.dtype)
    assert not actual.isnan().any()
    sign = 1 << (8 * actual.element_size() - 1)

    def ordered(t):
        bits = t.contiguous().view(_BITS[t.dtype]).long()
        return torch.where(bits < 0, -(bits & (sign - 1)), bits)

    return (ordered(actual) - ordered(expected)).abs().max().item() if actual.numel() else 0


def _product_within(out: torch.Tensor, factor: torch.Tensor, other: torch.Tensor, ulps: int):
    """out == factor' * other (rounded to the dtype, as torch's product) elementwise, for some factor'
    at most `ulps` units in the last place from factor: the one step whose arithmetic differs from
    torch's (a mean, exp) moves the factor, the product after it rounds the same. (A bound on out
    itself would be twice as loose: a factor one unit off can put the product two units off.)"""
    assert out.dtype == factor.dtype and out.shape == torch.broadcast_shapes(factor.shape, other.shape)
    assert not out.isnan().any()
    matches = out == factor * other
    lower = upper = factor
    for _ in range(ulps):
        lower = torch.nextafter(lower, torch.full_like(lower, -float("inf")))
        upper = torch.nextafter(upper, torch.full_like(upper, float("inf")))
        matches |= (out == lower * other) | (out == upper * other)
    assert matches.all(), f"{(~matches).sum().item()} of {out.numel()} values beyond {ulps} ulps"


def _random(*shape, dtype, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator)).to(DEVICE, dtype)


class _Launches:
    """Counts a kernel's launches (`kernel[grid](...)`), passing each on."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@pytest.fixture(autouse=True)
def interpret_on_cpu(monkeypatch):
    """These tests run the kernels on CPU tensors too (Triton's interpreter), which the library
    leaves to the torch arithmetic elsewhere (prefill.INTERPRET_ON_CPU)."""
    monkeypatch.setattr(prefill, "INTERPRET_ON_CPU", True)


@pytest.fixture
def launches(monkeypatch):
    """name -> _Launches of each of the module's kernels."""
    counters = {}
    for name in ("_add_rms_norm_kernel", "_rotary_kernel", "_silu_mul_kernel", "_merge_kernel"):
        counters[name] = _Launches(getattr(prefill, name))
        monkeypatch.setattr(prefill, name, counters[name])
    return counters


@pytest.fixture
def torch_only(monkeypatch):
    """The torch fallback on CPU tensors: not interpreted, and no kernel may launch."""
    monkeypatch.setattr(prefill, "interpreted", lambda: False)
    for name in ("_add_rms_norm_kernel", "_rotary_kernel", "_silu_mul_kernel", "_merge_kernel"):
        monkeypatch.setattr(prefill, name, None, raising=False)  # subscripting None fails: no launch


# --- add_rms_norm --------------------------------------------------------------------------------

NORM_SHAPES = [(5, 96), (2, 3, 64), (3, 4100), (1, 16)]  # odd rows, widths not a power of two (masked)


def _norm_case(shape, dtype, seed=0):
    hidden = _random(*shape, dtype=dtype, seed=seed)
    delta = _random(*shape, dtype=dtype, seed=seed + 1, scale=0.5)
    weight = (1 + _random(shape[-1], dtype=torch.float32, seed=seed + 2, scale=0.2)).to(dtype)
    return hidden, delta, weight


# How far the normed value before the weight may be from torch's: the mean of squares is summed in
# another order (a unit of float32 or two), which the cast to 16 bits keeps within one of its units.
NORM_ULPS = {torch.float32: 4, torch.float16: 1, torch.bfloat16: 1}


def _check_norm(normed, summed, weight, eps):
    """normed equals rms_norm(summed, weight, eps) but for the normed value before the weight."""
    # rms_norm is that product (what the bound assumes)
    assert torch.equal(rms_norm(summed, weight, eps), weight * _unweighted(summed, eps))
    _product_within(normed, _unweighted(summed, eps), weight, NORM_ULPS[summed.dtype])


def _unweighted(summed, eps):
    """rms_norm's value before its weight: in float32, rounded to the dtype."""
    return rms_norm(summed, torch.ones((), dtype=summed.dtype, device=summed.device), eps)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_add_rms_norm(shape, dtype, launches):
    hidden, delta, weight = _norm_case(shape, dtype)
    summed, normed = prefill.add_rms_norm(hidden, delta, weight, 1e-5)
    assert launches["_add_rms_norm_kernel"].count == 1
    expected = hidden + delta
    assert torch.equal(summed, expected)  # the add rounds as torch's
    assert normed.shape == shape and normed.dtype == dtype and normed.is_contiguous()
    _check_norm(normed, expected, weight, 1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_without_delta(dtype, launches):
    hidden, _, weight = _norm_case((7, 48), dtype)
    summed, normed = prefill.add_rms_norm(hidden, None, weight, 1e-6)
    assert launches["_add_rms_norm_kernel"].count == 1
    assert summed is hidden
    _check_norm(normed, hidden, weight, 1e-6)


@needs_triton
def test_add_rms_norm_reads_strided_rows(launches):
    """Rows of a wider tensor (one row stride, unit column stride) are read in place."""
    wide = _random(6, 200, dtype=torch.float16, seed=3)
    hidden, delta = wide[:, :96], wide[:, 100:196]
    weight = (1 + _random(96, dtype=torch.float32, seed=4, scale=0.2)).half()
    summed, normed = prefill.add_rms_norm(hidden, delta, weight, 1e-5)
    assert launches["_add_rms_norm_kernel"].count == 1
    assert torch.equal(summed, hidden + delta)
    _check_norm(normed, hidden + delta, weight, 1e-5)


@needs_triton
def test_add_rms_norm_weight_of_another_dtype_falls_back(launches):
    """A float32 weight on float16 activations: torch promotes the product, and so does the result."""
    hidden, delta, _ = _norm_case((5, 96), torch.float16)
    weight = 1 + _random(96, dtype=torch.float32, seed=5, scale=0.2)
    summed, normed = prefill.add_rms_norm(hidden, delta, weight, 1e-5)
    assert launches["_add_rms_norm_kernel"].count == 0
    assert normed.dtype == torch.float32
    assert torch.equal(summed, hidden + delta)
    assert torch.equal(normed, rms_norm(hidden + delta, weight, 1e-5))


# --- rotary --------------------------------------------------------------------------------------


def _qkv(batch, seq, q_heads, kv_heads, head_dim, dtype, seed=0):
    """query and key as views of one fused q/k/v projection output (batch, seq, (q + 2 kv) heads * dim)."""
    fused = _random(batch, seq, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=seed)
    query = fused.narrow(-1, 0, q_heads * head_dim).view(batch, seq, q_heads, head_dim)
    key = fused.narrow(-1, q_heads * head_dim, kv_heads * head_dim).view(batch, seq, kv_heads, head_dim)
    return query, key


def _cos_sin(cos_batch, seq, head_dim, dtype, seed=1):
    angles = _random(cos_batch, seq, head_dim // 2, dtype=torch.float32, seed=seed, scale=3.0)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


ROTARY_CASES = [  # batch, seq, q heads, kv heads, head_dim, cos/sin batch
    (1, 5, 4, 2, 16, 1),
    (2, 3, 6, 2, 32, 2),  # 3 query blocks of 2 heads; cos/sin per batch row
    (2, 4, 3, 3, 64, 1),  # blocks of 4 heads, the last head of each masked
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq,q_heads,kv_heads,head_dim,cos_batch", ROTARY_CASES)
def test_rotary(batch, seq, q_heads, kv_heads, head_dim, cos_batch, dtype, launches):
    query, key = _qkv(batch, seq, q_heads, kv_heads, head_dim, dtype)
    assert not query.is_contiguous()
    cos, sin = _cos_sin(cos_batch, seq, head_dim, dtype)
    query_out, key_out = prefill.rotary(query, key, cos, sin)
    assert launches["_rotary_kernel"].count == 1
    expected_query, expected_key = apply_rotary(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
    for out, expected, heads in ((query_out, expected_query, q_heads), (key_out, expected_key, kv_heads)):
        assert out.shape == (batch, heads, seq, head_dim) and out.dtype == dtype
        assert out.transpose(1, 2).is_contiguous()  # laid out (batch, seq, heads, head_dim)
        assert torch.equal(out, expected)


@needs_triton
def test_rotary_contiguous_inputs(launches):
    query = _random(2, 3, 4, 16, dtype=torch.float16, seed=6)
    key = _random(2, 3, 1, 16, dtype=torch.float16, seed=7)
    cos, sin = _cos_sin(1, 3, 16, torch.float16)
    outs = prefill.rotary(query, key, cos, sin)
    assert launches["_rotary_kernel"].count == 1
    for out, expected in zip(outs, apply_rotary(query.transpose(1, 2), key.transpose(1, 2), cos, sin)):
        assert torch.equal(out, expected)


@needs_triton
@pytest.mark.parametrize("head_dim,cos_dtype", [(8, torch.float16), (16, torch.float32)])
def test_rotary_falls_back(head_dim, cos_dtype, launches):
    """A head size under 16, or cos/sin of another dtype (torch promotes): the torch code."""
    query, key = _qkv(1, 3, 2, 1, head_dim, torch.float16)
    cos, sin = _cos_sin(1, 3, head_dim, cos_dtype)
    outs = prefill.rotary(query, key, cos, sin)
    assert launches["_rotary_kernel"].count == 0
    for out, expected in zip(outs, apply_rotary(query.transpose(1, 2), key.transpose(1, 2), cos, sin)):
        assert out.dtype == expected.dtype and torch.equal(out, expected)


# --- silu_mul ------------------------------------------------------------------------------------


# silu's distance from torch's before the product with up: exp's last float32 bits (module docstring)
# move a 16-bit silu by at most one unit
SILU_ULPS = {torch.float32: 4, torch.float16: 1, torch.bfloat16: 1}


def _gate_up(shape, dtype, seed=0):
    gate = _random(*shape, dtype=torch.float32, seed=seed, scale=4.0)
    gate.view(-1)[:4] = torch.tensor([-100.0, 100.0, 0.0, -20.0])  # exp overflowing, saturating, zero
    return gate.to(dtype), _random(*shape, dtype=dtype, seed=seed + 1)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # NumPy's exp(100) in the interpreter: inf, as meant
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 70), (2, 5, 96), (1, 2500)])  # 2500: three blocks, the last masked
def test_silu_mul(shape, dtype, launches):
    gate, up = _gate_up(shape, dtype)
    out = prefill.silu_mul(gate, up)
    assert launches["_silu_mul_kernel"].count == 1
    assert out.shape == shape and out.is_contiguous()
    _product_within(out, torch.nn.functional.silu(gate), up, SILU_ULPS[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_halves_of_a_fused_output(dtype, launches):
    """gate and up as the two halves of one gate/up projection output (strided rows)."""
    fused = _random(5, 2, 2 * 48, dtype=dtype, seed=8, scale=3.0)
    gate, up = fused.chunk(2, dim=-1)
    out = prefill.silu_mul(gate, up)
    assert launches["_silu_mul_kernel"].count == 1
    assert out.is_contiguous()
    _product_within(out, torch.nn.functional.silu(gate), up, SILU_ULPS[dtype])


# --- merge_attention_parts -----------------------------------------------------------------------


def _parts(batch, heads, queries, dim, dtype, seed=0):
    """Two parts as cuDNN returns them: outputs laid out (batch, q, heads, dim), one log-sum-exp
    contiguous (batch, heads, q) and the other with transposed strides; log-sum-exps far apart for
    some queries (one weight underflows) and -inf for one (an empty part)."""
    out_a = _random(batch, queries, heads, dim, dtype=dtype, seed=seed).transpose(1, 2)
    out_b = _random(batch, queries, heads, dim, dtype=dtype, seed=seed + 1).transpose(1, 2)
    lse_a = _random(batch, heads, queries, dtype=torch.float32, seed=seed + 2, scale=3.0)
    lse_b = _random(batch, queries, heads, dtype=torch.float32, seed=seed + 3, scale=3.0).transpose(1, 2)
    lse_a[:, :, 0] += 120.0
    lse_b[:, :, -1] = float("-inf")
    return out_a, lse_a, out_b, lse_b


def _reference_merge(out_a, lse_a, out_b, lse_b):
    """layers.attention.after_cache_in_two_parts's merge, transposed as the o projection reads it."""
    lse_a, lse_b = (lse.float().reshape(*out_a.shape[:3], 1) for lse in (lse_a, lse_b))
    top = torch.maximum(lse_a, lse_b)
    weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    merged = (weight_a * out_a.float() + weight_b * out_b.float()) / (weight_a + weight_b)
    return merged.to(out_a.dtype).transpose(1, 2).contiguous()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,heads,queries,dim", [(2, 4, 7, 16), (1, 5, 3, 96)])  # 5 heads, 96 dims: masked
def test_merge_attention_parts(batch, heads, queries, dim, dtype, launches):
    out_a, lse_a, out_b, lse_b = _parts(batch, heads, queries, dim, dtype)
    merged = prefill.merge_attention_parts(out_a, lse_a, out_b, lse_b)
    assert launches["_merge_kernel"].count == 1
    assert merged.shape == (batch, queries, heads, dim) and merged.is_contiguous() and merged.dtype == dtype
    expected = _reference_merge(out_a, lse_a, out_b, lse_b)
    assert torch.equal(merged[:, -1], out_a.transpose(1, 2)[:, -1])  # the empty part weighs nothing
    if dtype == torch.float32:  # exp's last bit moves both weights: a few units of float32
        torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)
    else:  # and at most a unit of the 16-bit dtype
        assert _ulps(merged, expected) <= 1


@needs_triton
def test_merge_contiguous_parts(launches):
    """(batch, heads, q, dim) outputs, and log-sum-exps with a trailing 1 (batch, heads, q, 1)."""
    out_a, lse_a, out_b, lse_b = (t.contiguous() for t in _parts(1, 3, 4, 32, torch.float16, seed=9))
    lse_a, lse_b = lse_a[..., None], lse_b[..., None]
    merged = prefill.merge_attention_parts(out_a, lse_a, out_b, lse_b)
    assert launches["_merge_kernel"].count == 1
    assert _ulps(merged, _reference_merge(out_a, lse_a, out_b, lse_b)) <= 1


# --- the torch fallback ---------------------------------------------------------------------------


@needs_triton
def test_gradients_take_the_torch_ops(launches):
    """A tensor that needs a gradient: the torch ops run (the kernels have no backward)."""
    hidden, delta, weight = _norm_case((3, 32), torch.float32)
    hidden.requires_grad_()
    _, normed = prefill.add_rms_norm(hidden, delta, weight, 1e-5)
    normed.sum().backward()
    assert launches["_add_rms_norm_kernel"].count == 0 and hidden.grad is not None
    with torch.no_grad():
        prefill.add_rms_norm(hidden, delta, weight, 1e-5)
    assert launches["_add_rms_norm_kernel"].count == 1


def test_fallback_equals_the_reference(torch_only):
    """CPU tensors outside the interpreter: the torch code, equal to the references bit for bit."""
    def cpu(t):
        return t.cpu()

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        hidden, delta, weight = map(cpu, _norm_case((5, 96), dtype))
        summed, normed = prefill.add_rms_norm(hidden, delta, weight, 1e-5)
        assert torch.equal(summed, hidden + delta)
        assert torch.equal(normed, rms_norm(hidden + delta, weight, 1e-5))
        summed, normed = prefill.add_rms_norm(hidden, None, weight, 1e-5)
        assert summed is hidden and torch.equal(normed, rms_norm(hidden, weight, 1e-5))

        query, key = map(cpu, _qkv(2, 3, 4, 2, 16, dtype))
        cos, sin = map(cpu, _cos_sin(1, 3, 16, dtype))
        outs = prefill.rotary(query, key, cos, sin)
        for out, expected in zip(outs, apply_rotary(query.transpose(1, 2), key.transpose(1, 2), cos, sin)):
            assert torch.equal(out, expected) and out.stride() == expected.stride()

        gate, up = map(cpu, _gate_up((3, 70), dtype))
        assert torch.equal(prefill.silu_mul(gate, up), torch.nn.functional.silu(gate) * up)

        parts = [cpu(t) for t in _parts(2, 4, 7, 16, dtype)]
        merged = prefill.merge_attention_parts(*parts)
        assert merged.is_contiguous() and torch.equal(merged, _reference_merge(*parts))


def test_tensor_subclasses_take_the_torch_arithmetic():
    """A tensor subclass (tensor parallel's AsyncCollectiveTensor holds a sum that may not have
    arrived) is never handed to a kernel: torch's ops, which know the subclass, run instead."""

    class Pending(torch.Tensor):
        pass

    hidden = torch.randn(3, 8)
    delta = torch.randn(3, 8).as_subclass(Pending)
    weight = torch.rand(8) + 0.5
    assert not prefill._kernel_runs(hidden, delta, weight)
    summed, normed = prefill.add_rms_norm(hidden, delta, weight, 1e-6)
    expected_summed, expected_normed = prefill.torch_add_rms_norm(hidden, delta.as_subclass(torch.Tensor), weight, 1e-6)
    assert torch.equal(summed.as_subclass(torch.Tensor), expected_summed)
    assert torch.equal(normed.as_subclass(torch.Tensor), expected_normed)
