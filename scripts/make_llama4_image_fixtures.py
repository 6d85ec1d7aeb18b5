"""Record transformers' Llama4ImageProcessorFast outputs as test fixtures (run where torchvision works).

The CPU machines have no torchvision, so the reference image processor cannot run there; this script
runs on the lent GPU machine and writes, for each case, the reference's pixel_values and
aspect_ratios to one safetensors file (inputs: the shared photos and seeded synthetic images).

    python scripts/make_llama4_image_fixtures.py IMAGES_FOLDER OUT_FILE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

# (name, settings): small tiles keep the fixtures small while exercising every code path.
SETTINGS = {
    "t56_p4": dict(size={"height": 56, "width": 56}, max_patches=4),
    "t56_p16": dict(size={"height": 56, "width": 56}, max_patches=16),
    "t28_p9_max_canvas": dict(size={"height": 28, "width": 28}, max_patches=9, resize_to_max_canvas=True),
}
SYNTHETIC_SIZES = [(1, 1), (3, 7), (20, 200), (300, 16), (56, 56), (57, 113), (90, 30), (112, 224)]


def synthetic_images():
    generator = np.random.default_rng(0)
    for height, width in SYNTHETIC_SIZES:
        yield f"rgb_{height}x{width}", Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
    yield "gray_40x70", Image.fromarray(generator.integers(0, 256, (40, 70), dtype=np.uint8))
    yield "rgba_64x48", Image.fromarray(generator.integers(0, 256, (64, 48, 4), dtype=np.uint8), mode="RGBA")


def main(images_folder: str, out_file: str) -> None:
    import transformers

    photos = [(p.stem, Image.open(p)) for p in sorted(Path(images_folder).iterdir())]
    tensors, index = {}, {}
    for setting, kwargs in SETTINGS.items():
        processor = transformers.Llama4ImageProcessorFast(**kwargs)
        for name, image in photos + list(synthetic_images()):
            out = processor(images=image, return_tensors="pt")
            key = f"{setting}/{name}"
            tensors[f"{key}/pixel_values"] = out["pixel_values"].contiguous()
            tensors[f"{key}/aspect_ratios"] = torch.as_tensor(out["aspect_ratios"]).contiguous()
            index[key] = {"settings": kwargs, "dtype": str(out["pixel_values"].dtype)}
        # a batch of two images of different sizes
        out = processor(images=[photos[0][1], photos[1][1]], return_tensors="pt")
        tensors[f"{setting}/batch_0_1/pixel_values"] = out["pixel_values"].contiguous()
        tensors[f"{setting}/batch_0_1/aspect_ratios"] = torch.as_tensor(out["aspect_ratios"]).contiguous()
        index[f"{setting}/batch_0_1"] = {"settings": kwargs, "images": [photos[0][0], photos[1][0]]}
    save_file(tensors, out_file, metadata={"index": json.dumps(index), "transformers": transformers.__version__,
                                           "torch": torch.__version__})
    print(len(tensors), "tensors,", sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6, "MB")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
