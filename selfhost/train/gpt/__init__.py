"""Train your own GPT (GPT-2 or llama-style, nanoGPT-style code), estimate its cost, export it to GGUF.

Modules: `options` (each setting's flag, each choice's values, the presets folder: what the CLI reads at
start-up), `config` (TrainConfig, presets/*.toml, TOML files), `tokenizer` (char + byte-level BPE), `data`
(documents -> token arrays), `model` and `llama` (the networks), `estimate` (params, FLOPs, ETA),
`trainer` (the loop) with `setup`, `run`, `optim` (+ `muon`), `evaluation`, `resume` and `devices`,
`checkpoint` (atomic, weights-only), `export` (GGUF + store), `base` + `finetune` (--init), `sample`.
Shared plumbing (device, threads, dependency guard, settings base) is in `selfhost.train.common`.
`options` and `config` never import torch.
"""

from __future__ import annotations
