"""The eager forward's elementwise work, each piece compiled into one kernel on CUDA.

At prefill sizes the matmuls and fused attention are library kernels already, and what is left
is elementwise: eager RMSNorm is six passes over the activations, SwiGLU's activation three and
rotary five on each of query and key. For a 2048-token prompt of an 8B model those passes cost
about a sixth of the forward. `fused(fn, args, dynamic)` runs such a function compiled (once per
process and shape family: the dimensions named in `dynamic`, the sequence or rows, are symbolic,
so any prompt length reuses the code) as one pass.

The compiled version runs for CUDA inputs of at least `MIN_ROWS` rows (or positions), outside of another
compilation (the fast path's decode step compiles its own code around the same arithmetic),
unless turned off (`disabled()`, or HERD_DISABLE_FUSED_KERNELS=1). Elsewhere the function runs
as written: the same arithmetic, rounded at the same points.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Sequence

import torch

MIN_ROWS = 64  # fewer rows (decode steps, short prompts): launches dominate, compiling gains nothing

_disabled_depth = 0
_compiled: dict[Callable, Callable] = {}


@contextlib.contextmanager
def disabled():
    """Run every function as written inside this block (generate(disable_compile=True) uses it)."""
    global _disabled_depth
    _disabled_depth += 1
    try:
        yield
    finally:
        _disabled_depth -= 1


def enabled() -> bool:
    """False inside `disabled()` or with HERD_DISABLE_FUSED_KERNELS=1 (also read by layers/gemv.py)."""
    return _disabled_depth == 0 and not os.environ.get("HERD_DISABLE_FUSED_KERNELS")


@functools.cache
def _device_has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def multiprocessors(device: torch.device) -> int:
    """The device's SM count (persistent kernels size their grid by it); 1 on a CPU (Triton's interpreter)."""
    return _multiprocessors(_cuda_index(device)) if device.type == "cuda" else 1


def programmatic_launch(tensor: torch.Tensor) -> bool:
    """Whether the decode kernels (layers/gemv.py, layers/decode_attention.py) launch with
    programmatic dependent launch: on Hopper and later a kernel's programs may then start while
    the previous kernel still runs, and read what does not depend on it (the weights, the older
    cache slots) before waiting for it (`gdc_wait`: the previous kernel, and so every earlier
    one, has finished and its writes are visible). Each kernel lets the next one launch as soon
    as its own programs start. That is safe because every kernel keeps one rule: before its
    wait it reads only what no kernel of the step writes, and it writes only after its wait.
    Measured on an H100 against letting the next kernel launch only after the wait: 8B step
    5.57 -> 5.43 ms, 1B 1.075 -> 1.045 ms. HERD_DISABLE_PDL=1 turns it off."""
    return tensor.is_cuda and not os.environ.get("HERD_DISABLE_PDL") and _device_has_pdl(_cuda_index(tensor.device))


def _wants_compiled(args: Sequence, dynamic: Sequence[tuple[int, ...]]) -> bool:
    return (
        args[0].is_cuda
        and all(args[i].shape[dim] >= MIN_ROWS for i, dims in enumerate(dynamic) for dim in dims)
        and enabled()
        and not torch.compiler.is_compiling()
    )


def fused(fn: Callable, args: Sequence, dynamic: Sequence[tuple[int, ...]]):
    """fn(*args), compiled on CUDA when the dimensions that vary between calls (dynamic[i]: those of
    args[i], the sequence or the rows) are each at least MIN_ROWS long."""
    if not _wants_compiled(args, dynamic):
        return fn(*args)
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)  # static but for the dimensions marked below
    for tensor, dims in zip(args, dynamic):
        for dim in dims:
            torch._dynamo.mark_dynamic(tensor, dim)
    return _compiled[fn](*args)
