"""selfhost: pull, quantize, chat with and train local LLMs, on your own machine."""

__version__ = "0.1.0"
