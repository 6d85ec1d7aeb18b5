"""MllamaProcessor against transformers' MllamaProcessor, both loaded from the same folder.

The folder: the Llama 3.1 tokenizer with <|image|> added (id 128256, as in Llama 3.2 Vision),
a pad token, a 56-pixel-tile image processor config and the Llama 3.2 Vision chat template.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from herd.models.mllama import MllamaImageProcessor, MllamaProcessor
from herd.models.mllama import processing_mllama as herd_module
from herd.tokenization import AutoTokenizer

SHARED = Path(__file__).resolve().parents[4] / "shared"
IMAGES = SHARED / "data" / "images"
TOKENIZER = SHARED / "data" / "tokenizers" / "llama3.1"
DATE = "26 Jul 2024"  # fixes the system prompt's date (the template reads strftime_now otherwise)

# The chat template of meta-llama/Llama-3.2-11B-Vision-Instruct (data for the tests).
LLAMA_32_VISION_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- Find out if there are any images #}
{% set image_ns = namespace(has_images=false) %}
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}

{#- Error out if there are images and system message #}
{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}

{#- System message if there are no images #}
{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
    {%- if tools is not none %}
        {{- "Environment: ipython\n" }}
    {%- endif %}
    {{- "Cutting Knowledge Date: December 2023\n" }}
    {{- "Today Date: " + date_string + "\n\n" }}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.\n\n" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "\n\n" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


@pytest.fixture(scope="module", autouse=True)
def quiet_loggers():
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("herd.image_utils").setLevel(logging.ERROR)


def write_processor_folder(path: Path, tile: int = 56, chat_template: str | None = None) -> Path:
    """A Llama 3.2 Vision-like processor folder, written with transformers: the Llama 3.1 tokenizer
    with <|image|>, an image processor of tile x tile tiles (4 at most), a chat template."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    assert tokenizer.convert_tokens_to_ids("<|image|>") == 128256
    tokenizer.pad_token = "<|end_of_text|>"
    tokenizer.save_pretrained(path)
    transformers.MllamaImageProcessor(size={"height": tile, "width": tile}, max_image_tiles=4).save_pretrained(path)
    # As in the Llama 3.2 Vision repositories: preprocessor_config.json names the processor class.
    config_path = path / "preprocessor_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "processor_class": "MllamaProcessor"}))
    (path / "chat_template.jinja").write_text(chat_template or LLAMA_32_VISION_CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_processor_folder(tmp_path_factory.mktemp("mllama_processor"))


@pytest.fixture(scope="module")
def reference(folder):
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "MllamaProcessor"
    return processor


@pytest.fixture(scope="module")
def processor(folder):
    return MllamaProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def photos():
    return {path.stem: PIL.Image.open(path) for path in sorted(IMAGES.iterdir())}


def as_array(value):
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return np.asarray(value)


def assert_same_outputs(expected, got):
    assert list(got.keys()) == list(expected.keys())
    for key, value in expected.items():
        mine = got[key]
        if isinstance(value, list):
            assert mine == value, key
            continue
        assert type(mine) is type(value), (key, type(mine), type(value))
        value, mine = as_array(value), as_array(mine)
        assert mine.shape == value.shape and mine.dtype == value.dtype, (key, mine.shape, value.shape)
        np.testing.assert_array_equal(mine, value, err_msg=key)  # bit-exact


def compare(reference, processor, **kwargs):
    expected = reference(**kwargs)
    got = processor(**kwargs)
    assert_same_outputs(expected, got)
    return got


def assert_both_raise(reference, processor, match, **kwargs):
    with pytest.raises(ValueError):
        reference(**kwargs)
    with pytest.raises(ValueError, match=match) as error:
        processor(**kwargs)
    return str(error.value)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def test_loads_the_folder(processor, reference):
    assert processor.image_token == "<|image|>" and processor.image_token_id == 128256 == reference.image_token_id
    assert processor.python_token_id == reference.python_token_id
    assert processor.bos_token == reference.bos_token
    assert processor.image_processor.size == {"height": 56, "width": 56}
    assert processor.chat_template == reference.chat_template == LLAMA_32_VISION_CHAT_TEMPLATE
    assert processor.model_input_names == reference.model_input_names


# ----------------------------------------------------------------------------------------------
# Calls against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_tensors", [None, "np", "pt"])
def test_zero_to_three_images(processor, reference, photos, return_tensors):
    a, c, h = photos["astronaut"], photos["chelsea"], photos["horse"]
    compare(reference, processor, text="Hello there", return_tensors=return_tensors)
    compare(
        reference,
        processor,
        text="<|image|>If I had to write a haiku for this one",
        images=a,
        return_tensors=return_tensors,
    )
    compare(
        reference, processor, text="Compare <|image|> with <|image|>.", images=[c, h], return_tensors=return_tensors
    )
    compare(
        reference,
        processor,
        text="<|image|><|image|>Three: <|image|> end",
        images=[[a, c, photos["rocket"]]],
        return_tensors=return_tensors,
    )


def test_uneven_batches_and_padding(processor, reference, photos):
    a, c, h, k = photos["astronaut"], photos["chelsea"], photos["horse"], photos["camera"]
    texts = ["<|image|><|image|>Hi <|image|> there, a longer text", "<|image|> x"]
    images = [[a, c, h], [k]]
    compare(reference, processor, text=texts, images=images)  # ragged rows, lists
    out = compare(reference, processor, text=texts, images=images, padding=True, return_tensors="pt")
    assert out["cross_attention_mask"].shape == (2, out["input_ids"].shape[1], 3, 4)
    compare(reference, processor, text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    compare(reference, processor, text=texts, images=images, padding="max_length", max_length=30, return_tensors="np")
    compare(reference, processor, text=["Text only", "rows, padded together"], padding=True, return_tensors="pt")
    compare(reference, processor, images=images, return_tensors="pt")  # images alone
    compare(reference, processor, images=a)


def test_per_modality_kwargs(processor, reference, photos):
    a, c = photos["astronaut"], photos["chelsea"]
    compare(
        reference,
        processor,
        text=["A <|image|>B", "<|image|> c d e f"],
        images=[[a], [c]],
        text_kwargs={"padding": "max_length", "max_length": 24},
        common_kwargs={"return_tensors": "pt"},
        images_kwargs={"max_image_tiles": 4},
    )
    compare(
        reference,
        processor,
        text="<|image|>x",
        images=a,
        images_kwargs={"size": {"height": 28, "width": 28}},
        return_tensors="pt",
    )
    compare(reference, processor, text="<|image|>x", images=a, text_kwargs={"return_tensors": "pt"})
    compare(reference, processor, text="<|image|>x", images=a, do_normalize=False, add_special_tokens=False)
    # A key given flat and in a modality dict is an error in both.
    assert_both_raise(
        reference,
        processor,
        "passed two times",
        text="<|image|>x",
        images=a,
        padding=True,
        text_kwargs={"padding": True},
    )


def test_images_kwargs_max_image_tiles(processor, reference, photos):
    # With a call-time max_image_tiles the reference still sizes the cross-attention mask's tile
    # axis with the image processor's setting (4), which no longer matches pixel_values; herd
    # uses the call's value. Everything else is equal.
    kwargs = {
        "text": "<|image|>x",
        "images": photos["rocket"],
        "return_tensors": "pt",
        "images_kwargs": {"max_image_tiles": 2},
    }
    expected, got = reference(**kwargs), processor(**kwargs)
    for key in ("input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(got[key], expected[key]), key
    assert got["cross_attention_mask"].shape[-1] == got["pixel_values"].shape[2] == 2
    assert torch.equal(got["cross_attention_mask"], expected["cross_attention_mask"][..., :2])


def test_paths_and_urls_as_images(processor, reference):
    path = str(IMAGES / "horse.png")  # RGBA: loading a path drops alpha (load_image), as in the reference
    compare(reference, processor, text="<|image|>Describe", images=path, return_tensors="pt")
    encoded = base64.b64encode((IMAGES / "coffee.png").read_bytes()).decode()
    compare(reference, processor, text="<|image|>Describe", images=f"data:image/png;base64,{encoded}")


def test_cross_attention_rule(processor):
    image_id = processor.image_token_id
    spans = herd_module.get_cross_attention_token_mask
    assert spans([1, 2, 3], image_id) == []
    assert spans([1, image_id, 2, 3], image_id) == [[1, -1]]
    # Each image is seen until the next image token; a group of consecutive ones until the group's next one ends.
    assert spans([1, image_id, image_id, 2, image_id, 3, 4], image_id) == [[1, 4], [2, 4], [4, 7]]
    assert spans([image_id, 5, image_id], image_id) == [[0, 2], [2, 3]]
    out = processor(text="before <|image|> after", images=PIL.Image.new("RGB", (40, 40)), return_tensors="pt")
    position = out["input_ids"][0].tolist().index(image_id)
    mask = out["cross_attention_mask"][0, :, 0]
    assert not mask[:position].any()  # nothing before the first image
    assert mask[position:, 0].all() and not mask[:, 1:].any()  # one tile for a 40x40 image


def test_cross_attention_rule_matches_reference():
    from transformers.models.mllama import processing_mllama as reference_module

    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.choice([7, 8, 9], size=int(rng.integers(1, 14)), p=[0.4, 0.3, 0.3]).tolist()
        expected = reference_module.get_cross_attention_token_mask(ids, 9)
        assert herd_module.get_cross_attention_token_mask(ids, 9) == expected
        if expected:
            tiles = [[int(n) for n in rng.integers(1, 5, len(expected))]]
            length = len(ids) + int(rng.integers(0, 3))
            np.testing.assert_array_equal(
                herd_module.convert_sparse_cross_attention_mask_to_dense([expected], tiles, 4, length),
                reference_module.convert_sparse_cross_attention_mask_to_dense([expected], tiles, 4, length),
            )


def test_bos_is_added_after_leading_images():
    build = herd_module.build_string_from_input
    assert build("Hello", "<|begin_of_text|>", "<|image|>") == "<|begin_of_text|>Hello"
    assert build("<|image|><|image|>Hi", "<|begin_of_text|>", "<|image|>") == "<|image|><|image|><|begin_of_text|>Hi"
    assert build("<|begin_of_text|>Hi", "<|begin_of_text|>", "<|image|>") == "<|begin_of_text|>Hi"


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_errors(processor, reference, photos):
    a, c = photos["astronaut"], photos["chelsea"]
    message = assert_both_raise(
        reference, processor, "Sample 0 has 2 <|image|> token", text="<|image|>a<|image|>", images=[a]
    )
    assert "1 image(s)" in message
    message = assert_both_raise(
        reference, processor, "Sample 1 has 1 <|image|> token", text=["<|image|>a", "<|image|>b"], images=[[a], [a, c]]
    )
    assert "2 image(s)" in message
    assert_both_raise(reference, processor, "no <|image|> token", text="no marker", images=a)
    assert_both_raise(reference, processor, "no images were given", text="<|image|>marker")
    assert_both_raise(reference, processor, "nested list", text=["<|image|>a", "<|image|>b"], images=[a, c])
    assert_both_raise(reference, processor, "2 text", text=["<|image|>a", "<|image|>b"], images=[[a]])
    assert_both_raise(reference, processor, "at least one input")
    assert_both_raise(
        reference, processor, "truncation", text="Describe <|image|>", images=a, truncation=True, max_length=2
    )
    with pytest.raises(TypeError, match="text must be"):
        processor(text=[1, 2])
    with pytest.raises(TypeError, match="images_kwargs got unexpected"):
        processor(text="<|image|>x", images=a, images_kwargs={"colour": "blue"})


def test_tokenizer_without_image_token(folder):
    plain = AutoTokenizer.from_pretrained(TOKENIZER)
    with pytest.raises(ValueError, match="has no <\\|image\\|> token"):
        MllamaProcessor(MllamaImageProcessor(), plain)


# ----------------------------------------------------------------------------------------------
# Chat templates
# ----------------------------------------------------------------------------------------------


def chat_both(reference, processor, conversation, **kwargs):
    return reference.apply_chat_template(conversation, **kwargs), processor.apply_chat_template(conversation, **kwargs)


def test_chat_template_text(processor, reference, photos):
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": str(IMAGES / "chelsea.png")},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]
    expected, got = chat_both(reference, processor, conversation, add_generation_prompt=True)
    assert got == expected
    assert got.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is it?")
    text_only = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
    ]
    expected, got = chat_both(reference, processor, text_only, date_string=DATE)
    assert got == expected and "Today Date: 26 Jul 2024" in got


def test_chat_template_tokenized(processor, reference, photos):
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": str(IMAGES / "chelsea.png")},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]
    expected, got = chat_both(
        reference,
        processor,
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert_same_outputs(expected, got)
    assert got["input_ids"][0].tolist().count(128000) == 1  # the template's BOS only
    expected, got = chat_both(reference, processor, conversation, add_generation_prompt=True, tokenize=True)
    assert got == expected  # input_ids only


def test_chat_template_images_from_pil_data_url_and_http(processor, reference, photos):
    encoded = base64.b64encode((IMAGES / "horse.png").read_bytes()).decode()
    with serve(IMAGES / "rocket.jpg") as url:
        conversations = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": photos["astronaut"]},
                        {"type": "image", "url": f"data:image/png;base64,{encoded}"},
                        {"type": "text", "text": "Compare them."},
                    ],
                }
            ],
            [
                {"role": "user", "content": [{"type": "image", "url": url}, {"type": "text", "text": "One"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A rocket."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "And this?"},
                    ],
                },
            ],
        ]
        expected, got = chat_both(
            reference,
            processor,
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding=True,
        )
    assert_same_outputs(expected, got)
    assert got["pixel_values"].shape[:2] == (2, 2)


def test_chat_template_errors(processor, reference, photos):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": photos["astronaut"]}]},
    ]
    with pytest.raises(Exception, match="incompatible with system messages"):
        reference.apply_chat_template(conversation)
    with pytest.raises(Exception, match="incompatible with system messages"):
        processor.apply_chat_template(conversation)
    with pytest.raises(ValueError, match="none of the keys"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=True)
    with pytest.raises(ValueError, match="not compatible"):
        processor.apply_chat_template(
            [{"role": "user", "content": "x"}], add_generation_prompt=True, continue_final_message=True
        )
    bare = MllamaProcessor(
        processor.image_processor,
        AutoTokenizer.from_pretrained(TOKENIZER, chat_template=None, extra_special_tokens=["<|image|>"]),
    )
    bare.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template|neither"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


class serve:
    """A local HTTP server for one file, as a context manager giving its URL."""

    def __init__(self, path: Path):
        body = path.read_bytes()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{path.name}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def test_decoding(processor, reference):
    ids = torch.tensor([[128000, 9906, 1070, 128009], [128000, 128256, 87, 128001]])
    assert processor.decode(ids[0]) == reference.decode(ids[0])
    assert processor.batch_decode(ids) == reference.batch_decode(ids)
    assert processor.batch_decode(ids, skip_special_tokens=True) == reference.batch_decode(
        ids, skip_special_tokens=True
    )
    assert processor.post_process_image_text_to_text(ids) == reference.post_process_image_text_to_text(ids)
    assert processor.post_process_image_text_to_text(ids, skip_special_tokens=False) == (
        reference.post_process_image_text_to_text(ids, skip_special_tokens=False)
    )


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def test_save_and_load_both_ways(processor, reference, photos, tmp_path):
    import transformers

    kwargs = {
        "text": ["<|image|>Describe", "<|image|><|image|>Two"],
        "images": [[photos["coffee"]], [photos["camera"], photos["horse"]]],
        "padding": True,
        "return_tensors": "pt",
    }
    expected = reference(**kwargs)

    processor.save_pretrained(tmp_path / "herd")
    saved = json.loads((tmp_path / "herd" / "processor_config.json").read_text())
    assert saved["processor_class"] == "MllamaProcessor" and saved["image_processor"]["size"] == {
        "height": 56,
        "width": 56,
    }
    assert (tmp_path / "herd" / "chat_template.jinja").read_text() == LLAMA_32_VISION_CHAT_TEMPLATE
    assert_same_outputs(expected, MllamaProcessor.from_pretrained(tmp_path / "herd")(**kwargs))
    assert_same_outputs(expected, transformers.AutoProcessor.from_pretrained(tmp_path / "herd")(**kwargs))

    reference.save_pretrained(tmp_path / "transformers")  # transformers 5 nests the image processor config
    loaded = MllamaProcessor.from_pretrained(tmp_path / "transformers")
    assert loaded.chat_template == LLAMA_32_VISION_CHAT_TEMPLATE
    assert_same_outputs(expected, loaded(**kwargs))


def test_chat_template_sources(folder, tmp_path):
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    (legacy / "chat_template.jinja").unlink()
    (legacy / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'legacy' }}"}))
    assert MllamaProcessor.from_pretrained(legacy).chat_template == "{{ 'legacy' }}"
    (legacy / "chat_template.json").unlink()
    # No template file: the tokenizer's own template (here the Llama 3.1 text one) is used.
    config = json.loads((legacy / "tokenizer_config.json").read_text())
    (legacy / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'from tokenizer' }}"}))
    loaded = MllamaProcessor.from_pretrained(legacy)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "from tokenizer"
    assert MllamaProcessor.from_pretrained(legacy, chat_template="{{ 'given' }}").chat_template == "{{ 'given' }}"
    named = MllamaProcessor(
        loaded.image_processor, loaded.tokenizer, chat_template={"default": "{{ 'd' }}", "other": "{{ 'o' }}"}
    )
    assert named.apply_chat_template([{"role": "user", "content": "x"}], chat_template="other") == "o"
    named.save_pretrained(tmp_path / "named")
    assert MllamaProcessor.from_pretrained(tmp_path / "named").chat_template == {
        "default": "{{ 'd' }}",
        "other": "{{ 'o' }}",
    }


def test_from_pretrained_overrides(folder):
    loaded = MllamaProcessor.from_pretrained(folder, max_image_tiles=2, padding_side="left")
    assert loaded.image_processor.max_image_tiles == 2
    assert loaded.tokenizer.padding_side == "left"


def test_a_text_only_prompt_in_a_batch_with_images(processor, reference, photos):
    """Accepted (transformers 5.23 does; 5.17, pinned here, refused it): the image row gets what the
    reference gives it alone, the text-only row the tokenizer's ids, no pixels and an all-zero
    cross-attention mask."""
    texts = ["<|image|>What is in this photo?", "Just text, no image"]
    out = processor(text=texts, images=[[photos["astronaut"]], []], padding=True, return_tensors="pt")
    alone = reference(text=texts[:1], images=[[photos["astronaut"]]], return_tensors="pt")
    real = out["attention_mask"].bool()
    assert out["input_ids"][0][real[0]].tolist() == alone["input_ids"][0].tolist()
    assert torch.equal(out["cross_attention_mask"][0][real[0]], alone["cross_attention_mask"][0])
    for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(torch.as_tensor(out[name][0]), torch.as_tensor(alone[name][0])), name
    text_only = processor(text=texts[1:], return_tensors="pt")
    assert out["input_ids"][1][real[1]].tolist() == text_only["input_ids"][0].tolist()
    assert not out["cross_attention_mask"][1].any()
    assert not torch.as_tensor(out["pixel_values"][1]).any() and not out["aspect_ratio_ids"][1].any()


def test_images_must_be_nested_per_sample_with_a_text_only_prompt(processor, photos):
    with pytest.raises(ValueError, match="for a text-only sample"):
        processor(text=["<|image|>hi", "no image"], images=[photos["astronaut"]])


# ----------------------------------------------------------------------------------------------
# Assistant token masks
# ----------------------------------------------------------------------------------------------

# Llama 3.2 Vision's format with each assistant turn in a {% generation %} block, as training
# templates mark them (the published template has none).
GENERATION_TEMPLATE = r"""{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
            {{- message['content'] if message['content'] is string else message['content'][0]['text'] }}
            {{- '<|eot_id|>' }}
        {%- endgeneration %}
    {%- else %}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for item in message['content'] %}
                {{- '<|image|>' if item['type'] == 'image' else item['text'] }}
            {%- endfor %}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""

TWO_TURNS = [
    {"role": "user", "content": [{"type": "image", "path": str(IMAGES / "chelsea.png")},
                                 {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": "A cat, sitting down."},
    {"role": "user", "content": "Sure?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Yes, a cat."}]},
]
TEXT_ONLY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "\n\nHello there"},  # the block starts inside the "\n\n\n\n" token
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye!"},
]


@pytest.mark.parametrize(
    "conversation, kwargs",
    [
        (TWO_TURNS, {}),
        (TWO_TURNS, {"return_tensors": "pt"}),
        (TWO_TURNS, {"add_generation_prompt": True, "return_tensors": "np"}),
        (TEXT_ONLY, {}),
        (TEXT_ONLY, {"processor_kwargs": {"truncation": True, "max_length": 35}}),  # cuts the second answer
        ([TEXT_ONLY, TEXT_ONLY[:3]], {"processor_kwargs": {"padding": True}}),  # padded on the right
        ([TEXT_ONLY[:3], TEXT_ONLY], {"processor_kwargs": {"padding": True, "padding_side": "left"},
                                      "return_tensors": "pt"}),
    ],
    ids=["images", "images-pt", "generation-prompt-np", "text", "truncated", "batch-right-padded", "batch-left-pt"],
)
def test_assistant_masks_match_reference(processor, reference, conversation, kwargs):
    expected, got = chat_both(reference, processor, conversation, chat_template=GENERATION_TEMPLATE, tokenize=True,
                              return_dict=True, return_assistant_tokens_mask=True, **kwargs)
    assert_same_outputs(expected, got)
    assert np.asarray(got["assistant_masks"]).any()


def test_assistant_masks_only_with_a_dict(processor, reference):
    """Without return_dict the ids alone, without tokenize the text: the flag changes neither."""
    for kwargs in ({"tokenize": True}, {}):
        expected, got = chat_both(reference, processor, TEXT_ONLY, chat_template=GENERATION_TEMPLATE,
                                  return_assistant_tokens_mask=True, **kwargs)
        assert got == expected
    with pytest.raises(ValueError, match="continue_final_message is not compatible"):
        processor.apply_chat_template(TEXT_ONLY, chat_template=GENERATION_TEMPLATE, continue_final_message=True,
                                      return_assistant_tokens_mask=True)
