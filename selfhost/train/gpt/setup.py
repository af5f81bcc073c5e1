"""Setting a run up: the data and tokenizer (new, or the checkpoint's), the device, the model, the
optimizer, the measured speed and estimate, and the state a resumed run puts back."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfhost import atomic
from selfhost.errors import UsageError
from selfhost.train.common import device_name, pick_device, resolve_threads
from selfhost.train.gpt import checkpoint, data, estimate, tokenizer
from selfhost.train.gpt.config import TrainConfig
from selfhost.train.gpt.devices import Dist, resolve_dtype, to_device
from selfhost.train.gpt.model import GPTConfig, build_model
from selfhost.train.gpt.optim import Stepper
from selfhost.train.gpt.resume import restore, resume_config
from selfhost.train.gpt.run import Run


@dataclass
class TrainRequest:
    config: TrainConfig
    run_dir: Path
    data: Path | None = None
    resume: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # flags given explicitly (for resume)
    handle_sigint: bool = True
    tensorboard: bool = False  # also write TensorBoard event files (run/tensorboard)


def setup(req: TrainRequest, dist: Dist) -> Run:
    """Data and tokenizer (new, or the checkpoint's), device, model, optimizer, estimate, restored state."""
    cfg, tok, ds, ckpt, unseen = load_or_prepare(req, dist)
    ds.check_fits(cfg.block_size)

    device = pick_device(cfg.device, dist.local_rank)
    dtype = resolve_dtype(cfg.dtype, device)
    threads = resolve_threads(cfg.threads, device, dist.world_size)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed + dist.rank)

    model_args = gpt_config(cfg, tok.vocab_size)
    raw_model = build_model(model_args).to(device)
    sampler = data.BatchSampler(ds.train, cfg.block_size, cfg.batch_size, cfg.seed + dist.rank)
    model: torch.nn.Module = torch.compile(raw_model) if cfg.compile else raw_model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.local_rank] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    stepper = Stepper(model, cfg, device, dtype, lambda: to_device(*sampler.next(), device), dist.enabled)

    rate = probe(cfg, tok.vocab_size, device, dtype) * dist.world_size
    est = estimate.make_estimate(cfg, tok.vocab_size, len(ds.train), device=str(device),
                                 world_size=dist.world_size, tokens_per_s=rate,
                                 device_name=device_name(device))  # fmt: skip
    run = Run(cfg, dist, Path(req.run_dir), tok, ds, device, dtype, threads, model_args, raw_model,
              sampler, stepper, est, unseen)  # fmt: skip
    if ckpt is not None:
        run.start_iter, run.best_val = restore(ckpt, run.ckpt_path, raw_model, stepper, sampler, dist)
        run.resumed_after_eval = ckpt.get("val_loss") is not None
    return run


def load_or_prepare(
    req: TrainRequest, dist: Dist
) -> tuple[TrainConfig, tokenizer.Tokenizer, data.Dataset, dict[str, Any] | None, tokenizer.Unseen | None]:
    """A resumed run: its checkpoint, settings, tokenizer and token arrays (rebuilt from --data if
    deleted). A new run: rank 0 trains the tokenizer and tokenizes the data; the others read them."""
    run_dir = Path(req.run_dir)
    ckpt_path = run_dir / checkpoint.CKPT_NAME
    if req.resume:
        ckpt = checkpoint.load(ckpt_path, resume=True)
        cfg = resume_config(ckpt["config"], req.overrides)
        tok = tokenizer.from_json(ckpt["tokenizer"])
        ds = data.Dataset.load(run_dir)
        if ds is not None:
            return cfg, tok, ds, ckpt, None
        if req.data is None:
            raise UsageError(f"{run_dir} has no token arrays", hint="pass --data again to rebuild them")
        ds = data.build_dataset(req.data, tok, cfg.val_fraction, run_dir)
        return cfg, tok, ds, ckpt, ds.unseen
    cfg = req.config
    if ckpt_path.exists():
        raise UsageError(f"{run_dir} already holds a training run",
                         hint="continue it with --resume, or pick another --name / --out")  # fmt: skip
    failed: BaseException | None = None
    if dist.is_master:  # rank 0 prepares the data; the others read what it saved
        new_dir = not run_dir.exists()
        try:
            tok, ds = prepare_data(req, cfg, run_dir)
            save_run_files(run_dir, tok, cfg)
        except BaseException as exc:  # let the other ranks pass the barrier, then fail
            failed = exc
            if new_dir:  # leave no half-made run behind
                shutil.rmtree(run_dir, ignore_errors=True)
    if dist.enabled:
        torch.distributed.barrier()
    if failed is not None:
        raise failed
    if not dist.is_master:
        loaded = data.Dataset.load(run_dir)
        if loaded is None or not (run_dir / "tokenizer.json").is_file():
            raise UsageError("rank 0 could not prepare the training data")
        tok, ds = tokenizer.load(run_dir / "tokenizer.json"), loaded
    return cfg, tok, ds, None, None


def prepare_data(
    req: TrainRequest, cfg: TrainConfig, out_dir: Path
) -> tuple[tokenizer.Tokenizer, data.Dataset]:
    """Train the tokenizer on the documents, then tokenize them once into out_dir's memory-mapped arrays
    (both passes stream the text: the corpus need not fit in memory)."""
    if req.data is None:
        raise UsageError("no training data given", hint="pass --data FILE_OR_FOLDER")
    data.document_files(req.data)  # a missing path or an empty folder fails before any work
    tok = tokenizer.train_tokenizer(cfg.tokenizer, data.stream_text(req.data), cfg.vocab_size)
    ds = data.build_dataset(req.data, tok, cfg.val_fraction, out_dir)
    ds.check_fits(cfg.block_size)
    return tok, ds


def save_run_files(run_dir: Path, tok: tokenizer.Tokenizer, cfg: TrainConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tok.save(run_dir / "tokenizer.json")
    atomic.write_text(run_dir / "config.json", cfg.model_dump_json(indent=2))


def probe(cfg: TrainConfig, vocab_size: int, device: torch.device, dtype: torch.dtype) -> float:
    """Tokens/s of a training step of this model on this device (a throwaway copy, RNG untouched)."""
    saved = checkpoint.rng_state()
    try:
        micro = cfg.batch_size if device.type == "cuda" else min(cfg.batch_size, 8)
        pcfg = cfg.model_copy(update={"batch_size": micro, "grad_accum": 1})
        model = build_model(gpt_config(pcfg, vocab_size)).to(device)
        gen = np.random.default_rng(0)

        def batch() -> tuple[torch.Tensor, torch.Tensor]:
            x = gen.integers(0, vocab_size, size=(micro, cfg.block_size + 1))
            return to_device(x[:, :-1].copy(), x[:, 1:].copy(), device)

        stepper = Stepper(model, pcfg, device, dtype, batch, ddp=False)
        rate = estimate.probe_throughput(stepper.step, micro * cfg.block_size, device)
        del model, stepper
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return rate
    finally:
        checkpoint.set_rng_state(saved)


def gpt_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, arch=cfg.arch,
                     n_kv_head=cfg.n_kv_head, n_ff=cfg.n_ff, qk_norm=cfg.qk_norm,
                     tie_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta)  # fmt: skip
