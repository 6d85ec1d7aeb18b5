"""Record transformers' Llama4Processor outputs as test fixtures (run where torchvision works).

Builds a Llama 4-like processor folder (the Llama 3.1 tokenizer + Llama 4's special tokens and
chat template, 56-pixel tiles, max_patches 4), runs the reference processor on plain prompts and
chats with images, and writes input_ids / attention_mask / pixel_values to one safetensors file.

    python scripts/make_llama4_processor_fixtures.py INPUTS_FOLDER OUT_FILE
(INPUTS_FOLDER holds the shared photos and llama3.1/ tokenizer files.)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

LLAMA4_TOKENS = ["<|image|>", "<|image_start|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>",
                 "<|tile_y_separator|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|python_start|>",
                 "<|python_end|>"]


def cases(images: Path):
    """name -> (call kwargs); image paths are relative to the inputs folder."""
    return {
        "one_image": dict(text="Look <|image|> and tell me.", images=["astronaut.png"]),
        "two_images": dict(text="First <|image|> then <|image|> done.", images=["chelsea.png", "camera.png"]),
        "batch": dict(text=["<|image|> short", "a longer prompt <|image|> with words"], images=["coffee.png", "rocket.jpg"],
                      padding=True),
        "chat": dict(chat=[{"role": "user", "content": [{"type": "image", "path": "horse.png"},
                                                         {"type": "text", "text": "What is in this image?"}]}]),
        "chat_two": dict(chat=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "image", "path": "chelsea.png"},
                                                            {"type": "image", "path": "rocket.jpg"},
                                                            {"type": "text", "text": "Compare."}]}]),
    }


def build_folder(inputs: Path, folder: Path) -> None:
    import transformers
    from transformers.models.llama4 import processing_llama4

    tokenizer = transformers.AutoTokenizer.from_pretrained(inputs / "llama3.1")
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA4_TOKENS})
    tokenizer.pad_token = "<|end_of_text|>"
    image_processor = transformers.Llama4ImageProcessor(size={"height": 56, "width": 56}, max_patches=4)
    processor = transformers.Llama4Processor(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=processing_llama4.chat_template)
    processor.save_pretrained(folder)


def main(inputs: str, out_file: str) -> None:
    import torch
    import transformers
    from PIL import Image
    from safetensors.torch import save_file

    inputs = Path(inputs)
    folder = Path(tempfile.mkdtemp())
    build_folder(inputs, folder)
    processor = transformers.AutoProcessor.from_pretrained(folder)
    tensors, index = {}, {}
    for name, case in cases(inputs).items():
        if "chat" in case:
            chat = json.loads(json.dumps(case["chat"]))
            for message in chat:
                for item in message["content"] if isinstance(message["content"], list) else []:
                    if item.get("type") == "image":
                        item["path"] = str(inputs / item["path"])
            out = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                return_tensors="pt")
        else:
            images = [Image.open(inputs / p) for p in case["images"]]
            out = processor(text=case["text"], images=images, return_tensors="pt",
                            **{k: v for k, v in case.items() if k not in ("text", "images")})
        for key in ("input_ids", "attention_mask", "pixel_values"):
            tensors[f"{name}/{key}"] = torch.as_tensor(out[key]).contiguous()
        index[name] = case
    save_file(tensors, out_file, metadata={"index": json.dumps(index), "transformers": transformers.__version__})
    print(len(tensors), "tensors")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
