"""`selfhost convert`: Hugging Face safetensors -> GGUF with llama.cpp's own converter, then registered."""
