"""A one-shot all-reduce over symmetric memory: tensor parallel's small sums without NCCL.

A decode step at batch 1 sums a few KB per layer across the ranks (Llama-3.1-8B under tp 2: about
65 all-reduces of 8 KB a step), and NCCL's latency per call, not the bytes, is what that costs.
On GPUs of one host with peer access, torch's symmetric memory (`torch.distributed.
_symmetric_memory`) gives each rank a buffer that every other rank can read over NVLink; its
one-shot all-reduce kernel copies this rank's input into its buffer, waits for the peers to have
done the same, and reads every rank's buffer to sum them: one kernel, no NCCL.

- `prepare(group, device, dtypes)` decides, once, when a tensor-parallel model is set up
  (`TensorParallel.finish`): CUDA tensors, an NCCL group of ranks on one host with peer access to
  each other's GPUs, a torch that has the kernel, and not `HERD_TP_ALLREDUCE=nccl`. It then
  allocates one buffer of `MAX_BYTES` per (group, dtype) and rendezvouses it (a collective: every
  rank calls it, in the same order). Nothing is allocated or rendezvoused per call, so the op can
  run inside a compiled, CUDA-graph-captured step.
- `takes(tensor, group_name)`: whether a sum goes this way (a prepared group and dtype, a CUDA
  tensor of at most `MAX_BYTES`: a decode step's sums up to batch 64 of Llama-3.1-8B; larger ones,
  prefill's, are left to NCCL's bandwidth-minded algorithms, where one-shot's every-rank-reads-
  everything stops paying; the cap is a choice, not yet a measurement). tensor_parallel.all_reduce
  asks, and calls NCCL (torch's functional collective) otherwise.
- `one_shot_all_reduce` is the custom op `herd::one_shot_all_reduce`: opaque to dynamo (it has a
  fake for tracing), a fresh tensor out.

Torch's one-shot kernel (2.11 and 2.13 alike, `torch.ops.symm_mem.one_shot_all_reduce_copy(Tensor
symm_buffer, Tensor local_input, str reduce_op, str group_name)`) sums only ("sum"; the FP8 amax's
MAX stays on NCCL), in bfloat16 and float32 (float16 stays on NCCL), and reads the peers over
their buffers (no NVLink multicast). Each rank adds the ranks' values in rank order (rank 0's,
then rank 1's, ...: `load_and_reduce` in torch's CUDASymmetricMemory-inl.h), so every rank gets
the same bits.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Iterable

import torch
import torch.distributed as dist

ENV = "HERD_TP_ALLREDUCE"  # "nccl": never the one-shot path; "oneshot" or unset: where it applies
CHOICES = ("oneshot", "nccl")
MAX_BYTES = 512 * 1024  # the largest sum that goes one-shot, and each buffer's size
DTYPES = (torch.bfloat16, torch.float32)  # what torch's kernel sums
TORCH_OP = "symm_mem::one_shot_all_reduce_copy"

_buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # (group, dtype) -> rendezvoused, kept for good
_active: dict[str, tuple[torch.dtype, ...]] = {}  # group -> the dtypes its sums take one-shot
_reasons: dict[str, str] = {}  # group -> why its sums stay on NCCL


def requested() -> bool:
    """Whether $HERD_TP_ALLREDUCE lets the one-shot path run ("oneshot" or unset: yes; "nccl": no)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value not in ("", *CHOICES):
        raise ValueError(f"{ENV}={value!r}: use one of {', '.join(CHOICES)} (unset: one-shot where it applies)")
    return value != "nccl"


def is_on(group_name: str) -> bool:
    return group_name in _active


def why_off(group_name: str) -> str | None:
    """Why the group's sums stay on NCCL (None when they go one-shot, or the group was never prepared)."""
    return _reasons.get(group_name)


def fits(tensor: torch.Tensor) -> bool:
    """A size the one-shot path takes: 1 byte to MAX_BYTES, a multiple of 4 bytes (the kernel's
    smallest vector)."""
    size = tensor.numel() * tensor.element_size()
    return 0 < size <= MAX_BYTES and size % 4 == 0


def takes(tensor: torch.Tensor, group_name: str) -> bool:
    """Whether the sum of `tensor` over `group_name` goes one-shot. The same answer on every rank
    (the same group state, shapes and dtypes), as it must be: all take the same collective."""
    return tensor.dtype in _active.get(group_name, ()) and fits(tensor) and tensor.is_cuda


# --- setup ----------------------------------------------------------------------------------------


def prepare(group: Any, device: torch.device, dtypes: Iterable[torch.dtype]) -> str | None:
    """Set up the group's one-shot sums for `dtypes` (those torch's kernel takes), or record why
    not. Collective over `group` where it gets past the local checks (same on every rank). Returns
    None when the group's sums go one-shot, else the reason they stay on NCCL. Called again for the
    same group (another model), it reuses the buffers and follows $HERD_TP_ALLREDUCE anew."""
    name = group.group_name
    wanted = tuple(dtype for dtype in DTYPES if dtype in set(dtypes))
    reason = _local_reason(group, device, wanted)
    if reason is None:
        reason = _peer_reason(group, device)
    if reason is None:
        reason = _allocate(group, device, wanted)
    if reason is None:
        _active[name] = wanted
        _reasons.pop(name, None)
    else:
        _active.pop(name, None)
        _reasons[name] = reason
    return reason


def _local_reason(group: Any, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """What rules the path out without asking the other ranks (the same answer on each)."""
    if not requested():
        return f"{ENV}=nccl"
    if device.type != "cuda":
        return f"tensors on {device.type}, not CUDA"
    backend = str(dist.get_backend(group))
    if "nccl" not in backend:
        return f"the group's backend is {backend}, not NCCL"
    if dist.get_world_size(group) < 2:
        return "a group of one rank"
    if not dtypes:
        return "a dtype the one-shot kernel does not sum (it takes bfloat16 and float32)"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return "this torch has no symmetric memory (torch.distributed._symmetric_memory)"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(TORCH_OP, "CUDA"):
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


def _allocate(group: Any, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """A buffer of MAX_BYTES per dtype, allocated then rendezvoused in the same order on every rank;
    a failure on any rank is every rank's reason (collective)."""
    from torch.distributed import _symmetric_memory as symm_mem

    name = group.group_name
    missing = [dtype for dtype in dtypes if (name, dtype) not in _buffers]  # the same on every rank
    if not missing:
        return None
    # allocating cannot leave the others waiting; a rendezvous can, so all allocate first and agree
    failure = None
    fresh = {}
    try:
        for dtype in missing:
            fresh[dtype] = symm_mem.empty(MAX_BYTES // dtype.itemsize, dtype=dtype, device=device)
    except Exception as error:  # noqa: BLE001 - any failure means NCCL, with the reason given
        failure = f"symmetric memory allocation failed: {error}"
    failure = _first_failure(group, failure)
    if failure is None:
        try:
            for dtype in missing:
                symm_mem.rendezvous(fresh[dtype], name)
        except Exception as error:  # noqa: BLE001
            failure = f"symmetric memory rendezvous failed: {error}"
        failure = _first_failure(group, failure)
    if failure is not None:
        return failure
    for dtype, buffer in fresh.items():
        _buffers[(name, dtype)] = buffer
    return None


def _first_failure(group: Any, failure: str | None) -> str | None:
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, failure, group=group)
    return next((f"rank {rank}: {message}" for rank, message in enumerate(everyone) if message), None)


# --- the op ---------------------------------------------------------------------------------------


@torch.library.custom_op("herd::one_shot_all_reduce", mutates_args=(), schema="(Tensor tensor, str group_name) -> Tensor")
def one_shot_all_reduce(tensor: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of `tensor` over the group's ranks, through the group's symmetric buffer (prepared:
    `takes` said yes). A fresh contiguous tensor of `tensor`'s shape."""
    local = tensor.contiguous()
    if local.storage_offset() * local.element_size() % 16:
        # the kernel reads its input with the buffer's alignment (16 bytes from a buffer's start)
        local = local.clone()
    staging = _buffers[(group_name, tensor.dtype)][: local.numel()].view(local.shape)
    return torch.ops.symm_mem.one_shot_all_reduce_copy(staging, local, "sum", group_name)


@one_shot_all_reduce.register_fake
def _(tensor: torch.Tensor, group_name: str) -> torch.Tensor:
    return tensor.new_empty(tensor.shape)
