"""`herd bench` with a reference library run on the same weights, in the same process.

herd never imports transformers (it is the oracle of tests and benchmarks only), so the
reference is plugged in here, outside the package:

    python bench/compare.py llama3.1-8b --batch-sizes 1,16,64 --prefill-lengths 2048 --compare transformers

Every argument is `herd bench`'s.
"""

from __future__ import annotations

import sys

import torch

from herd import bench, cli


def transformers_reference(model, dtype: torch.dtype):
    """The transformers class of the same architecture, sharing herd's weight tensors (no copy)."""
    import transformers

    config = model.config
    if type(model).__name__ == "LlamaForCausalLM":
        reference_config, cls = transformers.LlamaConfig(**config.to_dict()), transformers.LlamaForCausalLM
    else:
        reference_config, cls = transformers.Llama4TextConfig(**config.to_dict()), transformers.Llama4ForCausalLM
    reference_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        reference = cls(reference_config)
    loaded = reference.load_state_dict(dict(model.state_dict()), strict=False, assign=True)
    if loaded.missing_keys:
        raise RuntimeError(f"reference lacks weights for {loaded.missing_keys[:5]}")
    for module in reference.modules():  # non-persistent buffers (rotary frequencies) stayed on meta
        if type(module).__name__.endswith("RotaryEmbedding"):
            type(module).__init__(module, module.config)
    if getattr(config, "tie_word_embeddings", False):
        reference.lm_head.weight = reference.model.embed_tokens.weight
    return reference.to(device=model.device, dtype=dtype).eval()


def transformers_version() -> str:
    import transformers

    return transformers.__version__


bench.REFERENCES["transformers"] = (transformers_reference, transformers_version)

if __name__ == "__main__":
    sys.exit(cli.main(["bench", *sys.argv[1:]]))
