"""`herd bench` with a reference library run on the same weights, in the same process.

herd never imports transformers (it is the oracle of tests and benchmarks only), so the
reference is plugged in here, outside the package:

    python bench/compare.py llama3.1-8b --batch-sizes 1,16,64 --prefill-lengths 2048 --compare transformers

Every argument is `herd bench`'s. `--compare transformers` measures transformers in two modes,
each its own row, both on herd's weight tensors (one model, no copy), with the protocol herd gets:

- `transformers`: generate() as it comes, eager forward and its dynamic cache;
- `transformers-compiled`: its fastest documented decoding mode, generate(...,
  cache_implementation="static", compile_config=CompileConfig()): a static cache, and generate()
  compiles the forward of the decode steps with torch.compile (inductor, mode "reduce-overhead":
  CUDA graphs; the prefill stays eager). `max_cache_len` = prompt + new tokens, so every call of
  a batch size reuses one cache shape and its first call's compile (its "first call s").
  transformers 5.17 skips the compile for Llama 4 (`get_compiled_call`): that row is then the
  static cache with the eager forward, and the report says so. A mode that raises is a failed
  row (one line says why); the bench goes on. On Mllama this mode is refused before it runs:
  transformers 5.17 writes the image's cross-attention keys/values into the StaticCache past its
  end, which on CUDA is a device-side assert that would end the process (on the CPU it is an
  IndexError: tests/test_bench.py checks that).

The summary line compares herd with the fastest reference row of each batch size.
"""

from __future__ import annotations

import sys

import torch

from herd import bench, cli


def transformers_reference(model, dtype: torch.dtype):
    """The transformers class of the same architecture, sharing herd's weight tensors (no copy)."""
    import transformers

    config = model.config
    kind = type(model).__name__
    if kind == "LlamaForCausalLM":
        reference_config, cls = transformers.LlamaConfig(**config.to_dict()), transformers.LlamaForCausalLM
    elif kind == "Llama4ForCausalLM":
        reference_config, cls = transformers.Llama4TextConfig(**config.to_dict()), transformers.Llama4ForCausalLM
    elif kind == "MllamaForConditionalGeneration":
        # herd's module tree (model.language_model / model.vision_model / model.multi_modal_projector
        # / lm_head) is transformers 5's, so the state dict keys are the same.
        reference_config = transformers.MllamaConfig(**config.to_dict())
        cls = transformers.MllamaForConditionalGeneration
    else:
        raise ValueError(f"no transformers reference for {kind}")
    reference_config._attn_implementation = "sdpa"  # a composite config passes it on to its sub-configs
    with torch.device("meta"):
        reference = cls(reference_config)
    loaded = reference.load_state_dict(dict(model.state_dict()), strict=False, assign=True)
    if loaded.missing_keys:
        raise RuntimeError(f"reference lacks weights for {loaded.missing_keys[:5]}")
    if loaded.unexpected_keys:
        raise RuntimeError(f"reference has no place for {loaded.unexpected_keys[:5]}")
    for module in reference.modules():  # non-persistent buffers (rotary frequencies) stayed on meta
        if type(module).__name__.endswith("RotaryEmbedding"):
            type(module).__init__(module, module.config)
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        reference.lm_head.weight = reference.get_input_embeddings().weight
    return reference.to(device=model.device, dtype=dtype).eval()


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def eager(reference, max_length: int) -> dict:
    return {}


def static_compiled(reference, max_length: int) -> dict:
    """transformers' documented fast decoding: a static cache, and generate() compiles the forward
    (CompileConfig's defaults: inductor, "reduce-overhead", not fullgraph) on CUDA."""
    from transformers import CompileConfig

    image_tokens = bench.image_tokens_per_row(reference.config)
    if image_tokens > max_length:
        # transformers 5.17's Mllama writes the image's cross-attention keys/values into its
        # layer of the StaticCache (max_cache_len slots): index_copy_ past the end. On the CPU that
        # is an IndexError; on CUDA a device-side assert, which ends the process and every row after.
        raise RuntimeError(
            f"not run: transformers' StaticCache ({max_length} slots) cannot hold the {image_tokens} image "
            "keys/values of Mllama's cross-attention layers (on CUDA its index_copy_ would trip a device-side assert)")
    return dict(cache_implementation="static", max_cache_len=max_length, compile_config=CompileConfig())


def transformers_note(label: str, reference) -> str | None:
    compiled = hasattr(reference, "_compiled_call")
    if label == "transformers-compiled" and reference.device.type == "cuda" and not compiled:
        why = (f"transformers {transformers_version()} skips compilation for {reference.config.model_type}"
               if "llama4" in reference.config.model_type else "its auto-compile criteria were not met")
        return (f"transformers-compiled: generate() did not compile {type(reference).__name__}'s forward ({why}); "
                "that row is the static cache with the eager forward")
    return None


bench.REFERENCES["transformers"] = bench.Reference(
    build=transformers_reference,
    version=transformers_version,
    modes={"transformers": eager, "transformers-compiled": static_compiled},
    note=transformers_note,
)

if __name__ == "__main__":
    sys.exit(cli.main(["bench", *sys.argv[1:]]))
