"""The all-reduce over symmetric memory (parallel/symmetric.py: herd's lamport kernel or torch's one-shot).

On CPUs: the choice (never on CPU tensors or gloo, $HERD_TP_ALLREDUCE picks the kernel or turns it
off, the size cap), the op's fake and dynamo tracing it into a graph (fake CUDA tensors), and two
forked gloo ranks whose sums stay on gloo. On 2 GPUs, for each kernel: the sum equals NCCL's bit
for bit (bfloat16, float32 (and float16 for lamport), sizes up to the cap, odd layouts, with and
without the residual add; lamport's sums that also normalise), eagerly, compiled and inside a
CUDA graph replayed many times. (Tiny models under tp 2 on the default kernel, against one GPU's
tokens: tests/parallel/test_tensor_parallel.py; the lamport kernel's own protocol on one CPU
process: tests/kernels/test_all_reduce.py.)
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from herd.kernels import gemv
from herd.parallel import symmetric, tensor_parallel
from tests.parallel.test_tensor_parallel import free_port

CUDA_PAIR = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


def test_environment_switch(monkeypatch):
    monkeypatch.delenv(symmetric.ENV, raising=False)
    assert symmetric.requested() is None
    for value, wanted in (("oneshot", "oneshot"), ("ONESHOT", "oneshot"), ("lamport", "lamport"), ("nccl", "nccl"),
                          (" nccl ", "nccl"), ("", None)):
        monkeypatch.setenv(symmetric.ENV, value)
        assert symmetric.requested() == wanted, value
    monkeypatch.setenv(symmetric.ENV, "mpi")
    with pytest.raises(ValueError, match=r"HERD_TP_ALLREDUCE='mpi': use one of lamport, oneshot, nccl"):
        symmetric.requested()


def test_prepare_says_why_not_before_any_collective(monkeypatch):
    """The local reasons come first: a group that is not there (no collective runs) is enough."""
    group = SimpleNamespace(group_name="nowhere")
    monkeypatch.setenv(symmetric.ENV, "nccl")
    assert symmetric.prepare(group, torch.device("cuda", 0), [torch.bfloat16]) == "HERD_TP_ALLREDUCE=nccl"
    monkeypatch.delenv(symmetric.ENV)
    assert symmetric.prepare(group, torch.device("cpu"), [torch.float32]) == "tensors on cpu, not CUDA"
    assert not symmetric.is_on("nowhere") and symmetric.why_off("nowhere") == "tensors on cpu, not CUDA"


def test_size_cap():
    for dtype in symmetric.DTYPES:
        at_cap = symmetric.MAX_BYTES // dtype.itemsize
        assert symmetric.fits(torch.empty(at_cap, dtype=dtype, device="meta"))
        assert symmetric.fits(torch.empty(1, 4096, dtype=dtype, device="meta"))  # a batch-1 decode step's
        assert not symmetric.fits(torch.empty(at_cap + 2, dtype=dtype, device="meta"))
        assert not symmetric.fits(torch.empty(0, dtype=dtype, device="meta"))
    assert not symmetric.fits(torch.empty(3, dtype=torch.bfloat16, device="meta"))  # 6 bytes: not whole 4-byte words


def test_only_prepared_cuda_sums_within_the_cap_go_one_shot(monkeypatch):
    monkeypatch.setitem(symmetric._active, "tp", ("oneshot", (torch.bfloat16,)))
    assert not symmetric.takes(torch.ones(8, dtype=torch.bfloat16), "tp")  # a CPU tensor
    with FakeTensorMode():  # CUDA tensors without a GPU
        small = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
        assert symmetric.takes(small, "tp")
        assert not symmetric.takes(small, "another group")
        assert not symmetric.takes(small.float(), "tp")  # a dtype the group was not prepared for
        assert not symmetric.takes(small.half(), "tp")
        assert not symmetric.takes(torch.empty(2 * symmetric.MAX_BYTES, dtype=torch.bfloat16, device="cuda"), "tp")


def test_the_op_is_traced_whole_into_the_graph(monkeypatch):
    """dynamo (strict export) sees tensor_parallel.all_reduce take the symmetric op for a prepared
    group's CUDA tensor: one opaque node, its output of the input's shape (the fake); a residual of
    the sum's shape and dtype goes into the op, one that only broadcasts is added after it."""
    monkeypatch.setitem(symmetric._active, "tp", ("lamport", (torch.bfloat16,)))

    class Step(torch.nn.Module):
        def forward(self, x, residual, row, norm_weight):
            fused = tensor_parallel.all_reduce(x * 2, "tp", residual=residual)
            hidden, normed = tensor_parallel.all_reduce_norm(fused, "tp", residual, norm_weight, 1e-5)
            return tensor_parallel.all_reduce(hidden + normed, "tp", residual=row) + 1

    with FakeTensorMode():
        x = torch.empty(2, 4096, dtype=torch.bfloat16, device="cuda")
        row = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
        norm_weight = torch.empty(4096, dtype=torch.bfloat16, device="cuda")
        exported = torch.export.export(Step(), (x, torch.empty_like(x), row, norm_weight), strict=True)
        summed = torch.ops.herd.symmetric_all_reduce(x.t(), None, "tp")
    calls = [node for node in exported.graph.nodes if node.target is torch.ops.herd.symmetric_all_reduce.default]
    assert len(calls) == 2 and all(call.args[2] == "tp" for call in calls)
    norms = [node for node in exported.graph.nodes if node.target is torch.ops.herd.symmetric_all_reduce_norm.default]
    assert len(norms) == 1 and norms[0].args[3:] == (1e-5, "tp")
    assert calls[0].args[1] is not None and calls[1].args[1] is None  # the (1, 4096) row: added outside
    assert summed.shape == (4096, 2) and summed.is_contiguous() and summed.dtype == torch.bfloat16


def _gloo_rank(rank: int, size: int, port: int, out: Path) -> None:
    """A forked gloo rank: prepare says why not, sums (small and above the cap) go through gloo."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # forked: the parent's OpenMP threads are not here (a parallel op would wait for them)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    try:
        group = dist.group.WORLD
        reason = symmetric.prepare(group, torch.device("cpu"), [torch.float32])
        results = {"reason": reason, "on": symmetric.is_on(group.group_name)}
        for name, numel in (("small", 1024), ("large", symmetric.MAX_BYTES)):  # 4 KB, 2 MB of float32
            x = torch.arange(numel, dtype=torch.float32) * (rank + 1)
            results[name] = torch.equal(tensor_parallel.all_reduce(x, group.group_name), torch.arange(numel) * 3.0)
        (out / f"rank{rank}.txt").write_text(repr(results))
    finally:
        dist.destroy_process_group()


def test_gloo_ranks_keep_their_sums_on_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_gloo_rank, args=(2, free_port(), tmp_path), nprocs=2, start_method="fork")
    for rank in range(2):
        results = eval((tmp_path / f"rank{rank}.txt").read_text())  # noqa: S307 - our own repr
        assert results == {"reason": "tensors on cpu, not CUDA", "on": False, "small": True, "large": True}


def _lamport_rank(rank: int, size: int, port: int, folders: dict, buffers: list, states: list, out: Path) -> None:
    """A forked gloo rank whose sums go through herd's kernel (Triton's interpreter) over buffers
    shared before the fork, as symmetric memory would give them on GPUs: each tiny model's logits
    and greedy tokens (plain path, and the decode plans on the CPU, their residual adds fused into
    the sums, Llama's next RMSNorm too), then the same with every sum on gloo; and how many sums the kernel made."""
    import torch.distributed as dist

    import herd
    from herd.decoding import decoders
    from herd.kernels import all_reduce
    from tests.conftest import left_padded_prompts

    torch.set_num_threads(1)  # forked: the parent's OpenMP threads are not here (a parallel op would wait for them)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    launches = {"sums": 0, "with residual": 0, "with norm": 0}
    launch, launch_norm = all_reduce.launch, all_reduce.launch_norm

    def counted(*args, residual=None, **kwargs):
        launches["sums"] += 1
        launches["with residual"] += residual is not None
        return launch(*args, residual=residual, **kwargs)

    def counted_norm(*args, **kwargs):
        launches["sums"] += 1
        launches["with norm"] += 1
        return launch_norm(*args, **kwargs)

    all_reduce.launch, all_reduce.launch_norm = counted, counted_norm
    # the GPU rule, CPU tensors allowed
    symmetric.takes = lambda tensor, group_name: (
        symmetric.kernel(group_name) is not None and tensor.dtype in symmetric._active[group_name][1]
        and symmetric.fits(tensor))
    try:
        slot = symmetric.MAX_BYTES // 4
        pointers = torch.tensor([buffer.data_ptr() for buffer in buffers], dtype=torch.int64)
        ids, mask = left_padded_prompts((11, 6))
        greedy = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        results = {}
        for name, (cls, folder) in folders.items():
            model = getattr(herd, cls).from_pretrained(folder, tp_plan="auto", progress=False)
            group_name = dist.group.WORLD.group_name
            for kind in ("lamport", "gloo"):
                if kind == "lamport":
                    symmetric._active[group_name] = ("lamport", (torch.float32,))
                    symmetric._lamport[(group_name, torch.float32)] = symmetric.Lamport(
                        buffers[rank], pointers, states[rank], rank, size, slot)
                else:
                    symmetric._active.pop(group_name)
                before = dict(launches)
                with torch.no_grad():
                    logits = model(input_ids=ids, attention_mask=mask).logits
                plain = model.generate(ids, disable_compile=True, **greedy)
                decoders.FAST_DEVICES = ("cuda", "cpu")
                try:
                    fast = model.generate(ids, **greedy)
                finally:
                    decoders.FAST_DEVICES = ("cuda",)
                made = {key: launches[key] - before[key] for key in launches}
                results[(name, kind)] = (logits, plain, fast, made)
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_lamport_sums_give_gloo_logits_and_tokens_in_forked_cpu_ranks(tmp_path):
    """Herd's all-reduce kernel inside real models, on CPUs: two forked ranks (gloo for the rest)
    sum through the kernel in Triton's interpreter, over buffers shared before the fork. Tiny Llama
    and Llama 4 (float32) then give gloo's logits and greedy tokens exactly, on the plain path and
    through the decode plans (where the residual add is fused into the sum); a call left unmade on
    one rank would hang them (not fail), so the two ranks' work is bounded by the launcher's join."""
    import time

    import torch.multiprocessing as mp

    from herd.kernels import all_reduce
    from tests.conftest import reference_llama
    from tests.parallel.test_tensor_parallel import _llama4_reference

    reference_llama().save_pretrained(tmp_path / "llama")
    _llama4_reference().save_pretrained(tmp_path / "llama4")
    folders = {"llama": ("LlamaForCausalLM", tmp_path / "llama"), "llama4": ("Llama4ForCausalLM", tmp_path / "llama4")}
    slot = symmetric.MAX_BYTES // 4
    buffers = [torch.full((all_reduce.buffer_elements(2, slot),), -0.0).share_memory_() for _ in range(2)]
    states = [torch.zeros(all_reduce.STATE_LENGTH, dtype=torch.int32).share_memory_() for _ in range(2)]
    ranks = mp.start_processes(_lamport_rank, args=(2, free_port(), folders, buffers, states, tmp_path), nprocs=2,
                               start_method="fork", join=False)
    deadline = time.monotonic() + 300
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the ranks did not finish in 300 s: one waits for a sum the other never made")
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name in folders:
        for rank in results:
            logits, plain, fast, made = rank[(name, "lamport")]
            gloo_logits, gloo_plain, gloo_fast, gloo_made = rank[(name, "gloo")]
            assert made["sums"] > 0 and gloo_made["sums"] == 0, (name, made, gloo_made)
            # the decode plans fuse the residual add into the sums; Llama's the next RMSNorm too,
            # beyond one row (on the CPU, where the few-row kernel never runs, at every row count)
            assert made["with residual" if name == "llama4" else "with norm"] > 0, (name, made)
            assert (made["with norm"] > 0) == (name == "llama"), (name, made)
            assert torch.equal(logits, gloo_logits), name
            assert torch.equal(plain, gloo_plain) and torch.equal(fast, gloo_fast), name
        assert results[0][(name, "lamport")][3] == results[1][(name, "lamport")][3]  # the same sums on both ranks


# --- 2 GPUs ----------------------------------------------------------------------------------------


def _gpu_rank(rank: int, size: int, port: int, kernel_name: str) -> None:
    """A spawned NCCL rank: the kernel's sums against NCCL's (funcol's) ones, bit for bit."""
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as funcol

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ[symmetric.ENV] = kernel_name
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=device)
    try:
        group = dist.group.WORLD
        name = group.group_name
        dtypes = symmetric.KERNEL_DTYPES[kernel_name]
        assert symmetric.prepare(group, device, dtypes) is None, symmetric.why_off(name)
        assert symmetric.kernel(name) == kernel_name
        buffers = {key: buffer.data_ptr() for key, buffer in symmetric._buffers.items()}
        generator = torch.Generator(device).manual_seed(rank)

        def nccl(x):
            summed = funcol.all_reduce(x, "sum", name)
            return summed.wait() if isinstance(summed, funcol.AsyncCollectiveTensor) else summed

        def same_on_every_rank(x):
            everyone = [torch.empty_like(x) for _ in range(size)]
            dist.all_gather(everyone, x.contiguous())
            return all(torch.equal(other, everyone[0]) for other in everyone)

        for dtype in dtypes:
            at_cap = symmetric.MAX_BYTES // dtype.itemsize
            for shape in ((1, 4096), (3, 5, 64), (64, 4096 * 2 // dtype.itemsize), (at_cap,), (1, 4096), (2,)):
                x = torch.randn(shape, generator=generator, device=device).to(dtype)
                x.view(-1)[:2] = torch.tensor([-0.0, 0.0])  # -0.0 is the lamport kernel's "not written yet"
                assert symmetric.takes(x, name), (dtype, shape)
                summed = tensor_parallel.all_reduce(x, name)
                assert torch.equal(summed, nccl(x)), (dtype, shape)
                assert same_on_every_rank(summed), (dtype, shape)
                residual = torch.randn(shape, generator=generator, device=device).to(dtype)
                assert torch.equal(tensor_parallel.all_reduce(x, name, residual=residual), residual + nccl(x))
            columns = torch.randn(48, 64, generator=generator, device=device).to(dtype).t()  # not contiguous
            assert torch.equal(tensor_parallel.all_reduce(columns, name), nccl(columns.contiguous()))
            shifted = torch.randn(1 + 4096, generator=generator, device=device).to(dtype)[1:]  # offset by 1 element
            assert torch.equal(tensor_parallel.all_reduce(shifted, name), nccl(shifted.clone()))
            large = torch.randn(at_cap * 2, generator=generator, device=device).to(dtype)
            assert not symmetric.takes(large, name)
            assert torch.equal(tensor_parallel.all_reduce(large, name), nccl(large))
            shared = torch.Generator(device).manual_seed(7)  # the residual stream and the norm: every rank's alike
            for rows, width in ((1, 4096), (64, 4096), (5, 5120), (3, 48)):  # sums that also normalise
                x = torch.randn(rows, width, generator=generator, device=device).to(dtype)
                residual = torch.randn(rows, width, generator=shared, device=device).to(dtype)
                norm_weight = torch.randn(width, generator=shared, device=device).to(dtype)
                fused = tensor_parallel.all_reduce_norm(x, name, residual, norm_weight, 1e-5)
                assert (fused is not None) == (kernel_name == "lamport" and symmetric.fits(x)), (dtype, rows, width)
                if fused is not None:
                    out, normed = fused
                    assert torch.equal(out, residual + nccl(x)), (dtype, rows, width)
                    reference = gemv.torch_rms_norm(out, norm_weight, 1e-5)
                    tolerance = {torch.float32: 1e-5}.get(dtype, 2 ** -7)  # a rounding apart at most
                    assert torch.allclose(normed.float(), reference.float(), rtol=tolerance, atol=tolerance)
                    assert same_on_every_rank(normed), (dtype, rows, width)

        # compiled (the op opaque in the graph) and captured in a CUDA graph, replayed on new inputs:
        # seven sums a replay, so the lamport kernel's generations come round at every position
        def step(x, residual):
            for _ in range(6):
                x = tensor_parallel.all_reduce(x * 0.5, name, residual=residual)
            return tensor_parallel.all_reduce(x * 2, name) + 1

        def eager(x, residual):
            for _ in range(6):
                x = residual + nccl(x * 0.5)
            return nccl(x * 2) + 1

        compiled = torch.compile(step, fullgraph=True, dynamic=False)
        for dtype in dtypes:
            static = torch.randn(4, 4096, generator=generator, device=device).to(dtype)
            static_residual = torch.randn(4, 4096, generator=generator, device=device).to(dtype)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    compiled(static, static_residual)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = compiled(static, static_residual)
            for replay in range(5):
                static.copy_(torch.randn(4, 4096, generator=generator, device=device).to(dtype))
                graph.replay()
                if replay % 2:  # eager sums between replays move the generations on by one
                    tensor_parallel.all_reduce(static[:1], name)
                assert torch.equal(captured, eager(static, static_residual)), dtype
                assert same_on_every_rank(captured), dtype
        torch.cuda.synchronize()
        assert {key: buffer.data_ptr() for key, buffer in symmetric._buffers.items()} == buffers  # no new buffers
    finally:
        dist.destroy_process_group()


@CUDA_PAIR
@pytest.mark.parametrize("kernel_name", ["lamport", "oneshot"])
def test_symmetric_sums_equal_nccl_on_two_gpus(kernel_name):
    import torch.multiprocessing as mp

    mp.start_processes(_gpu_rank, args=(2, free_port(), kernel_name), nprocs=2, start_method="spawn")
