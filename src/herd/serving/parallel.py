"""Serving a tensor-parallel model: rank 0 leads, the other ranks follow.

Under `torchrun --nproc-per-node N -m herd serve MODEL --tp N` every rank holds its slice of the
model (from_pretrained(tp_plan="auto")) and every forward has collectives inside it, so all ranks
must run the same prefill or decode call at the same time. Rank 0 runs everything else: the HTTP
server, the scheduler and sampling. Its engine's runner is a `Leader`, which, before each call of
the PagedRunner, tells the other ranks what to run; each other rank runs `Follower.run()`, which
makes the same call on its own PagedRunner (same pools, same slots) and discards the logits, until
the leader's shutdown message.

A message is a fixed-size header (int64: what to run and its sizes) broadcast first, then the
call's inputs packed into one int64 tensor whose length the header gives. Nothing is pickled.
Image inputs never reach it: the multimodal classes have no tensor-parallel plan, so a model with
an image tower does not load under --tp (MllamaForCausalLM, the text model, serves text only).

Every rank builds its Engine with the same arguments; `agreed_block_count` makes the KV pools the
same size on every rank (the fewest blocks any rank can hold), so a slot means the same place
everywhere.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy
import torch
import torch.distributed as dist

from ..parallel.tensor_parallel import tensor_parallel_of
from .paged import PrefillWork

HEADER_SIZE = 8
SHUTDOWN, PREFILL, DECODE = 0, 1, 2
# header fields: [kind, then per kind:
#   PREFILL: rows, start, image slot (-1: none), kept_from per paged kind (2 at most), every
#            position's logits kept (1) or the last one's (0)
#   DECODE:  rows, has images, table width per paged kind (2 at most)
# ..., payload length (the last field)]


def agreed_block_count(model, num_blocks: int) -> int:
    """The fewest KV blocks any rank of a tensor-parallel model can hold (each rank sized its pools
    from its own free memory; the scheduler on rank 0 hands out slots that must exist on every
    rank); `num_blocks` as it is without tensor parallel."""
    parallel = tensor_parallel_of(model)
    if parallel is None or parallel.size == 1:
        return num_blocks
    count = torch.tensor([num_blocks], dtype=torch.long, device=parallel.device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN, group=parallel.group)
    return int(count.item())


def pack(header: list[int], payload: list[numpy.ndarray | list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A message as two int64 tensors: the header (HEADER_SIZE,), its last field the payload's
    length, and the payload's parts flattened one after the other (length,)."""
    flat = numpy.concatenate([numpy.asarray(part, dtype=numpy.int64).reshape(-1) for part in payload]) \
        if payload else numpy.zeros(0, dtype=numpy.int64)
    if len(header) >= HEADER_SIZE:
        raise ValueError(f"a header holds {HEADER_SIZE - 1} fields, got {len(header)}")
    header = header + [0] * (HEADER_SIZE - 1 - len(header)) + [flat.size]
    return torch.tensor(header, dtype=torch.long), torch.from_numpy(flat)


class _Channel:
    """Broadcasts from the group's rank 0 on the device its backend takes (cuda under NCCL)."""

    def __init__(self, model):
        parallel = tensor_parallel_of(model)
        if parallel is None:
            raise ValueError(f"{type(model).__name__} is not split across ranks: a Leader/Follower pair serves a "
                             "model loaded with from_pretrained(..., tp_plan='auto') under torchrun")
        self.group, self.device, self.rank = parallel.group, parallel.device, parallel.rank
        self.source = dist.get_global_rank(parallel.group, 0)

    def send(self, header: list[int], payload: list[numpy.ndarray | list[int]]) -> None:
        header, flat = pack(header, payload)
        dist.broadcast(header.to(self.device), self.source, group=self.group)
        if flat.numel():
            dist.broadcast(flat.to(self.device), self.source, group=self.group)

    def receive(self) -> tuple[list[int], numpy.ndarray]:
        header = torch.empty(HEADER_SIZE, dtype=torch.long, device=self.device)
        dist.broadcast(header, self.source, group=self.group)
        header = header.tolist()
        payload = torch.empty(header[-1], dtype=torch.long, device=self.device)
        if header[-1]:
            dist.broadcast(payload, self.source, group=self.group)
        return header, payload.cpu().numpy()


class Leader:
    """Rank 0's runner: the PagedRunner's prefill/decode, each first announced to the followers.
    Anything else is the runner's."""

    def __init__(self, runner, channel=None):
        self.runner = runner
        self.kinds = list(runner.layers_by_kind)  # the same order on every rank
        self.channel = channel or _Channel(runner.model)
        self.stopped = False
        self.steps = 0  # prefill and decode calls announced

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def prefill(self, works: list[PrefillWork]):
        self._check_running()
        if any(work.model_inputs for work in works):
            raise ValueError("image inputs under tensor parallel: herd splits the text models only; serve an "
                             "image model on one GPU (without --tp)")
        first = works[0]
        header = [PREFILL, len(works), first.start, -1 if first.image_slot is None else first.image_slot]
        header += [first.kept_from[kind] for kind in self.kinds]
        # the logits kept decide the vocabulary-parallel head's gather: the same on every rank
        header.append(int(any(work.every_logits for work in works)))
        payload = [[len(work.tokens) for work in works], *(work.tokens for work in works)]
        payload += [work.slots[kind] for kind in self.kinds for work in works]
        self.channel.send(header, payload)
        self.steps += 1
        return self.runner.prefill(works)

    def decode(self, tokens: list[int], positions: list[int], slots: dict[str, list[int]],
               tables: dict[str, list[list[int]]], first: dict[str, list[int]],
               images: list[tuple[int, int] | None] | None = None, carried=None) -> torch.Tensor:
        if carried is not None:  # the followers would need the tokens on their own GPUs
            raise ValueError("tensor parallel serving runs without async scheduling: its tokens go to every rank")
        self._check_running()
        rows = len(tokens)
        has_images = images is not None and any(images)
        widths = [max(len(blocks) for blocks in tables[kind]) for kind in self.kinds]
        payload = [tokens, positions]
        for kind, width in zip(self.kinds, widths):
            table = numpy.zeros((rows, width), dtype=numpy.int64)  # zeros past a row's blocks, as the runner pads
            for row, blocks in enumerate(tables[kind]):
                table[row, : len(blocks)] = blocks
            payload += [slots[kind], first[kind], table]
        if has_images:  # (rows, 3): [has one, slot, tokens]
            payload.append([[1, *image] if image else [0, 0, 0] for image in images])
        self.channel.send([DECODE, rows, int(has_images), *widths], payload)
        self.steps += 1
        return self.runner.decode(tokens, positions, slots, tables, first, images=images if has_images else None)

    def shutdown(self) -> None:
        """Tell the followers to return (once; later calls do nothing)."""
        if not self.stopped:
            self.stopped = True
            self.channel.send([SHUTDOWN], [])

    def _check_running(self) -> None:
        if self.stopped:
            raise RuntimeError("the followers were shut down: this tensor-parallel engine cannot run another step")


class Follower:
    """A rank other than 0: the leader's calls on this rank's PagedRunner, until shutdown."""

    def __init__(self, runner, channel=None):
        self.runner = runner
        self.kinds = list(runner.layers_by_kind)
        self.channel = channel or _Channel(runner.model)
        self.steps = 0  # prefill and decode calls run

    def run(self) -> int:
        """Follow until the leader's shutdown message; returns the number of calls run. A call
        that fails here failed on the leader too (the same inputs): it is reported and the
        loop goes on, as the leader's engine does."""
        while True:
            header, payload = self.channel.receive()
            kind = header[0]
            if kind == SHUTDOWN:
                return self.steps
            try:
                if kind == PREFILL:
                    self._prefill(header, payload)
                elif kind == DECODE:
                    self._decode(header, payload)
                else:
                    raise RuntimeError(f"unknown message kind {kind} from the leader (herd versions differ?)")
            except Exception as error:  # noqa: BLE001 - the leader's engine fails the step's requests and goes on
                print(f"herd: rank {self.channel.rank}: a step failed: {error}", file=sys.stderr, flush=True)
            self.steps += 1

    def _prefill(self, header: list[int], payload: numpy.ndarray) -> None:
        rows, start, image_slot = header[1:4]
        kept_from = dict(zip(self.kinds, header[4 : 4 + len(self.kinds)]))
        every = bool(header[4 + len(self.kinds)])
        ends = payload[:rows].tolist()
        at, tokens, slots = rows, [], {kind: [] for kind in self.kinds}
        for end in ends:
            tokens.append(payload[at : at + end].tolist())
            at += end
        for kind in self.kinds:  # each kind's slots, row after row
            for end in ends:
                slots[kind].append(payload[at : at + end].tolist())
                at += end
        self.runner.prefill([PrefillWork(tokens[row], start, {kind: slots[kind][row] for kind in self.kinds}, kept_from,
                                         image_slot=None if image_slot < 0 else image_slot, every_logits=every)
                             for row in range(rows)])

    def _decode(self, header: list[int], payload: numpy.ndarray) -> None:
        rows, has_images = header[1:3]
        widths = header[3 : 3 + len(self.kinds)]
        tokens, positions = payload[:rows].tolist(), payload[rows : 2 * rows].tolist()
        at = 2 * rows
        slots, first, tables = {}, {}, {}
        for kind, width in zip(self.kinds, widths):
            slots[kind], first[kind] = payload[at : at + rows].tolist(), payload[at + rows : at + 2 * rows].tolist()
            at += 2 * rows
            tables[kind] = payload[at : at + rows * width].reshape(rows, width)  # rows of equal width, as sent
            at += rows * width
        images = None
        if has_images:
            images = [(slot, image_tokens) if present else None
                      for present, slot, image_tokens in payload[at : at + 3 * rows].reshape(rows, 3).tolist()]
        self.runner.decode(tokens, positions, slots, tables, first, images=images)


__all__ = ["Follower", "Leader", "agreed_block_count", "pack"]
