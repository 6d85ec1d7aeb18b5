"""The official openai client against `herd serve`'s app on loopback, with SmolLM2-135M-Instruct
and tiny random Llama 3.2 Vision / Llama 4 models, over the real engine (continuous batching over
the paged KV store): the text, the formats, the options, against generate() and transformers."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.conftest import SHARED_DATA

from .conftest import engine_server, live

openai = pytest.importorskip("openai")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["What is the capital of France?", "Name a color.", "What is 2 + 2?", "Say hello.",
           "Name a fruit.", "What day comes after Monday?", "Name an ocean.", "What is water made of?",
           "Name a planet.", "Count to three.", "What is the opposite of hot?", "Name a month."]


@pytest.fixture(scope="module")
def served(smollm2):
    model, tokenizer = smollm2
    with live(engine_server(model, tokenizer, name="smollm2")) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, messages=QUESTION, **kwargs):
    kwargs.setdefault("max_tokens", 24)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model="smollm2", messages=messages, **kwargs)


def generate_text(smollm2, messages, max_new_tokens):
    model, tokenizer = smollm2
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), out.shape[1] - ids.shape[1], ids.shape[1]


def test_greedy_chat_equals_generate_and_transformers(client, smollm2, smollm2_folder):
    import transformers

    answer = chat(client)
    expected, new_tokens, prompt_tokens = generate_text(smollm2, QUESTION, 24)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == prompt_tokens and answer.usage.completion_tokens == new_tokens
    assert answer.usage.total_tokens == prompt_tokens + new_tokens
    assert answer.choices[0].finish_reason == ("stop" if new_tokens < 24 else "length")
    reference = transformers.LlamaForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_folder)
    ids = reference_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)
    with torch.inference_mode():
        out = reference.generate(**ids, max_new_tokens=24, do_sample=False)
    assert answer.choices[0].message.content == reference_tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                                                           skip_special_tokens=True)


def test_completion_equals_generate(client, smollm2):
    model, tokenizer = smollm2
    answer = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12,
                                       temperature=0)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert answer.choices[0].text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 12
    assert answer.object == "text_completion"
    echoed = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == "The capital of France is" + answer.choices[0].text


def test_streaming_equals_non_streaming(client):
    whole = chat(client, max_tokens=16)
    chunks = list(chat(client, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_continuous_usage_stats(client):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far (completion
    tokens never going down, the prompt's counted from the first), the last the whole request's."""
    whole = chat(client, max_tokens=16)
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(chat(client, max_tokens=16, stream=True, stream_options=options))
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == whole.usage.completion_tokens and counts[-2] == counts[-1]
    assert all(c.usage.prompt_tokens == whole.usage.prompt_tokens for c in chunks[1:])
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    streamed = list(client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=10,
                                              temperature=0, stream=True, stream_options=options))
    counts = [c.usage.completion_tokens for c in streamed]
    assert counts == sorted(counts) and counts[-1] == 10 and counts[0] >= 1
    # without include_usage the option asks for nothing (as vLLM)
    plain = list(chat(client, max_tokens=4, stream=True, stream_options={"continuous_usage_stats": True}))
    assert all(c.usage is None for c in plain)
    text = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=10, temperature=0)
    streamed = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=10, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text


def test_logit_bias_steers_the_real_model(client, smollm2):
    """A bias of +100 on one token makes a greedy answer that token alone; -100 on the token the
    model chose first makes it choose another."""
    tokenizer = smollm2[1]
    token = tokenizer.encode(" banana", add_special_tokens=False)[0]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=3, temperature=0,
                                            logit_bias={str(token): 100})
    assert answer.choices[0].message.content == tokenizer.decode([token] * 3)
    plain = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=1, temperature=0)
    first = tokenizer.encode(plain.choices[0].message.content, add_special_tokens=False)
    assert len(first) == 1
    avoided = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=1, temperature=0,
                                             logit_bias={str(first[0]): -100})
    assert avoided.choices[0].message.content != plain.choices[0].message.content


def test_stop_strings_are_cut_out(client):
    full = chat(client).choices[0].message.content
    assert "of France" in full, full
    # " of Fra" spans several tokens: the streamed text must never show its beginning either
    stop = " of Fra"
    answer = chat(client, stop=[stop, "never appears"])
    assert answer.choices[0].message.content == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content or "" for c in chat(client, stop=stop, stream=True) if c.choices]
    assert "".join(pieces) == full[: full.index(stop)]


def test_n_choices_with_a_seed_are_reproducible(client):
    first = chat(client, n=3, temperature=1.0, seed=11, max_tokens=8)
    again = chat(client, n=3, temperature=1.0, seed=11, max_tokens=8)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # n samples, not one sample n times
    streamed = list(chat(client, n=3, temperature=1.0, seed=11, max_tokens=8, stream=True))
    for index, text in enumerate(texts):
        assert "".join(c.choices[0].delta.content or "" for c in streamed
                       if c.choices and c.choices[0].index == index) == text


def test_chat_logprobs_match_the_model(client, smollm2):
    model, tokenizer = smollm2
    answer = chat(client, logprobs=True, top_logprobs=3, max_tokens=4)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
    best = expected.topk(3)
    assert entries[0].logprob == pytest.approx(best.values[0].item(), abs=1e-4)
    assert [t.token for t in entries[0].top_logprobs] == [tokenizer.decode([i]) for i in best.indices.tolist()]
    for entry in entries:  # greedy: the chosen token is the best one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode() == entry.token
    plain = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=3,
                                      temperature=0, logprobs=2)
    assert len(plain.choices[0].logprobs.tokens) == 3 and len(plain.choices[0].logprobs.top_logprobs[0]) == 2
    assert "".join(plain.choices[0].logprobs.tokens) == plain.choices[0].text
    # logprobs 0: each top_logprobs entry holds the chosen token alone (it was empty)
    zero = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=3,
                                     temperature=1.0, seed=3, logprobs=0).choices[0].logprobs
    assert zero.top_logprobs == [{token: value} for token, value in zip(zero.tokens, zero.token_logprobs)]


def test_echo_logprobs_are_the_models_log_softmax_over_the_prompt(client, smollm2):
    """echo + logprobs: the prompt's tokens first (the first null), each the log_softmax of the model's
    logits one position before, with the 2 best; then the same tokens and logprobs as without echo;
    max_tokens 0 gives the prompt's part alone; a stream gives the same lists."""
    model, tokenizer = smollm2
    prompt = "The capital of France is"
    ids = tokenizer(prompt)["input_ids"]
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    options = {"model": "smollm2", "prompt": prompt, "temperature": 0, "logprobs": 2}
    plain = client.completions.create(max_tokens=3, **options).choices[0]
    echoed = client.completions.create(max_tokens=3, echo=True, **options).choices[0]
    logprobs, n = echoed.logprobs, len(ids)
    assert echoed.text == prompt + plain.text
    assert logprobs.tokens[:n] == [tokenizer.decode([i]) for i in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    outside = 0
    for position in range(1, n):
        best = expected[position - 1].topk(2)
        chosen = expected[position - 1, ids[position]].item()
        assert logprobs.token_logprobs[position] == pytest.approx(chosen, abs=1e-4)
        # the 2 best and the prompt's own token (up to logprobs + 1 entries, as OpenAI's reference and vLLM)
        want = dict(zip([tokenizer.decode([i]) for i in best.indices.tolist()], best.values.tolist()))
        outside += tokenizer.decode([ids[position]]) not in want
        want.setdefault(tokenizer.decode([ids[position]]), chosen)
        assert list(logprobs.top_logprobs[position]) == list(want)
        assert list(logprobs.top_logprobs[position].values()) == pytest.approx(list(want.values()), abs=1e-4)
    assert outside  # " capital" after "The" is not among the 2 best: its entry has 3
    assert logprobs.tokens[n:] == plain.logprobs.tokens
    assert logprobs.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-4)
    assert "".join(logprobs.tokens) == echoed.text  # no special token in this prompt: offsets are the sums
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    alone = client.completions.create(max_tokens=0, echo=True, **options).choices[0]
    assert (alone.text, alone.finish_reason, alone.logprobs.tokens) == (prompt, "length", logprobs.tokens[:n])
    assert alone.logprobs.token_logprobs[1:] == pytest.approx(logprobs.token_logprobs[1:n], abs=1e-5)
    chunks = [c.choices[0] for c in client.completions.create(max_tokens=3, echo=True, stream=True, **options)]
    assert "".join(c.text for c in chunks) == echoed.text
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == logprobs.tokens
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == logprobs.text_offset


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_stop_with_the_text_at_a_stop_string(client, stream):
    """A stop string cuts the answer: in chat between two tokens, and the logprob tokens join into
    exactly the returned text; in a completion inside a token (" answer", stop "answer"), which
    keeps its entry, whole, the last one."""
    full = chat(client).choices[0].message.content
    stop = " of"
    assert stop in full, full
    answer = chat(client, stop=stop, logprobs=True, stream=stream)
    if stream:
        chunks = [c.choices[0] for c in answer if c.choices]
        text = "".join(c.delta.content or "" for c in chunks)
        tokens = [e.token for c in chunks if c.logprobs for e in c.logprobs.content]
    else:
        text, tokens = answer.choices[0].message.content, [e.token for e in answer.choices[0].logprobs.content]
    assert text == full[: full.index(stop)] and "".join(tokens) == text
    prompt = "The capital of France is"
    whole = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    stop = "answer"
    assert " answer" in whole, whole
    answer = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0, logprobs=1,
                                       stop=stop, stream=stream)
    chunks = list(answer) if stream else [answer]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert text == whole[: whole.index(stop)] and "".join(tokens) == text + stop and tokens[-1] == " answer"
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))] and offsets[-1] == len(text) - 1


def test_logprob_bytes_rebuild_an_emoji(client):
    """An emoji spans several byte-level tokens, each decoding alone to U+FFFD: their logprobs' `bytes`
    are the tokens' own bytes, which join into the answer (OpenAI's reason for the field)."""
    answer = chat(client, messages=[{"role": "user", "content": "Write three emoji of fruit, nothing else."}],
                  logprobs=True, top_logprobs=1, max_tokens=12)  # 4 whole emoji
    entries = answer.choices[0].logprobs.content
    assert any(entry.token == "\ufffd" for entry in entries), [e.token for e in entries]
    assert bytes(b for entry in entries for b in entry.bytes).decode() == answer.choices[0].message.content
    assert all(entry.top_logprobs[0].bytes == entry.bytes for entry in entries)  # greedy: the best is the chosen


def test_json_schema_output_parses_and_validates(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0,
                                                              "maximum": 100_000_000}},
              "required": ["city", "population"], "additionalProperties": False}
    answer = chat(client, messages=[{"role": "user", "content": "Give the capital of France and its population."}],
                  response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
                  max_tokens=40)
    document = json.loads(answer.choices[0].message.content)
    assert set(document) == {"city", "population"} and isinstance(document["population"], int)
    assert isinstance(document["city"], str) and answer.choices[0].finish_reason == "stop"


def test_forced_tool_call_from_the_real_model(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string",
                                                                                      "maxLength": 20}},
                                                              "required": ["city"], "additionalProperties": False}}}]
    answer = chat(client, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=tools,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=40)
    call = answer.choices[0].message.tool_calls[0]
    assert answer.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)


def test_concurrent_requests_equal_single_ones(client):
    singles = [chat(client, messages=[{"role": "user", "content": p}], max_tokens=5).choices[0].message.content
               for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: chat(client, messages=[{"role": "user", "content": p}],
                                                max_tokens=5).choices[0].message.content, PROMPTS))
    assert together == singles


def test_async_scheduling_serves_the_same_answers(smollm2, client):
    """A server whose engine schedules asynchronously (a GPU's default; here forced on the CPU):
    concurrent streamed and plain answers, an eos-ended one among them, equal this server's; the
    engine ends with every block back."""
    prompts = PROMPTS[:6]
    expected = [chat(client, messages=[{"role": "user", "content": p}], max_tokens=12).choices[0].message.content
                for p in prompts]
    model, tokenizer = smollm2
    server = engine_server(model, tokenizer, name="smollm2", engine_kwargs={"async_scheduling": True})
    with live(server) as running:
        other = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def answer(index_prompt):
            index, prompt = index_prompt
            messages = [{"role": "user", "content": prompt}]
            if index % 2:
                return chat(other, messages=messages, max_tokens=12).choices[0].message.content
            return "".join(c.choices[0].delta.content or "" for c in
                           chat(other, messages=messages, max_tokens=12, stream=True) if c.choices)

        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(answer, enumerate(prompts)))
        engine = server.engine.engine
        assert engine.async_scheduling and engine.stats()["kv_blocks_used"] == 0
    assert together == expected


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"] and models.data[0].object == "model"


# --- images: tiny random Llama 3.2 Vision and Llama 4 with their processors ----------------------


def _mllama_folder(path):
    import transformers

    from tests.models.mllama.test_processing_mllama import LLAMA_32_VISION_CHAT_TEMPLATE

    tokenizer = transformers.AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "llama3.1")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    tokenizer.pad_token = "<|end_of_text|>"
    tokenizer.save_pretrained(path)
    transformers.MllamaImageProcessor(size={"height": 56, "width": 56}, max_image_tiles=4).save_pretrained(path)
    (path / "chat_template.jinja").write_text(LLAMA_32_VISION_CHAT_TEMPLATE)
    text = dict(vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, cross_attention_layers=[1], pad_token_id=128004, bos_token_id=128000,
                eos_token_id=[128001, 128008, 128009], max_position_embeddings=512)
    vision = dict(hidden_size=16, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=32,
                  vision_output_dim=32, image_size=56, patch_size=14, intermediate_layers_indices=[0],
                  max_num_tiles=4)
    torch.manual_seed(0)
    model = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(
        text_config=text, vision_config=vision, image_token_index=128256))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "gate" in name:  # the cross-attention gates start at 0: open them so the image counts
                parameter.uniform_(-1.0, 1.0)
    model.save_pretrained(path)


def _llama4_folder(path):
    import transformers
    from transformers.models.llama4 import processing_llama4

    from herd.models.llama4 import Llama4ImageProcessorFast
    from tests.models.llama4.test_modeling_llama4_multimodal import TEXT, VISION
    from tests.models.llama4.test_processing_llama4 import LLAMA4_TOKENS

    tokenizer = transformers.AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "llama3.1")
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA4_TOKENS})
    tokenizer.pad_token = "<|end_of_text|>"
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(processing_llama4.chat_template)
    Llama4ImageProcessorFast(size={"height": 56, "width": 56}, max_patches=4).save_pretrained(path)
    patch_id = tokenizer.convert_tokens_to_ids("<|patch|>")
    eot = tokenizer.convert_tokens_to_ids("<|eot|>")
    text = {**TEXT, "vocab_size": len(tokenizer), "eos_token_id": [eot], "max_position_embeddings": 1024}
    torch.manual_seed(0)
    transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(
        text_config=text, vision_config=VISION, image_token_index=patch_id)).eval().save_pretrained(path)


@pytest.fixture(scope="module", params=["mllama", "llama4"])
def vision_served(request, tmp_path_factory):
    import herd

    path = tmp_path_factory.mktemp(request.param)
    (_mllama_folder if request.param == "mllama" else _llama4_folder)(path)
    model = herd.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = herd.AutoProcessor.from_pretrained(path)
    with live(engine_server(model, processor.tokenizer, processor=processor, name=request.param)) as server:
        yield server, model, processor


def _data_url(path):
    return f"data:image/{path.suffix.lstrip('.')};base64," + base64.b64encode(path.read_bytes()).decode()


def test_image_chat_equals_generate_with_the_processor(vision_served):
    from PIL import Image

    server, model, processor = vision_served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    photo = SHARED_DATA / "images" / "chelsea.png"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(photo)}},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    name = server.server.model_name
    answer = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
    local = [{"role": "user", "content": [{"type": "image", "image": Image.open(photo)},
                                          {"type": "text", "text": "What is in this picture?"}]}]
    inputs = processor.apply_chat_template(local, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert answer.choices[0].message.content == processor.tokenizer.decode(new, skip_special_tokens=True)
    assert answer.usage.prompt_tokens == inputs["input_ids"].shape[1]
    # the engine got the processor's tensors for the image (batch dim 1), not the text alone
    sent = server.server.engine.requests_seen[-1]
    assert sent.prompt_ids == inputs["input_ids"][0].tolist()
    assert set(sent.model_inputs) == set(inputs) - {"input_ids", "attention_mask"}
    assert torch.equal(sent.model_inputs["pixel_values"], inputs["pixel_values"])
    with pytest.raises(openai.BadRequestError, match="local files are not accepted"):
        client.chat.completions.create(model=name, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(photo)}}, {"type": "text", "text": "hi"}]}])


def test_the_clients_pydantic_parse_helper(client):
    """openai's `chat.completions.parse(response_format=<pydantic model>)`: the strict json_schema
    it sends is enforced, and the client parses the answer into the model. (The population is
    bounded: unbounded, this small model writes digits until max_tokens.)"""
    import pydantic

    class City(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=20)
        population: int = pydantic.Field(ge=0, le=100_000_000)

    answer = client.chat.completions.parse(model="smollm2", temperature=0, max_tokens=40, response_format=City,
                                           messages=[{"role": "user", "content": "The capital of France, as JSON."}])
    parsed = answer.choices[0].message.parsed
    assert isinstance(parsed, City) and answer.choices[0].finish_reason == "stop"
