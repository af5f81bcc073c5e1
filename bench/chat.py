"""Benchmark: `selfhost chat -p` (the ChatSession) versus bare llama-cpp-python on the same GGUF.

Each measurement runs in its own process (so peak RSS is per path), alternating paths, same
threads / context / prompt / seed / max tokens, and reports the median of --repeats runs:

    .venv/bin/python bench/chat.py [--model PATH] [--threads 1] [--max-tokens 256] [--repeats 3] [--exe]

Paths:  bare   = llama_cpp.Llama.create_completion(stream=True) on the rendered chat prompt
        engine = selfhost.chat.session.ChatSession.chat() in-process (what `selfhost chat -p` runs)
        exe    = the `selfhost chat -p ... --json` executable (its own usage figures; --exe)
Rates are wall-clock: prompt tok/s = prompt tokens / time to first token, generation tok/s =
tokens fed back / (last token - first token). The memory-bandwidth bound: every generated token
reads all weights once, so tok/s <= bandwidth / model bytes (bandwidth: a numpy copy, 1 thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYSTEM = "You are a helpful assistant."
PROMPT = "Write a long story about a dragon who learns to bake bread. Describe every step."


def rendered_prompt(model: Path) -> str:
    """The chat prompt exactly as the model's template renders it (without selfhost's engine)."""
    from gguf import GGUFReader
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    reader = GGUFReader(model)
    field = reader.fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    tokens = reader.fields["tokenizer.ggml.tokens"]

    def token(key: str) -> str:
        f = reader.fields.get(key)
        return bytes(tokens.parts[tokens.data[int(f.parts[f.data[0]][0])]]).decode() if f else ""

    fmt = Jinja2ChatFormatter(
        template, token("tokenizer.ggml.eos_token_id"), token("tokenizer.ggml.bos_token_id")
    )
    return fmt(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]).prompt


def worker(args: argparse.Namespace) -> dict:
    """One measured run in this process; prints a JSON line."""
    sampling = dict(temperature=0.8, top_p=0.95, top_k=40, repeat_penalty=1.0)
    if args.worker == "bare":
        import llama_cpp

        llm = llama_cpp.Llama(
            model_path=str(args.model),
            n_ctx=args.ctx,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            n_gpu_layers=0,
            verbose=False,
        )
        prompt = args.rendered  # rendered by the parent: the GGUF reader's memory stays out of this RSS
        for _ in llm.create_completion("Hello", max_tokens=4, seed=0, **sampling):  # warm-up
            pass
        llm.reset()  # no prefix reuse from the warm-up
        n_prompt = len(llm.tokenize(prompt.encode(), special=True))
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        t0 = time.perf_counter()
        stamps = [
            time.perf_counter()
            for _ in llm.create_completion(
                prompt, max_tokens=args.max_tokens, seed=args.seed, stream=True, **sampling
            )
        ]
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        fed_back = int(perf.n_eval)
    else:
        from selfhost.chat.messages import DoneChunk, TextChunk
        from selfhost.chat.session import ChatSession, Sampling

        session = ChatSession.load(
            Path(args.model),
            ctx=args.ctx,
            threads=args.threads,
            gpu_layers=0,
            system=SYSTEM,
            sampling=Sampling(seed=0, max_tokens=4, **sampling),
        )
        list(session.chat("Hello"))  # warm-up
        session.reset()
        session.model.engine.clear_cache()  # no prefix reuse from the warm-up
        session.sampling = Sampling(seed=args.seed, max_tokens=args.max_tokens, **sampling)
        t0 = time.perf_counter()
        stamps, done = [], None
        for chunk in session.chat(PROMPT):
            if isinstance(chunk, TextChunk):
                stamps.append(time.perf_counter())
            elif isinstance(chunk, DoneChunk):
                done = chunk
        n_prompt = done.usage.prompt_tokens
        fed_back = done.usage.generated_tokens - 1
    ttft = stamps[0] - t0
    return {
        "prompt_tokens": n_prompt,
        "generated": fed_back + 1,
        "ttft_s": ttft,
        "prompt_tps": n_prompt / ttft,
        "gen_tps": fed_back / (stamps[-1] - stamps[0]),
    }


def run_child(cmd: list[str]) -> tuple[str, int]:
    """Run a command; return its stdout and its peak RSS in bytes (wait4 rusage)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}): {err[-500:]}")
    return out, usage.ru_maxrss * 1024


def measure(path: str, args: argparse.Namespace) -> dict:
    if path == "exe":
        exe = Path(sys.executable).parent / "selfhost"
        out, rss = run_child(
            [
                str(exe),
                "chat",
                str(args.model),
                "-p",
                PROMPT,
                "--system",
                SYSTEM,
                "--json",
                "--no-log",
                "--seed",
                str(args.seed),
                "-n",
                str(args.max_tokens),
                "--threads",
                str(args.threads),
                "--ctx",
                str(args.ctx),
                "--gpu-layers",
                "0",
                "--temperature",
                "0.8",
                "--top-p",
                "0.95",
                "--top-k",
                "40",
                "--repeat-penalty",
                "1.0",
            ]
        )
        u = json.loads(out)["usage"]
        res = {
            "prompt_tokens": u["prompt_tokens"],
            "generated": u["generated_tokens"],
            "ttft_s": u["time_to_first_token_s"],
            "prompt_tps": u["prompt_tokens_per_s"],
            "gen_tps": u["generation_tokens_per_s"],
        }
    else:
        out, rss = run_child(
            [
                sys.executable,
                __file__,
                "--worker",
                path,
                "--model",
                str(args.model),
                "--threads",
                str(args.threads),
                "--ctx",
                str(args.ctx),
                "--max-tokens",
                str(args.max_tokens),
                "--seed",
                str(args.seed),
                "--rendered",
                args.rendered,
            ]
        )
        res = json.loads(out.strip().splitlines()[-1])
    res["rss"] = rss
    return res


def copy_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s moved by a single-threaded numpy copy (read + write)."""
    import numpy as np

    src = np.ones(n_bytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: the embedded SmolLM2-135M)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--exe", action="store_true", help="also time the `selfhost` executable")
    ap.add_argument("--worker", choices=["bare", "engine"], help=argparse.SUPPRESS)
    ap.add_argument("--rendered", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from selfhost.models.resolve import resolve_model

        args.model = resolve_model(None).path
    if args.worker:
        print(json.dumps(worker(args)))
        return

    args.rendered = rendered_prompt(args.model)
    paths = ["bare", "engine"] + (["exe"] if args.exe else [])
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    for _ in range(args.repeats):
        for p in paths:  # alternate, so drifting machine load hits every path alike
            runs[p].append(measure(p, args))

    def med(p: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[p])

    size = args.model.stat().st_size
    bw = copy_bandwidth()
    print(
        f"model {args.model.name} ({size / 2**20:.0f} MiB), threads {args.threads}, ctx {args.ctx}, "
        f"max tokens {args.max_tokens}, seed {args.seed}, median of {args.repeats}"
    )
    header = (
        f"{'path':<8}{'prompt tok':>11}{'generated':>10}{'prompt tok/s':>14}{'gen tok/s':>11}"
        f"{'TTFT ms':>9}{'peak RSS MiB':>14}{'gen ratio':>11}{'prompt ratio':>14}"
    )
    print(header)
    print("-" * len(header))
    for p in paths:
        print(
            f"{p:<8}{med(p, 'prompt_tokens'):>11.0f}{med(p, 'generated'):>10.0f}{med(p, 'prompt_tps'):>14.1f}"
            f"{med(p, 'gen_tps'):>11.1f}{med(p, 'ttft_s') * 1000:>9.1f}{med(p, 'rss') / 2**20:>14.0f}"
            f"{med(p, 'gen_tps') / med('bare', 'gen_tps'):>11.3f}"
            f"{med(p, 'prompt_tps') / med('bare', 'prompt_tps'):>14.3f}"
        )
    bound = bw / size
    print(
        f"\nmemory-bandwidth bound: {size / 2**20:.0f} MiB of weights read per token; copy bandwidth "
        f"{bw / 1e9:.1f} GB/s (1 thread) -> at most {bound:.0f} tok/s"
    )
    for p in paths:
        print(
            f"  {p:<7} {med(p, 'gen_tps'):.1f} tok/s = {med(p, 'gen_tps') * size / 1e9:.2f} GB/s of weights, "
            f"{med(p, 'gen_tps') / bound:.0%} of the bound"
        )
    goal = med("engine", "gen_tps") / med("bare", "gen_tps")
    print(
        f"\nengine/bare generation ratio {goal:.3f} (goal >= 0.97): {'OK' if goal >= 0.97 else 'BELOW GOAL'}"
    )


if __name__ == "__main__":
    main()
