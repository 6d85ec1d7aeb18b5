"""Write SmolLM2-135M-Instruct (a real trained Llama-architecture chat model) as a Hugging Face folder.

The only copy on this machine is a 4-bit GGUF file in ../shared/data. herd reads it (dequantizing
the weights to float32) and writes a plain LlamaForCausalLM folder: float32 safetensors, config,
generation config, tokenizer and chat template (about 540 MB).

    python scripts/make_smollm2_checkpoint.py /tmp/smollm2
"""

from __future__ import annotations

import sys
from pathlib import Path

GGUF = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build(folder: Path, gguf: Path = GGUF) -> Path:
    import torch

    import herd

    model = herd.AutoModelForCausalLM.from_pretrained(gguf, dtype=torch.float32, progress=False)
    tokenizer = herd.AutoTokenizer.from_pretrained(gguf)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(build(Path(sys.argv[1])))
