"""The training loop. `train(request)` yields selfhost.events (Notice, Progress of the tasks "train"
and "eval", one Result: a TrainResult); the CLI renders them. The run records its own metrics
(selfhost.train.runs.RunRecorder: metrics.jsonl, run.json, TensorBoard) as it goes.

Device auto (cuda > mps > cpu); bf16/fp16 autocast + TF32 on CUDA; fused AdamW where available;
cosine schedule with warm-up (a LambdaLR); gradient clipping and accumulation; optional
torch.compile; DDP when started by torchrun (RANK/WORLD_SIZE set: gloo on CPU, nccl on CUDA).
An eval (train/val loss on fixed batches + a text sample) and an atomic checkpoint happen every
`eval_interval` steps; Ctrl-C finishes the current step, checkpoints, then raises KeyboardInterrupt.
`resume` continues exactly: same model, optimizer, scheduler, RNG states and data position.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfhost import atomic
from selfhost.errors import IntegrityError, UsageError
from selfhost.events import Event, Events, Notice, Progress, Result
from selfhost.train import runs
from selfhost.train.common import device_name, pick_device, resolve_threads
from selfhost.train.gpt import checkpoint, data, estimate, tokenizer
from selfhost.train.gpt.config import TrainConfig
from selfhost.train.gpt.model import CausalLM, GPTConfig, build_model

EVAL_SEED_OFFSET = 7919  # eval batches come from their own RNG: evals never move the training RNG
# Settings a resumed run may change; everything else comes from the checkpoint.
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "log_interval", "sample_tokens", "device", "dtype",
             "compile", "threads"}  # fmt: skip


# -- request and result -----------------------------------------------------------------------
@dataclass
class TrainRequest:
    config: TrainConfig
    run_dir: Path
    data: Path | None = None
    resume: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # flags given explicitly (for resume)
    handle_sigint: bool = True
    tensorboard: bool = False  # also write TensorBoard event files (run/tensorboard)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float
    val_loss: float
    checkpoint: Path  # the last state (resume from it)
    elapsed_s: float
    best: Path | None = None  # weights with the lowest val loss (export this one)
    best_val_loss: float | None = None
    is_master: bool = True  # False on the other ranks of a DDP run (rank 0 evaluates and reports)


@dataclass
class EvalOutcome:
    step: int
    train_loss: float
    val_loss: float
    sample: str
    checkpoint: Path | None


# -- devices and processes ----------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    return Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype != torch.float32 and device.type != "cuda":
        raise UsageError(f"--dtype {name} needs a CUDA GPU", hint="use --dtype float32 on CPU/MPS")
    return dtype


# -- building blocks ----------------------------------------------------------------------------
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


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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


Batch = tuple[torch.Tensor, torch.Tensor]


def to_device(x: np.ndarray, y: np.ndarray, device: torch.device) -> Batch:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if device.type == "cuda":
        return xt.pin_memory().to(device, non_blocking=True), yt.pin_memory().to(device, non_blocking=True)
    return xt.to(device), yt.to(device)


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


# -- data for a run -----------------------------------------------------------------------------
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


def resume_config(saved: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    values = dict(saved)
    for key, value in overrides.items():
        if value is None:
            continue
        if key in RESUMABLE:
            values[key] = value
        elif key == "block_size" and value > saved["block_size"]:
            raise UsageError(
                f"block size {value} is larger than the model's context of {saved['block_size']}",
                hint="a resumed run keeps its model; train a new one for a longer context",
            )
        elif value != saved.get(key):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {value} differs from the checkpoint's {saved.get(key)}",
                             hint="a resumed run keeps its model, data and optimiser settings")  # fmt: skip
    return TrainConfig.validated(values)


def _restore(ckpt: dict[str, Any], path: Path, raw_model: Any, stepper: Any, sampler: Any,
             dist: Dist) -> tuple[int, float]:  # fmt: skip
    """Put a checkpoint's state back (checked by checkpoint.load; what torch still refuses is
    reported as a damaged checkpoint, not an internal error). Returns (step, best val loss)."""
    try:
        raw_model.load_state_dict(ckpt["model"])
        stepper.load_optimizer_state(ckpt["optimizer"])
        stepper.load_scheduler_state(ckpt["scheduler"])
        if ckpt.get("scaler"):
            stepper.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"]
        checkpoint.set_rng_state(rng)
        ranks = rng.get("ranks", [])
        mine = ranks[dist.rank] if dist.rank < len(ranks) else None
        if mine is not None:
            torch.set_rng_state(mine["torch"])
            sampler.set_state(mine["sampler"])
        elif dist.rank == 0:
            sampler.set_state(rng["sampler"])
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise IntegrityError(f"checkpoint {path} is damaged: {type(exc).__name__}: {str(exc)[:200]}",
                             hint="resume from an earlier run or train again") from None  # fmt: skip
    return int(ckpt["iter_num"]), float(ckpt["best_val_loss"])


def save_run_files(run_dir: Path, tok: tokenizer.Tokenizer, cfg: TrainConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tok.save(run_dir / "tokenizer.json")
    atomic.write_text(run_dir / "config.json", cfg.model_dump_json(indent=2))


# -- the run ------------------------------------------------------------------------------------
class _StopFlag:
    """First Ctrl-C asks for a clean stop after the current step; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


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


def estimate_run(req: TrainRequest) -> estimate.Estimate:
    """`--estimate`: everything the start-of-run line says, without training or writing anything."""
    import tempfile

    cfg = req.config
    with tempfile.TemporaryDirectory(prefix="selfhost-estimate-") as tmp:
        tok, ds = prepare_data(req, cfg, Path(tmp))
        n_train = len(ds.train)
        del ds
    device = pick_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    resolve_threads(cfg.threads, device)
    rate = probe(cfg, tok.vocab_size, device, dtype)
    return estimate.make_estimate(cfg, tok.vocab_size, n_train, device=str(device), tokens_per_s=rate,
                                  device_name=device_name(device))  # fmt: skip


def train(req: TrainRequest) -> Events:
    """Run (or resume) training. Notices and Progress come from the master process only; every
    process ends with its Result."""
    if req.tensorboard:
        runs.require_tensorboard()  # fail before anything is written
    dist = dist_from_env()
    if dist.enabled:
        import torch.distributed as tdist

        backend = "nccl" if torch.cuda.is_available() and req.config.device in ("auto", "cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(dist.local_rank)
        tdist.init_process_group(backend=backend)
    try:
        yield from _run(req, dist)
    finally:
        if dist.enabled:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


def _run(req: TrainRequest, dist: Dist) -> Events:
    run = setup(req, dist)
    start = run.start_iter
    recorder = runs.RunRecorder(run.run_dir, "gpt", run.record_info(), start_step=start,
                                keep=lambda row: row.get("step", 0) <= start, tensorboard=req.tensorboard,
                                data=req.data, enabled=dist.is_master)  # fmt: skip
    if dist.is_master:
        yield from run.start_events()
    stop = _StopFlag()
    if req.handle_sigint:
        stop.install()
    try:
        with runs.recording(recorder):
            result = yield from training_loop(run, recorder, stop)
        yield Result(result)
    finally:
        stop.restore()


def training_loop(
    run: Run, recorder: runs.RunRecorder, stop: _StopFlag
) -> Generator[Event, None, TrainResult]:
    """nanoGPT's loop: eval + checkpoint every eval_interval steps, one optimizer step, a log line
    every log_interval steps (the only host sync), a clean stop on Ctrl-C; a final eval at the end."""
    cfg, dist = run.cfg, run.dist
    t_start = time.perf_counter()
    t_last, it_last, steps_timed, time_steps = t_start, run.start_iter, 0, 0.0
    it = run.start_iter
    last_eval: EvalOutcome | None = None
    per_process_tokens = cfg.tokens_per_iter
    while it < cfg.max_iters:
        resumed_after_eval = run.resumed_after_eval and it == run.start_iter
        if it % cfg.eval_interval == 0 and not resumed_after_eval:
            last_eval = run.evaluate(it, write=it > run.start_iter)
            yield from run.eval_events(last_eval, recorder)
            t_last, it_last = time.perf_counter(), it  # evals don't count as step time
        loss = run.stepper.step()
        it += 1
        if it % cfg.log_interval == 0 or it == run.start_iter + 1 or it == cfg.max_iters:
            loss_value = float(loss.item())  # syncs the device
            now = time.perf_counter()
            dt = (now - t_last) / max(1, it - it_last)
            steps_timed, time_steps = steps_timed + (it - it_last), time_steps + (now - t_last)
            t_last, it_last = now, it
            tok_s = per_process_tokens / dt if dt > 0 else 0.0
            mfu = run.est.flops_per_token * tok_s / run.est.peak_flops if run.est.peak_flops else None
            eta = (cfg.max_iters - it) * time_steps / max(1, steps_timed)
            if dist.is_master:
                yield from run.step_events(it, loss_value, tok_s * dist.world_size, mfu, eta, now - t_start,
                                           recorder)  # fmt: skip
        if _stop_requested(stop, dist, run.device):
            path = run.save(it, None)
            if dist.is_master:
                recorder.end("interrupted")
                yield Notice(f"stopped at step {it}; checkpoint {path} (continue with --resume)")
            raise KeyboardInterrupt
    if last_eval is None or last_eval.step != it or last_eval.checkpoint is None:
        last_eval = run.evaluate(it, write=True)
        yield from run.eval_events(last_eval, recorder)
    assert last_eval.checkpoint is not None
    best = run.run_dir / checkpoint.BEST_NAME
    return TrainResult(run.run_dir, it, last_eval.train_loss, last_eval.val_loss, last_eval.checkpoint,
                       time.perf_counter() - t_start, best if best.exists() else None, run.best_val,
                       dist.is_master)  # fmt: skip


# -- setting a run up -----------------------------------------------------------------------------
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
        run.start_iter, run.best_val = _restore(ckpt, run.ckpt_path, raw_model, stepper, sampler, dist)
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
                       metrics=estimate_metrics(self.est, self.cfg))  # fmt: skip

    def record_info(self) -> dict[str, Any]:
        """What run.json says about this run."""
        return {"device": str(self.device), "device_name": device_name(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "world_size": self.dist.world_size,
                "threads": self.threads, "config": self.cfg.model_dump(mode="json"),
                "tokens": self.ds.n_tokens, "tokenizer": self.tok.kind, "vocab_size": self.tok.vocab_size,
                "params": self.est.n_params, "max_steps": self.cfg.max_iters}  # fmt: skip


def estimate_metrics(est: estimate.Estimate, cfg: TrainConfig) -> dict[str, float]:
    """The estimate's numbers and the model's shape, for the start Progress (the CLI prints them)."""
    numbers = {k: v for k, v in vars(est).items() if isinstance(v, int | float)}
    derived = {"total_tokens": est.total_tokens, "epochs": est.epochs, "total_flops": est.total_flops,
               "compute_optimal_tokens": est.compute_optimal_tokens}  # fmt: skip
    shape = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}
    return {**numbers, **derived, **shape}


def _stop_requested(stop: _StopFlag, dist: Dist, device: torch.device) -> bool:
    if not dist.enabled:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def load_model(ckpt: dict[str, Any], device: torch.device) -> CausalLM:
    """A checkpoint's model in eval mode."""
    model = build_model(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
