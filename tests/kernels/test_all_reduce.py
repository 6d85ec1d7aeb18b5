"""The lamport all-reduce kernel's protocol (kernels/all_reduce.py), one rank in one process.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET), over
buffers that stand in for every rank's symmetric buffer. The test plays the peers: before each
call it writes their values into this rank's buffer where they would have written them, then
checks what the kernel did: the sum (plus the residual), this rank's values (-0.0 made +0.0)
written into every peer's buffer at this rank's slot of the current generation, the previous
generation emptied as far as its call wrote (so each generation is wholly empty again when the
peers next write it), and the generation moved on by one, over more calls than there are
generations, in sums of different sizes. (Between GPUs, against NCCL: tests/parallel/test_symmetric.py.)
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from herd.kernels import all_reduce

# the peers are played with CPU tensors in Triton's interpreter, which tests/conftest.py turns on only
# without CUDA; on a GPU machine the real kernel is tested between GPUs (tests/parallel/test_symmetric.py)
pytestmark = [pytest.mark.skipif(all_reduce.triton is None, reason="needs Triton"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter's protocol test; on GPUs: "
                                                                   "tests/parallel/test_symmetric.py")]

_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _empty(count: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((count,), -0.0, dtype=dtype).view(_BITS[dtype])


# (rows, width) of the calls that normalise too: widths of a power of two and not, rows more and
# fewer than a program holds (all_reduce.NORM_ELEMENTS)
NORM_SHAPES = {2: (3, 48), 4: (30, 64), 6: (1, 100)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("world, rank", [(2, 0), (3, 1)])
@pytest.mark.parametrize("norm", [False, True], ids=["sum", "sum-norm"])
def test_one_rank_of_a_sum(dtype, world, rank, norm):
    """With `norm`, calls 2, 4 and 6 are `launch_norm`'s (residual + the sum, then its RMSNorm):
    the same protocol, interleaved with the plain kernel's calls as a decode step makes them."""
    from herd.kernels.gemv import torch_rms_norm

    slot = 2 * all_reduce.BLOCK + 64
    buffers = [torch.full((all_reduce.buffer_elements(world, slot),), -0.0, dtype=dtype) for _ in range(world)]
    pointers = torch.tensor([buffer.data_ptr() for buffer in buffers], dtype=torch.int64)
    state = torch.zeros(all_reduce.STATE_LENGTH, dtype=torch.int32)
    generator = torch.Generator().manual_seed(world * 10 + rank)
    # 7 calls over 3 generations, longer and shorter than the call before: a generation's next
    # call must find it empty as far as its last call wrote, not only as far as the call before
    sizes = [3, 2 * all_reduce.BLOCK + 5, 100, all_reduce.BLOCK, 7, slot, 5]
    if norm:
        sizes = [math.prod(NORM_SHAPES[call]) if call in NORM_SHAPES else n for call, n in enumerate(sizes)]
    for call, n in enumerate(sizes):
        generation = int(state[0])
        previous = (generation + all_reduce.PHASES - 1) % all_reduce.PHASES
        previous_written = int(state[2 + previous])
        for peer in range(world):  # this rank's buffer as the peers find it: emptied where they write
            if peer != rank:
                start = (generation * world + peer) * slot
                region = buffers[rank][start : start + slot].view(_BITS[dtype])
                assert torch.equal(region, _empty(slot, dtype)), (call, peer)
        values = [torch.randn(n, generator=generator).to(dtype) for _ in range(world)]
        values[rank][: min(n, 2)] = -0.0
        for peer in range(world):
            if peer != rank:  # the peer's write into this rank's buffer
                start = (generation * world + peer) * slot
                buffers[rank][start : start + n] = values[peer]
        residual = torch.randn(n, generator=generator).to(dtype) if call % 2 else None
        if norm and call in NORM_SHAPES:
            shape = NORM_SHAPES[call]
            residual = torch.randn(n, generator=generator).to(dtype)
            norm_weight = torch.randn(shape[1], generator=generator).to(dtype)
            out, normed = all_reduce.launch_norm(values[rank].view(shape), pointers, state, rank, world, slot,
                                                 residual.view(shape), norm_weight, 1e-5)
            expected = torch_rms_norm(out, norm_weight, 1e-5)  # of the kernel's own sum: the norm alone
            tolerance = {torch.float32: 1e-5}.get(dtype, 2 ** -6)  # a rounding apart, in x's dtype
            assert normed.shape == shape and torch.allclose(normed.float(), expected.float(), rtol=tolerance,
                                                            atol=tolerance), (call, dtype)
            out = out.view(-1)
        else:
            out = all_reduce.launch(values[rank], pointers, state, rank, world, slot, residual=residual)

        exact = sum(value.double() for value in values) + (residual.double() if residual is not None else 0)
        # float32 sums in rank order, rounded once (and again after the residual): within a unit
        # of the dtype's last place of the largest term (the interpreter rounds toward zero)
        terms = sum(value.double().abs() for value in values) + (residual.double().abs() if residual is not None else 0)
        ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-22}[dtype]
        assert out.shape == (n,) and out.dtype == dtype
        assert ((out.double() - exact).abs() <= 2 * ulp * terms).all(), (call, dtype)

        written = values[rank].clone()
        written[written == 0] = 0.0  # +0.0: -0.0 would read as "not written yet"
        for peer in range(world):
            start = (generation * world + rank) * slot
            if peer == rank:
                continue
            assert torch.equal(buffers[peer][start : start + n].view(_BITS[dtype]), written.view(_BITS[dtype])), peer
        for source in range(world):  # all the previous call wrote, whether this call is shorter or longer
            start = (previous * world + source) * slot
            emptied = buffers[rank][start : start + slot].view(_BITS[dtype])
            assert torch.equal(emptied, _empty(slot, dtype)), (call, source)
        written = state[2:].tolist()
        assert written[generation] == n and state[:2].tolist() == [(generation + 1) % all_reduce.PHASES, 0]


def test_too_many_elements_is_refused():
    with pytest.raises(ValueError, match="5 elements do not fit the all-reduce's slots of 4"):
        all_reduce.launch(torch.ones(5), torch.zeros(2, dtype=torch.int64),
                          torch.zeros(all_reduce.STATE_LENGTH, dtype=torch.int32), 0, 2, 4)


# --- two ranks at once -------------------------------------------------------------------------------

SIZES = [5, 2 * all_reduce.BLOCK + 50, 64, 3 * all_reduce.BLOCK, 7, all_reduce.BLOCK, 3 * all_reduce.BLOCK + 64]


def _values(rank: int, call: int, n: int) -> torch.Tensor:
    values = torch.randn(n, generator=torch.Generator().manual_seed(100 * call + rank))
    values[:2] = -0.0  # the "not written yet" pattern, which must still arrive as a value
    return values


def _rank(rank: int, world: int, slot: int, buffers: list, states: list, out) -> None:
    """A forked rank: the buffers were shared before the fork, so every process addresses them alike."""
    torch.set_num_threads(1)
    pointers = torch.tensor([buffer.data_ptr() for buffer in buffers], dtype=torch.int64)
    results = []
    for call, n in enumerate(SIZES):
        residual = torch.full((n,), 0.25) if call % 2 else None
        summed = all_reduce.launch(_values(rank, call, n), pointers, states[rank], rank, world, slot, residual=residual)
        expected = sum(_values(peer, call, n) for peer in range(world))  # float32, in rank order
        if residual is not None:
            expected = residual + expected
        results.append(bool(torch.equal(summed, expected)))
    (out / f"rank{rank}.txt").write_text(repr(results))


def test_two_ranks_in_two_processes_sum_every_call(tmp_path):
    """Two forked processes run the kernel at the same time (Triton's interpreter on the CPU), each
    writing into the other's buffer and waiting for the other's values: seven float32 sums of
    sizes up and down, so every generation is reused after a longer and after a shorter call; each
    equals the sum computed here exactly (float32, two terms: one rounding, as torch's)."""
    import torch.multiprocessing as mp

    world, slot = 2, 3 * all_reduce.BLOCK + 64
    buffers = [torch.full((all_reduce.buffer_elements(world, slot),), -0.0).share_memory_() for _ in range(world)]
    states = [torch.zeros(all_reduce.STATE_LENGTH, dtype=torch.int32).share_memory_() for _ in range(world)]
    ranks = mp.start_processes(_rank, args=(world, slot, buffers, states, tmp_path), nprocs=world,
                               start_method="fork", join=False)
    deadline = time.monotonic() + 120  # a rank left waiting for the other (a broken protocol) must fail, not hang
    while not ranks.join(timeout=1):  # False until every rank has been joined (an error is raised)
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two ranks did not finish in 120 s: one waits for values the other never wrote")
    for rank in range(world):
        assert eval((tmp_path / f"rank{rank}.txt").read_text()) == [True] * len(SIZES), rank  # noqa: S307 - ours
        assert states[rank][0] == len(SIZES) % all_reduce.PHASES
