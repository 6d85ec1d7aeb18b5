"""Reading checkpoints into a model built on the meta device, and writing them back.

For each safetensors shard, for each tensor: rename (checkpoint key -> module key), check the
shape, cast the dtype, place it on its device, assign it. Tensors stream from the file to their
device one at a time, so peak memory stays near the model's own size. Whatever does not fit
(missing, unexpected or mismatched weights) is reported together as one `CheckpointError`.

Llama 4's routed experts written one nn.Linear per expert and projection (LLM-Compressor's
checkpoints, transformers' SequentialLlama4TextExperts) are read as the stacked tensors the model
holds (`StackedExperts`).

Only safetensors (and Llama GGUF files, through `quantization/gguf.py`) are read. Pickle-based files (`pytorch_model.bin`, `.pt`, `.pth`) can run code
when loaded, so they are refused with a message on how to convert them; they are never opened.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import hub

_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or cannot be read."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint stored only as pickle files, which herd never loads."""


def find_checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files holding a model's weights, in shard order."""
    index_path = folder / hub.SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_path} is not a valid safetensors index ({error!r})") from None
        shard_names = sorted(set(weight_map.values()))
        missing = [name for name in shard_names if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{index_path.name} in {folder} names shards that are not there: {', '.join(missing)}"
            )
        return [folder / name for name in shard_names]
    single = folder / hub.SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted({p.name for pattern in _PICKLE_PATTERNS for p in folder.glob(pattern)})
    if pickles:
        raise UnsafeCheckpointError(
            f"{folder} holds only pickle weight files ({', '.join(pickles)}). herd never unpickles "
            "files, because loading a pickle can run arbitrary code. Convert the checkpoint to "
            "safetensors once, in an environment you trust, e.g.:\n"
            "    from transformers import AutoModelForCausalLM\n"
            f"    AutoModelForCausalLM.from_pretrained({str(folder)!r}).save_pretrained(OUT_FOLDER)\n"
            "or use the Hugging Face 'convert to safetensors' space, then load OUT_FOLDER."
        )
    raise CheckpointError(f"no model weights in {folder}: expected model.safetensors or model.safetensors.index.json")


def _open(path, device: str = "cpu"):
    from .quantization.gguf import GGUFFile, open_gguf

    if isinstance(path, GGUFFile):  # already open, in the form the load asked for (Q4 linears packed)
        return path
    if path.suffix.lower() == ".gguf":  # read like a safetensors file, dequantized on read
        return open_gguf(path)
    try:
        return safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read {path}: it is truncated or not a safetensors file ({error}). "
            "Download or write it again."
        ) from None


def checkpoint_dtype(files: Iterable[Path]) -> torch.dtype | None:
    """The dtype of the first floating-point tensor: what dtype='auto' means without a config entry."""
    for path in files:
        with _open(path) as reader:
            for key in reader.keys():
                dtype = reader.get_slice(key).get_dtype()
                torch_dtype = _SAFETENSORS_DTYPES.get(dtype)
                if torch_dtype is not None and torch_dtype.is_floating_point:
                    return torch_dtype
    return None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def raise_if_any(self, where: str, model_name: str, ignore_mismatched_hint: bool = False) -> None:
        problems = []
        if self.missing:
            problems.append(f"missing weights ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            problems.append(f"unexpected weights ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for name, expected, found in self.mismatched:
            problems.append(f"shape mismatch for {name}: the model expects {list(expected)}, the checkpoint has {list(found)}")
        if problems:
            hint = (" (or pass ignore_mismatched_sizes=True to initialise the weights of another shape anew)"
                    if ignore_mismatched_hint and self.mismatched else "")
            raise CheckpointError(
                f"the checkpoint in {where} does not fit {model_name}:\n  - " + "\n  - ".join(problems)
                + f"\nCheck that config.json matches the weights (sizes, vocabulary, tie_word_embeddings){hint}."
            )


class Placer(Protocol):
    """Where each tensor of a model split by a device map goes (parallel/offload.py's DevicePlacer)."""

    def device_for(self, name: str) -> torch.device:
        """The device `name` is converted on and assigned from (the CPU for a tensor kept on disk)."""

    def finish(self, name: str, tensor: torch.Tensor, mapped: bool) -> torch.Tensor:
        """The tensor to assign, once converted: a disk tensor stays memory-mapped (`mapped`: it is
        still the view of the checkpoint file) or is written to the offload folder."""


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = tensor


def load_checkpoint(
    model: torch.nn.Module,
    files: list[Path],
    *,
    rename: Callable[[str], str | None],
    dtype: torch.dtype,
    device: torch.device,
    progress: bool = True,
    convert: Callable[[str, torch.Tensor], dict[str, torch.Tensor] | None] | None = None,
    place: Placer | None = None,
    shard: Callable[[str, Any], torch.Tensor | None] | None = None,
) -> LoadReport:
    """Fill `model` (built on the meta device) from safetensors `files`.

    `rename` maps a checkpoint key to a module key, or to None for keys to skip on purpose.
    `convert` (quantized models, quantization.tensor_converter) turns one renamed tensor of a
    quantized module, already on its device, into the tensors to assign (a float weight into its
    quantized data and scales), in their final dtypes; None for tensors it leaves to the loader.
    `place` (a model split by a device map) chooses each tensor's device instead of `device`.
    `shard` (tensor parallel, parallel/tensor_parallel.py) gets a module key and the tensor's
    safetensors slice and returns this rank's part of it, reading only that part (None: read the
    whole tensor). Returns what did not fit; the caller decides which of it is an error.
    """
    expected = dict(model.state_dict(keep_vars=True))
    report = LoadReport()
    loaded: set[str] = set()
    keys_by_file = {}
    for path in files:
        with _open(path) as reader:
            keys_by_file[path] = list(reader.keys())
    stacks = expert_stacks(keys_by_file, lambda key: rename(key) in expected)
    per_expert = {key for stack in stacks.values() for _, key in stack.values()}
    total = sum(len(keys) for keys in keys_by_file.values()) - len(per_expert) + len(stacks)
    one_by_one = (lambda key: None if key in per_expert else rename(key)) if per_expert else rename
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress, leave=False) as bar:
        for path in files:
            # One shard open at a time: its mapped pages are released before the next (unless a
            # tensor kept on disk still maps them). A split model reads on the CPU, then places.
            with _open(path, device="cpu" if place is not None else str(device)) as reader:
                _load_shard(reader, path, model, expected, one_by_one, dtype, device, report, loaded, bar, convert,
                            place, shard)
        if stacks:  # the per-expert tensors, each stack read from the files that hold its parts
            holding = {path for stack in stacks.values() for path, _ in stack.values()}
            with ExitStack() as opened:
                readers = {path: opened.enter_context(_open(path)) for path in files if path in holding}
                _load_shard(StackedExperts(stacks, readers), "the per-expert tensors", model, expected, rename, dtype,
                            device, report, loaded, bar, convert, place, shard)
    report.missing = [name for name in expected if name not in loaded]
    return report


# --- Llama 4's experts, one nn.Linear per expert and projection -------------------------------------

# LLM-Compressor (and transformers, loading its checkpoints) turn Llama 4's stacked experts into
# one nn.Linear per expert and projection: `<experts>.<e>.gate_proj.weight` (intermediate, hidden),
# up_proj alike, down_proj (hidden, intermediate), each with a `weight_scale` when quantized (one
# per row, or one for the tensor).
PER_EXPERT_KEY = re.compile(r"^(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<projection>gate|up|down)_proj\."
                            r"(?P<tensor>weight|weight_scale)$")


def expert_stacks(keys_by_file: dict[Any, list[str]], wanted: Callable[[str], bool]
                  ) -> dict[str, dict[tuple[int, str], tuple[Any, str]]]:
    """Stacked key (`<experts>.gate_up_proj`, `<experts>.down_proj`, `_scale` for the scales) ->
    {(expert, projection): (file, per-expert key)}, for the stacked keys the model holds (`wanted`)."""
    stacks: dict[str, dict[tuple[int, str], tuple[Any, str]]] = {}
    for path, keys in keys_by_file.items():
        for key in keys:
            match = PER_EXPERT_KEY.match(key)
            if match is None:
                continue
            name = "down_proj" if match["projection"] == "down" else "gate_up_proj"
            stacked = f"{match['experts']}.{name}{'_scale' if match['tensor'] == 'weight_scale' else ''}"
            stacks.setdefault(stacked, {})[(int(match["expert"]), match["projection"])] = (path, key)
    return {stacked: parts for stacked, parts in stacks.items() if wanted(stacked)}


class StackedExperts:
    """A reader (keys, get_slice, get_tensor, as safetensors' own) whose tensors are the stacks of
    `expert_stacks`, each read from its per-expert parts: gate_up_proj (experts, hidden,
    2 * intermediate), gate's columns then up's, each expert's Linear transposed; down_proj (experts,
    intermediate, hidden); a `_scale` stack (experts, 1, columns) float32 from the rows' scales (a
    tensor's one scale for each of its rows). transformers' FbgemmFp8Llama4TextExperts layout, which
    the model and tensor parallel take. A slice reads only its part of each Linear."""

    def __init__(self, stacks: dict[str, dict[tuple[int, str], tuple[Any, str]]], readers: dict[Any, Any]):
        self.stacks, self.readers = stacks, readers

    def keys(self) -> list[str]:
        return list(self.stacks)

    def get_slice(self, stacked: str) -> _Stack:
        parts = self.stacks[stacked]
        scale = stacked.endswith("_scale")
        weights = self.stacks.get(stacked.removesuffix("_scale"), {})  # a scale stands for its weight's rows
        experts_path, _, name = stacked.rpartition(".")
        projections = ("down",) if name.startswith("down") else ("gate", "up")
        columns = []
        for expert in range(1 + max(expert for expert, _ in parts)):
            row = []
            for projection in projections:
                for needed, tensor in ((weights, "weight"), (parts, "weight_scale" if scale else "weight")):
                    if (expert, projection) not in needed:
                        raise CheckpointError(f"the checkpoint has per-expert tensors for {stacked} but not "
                                              f"{experts_path}.{expert}.{projection}_proj.{tensor}")
                path, key = parts[(expert, projection)]
                weight_path, weight_key = weights[(expert, projection)]
                rows = self.readers[weight_path].get_slice(weight_key).get_shape()[0]
                row.append((self.readers[path], key, rows))
            columns.append(row)
        return _Stack(columns, scale)

    def get_tensor(self, stacked: str) -> torch.Tensor:
        return self.get_slice(stacked)[:]


class _Stack:
    """One stacked tensor of `StackedExperts`, read on indexing: columns[expert] = [(reader, key,
    rows of that Linear), ...] side by side."""

    def __init__(self, columns: list[list[tuple[Any, str, int]]], scale: bool):
        self.columns, self.scale = columns, scale
        reader, key, _ = columns[0][0]
        self.dtype = reader.get_slice(key).get_dtype()
        self.inner = 1 if scale else reader.get_slice(key).get_shape()[1]
        self.width = sum(rows for _, _, rows in columns[0])

    def get_shape(self) -> list[int]:
        return [len(self.columns), self.inner, self.width]

    def get_dtype(self) -> str:
        return "F32" if self.scale else self.dtype

    def __getitem__(self, index) -> torch.Tensor:
        index = (index if isinstance(index, tuple) else (index,)) + (slice(None),) * 3
        experts, inner, wanted = index[:3]
        first, last, step = wanted.indices(self.width)
        if step != 1 or not all(isinstance(part, slice) for part in (experts, inner)):
            raise ValueError("stacked experts are read in slices of columns, step 1")
        chosen = range(len(self.columns))[experts]
        stacked = None  # filled expert by expert: one copy of the result in memory, not two
        for position, expert in enumerate(chosen):
            pieces, start = [], 0
            for reader, key, rows in self.columns[expert]:
                low, high = max(first, start), min(last, start + rows)
                if low < high:
                    pieces.append(self._read(reader, key, low - start, high - start, inner))
                start += rows
            columns = torch.cat(pieces, dim=1)  # (inner, columns)
            if stacked is None:
                stacked = columns.new_empty((len(chosen), *columns.shape))
            stacked[position] = columns
        return stacked

    def _read(self, reader, key: str, low: int, high: int, inner: slice) -> torch.Tensor:
        """Rows low:high of one Linear as (inner, high - low) columns."""
        if not self.scale:
            return reader.get_slice(key)[low:high, inner].t()
        scales = reader.get_tensor(key).float()
        if scales.numel() == 1:  # one scale for the tensor: every row's
            return scales.reshape(1, 1).expand(1, high - low)[inner]
        return scales.reshape(1, -1)[:, low:high][inner]


def _load_shard(reader, path, model, expected, rename, dtype, device, report, loaded, bar, convert, place, shard=None) -> None:
    mapped_file = isinstance(path, Path) and path.suffix == ".safetensors"  # its tensors are views of the file
    for key in reader.keys():
        bar.update(1)
        name = rename(key)
        if name is None:
            continue
        if name not in expected:
            report.unexpected.append(key)
            continue
        try:
            part = shard(name, reader.get_slice(key)) if shard is not None else None
        except (SafetensorError, OSError, RuntimeError) as error:
            raise CheckpointError(f"cannot read tensor {key} from {path}: {error}; the file may be truncated") from None
        found = tuple(part.shape) if part is not None else tuple(reader.get_slice(key).get_shape())
        wanted = tuple(expected[name].shape)
        if found != wanted and (convert is None or not getattr(convert, "owns", lambda _: False)(name)):
            report.mismatched.append((key, wanted, found))
            continue
        try:
            tensor = part if part is not None else reader.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise CheckpointError(f"cannot read tensor {key} from {path}: {error}; the file may be truncated") from None
        target = place.device_for(name) if place is not None else device
        pieces = convert(name, tensor.to(device=target)) if convert is not None else None
        owned = pieces is not None  # the converter chose the dtypes
        pieces = pieces if owned else {name: tensor}
        for piece_name, piece in pieces.items():
            if piece_name not in expected:
                report.unexpected.append(piece_name)
                continue
            if tuple(piece.shape) != tuple(expected[piece_name].shape):
                report.mismatched.append((key if piece_name == name else piece_name,
                                          tuple(expected[piece_name].shape), tuple(piece.shape)))
                continue
            if piece.is_floating_point() and not owned:
                piece = piece.to(device=target, dtype=dtype)
            else:
                piece = piece.to(device=target)
            if place is not None:
                piece = place.finish(piece_name, piece, mapped=mapped_file and piece is tensor)
            _assign(model, piece_name, piece)
            loaded.add(piece_name)


# Size units as transformers and accelerate read them (convert_file_size_to_int): the binary ones first,
# as "GIB" ends like "B"
_SIZE_UNITS = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))


def parse_size(size: Any, where: str = "max_shard_size") -> int | float:
    """A size in bytes, by transformers' and accelerate's rules: a number is bytes; a string needs a
    unit, KB/MB/GB in powers of 1000 and KiB/MiB/GiB in powers of 1024 (any case), and a decimal unit
    written with a lowercase b ("8Gb") counts bits, an eighth of it. Anything else (a bare number in
    a string, "5G", "1TB", a negative size) is an error naming `where`."""
    value: int | float | None = None
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        upper = size.upper()
        for unit, scale in _SIZE_UNITS:
            if upper.endswith(unit):
                try:
                    value = int(float(size[:-len(unit)]) * scale)
                except ValueError:
                    break
                if unit[1] != "I" and size.endswith("b"):
                    value = value // 8
                break
    if value is None or value < 0:
        raise ValueError(f"{where} = {size!r} is not a size: use a number of bytes or a number with a unit, "
                         "'500MB', '1GB' (powers of 1000) or '10GiB' (powers of 1024), as transformers reads them")
    return value


def save_checkpoint(state_dict: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str = "5GB") -> list[Path]:
    """Write safetensors shards (+ index when more than one) that transformers reads back."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().nbytes() != size:  # a view into a larger tensor (fused weights)
            tensor = tensor.clone()
        shards[-1][name] = tensor
        shard_bytes += size

    for old in list(folder.glob("model*.safetensors")) + [folder / hub.SAFE_WEIGHTS_INDEX_NAME]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        names = [hub.SAFE_WEIGHTS_NAME]
    else:
        width = max(5, int(math.log10(len(shards))) + 1)
        names = [f"model-{i + 1:0{width}d}-of-{len(shards):0{width}d}.safetensors" for i in range(len(shards))]
    paths = []
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        paths.append(folder / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        (folder / hub.SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return paths
