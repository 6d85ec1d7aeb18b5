"""Llama 4's routed experts in a decode step: each row through its own expert, with no host sync.

The reference forward groups tokens by expert and loops over the experts that have tokens,
which needs the group sizes on the host. A decode step must not wait for the host, so:

- up to `GATHERED_ROWS` rows (batch 1 to 4 of a top-1 model), and wherever grouped matmuls are
  missing: each row through its own expert, read in place: on CUDA by `expert_gemv` (one kernel
  per projection on the tensor cores), elsewhere the expert picked by index and multiplied as a
  batched matrix-vector product;
- more rows on a GPU: rows sorted by expert, one grouped matmul per projection, each expert's
  weights read once.

Quantized experts (int8 or FP8 with a float32 scale per expert and output column, int4 in groups
of input rows with a scale and an offset) are read as stored by `expert_gemv` on the first path
(dequantized by index where its kernel does not apply: on a CPU), every expert dequantized once
on the second.
"""

from __future__ import annotations

import torch

from .expert_gemv import expert_gemv, kernel_applies


# Above this many (token, expert) rows, grouped matmuls (each expert read once) beat reading each
# row's expert by index (an expert read once per row that picked it).
GATHERED_ROWS = 4


def uses_grouped_mm(x: torch.Tensor) -> bool:
    """torch's grouped matmul (CUTLASS on Hopper) takes bf16 rows on CUDA."""
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def routed_experts(routed_in: torch.Tensor, expert_ids: torch.Tensor, gate_up_proj: torch.Tensor | tuple,
                   down_proj: torch.Tensor | tuple, activation) -> torch.Tensor:
    """routed_in (pairs, hidden), each row already scaled by its router score; expert_ids (pairs,);
    gate_up_proj (experts, hidden, 2 * intermediate) and down_proj (experts, intermediate, hidden)
    as checkpoints store them -> (pairs, hidden). Quantized experts come as tuples of their stored
    tensors (quantization/experts.py: FP8 / int8 (data, scale), int4 (data, scale, offset)) and are
    dequantized by index (`_quantized_routed_experts`)."""
    if isinstance(gate_up_proj, tuple):
        return _quantized_routed_experts(routed_in, expert_ids, gate_up_proj, down_proj, activation)
    grouped = uses_grouped_mm(routed_in) and routed_in.shape[0] > GATHERED_ROWS
    if not grouped and kernel_applies(routed_in, expert_ids, gate_up_proj):  # expert_gemv checks down's inputs itself
        gate, up = expert_gemv(routed_in, expert_ids, gate_up_proj).chunk(2, dim=-1)  # (pairs, inter) each
        return expert_gemv(up * activation(gate), expert_ids, down_proj)
    if grouped:
        experts = gate_up_proj.shape[0]
        order = torch.argsort(expert_ids, stable=True)
        # (experts,): where each expert's rows end in the sorted order
        rows_per_expert = (expert_ids[:, None] == torch.arange(experts, device=expert_ids.device)).sum(0)
        ends = rows_per_expert.cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(routed_in[order], gate_up_proj, offs=ends).chunk(2, dim=-1)
        sorted_out = torch._grouped_mm(up * activation(gate), down_proj, offs=ends)  # (pairs, hidden)
        return torch.empty_like(sorted_out).index_copy_(0, order, sorted_out)
    gate, up = torch.bmm(routed_in[:, None, :], gate_up_proj[expert_ids]).chunk(2, dim=-1)  # (pairs, 1, inter)
    return torch.bmm(up * activation(gate), down_proj[expert_ids]).squeeze(1)  # (pairs, hidden)


def dequantized_experts(data: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None, *,
                        dtype: torch.dtype) -> torch.Tensor:
    """Stored experts (..., in, out) (FP8 / int8 data, scale (..., 1, out)) or, with an offset, int4
    (data (..., in / 2, out) packed along in, scale and offset (..., in / group, out)) -> float
    (..., in, out) in dtype, computed in float32 and rounded once."""
    if offset is None:
        return (data.float() * scale).to(dtype)
    *lead, half, columns = data.shape
    nibbles = torch.stack((data & 0xF, data >> 4), dim=-2).reshape(*lead, 2 * half, columns)  # low nibble: even row
    group = 2 * half // scale.shape[-2]
    return (nibbles.float() * scale.float().repeat_interleave(group, dim=-2)
            + offset.float().repeat_interleave(group, dim=-2)).to(dtype)


def _quantized_routed_experts(routed_in, expert_ids, gate_up_proj: tuple, down_proj: tuple, activation):
    """A few rows: each through its expert read as stored (`expert_gemv`, a byte or half a byte a
    weight), or where that kernel does not apply, the expert dequantized by index to the rows'
    dtype. More rows than experts: every expert dequantized once for one grouped matmul."""
    dtype = routed_in.dtype
    if uses_grouped_mm(routed_in) and routed_in.shape[0] > max(GATHERED_ROWS, gate_up_proj[0].shape[0]):
        return routed_experts(routed_in, expert_ids, dequantized_experts(*gate_up_proj, dtype=dtype),
                              dequantized_experts(*down_proj, dtype=dtype), activation)
    if kernel_applies(routed_in, expert_ids, *gate_up_proj):
        gate, up = expert_gemv(routed_in, expert_ids, *gate_up_proj).chunk(2, dim=-1)  # (pairs, inter) each
        return expert_gemv(up * activation(gate), expert_ids, *down_proj)
    gate_up = dequantized_experts(*(t[expert_ids] for t in gate_up_proj), dtype=dtype)  # (pairs, hidden, 2 * inter)
    gate, up = torch.bmm(routed_in[:, None, :], gate_up).chunk(2, dim=-1)
    down = dequantized_experts(*(t[expert_ids] for t in down_proj), dtype=dtype)
    return torch.bmm(up * activation(gate), down).squeeze(1)  # (pairs, hidden)
