"""Training: your own GPT (`gpt`) and an MNIST classifier (`mnist`). Needs PyTorch (the `train` extra)."""
