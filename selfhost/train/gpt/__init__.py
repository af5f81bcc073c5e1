"""Train your own GPT (GPT-2 architecture, nanoGPT-style), estimate its cost, export it to GGUF.

Modules: `config` (presets, TOML), `tokenizer` (char + byte-level BPE), `data` (documents -> token
arrays), `model` (the network), `estimate` (params, FLOPs, ETA), `trainer` (the loop, yields events),
`checkpoint` (atomic, weights-only), `export` (GGUF `gpt2` + store), `sample` (generation).
Shared plumbing (device, threads, dependency guard, settings base) is in `selfhost.train.common`.
Only `model`, `trainer`, `checkpoint`, `estimate`, `export` and `sample` import torch.
"""

from __future__ import annotations
