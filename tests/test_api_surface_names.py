"""Public names and argument names that user code spells as transformers spells them."""

from __future__ import annotations

import herd


def test_pipeline_classes_are_exported():
    import transformers

    for name in ("TextGenerationPipeline", "ImageTextToTextPipeline"):
        assert hasattr(transformers, name) and hasattr(herd, name), name


def test_image_processor_from_dict_takes_transformers_argument_name():
    import transformers

    settings = {"size": {"height": 56, "width": 56}, "max_image_tiles": 2}
    reference = transformers.MllamaImageProcessorPil.from_dict(image_processor_dict=settings)
    ours = herd.MllamaImageProcessor.from_dict(image_processor_dict=settings)
    assert ours.size == reference.size and ours.max_image_tiles == reference.max_image_tiles == 2


def test_generation_classes_are_importable_from_the_top_as_in_transformers():
    """`from herd import TopKLogitsWarper` as `from transformers import TopKLogitsWarper`: every
    public name of herd.generation that transformers exports at its top level."""
    import transformers

    import herd.generation

    shared = [name for name in herd.generation.__all__ if hasattr(transformers, name)]
    assert "TopKLogitsWarper" in shared and "AsyncTextIteratorStreamer" in shared
    missing = [name for name in shared if not hasattr(herd, name) or name not in herd.__all__]
    assert not missing, missing
