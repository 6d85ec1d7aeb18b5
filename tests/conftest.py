"""Shared test helpers: tiny reference checkpoints written by transformers (the oracle)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))
if not torch.cuda.is_available():
    # The Triton kernels' tests run in Triton's interpreter on CPU tensors (set before herd imports Triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)


def reference_llama(cls_name: str = "LlamaForCausalLM", seed: int = 0, **overrides):
    """A transformers Llama model with a tiny config and random weights (the oracle)."""
    import transformers

    kwargs = {**TINY_LLAMA, **overrides}
    config = transformers.LlamaConfig(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config)
    return randomize_norms_and_biases(model)


def randomize_norms_and_biases(model):
    """Random norm weights and biases too (transformers initialises them to ones and zeros), so that
    a wrong or missing one shows in the outputs; the model in eval mode."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return model.eval()


def left_padded_prompts(lengths=(9, 5, 2), vocab: int = 128, seed: int = 0, pad: int = 0):
    """(ids, mask): random prompts of the given lengths, left padded with `pad` to the longest."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(1, vocab, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def save_reference(model, folder: Path, **save_kwargs) -> Path:
    model.save_pretrained(folder, **save_kwargs)
    return folder


@pytest.fixture
def tiny_llama_folder(tmp_path):
    """(folder, reference model) for a tiny GQA LlamaForCausalLM."""
    model = reference_llama()
    return save_reference(model, tmp_path / "tiny"), model


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """SmolLM2-135M-Instruct (real trained Llama weights) as a Hugging Face folder, float32 (temp only)."""
    from scripts.make_smollm2_checkpoint import GGUF, build

    if not GGUF.is_file():
        pytest.skip(f"{GGUF} is not there")
    return build(tmp_path_factory.mktemp("smollm2") / "model")
