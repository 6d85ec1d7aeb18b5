"""Reading quantized checkpoints. `gguf`: llama.cpp's GGUF files (Llama architecture), dequantized on load."""
