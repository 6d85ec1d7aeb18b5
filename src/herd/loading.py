"""Reading checkpoints into a model built on the meta device, and writing them back.

For each safetensors shard, for each tensor: rename (checkpoint key -> module key), check the
shape, cast the dtype, place it on its device, assign it. Tensors stream from the file to their
device one at a time, so peak memory stays near the model's own size. Whatever does not fit
(missing, unexpected or mismatched weights) is reported together as one `CheckpointError`.

Only safetensors (and Llama GGUF files, through `quantization/gguf.py`) are read. Pickle-based files (`pytorch_model.bin`, `.pt`, `.pth`) can run code
when loaded, so they are refused with a message on how to convert them; they are never opened.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
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

    def raise_if_any(self, where: str, model_name: str) -> None:
        problems = []
        if self.missing:
            problems.append(f"missing weights ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            problems.append(f"unexpected weights ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for name, expected, found in self.mismatched:
            problems.append(f"shape mismatch for {name}: the model expects {list(expected)}, the checkpoint has {list(found)}")
        if problems:
            raise CheckpointError(
                f"the checkpoint in {where} does not fit {model_name}:\n  - " + "\n  - ".join(problems)
                + "\nCheck that config.json matches the weights (sizes, vocabulary, tie_word_embeddings)."
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
    total = 0
    for path in files:
        with _open(path) as reader:
            total += len(reader.keys())
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress, leave=False) as bar:
        for path in files:
            # One shard open at a time: its mapped pages are released before the next (unless a
            # tensor kept on disk still maps them). A split model reads on the CPU, then places.
            with _open(path, device="cpu" if place is not None else str(device)) as reader:
                _load_shard(reader, path, model, expected, rename, dtype, device, report, loaded, bar, convert, place, shard)
    report.missing = [name for name in expected if name not in loaded]
    return report


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


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '10KiB' / 1000 -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"))
    if not match:
        raise ValueError(f"cannot read the size {size!r}; use e.g. '5GB' or a number of bytes")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit or " "))


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
