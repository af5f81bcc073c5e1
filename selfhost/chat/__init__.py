"""Chat with a local GGUF model: engine (llama.cpp), context sizing, history (SQLite), export."""
