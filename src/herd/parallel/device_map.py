"""device_map: which device holds each part of a model, decided on the meta device before loading.

The unit of placement is a whole module (`units`): each text decoder layer, the token embeddings,
the final norm, the rotary embedding, the head, and a vision tower or projector whole. A device is
a GPU index (0, 1, ...), "cpu" (CPU memory) or "disk" (read in place from the checkpoint's
safetensors, memory-mapped; see offload.py).

Two kinds of maps, as transformers accepts them:

- explicit: module path -> device. A key covers its module and everything under it; the longest
  key wins, "" covers the whole model. A key inside a unit places that part apart from its unit
  (`{"": 0, "model.layers.3.feed_forward.experts": "cpu"}`: Llama 4's routed experts of layer 3 in
  CPU memory). Every weight must be covered; keys must name modules.
- a strategy: "auto" (= "balanced"), "balanced", "balanced_low_0", "sequential", within
  `max_memory` ({0: "10GiB", "cpu": "30GiB"}; unset: 90% of each GPU's free memory and of the
  available CPU memory, as accelerate; set: only the devices it names, then disk). Units are taken
  in order and go to GPUs first, then CPU, then disk, never back to an earlier device.
  "balanced" spreads the GPUs' share evenly, "balanced_low_0" keeps GPU 0 as empty as it can,
  "sequential" fills each GPU before the next. CPU memory keeps room for the largest unit still to
  place, as accelerate does, so that on a machine without GPUs a map is the one transformers makes.

What a GPU must hold besides weights, from the memory plan (memory_plan.py) for a request of
`RESERVE_PROMPT_TOKENS` + `RESERVE_NEW_TOKENS` tokens at batch 1:
- each layer's KV cache, on the GPU that computes the layer;
- on the first GPU, the activations estimate; and when anything is offloaded, two of the largest
  layers (the one computing and the next one streaming in: offload.py) and the KV cache of every
  layer (offloaded layers compute there). accelerate similarly keeps room for the largest layer on
  GPU 0. generate() checks the real request before it starts (offload.before_generate).
- Llama 4: when whole layers do not fit the GPUs but every layer without its routed experts does,
  "auto" keeps attention, router and shared expert on the GPUs and puts the routed experts
  (`feed_forward.experts`) in CPU memory (then on disk), and the first GPU keeps room for one
  layer's experts (the per-use copy, offload.py). The same placement is written explicitly with
  `feed_forward.experts` keys.

`model.hf_device_map` records an explicit map as given and a strategy's result with accelerate's
key format: units by path, a module whose units all share a device grouped under its own path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..loading import parse_size

Device = int | str  # a GPU index, "cpu" or "disk"
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
HOST_DEVICES = ("cpu", "disk")
RESERVE_PROMPT_TOKENS = 128
RESERVE_NEW_TOKENS = 256
UNUSED_SHARE = 0.1  # of each device's free memory left alone when max_memory is unset (as accelerate)


@dataclass
class Unit:
    name: str
    module: nn.Module
    layer_index: int | None = None  # its index among the text decoder's layers (its KV cache), else None


def _is_text_decoder(module: nn.Module) -> bool:
    return "embed_tokens" in module._modules and isinstance(module._modules.get("layers"), nn.ModuleList)


def units(model: nn.Module) -> list[Unit]:
    """The modules a device map places whole, in the model's order: inside each text decoder its
    children, with every decoder layer a unit of its own; elsewhere each child of the modules that
    lead to a decoder."""
    decoders = [path for path, module in model.named_modules() if _is_text_decoder(module)]
    found: list[Unit] = []

    def visit(prefix: str, module: nn.Module) -> None:
        stray = [name for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
        if stray:  # weights of a module that is split: no unit would own them
            raise NotImplementedError(f"{type(module).__name__} holds weights ({', '.join(stray)}) beside the modules "
                                      "a device map places; herd cannot split it")
        for name, child in module.named_children():
            path = prefix + name
            if path in decoders:
                for part_name, part in child.named_children():
                    if isinstance(part, nn.ModuleList):
                        found.extend(Unit(f"{path}.{part_name}.{i}", layer, i) for i, layer in enumerate(part))
                    else:
                        found.append(Unit(f"{path}.{part_name}", part))
            elif any(decoder.startswith(path + ".") for decoder in decoders):
                visit(path + ".", child)
            else:
                found.append(Unit(path, child))

    if "" in decoders:  # the decoder itself (LlamaModel)
        decoders = ["_root"]
        wrapper = nn.Module()
        wrapper._modules["_root"] = model
        visit("", wrapper)
        for unit in found:
            unit.name = unit.name.removeprefix("_root.")
    else:
        visit("", model)
    return found


def lookup(mapping: dict[str, Any], name: str) -> Any:
    """The value of the longest key of `mapping` that is `name` or a dotted prefix of it ("" last)."""
    while True:
        if name in mapping:
            return mapping[name]
        if not name:
            return None
        name = name.rpartition(".")[0]


def normalize_device(value: Any, where: str) -> Device:
    """0 / "cuda:1" / torch.device("cuda", 1) / "cuda" -> a GPU index; "cpu" and "disk" as they are.
    `where` names the value in errors ("device_map['lm_head']")."""
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{where} = {value}: a GPU index cannot be negative; use 'cpu' for the CPU")
        return value
    if isinstance(value, str):
        if value in HOST_DEVICES:
            return value
        if value == "cuda":
            return 0
        match = re.fullmatch(r"cuda:(\d+)", value)
        if match:
            return int(match.group(1))
    raise ValueError(f"{where} = {value!r} is not a device: use a GPU index (0), 'cuda:N', 'cpu' or 'disk'")


def check_gpus(devices: dict[str, Device]) -> None:
    """Every GPU index named (label -> device, e.g. "device_map['lm_head']" -> 1) exists."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for label, device in devices.items():
        if isinstance(device, int) and device >= count:
            seen = f"torch sees {count} GPU(s)" if count else "torch sees no CUDA device"
            raise RuntimeError(f"{label} names GPU {device}, but {seen}; use an existing GPU index, 'cpu' or 'disk'")


def torch_device(device: Device) -> torch.device:
    """Where a device's tensors live: its GPU, or the CPU for "cpu" and "disk" (memory-mapped)."""
    return torch.device("cuda", device) if isinstance(device, int) else torch.device("cpu")


@dataclass
class Placement:
    """A resolved device map: every unit's device, the parts of units placed apart from them
    (`inner`), and what `model.hf_device_map` records."""

    unit_devices: dict[str, Device]
    inner: dict[str, Device] = field(default_factory=dict)
    hf_device_map: dict[str, Any] = field(default_factory=dict)

    def device_of(self, name: str) -> Device:
        """The device of a module or tensor path."""
        device = lookup(self.inner, name)
        return device if device is not None else lookup(self.unit_devices, name)

    @property
    def gpus(self) -> list[int]:
        return sorted({d for d in [*self.unit_devices.values(), *self.inner.values()] if isinstance(d, int)})

    @property
    def compute_device(self) -> torch.device:
        """Where cpu and disk parts compute: the map's first GPU, else the CPU (as accelerate's main device)."""
        return torch.device("cuda", self.gpus[0]) if self.gpus else torch.device("cpu")

    @property
    def is_split(self) -> bool:
        devices = {*self.unit_devices.values(), *self.inner.values()}
        return len(devices) > 1 or "disk" in devices

    @property
    def single_device(self) -> torch.device:
        (device,) = {*self.unit_devices.values(), *self.inner.values()}
        return torch_device(device)


# --- explicit maps ----------------------------------------------------------------------------


def explicit_placement(model: nn.Module, device_map: dict[str, Any]) -> Placement:
    """Check an explicit map against the model (unknown keys, weights it leaves unplaced, devices)
    and resolve each unit's device."""
    devices = {key: normalize_device(value, f"device_map[{key!r}]") for key, value in device_map.items()}
    check_gpus({f"device_map[{key!r}]": device for key, device in devices.items()})
    modules = dict(model.named_modules())
    tensor_names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    for key in devices:
        if key in modules:
            continue
        if key in tensor_names:
            raise ValueError(f"device_map key {key!r} names a weight; name the module that holds it "
                             f"({key.rpartition('.')[0]!r})")
        examples = ", ".join(repr(unit.name) for unit in units(model)[:3])
        raise ValueError(f"device_map key {key!r} is not a module of {type(model).__name__} "
                         f"(its parts are named like {examples})")
    found = units(model)
    unit_devices, inner, unplaced, unsaved = {}, {}, [], []
    for unit in found:
        device = lookup(devices, unit.name)
        within = {key: value for key, value in devices.items() if key.startswith(unit.name + ".")}
        inner.update(within)
        if device is None:
            # covered by keys inside it only: every one of its weights must be
            names = [f"{unit.name}.{n}" for n, _ in [*unit.module.named_parameters(), *unit.module.named_buffers()]]
            covered = [lookup(within, name) for name in names]
            if not unit.module.state_dict():  # nothing read from a checkpoint (the rotary embedding's inv_freq)
                unsaved.append(unit.name)
                continue
            if not names or any(d is None for d in covered):
                unplaced.append(unit.name)
                continue
            device = covered[0]
        unit_devices[unit.name] = device
    # A module with nothing in the state dict need not be named, as transformers checks only the
    # state dict's tensors (accelerate's check_device_map): it goes where cpu and disk parts compute.
    # When the map is refused for a weight it leaves out, the error lists these too (every module the
    # map does not name, in the model's order).
    gpus = sorted(d for d in [*unit_devices.values(), *inner.values()] if isinstance(d, int))
    for name in unsaved:
        unit_devices[name] = gpus[0] if gpus else "cpu"
    unit_devices = {unit.name: unit_devices[unit.name] for unit in found if unit.name in unit_devices}
    if unplaced:
        unplaced = [unit.name for unit in found if unit.name in unplaced or unit.name in unsaved]
        raise ValueError(f"device_map leaves {len(unplaced)} module(s) of {type(model).__name__} without a device: "
                         f"{', '.join(unplaced)}; add them to the map, or a key '' for everything not named")
    return Placement(unit_devices, inner, hf_device_map=dict(device_map))


# --- strategies -------------------------------------------------------------------------------


def memory_size(size: Any, where: str) -> float:
    """A max_memory value in bytes, by accelerate's rules (loading.parse_size)."""
    return float(parse_size(size, where))


def available_cpu_memory() -> int:
    """MemAvailable of /proc/meminfo (Linux), else the free pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def capacities(max_memory: dict | None) -> dict[Device, float]:
    """Bytes each device may hold: max_memory as given (only the devices it names; disk is never
    limited), or 90% of every GPU's free memory and of the available CPU memory."""
    if max_memory is None:
        found: dict[Device, float] = {}
        for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            found[index] = torch.cuda.mem_get_info(index)[0] * (1 - UNUSED_SHARE)
        found["cpu"] = available_cpu_memory() * (1 - UNUSED_SHARE)
        return found
    if not isinstance(max_memory, dict):
        raise TypeError(f"max_memory must be a dict such as {{0: '10GiB', 'cpu': '30GiB'}}, got {type(max_memory).__name__}")
    found = {}
    for key, size in max_memory.items():
        try:
            device = normalize_device(key, "")
        except ValueError:
            raise ValueError(f"max_memory key {key!r} is not a device: use a GPU index (0), 'cpu' or 'disk'") from None
        check_gpus({f"max_memory[{key!r}]": device})
        bytes_ = memory_size(size, f"max_memory[{key!r}]")
        if device != "disk":
            found[device] = bytes_
    return dict(sorted(found.items(), key=lambda item: (not isinstance(item[0], int), str(item[0]))))


@dataclass
class _Sized:
    name: str
    weights: int  # bytes, tensors shared with an earlier unit not counted
    kv: int  # bytes of its KV cache for the reserve request (layers only)
    experts: str | None = None  # path of its routed experts (Llama 4 MoE layers)
    expert_bytes: int = 0
    routed_bytes: int = 0  # of those, read for one token (its num_experts_per_tok experts)
    follows: str | None = None  # a unit whose every tensor belongs to this earlier unit (a tied head)


def _tensor_bytes(module: nn.Module, seen: dict[int, str], owner: str) -> tuple[int, set[str]]:
    """Bytes of `module`'s tensors not counted before, and the earlier owners of those it shares."""
    total, shared = 0, set()
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) in seen:
            shared.add(seen[id(tensor)])
            continue
        seen[id(tensor)] = owner
        total += tensor.numel() * tensor.element_size()
    return total, shared


def _routed_experts(module: nn.Module) -> nn.Module | None:
    feed_forward = getattr(module, "feed_forward", None)
    experts = getattr(feed_forward, "experts", None)
    return experts if experts is not None and hasattr(experts, "expert_forward") else None


def sized_units(model: nn.Module, dtype: torch.dtype) -> list[_Sized]:
    """Each unit's weight bytes (as allocated: a quantized module's data and scales) and, for a
    layer, its KV cache for the reserve request (memory_plan.layer_kv_bytes)."""
    from ..memory_plan import layer_kv_bytes

    kv = layer_kv_bytes(model.config, dtype, RESERVE_PROMPT_TOKENS + RESERVE_NEW_TOKENS)
    seen: dict[int, str] = {}
    sized = []
    for unit in units(model):
        weights, shared = _tensor_bytes(unit.module, seen, unit.name)
        follows = next(iter(shared)) if weights == 0 and shared else None
        experts = _routed_experts(unit.module)
        expert_bytes = sum(t.numel() * t.element_size() for t in [*experts.parameters(), *experts.buffers()]) \
            if experts is not None else 0
        routed = expert_bytes * min(1.0, getattr(model.config.get_text_config(), "num_experts_per_tok", 1)
                                    / max(1, getattr(experts, "num_experts", 1)))
        sized.append(_Sized(unit.name, weights, kv[unit.layer_index] if unit.layer_index is not None else 0,
                            f"{unit.name}.feed_forward.experts" if experts is not None else None, expert_bytes,
                            int(routed), follows))
    return sized


def _fill(items: list[tuple[str, int, int]], order: list[Device], budgets: dict[Device, float]) -> dict[str, Device] | None:
    """Items (name, bytes on a GPU, bytes on the host) in order onto devices in order, never going
    back; None when they do not fit (disk takes anything). CPU memory keeps room for the largest
    item still to come, as accelerate does (a disk layer's pages are read there while it computes),
    so that a map within max_memory={"cpu": ...} is the one transformers makes."""
    placed, used, index = {}, dict.fromkeys(order, 0.0), 0
    largest_after = [0] * (len(items) + 1)  # largest host bytes among items[i + 1:]
    for i in range(len(items) - 1, 0, -1):
        largest_after[i - 1] = max(largest_after[i], items[i][2])
    for position, (name, gpu_bytes, host_bytes) in enumerate(items):
        while True:
            if index == len(order):
                return None
            device = order[index]
            cost = gpu_bytes if isinstance(device, int) else host_bytes
            reserve = largest_after[position] if device == "cpu" else 0
            if device == "disk" or used[device] + cost + reserve <= budgets.get(device, 0):
                break
            index += 1
        placed[name] = device
        used[device] += cost
    return placed


def _gpu_limits(strategy: str, gpus: list[int], budgets: dict[Device, float], total: float, largest: float) -> dict:
    """Per-GPU limits of the balanced strategies (accelerate's get_balanced_memory): an even share
    plus 1.25x the largest unit of slack, the last GPU keeping its whole budget; balanced_low_0
    leaves GPU 0 only what the others cannot take."""
    limits = dict(budgets)
    if strategy == "sequential" or len(gpus) < 2:
        return limits
    low_zero = strategy == "balanced_low_0"
    share = total / (len(gpus) - 1 if low_zero else len(gpus)) + 1.25 * largest
    for gpu in gpus[:-1]:
        limits[gpu] = min(budgets[gpu], share) if not (low_zero and gpu == gpus[0]) else budgets[gpu]
    if low_zero:  # what the others leave, with the same slack
        limits[gpus[0]] = min(budgets[gpus[0]], max(0.0, total - sum(limits[g] for g in gpus[1:])) + 1.25 * largest)
    return limits


def infer_placement(model: nn.Module, strategy: str, max_memory: dict | None, dtype: torch.dtype) -> Placement:
    """The map of a strategy ("auto", "balanced", "balanced_low_0", "sequential") within max_memory."""
    from ..memory_plan import activation_bytes

    if strategy not in STRATEGIES:
        raise ValueError(f"device_map={strategy!r} is not a strategy: use one of {', '.join(STRATEGIES)}, "
                         "a device, or a dict of module path -> device")
    balance = "balanced" if strategy == "auto" else strategy
    sized = sized_units(model, dtype)
    placed_units = [s for s in sized if not s.follows]  # a tied head goes where its weights are
    caps = capacities(max_memory)
    gpus = [d for d in caps if isinstance(d, int) and caps[d] > 0]
    budgets = dict(caps)
    if gpus:
        budgets[gpus[0]] -= activation_bytes(model.config, dtype, RESERVE_PROMPT_TOKENS)

    def fill(items: list[tuple[str, int, int]], order: list[Device], limits: dict) -> dict | None:
        total = sum(gpu for _, gpu, _ in items)
        largest = max((gpu for _, gpu, _ in items), default=0)
        return _fill(items, order, _gpu_limits(balance, gpus, limits, total, largest))

    whole_layers = [(s.name, s.weights + s.kv, s.weights) for s in placed_units]
    placed = fill(whole_layers, gpus, budgets) if gpus else None
    inner: dict[str, Device] = {}
    if placed is None:  # offloading: the first GPU computes what is offloaded
        offload_budgets = dict(budgets)
        if gpus:
            largest_layer = max((s.weights for s in placed_units if s.kv), default=0)
            offload_budgets[gpus[0]] -= 2 * largest_layer + sum(s.kv for s in sized)
        placed = fill(whole_layers, [*gpus, "cpu", "disk"], offload_budgets)
        with_experts = _experts_on_host(placed_units, gpus, budgets, fill) if gpus else None
        if with_experts is not None and (placed is None or with_experts[2] < _streamed_bytes(placed_units, placed)):
            placed, inner, _ = with_experts
    if placed is None:
        raise RuntimeError("no device map fits: the first GPU cannot hold the activations and the buffers of the "
                           "offloaded layers besides what max_memory leaves it; give it more memory or quantize")
    for s in sized:
        if s.follows:
            placed[s.name] = placed[s.follows]
    unit_devices = {s.name: placed[s.name] for s in sized}
    recorded = {}
    # each layer's experts right after it, as accelerate lists a split module's parts; a tied head
    # right after the embeddings it shares, as accelerate places tied modules together
    followers = {s.follows: [f.name for f in sized if f.follows == s.follows] for s in sized if s.follows}
    for s in sized:
        if s.follows:
            continue
        recorded[s.name] = placed[s.name]
        if s.experts in inner:
            recorded[s.experts] = inner[s.experts]
        for name in followers.get(s.name, ()):
            recorded[name] = placed[name]
    return Placement(unit_devices, inner, hf_device_map=clean_device_map(recorded))


def _streamed_bytes(placed_units: list[_Sized], placed: dict[str, Device]) -> int:
    """Weight bytes that cross to the GPU per token when whole units sit on the host."""
    return sum(s.weights for s in placed_units if placed[s.name] in HOST_DEVICES)


def _experts_on_host(placed_units: list[_Sized], gpus: list[int], budgets: dict, fill) -> tuple | None:
    """Llama 4: every layer on the GPUs without its routed experts, the experts in CPU memory then
    on disk: (unit devices, experts devices, bytes of routed experts used per token at batch 1), or
    None when the model has no routed experts or the rest does not fit the GPUs."""
    moe = [s for s in placed_units if s.experts]
    if not moe:
        return None
    gpu_budgets = dict(budgets)
    # the first GPU keeps the KV of every layer's and room for one layer's experts copied for use
    gpu_budgets[gpus[0]] -= max(s.expert_bytes for s in moe)
    placed = fill([(s.name, s.weights - s.expert_bytes + s.kv, 0) for s in placed_units], gpus, gpu_budgets)
    if placed is None:
        return None
    experts = _fill([(s.experts, 0, s.expert_bytes) for s in moe], ["cpu", "disk"], budgets)
    return placed, experts, sum(s.routed_bytes for s in moe)


def clean_device_map(device_map: dict[str, Device], module_name: str = "") -> dict[str, Device]:
    """Group the keys under a module that all share one device into that module's key (accelerate's
    clean_device_map): {"model.a": 0, "model.b": 0} -> {"model": 0}, the grouped key moved to the
    end of the map as accelerate moves it (accelerate visits sibling groups in a set's order,
    which varies between runs; herd visits them in the map's order)."""
    prefix = f"{module_name}." if module_name else ""
    values = [value for key, value in device_map.items() if key.startswith(prefix)]
    if len(values) > 1 and len(set(values)) == 1:
        for key in [key for key in device_map if key.startswith(prefix)]:
            del device_map[key]
        device_map[module_name] = values[0]  # last, where accelerate writes the grouped key
        return device_map
    depth = len(module_name.split(".")) + 1 if module_name else 1
    children = dict.fromkeys(".".join(key.split(".")[:depth]) for key in device_map
                             if key.startswith(prefix) and len(key) > len(module_name))
    for child in children:
        clean_device_map(device_map, child)
    return device_map


# --- from_pretrained's entry --------------------------------------------------------------------


def resolve_placement(model: nn.Module, device_map: Any, max_memory: dict | None, dtype: torch.dtype) -> Placement | None:
    """The Placement of a device_map that needs one (a strategy or a dict), else None (one device,
    which modeling_utils.resolve_device reads). A map whose units all land on one device and
    nothing on disk is not split: `Placement.is_split` is False."""
    if isinstance(device_map, dict):
        return explicit_placement(model, device_map)
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return infer_placement(model, device_map, max_memory, dtype)
    if device_map is None:
        return None
    check_single_device(device_map)
    return None


def check_single_device(device_map: Any) -> None:
    """A device_map that names one device (0, "cuda:1", "cpu", torch.device): one that herd can
    load the whole model onto, and a GPU that exists."""
    if isinstance(device_map, str) and device_map == "disk":
        # transformers refuses it too: a string must be a torch device or a strategy
        raise ValueError("device_map='disk' is not a device name; to read every weight from the checkpoint in place "
                         "write device_map={'': 'disk'}")
    if str(device_map) == "meta":
        raise ValueError(f"device_map={device_map!r} would load no weights; from_pretrained reads the checkpoint, "
                         "so for an empty model build it under `with torch.device('meta'): Model(config)`")
    label = f"device_map={device_map!r}"
    try:
        device = normalize_device(device_map, label)
    except ValueError:
        raise ValueError(f"{label} is not a device herd loads onto: use a GPU index (0), 'cuda:N', 'cpu', a "
                         "strategy ('auto', ...) or a dict of module path -> device") from None
    check_gpus({label: device})


def split_reason(model: nn.Module) -> str | None:
    """Why the fast decoder cannot run this model, if a device map splits or offloads it."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return None
    devices = sorted({str(d) for d in device_map.values()})
    return (f"the device_map places the model on {', '.join(devices)} (the fast path needs the whole model on one "
            "GPU)")


def check_fits(model: nn.Module, placement: Placement, config, quantization, dtype: torch.dtype) -> None:
    """Before loading: the weights a map puts on each GPU (plus, on the first GPU, two of the largest
    streamed units) within its free memory, and those in CPU memory within the available memory;
    else an error saying what to change (with the memory plan's suggestion for a GPU)."""
    sizes = {s.name: s.weights for s in sized_units(model, dtype)}
    inner_bytes = {name: sum(t.numel() * t.element_size() for t in [*model.get_submodule(name).parameters(),
                                                                    *model.get_submodule(name).buffers()])
                   for name in placement.inner}
    held: dict[Device, int] = {}
    streamed = [0]
    for name, device in placement.unit_devices.items():
        own = sizes[name] - sum(b for inner, b in inner_bytes.items() if inner.startswith(name + "."))
        held[device] = held.get(device, 0) + own
        if device in HOST_DEVICES:
            streamed.append(own)
    for name, device in placement.inner.items():
        held[device] = held.get(device, 0) + inner_bytes[name]
        if device in HOST_DEVICES:
            streamed.append(inner_bytes[name])
    if placement.gpus:
        first = placement.gpus[0]
        held[first] = held.get(first, 0) + 2 * max(streamed)
    for device, need in held.items():
        if isinstance(device, int):
            free = torch.cuda.mem_get_info(device)[0]
            if need > free:
                from ..memory_plan import plan_memory

                plan = plan_memory(config, dtype=dtype, quantization=quantization, prompt_tokens=0, max_new_tokens=0)
                raise torch.OutOfMemoryError(
                    f"the device_map puts {need / 1e9:.2f} GB of weights on cuda:{device}, which has {free / 1e9:.2f} GB "
                    "free: move layers to another GPU, 'cpu' or 'disk' (device_map='auto' does it within max_memory); "
                    f"the whole model on one GPU of that size: {plan.suggestion(free)}")
        elif device == "cpu":
            free = available_cpu_memory()
            if need > free:
                raise MemoryError(f"the device_map puts {need / 1e9:.2f} GB of weights in CPU memory, which has "
                                  f"{free / 1e9:.2f} GB available: put layers on 'disk' (device_map='auto' with "
                                  "max_memory={'cpu': ...} does it)")
