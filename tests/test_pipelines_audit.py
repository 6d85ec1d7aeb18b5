"""pipeline() against transformers' pipeline on what tests/test_pipelines.py does not cover: the reference's
generation defaults (sampling at temperature 0.7, 256 new tokens, a model's own max_length), seeded sampling
over single prompts, lists and chats, beam search, a generation_config at the call, construction defaults,
and pipeline()'s own arguments (task inference, unknown tasks, dtype / torch_dtype / model_kwargs, device)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import herd
from tests.test_pipelines import CHAT, chat_model_folder, pipes  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True)
def quiet():
    import transformers

    transformers.logging.set_verbosity_error()


def both(pipes, *args, **kwargs):  # noqa: F811
    """(reference output, herd output) for one call, each after the same seed."""
    reference, ours = pipes
    torch.manual_seed(0)
    expected = reference(*args, **kwargs)
    torch.manual_seed(0)
    return expected, ours(*args, **kwargs)


@pytest.mark.parametrize("inputs, kwargs", [
    ("Hello", dict(max_new_tokens=4)),  # no do_sample: the reference samples at temperature 0.7
    (CHAT, dict(max_new_tokens=4)),
    (["Hello", "Sea"], dict(max_new_tokens=3, do_sample=True)),  # a list: one seed drawn first, as its DataLoader
    ([CHAT, CHAT], dict(max_new_tokens=3, num_return_sequences=2)),
    ("Hello", dict(max_new_tokens=4, num_beams=2)),  # beam sampling by default
    ("Hello", dict(max_new_tokens=4, num_beams=2, do_sample=False, num_return_sequences=2)),
    ("Hello", dict(prefix="Once upon ", max_new_tokens=3, do_sample=False)),
    ("Hello , world", dict(clean_up_tokenization_spaces=False, max_new_tokens=3, do_sample=False)),
    (CHAT, dict(return_tensors=True, max_new_tokens=3, do_sample=False)),
    (CHAT + [{"role": "assistant", "content": "It"}], dict(continue_final_message=False, max_new_tokens=3)),
], ids=["default-sampling", "chat-default-sampling", "list-seeded", "chats-nrs", "beam-sampling", "beams-greedy",
        "prefix", "no-cleanup", "chat-tensors", "assistant-not-continued"])
def test_generation_matches_reference(pipes, inputs, kwargs):  # noqa: F811
    expected, got = both(pipes, inputs, **kwargs)
    assert got == expected


def test_generation_defaults(pipes):  # noqa: F811
    reference, ours = pipes
    for key in ("max_new_tokens", "do_sample", "temperature"):
        assert getattr(ours.generation_config, key) == getattr(reference.generation_config, key), key
    import transformers

    # A call's generation_config replaces the pipeline's (the default sampling with it).
    torch.manual_seed(0)
    expected = reference("Hello", generation_config=transformers.GenerationConfig(max_new_tokens=3))
    torch.manual_seed(0)
    got = ours("Hello", generation_config=herd.GenerationConfig(max_new_tokens=3))
    assert got == expected and len(expected[0]["generated_text"]) > len("Hello")


def test_model_max_length_wins_over_the_default_length(chat_model_folder, tmp_path):  # noqa: F811
    import transformers

    folder = shutil.copytree(chat_model_folder, tmp_path / "ckpt")
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_length": 9, "do_sample": False}))
    reference = transformers.pipeline("text-generation", model=str(folder), dtype=torch.float32)
    ours = herd.pipeline("text-generation", model=str(folder), dtype=torch.float32)
    assert ours.generation_config.max_new_tokens is reference.generation_config.max_new_tokens is None
    assert ours("Hello there") == reference("Hello there")


def test_construction_defaults_and_call_overrides(chat_model_folder):  # noqa: F811
    import transformers

    kwargs = dict(dtype=torch.float32, do_sample=False, max_new_tokens=3)
    pair = (transformers.pipeline("text-generation", model=str(chat_model_folder), **kwargs),
            herd.pipeline("text-generation", model=str(chat_model_folder), **kwargs))
    expected, got = both(pair, ["Hello", "Sea"])
    assert got == expected
    expected, got = both(pair, "Hello", do_sample=True)
    assert got == expected


@pytest.mark.parametrize("kwargs", [
    dict(device=-1, dtype=torch.float16, torch_dtype=torch.bfloat16),  # dtype wins over the older name
    dict(device_map="cpu", model_kwargs={"torch_dtype": torch.float16}),  # model_kwargs' dtype where dtype= is unset
    dict(dtype=torch.float16, model_kwargs={"dtype": torch.bfloat16}),  # refused: given twice
    dict(device_map="cpu", model_kwargs={"device_map": "cpu"}),  # refused: given twice
], ids=str)
def test_pipeline_arguments_match_reference(chat_model_folder, kwargs):  # noqa: F811
    import transformers

    outputs = []
    for library in (transformers, herd):
        try:
            own = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}  # transformers edits them
            pipe = library.pipeline("text-generation", model=str(chat_model_folder), **own)
        except ValueError as error:
            outputs.append(("error", "cannot use both" in str(error) or "only one of them" in str(error)))
            continue
        outputs.append((pipe.task, pipe.dtype, pipe.device.type, pipe("Hi", max_new_tokens=2, do_sample=False)))
    assert outputs[1] == outputs[0]


def test_task_inferred_from_the_model(chat_model_folder):  # noqa: F811
    """transformers reads the task from the Hub (offline it refuses); herd reads the model's config."""
    pipe = herd.pipeline(model=str(chat_model_folder), dtype=torch.float32)
    assert isinstance(pipe, herd.pipelines.TextGenerationPipeline) and pipe.task == "text-generation"
    assert herd.pipelines._infer_task(pipe.model) == "text-generation"
    assert herd.pipelines._infer_task(str(chat_model_folder)) == "text-generation"

    class Loaded:  # what the config of a loaded Mllama / Llama 4 says
        config = type("Config", (), {"model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"]})()

    assert herd.pipelines._infer_task(Loaded()) == "image-text-to-text"
    with pytest.raises(ValueError, match="needs task= or model="):
        herd.pipeline()


def test_unknown_task_is_a_key_error_as_in_the_reference(chat_model_folder):  # noqa: F811
    import transformers

    for task in ("summarization", "text2text-generation"):
        with pytest.raises(KeyError, match=task):
            transformers.pipeline(task, model=str(chat_model_folder))
        with pytest.raises(KeyError, match=task):
            herd.pipeline(task, model=str(chat_model_folder))
        with pytest.raises(ValueError, match="unsupported pipeline task"):
            herd.pipeline(task, model=str(chat_model_folder))
