"""Tensor-in / tensor-out kernels of the decode step, each with a torch fallback.

- `gemv.py`: few-row matmuls with their neighbours fused in (norm before, SwiGLU or rotary and
  the cache write after, the residual add);
- `decode_attention.py`: one query per row over a preallocated cache (flash decoding);
- `routed_experts.py`: Llama 4's routed experts, each row through its own expert, no host sync;
- `expert_gemv.py`: a few rows, each through its own quantized expert (int8, FP8 or int4) read as
  stored, on the tensor cores (routed_experts calls it);
- `fp8_matmul.py`: FP8 rows times FP8 weights at 5-64 rows, on the tensor cores, in partial sums
  the compiled step adds up (gemv.torch_linear calls it in place of `_scaled_mm`);
- `all_reduce.py`: tensor parallel's small sums across the GPUs of one host, each rank writing
  into its peers' symmetric-memory buffers (parallel/symmetric.py calls it).

A kernel takes tensors and returns tensors; it never imports a model block. Each public
function runs its Triton kernel where it applies (CUDA tensors, Triton installed, the shapes
and dtypes it handles) and otherwise the same arithmetic in torch, rounded at the same points.
The decode plans (decoding/plans/) call them; the reference forward never does.

This module holds what the kernels share: the device's SM count and whether a kernel may launch
as a programmatic dependent of the one before.
"""

from __future__ import annotations

import functools
import os

import torch


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
    """Whether the decode kernels launch with programmatic dependent launch: on Hopper and later a
    kernel's programs may then start while the previous kernel still runs, and read what does not
    depend on it (the weights, the older cache slots) before waiting for it (`gdc_wait`: the
    previous kernel, and so every earlier one, has finished and its writes are visible). Each
    kernel lets the next one launch as soon as its own programs start. That is safe because every
    kernel keeps one rule: before its wait it reads only what no kernel of the step writes, and it
    writes only after its wait. (bench/RESULTS.md has what it gained.)"""
    return tensor.is_cuda and _device_has_pdl(_cuda_index(tensor.device))


def interpreted() -> bool:
    """Whether Triton runs its interpreter (the CPU tests): kernels multiply in float32 there, which
    has no bf16 or FP8 products."""
    return os.environ.get("TRITON_INTERPRET") == "1"
