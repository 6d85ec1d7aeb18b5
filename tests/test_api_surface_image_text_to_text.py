"""pipeline("image-text-to-text") against transformers' pipeline on one tiny Mllama folder: chats with image
items, images + text, batches, return_full_text and return_tensors.

The model's cross-attention gates keep transformers' zero initialization, so the images do not change the
logits: the two libraries' different handling of text before the first image (herd follows Meta) does not
show, and the comparison is about the pipeline's inputs, call forms and outputs.
"""

from __future__ import annotations

import pytest
import torch

import herd
from tests.conftest import SHARED_DATA
from tests.models.mllama.test_docs_examples import TEXT, VISION
from tests.models.mllama.test_processing_mllama import folder as processor_folder  # noqa: F401  (fixture)
from tests.models.mllama.test_processing_mllama import quiet_loggers  # noqa: F401  (fixture)

# transformers' own vision encoder passes a keyword it deprecates (see tests/models/mllama/conftest.py).
pytestmark = pytest.mark.filterwarnings("ignore:`hidden_state` is deprecated:FutureWarning")

PHOTO = str(SHARED_DATA / "images" / "chelsea.png")
OTHER = str(SHARED_DATA / "images" / "coffee.png")


@pytest.fixture(scope="module")
def pipes(processor_folder):  # noqa: F811
    import transformers

    torch.manual_seed(0)
    model = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(text_config=TEXT, vision_config=VISION))
    model.save_pretrained(processor_folder)
    reference = transformers.pipeline("image-text-to-text", model=str(processor_folder), dtype=torch.float32)
    ours = herd.pipeline("image-text-to-text", model=str(processor_folder), dtype=torch.float32)
    return reference, ours


def chat(path=PHOTO, question="What is it?"):
    return [{"role": "user", "content": [{"type": "image", "path": path}, {"type": "text", "text": question}]}]


PREFILL = chat() + [{"role": "assistant", "content": [{"type": "text", "text": "It is"}]}]
CASES = {
    "chat": (dict(text=chat()), {}),
    "chat positional": (dict(images=chat()), {}),
    "chat new text": (dict(text=chat()), dict(return_full_text=False)),
    "chats": (dict(text=[chat(), chat(OTHER, "And this one?")]), {}),
    "chat prefill": (dict(text=PREFILL), {}),
    "image and text": (dict(images=PHOTO, text="<|image|>If I had to write a haiku"), {}),
    "images and texts": (dict(images=[[PHOTO], [OTHER]], text=["<|image|>A haiku", "<|image|>A much longer poem"]), {}),
    "tensors": (dict(images=PHOTO, text="<|image|>Hello"), dict(return_tensors=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_pipeline(pipes, name):
    reference, ours = pipes
    inputs, options = CASES[name]
    # A fresh generate_kwargs dict per call: the reference pipeline writes max_new_tokens into it.
    expected = reference(**inputs, max_new_tokens=5, generate_kwargs={"do_sample": False}, **options)
    got = ours(**inputs, max_new_tokens=5, generate_kwargs={"do_sample": False}, **options)
    if options.get("return_tensors"):
        for expected_record, record in zip(expected, got):
            assert torch.equal(record.pop("generated_token_ids"), expected_record.pop("generated_token_ids"))
    assert got == expected


def test_task_and_errors(pipes):
    reference, ours = pipes
    assert ours.task == reference.task == "image-text-to-text"
    for pipe in (reference, ours):
        with pytest.raises(ValueError, match="at least provide either text or images"):
            pipe()
        with pytest.raises(ValueError, match="separate input arguments"):
            pipe(images=PHOTO, text=chat())
        with pytest.raises(ValueError, match="defined twice"):
            pipe(text=chat(), max_new_tokens=2, generate_kwargs={"max_new_tokens": 3})
