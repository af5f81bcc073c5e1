"""What a run will cost before it starts: parameters, FLOPs, tokens, measured throughput, ETA.

FLOPs per token follow the PaLM/nanoGPT accounting: 6N for the weights' forward + backward plus
12 * n_layer * n_embd * block_size for attention. Compute-optimal data is ~20 tokens per parameter
(Chinchilla).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from selfhost.train.gpt.config import TrainConfig

TOKENS_PER_PARAM = 20
# Dense peak FLOP/s per GPU for bf16/fp16 tensor cores (fp32: / ~15 or TF32 ~ / 2). Used for MFU.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
    "L40": 181e12, "L4": 121e12, "A10": 125e12, "A6000": 155e12, "4090": 165e12, "4080": 97e12,
    "3090": 71e12, "V100": 125e12, "T4": 65e12,
}  # fmt: skip


def flops_per_token(n_params: int, n_layer: int, n_embd: int, block_size: int) -> int:
    return 6 * n_params + 12 * n_layer * n_embd * block_size


def count_params(cfg: TrainConfig, vocab_size: int) -> tuple[int, int]:
    """(non-embedding-position params N, total) without building the model. Output tied to wte."""
    c = cfg.n_embd
    per_block = 2 * 2 * c + (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)
    n = vocab_size * c + cfg.n_layer * per_block + 2 * c
    return n, n + cfg.block_size * c


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_FLOPS.items():
        if key in device_name.upper():
            return value
    return None


@dataclass
class Estimate:
    n_params: int  # N, without position embeddings (nanoGPT's count)
    n_params_total: int
    flops_per_token: int
    tokens_per_iter: int  # all processes together
    iters: int
    train_tokens: int  # size of the train split
    device: str
    tokens_per_s: float | None  # measured by the probe (all processes together)
    eta_s: float | None
    peak_flops: float | None  # per device, when known

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_iter * self.iters

    @property
    def epochs(self) -> float:
        return self.total_tokens / max(1, self.train_tokens)

    @property
    def compute_optimal_tokens(self) -> int:
        return TOKENS_PER_PARAM * self.n_params

    @property
    def total_flops(self) -> float:
        return float(self.flops_per_token) * self.total_tokens


def make_estimate(
    cfg: TrainConfig,
    vocab_size: int,
    train_tokens: int,
    *,
    device: str,
    world_size: int = 1,
    tokens_per_s: float | None = None,
    device_name: str | None = None,
) -> Estimate:
    n, total = count_params(cfg, vocab_size)
    per_iter = cfg.tokens_per_iter * world_size
    eta = None
    if tokens_per_s:
        n_evals = cfg.max_iters // cfg.eval_interval + 1
        eval_tokens = n_evals * 2 * cfg.eval_iters * cfg.batch_size * cfg.block_size
        # a forward pass costs about a third of forward + backward
        eta = (cfg.max_iters * per_iter + eval_tokens * world_size / 3) / tokens_per_s
    return Estimate(
        n_params=n, n_params_total=total,
        flops_per_token=flops_per_token(n, cfg.n_layer, cfg.n_embd, cfg.block_size),
        tokens_per_iter=per_iter, iters=cfg.max_iters, train_tokens=train_tokens, device=device,
        tokens_per_s=tokens_per_s, eta_s=eta, peak_flops=peak_flops(device_name),
    )  # fmt: skip


def probe_throughput(step: Any, tokens_per_call: int, device: Any, calls: int = 2, warmup: int = 1) -> float:
    """Tokens/s of `step()` (one full training step) on `device`, after `warmup` untimed calls."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    sync()
    return tokens_per_call * calls / max(time.perf_counter() - t0, 1e-9)


def estimate_metrics(est: Estimate, cfg: TrainConfig) -> dict[str, float]:
    """The estimate's numbers and the model's shape, for the start Progress (the CLI prints them)."""
    numbers = {k: v for k, v in vars(est).items() if isinstance(v, int | float)}
    derived = {"total_tokens": est.total_tokens, "epochs": est.epochs, "total_flops": est.total_flops,
               "compute_optimal_tokens": est.compute_optimal_tokens}  # fmt: skip
    shape = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}
    return {**numbers, **derived, **shape}
