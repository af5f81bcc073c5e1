"""A run while it trains: what it holds (`Run`), its evals and checkpoints, and the events and records
it writes about itself."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selfhost.events import Events, Notice, Progress
from selfhost.train import runs
from selfhost.train.common import device_name
from selfhost.train.gpt import checkpoint, data, estimate, tokenizer
from selfhost.train.gpt.config import TrainConfig
from selfhost.train.gpt.devices import Batch, Dist
from selfhost.train.gpt.evaluation import EvalOutcome, eval_batches, evaluate, sample_text
from selfhost.train.gpt.model import CausalLM, GPTConfig
from selfhost.train.gpt.optim import Stepper


@dataclass
class Run:
    """What a run holds while it trains, and its evals and checkpoints."""

    cfg: TrainConfig
    dist: Dist
    run_dir: Path
    tok: tokenizer.Tokenizer
    ds: data.Dataset
    device: torch.device
    dtype: torch.dtype
    threads: int | None  # CPU threads of each process (None: left to PyTorch, e.g. on a GPU)
    model_args: GPTConfig
    raw_model: CausalLM
    sampler: data.BatchSampler
    stepper: Stepper
    est: estimate.Estimate
    unseen: tokenizer.Unseen | None = None  # characters the saved tokenizer dropped when rebuilding data
    start_iter: int = 0
    best_val: float = math.inf
    resumed_after_eval: bool = False  # the checkpoint was written by an eval at start_iter
    fixed_batches: dict[str, list[Batch]] = field(default_factory=dict)

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / checkpoint.CKPT_NAME

    def checkpoint_state(self, it: int, val_loss: float | None, rng: dict[str, Any] | None) -> dict[str, Any]:
        """The one checkpoint layout: the weights and what generation and export need; with `rng` (a
        resumable checkpoint) also the optimizer, schedule, scaler and RNG states."""
        state = {
            "model_args": self.model_args.to_dict(), "config": self.cfg.model_dump(mode="json"),
            "tokenizer": self.tok.to_json(), "model": self.raw_model.state_dict(), "iter_num": it,
            "best_val_loss": self.best_val, "val_loss": val_loss,
        }  # fmt: skip
        if rng is not None:
            state.update(optimizer=self.stepper.optimizer_state(),
                         scheduler=self.stepper.scheduler_state(),
                         scaler=self.stepper.scaler.state_dict(), rng=rng,
                         world_size=self.dist.world_size)  # fmt: skip
        return state

    def save(self, it: int, val_loss: float | None) -> Path:
        """Every rank hands its RNG and data position to rank 0, which writes the resumable checkpoint."""
        local = {"torch": torch.get_rng_state(), "sampler": self.sampler.state()}
        ranks = [local]
        if self.dist.enabled:
            ranks = [None] * self.dist.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(ranks, local)
        if self.dist.is_master:
            rng = {**checkpoint.rng_state(), "sampler": self.sampler.state(), "ranks": ranks}
            checkpoint.save(self.ckpt_path, self.checkpoint_state(it, val_loss, rng))
        return self.ckpt_path

    def evaluate(self, it: int, write: bool) -> EvalOutcome:
        """Rank 0 evaluates and samples (the other ranks wait at the next collective); all ranks save."""
        losses, text = {"train": math.nan, "val": math.nan}, ""
        if self.dist.is_master:
            cfg = self.cfg
            self.fixed_batches.update(self.fixed_batches or eval_batches(self.ds, cfg, self.device))
            losses = evaluate(self.raw_model, self.ds, cfg, self.device, self.dtype, self.fixed_batches)
            text = sample_text(self.raw_model, self.tok, self.device, cfg.sample_tokens, cfg.seed + it)
        improved = losses["val"] < self.best_val
        self.best_val = min(self.best_val, losses["val"])
        path = self.save(it, losses["val"]) if write else None
        if write and improved and self.dist.is_master:  # the model to export: lowest val loss so far
            best = self.checkpoint_state(it, losses["val"], rng=None)
            checkpoint.save(self.run_dir / checkpoint.BEST_NAME, best)
        return EvalOutcome(it, losses["train"], losses["val"], text, path)

    def step_events(self, it: int, loss: float, tokens_per_s: float, mfu: float | None, eta_s: float,
                    elapsed_s: float, recorder: runs.RunRecorder) -> Events:  # fmt: skip
        lr = self.stepper.scheduler.get_last_lr()[0]
        recorder.row({"kind": "train", "step": it, "loss": loss, "lr": lr,
                      "tokens_per_s": round(tokens_per_s, 1), "mfu": mfu})  # fmt: skip
        metrics = {"loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "eta_s": eta_s,
                   "elapsed_s": elapsed_s}  # fmt: skip
        yield Progress("train", it, self.cfg.max_iters, "steps",
                       metrics=metrics if mfu is None else {**metrics, "mfu": mfu})  # fmt: skip

    def eval_events(self, ev: EvalOutcome, recorder: runs.RunRecorder) -> Events:
        if not self.dist.is_master:
            return
        recorder.eval_row({"step": ev.step, "train_loss": ev.train_loss, "val_loss": ev.val_loss}, "val_loss")
        yield Progress("eval", ev.step, self.cfg.max_iters, "steps", detail=str(ev.checkpoint or ""),
                       metrics={"train_loss": ev.train_loss, "val_loss": ev.val_loss})  # fmt: skip
        if ev.sample:
            yield Notice(ev.sample.rstrip() + "\n---")

    def start_events(self) -> Events:
        """The start line, a note on dropped characters, and the estimate (as the first Progress)."""
        n = self.dist.world_size
        verb = f"resuming at step {self.start_iter}" if self.start_iter else "training"
        threads = f", {self.threads} CPU thread{'s' if self.threads != 1 else ''}" if self.threads else ""
        yield Notice(f"{verb} in {self.run_dir} on {self.device} ({str(self.dtype).removeprefix('torch.')}, "
                     f"{n} process{'es' if n > 1 else ''}); data {self.ds.n_tokens:,} tokens, "
                     f"{self.tok.kind} vocabulary {self.tok.vocab_size:,}{threads}")  # fmt: skip
        if self.unseen is not None and self.unseen.total:
            yield Notice(f"note: {self.unseen.describe('the data')}", "warning")
        yield Progress("train", self.start_iter, self.cfg.max_iters, "steps", detail=self.est.device,
                       metrics=estimate.estimate_metrics(self.est, self.cfg))  # fmt: skip

    def record_info(self) -> dict[str, Any]:
        """What run.json says about this run."""
        return {"device": str(self.device), "device_name": device_name(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "world_size": self.dist.world_size,
                "threads": self.threads, "config": self.cfg.model_dump(mode="json"),
                "tokens": self.ds.n_tokens, "tokenizer": self.tok.kind, "vocab_size": self.tok.vocab_size,
                "params": self.est.n_params, "max_steps": self.cfg.max_iters}  # fmt: skip
