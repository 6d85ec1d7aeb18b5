"""The Mllama examples of the transformers docs, with only the import changed (and local files for URLs).

A tiny random model over the real Llama 3.1 vocabulary (+ <|image|> = 128256) is saved beside the
processor folder of the processor tests, so both libraries load the same folder.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SHARED_DATA
from tests.models.mllama.test_processing_mllama import folder as processor_folder  # noqa: F401  (fixture)

PHOTO = SHARED_DATA / "images" / "chelsea.png"
TEXT = dict(vocab_size=128256, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, cross_attention_layers=[1], pad_token_id=128004, bos_token_id=128000,
            eos_token_id=[128001, 128009], max_position_embeddings=512)
VISION = dict(hidden_size=16, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=32,
              vision_output_dim=48, image_size=56, patch_size=14, intermediate_layers_indices=[0, 1], max_num_tiles=4)


@pytest.fixture(scope="module")
def model_folder(processor_folder):  # noqa: F811
    import transformers

    torch.manual_seed(0)
    model = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(text_config=TEXT, vision_config=VISION))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "gate" in name:
                parameter.uniform_(-1.0, 1.0)
    model.save_pretrained(processor_folder)
    return processor_folder


def _meta_row_masking(model, cross_attention_mask):
    """Hooks giving transformers Meta's behaviour: text that sees no image gets no cross-attention output."""
    rows = cross_attention_mask.flatten(2).any(-1).float()  # (batch, seq)

    def hook(module, args, output):
        seq = output[0].shape[1]
        visible = rows[:, -seq:] if seq > 1 else torch.ones(rows.shape[0], 1)  # decode steps see the image
        return output[0] * visible[..., None], output[1]

    return [layer.cross_attn.register_forward_hook(hook)
            for layer in model.model.language_model.layers if hasattr(layer, "cross_attn")]


def test_instruct_example(model_folder):
    import transformers

    import herd

    messages = [[{"role": "user", "content": [{"type": "image", "path": str(PHOTO)},
                                              {"type": "text", "text": "What does the image show?"}]}]]
    texts = {}
    for library in (herd, transformers):
        model = library.MllamaForConditionalGeneration.from_pretrained(model_folder, dtype=torch.float32)
        processor = library.AutoProcessor.from_pretrained(model_folder)
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt").to(model.device)
        hooks = _meta_row_masking(model, inputs["cross_attention_mask"]) if library is transformers else []
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        for handle in hooks:
            handle.remove()
        texts[library.__name__] = processor.decode(output[0])
    assert texts["herd"] == texts["transformers"]
    assert "<|image|>" in texts["herd"] and "What does the image show?" in texts["herd"]


def test_base_example(model_folder):
    import transformers
    from PIL import Image

    import herd

    prompt = "<|image|>If I had to write a haiku for this one"
    raw_image = Image.open(PHOTO)
    texts = {}
    for library in (herd, transformers):
        model = library.MllamaForConditionalGeneration.from_pretrained(model_folder, dtype=torch.float32)
        processor = library.AutoProcessor.from_pretrained(model_folder)
        inputs = processor(text=prompt, images=raw_image, return_tensors="pt").to(model.device)
        output = model.generate(**inputs, do_sample=False, max_new_tokens=15)
        texts[library.__name__] = processor.decode(output[0], skip_special_tokens=True)
    assert texts["herd"] == texts["transformers"] and texts["herd"].startswith("If I had to write a haiku")


def test_vision_model_alone_example(model_folder):
    import transformers
    from PIL import Image

    import herd

    outputs = {}
    for library in (herd, transformers):
        model = library.MllamaVisionModel.from_pretrained(model_folder)
        processor = library.AutoProcessor.from_pretrained(model_folder)
        inputs = processor(images=Image.open(PHOTO), return_tensors="pt")
        with torch.no_grad():
            outputs[library.__name__] = model(**inputs).last_hidden_state
    assert outputs["herd"].shape == outputs["transformers"].shape == (1, 1, 4, 17, 48)
    assert (outputs["herd"] - outputs["transformers"]).abs().max() < 1e-4


def test_text_only_causal_lm_example(model_folder):
    import transformers

    import herd

    prompt = "If I had to write a haiku, it would be:"
    texts = {}
    for library in (herd, transformers):
        model = library.MllamaForCausalLM.from_pretrained(model_folder)
        tokenizer = library.AutoTokenizer.from_pretrained(model_folder)
        inputs = tokenizer(prompt, return_tensors="pt")
        generate_ids = model.generate(inputs.input_ids, max_length=20, do_sample=False)
        texts[library.__name__] = tokenizer.batch_decode(generate_ids, skip_special_tokens=True,
                                                         clean_up_tokenization_spaces=False)[0]
    assert texts["herd"] == texts["transformers"]
