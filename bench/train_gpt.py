"""Benchmark `selfhost train gpt`: a full run (wall time, final val loss) and step throughput
against a naive reference step (manual attention, unfused AdamW, fp32) measured in the same run.

CPU (default: nanoGPT's "baby GPT" = preset cpu-tiny: 4L/4H/128d, block 64, batch 12, 2000 iters,
dropout 0, lr 1e-3; nanoGPT's own train.py: val loss 1.8857 in 125.8 s on an idle 2-core VM):
    .venv/bin/python bench/train_gpt.py
    .venv/bin/python bench/train_gpt.py --iters 500                    # shorter
    .venv/bin/python bench/train_gpt.py --before 9328f94 --cli-iters 200 --skip-run   # old vs new CLI
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
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from selfhost.events import Progress, Result  # noqa: E402
from selfhost.train import common  # noqa: E402
from selfhost.train.gpt import data, estimate, trainer  # noqa: E402
from selfhost.train.gpt.config import TrainConfig, build_config  # noqa: E402
from selfhost.train.gpt.model import GPT  # noqa: E402

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


def throughput(step, tokens: int, device: torch.device, steps: int) -> float:  # noqa: ANN001
    return estimate.probe_throughput(step, tokens, device, calls=steps, warmup=max(2, steps // 5))


def compare_steps(
    cfg: TrainConfig, vocab: int, ds: data.Dataset, device: torch.device, steps: int
) -> tuple[float, float]:
    """tokens/s of our training step vs the naive reference on the same batches shape."""
    sampler = data.BatchSampler(ds.train, cfg.block_size, cfg.batch_size, 0)
    batch = lambda: trainer.to_device(*sampler.next(), device)  # noqa: E731
    dtype = trainer.resolve_dtype(cfg.dtype, device)
    ours_model = GPT(trainer.gpt_config(cfg, vocab)).to(device)
    model = torch.compile(ours_model) if cfg.compile else ours_model
    ours = trainer.Stepper(model, cfg.model_copy(update={"grad_accum": 1}), device, dtype, batch, ddp=False)
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


def cli_run(src: Path, preset: str, data_path: Path, iters: int | None) -> dict:
    """`selfhost train gpt` from the source tree `src` in a fresh process: wall time, val loss, load."""
    with tempfile.TemporaryDirectory() as home:
        cmd = [sys.executable, "-m", "selfhost", "train", "gpt", "--preset", preset, "--data", str(data_path),
               "--out", f"{home}/run", "--no-export"]  # fmt: skip
        cmd += ["--iters", str(iters)] if iters else []
        env = {**os.environ, "PYTHONPATH": str(src), "SELFHOST_HOME": home, "COLUMNS": "200"}
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=home)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{src}: exit {proc.returncode}\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    val = re.findall(r"val loss (\d+\.\d+)", proc.stdout)
    return {"wall": wall, "val": float(val[-1]) if val else math.nan, "load": (load + os.getloadavg()[0]) / 2}


def compare_cli(rev: str, args: argparse.Namespace) -> None:
    """The CLI at git revision `rev` vs this tree, same preset and data, run back to back (A B B A)."""
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "selfhost"], capture_output=True,
                                 check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        order = [("before", Path(old)), ("after", REPO)]
        results: dict[str, list[dict]] = {"before": [], "after": []}
        for name, src in order + order[::-1] if args.repeat else order:
            r = cli_run(src, args.preset, args.data, args.cli_iters)
            results[name].append(r)
            print(f"  {name:6s} {r['wall']:7.1f} s  val loss {r['val']:.4f}  load {r['load']:.1f}",
                  flush=True)  # fmt: skip
    print()
    print(f"| `selfhost train gpt --preset {args.preset}` ({args.cli_iters or 'all'} iters) | wall (s) | "
          "val loss | load avg | vs before |")  # fmt: skip
    print("|---|---|---|---|---|")
    base = sum(r["wall"] for r in results["before"]) / len(results["before"])
    for name in ("before", "after"):
        rs = results[name]
        wall = sum(r["wall"] for r in rs) / len(rs)
        val = sum(r["val"] for r in rs) / len(rs)
        load = sum(r["load"] for r in rs) / len(rs)
        label = f"{name} ({rev})" if name == "before" else f"{name} (this tree)"
        print(f"| {label} | {wall:.1f} | {val:.4f} | {load:.1f} | {base / wall:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--preset", default="cpu-tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iters", type=int, default=None, help="override the preset's iterations")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: auto, as the CLI does)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--step-iters", type=int, default=None, help="timed steps per side in the comparison")
    ap.add_argument("--skip-run", action="store_true", help="only the step comparison")
    ap.add_argument("--before", metavar="REV", help="also run the CLI from git revision REV vs this tree")
    ap.add_argument("--cli-iters", type=int, default=None, help="iterations of the --before runs")
    ap.add_argument("--repeat", action="store_true", help="--before runs in the order A B B A")
    ap.add_argument("--no-steps", action="store_true", help="skip the step comparison")
    args = ap.parse_args()
    print(f"# load average {os.getloadavg()[0]:.1f} on {common.cpu_cores()} cores", flush=True)
    if args.before:
        compare_cli(args.before, args)
    overrides = {"device": args.device, "max_iters": args.iters, "compile": args.compile or None,
                 "sample_tokens": 0, "log_interval": 50, "threads": args.threads}  # fmt: skip
    if args.preset == "cpu-tiny":
        overrides["eval_interval"] = args.iters or 2000  # nanoGPT's baby run: evals at start and end
    cfg = build_config(args.preset, overrides=overrides)
    device = common.pick_device(cfg.device)
    name = common.device_name(device)
    threads = common.resolve_threads(cfg.threads, device) or torch.get_num_threads()
    print(f"# {args.preset} on {name} ({threads} CPU threads), torch {torch.__version__}")

    rows = []
    if not args.skip_run:
        with tempfile.TemporaryDirectory() as tmp:
            req = trainer.TrainRequest(config=cfg, run_dir=Path(tmp), data=args.data, handle_sigint=False)
            t0 = time.perf_counter()
            steps, start = [], None
            for ev in trainer.train(req):
                m = ev.metrics if isinstance(ev, Progress) else {}
                if isinstance(ev, Progress) and ev.task == "train" and "n_params" in m:  # the estimate
                    start = m
                    print(f"  params {m['n_params']:,}, probe {m['tokens_per_s']:,.0f} tok/s, "
                          f"estimated ETA {m['eta_s']:.0f} s", flush=True)  # fmt: skip
                elif isinstance(ev, Progress) and ev.task == "train":
                    steps.append(m)
                elif isinstance(ev, Progress) and ev.task == "eval":
                    print(f"  step {ev.done:.0f}: train {m['train_loss']:.4f} val {m['val_loss']:.4f} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
                elif isinstance(ev, Result):
                    wall = time.perf_counter() - t0
                    later = steps[len(steps) // 5 :] or steps  # skip warm-up / compilation
                    tps = sum(s["tokens_per_s"] for s in later) / len(later)
                    mfus = [s["mfu"] for s in later if "mfu" in s]
                    mfu = f"{100 * sum(mfus) / len(mfus):.1f}%" if mfus else "n/a"
                    eta = start.get("eta_s") if start else None
                    rows.append((args.preset, cfg.max_iters, wall, eta, ev.value.val_loss, tps, mfu))
        print()
        print("| run | iters | wall (s) | estimated (s) | final val loss | tokens/s | MFU |")
        print("|---|---|---|---|---|---|---|")
        for preset, iters, wall, eta, val, tps, mfu in rows:
            print(f"| {preset} | {iters} | {wall:.1f} | {eta or 0:.0f} | {val:.4f} | {tps:,.0f} | {mfu} |")

    if args.no_steps:
        return
    tok, docs = _tok_docs(cfg, args.data)
    ds = data.split(data.encode_documents(tok, docs), cfg.val_fraction, len(docs))
    vocab = tok.vocab_size
    n_steps = args.step_iters or (20 if device.type == "cpu" else 50)
    ours, ref = compare_steps(cfg, vocab, ds, device, n_steps)
    print()
    print(f"| step ({cfg.batch_size}x{cfg.block_size} tokens, {n_steps} timed) | tokens/s | vs reference |")
    print("|---|---|---|")
    print(f"| reference (manual attention, unfused AdamW, fp32) | {ref:,.0f} | 1.00x |")
    dtype = trainer.resolve_dtype(cfg.dtype, device)
    what = f"ours (SDPA, fused AdamW, {str(dtype)[6:]}"
    what += ", compiled)" if cfg.compile else ")"
    print(f"| {what} | {ours:,.0f} | {ours / ref:.2f}x |")


def _tok_docs(cfg: TrainConfig, path: Path):  # noqa: ANN202
    from selfhost.train.gpt.tokenizer import train_tokenizer

    docs = data.read_documents(path)
    return train_tokenizer(cfg.tokenizer, docs, cfg.vocab_size), docs


if __name__ == "__main__":
    main()
