"""Running a model a device map splits: hooks from outside the model code, weights streamed to the
GPU, Llama 4's routed experts kept on the host.

- Loading (`DevicePlacer`): each tensor goes to its unit's device. A "disk" tensor stays a view of
  the checkpoint's safetensors file (memory-mapped: nothing is copied, pages are read when used)
  when the load does not change it; a converted one (another dtype, quantized while loading, a
  GGUF block) is written to `offload_folder` as safetensors and mapped from there.
- Execution (`dispatch`): a forward pre-hook on each unit moves its inputs (tensors, and those in
  tuples, dicts and dataclasses such as the attention mask description) to the device that
  computes it; a hook on the model returns its outputs on the device of its inputs. Modules that
  a unit's parents call directly (Mllama's image keys/values) get the same move. Nothing in the
  models' forward changes.
- Where cpu/disk units compute: with a GPU in the map, on its first GPU, their weights streamed
  in (`WeightStreamer`): CPU units' weights in pinned memory, copied on a side CUDA stream; while
  one unit computes, the next offloaded unit's copy runs; a unit's GPU copy is dropped after its
  forward. Disk units copy from the memory map (the host reads the file while the GPU runs the
  work queued before). Token embeddings compute where they are stored (a lookup reads only the
  rows it needs). Without a GPU in the map they compute on the CPU, in place.
- Llama 4's routed experts placed on the host while their layer is on a GPU
  (`RoutedExpertsOffload`): either computed on the CPU (the routed tokens' hidden states go to the
  CPU and back) or copied per use to the GPU (only the experts the tokens were routed to). Each is
  measured once on first use, for decode-sized and prefill-sized calls apart, and the faster kept.
- generate() (`before_generate`): warns once that the model runs offloaded and about how many
  tokens/s to expect, and refuses a request whose KV cache does not fit the GPUs, with what would.

The tokens/s estimate: bytes crossing to the GPU per token (offloaded units whole; for routed
experts, the num_experts_per_tok experts of each layer) over `PCIE_BYTES_PER_S` (25 GB/s, a PCIe
4/5 x16 host-to-device copy from pinned memory), plus the bytes of disk units over
`DISK_BYTES_PER_S` (2 GB/s, one NVMe drive; pages already in the page cache read faster). It is a
ceiling: the compute of the layers on the GPU comes on top.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .device_map import HOST_DEVICES, Placement, torch_device, units

logger = logging.getLogger("herd")

PCIE_BYTES_PER_S = 25e9
DISK_BYTES_PER_S = 2e9
DECODE_SIZED_TOKENS = 16  # calls of at most this many tokens are measured apart from larger ones


# --- loading ----------------------------------------------------------------------------------


class DevicePlacer:
    """loading.Placer for a split model: each tensor to its device, disk tensors memory-mapped."""

    def __init__(self, placement: Placement, offload_folder: str | Path | None):
        self.placement = placement
        self.offload_folder = Path(offload_folder) if offload_folder is not None else None

    def device_for(self, name: str) -> torch.device:
        return torch_device(self.placement.device_of(name))

    def finish(self, name: str, tensor: torch.Tensor, mapped: bool) -> torch.Tensor:
        if self.placement.device_of(name) != "disk" or mapped:
            return tensor
        return write_offloaded(name, tensor, self.offload_folder)


def write_offloaded(name: str, tensor: torch.Tensor, folder: Path | None) -> torch.Tensor:
    """`tensor` written to `folder`/`name`.safetensors, returned memory-mapped from there."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..loading import CheckpointError

    if folder is None:
        raise CheckpointError(f"{name} goes to 'disk' but is converted while loading, so it cannot be read from the "
                              "checkpoint in place: pass offload_folder=PATH for the converted weights")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({name: tensor.contiguous()}, str(path))
    with safe_open(str(path), framework="pt", device="cpu") as reader:
        return reader.get_tensor(name)


def check_offload_folder(placement: Placement, files: list, rename: Callable[[str], str | None], dtype: torch.dtype,
                         converts: str | None, offload_folder: Any) -> None:
    """Before reading anything: disk weights that the load converts need offload_folder. `converts`
    names a conversion of every weight (quantizing while loading, a GGUF file), else the stored
    dtypes are read from the safetensors headers and compared with `dtype`."""
    if offload_folder is not None or "disk" not in {*placement.unit_devices.values(), *placement.inner.values()}:
        return
    from ..loading import _SAFETENSORS_DTYPES, _open

    reason = converts
    if reason is None:
        for path in files:
            if not isinstance(path, Path):
                continue
            with _open(path) as reader:
                for key in reader.keys():  # noqa: SIM118 (a safetensors reader, not a dict)
                    name = rename(key)
                    if name is None or placement.device_of(name) != "disk":
                        continue
                    stored = _SAFETENSORS_DTYPES.get(reader.get_slice(key).get_dtype())
                    if stored is not None and stored.is_floating_point and stored != dtype:
                        reason = f"{name} is stored as {stored} and loaded as {dtype}"
                        break
            if reason:
                break
    if reason:
        raise ValueError(f"device_map puts weights on 'disk' that cannot be read from the checkpoint in place "
                         f"({reason}): pass offload_folder=PATH, a folder for the converted weights")


# --- moving inputs ----------------------------------------------------------------------------


class TensorMover:
    """Moves the tensors in a value (tensors, tuples, lists, dicts, dataclasses) to a device. One
    forward's moves are remembered (`memo`), so the rotary tables and masks cross to a GPU once
    per forward, not once per layer."""

    def __init__(self):
        self.memo: dict[tuple[int, torch.device], tuple[Any, Any]] = {}

    def to(self, value: Any, device: torch.device) -> Any:
        if isinstance(value, torch.Tensor):
            if value.device == device:
                return value
            return self._remembered(value, device, lambda: value.to(device, non_blocking=device.type == "cuda"))
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(self.to(item, device) for item in value)
        if isinstance(value, list):
            return [self.to(item, device) for item in value]
        if isinstance(value, dict):
            return {key: self.to(item, device) for key, item in value.items()}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return self._remembered(value, device, lambda: self._moved_dataclass(value, device))
        return value

    def _remembered(self, value: Any, device: torch.device, move: Callable[[], Any]) -> Any:
        key = (id(value), device)
        if key not in self.memo:
            self.memo[key] = (value, move())  # the source is kept so that its id stays its own
        return self.memo[key][1]

    def _moved_dataclass(self, value: Any, device: torch.device) -> Any:
        changes = {}
        for item in dataclasses.fields(value):
            if not item.init:
                continue
            current = getattr(value, item.name)
            if item.name.startswith("_"):  # a cache of derived tensors (AttentionMask._realised): rebuilt there
                changes[item.name] = type(current)() if isinstance(current, dict) else current
                continue
            moved = self.to(current, device)
            if moved is not current:
                changes[item.name] = moved
        return dataclasses.replace(value, **changes) if changes else value


def _first_device(args: tuple, kwargs: dict) -> torch.device | None:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor):
            return value.device
    return None


# --- streaming weights to the GPU -------------------------------------------------------------


class StreamedModule:
    """A module whose weights live on the host (pinned CPU memory or a memory map) and are copied to
    `device` for its forward. `owned` are its tensors: (module, name, is_parameter, host tensor),
    without those of parts placed apart from it."""

    def __init__(self, name: str, module: nn.Module, device: torch.device, skip: set[nn.Module], pin: bool):
        self.name, self.module, self.device = name, module, device
        self.owned: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
        pinned: dict[int, torch.Tensor] = {}
        for owner in _modules_outside(module, skip):
            for slots, is_parameter in ((owner._parameters, True), (owner._buffers, False)):
                for leaf, tensor in slots.items():
                    if tensor is None:
                        continue
                    if pin and tensor.device.type == "cpu":
                        if id(tensor) not in pinned:
                            pinned[id(tensor)] = tensor.pin_memory()
                        host = pinned[id(tensor)]
                        slots[leaf] = nn.Parameter(host, requires_grad=False) if is_parameter else host
                    self.owned.append((owner, leaf, is_parameter, slots[leaf]))
        self.on_device: list[torch.Tensor] | None = None
        self.bytes = sum(host.numel() * host.element_size() for *_, host in self.owned)

    def copy_in(self) -> None:
        """Start copying to the device on the current stream (the streamer's side stream)."""
        self.on_device = [host.to(self.device, non_blocking=True) for *_, host in self.owned]

    def swap_in(self, stream: torch.cuda.Stream) -> None:
        for (owner, leaf, is_parameter, _), tensor in zip(self.owned, self.on_device):
            tensor.record_stream(stream)  # allocated on the side stream, used on this one
            slots = owner._parameters if is_parameter else owner._buffers
            slots[leaf] = nn.Parameter(tensor, requires_grad=False) if is_parameter else tensor

    def swap_out(self) -> None:
        from ..quantization import QuantizedLinear

        for owner, leaf, is_parameter, host in self.owned:
            (owner._parameters if is_parameter else owner._buffers)[leaf] = host
            if isinstance(owner, QuantizedLinear):  # its kernels' layouts of the GPU copy would keep it alive
                owner._kernel_weight = owner._packed = None
        self.on_device = None


def _modules_outside(module: nn.Module, skip: set[nn.Module]) -> list[nn.Module]:
    """`module` and its descendants, without the subtrees rooted at `skip`."""
    found, stack = [], [module]
    while stack:
        current = stack.pop()
        if current in skip:
            continue
        found.append(current)
        stack.extend(current.children())
    return found


class WeightStreamer:
    """Copies offloaded modules' weights to one GPU on a side stream, the next module's while the
    current one computes; at most two modules' weights are on the GPU at a time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.modules: list[StreamedModule] = []  # in the model's order (the order they run)
        self.copied: dict[StreamedModule, torch.cuda.Event] = {}
        self.active: set[StreamedModule] = set()
        self.copies = 0  # modules copied so far (tests check the streaming ran)

    def add(self, streamed: StreamedModule) -> None:
        self.modules.append(streamed)

    def prefetch(self, streamed: StreamedModule) -> None:
        if streamed in self.copied or streamed in self.active:
            return
        # the side stream must not read pinned memory before earlier work on it is queued
        with torch.cuda.stream(self.stream):
            streamed.copy_in()
            event = torch.cuda.Event()
            event.record(self.stream)
        self.copied[streamed] = event
        self.copies += 1

    def ensure(self, streamed: StreamedModule) -> None:
        """`streamed`'s weights on the GPU for the work queued from now on."""
        if streamed in self.active:
            return
        self.prefetch(streamed)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.copied.pop(streamed))
        streamed.swap_in(current)
        self.active.add(streamed)

    def begin(self, streamed: StreamedModule) -> None:
        """Before `streamed`'s forward: its weights in, any other module's (one skipped, e.g. an
        Mllama cross-attention layer without an image) out, the next module's copy started."""
        self.ensure(streamed)
        for other in list(self.active):
            # (a unit whose part placed apart runs now is still computing: it keeps its weights)
            if other is not streamed and not streamed.name.startswith(other.name + "."):
                self.end(other)
        for other in list(self.copied):
            if other is not self.next_after(streamed):
                self.copied.pop(other)
                other.on_device = None
        self.prefetch(self.next_after(streamed))

    def end(self, streamed: StreamedModule) -> None:
        if streamed in self.active:
            streamed.swap_out()
            self.active.discard(streamed)

    def next_after(self, streamed: StreamedModule) -> StreamedModule:
        """The next module to run: the following one, or the first (the next forward) after the last."""
        index = self.modules.index(streamed)
        return self.modules[(index + 1) % len(self.modules)]


# --- Llama 4's routed experts on the host --------------------------------------------------------


class StrategySelector:
    """Runs each strategy once (after a warm-up call) the first time a kind of call comes, keeps the
    faster for that kind (decode-sized or prefill-sized calls: the best differs), and reuses it.
    `forced` names one strategy to use always (tests, benchmarks)."""

    def __init__(self, synchronize: Callable[[], None]):
        self.synchronize = synchronize
        self.chosen: dict[str, str] = {}
        self.timings: dict[str, dict[str, float]] = {}
        self.forced: str | None = None

    def run(self, kind: str, strategies: dict[str, Callable[[], torch.Tensor]]) -> torch.Tensor:
        if self.forced is not None:
            return strategies[self.forced]()
        if kind in self.chosen:
            return strategies[self.chosen[kind]]()
        results, timings = {}, {}
        for name, strategy in strategies.items():
            strategy()
            self.synchronize()
            start = time.perf_counter()
            results[name] = strategy()
            self.synchronize()
            timings[name] = time.perf_counter() - start
        self.timings[kind] = timings
        self.chosen[kind] = min(timings, key=timings.get)
        logger.info("routed experts on the host, %s calls: %s (measured %s)", kind, self.chosen[kind],
                    ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in timings.items()))
        return results[self.chosen[kind]]


class RoutedExpertsOffload:
    """Llama 4's routed experts (Llama4TextExperts, QuantizedExperts) stored on the host while
    their layer computes on `device`. Replaces the module's forward (an instance attribute, as
    accelerate's hooks do; `remove` restores it):

    - "cpu": the hidden states of the routed tokens, their expert ids and scores go to the CPU, the
      experts run there with the model's own forward, the result comes back;
    - "copy": the experts the tokens were routed to (their rows of every expert-indexed tensor)
      are gathered into pinned memory and copied to `device`, and the model's forward runs there
      on them alone, the expert ids renumbered.
    """

    STRATEGIES = ("cpu", "copy")

    def __init__(self, experts: nn.Module, device: torch.device, selector: StrategySelector):
        self.experts, self.device, self.selector = experts, device, selector
        self.model_forward = type(experts).forward
        experts.forward = self.forward

    def remove(self) -> None:
        del self.experts.forward

    def forward(self, hidden_states: torch.Tensor, expert_ids: torch.Tensor, expert_scores: torch.Tensor) -> torch.Tensor:
        kind = "decode" if hidden_states.shape[0] <= DECODE_SIZED_TOKENS else "prefill"
        return self.selector.run(kind, {
            "cpu": lambda: self.on_cpu(hidden_states, expert_ids, expert_scores),
            "copy": lambda: self.copied(hidden_states, expert_ids, expert_scores),
        })

    def on_cpu(self, hidden_states, expert_ids, expert_scores) -> torch.Tensor:
        cpu = torch.device("cpu")
        # (tokens, hidden) on the CPU; only routed tokens come here (every token is routed to top_k experts)
        output = self.model_forward(self.experts, hidden_states.to(cpu), expert_ids.to(cpu), expert_scores.to(cpu))
        return output.to(hidden_states.device, non_blocking=hidden_states.device.type == "cuda")

    def copied(self, hidden_states, expert_ids, expert_scores) -> torch.Tensor:
        routed = torch.unique(expert_ids)  # sorted expert ids that have tokens
        renumbered = torch.searchsorted(routed, expert_ids)  # (tokens, top_k) indices into `routed`
        subset = routed_subset(self.experts, routed.cpu(), hidden_states.device)
        return self.model_forward(subset, hidden_states, renumbered, expert_scores)


def routed_subset(experts: nn.Module, routed: torch.Tensor, device: torch.device) -> nn.Module:
    """A shallow twin of `experts` holding only the experts `routed` (rows of every tensor indexed by
    expert), on `device`: the model's forward runs on it unchanged."""
    twin = object.__new__(type(experts))
    twin.__dict__.update({k: v for k, v in experts.__dict__.items() if k != "forward"})
    pinned = device.type == "cuda"
    for slot in ("_parameters", "_buffers"):
        gathered = {}
        for name, tensor in getattr(experts, slot).items():
            if tensor is not None and tensor.dim() and tensor.shape[0] == experts.num_experts:
                rows = torch.empty((len(routed), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=pinned)
                torch.index_select(tensor, 0, routed, out=rows)
                tensor = rows
            gathered[name] = tensor.to(device, non_blocking=pinned) if tensor is not None else None
        twin.__dict__[slot] = gathered
    twin.num_experts = len(routed)
    return twin


# --- dispatch -----------------------------------------------------------------------------------


@dataclasses.dataclass
class OffloadState:
    """What dispatch set up on a model (`model._offload`)."""

    placement: Placement
    hooks: list = dataclasses.field(default_factory=list)
    streamer: WeightStreamer | None = None
    experts: list[RoutedExpertsOffload] = dataclasses.field(default_factory=list)
    selector: StrategySelector | None = None
    compute_devices: dict[str, torch.device] = dataclasses.field(default_factory=dict)  # unit -> where it computes
    streamed_bytes: int = 0  # per forward, host -> GPU
    disk_bytes: int = 0  # per forward, read from disk
    routed_bytes: int = 0  # per token, routed experts crossing to the GPU (or read on the CPU)
    warned: bool = False


def _tensors(module: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    return [(owner._parameters if p else owner._buffers, leaf, tensor)
            for owner in module.modules() for p, slots in ((True, owner._parameters), (False, owner._buffers))
            for leaf, tensor in slots.items() if tensor is not None]


def _place_tensors(module: nn.Module, device: torch.device, skip: set[nn.Module], owners: dict[int, nn.Module],
                   unit: nn.Module) -> None:
    """Tensors of `module` (part of `unit`, outside `skip`) not on `device` moved there: buffers
    built on the CPU, weights of a model built elsewhere, a head tied to embeddings placed
    elsewhere (it gets its own copy on a GPU)."""
    for owner in _modules_outside(module, skip):
        for slots, is_parameter in ((owner._parameters, True), (owner._buffers, False)):
            for leaf, tensor in slots.items():
                if tensor is None or tensor.device == device:
                    continue
                if device.type == "cpu" and owners.get(id(tensor), unit) is not unit:
                    continue  # tied to another unit's tensor on a GPU: read from there
                moved = tensor.to(device)
                slots[leaf] = nn.Parameter(moved, requires_grad=False) if is_parameter else moved


def dispatch(model: nn.Module, placement: Placement) -> OffloadState:
    """After loading a split model: every tensor where its unit keeps it, hooks that move inputs to
    where each unit computes, streaming and routed-expert offload, `model.hf_device_map`."""
    state = OffloadState(placement)
    gpu_present = bool(placement.gpus)
    compute = placement.compute_device
    if gpu_present:
        state.streamer = WeightStreamer(compute)
        state.selector = StrategySelector(lambda: torch.cuda.synchronize(compute))
    else:
        state.selector = StrategySelector(lambda: None)
    mover = TensorMover()
    found = units(model)
    modules = dict(model.named_modules())
    inner = {name: modules[name] for name in placement.inner}
    owners = {}
    for unit in found:
        for tensor in [*unit.module.parameters(), *unit.module.buffers()]:
            owners.setdefault(id(tensor), unit.module)

    def where_computed(device, module: nn.Module) -> torch.device:
        if device in HOST_DEVICES and (isinstance(module, nn.Embedding) or not gpu_present):
            return torch.device("cpu")
        return torch_device(device) if device not in HOST_DEVICES else compute

    for unit in found:
        device = placement.unit_devices[unit.name]
        parts = {module for name, module in inner.items() if name.startswith(unit.name + ".")}
        _place_tensors(unit.module, torch_device(device), parts, owners, unit.module)
        computes_on = where_computed(device, unit.module)
        state.compute_devices[unit.name] = computes_on
        streamed = None
        if device in HOST_DEVICES and computes_on.type == "cuda":
            streamed = StreamedModule(unit.name, unit.module, computes_on, parts, pin=device == "cpu")
            state.streamer.add(streamed)
            state.streamed_bytes += streamed.bytes if device == "cpu" else 0
        if device == "disk":
            state.disk_bytes += sum(t.numel() * t.element_size() for _, _, t in _tensors(unit.module))
        _hook_unit(state, mover, unit.module, computes_on, streamed, parts, returns_to=None)
        for name, part in sorted(((n, m) for n, m in inner.items() if m in parts), key=lambda item: item[0]):
            part_device = placement.inner[name]
            _place_tensors(part, torch_device(part_device), set(), owners, unit.module)
            if part_device in HOST_DEVICES and hasattr(part, "expert_forward"):
                offload = RoutedExpertsOffload(part, computes_on, state.selector)
                state.experts.append(offload)
                if computes_on.type == "cuda":  # (on a machine without GPU they simply compute on the CPU)
                    top_k = getattr(model.config.get_text_config(), "num_experts_per_tok", 1)
                    state.routed_bytes += sum(t.numel() * t.element_size() for _, _, t in _tensors(part)) \
                        * min(1.0, top_k / part.num_experts)
                continue
            part_computes = where_computed(part_device, part)
            part_streamed = None
            if part_device in HOST_DEVICES and part_computes.type == "cuda":
                part_streamed = StreamedModule(name, part, part_computes, set(), pin=part_device == "cpu")
                state.streamer.add(part_streamed)
                state.streamed_bytes += part_streamed.bytes
            _hook_unit(state, mover, part, part_computes, part_streamed, set(), returns_to=computes_on)
    if state.streamer is not None:
        order = {id(module): index for index, module in enumerate(model.modules())}
        state.streamer.modules.sort(key=lambda streamed: order[id(streamed.module)])
        if not state.streamer.modules:
            state.streamer = None

    def model_pre_hook(module, args, kwargs):
        mover.memo.clear()
        module._offload_input_device = _first_device(args, kwargs)

    def model_post_hook(module, args, kwargs, output):
        mover.memo.clear()
        device = getattr(module, "_offload_input_device", None)
        return mover.to(output, device) if device is not None else output

    state.hooks.append(model.register_forward_pre_hook(model_pre_hook, with_kwargs=True))
    state.hooks.append(model.register_forward_hook(model_post_hook, with_kwargs=True))
    model._offload = state
    model.hf_device_map = dict(placement.hf_device_map)
    return state


def dispatch_model(model: nn.Module, device_map: dict[str, Any]) -> nn.Module:
    """Place a model already in memory (built with random weights, or loaded on one device) by an
    explicit device map, as from_pretrained(device_map=...) would (accelerate's dispatch_model)."""
    from .device_map import explicit_placement

    dispatch(model, explicit_placement(model, device_map))
    return model


def _hook_unit(state: OffloadState, mover: TensorMover, module: nn.Module, device: torch.device,
               streamed: StreamedModule | None, skip: set[nn.Module], returns_to: torch.device | None) -> None:
    """Hooks of one placed module: its inputs to `device` (its weights streamed in first), and its
    output back to `returns_to` (a part placed apart from its unit). Every descendant with weights
    moves its own inputs too, for modules its parents call directly (not through this forward)."""
    streamer = state.streamer

    def pre_hook(_, args, kwargs):
        if streamed is not None:
            streamer.begin(streamed)
        return mover.to(args, device), mover.to(kwargs, device)

    def post_hook(_, args, kwargs, output):
        if streamed is not None:
            streamer.end(streamed)
        return mover.to(output, returns_to) if returns_to is not None else output

    def part_pre_hook(_, args, kwargs):
        if streamed is not None:
            streamer.ensure(streamed)
        return mover.to(args, device), mover.to(kwargs, device)

    state.hooks.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    state.hooks.append(module.register_forward_hook(post_hook, with_kwargs=True))
    for owner in _modules_outside(module, skip):
        if owner is not module and (owner._parameters or owner._buffers):
            state.hooks.append(owner.register_forward_pre_hook(part_pre_hook, with_kwargs=True))


def remove_dispatch(model: nn.Module) -> None:
    """Undo dispatch's hooks (the tensors stay where they are)."""
    state = getattr(model, "_offload", None)
    if state is None:
        return
    for hook in state.hooks:
        hook.remove()
    for offload in state.experts:
        offload.remove()
    del model._offload


# --- generate() --------------------------------------------------------------------------------


def expected_tokens_per_second(state: OffloadState) -> float | None:
    """The documented estimate (module docstring), or None when nothing is offloaded."""
    seconds = (state.streamed_bytes + state.routed_bytes) / PCIE_BYTES_PER_S + state.disk_bytes / DISK_BYTES_PER_S
    return 1.0 / seconds if seconds > 0 else None


def before_generate(model: nn.Module, batch_size: int, max_length: int, prompt_length: int) -> None:
    """generate() on a split model: the KV cache of this request must fit each GPU (else an error
    that says what fits), and a one-time warning of the offloaded speed."""
    state = getattr(model, "_offload", None)
    if state is None:
        return
    _check_kv_fits(model, state, batch_size, max_length, prompt_length)
    if state.warned:
        return
    state.warned = True
    rate = expected_tokens_per_second(state)
    if rate is None:
        return
    parts = []
    if state.streamed_bytes:
        parts.append(f"{state.streamed_bytes / 1e9:.2f} GB of weights copied from CPU memory to the GPU")
    if state.routed_bytes:
        parts.append(f"{state.routed_bytes / 1e9:.2f} GB of routed experts on the host")
    if state.disk_bytes:
        parts.append(f"{state.disk_bytes / 1e9:.2f} GB read from disk")
    logger.warning("this model runs offloaded (device_map %s): each token needs %s; expect about %.1f tokens/s at "
                   "best (%.0f GB/s host to GPU, %.0f GB/s disk). Fit it on the GPUs (quantization, more GPUs) for "
                   "full speed.", _devices_text(state.placement), " and ".join(parts), rate, PCIE_BYTES_PER_S / 1e9,
                   DISK_BYTES_PER_S / 1e9)


def _devices_text(placement: Placement) -> str:
    counts: dict[str, int] = {}
    for device in placement.unit_devices.values():
        label = f"cuda:{device}" if isinstance(device, int) else device
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{count} on {label}" for label, count in counts.items())


def _check_kv_fits(model: nn.Module, state: OffloadState, batch_size: int, max_length: int, prompt_length: int) -> None:
    """Each GPU's KV cache for the request (its layers': those it holds and those it computes from
    the host) within its free memory; else torch.OutOfMemoryError naming the longest that fits."""
    if not state.placement.gpus:
        return
    from ..memory_plan import layer_kv_bytes

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16)
    per_layer = layer_kv_bytes(model.config, dtype, max_length, batch_size)
    one_position = layer_kv_bytes(model.config, dtype, 1, batch_size)
    needed: dict[torch.device, list[int]] = {}
    for unit in units(model):
        if unit.layer_index is not None:
            device = state.compute_devices[unit.name]
            needed.setdefault(device, []).append(unit.layer_index)
    for device, layers in needed.items():
        if device.type != "cuda":
            continue
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        need = sum(per_layer[i] for i in layers)
        if need <= free:
            continue
        per_position = max(1, sum(one_position[i] for i in layers))
        longest = int(free // per_position)
        hint = (f"max_new_tokens={longest - prompt_length}" if longest > prompt_length
                else "a shorter prompt or a smaller batch")
        raise torch.OutOfMemoryError(
            f"generate() needs {need / 1e9:.2f} GB on {device} for the KV cache of {len(layers)} layers "
            f"({batch_size} x {max_length} positions) and {device} has {free / 1e9:.2f} GB free: try {hint}, "
            "or a device_map with fewer layers on it (`herd plan` shows the whole plan)")
