"""`selfhost quantize`: llama.cpp quantization with progress events, and quality reports."""
