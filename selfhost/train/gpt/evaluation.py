"""Evals: the mean loss over fixed batches of each split, and a text sample."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from selfhost.train.gpt import data, tokenizer
from selfhost.train.gpt.config import TrainConfig
from selfhost.train.gpt.devices import Batch, autocast, to_device
from selfhost.train.gpt.model import CausalLM

EVAL_SEED_OFFSET = 7919  # eval batches come from their own RNG: evals never move the training RNG


@dataclass
class EvalOutcome:
    step: int
    train_loss: float
    val_loss: float
    sample: str
    checkpoint: Path | None


def eval_batches(ds: data.Dataset, cfg: TrainConfig, device: torch.device) -> dict[str, list[Batch]]:
    """The `eval_iters` fixed batches of each split every eval uses (drawn once, from their own RNG)."""
    out = {}
    for split, arr in (("train", ds.train), ("val", ds.val)):
        sampler = data.BatchSampler(arr, cfg.block_size, cfg.batch_size, cfg.seed + EVAL_SEED_OFFSET)
        out[split] = [to_device(*sampler.next(), device) for _ in range(cfg.eval_iters)]
    return out


@torch.inference_mode()
def evaluate(model: CausalLM, ds: data.Dataset, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             batches: dict[str, list[Batch]] | None = None) -> dict[str, float]:  # fmt: skip
    """Mean loss over `eval_iters` batches of each split; the same batches at every eval.
    One host sync per split (the losses stay on the device until the mean)."""
    model.eval()
    batches = batches or eval_batches(ds, cfg, device)
    out = {}
    for split, pairs in batches.items():
        losses = torch.zeros(len(pairs), device=device)
        for k, (x, y) in enumerate(pairs):
            with autocast(device, dtype):
                _, loss = model(x, y)
            losses[k] = loss
        out[split] = float(losses.mean())
    model.train()
    return out


@torch.no_grad()
def sample_text(model: CausalLM, tok: tokenizer.Tokenizer, device: torch.device, n_tokens: int, seed: int,
                prompt: str = "", temperature: float = 0.8, top_k: int | None = 200) -> str:  # fmt: skip
    """Generate from `prompt` (after <|endoftext|>, as documents start) with a private RNG."""
    if n_tokens <= 0:
        return ""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([[tok.eot_id, *tok.encode(prompt)]], dtype=torch.long, device=device)
    ids = [int(t) for t in model.generate(idx, n_tokens, temperature, top_k, generator=gen)]
    model.train(was_training)
    return tok.decode(ids)
