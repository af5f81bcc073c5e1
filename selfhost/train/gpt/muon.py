"""Muon with the Newton-Schulz orthogonalization batched over matrices of the same shape.

torch.optim.Muon orthogonalizes one matrix at a time: at the cpu-tiny size (28 small matrices, 5 iterations of
3 matmuls each) that is ~400 tiny matmuls a step, bound by per-call overhead. Here the matrices that share a
shape (q/k/v/o of every layer; gate/up/down of every layer, transposed to one orientation) go through the same
iterations as one batched matmul. The math is torch.optim.Muon's (same momentum, Nesterov, bf16 iterations,
coefficients, learning-rate adjustment and decoupled weight decay) and so is the state (`momentum_buffer` per
parameter): checkpoints load in either class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

Matrix = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # parameter, gradient, momentum buffer


def orthogonalize(updates: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:  # fmt: skip
    """Newton-Schulz iterations on a batch of wide (rows <= columns) matrices, in bf16, as torch's Muon."""
    a, b, c = coefficients
    x = updates.bfloat16()
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x


class BatchedMuon(torch.optim.Muon):
    """torch.optim.Muon, one batched orthogonalization per matrix shape (see the module docstring)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                params.append(param)
                grads.append(param.grad)
                buffers.append(state["momentum_buffer"])
            for same_shape in _by_shape(params, grads, buffers).values():
                self._update(group, same_shape)
        return loss

    def _update(self, group: dict[str, Any], matrices: list[Matrix]) -> None:
        momentum, lr, decay = group["momentum"], float(group["lr"]), group["weight_decay"]
        updates = []
        for param, grad, buf in matrices:
            buf.lerp_(grad, 1 - momentum)
            update = grad.lerp(buf, momentum) if group["nesterov"] else buf
            updates.append(update.mT if param.size(0) > param.size(1) else update)
        ortho = orthogonalize(torch.stack(updates), group["ns_coefficients"], group["ns_steps"], group["eps"])
        for (param, _, _), update in zip(matrices, ortho, strict=True):
            update = update.mT if param.size(0) > param.size(1) else update
            param.mul_(1 - lr * decay)
            param.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], param.shape))


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-shape learning rate: Keller Jordan's sqrt(max(1, rows/cols)) ("original", the
    default) or Moonshot's 0.2 sqrt(max(rows, cols)) ("match_rms_adamw")."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def _by_shape(params: list[torch.Tensor], grads: list[torch.Tensor],
              buffers: list[torch.Tensor]) -> dict[tuple[Any, ...], list[Matrix]]:  # fmt: skip
    """Matrices grouped by their wide shape (a tall matrix is orthogonalized transposed), dtype and device."""
    groups: dict[tuple[Any, ...], list[Matrix]] = {}
    for param, grad, buf in zip(params, grads, buffers, strict=True):
        rows, cols = sorted(param.shape)
        groups.setdefault((rows, cols, param.dtype, param.device), []).append((param, grad, buf))
    return groups
