"""attn_implementation="eager" on batches with padded rows (a query that may see nothing): the
logits and the loss equal the reference's eager (softmax of an all -max row: uniform), for
Llama, Llama 4 and Mllama (whose text and vision parts must get the backend too)."""

from __future__ import annotations

import pytest
import torch

import herd
from tests.conftest import max_abs_diff, reference_llama
from tests.models.llama4.test_modeling_llama4 import reference_llama4
from tests.models.mllama.test_modeling_mllama import _inputs, _reference


def _masks(batch, width):
    mask = torch.ones(batch, width, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the first queries of row 1 see no key
    mask[-1] = 0  # a row that is all padding
    return mask


@pytest.mark.parametrize("family", ["llama", "llama4", "mllama"])
def test_eager_padded_rows_match_reference_eager(tmp_path, family):
    import transformers

    make, cls = {"llama": (reference_llama, "LlamaForCausalLM"), "llama4": (reference_llama4, "Llama4ForCausalLM"),
                 "mllama": (_reference, "MllamaForConditionalGeneration")}[family]
    make().save_pretrained(tmp_path / "ckpt")
    inputs = _inputs([[4], [2], [1]]) if family == "mllama" else {
        "input_ids": torch.randint(1, 128, (3, 10), generator=torch.Generator().manual_seed(0))}
    mask = _masks(*inputs["input_ids"].shape)
    labels = inputs["input_ids"].masked_fill(mask == 0, -100).masked_fill(inputs["input_ids"] >= 128, -100)
    outputs = {}
    for attn in ("eager", "sdpa"):
        reference = getattr(transformers, cls).from_pretrained(tmp_path / "ckpt", attn_implementation=attn).eval()
        ours = getattr(herd, cls).from_pretrained(tmp_path / "ckpt", attn_implementation=attn, progress=False)
        with torch.no_grad():
            expected = reference(**inputs, attention_mask=mask, labels=labels)
            got = ours(**inputs, attention_mask=mask, labels=labels)
        assert max_abs_diff(got.logits, expected.logits) < 1e-4, attn
        assert abs(got.loss.item() - expected.loss.item()) < 1e-5, attn
        outputs[attn] = got.logits
    # the backends differ only on the padded queries (eager: uniform weights; sdpa: what torch gives)
    real = mask.bool()
    assert max_abs_diff(outputs["eager"][real], outputs["sdpa"][real]) < 1e-4
    assert max_abs_diff(outputs["eager"][~real], outputs["sdpa"][~real]) > 1e-3


def test_eager_gradients_of_padded_rows_match_reference(tmp_path):
    """Training on a left-padded batch: the last pad position predicts the first real label, so a
    query that sees no key is in the loss; its gradient goes through the masked scores as in the
    reference (an added mask), not nowhere (a filled one)."""
    import transformers

    reference_llama().save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.clone()
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager")
    ours = herd.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager", progress=False)
    reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ours_grads = dict(ours.named_parameters())
    for name, parameter in reference.named_parameters():
        assert max_abs_diff(ours_grads[name].grad, parameter.grad) < 1e-5, name
