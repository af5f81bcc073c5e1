"""The llama.cpp runtime: backend and log capture, GGUF checks and info, model load, the batch engine,
the chat template, embeddings and memory sizing. Imports nothing from models/, chat/, serve/ or cli/
(tests/test_architecture.py); private llama-cpp-python API only through `llama_private`."""
