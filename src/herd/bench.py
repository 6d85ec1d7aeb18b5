"""`herd bench`: decode and prefill speed of a real architecture, against the bandwidth floor and,
optionally, against a reference library on the same weights in the same process.

    herd bench llama3.1-8b --batch-sizes 1,16,64
    python bench/compare.py llama3.1-8b --batch-sizes 1,16,64 --compare transformers
    herd bench llama4-scout-slice --layers 48 --quantization int4 --context 262144 --prefill-chunk-size 16384

`--context N[,M]` measures one long prompt per length instead: time to first token, decode
ms/step at that context (from the new tokens' arrival times, the first CAPTURE_STEPS left out: they
capture the step for the new cache length; one generate()), and peak memory
against the memory plan's formula (`memory_plan.plan_memory`).

A named architecture is built at its real widths with random bf16 weights (no download; slices
keep the first few layers of models too large for one GPU); a path loads that checkpoint.
`llama3.2-11b-vision` (Mllama) decodes with one image of all its tiles in every prompt (an
`<|image|>` token first, every text token seeing the image).

Measured as in the issue that set the targets, the same way for every library and mode:
- decode ms/step = (t(N new tokens) - t(2 new tokens)) / (N - 2), greedy, every row forced to
  run N tokens, so the prompt's prefill (and the image's encoding) cancels out;
- prefill = one forward over the prompt (logits of the last token only); time to first token =
  generate() of one token;
- first call = the first generate() of a shape, compile and graph capture included;
- floor = (weight bytes one decode step reads + KV bytes it reads) / copy bandwidth measured
  here (bytes read + written by a device-to-device copy). For Mllama the weights are the text
  model's and the head's (not the vision tower, not the image's key/value projections, whose
  output is cached) and the KV bytes include the cross-attention keys/values of the image.

A reference library may run in several modes (transformers: eager with its dynamic cache, and
static cache + torch.compile); each is its own row, and the summary compares herd with the
fastest reference row of each batch size. A mode that fails (an exception) is reported as a
failed row; the others still run.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

# name -> (family, config fields). Slices keep `num_hidden_layers` of the real model's layers.
# Mllama's fields are those of MllamaConfig (text_config, vision_config), as in the published config.json.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                                  rope_parameters=dict(LLAMA3_ROPE, factor=32.0), max_position_embeddings=131072)),
    "llama3.2-3b": ("llama", dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                  num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                                  rope_parameters=dict(LLAMA3_ROPE, factor=32.0), max_position_embeddings=131072)),
    "llama3.1-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                                  rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072)),
    "llama3.1-70b-slice": ("llama", dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=8,
                                         num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False,
                                         rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072)),
    "llama4-scout-slice": ("llama4", dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192,
                                          intermediate_size_mlp=16384, num_hidden_layers=8, num_attention_heads=40,
                                          num_key_value_heads=8, head_dim=128, num_local_experts=16, num_experts_per_tok=1,
                                          interleave_moe_layer_step=1, attention_chunk_size=8192,
                                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                          max_position_embeddings=262144)),
    "llama4-maverick-slice": ("llama4", dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192,
                                             intermediate_size_mlp=16384, num_hidden_layers=4, num_attention_heads=40,
                                             num_key_value_heads=8, head_dim=128, num_local_experts=128,
                                             num_experts_per_tok=1, interleave_moe_layer_step=2,
                                             attention_chunk_size=8192,
                                             rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                             max_position_embeddings=262144)),
    # Llama-3.2-11B-Vision: a Llama 3.1 8B text model with 8 gated cross-attention layers inserted
    # (40 in all) and a ViT-H/14 tile encoder at 560x560 (1601 tokens per tile, 4 tiles at most).
    "llama3.2-11b-vision": ("mllama", dict(
        text_config=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                         cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE,
                         max_position_embeddings=131072),
        vision_config=dict(image_size=560, patch_size=14, max_num_tiles=4, hidden_size=1280, intermediate_size=5120,
                           num_hidden_layers=32, num_global_layers=8, attention_heads=16, vision_output_dim=7680,
                           intermediate_layers_indices=[3, 7, 15, 23, 30]),
        image_token_index=128256)),
}


def architecture_config(name: str, num_layers: int | None = None):
    """The herd config of a named architecture; num_layers keeps the first layers of its text model
    (for Mllama, the cross-attention layers among them)."""
    family, fields = ARCHITECTURES[name]
    fields = dict(fields)
    if family == "mllama":
        from .models.mllama import MllamaConfig

        text = dict(fields["text_config"])
        if num_layers is not None:
            text["num_hidden_layers"] = num_layers
            text["cross_attention_layers"] = [i for i in text["cross_attention_layers"] if i < num_layers]
        return MllamaConfig(**dict(fields, text_config=text))
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    if family == "llama":
        from .models.llama import LlamaConfig

        return LlamaConfig(**fields)
    from .models.llama4 import Llama4TextConfig

    return Llama4TextConfig(**fields)


def model_class(config):
    """The generating herd class of a config built by architecture_config."""
    kind = type(config).__name__
    if kind == "LlamaConfig":
        from .models.llama import LlamaForCausalLM

        return LlamaForCausalLM
    if kind == "Llama4TextConfig":
        from .models.llama4 import Llama4ForCausalLM

        return Llama4ForCausalLM
    if kind == "MllamaConfig":
        from .models.mllama import MllamaForConditionalGeneration

        return MllamaForConditionalGeneration
    raise ValueError(f"herd bench builds no model for {kind}")


QUANTIZATIONS = {"fp8": "FbgemmFp8Config()", "int8": "TorchAoConfig('int8_weight_only')",
                 "int4": "TorchAoConfig('int4_weight_only', group_size=128)"}


def build_model(name: str, dtype: torch.dtype, device: torch.device, num_layers: int | None = None,
                quantization: str | None = None):
    """A herd model of a named architecture with random weights (normal, std 0.02; norms 1)."""
    return random_model(architecture_config(name, num_layers), dtype, device, quantization)


def random_model(config, dtype: torch.dtype, device: torch.device, quantization: str | None = None,
                 before_allocating: Callable[[Any], Any] | None = None):
    """The herd model of `config` with random weights (normal, std 0.02; norms 1), built once in
    `dtype`; with `quantization` the linears (and Llama 4's experts) are built quantized, one
    random float tensor at a time on `device`, so that a model too big for the device in bf16
    (Scout) needs no more than its quantized size. `before_allocating(model)` runs on the
    meta-device model first (bench/tp.py: each rank's tensor-parallel shapes)."""
    with torch.device("meta"):
        model = model_class(config)(config)
    model = model.to(dtype)
    quantized = []
    if quantization is not None:
        from .quantization import apply_quantization, config_from_name, quantized_modules

        apply_quantization(model, config_from_name(quantization), dtype)
        quantized = quantized_modules(model)
    if before_allocating is not None:
        before_allocating(model)
    model = model.to_empty(device=device)  # allocated once, in the final dtypes
    model.tie_weights()  # to_empty gives tied weights separate storage
    if device.type == "meta":  # shapes only (sizes, byte counts)
        return model.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for module in quantized:
            _fill_quantized(module, dtype, generator)
        for module in model.modules():  # buffers derived from the config (rotary frequencies)
            if hasattr(module, "inv_freq"):
                module.__init__(module.rope_parameters, module.head_dim, module.max_position_embeddings)
                module.to(device)
    return model.eval()


def _fill_quantized(module, dtype: torch.dtype, generator: torch.Generator) -> None:
    from .quantization import QuantizedLinear, quantize_experts
    from .quantization.formats import quantize_weight

    if isinstance(module, QuantizedLinear):
        weight = torch.empty(module.out_features, module.in_features, device=module.weight.device, dtype=dtype)
        stored = quantize_weight(weight.normal_(0.0, 0.02, generator=generator), module.scheme, dtype)
    else:
        stored = {}
        hidden, inter = module.hidden_size, module.intermediate_size
        for name, (rows, columns) in (("gate_up_proj", (hidden, 2 * inter)), ("down_proj", (inter, hidden))):
            # the float weight's shape, not the stored one (int4 packs two rows a byte)
            weight = torch.empty(module.num_experts, rows, columns, device=module.gate_up_proj.device, dtype=dtype)
            weight.normal_(0.0, 0.02, generator=generator)
            stored.update({name + suffix: value for suffix, value in quantize_experts(weight, module.scheme, dtype).items()})
            del weight
    for name, value in stored.items():
        getattr(module, name).copy_(value)


@dataclass
class Reference:
    """A reference library that `--compare NAME` can run, registered by the benchmark scripts
    outside the package (bench/compare.py registers transformers): herd itself never imports them."""

    build: Callable[[Any, torch.dtype], Any]  # (herd model, dtype) -> a model sharing herd's weights
    version: Callable[[], str]
    # row label -> (reference model, final length: prompt + new tokens) -> generate() keyword
    # arguments of that mode; raising refuses the mode (a failed row), as a failure in it does
    modes: dict[str, Callable[[Any, int], dict[str, Any]]]
    # (row label, reference model after its runs) -> a line for the report, or None
    note: Callable[[str, Any], str | None] = field(default=lambda label, model: None)


REFERENCES: dict[str, Reference] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB (on the CPU: a
    memory-to-memory copy of 256 MiB, far beyond the caches)."""
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 28
    source = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    if device.type == "cuda":
        source.normal_()
    else:
        source.fill_(1.0)  # the values do not change a copy's speed; normal_ is slow on the CPU
    target = torch.empty_like(source)
    target.copy_(source)
    _sync(device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        target.copy_(source)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / sorted(times)[len(times) // 2]


def image_tokens_per_row(config) -> int:
    """Image tokens each prompt row of the bench carries: one image of all tiles for Mllama, else 0."""
    vision = getattr(config, "vision_config", None)
    if vision is None or not hasattr(vision, "max_num_tiles"):
        return 0
    return vision.max_num_tiles * ((vision.image_size // vision.patch_size) ** 2 + 1)


# Weights a decode step does not read: the vision tower and its projector run once, at prefill,
# and the cross-attention layers' key/value projections (and key norm) of the image are cached.
_NOT_READ_WHILE_DECODING = ("vision_model.", "multi_modal_projector.", "cross_attn.k_proj.", "cross_attn.v_proj.",
                            "cross_attn.k_norm.")


def decode_bytes(model, batch: int, context: int, image_tokens: int | None = None) -> tuple[float, float]:
    """(weight bytes, KV bytes) one decode step must read at this batch and context length.

    image_tokens: per row, the cross-attention keys/values each cross-attention layer reads
    (default: one image of all tiles for Mllama, as the bench's prompts carry).
    """
    config = model.config
    text = config.get_text_config()
    total = 0
    from .quantization import weight_tensors

    for name, param in weight_tensors(model):
        if any(part in name for part in _NOT_READ_WHILE_DECODING):
            continue
        if name.endswith("embed_tokens.weight"):
            if getattr(text, "tie_word_embeddings", False):
                total += param.numel() * param.element_size()  # read as the output head
            continue  # otherwise only `batch` rows are read
        if ".experts." in name:
            experts = param.shape[0]
            routed = min(experts, batch * text.num_experts_per_tok)
            total += param.numel() * param.element_size() * routed // experts
            continue
        total += param.numel() * param.element_size()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    window = getattr(text, "attention_chunk_size", None)
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    cross_layers = set(getattr(text, "cross_attention_layers", None) or [])
    if image_tokens is None:
        image_tokens = image_tokens_per_row(config)
    one_token = 2 * batch * text.num_key_value_heads * head_dim * model.dtype.itemsize  # keys + values
    kv = 0
    for index, kind in enumerate(layer_types):
        if index in cross_layers:
            seen = image_tokens
        else:
            seen = min(context, window) if kind == "chunked_attention" and window else context
        kv += one_token * seen
    return float(total), float(kv)


def prompt_inputs(model, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """generate()'s inputs for `batch` random prompts of `length` tokens: input_ids, attention_mask
    and, for Mllama, one image of all tiles per row (`<|image|>` first; every token sees the image)."""
    config = model.config
    vocab = config.get_text_config().vocab_size
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    inputs: dict[str, torch.Tensor] = {}
    if image_tokens_per_row(config):
        vision = config.vision_config
        tiles, size = vision.max_num_tiles, vision.image_size
        ids[:, 0] = config.image_token_index
        # the squarest arrangement that uses every tile (2x2 for 4); ids count from 1 (0 is padding)
        arrangements = [tuple(r) for r in vision.supported_aspect_ratios if r[0] * r[1] == tiles]
        arrangement = min(arrangements, key=lambda r: abs(r[0] - r[1]))
        ratio_id = [tuple(r) for r in vision.supported_aspect_ratios].index(arrangement) + 1
        inputs["pixel_values"] = torch.randn(batch, 1, tiles, vision.num_channels, size, size,
                                             generator=generator).to(model.dtype)
        inputs["aspect_ratio_ids"] = torch.full((batch, 1), ratio_id, dtype=torch.long)
        inputs["aspect_ratio_mask"] = torch.ones(batch, 1, tiles, dtype=torch.long)
        inputs["cross_attention_mask"] = torch.ones(batch, length, 1, tiles, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **inputs}
    return {name: tensor.to(model.device) for name, tensor in inputs.items()}


def _timed(fn, device: torch.device, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@dataclass
class Row:
    library: str
    batch: int
    decode_ms: float | None  # None: the row failed (error says why)
    tokens_per_s: float | None
    floor_ms: float
    first_call_s: float | None = None
    peak_gib: float | None = None
    error: str | None = None


@dataclass
class PrefillRow:
    library: str
    length: int
    prefill_ms: float | None
    tokens_per_s: float | None
    ttft_ms: float | None
    error: str | None = None


def measure_decode(generate, inputs: dict[str, torch.Tensor], new_tokens: int, device) -> tuple[float, float]:
    """(decode s/step, first-call s) for generate(inputs, max_new_tokens)."""
    _sync(device)
    start = time.perf_counter()
    generate(inputs, 2)
    _sync(device)
    first_call = time.perf_counter() - start
    generate(inputs, new_tokens)  # warm (a longer run may use another cache bucket)
    short = _timed(lambda: generate(inputs, 2), device)
    long = _timed(lambda: generate(inputs, new_tokens), device)
    return (long - short) / (new_tokens - 2), first_call


def measure_prefill(model, inputs: dict[str, torch.Tensor], generate_kwargs: dict[str, Any],
                    device) -> tuple[float, float]:
    """(prefill s, time-to-first-token s) for one prompt (inputs of batch 1)."""
    forward_inputs = {name: value for name, value in inputs.items() if name != "attention_mask"}
    with torch.no_grad():
        model(**forward_inputs, logits_to_keep=1)
        prefill = _timed(lambda: model(**forward_inputs, logits_to_keep=1), device)

        def first_token():
            return model.generate(**inputs, max_new_tokens=1, do_sample=False, **generate_kwargs)

        first_token()
        ttft = _timed(first_token, device)
    return prefill, ttft


def _why(error: BaseException) -> str:
    """One line for a failed row: the exception's type and the first line of its message."""
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0][:200] if text else ''}".rstrip(": ")
    return line.replace("|", "/")  # it goes into a markdown table


def libraries_to_run(model, args) -> list[tuple[str, Any, Callable[[Any, int], dict[str, Any]]]]:
    """(row label, model, (model, max_length) -> generate() kwargs) for herd and each mode of the reference."""
    herd_kwargs = {"disable_compile": True} if args.plain else {}
    libraries = [("herd", model, lambda lib_model, max_length: dict(herd_kwargs))]
    if args.compare:
        reference = REFERENCES[args.compare]
        reference_model = reference.build(model, model.dtype)
        libraries += [(label, reference_model, mode) for label, mode in reference.modes.items()]
    return libraries


def bench_model(args: argparse.Namespace, model, bandwidth: float) -> str:
    """Every decode and prefill row of `args` for herd's `model` (and the reference's modes), as the report."""
    device = model.device
    if args.new_tokens is None:
        args.new_tokens = 128 if device.type == "cuda" else 32
    libraries = libraries_to_run(model, args)
    max_length = args.prompt_length + args.new_tokens

    def generate_with(lib_model, mode_kwargs):
        def generate(inputs, n):
            kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            with torch.no_grad():
                return lib_model.generate(**inputs, **kwargs, **mode_kwargs)
        return generate

    rows: list[Row] = []
    for batch in args.batch_sizes:
        context = args.prompt_length + args.new_tokens // 2
        weight_bytes, kv_bytes = decode_bytes(model, batch, context)
        floor = (weight_bytes + kv_bytes) / bandwidth
        inputs = prompt_inputs(model, batch, args.prompt_length, seed=batch)
        for library, lib_model, mode in libraries:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                generate = generate_with(lib_model, mode(lib_model, max_length))
                step, first_call = measure_decode(generate, inputs, args.new_tokens, device)
            except Exception as error:  # noqa: BLE001 - one failing library or mode must not end the bench
                rows.append(Row(library, batch, None, None, floor * 1e3, error=_why(error)))
                print(f"  {library} batch {batch}: failed: {_why(error)}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            rows.append(Row(library, batch, step * 1e3, batch / step, floor * 1e3, first_call, peak))
            print(f"  {library} batch {batch}: {step * 1e3:.2f} ms/step", flush=True)
    prefill_rows: list[PrefillRow] = []
    for length in args.prefill_lengths:
        inputs = prompt_inputs(model, 1, length, seed=length)
        for library, lib_model, mode in libraries:
            try:
                prefill, ttft = measure_prefill(lib_model, inputs, mode(lib_model, length + 1), device)
            except Exception as error:  # noqa: BLE001
                prefill_rows.append(PrefillRow(library, length, None, None, None, error=_why(error)))
                print(f"  {library} prefill {length}: failed: {_why(error)}", flush=True)
                continue
            prefill_rows.append(PrefillRow(library, length, prefill * 1e3, length / prefill, ttft * 1e3))
            print(f"  {library} prefill {length}: {prefill * 1e3:.1f} ms", flush=True)
    notes = []
    if args.compare:
        reference = REFERENCES[args.compare]
        ran = {row.library for row in rows if row.decode_ms is not None}
        for library, lib_model, _ in libraries[1:]:
            line = reference.note(library, lib_model) if library in ran else None
            if line:
                notes.append(line)
    return report(args, model, bandwidth, rows, prefill_rows, notes)


class TokenClock:
    """A streamer that notes when each new token reaches the host (the first put is the prompt)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class ContextRow:
    context: int
    prefill_chunk: int | None
    ttft_s: float | None  # None: the row failed (error says why)
    decode_ms: float | None
    floor_ms: float
    peak_gib: float | None
    plan_gib: float  # the memory plan's total (weights + KV cache + activations estimate)
    error: str | None = None


def context_memory_plan(args: argparse.Namespace, model, context: int):
    """The memory plan of one --context run: the model's config, the prompt and new tokens, the
    KV cache dtype and the prefill chunk of that run."""
    from .memory_plan import plan_memory

    return plan_memory(model.config, dtype=model.dtype, quantization=args.quantization, prompt_tokens=context,
                       max_new_tokens=args.new_tokens, kv_cache_dtype=args.kv_cache_dtype,
                       prefill_chunk_size=args.prefill_chunk_size)


CAPTURE_STEPS = 3  # new tokens left out of a --context run's decode time


def measure_context(args: argparse.Namespace, model, context: int, bandwidth: float) -> ContextRow:
    """One prompt of `context` tokens (batch 1) and `args.new_tokens` greedy tokens after it, in
    one generate(): time to first token (the prefill, in chunks of --prefill-chunk-size), decode
    ms per step at that context (from the arrival times of the new tokens after the first
    CAPTURE_STEPS), peak memory."""
    from .decoding.decoders import PREFILL_CHUNK

    device = model.device
    weight_bytes, kv_bytes = decode_bytes(model, 1, context + args.new_tokens // 2)
    floor_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3
    plan_gib = context_memory_plan(args, model, context).total / 2**30
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, prefill_chunk_size=args.prefill_chunk_size)
    if args.kv_cache_dtype:
        kwargs["cache_config"] = {"dtype": args.kv_cache_dtype}
    if args.plain:
        kwargs["disable_compile"] = True
    # compile and capture on a short prompt first, so that the long run times the work itself
    warm_length = min(context, 2 * (args.prefill_chunk_size or PREFILL_CHUNK))
    with torch.no_grad():
        model.generate(**prompt_inputs(model, 1, warm_length, seed=1), max_new_tokens=4, min_new_tokens=4, **kwargs)
    inputs = prompt_inputs(model, 1, context, seed=context)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        clock = TokenClock()
        _sync(device)
        clock.start = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, streamer=clock,
                           **kwargs)
        _sync(device)
    except Exception as error:  # noqa: BLE001 - a context that does not fit is a failed row, not an error
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return ContextRow(context, args.prefill_chunk_size, None, None, floor_ms, None, plan_gib, error=_why(error))
    # steady decode: from the arrival of the CAPTURE_STEPS-th new token on (the first decode steps at
    # a new cache length capture the step's graph for it, once per process)
    times = clock.times[min(CAPTURE_STEPS, len(clock.times) - 2) :]
    decode_ms = (times[-1] - times[0]) / (len(times) - 1) * 1e3
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return ContextRow(context, args.prefill_chunk_size, clock.times[0] - clock.start, decode_ms, floor_ms, peak,
                      plan_gib)


def context_report(args: argparse.Namespace, model, bandwidth: float, rows: list[ContextRow]) -> str:
    import herd

    device = model.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or device.type)
    text = model.config.get_text_config()
    kv = f", {args.kv_cache_dtype} KV cache" if args.kv_cache_dtype else ""
    lines = [
        f"### `{args.model}` at long context, {args.dtype}"
        f"{f' with {args.quantization} weights' if args.quantization else ''}{kv}, batch 1, "
        f"{args.new_tokens} new tokens, prefill chunk {args.prefill_chunk_size or 'default'}",
        "",
        f"- device: {device_name} ({bandwidth / 1e9:.0f} GB/s copy bandwidth measured), torch {torch.__version__}, "
        f"herd {herd.__version__}; layers {text.num_hidden_layers}",
        "- plan: memory_plan's weights + KV cache + activations estimate for this prompt, these new tokens, "
        "this KV cache dtype and prefill chunk",
        "",
        "| context | time to first token s | prefill tokens/s | decode ms/step | decode tokens/s | floor ms | "
        "share of floor | peak GiB | plan GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.ttft_s is None:
            lines.append(f"| {row.context} | failed: {row.error} | - | - | - | {row.floor_ms:.2f} | - | - | "
                         f"{row.plan_gib:.1f} |")
            continue
        lines.append(
            f"| {row.context} | {row.ttft_s:.3f} | {row.context / row.ttft_s:.0f} | {row.decode_ms:.2f} | "
            f"{1e3 / row.decode_ms:.1f} | {row.floor_ms:.2f} | {row.floor_ms / row.decode_ms:.0%} | "
            f"{_number(row.peak_gib, '.1f')} | {row.plan_gib:.1f} |"
        )
    return "\n".join(lines)


def bench_context(args: argparse.Namespace, model, bandwidth: float) -> str:
    """`herd bench MODEL --context N[,M]`: one long prompt per context length."""
    if args.new_tokens is None:
        args.new_tokens = 128 if model.device.type == "cuda" else 8
    rows = []
    for context in args.context:
        row = measure_context(args, model, context, bandwidth)
        rows.append(row)
        print(f"  context {context}: " + (f"failed: {row.error}" if row.ttft_s is None else
                                          f"first token {row.ttft_s:.2f} s, {row.decode_ms:.2f} ms/step"), flush=True)
    return context_report(args, model, bandwidth, rows)


def run_bench(args: argparse.Namespace) -> str:
    import herd
    from .quantization import config_from_name

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype in (None, "auto"):
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype)
    context = getattr(args, "context", None)
    if args.model in ARCHITECTURES:
        config = architecture_config(args.model, args.layers)
        if context:
            # random weights: let the longest prompt fit the positions (Scout's own config says 10M)
            text = config.get_text_config()
            text.max_position_embeddings = max(text.max_position_embeddings, max(context) + (args.new_tokens or 128))
        model = random_model(config, dtype, device, args.quantization)
    else:
        model = herd.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=str(device),
                                                          quantization_config=config_from_name(args.quantization)).eval()
    if context:
        return bench_context(args, model, copy_bandwidth(device))
    return bench_model(args, model, copy_bandwidth(device))


def _fastest(rows, library_of, ms_of):
    """The reference row with the lowest time among those that ran, or None."""
    ran = [row for row in rows if library_of(row) != "herd" and ms_of(row) is not None]
    return min(ran, key=ms_of, default=None)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(args, model, bandwidth, rows: list[Row], prefill_rows: list[PrefillRow], notes: list[str] = ()) -> str:
    import herd

    reference_version = f"{args.compare} {REFERENCES[args.compare].version()}, " if args.compare else ""
    device = model.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or device.type)
    from .quantization import weight_tensors

    weight_gb = sum(p.numel() * p.element_size() for _, p in weight_tensors(model)) / 1e9
    read_gb = decode_bytes(model, 1, 0)[0] / 1e9
    text = model.config.get_text_config()
    from .decoding.plans import plan_for

    if args.plain:
        path = "plain path"
    elif plan_for(model) is None:
        path = f"plain path: {type(model).__name__} has no decode plan"
    elif model.device.type != "cuda":
        path = f"plain path: the model is on {model.device.type}"
    else:
        path = "fast path"
    lines = [
        f"### `{args.model}` (herd's {path}), {args.dtype}"
        f"{f' with {args.quantization} weights' if getattr(args, 'quantization', None) else ''}, prompt {args.prompt_length}, "
        f"{args.new_tokens} new tokens",
        "",
        f"- device: {device_name} ({bandwidth / 1e9:.0f} GB/s copy bandwidth measured), "
        f"torch {torch.__version__}, herd {herd.__version__}, {reference_version}python {platform.python_version()}",
        f"- weights {weight_gb:.2f} GB ({read_gb:.2f} GB read per decode step); layers {text.num_hidden_layers}",
    ]
    image_tokens = image_tokens_per_row(model.config)
    if image_tokens:
        lines.append(f"- one image per prompt row: {image_tokens} image tokens, read by each of the "
                     f"{len(text.cross_attention_layers)} cross-attention layers at every step")
    lines += [
        "",
        "| library | batch | decode ms/step | tokens/s | floor ms | share of floor | first call s | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.decode_ms is None:
            lines.append(f"| {row.library} | {row.batch} | failed: {row.error} | - | {row.floor_ms:.2f} | - | - | - |")
            continue
        share = row.floor_ms / row.decode_ms
        lines.append(
            f"| {row.library} | {row.batch} | {row.decode_ms:.2f} | {row.tokens_per_s:.0f} | {row.floor_ms:.2f} | "
            f"{share:.0%} | {_number(row.first_call_s, '.1f')} | {_number(row.peak_gib, '.1f')} |"
        )
    summary = []
    for batch in dict.fromkeys(row.batch for row in rows):
        of_batch = [row for row in rows if row.batch == batch]
        herd_row = next((row for row in of_batch if row.library == "herd" and row.decode_ms is not None), None)
        fastest = _fastest(of_batch, lambda row: row.library, lambda row: row.decode_ms)
        if herd_row is not None and fastest is not None:
            summary.append(f"batch {batch}: {fastest.decode_ms / herd_row.decode_ms:.2f}x ({fastest.library})")
        elif herd_row is not None and any(row.library != "herd" for row in of_batch):
            summary.append(f"batch {batch}: no reference row ran")
    if summary:
        lines += ["", "herd speed-up over the fastest reference row (its ms / herd's ms): " + ", ".join(summary)]
    if prefill_rows:
        lines += ["", "| library | prompt | prefill ms | prefill tokens/s | time to first token ms |", "|---|---|---|---|---|"]
        for row in prefill_rows:
            if row.prefill_ms is None:
                lines.append(f"| {row.library} | {row.length} | failed: {row.error} | - | - |")
            else:
                lines.append(f"| {row.library} | {row.length} | {row.prefill_ms:.1f} | {row.tokens_per_s:.0f} | "
                             f"{row.ttft_ms:.1f} |")
        summary = []
        for length in dict.fromkeys(row.length for row in prefill_rows):
            of_length = [row for row in prefill_rows if row.length == length]
            herd_row = next((row for row in of_length if row.library == "herd" and row.prefill_ms is not None), None)
            fastest = _fastest(of_length, lambda row: row.library, lambda row: row.prefill_ms)
            if herd_row is not None and fastest is not None:
                summary.append(f"prompt {length}: {fastest.prefill_ms / herd_row.prefill_ms:.2f}x ({fastest.library})")
        if summary:
            lines += ["", "herd prefill speed-up over the fastest reference row: " + ", ".join(summary)]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16", "half": "float16", "auto": "auto"}


def dtype_name(text: str) -> str:
    """The torch name of a dtype argument: float32, bfloat16, float16 (or fp32, bf16, fp16), or auto."""
    name = DTYPE_NAMES.get(text.strip().lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16)")
    return name


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers: write them comma-separated, "
                                         "e.g. 1,16,64") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"a checkpoint path or Hub id, or one of: {', '.join(ARCHITECTURES)}")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1], help="comma-separated (default 1)")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 128 on a GPU, 32 on the CPU")
    parser.add_argument("--prefill-lengths", type=_int_list, default=[], help="comma-separated prompt lengths to time prefill on")
    parser.add_argument("--layers", "--num-layers", dest="layers", type=int, default=None,
                        help="override the number of layers of a named architecture")
    parser.add_argument("--dtype", default=None, type=dtype_name,
                        help="bfloat16/bf16, float16/fp16 or float32/fp32 (default: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda where there is one, else cpu)")
    parser.add_argument("--compare", default=None,
                        help="also run a reference library on the same weights (python bench/compare.py ... --compare transformers)")
    parser.add_argument("--quantization", default=None, choices=list(QUANTIZATIONS),
                        help="weights quantized while building (random) or loading: " + ", ".join(
                            f"{k} = {v}" for k, v in QUANTIZATIONS.items()))
    parser.add_argument("--plain", action="store_true", help="herd's plain path (disable_compile=True) instead of the fast path")
    parser.add_argument("--context", type=_int_list, default=None,
                        help="comma-separated prompt lengths: time to first token, decode speed at that context and "
                             "peak memory against the memory plan, one prompt (batch 1) each")
    parser.add_argument("--prefill-chunk-size", type=int, default=None,
                        help="with --context: prefill the prompt this many tokens at a time (default: "
                             "generate()'s, decoding.decoders.PREFILL_CHUNK)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=["fp8"],
                        help="with --context: FP8 keys/values for the full-attention layers (plain decoder)")


def main(args: argparse.Namespace) -> int:
    if args.compare and args.compare not in REFERENCES:
        print(f"herd bench: no reference {args.compare!r} is registered; herd never imports other libraries: run "
              f"`python bench/compare.py {args.model} --compare {args.compare} ...` from the repository instead", flush=True)
        return 2
    if args.new_tokens is not None and args.new_tokens < 4:
        raise ValueError("--new-tokens must be at least 4 (decode speed is the difference of 2 and N new tokens)")
    if getattr(args, "context", None) is not None and (not args.context or min(args.context) < 1):
        raise ValueError("--context takes positive prompt lengths, e.g. --context 32768,122880")
    if getattr(args, "prefill_chunk_size", None) is not None and args.prefill_chunk_size < 1:
        raise ValueError("--prefill-chunk-size must be a positive number of tokens")
    print(run_bench(args), flush=True)
    return 0

