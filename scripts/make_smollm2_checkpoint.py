"""Write SmolLM2-135M-Instruct (a real trained Llama-architecture chat model) as a Hugging Face folder.

The only copy on this machine is a 4-bit GGUF file in ../shared/data. transformers (with the gguf
package, both in herd's `test` extra) dequantizes it; the weights go into a plain LlamaForCausalLM,
saved as float32 safetensors with the tokenizer and chat template (about 540 MB).

    python scripts/make_smollm2_checkpoint.py /tmp/smollm2
"""

from __future__ import annotations

import sys
from pathlib import Path

GGUF = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build(folder: Path, gguf: Path = GGUF) -> Path:
    import torch
    import transformers

    source, name = str(gguf.parent), gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = transformers.LlamaConfig(**{k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version")})
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.tie_weights()
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(build(Path(sys.argv[1])))
