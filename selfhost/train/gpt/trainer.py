"""The training loop, read top-down as nanoGPT's train.py: `train(request)` -> `_run` -> `training_loop`.
It yields selfhost.events (Notice, Progress of the tasks "train" and "eval", one Result: a TrainResult);
the CLI renders them. The run records its own metrics (selfhost.train.runs.RunRecorder: metrics.jsonl,
run.json, TensorBoard) as it goes.

The parts, one job each: `setup` (data, tokenizer, device, model, optimizer, the restored state), `run`
(what a run holds: its evals, checkpoints and events), `optim` (AdamW or Muon + AdamW, the schedule, one
step), `evaluation` (losses on fixed batches, a sample), `resume` (what --resume keeps and puts back),
`devices` (DDP process, dtype, autocast).

Device auto (cuda > mps > cpu); bf16/fp16 autocast + TF32 on CUDA; fused AdamW where available;
cosine schedule with warm-up (a LambdaLR); gradient clipping and accumulation; optional
torch.compile; DDP when started by torchrun (RANK/WORLD_SIZE set: gloo on CPU, nccl on CUDA).
An eval (train/val loss on fixed batches + a text sample) and an atomic checkpoint happen every
`eval_interval` steps; Ctrl-C finishes the current step, checkpoints, then raises KeyboardInterrupt.
`resume` continues exactly: same model, optimizer, scheduler, RNG states and data position.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfhost.events import Event, Events, Notice, Result
from selfhost.train import runs
from selfhost.train.common import device_name, pick_device, resolve_threads
from selfhost.train.gpt import checkpoint, estimate
from selfhost.train.gpt.devices import Dist, dist_from_env, resolve_dtype
from selfhost.train.gpt.evaluation import EvalOutcome
from selfhost.train.gpt.run import Run
from selfhost.train.gpt.setup import TrainRequest, prepare_data, probe, setup


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


def _stop_requested(stop: _StopFlag, dist: Dist, device: torch.device) -> bool:
    if not dist.enabled:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
