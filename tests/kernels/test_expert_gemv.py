"""kernels/expert_gemv.py: each pair's row through its own quantized expert, against float64 math
on the dequantized weights; the torch fallback against the kernel; routed_experts with scales
against the plain path on the dequantized experts.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET), which
reads FP8 too; bf16 is left to the GPU (the interpreter has no bf16 arithmetic). Scales differ
per expert and per output column, so a pair read through the wrong expert or column shows."""

from __future__ import annotations

import pytest
import torch

from herd.kernels import expert_gemv as module
from herd.kernels.expert_gemv import expert_gemv, torch_expert_gemv
from herd.kernels.routed_experts import routed_experts
from herd.quantization.experts import quantize_experts as stored_experts
from herd.quantization.formats import Scheme, unpack_int4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(module.triton is None, reason="needs Triton")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
KINDS = ["int8", "fp8"]
# pairs, in, out, experts, expert ids: tails in both dimensions, repeated experts
CASES = [
    (1, 40, 24, 3, [2]),
    (2, 64, 128, 4, [3, 3]),
    (3, 33, 300, 5, [4, 0, 4]),
    (4, 100, 70, 2, [1, 0, 1, 1]),
]
SMALL_BLOCKS = dict(block_n=16, block_k=16)  # several column blocks and loop steps at these widths
# int4: pairs, in, out, experts, expert ids, group (a step is a group)
INT4_CASES = [
    (1, 64, 24, 3, [2], 32),
    (3, 256, 300, 5, [4, 0, 4], 64),
    (4, 128, 70, 2, [1, 0, 1, 1], 32),
    (2, 384, 40, 3, [1, 2], 128),  # Scout's group: three groups, one a step
]


def quantize_experts(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (experts, in, out) -> data, scale (experts, 1, out): absmax per expert and column."""
    amax = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
    if kind == "int8":
        scale = amax / 127
        return (weight.float() / scale).round().clamp(-127, 127).to(torch.int8), scale
    scale = amax / 448
    return (weight.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def _inputs(pairs, in_features, out_features, experts, ids, dtype, kind, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(pairs, in_features, generator=generator).to(DEVICE, dtype)
    # column scales spread over 0.2..5 so that each expert's and column's scale matters
    spread = torch.exp(torch.empty(experts, 1, out_features).uniform_(-1.6, 1.6, generator=generator))
    weight = torch.randn(experts, in_features, out_features, generator=generator) * spread / in_features**0.5
    data, scale = quantize_experts(weight, kind)
    return x, torch.tensor(ids, device=DEVICE), data.to(DEVICE), scale.to(DEVICE)


def _exact(x, expert_ids, data, scale):
    """float64 on the dequantized weights."""
    weights = data.double()[expert_ids] * scale.double()[expert_ids]  # (pairs, in, out)
    return torch.einsum("pk,pkn->pn", x.double(), weights)


def _check(out, exact, dtype):
    """Accumulated in float32 and rounded once: within float32's rounding, or half a 16-bit ulp (a
    second rounding, of the sum before its scale, goes past it)."""
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    else:
        half_ulp = 2.0**-11 if dtype == torch.float16 else 2.0**-8
        torch.testing.assert_close(out.double(), exact, rtol=1.01 * half_ulp, atol=1e-5)


def _kernel(x, expert_ids, data, scale, offset=None, **blocks):
    """The kernel's partial sums over input-row ranges, summed and rounded as expert_gemv does."""
    return module.launch(x, expert_ids, data, scale, offset, **blocks).sum(0).to(x.dtype)


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairs,in_features,out_features,experts,ids", CASES)
def test_expert_kernel_equals_float64_math(kind, dtype, pairs, in_features, out_features, experts, ids):
    x, expert_ids, data, scale = _inputs(pairs, in_features, out_features, experts, ids, dtype, kind)
    exact = _exact(x, expert_ids, data, scale)
    _check(_kernel(x, expert_ids, data, scale, **SMALL_BLOCKS), exact, dtype)
    _check(_kernel(x, expert_ids, data, scale), exact, dtype)  # the module's blocks
    _check(_kernel(x, expert_ids, data, scale, tensor_cores=False, **SMALL_BLOCKS), exact, dtype)  # CUDA cores
    _check(_kernel(x, expert_ids, data, scale, fp8_asm=False), exact, dtype)  # Triton's FP8 conversion (GPU)


@needs_triton
@pytest.mark.parametrize("ranges", [1, 3, None])
def test_expert_kernel_sums_input_row_ranges(ranges):
    """Split into ranges of input rows (the last one shorter, or empty), the partials add up to
    the whole product."""
    x, expert_ids, data, scale = _inputs(*CASES[3], torch.float32, "int8", seed=3)
    _check(_kernel(x, expert_ids, data, scale, ranges=ranges, **SMALL_BLOCKS), _exact(x, expert_ids, data, scale),
           torch.float32)


def test_plan_ranges_fills_the_grid_with_whole_steps():
    per_sm = module.PROGRAMS_PER_SM
    # Scout's down_proj at one pair, 132 SMs: 80 column blocks of 64, 64 steps of 128 rows ->
    # 132 * per_sm // 80 ranges wanted, of whole steps each
    wanted = 132 * per_sm // 80
    ranges, per_range = module.plan_ranges(1, 5120, 64, 132, block_n=64)
    assert per_range == -(-64 // wanted) and ranges == -(-64 // per_range) and ranges * per_range >= 64
    assert (ranges - 1) * per_range < 64  # no empty range
    assert module.plan_ranges(1, 16384, 40, 132, block_n=64) == (132 * per_sm // 256, 40 // (132 * per_sm // 256))
    assert module.plan_ranges(64, 16384, 40, 132, block_n=64) == (1, 40)  # enough blocks already
    assert module.plan_ranges(1, 64, 3, 132, block_n=64) == (3, 1)  # never more ranges than steps


def _int4_inputs(pairs, in_features, out_features, experts, ids, group, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(pairs, in_features, generator=generator).to(DEVICE, dtype)
    spread = torch.exp(torch.empty(experts, 1, out_features).uniform_(-1.6, 1.6, generator=generator))
    weight = torch.randn(experts, in_features, out_features, generator=generator) * spread / in_features**0.5
    stored = stored_experts(weight, Scheme("int4", group_size=group), torch.float32 if dtype == torch.float32 else dtype)
    exact = torch.einsum("pk,pkn->pn", x.double().cpu(), _dequantized_by_hand(
        {k: t.double() for k, t in stored.items()} | {"": stored[""]}, "int4").double()[torch.tensor(ids)])
    return x, torch.tensor(ids, device=DEVICE), *(stored[k].to(DEVICE) for k in ("", "_scale", "_offset")), exact


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairs,in_features,out_features,experts,ids,group", INT4_CASES)
def test_int4_expert_kernel_equals_float64_math(dtype, pairs, in_features, out_features, experts, ids, group):
    """int4 pairs: the nibbles times the group's scale plus its offset, each row through its own expert."""
    x, expert_ids, data, scale, offset, exact = _int4_inputs(pairs, in_features, out_features, experts, ids, group, dtype)
    _check(_kernel(x, expert_ids, data, scale, offset, block_n=16).cpu(), exact, dtype)
    _check(_kernel(x, expert_ids, data, scale, offset).cpu(), exact, dtype)
    _check(_kernel(x, expert_ids, data, scale, offset, sums_by_dot=True).cpu(), exact, dtype)
    _check(module.torch_expert_gemv(x, expert_ids, data, scale, offset).cpu(), exact, dtype)


def test_int4_kernel_applies_to_groups_of_at_least_32():
    x, expert_ids, data, scale, offset, _ = _int4_inputs(*INT4_CASES[0], torch.float32)
    on_gpu = module.triton is not None and x.is_cuda
    assert module.kernel_applies(x, expert_ids, data, scale, offset) == on_gpu
    small = torch.zeros(3, 4, 24, dtype=scale.dtype, device=DEVICE)  # groups of 16 rows
    assert not module.kernel_applies(x, expert_ids, data, small, small)
    assert not module.kernel_applies(x, expert_ids, data, scale, offset.half())


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_fallback_equals_kernel(kind, dtype):
    x, expert_ids, data, scale = _inputs(*CASES[2], dtype, kind, seed=1)
    kernel = _kernel(x, expert_ids, data, scale, **SMALL_BLOCKS)
    fallback = torch_expert_gemv(x, expert_ids, data, scale)
    if dtype == torch.float32:
        torch.testing.assert_close(fallback, kernel, rtol=1e-5, atol=1e-5)
    else:  # the same float32 sum in another order, rounded once: at most an ulp apart
        torch.testing.assert_close(fallback.float(), kernel.float(), rtol=2.0**-7, atol=1e-3)
    _check(fallback, _exact(x, expert_ids, data, scale), dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_expert_fallback_equals_float64_math_in_bf16(kind):
    x, expert_ids, data, scale = _inputs(*CASES[3], torch.bfloat16, kind)
    _check(torch_expert_gemv(x, expert_ids, data, scale), _exact(x, expert_ids, data, scale), torch.bfloat16)


def test_expert_kernel_applies_to_cuda_tensors_of_fitting_dtypes():
    x, expert_ids, data, scale = _inputs(*CASES[0], torch.float32, "int8")
    assert module.kernel_applies(x, expert_ids, data, scale) == (module.triton is not None and x.is_cuda)
    assert not module.kernel_applies(x, expert_ids, data.float(), scale)
    assert not module.kernel_applies(x, expert_ids, data, scale.half())
    assert not module.kernel_applies(x, expert_ids, data, scale[:, :, :-1])


def _dequantized_by_hand(stored: dict, kind: str) -> torch.Tensor:
    """Stored experts -> float (experts, in, out), through the int4 linears' unpacking (an expert's
    column is a linear's row) rather than the function under test."""
    if kind != "int4":
        return stored[""].float() * stored["_scale"]
    experts = []
    for data, scale, offset in zip(stored[""], stored["_scale"], stored["_offset"]):
        group = data.shape[0] * 2 // scale.shape[0]
        values = unpack_int4(data.t().contiguous()).float()  # (out, in)
        experts.append((values * scale.t().float().repeat_interleave(group, 1)
                        + offset.t().float().repeat_interleave(group, 1)).t())
    return torch.stack(experts)


@pytest.mark.parametrize("kind", [*KINDS, "int4"])
@pytest.mark.parametrize("ids", [[2], [3, 0, 3, 1], [1, 1, 0, 3, 2, 0]])
def test_quantized_routed_experts_equal_the_plain_path_on_dequantized_experts(kind, ids):
    experts, hidden, intermediate = 4, 64, 32
    scheme = Scheme(kind, group_size=32 if kind == "int4" else 0)
    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(len(ids), hidden, generator=generator).to(DEVICE)
    expert_ids = torch.tensor(ids, device=DEVICE)
    weights = [torch.randn(experts, hidden, 2 * intermediate, generator=generator) / hidden**0.5,
               torch.randn(experts, intermediate, hidden, generator=generator) / intermediate**0.5]
    stored = [{k: t.to(DEVICE) for k, t in stored_experts(w, scheme, torch.float32).items()} for w in weights]
    dequantized = [_dequantized_by_hand(parts, kind) for parts in stored]
    for weight, plain in zip(weights, dequantized):  # each value within half a step of its weight
        step = 2 * (weight.abs().amax() / 127 if kind == "int8" else weight.abs().amax() / 7.5 if kind == "int4"
                    else weight.abs().amax() / 16)
        assert (plain.cpu() - weight).abs().max() <= step / 2
    activation = torch.nn.functional.silu
    got = routed_experts(rows, expert_ids, *(tuple(parts.values()) for parts in stored), activation)
    expected = routed_experts(rows, expert_ids, *dequantized, activation)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_triton
def test_expert_op_compiles_whole():
    """The op as the compiled decode step calls it: one graph (its fake gives the shape), the kernel's result."""
    x, expert_ids, data, scale = _inputs(*CASES[3], torch.float32, "int8")
    compiled = torch.compile(lambda x, ids: torch.ops.herd.expert_gemv(x, ids, data, scale).sum(0) * 2, fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(x, expert_ids), 2 * _kernel(x, expert_ids, data, scale))
    fallback = torch.compile(expert_gemv, fullgraph=True, backend="aot_eager")  # CPU: the torch arithmetic
    torch.testing.assert_close(fallback(x, expert_ids, data, scale), torch_expert_gemv(x, expert_ids, data, scale))


def _float_inputs(pairs, in_features, out_features, experts, ids, dtype, seed=0):
    """x and unquantized experts in dtype (as a bf16 checkpoint stores them); float64 math on them."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(pairs, in_features, generator=generator).to(DEVICE, dtype)
    data = (torch.randn(experts, in_features, out_features, generator=generator) / in_features**0.5).to(DEVICE, dtype)
    expert_ids = torch.tensor(ids, device=DEVICE)
    return x, expert_ids, data, torch.einsum("pk,pkn->pn", x.double(), data.double()[expert_ids])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairs,in_features,out_features,experts,ids", CASES)
def test_float_expert_kernel_equals_float64_math(dtype, pairs, in_features, out_features, experts, ids):
    """Unquantized experts (no scale): each pair's row through its own expert."""
    x, expert_ids, data, exact = _float_inputs(pairs, in_features, out_features, experts, ids, dtype)
    _check(_kernel(x, expert_ids, data, None, **SMALL_BLOCKS), exact, dtype)
    _check(_kernel(x, expert_ids, data, None), exact, dtype)
    _check(_kernel(x, expert_ids, data, None, ranges=3, **SMALL_BLOCKS), exact, dtype)
    _check(torch_expert_gemv(x, expert_ids, data), exact, dtype)


def test_float_experts_take_the_kernel_in_x_dtype_on_its_device():
    x, expert_ids, data, _ = _float_inputs(*CASES[1], torch.float32)
    on_gpu = module.triton is not None and x.is_cuda
    assert module.kernel_applies(x, expert_ids, data) == on_gpu
    assert not module.kernel_applies(x, expert_ids, data.half())  # would round x or the weights
    assert not module.kernel_applies(x, expert_ids, data, torch.ones(4, 1, 128, device=DEVICE))  # float data, a scale
    if on_gpu:
        assert not module.kernel_applies(x, expert_ids, data.cpu())  # experts offloaded to the host


@pytest.mark.skipif(DEVICE != "cuda" or module.triton is None, reason="routed_experts takes the kernel on CUDA")
@pytest.mark.parametrize("ids", [[2], [3, 0, 3, 1]])
def test_routed_experts_read_float_experts_by_kernel_on_cuda(ids, monkeypatch):
    """A decode step's few rows through bf16 experts: the kernel's answer equals the experts picked
    by index (the path it replaced) within bf16 rounding, and the kernel did run."""
    experts, hidden, intermediate = 4, 256, 128
    generator = torch.Generator().manual_seed(4)
    rows = torch.randn(len(ids), hidden, generator=generator).to(DEVICE, torch.bfloat16)
    gate_up = (torch.randn(experts, hidden, 2 * intermediate, generator=generator) / hidden**0.5).to(DEVICE, torch.bfloat16)
    down = (torch.randn(experts, intermediate, hidden, generator=generator) / intermediate**0.5).to(DEVICE, torch.bfloat16)
    expert_ids = torch.tensor(ids, device=DEVICE)
    calls = []
    monkeypatch.setattr("herd.kernels.routed_experts.expert_gemv",
                        lambda *args: calls.append(args[2].shape) or expert_gemv(*args))
    got = routed_experts(rows, expert_ids, gate_up, down, torch.nn.functional.silu)
    assert calls == [gate_up.shape, down.shape]
    gate, up = torch.bmm(rows.float()[:, None], gate_up.float()[expert_ids]).chunk(2, dim=-1)
    expected = torch.bmm(up * torch.nn.functional.silu(gate), down.float()[expert_ids]).squeeze(1)
    torch.testing.assert_close(got.float(), expected, rtol=2**-6, atol=2e-2)
