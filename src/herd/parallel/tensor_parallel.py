"""Tensor parallel: one model split across the ranks of a torch.distributed group, from outside.

`from_pretrained(..., tp_plan="auto")` under `torchrun --nproc-per-node N` (or `--nnodes`):

1. `setup()` joins (or starts) the process group: NCCL with one GPU per process (cuda:LOCAL_RANK),
   gloo on CPUs.
2. `TensorParallel.split_model()` runs on the meta-device model, before loading: each module the
   family's plan (plans.py) names gets its rank's shapes (attention head counts, linear features,
   the experts' intermediate size), collectives where partial sums meet (a forward hook that
   all-reduces the output of o_proj, down_proj or Llama 4's feed-forward block), and the
   embedding and lm_head become vocabulary-parallel modules. It returns the loader's `shard`
   hook: for each checkpoint tensor, the rank's part read straight from the safetensors file
   (`get_slice(key)[...]`), so no rank ever holds the whole model.
3. After loading, `finish()` keeps a split linear's bias on rank 0 only (the all-reduce adds it once)
   and sets up the all-reduce over symmetric memory where it applies (symmetric.py).

The model's forward is unchanged: its views use `-1` heads or the attention module's own counts,
and its caches take their sizes from the keys. The decode plans (decoding/plans/) read
`reduce_group()` and `gather_logits()` to put the same collectives into the compiled, captured
step. Collectives are torch.distributed's functional ones (traceable by torch.compile, capturable
in a CUDA graph), so multi-node runs need nothing more than torchrun's own rendezvous; on the GPUs
of one host, sums of up to 512 KB (a decode step's) go instead through a kernel over symmetric
memory (herd's own, the residual add fused in, or torch's one-shot), a custom op as traceable and
capturable (symmetric.py; HERD_TP_ALLREDUCE=nccl keeps every sum on NCCL).

Every rank computes the same logits (the lm_head's logits are gathered, then identical), so
greedy decoding agrees without communication; sampled tokens are broadcast from rank 0
(`same_tokens_on_every_rank`).

Quantized linears split with their scales: row splits ("colwise") carry their rows' scales;
column splits keep a per-row scale whole and split int4's per-group scales on group boundaries
(a split inside a group is refused). A float weight quantized while loading with one scale per
row (int8, FP8) is read whole before quantizing when split by columns, so its scale is the
one-process model's (the same weights, then, as on one GPU). FP8 activations scaled per token
(FbgemmFp8Config, compressed-tensors' dynamic token scales) meet a linear split by its input
features (o, down; Llama 4's experts' down) as slices of each token's row: the split module gets a
`reduce_activation_amax` (`reduce_down_activation_amax` on the experts) that takes the maximum of
the slices' amax across the ranks before the scale is computed, so each rank quantizes its slice
as the one-process model quantizes the whole row (the decode kernels' weights carry it too).
Per-group activation scales need nothing: a split keeps whole groups on each rank.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed import _functional_collectives as funcol
except ImportError:  # a torch built without torch.distributed: nothing here runs, herd still imports
    funcol = None

from . import plans, symmetric

STYLES = ("colwise", "rowwise", "partial", "experts", "reduce", "attention", "vocab", "vocab_gather")
_FLOAT_STORED = ("F64", "F32", "F16", "BF16")


# --- collectives (the same calls on the plain path and inside the compiled step) -------------------


def all_reduce(tensor: torch.Tensor, group_name: str, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The sum of `tensor` over the group's ranks (every rank gets it), plus `residual` when given
    (added once, after the sum): small CUDA messages through a kernel over symmetric memory where
    the group was prepared for it (symmetric.py; herd's own fuses the residual add), the rest
    through NCCL (or gloo)."""
    if symmetric.takes(tensor, group_name):
        fusable = residual is not None and residual.shape == tensor.shape and residual.dtype == tensor.dtype
        summed = torch.ops.herd.symmetric_all_reduce(tensor, residual if fusable else None, group_name)
        return summed if residual is None or fusable else residual + summed
    summed = funcol.all_reduce(tensor, "sum", group_name)
    return summed if residual is None else residual + summed


def settled(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor with its collective waited for: funcol's results are AsyncCollectiveTensors, which
    torch's ops wait for by themselves and a Triton kernel would read before the data arrives."""
    return funcol.wait_tensor(tensor) if isinstance(tensor, funcol.AsyncCollectiveTensor) else tensor


def all_reduce_norm(tensor: torch.Tensor, group_name: str, residual: torch.Tensor, norm_weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(residual + the sum of `tensor` (rows, width) over the group's ranks, that RMSNorm'd by
    `norm_weight`) from one kernel where herd's symmetric-memory kernel takes the sum; None
    elsewhere (the caller sums with `all_reduce` and normalises apart, which the compiled step
    fuses its own way)."""
    if (residual.shape != tensor.shape or residual.dtype != tensor.dtype or norm_weight.dtype != tensor.dtype
            or not symmetric.fuses_norm(tensor, group_name)):
        return None
    return torch.ops.herd.symmetric_all_reduce_norm(tensor, residual, norm_weight, eps, group_name)


def all_reduce_max(tensor: torch.Tensor, group_name: str) -> torch.Tensor:
    """The elementwise maximum of `tensor` over the group's ranks (every rank gets it); always
    through NCCL (the symmetric-memory kernels only sum)."""
    return funcol.all_reduce(tensor, "max", group_name)


def reduce_group(module: nn.Module) -> str | None:
    """The group over which `module`'s output is a partial sum to all-reduce, or None when it is
    whole (no tensor parallel, or a module the plan does not split that way)."""
    return getattr(module, "tp_reduce_group", None)


def gather_logits(lm_head: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Logits of a vocabulary-parallel head's rows (..., rows) -> the whole vocabulary (..., vocab),
    the same on every rank; other heads' logits as they are."""
    if not isinstance(lm_head, VocabParallelHead):
        return logits
    local = logits.contiguous()
    # gathered along the first dimension (along the last, torch calls a helper dynamo refuses to
    # trace), then each rank's vocabulary slice put side by side: (size * rows, ..., local vocab)
    stacked = funcol.all_gather_tensor(local, 0, lm_head.group_name)
    size = stacked.shape[0] // local.shape[0]
    gathered = stacked.view(size, *local.shape).movedim(0, -2).reshape(*local.shape[:-1], size * local.shape[-1])
    return gathered[..., : lm_head.out_features]


def _reduce_output(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a module whose output is a partial sum (split by its input features)."""
    return all_reduce(output, module.tp_reduce_group)


# --- vocabulary-parallel embedding and head ----------------------------------------------------------


def _rows_per_rank(vocab: int, size: int) -> int:
    return -(-vocab // size)


class VocabParallelEmbedding(nn.Embedding):
    """An embedding holding rows [first_row, first_row + rows) of the vocabulary (the last rank's
    block padded with zero rows): each rank looks up the ids it holds, zeros elsewhere, and the
    all-reduce gives every rank every token's row (exactly: one term is non-zero)."""

    def __init__(self, embedding: nn.Embedding, rank: int, size: int, group_name: str):
        nn.Module.__init__(self)
        # The whole vocabulary: what input ids are checked against.
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = embedding.padding_idx, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.rows = _rows_per_rank(self.num_embeddings, size)
        self.first_row = rank * self.rows
        self.group_name = group_name
        weight = embedding.weight
        self.weight = nn.Parameter(torch.empty(self.rows, self.embedding_dim, dtype=weight.dtype, device=weight.device),
                                   requires_grad=weight.requires_grad)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local_ids = input_ids - self.first_row
        held = (local_ids >= 0) & (local_ids < self.rows)
        found = nn.functional.embedding(local_ids.masked_fill(~held, 0), self.weight)  # (..., hidden)
        return all_reduce(found.masked_fill(~held[..., None], 0), self.group_name)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows {self.first_row}..{self.first_row + self.rows - 1}"


class VocabParallelHead(nn.Linear):
    """The lm_head holding rows [first_row, first_row + rows) of the vocabulary (zero rows pad the
    last block); its logits are gathered, so every rank returns the whole (..., vocab) logits."""

    def __init__(self, head: nn.Linear, rank: int, size: int, group_name: str):
        nn.Module.__init__(self)
        self.in_features, self.out_features = head.in_features, head.out_features  # the whole vocabulary
        self.rows = _rows_per_rank(self.out_features, size)
        self.first_row = rank * self.rows
        self.group_name = group_name
        weight = head.weight
        self.weight = nn.Parameter(torch.empty(self.rows, self.in_features, dtype=weight.dtype, device=weight.device),
                                   requires_grad=weight.requires_grad)
        self.bias = None
        if head.bias is not None:
            self.bias = nn.Parameter(torch.empty(self.rows, dtype=head.bias.dtype, device=head.bias.device))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gather_logits(self, nn.functional.linear(hidden_states, self.weight, self.bias))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rows {self.first_row}..{self.first_row + self.rows - 1}")


# --- how one tensor splits -------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """A tensor split along `dim` (of `full` entries in the checkpoint): `blocks` equal blocks
    side by side (Llama 4's gate and up columns) each split evenly, the rank taking its part of
    each; `padded` (vocabularies): ceil(full / size) entries per rank, the last block padded with
    zeros. `after_quantizing`: read whole and split once quantized (a per-row scale must see the
    whole row)."""

    dim: int
    full: int
    blocks: int = 1
    padded: bool = False
    after_quantizing: bool = False

    def local(self, size: int) -> int:
        return _rows_per_rank(self.full, size) if self.padded else self.full // size

    def ranges(self, rank: int, size: int) -> list[tuple[int, int]]:
        if self.padded:
            local = self.local(size)
            return [(min(rank * local, self.full), min((rank + 1) * local, self.full))]
        block = self.full // self.blocks
        local = block // size
        return [(b * block + rank * local, b * block + (rank + 1) * local) for b in range(self.blocks)]

    def take(self, source, rank: int, size: int) -> torch.Tensor:
        """The rank's part of `source`: a tensor, or a safetensors slice (only that part is read)."""
        lead = (slice(None),) * self.dim
        parts = [source[lead + (slice(start, stop),)] for start, stop in self.ranges(rank, size)]
        part = parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)
        missing = self.local(size) - part.shape[self.dim]
        if missing:
            padding = [0, 0] * (part.dim() - 1 - self.dim) + [0, missing]
            part = nn.functional.pad(part, padding)
        return part


# --- the process group --------------------------------------------------------------------------------


@dataclass
class TensorParallel:
    """A process group that one model is split across, and what the split needs at load time."""

    group: Any  # torch.distributed.ProcessGroup
    rank: int  # within the group
    size: int
    device: torch.device
    plan: dict[str, str] = field(default_factory=dict)
    splits: dict[str, Split] = field(default_factory=dict)  # module key (param or buffer) -> how it splits
    rank0_biases: list[str] = field(default_factory=list)  # biases of split-by-input linears

    @property
    def group_name(self) -> str:
        return self.group.group_name

    # --- before loading: the meta model gets its rank's shapes ------------------------------------
    def split_model(self, model: nn.Module, tp_plan: str | dict[str, str], convert: Callable | None):
        """Apply the plan to `model` (on the meta device). Returns the loader's `shard` hook and the
        quantization converter, wrapped to split what is quantized whole."""
        plan = _resolve_plan(model, tp_plan)
        check_sizes(model.config.get_text_config(), self.size)
        self.plan = plan
        patterns = [(re.compile(re.escape(path).replace(r"\*", r"[^.]+")), style) for path, style in plan.items()]
        targets = [(path, module, style) for path, module in model.named_modules()
                   for pattern, style in patterns if pattern.fullmatch(path)]
        if not targets:
            raise ValueError(f"the tensor-parallel plan names no module of {type(model).__name__}; its paths "
                             f"look like {next(iter(dict(model.named_modules())), '')!r}")
        for path, module, style in targets:
            self._apply(model, path, module, style)
        model.tp_size, model.tp_plan = self.size, plan
        model.__dict__["_tensor_parallel"] = self  # not a module: kept out of the module tree
        return self._shard, self._wrap_converter(convert)

    def _apply(self, model: nn.Module, path: str, module: nn.Module, style: str) -> None:
        from ..quantization import QuantizedExperts, QuantizedLinear

        if style == "attention":
            for name in ("num_heads", "num_key_value_heads"):
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, getattr(module, name) // self.size)
            return
        if style == "reduce":
            self._reduces(module)
            return
        if style in ("vocab", "vocab_gather"):
            kinds = {"vocab": (nn.Embedding, VocabParallelEmbedding), "vocab_gather": (nn.Linear, VocabParallelHead)}
            expected, parallel = kinds[style]
            if type(module) is not expected:
                raise ValueError(f"{path} is a {type(module).__name__}; tensor parallel splits a plain "
                                 f"{expected.__name__} by vocabulary (keep it unquantized)")
            replacement = parallel(module, self.rank, self.size, self.group_name)
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, replacement)
            full = module.weight.shape[0]
            for leaf in ("weight", "bias"):
                if getattr(module, leaf, None) is not None:
                    self.splits[f"{path}.{leaf}"] = Split(0, full, padded=True)
            return
        if style == "experts":
            self._split_experts(path, module, isinstance(module, QuantizedExperts))
            return
        if not isinstance(module, (nn.Linear, QuantizedLinear)):
            raise ValueError(f"tensor-parallel style {style!r} splits linears; {path} is a {type(module).__name__}")
        if style == "colwise":
            self._split_linear(path, module, by_input=False)
        elif style in ("rowwise", "partial"):
            self._split_linear(path, module, by_input=True)
            if module.bias is not None:
                self.rank0_biases.append(f"{path}.bias")
            if style == "rowwise":
                self._reduces(module)
        else:
            raise ValueError(f"unknown tensor-parallel style {style!r} for {path}; herd has {', '.join(STYLES)}")

    @functools.cached_property
    def amax_over_ranks(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A split activation row's amax (rows, 1) -> the whole row's: one object for every module,
        so a compiled step sees the same callable in every layer."""
        return functools.partial(all_reduce_max, group_name=self.group_name)

    def _reduces(self, module: nn.Module) -> None:
        module.tp_reduce_group = self.group_name
        module.register_forward_hook(_reduce_output)

    def _split_linear(self, path: str, module: nn.Module, by_input: bool) -> None:
        from ..quantization import QuantizedLinear

        quantized = isinstance(module, QuantizedLinear)
        scheme = module.scheme if quantized else None
        if scheme is not None and scheme.block is not None:
            raise ValueError(f"{path} holds block-scaled FP8 weights, which herd does not split for tensor "
                             "parallel yet; load the checkpoint on one GPU (or with device_map)")
        if not by_input:  # every per-row tensor splits by rows
            names = [name for name in ("weight", "weight_scale", "weight_offset", "bias")
                     if getattr(module, name, None) is not None]
            splits = {name: Split(0, module.out_features) for name in names}
            module.out_features //= self.size
        else:
            features = module.in_features
            local = features // self.size
            if scheme is not None and scheme.format == "int4":
                if local % scheme.group_size:
                    raise ValueError(
                        f"tp_size={self.size} splits the {features} input features of {path} into {local} per rank, "
                        f"not a multiple of its int4 group_size {scheme.group_size}: choose a tp_size or group size "
                        "that keeps whole groups on each rank")
                groups = features // scheme.group_size
                splits = {"weight": Split(1, features // 2), "weight_scale": Split(1, groups),
                          "weight_offset": Split(1, groups)}
            else:
                if scheme is not None and scheme.activation_group_size and local % scheme.activation_group_size:
                    raise ValueError(f"tp_size={self.size} splits the activation groups of {path}; choose a tp_size "
                                     f"that keeps whole groups of {scheme.activation_group_size} columns on each rank")
                # one scale per row (int8, FP8) is computed over the whole row when quantizing here
                splits = {"weight": Split(1, features, after_quantizing=quantized)}
                if scheme is not None and scheme.scales_activation_rows:  # each token's scale over all ranks
                    module.reduce_activation_amax = self.amax_over_ranks
            module.in_features = local
        self._resize(path, module, splits)

    def _split_experts(self, path: str, module: nn.Module, quantized: bool) -> None:
        inter = module.intermediate_size
        int4 = quantized and module.scheme.format == "int4"
        # gate_up (experts, hidden, gate | up) by columns, with each column's scale (and int4 offset)
        splits = {"gate_up_proj" + suffix: Split(2, 2 * inter, blocks=2)
                  for suffix in ("", *(("_scale", "_offset") if int4 else ("_scale",) if quantized else ()))}
        if int4:  # down (experts, inter / 2, hidden) packed by rows, scales and offsets by groups of rows
            group = module.scheme.group_size
            if (inter // self.size) % group:
                raise ValueError(f"tp_size={self.size} splits the {inter} rows of {path}.down_proj into "
                                 f"{inter // self.size} per rank, not a multiple of its int4 group_size {group}: "
                                 "choose a tp_size or group size that keeps whole groups on each rank")
            splits.update({"down_proj": Split(1, inter // 2), "down_proj_scale": Split(1, inter // group),
                           "down_proj_offset": Split(1, inter // group)})
        else:  # int8 / FP8: one scale per column over the whole column, so quantized whole, then split
            splits["down_proj"] = Split(1, inter, after_quantizing=quantized)
            if quantized and module.scheme.scales_activation_rows:  # down's input rows split: scale over all ranks
                module.reduce_down_activation_amax = self.amax_over_ranks
        module.intermediate_size = inter // self.size
        self._resize(path, module, splits)

    def _resize(self, path: str, module: nn.Module, splits: dict[str, Split]) -> None:
        """The module's tensors (still on the meta device) at their rank's shapes; `splits` recorded
        under their module keys for the loader."""
        for name, split in splits.items():
            if split.full % (split.blocks * self.size):
                raise ValueError(f"tp_size={self.size} does not divide the {split.full} entries of {path}.{name} "
                                 f"along dimension {split.dim}; choose a tp_size that does")
            old = getattr(module, name)
            shape = list(old.shape)
            shape[split.dim] = split.local(self.size)
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                module._buffers[name] = new
            self.splits[f"{path}.{name}"] = split

    # --- while loading ------------------------------------------------------------------------------
    def _shard(self, name: str, stored) -> torch.Tensor | None:
        """The loader's hook: this rank's part of the checkpoint tensor `name` (a module key), read
        from its safetensors slice; None for a tensor read whole (replicated, or split once quantized)."""
        split = self.splits.get(name)
        if split is None:
            return None
        if not hasattr(stored, "__getitem__"):
            raise ValueError("tensor parallel reads safetensors checkpoints; convert this file to safetensors "
                             "(GGUF files are read whole)")
        shape = stored.get_shape()
        if len(shape) <= split.dim or shape[split.dim] != split.full:
            return None  # not the layout split (a per-tensor scale): the loader reports or converts it whole
        if split.after_quantizing and stored.get_dtype() in _FLOAT_STORED:
            return None  # quantized here from the whole row, then split (_wrap_converter)
        return split.take(stored, self.rank, self.size)

    def _wrap_converter(self, convert: Callable | None) -> Callable | None:
        if convert is None:
            return None

        def split_converted(name: str, tensor: torch.Tensor):
            pieces = convert(name, tensor)
            if pieces is None:
                return None
            for piece_name, piece in pieces.items():
                split = self.splits.get(piece_name)
                if split is not None and piece.shape[split.dim] == split.full != split.local(self.size):
                    pieces[piece_name] = split.take(piece, self.rank, self.size).contiguous()
            return pieces

        split_converted.owns = convert.owns
        return split_converted

    # --- after loading ------------------------------------------------------------------------------
    def finish(self, model: nn.Module) -> None:
        """A linear split by its input features adds its bias on rank 0 only: the all-reduce of the
        partial products then adds it once. Then the all-reduce over symmetric memory is set up for the model's
        dtype where it applies (symmetric.py: a collective, so here, eagerly, on every rank, never
        inside a traced or captured step)."""
        if self.rank != 0:
            with torch.no_grad():
                for name in self.rank0_biases:
                    model.get_parameter(name).zero_()
        symmetric.prepare(self.group, self.device, [model.dtype])
        release_graphs_on_destroy()

    def same_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        dist.broadcast(tokens, src=dist.get_global_rank(self.group, 0), group=self.group)
        return tokens


def release_graphs_on_destroy() -> None:
    """Make torch.distributed.destroy_process_group() release herd's captured decode steps first.

    A CUDA graph that captured NCCL collectives (the fast path's gathers, and its sums where they
    take NCCL) makes destroy_process_group() hang in ncclCommDestroy for as long as the graph lives
    (pytorch/pytorch#115388); a user's script that ends the way torchrun's examples do would
    never exit. Installed once, on the names scripts call (`dist.destroy_process_group` and
    distributed_c10d's); the model cannot decode under tensor parallel after it anyway."""
    from torch.distributed import distributed_c10d

    original = distributed_c10d.destroy_process_group
    if getattr(original, "releases_herd_graphs", False):
        return

    @functools.wraps(original)
    def destroy_process_group(*args, **kwargs):
        from ..decoding.graphs import release_captured

        release_captured()
        return original(*args, **kwargs)

    destroy_process_group.releases_herd_graphs = True
    distributed_c10d.destroy_process_group = destroy_process_group
    dist.destroy_process_group = destroy_process_group


def tensor_parallel_of(model: nn.Module) -> TensorParallel | None:
    return model.__dict__.get("_tensor_parallel")


def same_tokens_on_every_rank(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Sampled tokens (any shape) as rank 0 drew them, on every rank of a tensor-parallel model
    (ranks may hold different random generators); the tokens as they are otherwise."""
    parallel = tensor_parallel_of(model)
    return parallel.same_tokens(tokens) if parallel is not None else tokens


# --- checks ---------------------------------------------------------------------------------------------


def check_sizes(config, size: int) -> None:
    """Refuse a tp_size that does not divide the heads, key/value heads or intermediate sizes, with
    the sizes that would."""
    fields = ["num_attention_heads", "num_key_value_heads", "intermediate_size", "intermediate_size_mlp"]
    values = {name: getattr(config, name) for name in fields if isinstance(getattr(config, name, None), int)}
    common = math.gcd(*values.values()) if values else 1
    for name, value in values.items():
        if value % size:
            fits = [n for n in range(1, common + 1) if common % n == 0]
            raise ValueError(f"tp_size={size} does not divide {name}={value} of this model: each rank must hold "
                             f"whole heads and equal slices; use a tp_size in {fits}")


def _resolve_plan(model: nn.Module, tp_plan: str | dict[str, str]) -> dict[str, str]:
    if isinstance(tp_plan, dict):
        unknown = sorted({style for style in tp_plan.values() if style not in STYLES})
        if unknown:
            raise ValueError(f"unknown tensor-parallel style(s) {', '.join(unknown)}; herd has {', '.join(STYLES)}")
        return dict(tp_plan)
    if tp_plan != "auto":
        raise ValueError(f"tp_plan={tp_plan!r}: pass 'auto' (the family's plan) or a dict of module path -> style")
    plan = plans.plan_for(model)
    if plan is None:
        raise ValueError(f"{type(model).__name__} has no tensor-parallel plan; herd has them for the causal LMs "
                         "and text models of Llama, Llama 4 and Mllama (e.g. MllamaForCausalLM)")
    return plan


# --- joining the process group ------------------------------------------------------------------------


def setup(tp_plan: Any, tp_size: int | None, device_mesh: Any, device_map: Any) -> TensorParallel:
    """The group a from_pretrained(tp_plan=..., tp_size=..., device_mesh=...) call splits over;
    torch.distributed is initialised from torchrun's environment when nobody did it yet."""
    if device_map is not None:
        raise ValueError("from_pretrained got both device_map and tp_plan: tensor parallel puts each rank's part "
                         "on its own device (cuda:LOCAL_RANK); pass one or the other")
    if tp_plan is None:
        tp_plan = "auto"
    if device_mesh is not None:
        mesh = device_mesh["tp"] if device_mesh.ndim > 1 else device_mesh
        group = mesh.get_group()
        device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" \
            else torch.device(mesh.device_type)
    else:
        if not dist.is_initialized():
            _init_from_environment()
        group = dist.group.WORLD
        device = _device_for(dist.get_backend(group))
    size = dist.get_world_size(group)
    if tp_size is not None and tp_size != size:
        raise ValueError(f"tp_size={tp_size} but {size} processes take part; start as many processes as tp_size "
                         f"(torchrun --nproc-per-node {tp_size}), or pass a device_mesh")
    return TensorParallel(group=group, rank=dist.get_rank(group), size=size, device=device)


def _init_from_environment() -> None:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("tp_plan needs one process per rank: run the script under torchrun, e.g. "
                           "`torchrun --nproc-per-node 2 script.py` (or initialise torch.distributed yourself)")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo")
    # Every rank past its connections before any goes on: a rank that then refuses the model (a size
    # that does not divide the heads) and exits must not close a connection another is still making
    # (seen under load at 3 gloo ranks: the slow rank got "Connection closed by peer", not the refusal).
    dist.barrier()


def _device_for(backend: str) -> torch.device:
    if "nccl" in backend and torch.cuda.is_available():  # "nccl", or "cpu:gloo,cuda:nccl" (no backend named)
        local_rank = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
