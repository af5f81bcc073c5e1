"""The training loop. `train(request)` yields typed events; the CLI renders them.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfhost import atomic
from selfhost.errors import IntegrityError, UsageError
from selfhost.train.gpt import checkpoint, data, estimate, tokenizer
from selfhost.train.gpt.config import TrainConfig, validate_config
from selfhost.train.gpt.model import GPT, GPTConfig

EVAL_SEED_OFFSET = 7919  # eval batches come from their own RNG: evals never move the training RNG
# Settings a resumed run may change; everything else comes from the checkpoint.
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "log_interval", "sample_tokens", "device", "dtype",
             "compile", "threads"}  # fmt: skip


# -- events -----------------------------------------------------------------------------------
@dataclass
class RunStart:
    run_dir: Path
    device: str
    dtype: str
    world_size: int
    estimate: estimate.Estimate
    start_iter: int
    n_tokens: int
    vocab_size: int
    tokenizer: str
    config: TrainConfig
    threads: int | None = None  # CPU threads of each process (None: left to PyTorch, e.g. on a GPU)
    unseen: tokenizer.Unseen | None = None  # characters the saved tokenizer dropped when rebuilding data


@dataclass
class StepEvent:
    step: int  # optimizer steps completed
    max_iters: int
    loss: float
    lr: float
    tokens_per_s: float
    mfu: float | None
    eta_s: float
    elapsed_s: float


@dataclass
class EvalEvent:
    step: int
    train_loss: float
    val_loss: float
    sample: str
    checkpoint: Path | None


@dataclass
class Interrupted:
    step: int
    checkpoint: Path


@dataclass
class Done:
    step: int
    train_loss: float
    val_loss: float
    checkpoint: Path  # the last state (resume from it)
    elapsed_s: float
    best: Path | None = None  # weights with the lowest val loss (export this one)
    best_val_loss: float | None = None


Event = RunStart | StepEvent | EvalEvent | Interrupted | Done


@dataclass
class TrainRequest:
    config: TrainConfig
    run_dir: Path
    data: Path | None = None
    resume: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # flags given explicitly (for resume)
    handle_sigint: bool = True


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


def resolve_device(name: str, dist: Dist | None = None) -> torch.device:
    mps = getattr(torch.backends, "mps", None)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps and mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is available to PyTorch", hint="use --device cpu")
        return torch.device("cuda", dist.local_rank if dist else 0)
    if name == "mps" and not (mps and mps.is_available()):
        raise UsageError("--device mps: Metal is not available to PyTorch", hint="use --device cpu")
    return torch.device(name)


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy_cores() -> float:
    """Cores other programs keep busy now: on Linux the median of a few samples of the runnable tasks in
    /proc/loadavg (not the 1-minute average, which still counts a run that just ended), else the load."""
    try:
        samples = []
        for _ in range(5):
            with open("/proc/loadavg") as fh:
                samples.append(int(fh.read().split()[3].split("/")[0]) - 1)  # minus this process
            time.sleep(0.02)
        return float(max(0, sorted(samples)[2]))
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def resolve_threads(requested: int, device: torch.device, dist: Dist | None = None) -> int | None:
    """Set and return the CPU threads of this process; None: PyTorch's choice is kept (a GPU run, or
    OMP_NUM_THREADS given, as torchrun does). Auto (0) counts the cores other programs leave free: on a
    busy machine two OpenMP threads spin in barriers while their partner waits for a core, and a step
    took 5x longer than with one thread (bench/train_gpt.py --before measures a whole run)."""
    if requested == 0 and (device.type != "cpu" or "OMP_NUM_THREADS" in os.environ):
        return None
    n = requested
    if n == 0:
        share = max(1, cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size if dist else 1)))
        n = max(1, min(share, round(cpu_cores() - busy_cores())))
    torch.set_num_threads(n)
    return n


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype != torch.float32 and device.type != "cuda":
        raise UsageError(f"--dtype {name} needs a CUDA GPU", hint="use --dtype float32 on CPU/MPS")
    return dtype


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type.upper()


# -- building blocks ----------------------------------------------------------------------------
def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of cfg.learning_rate at step `it`: linear warm-up, then cosine decay to min_lr."""

    def factor(it: int) -> float:
        if it < cfg.warmup_iters:
            return (it + 1) / (cfg.warmup_iters + 1)
        if not cfg.decay_lr:
            return 1.0
        if it > cfg.decay_iters:
            return cfg.min_lr / cfg.learning_rate
        span = max(1, cfg.decay_iters - cfg.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * (it - cfg.warmup_iters) / span))
        return (cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)) / cfg.learning_rate

    return factor


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings only; the fused kernel on CUDA and on the CPU (one
    kernel per tensor instead of ~10 small ops: the cpu-tiny preset's AdamW + clipping 6.5 -> 3.0 ms/step)."""
    params = [p for p in model.parameters() if p.requires_grad]
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
        self.optimizer = make_optimizer(raw, cfg, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg))
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
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total


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
def evaluate(model: GPT, ds: data.Dataset, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
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
def sample_text(model: GPT, tok: tokenizer.Tokenizer, device: torch.device, n_tokens: int, seed: int,
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
    return validate_config(values)


def _restore(ckpt: dict[str, Any], path: Path, raw_model: Any, stepper: Any, sampler: Any,
             dist: Dist) -> tuple[int, float]:  # fmt: skip
    """Put a checkpoint's state back (checked by checkpoint.load; what torch still refuses is
    reported as a damaged checkpoint, not an internal error). Returns (step, best val loss)."""
    try:
        raw_model.load_state_dict(ckpt["model"])
        stepper.optimizer.load_state_dict(ckpt["optimizer"])
        stepper.scheduler.load_state_dict(ckpt["scheduler"])
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
        model = GPT(gpt_config(pcfg, vocab_size)).to(device)
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
                     n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)  # fmt: skip


def estimate_run(req: TrainRequest) -> estimate.Estimate:
    """`--estimate`: everything the start-of-run line says, without training or writing anything."""
    import tempfile

    cfg = req.config
    with tempfile.TemporaryDirectory(prefix="selfhost-estimate-") as tmp:
        tok, ds = prepare_data(req, cfg, Path(tmp))
        n_train = len(ds.train)
        del ds
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    resolve_threads(cfg.threads, device)
    rate = probe(cfg, tok.vocab_size, device, dtype)
    return estimate.make_estimate(cfg, tok.vocab_size, n_train, device=str(device), tokens_per_s=rate,
                                  device_name=device_name(device))  # fmt: skip


def train(req: TrainRequest) -> Iterator[Event]:
    """Run (or resume) training; yield events on the master process only."""
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


def _run(req: TrainRequest, dist: Dist) -> Iterator[Event]:
    run_dir = Path(req.run_dir)
    ckpt_path = run_dir / checkpoint.CKPT_NAME
    ckpt: dict[str, Any] | None = None
    unseen: tokenizer.Unseen | None = None
    if req.resume:
        ckpt = checkpoint.load(ckpt_path, resume=True)
        cfg = resume_config(ckpt["config"], req.overrides)
        tok = tokenizer.from_json(ckpt["tokenizer"])
        ds = data.Dataset.load(run_dir)
        if ds is None:  # arrays deleted: rebuild them from the data with the saved tokenizer
            if req.data is None:
                raise UsageError(f"{run_dir} has no token arrays", hint="pass --data again to rebuild them")
            ds = data.build_dataset(req.data, tok, cfg.val_fraction, run_dir)
            unseen = ds.unseen
    else:
        cfg = req.config
        if ckpt_path.exists():
            raise UsageError(
                f"{run_dir} already holds a training run",
                hint="continue it with --resume, or pick another --name / --out",
            )
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
    ds.check_fits(cfg.block_size)

    device = resolve_device(cfg.device, dist)
    dtype = resolve_dtype(cfg.dtype, device)
    threads = resolve_threads(cfg.threads, device, dist)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed + dist.rank)

    model_args = gpt_config(cfg, tok.vocab_size)
    raw_model = GPT(model_args).to(device)
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

    start_iter, best_val = 0, float("inf")
    if ckpt is not None:
        start_iter, best_val = _restore(ckpt, ckpt_path, raw_model, stepper, sampler, dist)

    def save(it: int, val_loss: float | None) -> Path:
        local = {"torch": torch.get_rng_state(), "sampler": sampler.state()}
        ranks = [local]
        if dist.enabled:
            ranks = [None] * dist.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(ranks, local)
        if dist.is_master:
            rng = {**checkpoint.rng_state(), "sampler": sampler.state(), "ranks": ranks}
            checkpoint.save(ckpt_path, {
                "model_args": model_args.to_dict(), "config": cfg.model_dump(mode="json"),
                "tokenizer": tok.to_json(), "model": raw_model.state_dict(),
                "optimizer": stepper.optimizer.state_dict(), "scheduler": stepper.scheduler.state_dict(),
                "scaler": stepper.scaler.state_dict(), "rng": rng, "iter_num": it,
                "best_val_loss": best_val, "val_loss": val_loss, "world_size": dist.world_size,
            })  # fmt: skip
        return ckpt_path

    fixed_batches: dict[str, list[Batch]] = {}

    def do_eval(it: int, write: bool) -> EvalEvent:
        """Rank 0 evaluates and samples (the other ranks wait at the next collective); all ranks save."""
        nonlocal best_val
        losses, text = {"train": math.nan, "val": math.nan}, ""
        if dist.is_master:
            fixed_batches.update(fixed_batches or eval_batches(ds, cfg, device))
            losses = evaluate(raw_model, ds, cfg, device, dtype, fixed_batches)
            text = sample_text(raw_model, tok, device, cfg.sample_tokens, cfg.seed + it)
        improved = losses["val"] < best_val
        best_val = min(best_val, losses["val"])
        path = save(it, losses["val"]) if write else None
        if write and improved and dist.is_master:  # the model to export: lowest val loss so far
            checkpoint.save(run_dir / checkpoint.BEST_NAME, {
                "model_args": model_args.to_dict(), "config": cfg.model_dump(mode="json"),
                "tokenizer": tok.to_json(), "model": raw_model.state_dict(), "iter_num": it,
                "best_val_loss": best_val, "val_loss": losses["val"],
            })  # fmt: skip
        return EvalEvent(it, losses["train"], losses["val"], text, path)

    if dist.is_master:
        yield RunStart(run_dir, str(device), str(dtype).removeprefix("torch."), dist.world_size, est,
                       start_iter, ds.n_tokens, tok.vocab_size, tok.kind, cfg, threads, unseen)  # fmt: skip

    stop = _StopFlag()
    if req.handle_sigint:
        stop.install()
    try:
        t_start = time.perf_counter()
        t_last, it_last, steps_timed, time_steps = t_start, start_iter, 0, 0.0
        it = start_iter
        last_eval: EvalEvent | None = None
        per_process_tokens = cfg.tokens_per_iter
        while it < cfg.max_iters:
            resumed_after_eval = ckpt is not None and it == start_iter and ckpt.get("val_loss") is not None
            if it % cfg.eval_interval == 0 and not resumed_after_eval:
                last_eval = do_eval(it, write=it > start_iter)
                if dist.is_master:
                    yield last_eval
                t_last, it_last = time.perf_counter(), it  # evals don't count as step time
            loss = stepper.step()
            it += 1
            if it % cfg.log_interval == 0 or it == start_iter + 1 or it == cfg.max_iters:
                loss_value = float(loss.item())  # syncs the device
                now = time.perf_counter()
                dt = (now - t_last) / max(1, it - it_last)
                steps_timed, time_steps = steps_timed + (it - it_last), time_steps + (now - t_last)
                t_last, it_last = now, it
                tok_s = per_process_tokens / dt if dt > 0 else 0.0
                mfu = est.flops_per_token * tok_s / est.peak_flops if est.peak_flops else None
                eta = (cfg.max_iters - it) * time_steps / max(1, steps_timed)
                if dist.is_master:
                    yield StepEvent(it, cfg.max_iters, loss_value, stepper.scheduler.get_last_lr()[0],
                                    tok_s * dist.world_size, mfu, eta, now - t_start)  # fmt: skip
            if _stop_requested(stop, dist, device):
                path = save(it, None)
                if dist.is_master:
                    yield Interrupted(it, path)
                raise KeyboardInterrupt
        if last_eval is None or last_eval.step != it or last_eval.checkpoint is None:
            last_eval = do_eval(it, write=True)
            if dist.is_master:
                yield last_eval
        if dist.is_master:
            assert last_eval.checkpoint is not None
            best = run_dir / checkpoint.BEST_NAME
            yield Done(it, last_eval.train_loss, last_eval.val_loss, last_eval.checkpoint,
                       time.perf_counter() - t_start, best if best.exists() else None, best_val)  # fmt: skip
    finally:
        stop.restore()


def _stop_requested(stop: _StopFlag, dist: Dist, device: torch.device) -> bool:
    if not dist.enabled:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def load_model(ckpt: dict[str, Any], device: torch.device) -> GPT:
    """A checkpoint's model in eval mode."""
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
