"""kernels/gemv.py with quantized weights (gemv.QuantizedWeight): the kernel against the torch
arithmetic on the dequantized weight, for int8 and FP8 rows with a scale each and int4 in groups.

The kernel applies a row's scale once to its sum and keeps int4 weights dequantized in float32,
where the torch fallback multiplies by `dequantize(weight, x.dtype)`, rounded to x's dtype: so
float32 compares to rounding, 16-bit by its distance from the float64 result on the exact
weights (`_close`). On CPU the kernel runs in Triton's interpreter, which reads FP8 too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from herd.kernels import gemv
from herd.kernels.gemv import QuantizedWeight, dequantize
from tests.kernels.test_gemv import (
    DEVICE,
    DTYPES,
    SMALL_CONFIG,
    _close,
    _rotary_tables,
    needs_triton,
)

EPS = 1e-5


@pytest.fixture
def one_multiprocessor(monkeypatch):
    """As test_gemv's: persistent configurations then loop over these small widths on a GPU too."""
    monkeypatch.setattr(gemv, "multiprocessors", lambda device: 1)


# --- quantizers for the tests (the library's own are in herd.quantization) -------------------------


def quantize_rows(weight: torch.Tensor, kind: str) -> QuantizedWeight:
    """Per-row absmax: int8 (amax / 127 a step) or FP8 e4m3 (amax at 448)."""
    amax = weight.float().abs().amax(dim=1).clamp(min=1e-8)
    if kind == "int8":
        scale = amax / 127
        data = (weight.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    else:
        scale = amax / 448
        data = (weight.float() / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return QuantizedWeight(data, scale)


def quantize_int4(weight: torch.Tensor, group: int, dtype: torch.dtype) -> QuantizedWeight:
    """Per group of columns: offset = min, scale = (max - min) / 15, nibbles packed two per byte
    (column 2j low, 2j + 1 high)."""
    out_features, in_features = weight.shape
    grouped = weight.float().view(out_features, in_features // group, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-6).to(dtype)
    offset = low.to(dtype)
    q = ((grouped - offset.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    q = q.view(out_features, in_features)
    return QuantizedWeight(q[:, 0::2] | (q[:, 1::2] << 4), scale, offset)


FORMATS = ["int8", "fp8", "int4/32", "int4/64", "int4/128"]
# the epilogue tests' cross products (dtype x shape x epilogue): groups of 64 run the same code as 32 and
# 128 with another GROUP, which every configuration test and the quantizer tests keep
EPILOGUE_FORMATS = [fmt for fmt in FORMATS if fmt != "int4/64"]


def quantize(weight: torch.Tensor, fmt: str, dtype: torch.dtype) -> QuantizedWeight:
    if fmt.startswith("int4"):
        return quantize_int4(weight, int(fmt.split("/")[1]), dtype)
    return quantize_rows(weight, fmt)


def _group(fmt: str) -> int:
    return int(fmt.split("/")[1]) if fmt.startswith("int4") else 1


def _inputs(rows, out_features, in_features, dtype, fmt, gated=False, seed=0):
    """x, norm weight, the quantized weight ((2 if gated else 1) * out_features, in_features), residual."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator).to(DEVICE, dtype)
    norm_weight = (1 + 0.2 * torch.randn(in_features, generator=generator)).to(DEVICE, dtype)
    weight = torch.randn(out_features * (2 if gated else 1), in_features, generator=generator) / in_features**0.5
    residual = torch.randn(rows, out_features, generator=generator).to(DEVICE, dtype)
    return x, norm_weight, quantize(weight.to(DEVICE), fmt, dtype), residual


def _both(reference, weight, dtype, *tensors):
    """reference in dtype on dequantize(weight, dtype), and in float64 on the exact weight."""
    return (reference(*tensors, dequantize(weight, dtype)),
            reference(*[t.double() for t in tensors], dequantize(weight, torch.float64)))


def _check(out, reference, weight, dtype, *tensors):
    """out against reference(*tensors, weight) (`_close`)."""
    expected, exact = _both(reference, weight, dtype, *tensors)
    _close(out, expected, dtype, exact)


def _norm_linear(x, norm_weight, weight):
    return nn.functional.linear(gemv.torch_rms_norm(x, norm_weight, EPS), weight)


def _norm_swiglu(x, norm_weight, weight):
    gate, up = _norm_linear(x, norm_weight, weight).chunk(2, dim=-1)
    return nn.functional.silu(gate) * up


def _linear_add(x, residual, weight):
    return residual + nn.functional.linear(x, weight)


# --- the meaning of the format ----------------------------------------------------------------------


def test_dequantize_is_the_documented_arithmetic():
    # int4: byte 0x21 holds column 0 (low nibble, 1) and column 1 (high nibble, 2); groups of 2 columns
    data = torch.tensor([[0x21, 0xF0], [0x0F, 0x53]], dtype=torch.uint8)
    scale = torch.tensor([[2.0, 0.5], [1.0, -1.0]])
    offset = torch.tensor([[0.5, -1.0], [0.0, 3.0]])
    expected = torch.tensor([[1 * 2 + 0.5, 2 * 2 + 0.5, 0 * 0.5 - 1, 15 * 0.5 - 1],
                             [15.0, 0.0, 3 * -1 + 3.0, 5 * -1 + 3.0]])
    torch.testing.assert_close(dequantize(QuantizedWeight(data, scale, offset), torch.float32), expected)
    assert dequantize(QuantizedWeight(data, scale.half(), offset.half()), torch.float16).dtype == torch.float16
    # row-scaled: each row times its scale
    rows = torch.tensor([[1, -2, 127], [-128, 0, 5]], dtype=torch.int8)
    torch.testing.assert_close(dequantize(QuantizedWeight(rows, torch.tensor([0.5, 2.0])), torch.float64),
                               torch.tensor([[0.5, -1.0, 63.5], [-256.0, 0.0, 10.0]], dtype=torch.float64))
    fp8 = torch.tensor([[0.5, -448.0]]).to(torch.float8_e4m3fn)
    torch.testing.assert_close(dequantize(QuantizedWeight(fp8, torch.tensor([0.25])), torch.float32),
                               torch.tensor([[0.125, -112.0]]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_test_quantizers_approximate_the_weight(fmt):
    weight = torch.randn(6, 256)
    error = (dequantize(quantize(weight, fmt, torch.float32), torch.float32) - weight).abs().max().item()
    assert error < {"int8": 0.03, "fp8": 0.3}.get(fmt, 0.6), error


# --- the kernel (Triton's interpreter on CPU) -------------------------------------------------------

# rows, out, in: out not a multiple of the block, in a multiple of every group size but not of
# every block (640, 96 with groups of 32)
SHAPES = [(1, 24, 128), (2, 64, 256), (3, 33, 384), (4, 40, 640), (2, 20, 96)]


def _cases():
    for fmt in EPILOGUE_FORMATS:
        for shape in SHAPES:
            if shape[2] % _group(fmt) == 0:
                yield fmt, *shape


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,rows,out_features,in_features", list(_cases()))
class TestQuantizedKernel:
    def test_norm_then_linear(self, dtype, fmt, rows, out_features, in_features):
        x, norm_weight, weight, _ = _inputs(rows, out_features, in_features, dtype, fmt)
        for config in (SMALL_CONFIG, None):
            out = gemv.launch(x, weight, x.new_empty(rows, out_features), norm_weight=norm_weight, eps=EPS,
                              config=config)
            _check(out, _norm_linear, weight, dtype, x, norm_weight)

    def test_float32_output(self, dtype, fmt, rows, out_features, in_features):
        x, norm_weight, weight, _ = _inputs(rows, out_features, in_features, dtype, fmt)
        out = gemv.launch(x, weight, x.new_empty(rows, out_features, dtype=torch.float32), norm_weight=norm_weight,
                          eps=EPS, config=(4, 64, 4, 1))
        assert out.dtype == torch.float32
        expected, exact = _both(_norm_linear, weight, dtype, x, norm_weight)
        _close(out, expected.float(), dtype, exact)

    def test_norm_then_swiglu(self, dtype, fmt, rows, out_features, in_features):
        x, norm_weight, weight, _ = _inputs(rows, out_features, in_features, dtype, fmt, gated=True)
        out = gemv.launch(x, weight, x.new_empty(rows, out_features), norm_weight=norm_weight, eps=EPS, gated=True,
                          config=SMALL_CONFIG)
        _check(out, _norm_swiglu, weight, dtype, x, norm_weight)

    def test_linear_and_linear_plus_residual(self, dtype, fmt, rows, out_features, in_features, one_multiprocessor):
        x, _, weight, residual = _inputs(rows, out_features, in_features, dtype, fmt)
        out = gemv.launch(x, weight, x.new_empty(rows, out_features), config=SMALL_CONFIG)
        _check(out, nn.functional.linear, weight, dtype, x)
        # the persistent loop too: 3 programs over all blocks, each reading its next block ahead
        for config in [SMALL_CONFIG, (2, 64, 4, 1, 1024, 3)]:
            out = gemv.launch(x, weight, torch.empty_like(residual), residual=residual, config=config)
            _check(out, _linear_add, weight, dtype, x, residual)


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("config", [
    (4, 16, 1, 1),  # steps narrower than a group
    (4, 64, 2, 1, 16),  # a first read narrower than a step (int4 widens it to whole steps)
    (4, 32, 4, 1, 64),
    (16, 128, 4, 1),
    (2, 16, 1, 1, 128, 3),  # persistent: whole rows, 3 programs (the interpreter has 1 SM)
    (8, 64, 4, 1, 512, 2),
    None,  # the default for quantized weights
])
def test_every_configuration_computes_the_same(fmt, config, one_multiprocessor):
    x, norm_weight, weight, _ = _inputs(2, 38, 128, torch.float32, fmt, gated=True)
    out = gemv.launch(x, weight, x.new_empty(2, 38), norm_weight=norm_weight, eps=EPS, gated=True, config=config)
    _close(out, _norm_swiglu(x, norm_weight, dequantize(weight, torch.float32)), torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", EPILOGUE_FORMATS)
@pytest.mark.parametrize(
    "rows,heads,kv_heads,head_dim,hidden,slot,config",
    [
        (1, 4, 2, 8, 128, 0, (2, 16, 1, 1)),
        (3, 3, 1, 8, 256, 7, (8, 32, 2, 1)),  # pairs of two heads per program
        (2, 3, 1, 12, 128, 4, (4, 64, 1, 1)),  # a head size that is not a power of two
        (2, 4, 2, 16, 128, 3, (4, 32, 4, 1, 128, 5)),  # persistent: 5 programs loop over 16 blocks
        (4, 2, 2, 32, 128, 2, None),  # the default configuration
    ],
)
def test_rotary_epilogue(dtype, fmt, rows, heads, kv_heads, head_dim, hidden, slot, config, one_multiprocessor):
    """q/k/v from a quantized weight with the rotary and the cache write in the kernel: the query and
    the new cache slot as the torch arithmetic on the dequantized weight gives them, nothing else."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(rows, hidden, generator=generator).to(DEVICE, dtype)
    norm_weight = (1 + 0.2 * torch.randn(hidden, generator=generator)).to(DEVICE, dtype)
    float_weight = torch.randn((heads + 2 * kv_heads) * head_dim, hidden, generator=generator) / hidden**0.5
    weight = quantize(float_weight.to(DEVICE), fmt, dtype)
    cos, sin = _rotary_tables(rows, head_dim, dtype)
    slots = 8
    cache = [torch.randn(rows, kv_heads, slots, head_dim, generator=generator).to(DEVICE, dtype) for _ in range(2)]
    expected_cache = [c.clone() for c in cache]
    slot_tensor = torch.tensor([slot], device=DEVICE)
    expected = gemv.torch_norm_qkv_rotary(x, norm_weight, EPS, dequantize(weight, dtype), None, cos, sin,
                                          *expected_cache, slot_tensor)
    query = gemv.launch(x, weight, x.new_empty(rows, heads * head_dim), norm_weight=norm_weight, eps=EPS,
                        rotary=(cos.reshape(rows, head_dim), sin.reshape(rows, head_dim), *cache, slot_tensor),
                        config=config)
    if dtype == torch.float32:
        tolerance = {"rtol": 1e-5, "atol": 1e-5}
    else:  # the sum's order and the fallback's rounded weights move q/k/v by a unit, then rotary's products
        unit = 4e-3 if dtype == torch.float16 else 1.6e-2  # bf16: two units at magnitude 1 (seen on the H200)
        tolerance = {"rtol": unit, "atol": unit}
    torch.testing.assert_close(query, expected, **tolerance)
    for written, reference in zip(cache, expected_cache):
        torch.testing.assert_close(written[:, :, slot], reference[:, :, slot], **tolerance)
        others = [s for s in range(slots) if s != slot]
        assert torch.equal(written[:, :, others], reference[:, :, others])


@needs_triton
@pytest.mark.parametrize("mistake", ["nibbles swapped", "groups shifted", "scales of another row"])
def test_the_comparison_catches_a_misread_weight(mistake):
    """The tests above would fail for a kernel that read the format wrong: the kernel on a weight
    misread in these ways is far from the torch arithmetic on the weight as meant."""
    x, norm_weight, weight, _ = _inputs(3, 33, 256, torch.float32, "int4/32")
    if mistake == "nibbles swapped":
        misread = weight._replace(data=(weight.data >> 4) | (weight.data << 4))
    elif mistake == "groups shifted":
        misread = weight._replace(scale=weight.scale.roll(1, dims=1), offset=weight.offset.roll(1, dims=1))
    else:
        misread = weight._replace(scale=weight.scale.roll(1, dims=0))
    expected = _norm_linear(x, norm_weight, dequantize(weight, torch.float32))
    out = gemv.launch(x, weight, x.new_empty(3, 33), norm_weight=norm_weight, eps=EPS, config=SMALL_CONFIG)
    _close(out, expected, torch.float32)
    wrong = gemv.launch(x, misread, x.new_empty(3, 33), norm_weight=norm_weight, eps=EPS, config=SMALL_CONFIG)
    with pytest.raises(AssertionError):
        _close(wrong, expected, torch.float32)


def test_quantized_configurations_are_valid():
    for out_features, in_features in [(3072, 2048), (128256, 4096), (14336, 4096), (4096, 14336), (2048, 8192),
                                      (8192, 28672), (5, 32), (7168, 5120), (5120, 8192), (4096, 11008)]:
        for gated in (False, True):
            for bits in (8, 4):
                config = gemv._config(out_features, in_features, gated, bits)
                for power_of_two in (config.block_n, config.block_k, config.warps, config.first_k or 1):
                    assert power_of_two & (power_of_two - 1) == 0, config
                assert config.block_n >= 2  # rotary pairs rows
                assert (config.first_k or config.block_k) >= config.block_k or config.programs_per_sm
                if config.programs_per_sm:  # persistent programs read whole rows
                    assert config.first_k >= in_features


# --- the public functions ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_public_functions_take_quantized_weights(fmt):
    """On CPU tensors (and with a bias anywhere) the functions run the torch arithmetic on
    dequantize(weight, x.dtype)."""
    dtype = torch.float32
    x, norm_weight, weight, residual = _inputs(3, 32, 128, dtype, fmt)
    x, norm_weight, residual = x.cpu(), norm_weight.cpu(), residual.cpu()
    weight = QuantizedWeight(*(t.cpu() if t is not None else None for t in weight[:3]))
    dense = dequantize(weight, dtype)
    bias = torch.randn(32)
    with torch.no_grad():
        torch.testing.assert_close(gemv.norm_linear(x, norm_weight, EPS, weight), _norm_linear(x, norm_weight, dense))
        torch.testing.assert_close(gemv.norm_linear(x, norm_weight, EPS, weight, bias, out_dtype=torch.float64),
                                   (_norm_linear(x, norm_weight, dense) + bias).double())
        torch.testing.assert_close(gemv.linear(x, weight), nn.functional.linear(x, dense))
        torch.testing.assert_close(gemv.linear_add(x, weight, residual, bias),
                                   residual + nn.functional.linear(x, dense, bias))
        activated = gemv.norm_gated_activation(x, norm_weight, EPS, weight, nn.functional.silu)
        torch.testing.assert_close(activated, _norm_swiglu(x, norm_weight, dense))
        keys, values = torch.zeros(3, 1, 4, 8), torch.zeros(3, 1, 4, 8)
        cos, sin = (t.cpu() for t in _rotary_tables(3, 8, dtype))
        query = gemv.norm_qkv_rotary(x, norm_weight, EPS, weight, None, cos, sin, keys, values, torch.tensor([2]))
        expected_keys, expected_values = torch.zeros(3, 1, 4, 8), torch.zeros(3, 1, 4, 8)
        expected = gemv.torch_norm_qkv_rotary(x, norm_weight, EPS, dense, None, cos, sin, expected_keys,
                                              expected_values, torch.tensor([2]))
        torch.testing.assert_close(query, expected)
        torch.testing.assert_close(keys, expected_keys)
        torch.testing.assert_close(values, expected_values)


def test_kernel_reads_only_the_formats_it_knows():
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    int8 = quantize_rows(torch.randn(8, 64), "int8")
    int4 = quantize_int4(torch.randn(8, 64), 32, torch.bfloat16)
    assert gemv._readable(x, int8) and gemv._readable(x, quantize_rows(torch.randn(8, 64), "fp8"))
    assert gemv._readable(x, int4)
    assert not gemv._readable(x, int8._replace(scale=int8.scale.bfloat16()))  # row scales are float32
    assert not gemv._readable(x, int4._replace(scale=int4.scale.float()))  # int4's are in x's dtype
    assert not gemv._readable(x, int4._replace(offset=None))
    assert not gemv._readable(x, int4._replace(scale=int4.scale[:, :1].expand(8, 3)))  # 64 columns in 3 groups
    assert not gemv._readable(x, QuantizedWeight(int8.data.short(), int8.scale))
    assert not gemv.kernel_applies(x, int8)  # CPU tensors: torch


# --- the ops in a compiled graph --------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("fmt", ["int8", "int4/32"])
def test_ops_compile_into_one_graph(fmt):
    """The ops with a quantized weight's parts under torch.compile(fullgraph=True), as the decode step
    runs them: the same as eager. (On CPU the ops run the kernel in the interpreter; aot_eager then
    traces them through their fake implementations without compiling C++.)"""
    dtype = torch.float32
    x, norm_weight, weight, _ = _inputs(2, 32, 128, dtype, fmt)
    _, _, gate_up, _ = _inputs(2, 32, 128, dtype, fmt, gated=True, seed=1)
    _, _, down, _ = _inputs(2, 128, 32, dtype, "int8" if fmt == "int8" else "int4/32", seed=2)
    cos, sin = (t.reshape(2, 8) for t in _rotary_tables(2, 8, dtype))
    caches = [torch.zeros(2, 1, 4, 8, device=DEVICE, dtype=dtype) for _ in range(4)]
    slot = torch.tensor([1], device=DEVICE)

    def step(x, keys, values):
        query = torch.ops.herd.norm_qkv_rotary(x, norm_weight, EPS, weight.data, cos, sin, keys, values, slot,
                                               weight.scale, weight.offset)
        logits = torch.ops.herd.norm_linear(x, norm_weight, EPS, weight.data, torch.float32, weight.scale,
                                            weight.offset)
        activated = torch.ops.herd.norm_swiglu(x, norm_weight, EPS, gate_up.data, gate_up.scale, gate_up.offset)
        hidden = torch.ops.herd.linear_add(activated, down.data, x, down.scale, down.offset)
        return query, logits, hidden, torch.ops.herd.linear(hidden, weight.data, weight.scale, weight.offset)

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    with torch.no_grad():
        compiled = torch.compile(step, fullgraph=True, backend=backend)(x, *caches[:2])
        eager = step(x, *caches[2:])
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
    for a, b in zip(caches[:2], caches[2:]):
        torch.testing.assert_close(a, b)
    assert caches[0][:, :, 1].abs().sum() > 0  # the key was written


@pytest.mark.skipif(not torch.cuda.is_available() or gemv.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4/128"])
def test_public_functions_compile_and_capture_on_gpu(fmt):
    """The public functions with a QuantizedWeight in a torch.compile'd step and a CUDA graph replay of it."""
    dtype = torch.bfloat16
    x, norm_weight, gate_up, _ = _inputs(2, 256, 512, dtype, fmt, gated=True)
    _, _, down, _ = _inputs(2, 512, 256, dtype, fmt, seed=1)

    def block(x):
        activated = gemv.norm_gated_activation(x, norm_weight, EPS, gate_up, nn.functional.silu)
        return gemv.linear_add(activated, down, x)

    with torch.no_grad():
        expected = x + nn.functional.linear(_norm_swiglu(x, norm_weight, dequantize(gate_up, dtype)),
                                            dequantize(down, dtype))
        compiled = torch.compile(block, fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, rtol=2**-6, atol=2**-5)
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        block(static_x)  # warm up (Triton compiles outside the capture)
        with torch.cuda.graph(graph):
            static_out = block(static_x)
        static_x.copy_(2 * x)
        graph.replay()
        torch.testing.assert_close(static_out, block(2 * x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 4, 33])
@pytest.mark.parametrize("group", [32, 128])
def test_cuda_int4_through_tinygemm_equals_the_dequantized_matmul(rows, group):
    """int4 weights carrying torch's tinygemm tiles run through its matmul (even columns moved to
    the high nibble, zero = offset + 8 scale): the dequantized bf16 matmul within bf16 rounding."""
    generator = torch.Generator().manual_seed(rows + group)
    weight = quantize_int4(torch.randn(256, 512, generator=generator) / 512**0.5, group, torch.bfloat16)
    weight = QuantizedWeight(*(t.cuda() for t in weight[:3]))
    tiled = QuantizedWeight(*weight[:3], *gemv.int4_tiles(*weight[:3]))
    assert tiled.tiles is not None and not gemv.kernel_applies(torch.ones(1, 512, device="cuda", dtype=torch.bfloat16),
                                                               tiled)
    x = torch.randn(rows, 512, generator=generator).to("cuda", torch.bfloat16)
    expected = x.double() @ dequantize(weight, torch.float32).double().t()
    got = gemv.linear(x, tiled)
    assert ((got.double() - expected).abs().max() / expected.abs().max()) < 2e-2
