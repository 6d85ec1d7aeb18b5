"""kernels/fp8_matmul.py: FP8 rows times FP8 weights, in partial sums over input-column ranges,
against float64 products of the same FP8 values; gemv.torch_linear's FP8 path through it against
`_scaled_mm`'s arithmetic.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET), products
in float32; on a GPU on the tensor cores. FP8 values times FP8 values are exact in float32, so the
only difference from float64 is the float32 accumulation."""

from __future__ import annotations

import pytest
import torch

from herd.kernels import fp8_matmul as module
from herd.kernels import gemv
from herd.quantization.formats import quantize_fp8_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(module.triton is None, reason="needs Triton")
SMALL = dict(block_n=16, block_k=32, warps=4, stages=2)
# rows, in, out: rows below and at a power of two, output tails past a column block
CASES = [(5, 64, 48), (16, 128, 40), (33, 192, 100), (64, 256, 16)]


def _fp8(*shape, generator, spread=1.0):
    values = torch.randn(*shape, generator=generator) * spread
    return values.clamp(-448, 448).to(torch.float8_e4m3fn)


def _inputs(rows, in_features, out_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # weights spread over a few binades per row, so a row read against the wrong column shows
    spread = torch.exp(torch.empty(out_features, 1).uniform_(-2, 2, generator=generator))
    return _fp8(rows, in_features, generator=generator, spread=20.0).to(DEVICE), \
        _fp8(out_features, in_features, generator=generator, spread=spread * 30).to(DEVICE)


def _close(product, x_q, data):
    """Within a bound of the sum of the products' sizes: float32's rounding over the sum in the
    interpreter; on a GPU, Hopper's FP8 sums keep about 14 bits at each of the in / 32 steps of its
    products. A wrong column or range is off by a large share of the whole sum."""
    assert product.dtype == torch.float32
    exact = x_q.double() @ data.double().T
    steps = x_q.shape[1] // 32 + 1 if product.is_cuda else 1
    bound = steps * 2.0**-14 * (x_q.double().abs() @ data.double().abs().T) + 1e-6
    excess = ((product.double() - exact).abs() - bound).max().item()
    assert excess <= 0, f"off by {excess:.3g} beyond the bound"


@needs_triton
@pytest.mark.parametrize("rows,in_features,out_features", CASES)
@pytest.mark.parametrize("split", [1, 2])
def test_partials_sum_to_the_fp8_product(rows, in_features, out_features, split):
    x_q, data = _inputs(rows, in_features, out_features)
    partials = module.launch(x_q, data, split=split, **SMALL)
    assert partials.shape == (split, rows, out_features)
    _close(partials.sum(0), x_q, data)
    # each range is its own columns' product, not a share of the whole
    half = in_features // split
    _close(partials[-1], x_q[:, -half:], data[:, -half:])


@needs_triton
@pytest.mark.parametrize("pdl", [False, True] if DEVICE == "cuda" else [False])
def test_module_blocks_and_planned_split(pdl):
    """The module's blocks, the planned split and, on a GPU, launched as a programmatic dependent."""
    x_q, data = _inputs(8, 1024, 200, seed=1)
    _close(module.launch(x_q, data, pdl=pdl).sum(0), x_q, data)


@needs_triton
def test_split_that_breaks_a_step_is_refused():
    x_q, data = _inputs(5, 96, 16)
    with pytest.raises(ValueError, match="96 input columns do not split into 2 ranges of whole 32-column steps"):
        module.launch(x_q, data, split=2, block_n=16, block_k=32)


def test_torch_partials_equal_the_product():
    x_q, data = _inputs(7, 64, 24, seed=2)
    partials = module.torch_fp8_rows_partials(x_q.cpu(), data.cpu(), split=4)
    assert partials.shape == (4, 7, 24)
    _close(partials.sum(0), x_q.cpu(), data.cpu())


def test_split_fills_the_grid_with_whole_steps(monkeypatch):
    monkeypatch.setattr(module, "multiprocessors", lambda device: 132)
    cpu = torch.device("cpu")
    # Llama-3.1-8B at 2 programs per SM (264): down 4096 x 14336 has 64 column blocks of 64 -> 4 ranges
    assert module.split_for(4096, 14336, cpu, programs_per_sm=2) == 4
    assert module.split_for(6144, 4096, cpu, programs_per_sm=2) == 2  # qkv: 96 blocks
    assert module.split_for(28672, 4096, cpu, programs_per_sm=2) == 1  # gate_up: 448 blocks already
    assert module.split_for(4096, 4096 + 128, cpu, programs_per_sm=2) == 1  # 33 steps: no whole halves
    assert module.split_for(64, 1 << 20, cpu, programs_per_sm=8) == module.MAX_SPLIT


def test_kernel_applies_only_to_fp8_rows_in_range():
    x_q, data = _inputs(5, 128, 16)
    on_gpu = DEVICE == "cuda" and module.triton is not None
    assert module.kernel_applies(x_q, data) == on_gpu
    assert not module.kernel_applies(x_q[:4], data)  # the few-row kernel's rows
    assert not module.kernel_applies(x_q.float(), data)
    big, _ = _inputs(module.MAX_ROWS + 1, 128, 16)
    assert not module.kernel_applies(big, data)
    odd, odd_data = _inputs(5, 96, 16)
    assert not module.kernel_applies(odd, odd_data)  # 96 columns: not whole 128-column steps
    _, wide_data = _inputs(5, 256, 16)
    strided = wide_data[:, ::2]  # (16, 128), every other column: _scaled_mm takes it
    assert module.kernel_applies(x_q, strided.contiguous()) == on_gpu
    assert not module.kernel_applies(x_q, strided)


@pytest.mark.skipif(DEVICE != "cuda" or module.triton is None, reason="the kernel runs inside torch_linear on CUDA")
@pytest.mark.parametrize("rows", [5, 8, 37, 64, 65])
def test_torch_linear_is_as_close_as_fbgemms_arithmetic(rows):
    """FP8 weights with FP8 activations (FbgemmFp8Config): the kernel's rows (5-64) are as close to the
    exact product of the FP8 values as `_scaled_mm` with fast accumulation (FBGEMM's arithmetic,
    which transformers runs) within a bf16 rounding; 65 rows take `_scaled_mm` itself."""
    generator = torch.Generator().manual_seed(rows)
    weight = (torch.randn(4096, 4096, generator=generator) * 0.02).to(DEVICE, torch.bfloat16)
    data, scale = quantize_fp8_rows(weight)
    quantized = gemv.QuantizedWeight(data, scale.view(-1), fp8_activations=True)
    x = torch.randn(rows, 4096, generator=generator).to(DEVICE, torch.bfloat16)
    out = gemv.torch_linear(x, quantized)
    x_q, x_scale = gemv.fp8_activation_rows(x, quantized.activation_scale_ub)
    exact = (x_q.double() @ data.double().T) * x_scale.double() * scale.double().view(1, -1)
    fbgemm_like = torch._scaled_mm(x_q, data.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=torch.bfloat16,
                                   use_fast_accum=True)
    library_error = (fbgemm_like.double() - exact).abs().max().item()
    error = (out.double() - exact).abs().max().item()
    assert error <= 1.5 * library_error + 2.0**-8 * exact.abs().max().item(), (error, library_error)
