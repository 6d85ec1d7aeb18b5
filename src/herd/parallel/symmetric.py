"""Tensor parallel's small sums over symmetric memory, without NCCL.

A decode step at batch 1 sums a few KB per layer across the ranks (Llama-3.1-8B under tp 2: about
65 all-reduces of 8 KB a step), and NCCL's latency per call, not the bytes, is what that costs.
On GPUs of one host with peer access, torch's symmetric memory (`torch.distributed.
_symmetric_memory`) gives each rank a buffer that every other rank can reach over NVLink. Two
kernels use it ($HERD_TP_ALLREDUCE picks; unset: the first that applies):

- "lamport": herd's kernel (kernels/all_reduce.py): each rank writes its values into every peer's
  buffer, each element its own arrival flag; one trip across NVLink, no barrier, the residual
  add fused in (`all_reduce(..., residual=)`), programmatic dependent launch. bfloat16, float16
  and float32; needs Triton.
- "oneshot": torch's one-shot kernel (2.11 and 2.13 alike, `torch.ops.symm_mem.
  one_shot_all_reduce_copy(Tensor symm_buffer, Tensor local_input, str reduce_op, str
  group_name)`): copies the input into this rank's buffer, waits at a barrier for the peers,
  reads every peer's buffer, waits again. bfloat16 and float32.
- "nccl": every sum on NCCL.

Both add the ranks' values in rank order (torch's: `load_and_reduce` in its
CUDASymmetricMemory-inl.h), so every rank gets the same bits. Sums are "sum" only (the FP8
amax's MAX stays on NCCL).

- `prepare(group, device, dtypes)` decides, once, when a tensor-parallel model is set up
  (`TensorParallel.finish`): CUDA tensors, an NCCL group of ranks on one host with peer access to
  each other's GPUs, a torch (and Triton) that has the kernel, and not `HERD_TP_ALLREDUCE=nccl`.
  It then allocates the buffers per (group, dtype) and rendezvouses them (a collective: every rank
  calls it, in the same order). Nothing is allocated or rendezvoused per call, so the op can run
  inside a compiled, CUDA-graph-captured step.
- `takes(tensor, group_name)`: whether a sum goes this way (a prepared group and dtype, a CUDA
  tensor of at most `MAX_BYTES`: a decode step's sums up to batch 64 of Llama-3.1-8B; larger ones,
  prefill's, are left to NCCL's bandwidth-minded algorithms, where every-rank-reads-everything
  stops paying; the cap is a choice, not yet a measurement). tensor_parallel.all_reduce asks, and
  calls NCCL (torch's functional collective) otherwise.
- `symmetric_all_reduce` is the custom op `herd::symmetric_all_reduce`: opaque to dynamo (it has a
  fake for tracing), a fresh tensor out.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Iterable, NamedTuple

import torch
import torch.distributed as dist

from ..kernels import all_reduce, programmatic_launch

ENV = "HERD_TP_ALLREDUCE"  # "lamport", "oneshot", "nccl"; unset: the first kernel that applies
CHOICES = ("lamport", "oneshot", "nccl")
MAX_BYTES = 512 * 1024  # the largest sum that goes over symmetric memory, and each slot's size
KERNEL_DTYPES = {
    "lamport": (torch.bfloat16, torch.float16, torch.float32),
    "oneshot": (torch.bfloat16, torch.float32),  # what torch's kernel sums
}
DTYPES = KERNEL_DTYPES["oneshot"]  # summed by either kernel
TORCH_OP = "symm_mem::one_shot_all_reduce_copy"


class Lamport(NamedTuple):
    """One (group, dtype)'s buffers for kernels/all_reduce.py."""

    buffer: torch.Tensor  # this rank's, rendezvoused
    pointers: torch.Tensor  # (world,) int64: every rank's buffer, as this process addresses it
    state: torch.Tensor  # (all_reduce.STATE_LENGTH,) int32: [generation, programs finished, written per generation]
    rank: int
    world: int
    slot: int  # elements per source rank and generation


_buffers: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}  # (group, dtype, kernel) -> rendezvoused, kept for good
_lamport: dict[tuple[str, torch.dtype], Lamport] = {}
_active: dict[str, tuple[str, tuple[torch.dtype, ...]]] = {}  # group -> (kernel, the dtypes its sums take)
_reasons: dict[str, str] = {}  # group -> why its sums stay on NCCL


def requested() -> str | None:
    """The kernel $HERD_TP_ALLREDUCE asks for ("lamport", "oneshot" or "nccl"), None when unset."""
    value = os.environ.get(ENV, "").strip().lower()
    if value not in ("", *CHOICES):
        raise ValueError(f"{ENV}={value!r}: use one of {', '.join(CHOICES)} (unset: the first that applies)")
    return value or None


def is_on(group_name: str) -> bool:
    return group_name in _active


def kernel(group_name: str) -> str | None:
    """Which kernel the group's sums take ("lamport" or "oneshot"), None when they stay on NCCL."""
    return _active[group_name][0] if group_name in _active else None


def why_off(group_name: str) -> str | None:
    """Why the group's sums stay on NCCL (None when they go over symmetric memory, or the group was never prepared)."""
    return _reasons.get(group_name)


def fits(tensor: torch.Tensor) -> bool:
    """A size the symmetric path takes: 1 byte to MAX_BYTES, a multiple of 4 bytes (torch's
    kernel's smallest vector)."""
    size = tensor.numel() * tensor.element_size()
    return 0 < size <= MAX_BYTES and size % 4 == 0


def takes(tensor: torch.Tensor, group_name: str) -> bool:
    """Whether the sum of `tensor` over `group_name` goes over symmetric memory. The same answer on
    every rank (the same group state, shapes and dtypes), as it must be: all take the same collective."""
    return group_name in _active and tensor.dtype in _active[group_name][1] and fits(tensor) and tensor.is_cuda


# --- setup ----------------------------------------------------------------------------------------


def prepare(group: Any, device: torch.device, dtypes: Iterable[torch.dtype]) -> str | None:
    """Set up the group's sums over symmetric memory for `dtypes` (those the kernel takes), or
    record why not. Collective over `group` where it gets past the local checks (same on every
    rank). Returns None when the group's sums go over symmetric memory, else the reason they stay
    on NCCL. Called again for the same group (another model), it reuses the buffers and follows
    $HERD_TP_ALLREDUCE anew."""
    name = group.group_name
    asked = requested()
    kernels = [asked] if asked in KERNEL_DTYPES else list(KERNEL_DTYPES) if asked is None else []
    reason = f"{ENV}=nccl" if not kernels else None
    chosen = None
    for candidate in kernels:
        wanted = tuple(dtype for dtype in KERNEL_DTYPES[candidate] if dtype in set(dtypes))
        reason = _local_reason(group, device, candidate, wanted)
        if reason is None:
            chosen = candidate, wanted
            break
    if chosen is not None:
        reason = _peer_reason(group, device)
    if reason is None:
        reason = _allocate(group, device, *chosen)
    if reason is None:
        _active[name] = chosen
        _reasons.pop(name, None)
    else:
        _active.pop(name, None)
        _reasons[name] = reason
    return reason


def _local_reason(group: Any, device: torch.device, kernel_name: str, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """What rules `kernel_name` out without asking the other ranks (the same answer on each)."""
    if device.type != "cuda":
        return f"tensors on {device.type}, not CUDA"
    backend = str(dist.get_backend(group))
    if "nccl" not in backend:
        return f"the group's backend is {backend}, not NCCL"
    if dist.get_world_size(group) < 2:
        return "a group of one rank"
    if not dtypes:
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in KERNEL_DTYPES[kernel_name])
        return f"a dtype the {kernel_name} kernel does not sum (it takes {names})"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return "this torch has no symmetric memory (torch.distributed._symmetric_memory)"
    if kernel_name == "lamport":
        if all_reduce.triton is None:
            return "Triton is not installed (the lamport kernel is Triton's)"
    elif not torch._C._dispatch_has_kernel_for_dispatch_key(TORCH_OP, "CUDA"):
        return f"this torch has no CUDA kernel for {TORCH_OP}"
    return None


def _peer_reason(group: Any, device: torch.device) -> str | None:
    """Whether every rank's GPU is on one host and reachable from every other rank's (collective)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = {str(torch.cuda.get_device_properties(other).uuid): other for other in range(torch.cuda.device_count())}
    mine = str(torch.cuda.get_device_properties(index).uuid)
    reachable = {uuid for uuid, other in visible.items() if other != index and torch.cuda.can_device_access_peer(index, other)}
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (socket.gethostname(), mine, reachable), group=group)
    if len({host for host, _, _ in everyone}) > 1:
        return "the group's ranks are on more than one host"
    gpus = [gpu for _, gpu, _ in everyone]
    if len(set(gpus)) < len(gpus):
        return "two ranks share a GPU"
    for rank, (_, gpu, reaches) in enumerate(everyone):
        missing = [other for other in gpus if other != gpu and other not in reaches]
        if missing:
            return f"rank {rank}'s GPU has no peer access to GPU {missing[0]} (or does not see it)"
    return None


def _allocate(group: Any, device: torch.device, kernel_name: str, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """The kernel's buffer per dtype (MAX_BYTES for torch's; for lamport's a slot of MAX_BYTES
    per rank and generation, emptied), allocated then rendezvoused in the same order on every
    rank; a failure on any rank is every rank's reason (collective)."""
    from torch.distributed import _symmetric_memory as symm_mem

    name = group.group_name
    world = dist.get_world_size(group)
    missing = [dtype for dtype in dtypes if (name, dtype, kernel_name) not in _buffers]  # the same on every rank
    if not missing:
        return None
    # allocating cannot leave the others waiting; a rendezvous can, so all allocate first and agree
    failure = None
    fresh = {}
    try:
        for dtype in missing:
            slot = MAX_BYTES // dtype.itemsize
            size = all_reduce.buffer_elements(world, slot) if kernel_name == "lamport" else slot
            fresh[dtype] = symm_mem.empty(size, dtype=dtype, device=device)
            if kernel_name == "lamport":
                fresh[dtype].fill_(-0.0)  # every element "not written yet"
    except Exception as error:  # noqa: BLE001 - any failure means NCCL, with the reason given
        failure = f"symmetric memory allocation failed: {error}"
    failure = _first_failure(group, failure)
    handles = {}
    if failure is None:
        try:
            for dtype in missing:
                handles[dtype] = symm_mem.rendezvous(fresh[dtype], name)
        except Exception as error:  # noqa: BLE001
            failure = f"symmetric memory rendezvous failed: {error}"
        failure = _first_failure(group, failure)
    if failure is not None:
        return failure
    for dtype, buffer in fresh.items():
        _buffers[(name, dtype, kernel_name)] = buffer
        if kernel_name == "lamport":
            handle = handles[dtype]
            rank = dist.get_rank(group)
            pointers = [handle.get_buffer(peer, (buffer.numel(),), dtype).data_ptr() for peer in range(world)]
            _lamport[(name, dtype)] = Lamport(
                buffer, torch.tensor(pointers, dtype=torch.int64, device=device),
                torch.zeros(all_reduce.STATE_LENGTH, dtype=torch.int32, device=device), rank, world,
                MAX_BYTES // dtype.itemsize)
    torch.cuda.synchronize(device)  # every buffer emptied before any rank may write into a peer's
    dist.barrier(group)
    return None


def _first_failure(group: Any, failure: str | None) -> str | None:
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, failure, group=group)
    return next((f"rank {rank}: {message}" for rank, message in enumerate(everyone) if message), None)


# --- the op ---------------------------------------------------------------------------------------


@torch.library.custom_op("herd::symmetric_all_reduce", mutates_args=(),
                         schema="(Tensor tensor, Tensor? residual, str group_name) -> Tensor")
def symmetric_all_reduce(tensor: torch.Tensor, residual: torch.Tensor | None, group_name: str) -> torch.Tensor:
    """The sum of `tensor` over the group's ranks (plus `residual`, of its shape and dtype, when
    given), through the group's symmetric buffers (prepared: `takes` said yes). A fresh contiguous
    tensor of `tensor`'s shape."""
    if kernel(group_name) == "lamport":
        buffers = _lamport[(group_name, tensor.dtype)]
        return all_reduce.launch(tensor, buffers.pointers, buffers.state, buffers.rank, buffers.world, buffers.slot,
                                 residual=residual, pdl=programmatic_launch(tensor))
    local = tensor.contiguous()
    if local.storage_offset() * local.element_size() % 16:
        # the kernel reads its input with the buffer's alignment (16 bytes from a buffer's start)
        local = local.clone()
    staging = _buffers[(group_name, tensor.dtype, "oneshot")][: local.numel()].view(local.shape)
    summed = torch.ops.symm_mem.one_shot_all_reduce_copy(staging, local, "sum", group_name)
    return summed if residual is None else residual + summed


@symmetric_all_reduce.register_fake
def _(tensor: torch.Tensor, residual: torch.Tensor | None, group_name: str) -> torch.Tensor:
    return tensor.new_empty(tensor.shape)


@torch.library.custom_op("herd::symmetric_all_reduce_norm", mutates_args=(),
                         schema="(Tensor tensor, Tensor residual, Tensor norm_weight, float eps, str group_name) -> (Tensor, Tensor)")
def symmetric_all_reduce_norm(tensor: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                              group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + the sum of `tensor` (rows, width) over the group's ranks, its RMSNorm by
    `norm_weight`) in one kernel: the lamport kernel's rows variant (`fuses_norm` said yes)."""
    buffers = _lamport[(group_name, tensor.dtype)]
    return all_reduce.launch_norm(tensor, buffers.pointers, buffers.state, buffers.rank, buffers.world, buffers.slot,
                                  residual, norm_weight, eps, pdl=programmatic_launch(tensor))


@symmetric_all_reduce_norm.register_fake
def _(tensor, residual, norm_weight, eps, group_name):
    return tensor.new_empty(tensor.shape), tensor.new_empty(tensor.shape)


def fuses_norm(tensor: torch.Tensor, group_name: str) -> bool:
    """Whether the sum of `tensor` (rows, width) can also normalise its rows in the same kernel
    (the lamport kernel's rows variant): `takes`, and the lamport kernel."""
    return takes(tensor, group_name) and kernel(group_name) == "lamport" and tensor.dim() == 2
