"""Benchmark `selfhost train gpt`: a full run (wall and CPU time, final val loss) against a
nanoGPT-equivalent run in the same process, and step throughput against a naive reference step (manual
attention, unfused AdamW, fp32), all measured in the same run.

CPU (default: preset cpu-tiny, our llama + Muon recipe at nanoGPT's "baby GPT" size and batch, against the
nanoGPT-equivalent run of preset nanogpt-cpu-tiny: 4L/4H/128d, block 64, batch 12, 2000 iters, dropout 0,
lr 1e-3, an eval of 20 batches per split every 250 iters; nanoGPT's own train.py: val loss 1.8857 in
125.8 s on an idle 2-core VM; `--preset nanogpt-cpu-tiny` compares the same model and loop):
    .venv/bin/python bench/train_gpt.py
    .venv/bin/python bench/train_gpt.py --iters 500 --repeat          # shorter; ours, ref, ref, ours
    .venv/bin/python bench/train_gpt.py --before 9328f94 --cli-iters 200 --skip-run   # old vs new CLI
The nanoGPT-equivalent run is nanoGPT's model.py (no biases, exact GELU, SDPA) and train.py loop (its
batches, AdamW unfused on the CPU, loss.item() every iteration, evals and best-checkpoint saves) on the
same tokens, with the same threads as ours (--ref-threads N to change): the last column is the ratio
to compare (wall time on a shared machine moves with the load; the CPU seconds at 1 thread move less).
`--before REV` runs `selfhost train gpt --preset <preset>` from git revision REV and from this tree, one
after the other, as subprocesses (wall time from process start: imports, data, probe, evals, checkpoints),
and prints the load average around each run: on a shared machine compare the ratio, not the seconds.
GPU (nanoGPT: shakespeare-char val loss 1.4697; seed: tokens/s and MFU):
    python bench/train_gpt.py --device cuda --preset shakespeare-char
    python bench/train_gpt.py --device cuda --preset seed --iters 500 --compile
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from selfhost.events import Progress, Result  # noqa: E402
from selfhost.train import common  # noqa: E402
from selfhost.train.gpt import data, estimate, options, trainer  # noqa: E402
from selfhost.train.gpt.config import TrainConfig, build_config  # noqa: E402
from selfhost.train.gpt.devices import resolve_dtype, to_device  # noqa: E402
from selfhost.train.gpt.model import build_model  # noqa: E402
from selfhost.train.gpt.optim import Stepper, lr_factor  # noqa: E402
from selfhost.train.gpt.setup import gpt_config  # noqa: E402

REFERENCE = {"cpu-tiny": "nanogpt-cpu-tiny"}  # the nanoGPT-equivalent run of a preset: nanoGPT's own settings
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


# -- the naive reference: what a first implementation looks like ------------------------------------
class NaiveBlock(nn.Module):
    def __init__(self, c: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.c_attn, self.c_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.fc, self.proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # manual attention
        att = att.masked_fill(self.mask[:T, :T] == 0, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.c_proj(y)
        return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class NaiveGPT(nn.Module):
    def __init__(self, vocab: int, cfg: TrainConfig) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, cfg.n_embd), nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.Sequential(
            *[NaiveBlock(cfg.n_embd, cfg.n_head, cfg.block_size) for _ in range(cfg.n_layer)]
        )
        self.ln_f, self.head = nn.LayerNorm(cfg.n_embd), nn.Linear(cfg.n_embd, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        logits = self.head(self.ln_f(self.blocks(x)))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# -- nanoGPT-equivalent reference: nanoGPT's model.py + train.py semantics, measured in the same run ------
class NanoLayerNorm(nn.Module):
    """nanoGPT's LayerNorm with an optional bias (its configs use bias=False)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoBlock(nn.Module):
    """nanoGPT's Block: CausalSelfAttention (SDPA, is_causal) + MLP with exact GELU, no biases."""

    def __init__(self, c: int, n_head: int, bias: bool = False) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = NanoLayerNorm(c, bias), NanoLayerNorm(c, bias)
        self.c_attn, self.attn_proj = nn.Linear(c, 3 * c, bias=bias), nn.Linear(c, c, bias=bias)
        self.c_fc, self.c_proj = nn.Linear(c, 4 * c, bias=bias), nn.Linear(4 * c, c, bias=bias)
        self.gelu = nn.GELU()

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        return self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(self.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, cfg: TrainConfig) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, cfg.n_embd), nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList([NanoBlock(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer)])
        self.ln_f = NanoLayerNorm(cfg.n_embd, bias=False)
        self.lm_head = nn.Linear(cfg.n_embd, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("attn_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


def nanogpt_run(cfg: TrainConfig, vocab: int, ds: data.Dataset, threads: int, run_dir: Path) -> dict:
    """nanoGPT's train.py loop for `cfg` (its baby CPU run for cpu-tiny): torch.randint batches stacked
    from the token array, lr set by hand each iteration, an eval (estimate_loss: eval_iters fresh random
    batches per split, loss.item() each) every eval_interval iterations and at the last, torch.save of
    model + optimizer when val improves, loss.item() every iteration (log_interval 1), iterations
    0..max_iters inclusive, AdamW fused on CUDA only, weight decay on >= 2-D tensors. Wall time from
    model construction to the end of the loop (nanoGPT's data preparation is a separate script)."""
    torch.set_num_threads(threads)
    t0, cpu0 = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    device = torch.device("cpu")
    splits = {"train": np.asarray(ds.train), "val": np.asarray(ds.val)}  # uint16 like its train.bin
    T = cfg.block_size

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        arr = splits[split]
        ix = torch.randint(len(arr) - T, (cfg.batch_size,))
        x = torch.stack([torch.from_numpy(arr[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(arr[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        return x.to(device), y.to(device)

    model = NanoGPT(vocab, cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                            fused=device.type == "cuda")  # fmt: skip
    lr_at = lambda it: cfg.learning_rate * lr_factor(cfg)(it)  # noqa: E731 (nanoGPT's get_lr)

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        out = {}
        for split in ("train", "val"):
            losses = torch.zeros(cfg.eval_iters)
            for k in range(cfg.eval_iters):
                _, loss = model(*get_batch(split))
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    best_val, val, it, step_time, timeline = 1e9, math.nan, 0, 0.0, []
    x, y = get_batch("train")
    t_last = time.perf_counter()
    while True:
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        if it % cfg.eval_interval == 0:
            losses = estimate_loss()
            val = losses["val"]
            if losses["val"] < best_val:
                best_val = losses["val"]
                if it > 0:
                    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": it,
                             "best_val_loss": best_val, "config": cfg.model_dump()}  # fmt: skip
                    torch.save(state, run_dir / "ckpt.pt")
            timeline.append((time.perf_counter() - t0, val))
            print(f"  nanoGPT-equivalent step {it}: train {losses['train']:.4f} val {val:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
            t_last = time.perf_counter()
        _, loss = model(x, y)
        x, y = get_batch("train")
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # log_interval 1: a host sync and a print every iteration
        now = time.perf_counter()
        step_time, t_last = step_time + now - t_last, now
        it += 1
        if it > cfg.max_iters:  # nanoGPT's loop trains iteration max_iters too, after the last eval
            break
    wall = time.perf_counter() - t0
    return {"wall": wall, "cpu": time.process_time() - cpu0, "val": val, "threads": threads,
            "tps": it * cfg.tokens_per_iter / step_time, "timeline": timeline}  # fmt: skip


def throughput(step, tokens: int, device: torch.device, steps: int) -> float:  # noqa: ANN001
    return estimate.probe_throughput(step, tokens, device, calls=steps, warmup=max(2, steps // 5))


def compare_steps(
    cfg: TrainConfig, vocab: int, ds: data.Dataset, device: torch.device, steps: int
) -> tuple[float, float]:
    """tokens/s of our training step vs the naive reference on the same batches shape."""
    sampler = data.BatchSampler(ds.train, cfg.block_size, cfg.batch_size, 0)
    batch = lambda: to_device(*sampler.next(), device)  # noqa: E731
    dtype = resolve_dtype(cfg.dtype, device)
    ours_model = build_model(gpt_config(cfg, vocab)).to(device)
    model = torch.compile(ours_model) if cfg.compile else ours_model
    ours = Stepper(model, cfg.model_copy(update={"grad_accum": 1}), device, dtype, batch, ddp=False)
    tokens = cfg.batch_size * cfg.block_size
    ours_tps = throughput(ours.step, tokens, device, steps)
    del ours, model, ours_model

    ref = NaiveGPT(vocab, cfg).to(device)
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.learning_rate, foreach=False, fused=False)

    def ref_step() -> None:
        loss = ref(*batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference is plain fp32
        torch.backends.cudnn.allow_tf32 = False
    ref_tps = throughput(ref_step, tokens, device, steps)
    return ours_tps, ref_tps


# op names -> what they are, for the --profile summary
PROFILE_GROUPS = {"aten::mm": "matmul", "aten::addmm": "matmul", "aten::bmm": "matmul",
                  "flash_attention": "attention (SDPA)", "layer_norm": "LayerNorm",
                  "adamw": "AdamW", "vector_norm": "grad clipping", "softmax": "cross-entropy",
                  "nll_loss": "cross-entropy", "embedding": "embeddings"}  # fmt: skip


def _kind(event: Any) -> str:
    node = event
    while node is not None:  # an op inside the GELU's autograd function counts as GELU
        if node.name.startswith(("_SigmoidGELU", "aten::gelu")):
            return "GELU"
        node = node.cpu_parent
    name = event.name.lower()
    return next((v for k, v in PROFILE_GROUPS.items() if k in name), "other (elementwise, copies, dispatch)")


def nanogpt_step(cfg: TrainConfig, vocab: int, batch: Any) -> Any:
    """One iteration of the nanoGPT-equivalent loop (forward, backward, clip, unfused AdamW, .item())."""
    model = NanoGPT(vocab, cfg)
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=False)

    def step() -> None:
        _, loss = model(*batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return step


def step_vs_nanogpt(cfg: TrainConfig, ref_cfg: TrainConfig, vocab: int, ds: data.Dataset, steps: int) -> None:
    """Seconds per training step of ours (cfg, with its optimizer) and of the nanoGPT-equivalent (ref_cfg),
    timed in turns A B B A of `steps` steps each (CPU): with a run's loss-per-step curve, what its time to
    a loss would be where the machine is too busy for whole runs side by side."""
    sampler = data.BatchSampler(ds.train, cfg.block_size, cfg.batch_size, 0)
    batch = lambda: to_device(*sampler.next(), torch.device("cpu"))  # noqa: E731
    model = build_model(gpt_config(cfg, vocab))
    ours = Stepper(model, cfg, torch.device("cpu"), torch.float32, batch, ddp=False).step
    steps_of = {"ours": lambda: ours().item(), "nanoGPT": nanogpt_step(ref_cfg, vocab, batch)}
    for step in steps_of.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {"ours": [], "nanoGPT": []}
    cpu: dict[str, list[float]] = {"ours": [], "nanoGPT": []}
    for name in ("ours", "nanoGPT", "nanoGPT", "ours"):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            steps_of[name]()
        times[name].append((time.perf_counter() - t0) / steps)
        cpu[name].append((time.process_time() - c0) / steps)
    ours_s, ref_s = (sum(times[k]) / 2 for k in ("ours", "nanoGPT"))
    ours_c, ref_c = (sum(cpu[k]) / 2 for k in ("ours", "nanoGPT"))
    print()
    load, threads = os.getloadavg()[0], torch.get_num_threads()
    print(f"| step, A B B A x {steps} steps, {threads} threads, load {load:.1f} "
          "| wall ms/step | vs nanoGPT-eq. | CPU ms/step | vs nanoGPT-eq. |")  # fmt: skip
    print("|---|---|---|---|---|")
    print(f"| nanoGPT-equivalent | {1000 * ref_s:.1f} | 1.00x | {1000 * ref_c:.1f} | 1.00x |")
    print(f"| ours ({' '.join(_OURS_SETTINGS) or 'preset'}) | {1000 * ours_s:.1f} | {ours_s / ref_s:.2f}x | "
          f"{1000 * ours_c:.1f} | {ours_c / ref_c:.2f}x |")  # fmt: skip


_OURS_SETTINGS: list[str] = []


def profile_step(cfg: TrainConfig, vocab: int, ds: data.Dataset, device: torch.device, steps: int) -> None:
    """Where a training step's time goes: torch.profiler's self CPU time of `steps` steps of ours and of
    the nanoGPT-equivalent (CPU only), summed by kind of work."""
    from torch.profiler import ProfilerActivity, profile

    sampler = data.BatchSampler(ds.train, cfg.block_size, cfg.batch_size, 0)
    batch = lambda: to_device(*sampler.next(), device)  # noqa: E731
    model = build_model(gpt_config(cfg, vocab)).to(device)
    dtype = resolve_dtype(cfg.dtype, device)
    runs = {"ours": Stepper(model, cfg, device, dtype, batch, ddp=False).step}
    if device.type == "cpu":
        runs["nanoGPT-eq."] = nanogpt_step(cfg, vocab, batch)
    table: dict[str, dict[str, float]] = {}
    for name, step in runs.items():
        for _ in range(5):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        for ev in prof.events():
            row = table.setdefault(_kind(ev), {})
            row[name] = row.get(name, 0.0) + ev.self_cpu_time_total / steps / 1000
    totals = {name: sum(row.get(name, 0.0) for row in table.values()) for name in runs}
    print()
    print(f"| a step, profiled ({steps} steps, {torch.get_num_threads()} threads): ms/step (share) | "
          + " | ".join(runs) + " |")  # fmt: skip
    print("|---|" + "---|" * len(runs))
    for kind, row in sorted(table.items(), key=lambda kv: -kv[1].get("ours", 0.0)):
        cells = [f"{row.get(n, 0.0):.1f} ({100 * row.get(n, 0.0) / totals[n]:.0f}%)" for n in runs]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print("| total | " + " | ".join(f"{totals[n]:.1f}" for n in runs) + " |")


def cli_run(src: Path, preset: str, data_path: Path, iters: int | None, threads: int = 0) -> dict:
    """`selfhost train gpt` from the source tree `src` in a fresh process: wall and CPU time, val loss,
    load (threads 0: the CLI's automatic choice, which follows the load at its start)."""
    with tempfile.TemporaryDirectory() as home:
        cmd = [sys.executable, "-m", "selfhost", "train", "gpt", "--preset", preset, "--data", str(data_path),
               "--out", f"{home}/run", "--no-export"]  # fmt: skip
        cmd += ["--iters", str(iters)] if iters else []
        cmd += ["--threads", str(threads)] if threads else []
        env = {**os.environ, "PYTHONPATH": str(src), "SELFHOST_HOME": home, "COLUMNS": "200"}
        load, cpu0 = os.getloadavg()[0], _children_cpu()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=home)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{src}: exit {proc.returncode}\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    val = re.findall(r"val loss (\d+\.\d+)", proc.stdout + proc.stderr)
    return {"wall": wall, "cpu": cpu, "val": float(val[-1]) if val else math.nan,
            "load": (load + os.getloadavg()[0]) / 2}  # fmt: skip


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def compare_cli(rev: str, args: argparse.Namespace) -> None:
    """The CLI at git revision `rev` vs this tree, same preset and data, run back to back (A B B A)."""
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "selfhost"], capture_output=True,
                                 check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        order = [("before", Path(old)), ("after", REPO)]
        results: dict[str, list[dict]] = {"before": [], "after": []}
        for name, src in order + order[::-1] if args.repeat else order:
            r = cli_run(src, args.preset, args.data, args.cli_iters, args.threads)
            results[name].append(r)
            print(f"  {name:6s} {r['wall']:7.1f} s  CPU {r['cpu']:7.1f} s  val loss {r['val']:.4f}  "
                  f"load {r['load']:.1f}", flush=True)  # fmt: skip
    print()
    threads = f"{args.threads} threads" if args.threads else "auto threads"
    print(f"| `selfhost train gpt --preset {args.preset}` ({args.cli_iters or 'all'} iters, {threads}) | "
          "wall (s) | CPU (s) | val loss | load avg | wall vs before | CPU vs before |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    base_wall, base_cpu = mean(results["before"], "wall"), mean(results["before"], "cpu")
    for name in ("before", "after"):
        rs = results[name]
        wall, cpu = mean(rs, "wall"), mean(rs, "cpu")
        label = f"{name} ({rev})" if name == "before" else f"{name} (this tree)"
        print(f"| {label} | {wall:.1f} | {cpu:.1f} | {mean(rs, 'val'):.4f} | {mean(rs, 'load'):.1f} | "
              f"{wall / base_wall:.2f}x | {cpu / base_cpu:.2f}x |")  # fmt: skip


def ours_run(cfg: TrainConfig, data_path: Path) -> dict:
    """`selfhost train gpt` in this process (trainer.train: data, tokenizer, probe, evals, samples,
    checkpoints): wall and CPU time, final val loss, step tokens/s after warm-up, the load around it."""
    load, cpu0 = os.getloadavg()[0], time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        req = trainer.TrainRequest(config=cfg, run_dir=Path(tmp), data=data_path, handle_sigint=False)
        t0 = time.perf_counter()
        steps, start, row, threads, timeline = [], None, {}, None, []
        for ev in trainer.train(req):
            m = ev.metrics if isinstance(ev, Progress) else {}
            if isinstance(ev, Progress) and ev.task == "train" and "n_params" in m:  # the estimate
                start, threads = m, torch.get_num_threads() if cfg.device == "cpu" else None
                rate, eta = m["tokens_per_s"], m["eta_s"]
                print(f"  ours: params {m['n_params']:,}, {threads or 'default'} threads, "
                      f"probe {rate:,.0f} tok/s, ETA {eta:.0f} s", flush=True)  # fmt: skip
            elif isinstance(ev, Progress) and ev.task == "train":
                steps.append(m)
            elif isinstance(ev, Progress) and ev.task == "eval":
                timeline.append((time.perf_counter() - t0, m["val_loss"]))
                print(f"  ours step {ev.done:.0f}: train {m['train_loss']:.4f} val {m['val_loss']:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
            elif isinstance(ev, Result):
                later = steps[len(steps) // 5 :] or steps  # skip warm-up / compilation
                mfus = [s["mfu"] for s in later if "mfu" in s]
                row = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - cpu0,
                       "val": ev.value.val_loss, "tps": sum(s["tokens_per_s"] for s in later) / len(later),
                       "mfu": f"{100 * sum(mfus) / len(mfus):.1f}%" if mfus else "n/a",
                       "eta": start.get("eta_s") if start else None, "threads": threads,
                       "timeline": timeline}  # fmt: skip
    return {**row, "load": (load + os.getloadavg()[0]) / 2}


def time_to(timeline: list[tuple[float, float]], target: float) -> float:
    """Seconds until the first eval at or below `target` (inf: never)."""
    return next((t for t, val in timeline if val <= target), math.inf)


def best_within(timeline: list[tuple[float, float]], seconds: float) -> float:
    return min((val for t, val in timeline if t <= seconds), default=math.nan)


def target_table(results: dict[str, list[dict]], ours_label: str) -> None:
    """Time to reach nanoGPT's final val loss, and the best val loss each reaches in nanoGPT's wall time
    (each pair of runs in the same order A B B A compared pairwise, then averaged)."""
    ref, ours = results["nanoGPT"], results["ours"]
    pairs = list(zip(ours, ref[:: -1] if len(ref) > 1 else ref, strict=False))  # ours1-nano2, ours2-nano1
    print()
    print("| run | nanoGPT-eq.: final val, wall (s) | ours: time to that val (s) | ratio | "
          "ours: best val in nanoGPT's wall | load avg |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    ratios = []
    for o, n in pairs:
        target, wall = n["val"], n["wall"]
        reach = time_to(o["timeline"], target)
        ratios.append(reach / wall)
        print(f"| {ours_label} | {target:.4f}, {wall:.1f} | {reach:.1f} | {reach / wall:.2f}x | "
              f"{best_within(o['timeline'], wall):.4f} | {(o['load'] + n['load']) / 2:.1f} |")  # fmt: skip
    print(f"# time to nanoGPT's val loss: {sum(ratios) / len(ratios):.2f}x nanoGPT's wall time (mean)")


def full_runs(cfg: TrainConfig, args: argparse.Namespace, default_threads: int) -> None:
    """Ours and (on the CPU) the nanoGPT-equivalent loop on the same data, back to back; with --repeat
    in the order ours, nanoGPT, nanoGPT, ours (the mean of each cancels a load trend)."""
    with_ref = cfg.device == "cpu" and not args.no_nanogpt
    order = ["ours", "nanoGPT"] if with_ref else ["ours"]
    order = order + order[::-1] if args.repeat else order
    results: dict[str, list[dict]] = {name: [] for name in order}
    tok_ds = None
    for name in order:
        if name == "ours":
            results[name].append(ours_run(cfg, args.data))
            continue
        ref_cfg = build_config(REFERENCE.get(args.preset, args.preset),
                               overrides={"max_iters": args.ref_iters, "device": "cpu"})  # fmt: skip
        if tok_ds is None:
            tok, docs = _tok_docs(ref_cfg, args.data)
            tok_ds = tok, data.split(data.encode_documents(tok, docs), cfg.val_fraction, len(docs))
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            ours = results["ours"][-1]["threads"] if results["ours"] else None
            ref_threads = args.ref_threads or ours or default_threads  # the same threads as ours
            r = nanogpt_run(ref_cfg, tok_ds[0].vocab_size, tok_ds[1], ref_threads, Path(tmp))
        results[name].append({**r, "load": (load + os.getloadavg()[0]) / 2})
        torch.set_num_threads(default_threads)
    print()
    print(
        f"| run ({cfg.max_iters} iters, {cfg.batch_size}x{cfg.block_size} tokens/iter) | threads | "
        "wall (s) | CPU (s) | final val loss | step tokens/s | load avg | wall vs nanoGPT-eq. |"
    )
    print("|---|---|---|---|---|---|---|---|")
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    base = mean(results["nanoGPT"], "wall") if with_ref else None
    labels = {"ours": f"`selfhost train gpt --preset {args.preset}` (in-process)",
              "nanoGPT": "nanoGPT-equivalent train.py loop (exact GELU, no biases, unfused AdamW, "
                         ".item() every step)"}  # fmt: skip
    for name, rs in results.items():
        wall = mean(rs, "wall")
        ratio = f"{wall / base:.2f}x" if base else "n/a"
        threads = "/".join(str(r["threads"] or torch.get_num_threads()) for r in rs)  # each run's
        print(f"| {labels[name]} | {threads} | {wall:.1f} | {mean(rs, 'cpu'):.1f} | {mean(rs, 'val'):.4f} | "
              f"{mean(rs, 'tps'):,.0f} | {mean(rs, 'load'):.1f} | {ratio} |")  # fmt: skip
    if with_ref:
        target_table(results, " ".join(args.set) or args.preset)
    if len(results["ours"]) > 1 or (with_ref and len(results["nanoGPT"]) > 1):
        for name, rs in results.items():
            print(f"#   {name}: wall " + ", ".join(f"{r['wall']:.1f}" for r in rs) + " s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--preset", default=options.DEFAULT_PRESET, choices=options.preset_names())
    ap.add_argument("--device", default="cpu", choices=get_args(options.Device))
    ap.add_argument("--iters", type=int, default=None,
                    help="iterations (nanoGPT evaluates at multiples of eval_interval)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: auto, as the CLI does)")
    ap.add_argument("--ref-threads", type=int, default=0,
                    help="nanoGPT-equivalent run threads (0: the same as ours)")  # fmt: skip
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--step-iters", type=int, default=None, help="timed steps per side in the comparison")
    ap.add_argument("--skip-run", action="store_true", help="only the step comparison")
    ap.add_argument("--no-nanogpt", action="store_true", help="skip the nanoGPT-equivalent full run")
    ap.add_argument("--before", metavar="REV", help="also run the CLI from git revision REV vs this tree")
    ap.add_argument("--cli-iters", type=int, default=None, help="iterations of the --before runs")
    ap.add_argument("--repeat", action="store_true", help="run each side twice, in the order A B B A")
    ap.add_argument("--no-steps", action="store_true", help="skip the step comparison")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of ours only (e.g. arch=llama optimizer=muon)")  # fmt: skip
    ap.add_argument("--ref-iters", type=int, default=None, help="nanoGPT-eq. iterations (default --iters)")
    ap.add_argument("--step-ratio", type=int, default=0, metavar="N",
                    help="also time N steps of ours vs the nanoGPT-equivalent, A B B A")  # fmt: skip
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N steps of ours")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    print(f"# load average {os.getloadavg()[0]:.1f} on {common.cpu_cores()} cores", flush=True)
    if args.before:
        compare_cli(args.before, args)
    overrides = {"device": args.device, "max_iters": args.iters, "compile": args.compile or None,
                 "threads": args.threads, **dict(_setting(kv) for kv in args.set)}  # fmt: skip
    cfg = build_config(args.preset, overrides=overrides)
    device = common.pick_device(cfg.device)
    print(f"# {args.preset} on {common.device_name(device)}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}", flush=True)  # fmt: skip
    if not args.skip_run:
        full_runs(cfg, args, default_threads)
    if args.no_steps and not args.profile and not args.step_ratio:
        return
    tok, docs = _tok_docs(cfg, args.data)
    ds = data.split(data.encode_documents(tok, docs), cfg.val_fraction, len(docs))
    threads = common.resolve_threads(cfg.threads, device) or torch.get_num_threads()
    if not args.no_steps:
        step_table(cfg, tok.vocab_size, ds, device, args.step_iters or (20 if device.type == "cpu" else 50),
                   threads)  # fmt: skip
    if args.step_ratio:
        _OURS_SETTINGS.extend(args.set)
        ref_preset = REFERENCE.get(args.preset, args.preset)
        ref_cfg = build_config(ref_preset, overrides={"max_iters": args.ref_iters})
        step_vs_nanogpt(cfg, ref_cfg, tok.vocab_size, ds, args.step_ratio)
    if args.profile:
        profile_step(cfg, tok.vocab_size, ds, device, args.profile)


def step_table(cfg: TrainConfig, vocab: int, ds: data.Dataset, device: torch.device, n_steps: int,
               threads: int) -> None:  # fmt: skip
    ours, ref = compare_steps(cfg, vocab, ds, device, n_steps)
    print()
    print(f"| step ({cfg.batch_size}x{cfg.block_size} tokens, {n_steps} timed, {threads} threads) | tokens/s "
          "| vs reference |")  # fmt: skip
    print("|---|---|---|")
    print(f"| reference (manual attention, unfused AdamW, fp32) | {ref:,.0f} | 1.00x |")
    dtype = resolve_dtype(cfg.dtype, device)
    what = f"ours (SDPA, fused AdamW, sigmoid-form GELU, {str(dtype)[6:]}"
    what += ", compiled)" if cfg.compile else ")"
    print(f"| {what} | {ours:,.0f} | {ours / ref:.2f}x |")


def _setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    import json

    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def _tok_docs(cfg: TrainConfig, path: Path):  # noqa: ANN202
    from selfhost.train.gpt.tokenizer import train_tokenizer

    docs = data.read_documents(path)
    return train_tokenizer(cfg.tokenizer, docs, cfg.vocab_size), docs


if __name__ == "__main__":
    main()
