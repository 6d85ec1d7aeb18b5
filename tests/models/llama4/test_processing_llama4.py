"""Llama4Processor: the image token layout and ids against transformers' own layout function.

transformers' Llama4Processor cannot be built on this CPU machine (its image processor needs
torchvision), so its pieces are used directly: the layout function `_prompt_split_image` and the
tokenizer; herd's image processor is checked bit for bit separately (test_image_processing_llama4).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import herd
from herd.models.llama4 import Llama4ImageProcessorFast, Llama4Processor  # noqa: F401  (public name)
from tests.conftest import SHARED_DATA, max_abs_diff

LLAMA4_TOKENS = ["<|image|>", "<|image_start|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>",
                 "<|tile_y_separator|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|python_start|>",
                 "<|python_end|>"]
PHOTOS = {p.stem: p for p in sorted((SHARED_DATA / "images").iterdir())}


def _processor_folder(path, chat_template: str | None):
    """A Llama 4-like processor folder: the Llama 3.1 vocabulary plus Llama 4's special tokens,
    `chat_template` in chat_template.jinja (None: no template anywhere, tokenizer_config.json included)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "llama3.1")
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA4_TOKENS})
    tokenizer.pad_token = "<|end_of_text|>"
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    if chat_template is not None:
        (path / "chat_template.jinja").write_text(chat_template)
    Llama4ImageProcessorFast(size={"height": 56, "width": 56}, max_patches=4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The folder with Llama 4's chat template."""
    from transformers.models.llama4 import processing_llama4

    return _processor_folder(tmp_path_factory.mktemp("llama4_processor"), processing_llama4.chat_template)


@pytest.fixture(scope="module")
def processor(folder):
    return herd.AutoProcessor.from_pretrained(folder)


def _reference_layout(aspect_ratio, tokens_per_tile):
    from transformers.models.llama4.processing_llama4 import Llama4Processor as Reference

    return Reference._prompt_split_image(None, aspect_ratio, tokens_per_tile)


@pytest.mark.parametrize("aspect_ratio", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 4), (1, 16)])
@pytest.mark.parametrize("tokens_per_tile", [4, 144])
def test_layout_matches_reference(processor, aspect_ratio, tokens_per_tile):
    assert processor.image_layout(aspect_ratio, tokens_per_tile) == _reference_layout(aspect_ratio, tokens_per_tile)


@pytest.mark.parametrize("names", [["astronaut"], ["chelsea", "camera"], []], ids=str)
def test_ids_and_pixels_match_reference_pieces(folder, processor, names):
    import transformers

    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    images = [Image.open(PHOTOS[name]) for name in names]
    text = "Look" + "".join(" <|image|> and" for _ in names) + " tell me."
    got = processor(images=images or None, text=text, return_tensors="pt")
    expected_text = text
    if images:
        pixels = Llama4ImageProcessorFast(size={"height": 56, "width": 56}, max_patches=4)(images, return_tensors="pt")
        assert torch.equal(got["pixel_values"], pixels["pixel_values"])
        for ratio in pixels["aspect_ratios"].tolist():  # 56-pixel tiles: 16 patches / 4 = 4 tokens each
            expected_text = expected_text.replace("<|image|>", _reference_layout(tuple(ratio), 4).replace("<|image|>", "\0"), 1)
        expected_text = expected_text.replace("\0", "<|image|>")
    expected = reference_tokenizer(expected_text, return_tensors="pt")
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])


def test_chat_template_with_images(folder, processor):
    import transformers

    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(PHOTOS["coffee"])},
                                             {"type": "text", "text": "What is in this image?"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    patch_id = processor.tokenizer.convert_tokens_to_ids("<|patch|>")
    tiles = inputs["pixel_values"].shape[0]
    assert int((inputs["input_ids"] == patch_id).sum()) == tiles * 4
    assert int((inputs["input_ids"] == processor.tokenizer.bos_token_id).sum()) == 1  # no double BOS


def test_left_padding_by_default_and_batches(processor):
    out = processor(images=[Image.open(PHOTOS["astronaut"])], text=["<|image|> short", "a much longer text without images here"],
                    padding=True, return_tensors="pt")
    lengths = out["attention_mask"].sum(-1).tolist()
    shorter = 0 if lengths[0] < lengths[1] else 1
    assert out["attention_mask"][shorter, 0] == 0 and out["attention_mask"][shorter, -1] == 1  # padded on the left


def test_errors(processor):
    image = Image.open(PHOTOS["astronaut"])
    with pytest.raises(ValueError, match="Found 2 <\\|image\\|> placeholders across the batch, but 1 images"):
        processor(images=[image], text="<|image|><|image|>")
    with pytest.raises(ValueError, match="needs text"):
        processor(images=[image])


MESSAGES = {
    "one_image": [{"role": "user", "content": [{"type": "image", "path": str(PHOTOS["chelsea"])},
                                               {"type": "text", "text": "Describe it."}]}],
    "two_images": [{"role": "user", "content": [{"type": "image", "path": str(PHOTOS["chelsea"])},
                                                {"type": "image", "path": str(PHOTOS["rocket"])},
                                                {"type": "text", "text": "What do these have in common?"}]}],
    "text_only": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
}


@pytest.mark.parametrize("conversation", list(MESSAGES))
def test_processor_and_model_end_to_end(folder, processor, tmp_path, conversation):
    """The processor's output runs through Llama4ForConditionalGeneration like the reference model's."""
    import transformers

    from tests.models.llama4.test_modeling_llama4_multimodal import TEXT, VISION

    patch_id = processor.tokenizer.convert_tokens_to_ids("<|patch|>")
    text_config = {**TEXT, "vocab_size": len(processor.tokenizer)}
    torch.manual_seed(0)
    reference = transformers.Llama4ForConditionalGeneration(
        transformers.Llama4Config(text_config=text_config, vision_config=VISION, image_token_index=patch_id)).eval()
    reference.save_pretrained(tmp_path / "model")
    ours = herd.Llama4ForConditionalGeneration.from_pretrained(tmp_path / "model", progress=False)
    inputs = processor.apply_chat_template(MESSAGES[conversation], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    if "pixel_values" not in inputs:  # text-only chat through the multimodal class
        with torch.no_grad():
            assert max_abs_diff(ours(**inputs).logits, reference(**inputs).logits) < 1e-4
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(ours.generate(**inputs, **kwargs), reference.generate(**inputs, **kwargs))
        return
    # The processor gives bfloat16 pixels: herd casts them to the tower's dtype, the reference fails on them
    # ("expected m1 and m2 to have the same dtype"), so it gets them cast by hand.
    assert inputs["pixel_values"].dtype == torch.bfloat16
    reference_inputs = {**inputs, "pixel_values": inputs["pixel_values"].float()}
    with torch.no_grad():
        expected = reference(**reference_inputs).logits
        got = ours(**inputs).logits
    assert max_abs_diff(got, expected) < 1e-4
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(**inputs, **kwargs), reference.generate(**reference_inputs, **kwargs))


# --- against the whole reference processor, recorded on the GPU machine --------------------------



def _recorded_cases():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    spec = importlib.util.spec_from_file_location("make", root / "scripts" / "make_llama4_processor_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, root / "tests" / "fixtures" / "llama4_processor.safetensors"


@pytest.mark.parametrize("name", ["one_image", "two_images", "batch", "chat", "chat_two"])
def test_matches_the_recorded_reference_processor(folder, name):
    """`folder` is built as the recording script builds its folder (same tokens, template and tile settings)."""
    import json

    from safetensors import safe_open

    module, fixtures = _recorded_cases()
    processor = herd.AutoProcessor.from_pretrained(folder)
    case = module.cases(None)[name]
    if "chat" in case:
        chat = json.loads(json.dumps(case["chat"]))
        for message in chat:
            for item in message["content"] if isinstance(message["content"], list) else []:
                if item.get("type") == "image":
                    item["path"] = str(PHOTOS[item["path"].rsplit(".", 1)[0]])
        out = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
    else:
        images = [Image.open(PHOTOS[p.rsplit(".", 1)[0]]) for p in case["images"]]
        out = processor(text=case["text"], images=images, return_tensors="pt",
                        **{k: v for k, v in case.items() if k not in ("text", "images")})
    recorded = safe_open(str(fixtures), "pt")
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(torch.as_tensor(out[key]), recorded.get_tensor(f"{name}/{key}")), key


# --- the built-in chat template and assistant masks, against transformers' Llama4Processor ------------


class _ImageProcessorForReference:
    """herd's image processor (bit-exact with transformers', test_image_processing_llama4) behind the two
    methods transformers' Llama4Processor calls, since transformers' own needs torchvision here."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, *args, **kwargs):
        return self.image_processor(*args, **kwargs)

    def fetch_images(self, images):
        from herd.image_utils import fetch_images

        return fetch_images(images)


@pytest.fixture(scope="module")
def bare_folder(tmp_path_factory):
    """The Llama 4-like folder without any chat template (no chat_template.jinja, none in tokenizer_config.json)."""
    path = _processor_folder(tmp_path_factory.mktemp("llama4_no_template"), None)
    assert not list(path.glob("*.jinja"))
    return path


@pytest.fixture(scope="module")
def bare_processor(bare_folder):
    return herd.AutoProcessor.from_pretrained(bare_folder)


@pytest.fixture(scope="module")
def reference_processor(bare_folder):
    """transformers' Llama4Processor with its default arguments (so its built-in chat template)."""
    from unittest import mock

    import transformers
    from transformers.models.llama4.processing_llama4 import Llama4Processor as Reference

    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(bare_folder)
    image_processor = _ImageProcessorForReference(Llama4ImageProcessorFast(size={"height": 56, "width": 56},
                                                                           max_patches=4))
    with mock.patch.object(transformers.ProcessorMixin, "check_argument_for_proper_class", lambda *args: None):
        return Reference(image_processor=image_processor, tokenizer=tokenizer)


def _get_weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: Where.
    """
    return "sunny"


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather, ünïcode", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ONE_CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
TWO_CALLS = {"role": "assistant", "content": [{"type": "text", "text": "Checking."}], "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
    {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}],
    "system_items_and_image": [
        {"role": "system", "content": [{"type": "text", "text": "You see images. "}]},
        {"role": "user", "content": [{"type": "image", "path": str(PHOTOS["chelsea"])},
                                     {"type": "text", "text": "What is it?"}]}],
    "two_images": MESSAGES["two_images"] + [{"role": "assistant", "content": [{"type": "text", "text": "Both red."}]}],
    "tool_round_trip": [
        {"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Paris?"}, ONE_CALL,
        {"role": "tool", "content": "22 C"}, {"role": "tool", "content": {"temperature": 22}},
        {"role": "ipython", "content": ["a", 1]}, {"role": "assistant", "content": "It is 22 C."}],
    "two_calls": [{"role": "user", "content": "Paris and Rome?"}, TWO_CALLS, {"role": "tool", "content": 5}],
    "no_calls": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "tool_calls": []}],
    "chat": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
             {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why did the llama cross?"}],
}
OPTIONS = {
    "plain": {},
    "generation_prompt": {"add_generation_prompt": True},
    "tools_in_user_message": {"tools": [WEATHER_TOOL]},
    "tools_in_system_message": {"tools": [WEATHER_TOOL], "tools_in_user_message": False},
    "function_tool": {"tools": [_get_weather], "add_generation_prompt": True},
    "custom_tools": {"custom_tools": [WEATHER_TOOL], "date_string": "1 Jan 2025"},
}


def test_built_in_template_without_a_folder_template(bare_folder, folder, reference_processor):
    from herd.models.llama4.processing_llama4 import DEFAULT_CHAT_TEMPLATE

    processor = herd.AutoProcessor.from_pretrained(bare_folder)
    assert processor.chat_template == DEFAULT_CHAT_TEMPLATE != reference_processor.chat_template  # our own text
    assert Llama4Processor(processor.image_processor, processor.tokenizer).chat_template == DEFAULT_CHAT_TEMPLATE
    assert Llama4Processor(processor.image_processor, processor.tokenizer, chat_template=None).chat_template is None
    assert herd.AutoProcessor.from_pretrained(bare_folder, chat_template="{{ 'x' }}").chat_template == "{{ 'x' }}"
    assert herd.AutoProcessor.from_pretrained(folder).chat_template == (folder / "chat_template.jinja").read_text()


def test_built_in_template_wins_over_the_tokenizer_config_template(bare_folder, tmp_path):
    """transformers' processor reads no template from tokenizer_config.json: its built-in one applies."""
    import json
    import shutil

    from herd.models.llama4.processing_llama4 import DEFAULT_CHAT_TEMPLATE

    shutil.copytree(bare_folder, tmp_path / "folder")
    config_path = tmp_path / "folder" / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": "{{ 'tokenizer' }}"}))
    processor = herd.AutoProcessor.from_pretrained(tmp_path / "folder")
    assert processor.tokenizer.chat_template == "{{ 'tokenizer' }}"
    assert processor.chat_template == DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_built_in_template_renders_as_transformers(bare_processor, reference_processor, conversation, options):
    processor = bare_processor
    messages, kwargs = CONVERSATIONS[conversation], OPTIONS[options]
    expected = reference_processor.apply_chat_template(messages, **kwargs)
    assert processor.apply_chat_template(messages, **kwargs) == expected


def test_built_in_template_errors_and_batches(bare_processor, reference_processor):
    processor = bare_processor
    system_only = [{"role": "system", "content": "Alone."}]
    for candidate in (reference_processor, processor):  # tools in the first user message need one
        with pytest.raises(Exception, match="no first user message"):
            candidate.apply_chat_template(system_only, tools=[WEATHER_TOOL])
    batch = [CONVERSATIONS["system"], CONVERSATIONS["tool_round_trip"]]
    assert processor.apply_chat_template(batch) == reference_processor.apply_chat_template(batch)


@pytest.mark.parametrize("conversation", ["two_images", "system"])
def test_built_in_template_tokenized_as_transformers(bare_processor, reference_processor, conversation):
    processor = bare_processor
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    expected = reference_processor.apply_chat_template(CONVERSATIONS[conversation], **kwargs)
    got = processor.apply_chat_template(CONVERSATIONS[conversation], **kwargs)
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


# Llama 4's format with each assistant turn in a {% generation %} block.
GENERATION_TEMPLATE = r"""{{- bos_token }}
{%- for message in messages %}
    {{- '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
            {{- message['content'] if message['content'] is string else message['content'][0]['text'] }}
            {{- '<|eot|>' }}
        {%- endgeneration %}
    {%- else %}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for item in message['content'] %}
                {{- '<|image|>' if item['type'] == 'image' else item['text'] }}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot|>' }}
    {%- endif %}
{%- endfor %}"""


@pytest.mark.parametrize(
    "conversation, kwargs",
    [
        ("system", {}),
        ("system", {"return_tensors": "pt"}),
        ("chat", {"processor_kwargs": {"truncation": True, "max_length": 36}}),  # cuts the second answer
        ("two_images", {"return_tensors": "pt"}),
        (["system", "chat"], {"processor_kwargs": {"padding": True}}),
    ],
    ids=["text", "text-pt", "truncated", "images-pt", "batch-left-padded"],
)
def test_assistant_masks_match_transformers(bare_processor, reference_processor, conversation, kwargs):
    """As transformers places them. With images, the spans are those of the template's text and
    the token offsets those of the text with each <|image|> expanded into its tiles, in both."""
    processor = bare_processor
    messages = [CONVERSATIONS[name] for name in conversation] if isinstance(conversation, list) \
        else CONVERSATIONS[conversation]
    arguments = dict(chat_template=GENERATION_TEMPLATE, tokenize=True, return_dict=True,
                     return_assistant_tokens_mask=True, **kwargs)
    expected = reference_processor.apply_chat_template(messages, **arguments)
    got = processor.apply_chat_template(messages, **arguments)
    assert list(got) == list(expected)
    for key in ("input_ids", "attention_mask", "assistant_masks"):
        assert type(got[key]) is type(expected[key]), key
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(expected[key])), key
    if conversation != "two_images":
        assert torch.as_tensor(got["assistant_masks"]).any()


MULTI_TURN_IMAGES = [
    {"role": "user", "content": [{"type": "image", "path": str(PHOTOS["chelsea"])}, {"type": "text", "text": "What?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": [{"type": "image", "path": str(PHOTOS["coffee"])},
                                 {"type": "image", "path": str(PHOTOS["camera"])}, {"type": "text", "text": "And?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cup and "}]},
]


@pytest.mark.parametrize("return_tensors", [None, "pt"])
def test_pixel_values_without_return_tensors_are_a_list_per_image(bare_processor, reference_processor, return_tensors):
    """As transformers: with return_tensors=None one tensor of tiles per image in a list, else one tensor."""
    kwargs = dict(tokenize=True, return_dict=True, continue_final_message=True, return_tensors=return_tensors,
                  padding=True)
    expected = reference_processor.apply_chat_template([MULTI_TURN_IMAGES, MULTI_TURN_IMAGES[:1]], **kwargs)
    got = bare_processor.apply_chat_template([MULTI_TURN_IMAGES, MULTI_TURN_IMAGES[:1]], **kwargs)
    assert list(got) == list(expected)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(expected[key])) if return_tensors \
            else got[key] == expected[key], key
    assert type(got["pixel_values"]) is type(expected["pixel_values"])
    if return_tensors is None:
        assert len(got["pixel_values"]) == len(expected["pixel_values"]) == 4
        for mine, theirs in zip(got["pixel_values"], expected["pixel_values"]):
            assert torch.equal(mine, theirs)
    else:
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
    text = bare_processor.apply_chat_template(MULTI_TURN_IMAGES, continue_final_message=True)
    assert text == reference_processor.apply_chat_template(MULTI_TURN_IMAGES, continue_final_message=True)
    assert text.endswith("assistant<|header_end|>\n\nA cup and ")


def test_truncation_that_cuts_an_image_is_an_error(bare_processor, reference_processor):
    """As transformers: an image whose <|image|> token is truncated away is an error, not a silent loss."""
    images = [Image.open(PHOTOS["coffee"])]
    kwargs = dict(text=["<|image|>Describe"], images=images, truncation=True, return_tensors="pt")
    for candidate in (reference_processor, bare_processor):
        with pytest.raises(ValueError, match="Mismatch in `image` token count"):
            candidate(**kwargs, max_length=5)
    expected = reference_processor(**kwargs, max_length=28)  # cuts "Describe" only
    got = bare_processor(**kwargs, max_length=28)
    assert got["input_ids"].shape[1] == 28 and torch.equal(got["input_ids"], expected["input_ids"])


def test_numpy_outputs_of_bfloat16_pixels_are_an_error_that_says_so(bare_processor, reference_processor):
    """Llama 4's pixels are bfloat16, which numpy lacks: both refuse return_tensors='np'; herd says why."""
    kwargs = dict(text="<|image|>x", images=[Image.open(PHOTOS["coffee"])], return_tensors="np")
    with pytest.raises(ValueError, match="BFloat16"):
        reference_processor(**kwargs)
    with pytest.raises(ValueError, match="`pixel_values`: numpy has no bfloat16 type; pass return_tensors='pt'"):
        bare_processor(**kwargs)


def test_text_pairs_and_targets_reach_the_tokenizer(bare_processor, reference_processor):
    """text_pair, text_target and text_pair_target go to the tokenizer as in transformers: the pair's
    tokens in input_ids, the targets as labels."""
    kwargs = dict(text=["Hello there", "Hi"], text_pair=["a second part", "b"], text_target=["x y", "z"],
                  text_pair_target=["w", "v v"], padding=True)
    ours = bare_processor(**kwargs)
    reference = reference_processor(**kwargs)
    assert set(ours) == set(reference) and "labels" in ours
    for key in reference:
        assert list(ours[key]) == list(reference[key]), key
