"""Compilation and CUDA-graph capture of the decode step.

Decoding one token at small batch is bound by launch overhead long before it is bound by
memory: the plain forward launches hundreds of small kernels and syncs with the host. So:

- a plan's pieces (embedding, each kind of layer, head) are compiled with torch.compile once
  (regional compilation: layers of one structure share the compiled code, their weights are
  inputs, so compile time does not grow with depth) — `compile_units`;
- the cache length is a dynamic dimension, and lengths are rounded up to few buckets
  (`cache_bucket`), so other prompt lengths and max_new_tokens reuse the code;
- the whole step is captured as one CUDA graph per (batch, bucket, ...) and replayed per token;
- greedy decoding can choose each token inside the graph (`greedy_tail`): a block of tokens is
  that many replays and nothing between them.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable

import torch

SMALLEST_BUCKET = 256
LARGEST_POWER_OF_TWO_BUCKET = 4096


def cache_bucket(length: int) -> int:
    """The cache length used for `length` positions: a power of two from 256 up to 4096, then a
    multiple of 4096. Few distinct shapes, at most twice the memory needed (below 4096)."""
    if length <= LARGEST_POWER_OF_TWO_BUCKET:
        size = SMALLEST_BUCKET
        while size < length:
            size *= 2
        return size
    return -(-length // LARGEST_POWER_OF_TWO_BUCKET) * LARGEST_POWER_OF_TWO_BUCKET


@functools.cache
def compiled_once(fn: Callable) -> Callable:
    """fn compiled once per process (whole graph, static shapes but for dimensions marked
    dynamic): it holds no weights, so every model shares it (store updates, the greedy tail)."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


# combo_kernels: the small independent kernels of a layer launch as one (Llama 4's rotary of q and
# k and its cache writes). coordinate_descent_tuning: what makes inductor turn one-row matmuls it
# owns (larger batches, Llama 4's layers) into its own reductions, with their neighbours fused.
COMPILE_OPTIONS = {"coordinate_descent_tuning": True, "combo_kernels": True}


def compile_units(units: dict[str, Callable]) -> dict[str, Callable]:
    """Each of a plan's step pieces compiled (fullgraph, static shapes but for marked dimensions)."""
    # Each (model shape, dtype, batch size, layer kind) adds an entry to the shared code's cache;
    # dynamo's default limit of 8 is soon reached by a process that runs a few models.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return {name: torch.compile(fn, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS) for name, fn in units.items()}


def argmax_in_pieces(logits: torch.Tensor, pieces: int = 256) -> torch.Tensor:
    """logits (batch, vocab) -> (batch,): argmax(dim=-1), the first index of the largest value,
    as the largest of each of `pieces` slices and then the largest of those. Compiled, a one-row
    argmax over a vocabulary is one program walking every value; the slices spread that over the
    GPU."""
    batch, vocab = logits.shape
    width = -(-vocab // pieces)
    padded = torch.nn.functional.pad(logits, (0, width * pieces - vocab), value=float("-inf"))
    largest, within = padded.view(batch, pieces, width).max(dim=-1)  # (batch, pieces) each
    piece = largest.argmax(dim=-1, keepdim=True)  # (batch, 1): the first slice holding the maximum
    return (piece * width + within.gather(1, piece)).squeeze(1)


def greedy_tail(logits: torch.Tensor, tokens: torch.Tensor, chosen: torch.Tensor, positions: torch.Tensor,
                cache_position: torch.Tensor) -> None:
    """After a step: its argmax becomes the next input and is kept at the step's slot of chosen
    (batch, cache length); positions and cache_position move on to the next token."""
    next_tokens = argmax_in_pieces(logits)  # (batch,)
    tokens.copy_(next_tokens)
    chosen.index_copy_(1, cache_position, next_tokens[:, None])
    positions.add_(1)
    cache_position.add_(1)


class CapturedStep:
    """A step function captured as one CUDA graph on fixed input buffers.

    `run()` must read and write only tensors that live as long as the graph. Warm-up runs (which
    compile on the first call) happen on a side stream; `rewind()` restores the inputs after each,
    so that the first replay is the real first step. Capture itself runs nothing.
    """

    def __init__(self, run: Callable[[], torch.Tensor | None], rewind: Callable[[], None], pool=None):
        self.released = False
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                rewind()
                run()
            rewind()
        torch.cuda.current_stream().wait_stream(side)
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.output = run()
        _captured.add(self)

    def replay(self) -> torch.Tensor | None:
        if self.released:
            raise RuntimeError("this decode step's CUDA graph was released (`release_captured`): capture it again")
        self.graph.replay()
        return self.output

    def release(self) -> None:
        """Free the graph now (what it captured, collectives included), not when it is collected."""
        if not self.released:
            self.released = True
            self.graph.reset()


# Every live captured step. A graph that captured NCCL collectives (tensor parallel's sums and
# gathers) makes torch.distributed.destroy_process_group() hang in ncclCommDestroy while it exists
# (pytorch/pytorch#115388, still open): parallel/tensor_parallel.py releases them all first. The
# decoders capture a released step again when it is next needed.
_captured: weakref.WeakSet = weakref.WeakSet()


def release_captured() -> int:
    """Release every live captured step (`CapturedStep.release`); how many there were."""
    steps = list(_captured)
    if steps and torch.cuda.is_available():
        torch.cuda.synchronize()  # none may be replaying
    for step in steps:
        step.release()
    _captured.clear()
    return len(steps)
