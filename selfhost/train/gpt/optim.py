"""The optimizer step: AdamW (or Muon + AdamW), the learning-rate schedule, and `Stepper` (gradient
accumulation, loss scaling, clipping, one step of every optimizer and schedule)."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from selfhost.train.gpt.config import TrainConfig
from selfhost.train.gpt.devices import autocast
from selfhost.train.gpt.model import CausalLM


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of each peak learning rate at step `it`: linear warm-up, then cosine decay to min_lr
    (lr_schedule "cosine"), or stable then a linear decay to min_lr over the last `cooldown` share of
    the steps ("wsd", warm-up/stable/decay: what Muon is tuned with)."""
    floor = cfg.min_lr / cfg.learning_rate

    def factor(it: int) -> float:
        if it < cfg.warmup_iters:
            return (it + 1) / (cfg.warmup_iters + 1)
        if not cfg.decay_lr:
            return 1.0
        if it > cfg.decay_iters:
            return floor
        if cfg.lr_schedule == "wsd":
            left = (cfg.decay_iters - it) / max(1.0, cfg.cooldown * cfg.decay_iters)
            return floor + (1.0 - floor) * min(1.0, left)
        span = max(1, cfg.decay_iters - cfg.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * (it - cfg.warmup_iters) / span))
        return (cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)) / cfg.learning_rate

    return factor


def make_optimizers(model: CausalLM, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW for everything (optimizer "adamw"), or AdamW for the embeddings, head and norms plus Muon
    (torch.optim.Muon: orthogonalized momentum, 2-D tensors only) for the blocks' matrices ("muon")."""
    if cfg.optimizer == "adamw":
        return [make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, device)]
    hidden = [p for name, p in model.named_parameters()
              if p.requires_grad and p.dim() == 2 and name.startswith("blocks.")]  # fmt: skip
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    if not hasattr(torch.optim, "Muon"):
        from selfhost.errors import DependencyError

        raise DependencyError(f"--optimizer muon needs PyTorch 2.9 or newer (this is {torch.__version__})",
                              hint="pip install -U torch, or use --optimizer adamw")  # fmt: skip
    from selfhost.train.gpt.muon import BatchedMuon

    muon = BatchedMuon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=0.0)
    return [make_optimizer(rest, cfg, device), muon]


def make_optimizer(
    params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings only; the fused kernel on CUDA and on the CPU (one
    kernel per tensor instead of ~10 small ops: the cpu-tiny preset's AdamW + clipping 6.5 -> 3.0 ms/step)."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    if fused:
        with contextlib.suppress(RuntimeError):  # a PyTorch without the CPU kernel: the default below
            return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


class Stepper:
    """One optimizer step: grad accumulation, (scaled) backward, clipping, AdamW, schedule."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
                 next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], ddp: bool) -> None:  # fmt: skip
        self.model, self.cfg, self.device, self.dtype = model, cfg, device, dtype
        raw = model.module if ddp else model
        raw = getattr(raw, "_orig_mod", raw)
        self.optimizers = make_optimizers(raw, cfg, device)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor(cfg)) for o in self.optimizers]
        self.scheduler = self.schedulers[0]  # AdamW's: the learning rate the logs show
        self.scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
        self.next_batch, self.ddp = next_batch, ddp

    def step(self) -> torch.Tensor:
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.next_batch()
            last = micro == cfg.grad_accum - 1
            no_sync = self.model.no_sync() if self.ddp and not last else contextlib.nullcontext()
            with no_sync, autocast(self.device, self.dtype):
                _, loss = self.model(x, y)
                loss = loss / cfg.grad_accum
            self.scaler.scale(loss).backward()
            total += loss.detach()
        if cfg.grad_clip > 0:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        for opt, sched in zip(self.optimizers, self.schedulers, strict=True):
            self.scaler.step(opt)
            opt.zero_grad(set_to_none=True)
            sched.step()
        self.scaler.update()
        return total

    def optimizer_state(self) -> dict[str, Any]:
        """One optimizer's state dict as is; several: their list under "parts" (checkpoint layout)."""
        if len(self.optimizers) == 1:
            return self.optimizers[0].state_dict()
        return {"state": {}, "param_groups": [], "parts": [o.state_dict() for o in self.optimizers]}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        parts = state.get("parts", [state])
        if len(parts) != len(self.optimizers):
            raise ValueError(f"{len(parts)} optimizer states for {len(self.optimizers)} optimizers")
        for opt, part in zip(self.optimizers, parts, strict=True):
            opt.load_state_dict(part)

    def scheduler_state(self) -> dict[str, Any]:
        if len(self.schedulers) == 1:
            return self.schedulers[0].state_dict()
        return {"parts": [s.state_dict() for s in self.schedulers]}

    def load_scheduler_state(self, state: dict[str, Any]) -> None:
        parts = state.get("parts", [state])
        if len(parts) != len(self.schedulers):
            raise ValueError(f"{len(parts)} schedule states for {len(self.schedulers)} optimizers")
        for sched, part in zip(self.schedulers, parts, strict=True):
            sched.load_state_dict(part)
