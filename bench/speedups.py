"""Benchmark of the engine's speed levers, each against its baseline in the same run (same process,
same model, alternating, median of --repeats); run by `bench/chat.py --speedups`:

1. n-gram speculation (--spec ngram) vs none: a workload that quotes its input, and free-form chat
   (single stream, greedy: the outputs must be identical);
2. a draft model: SmolLM2 Q4_1 drafting for an F16 copy of itself made by selfhost's dequantize;
3. KV q8_0 vs f16: slots that fit in the memory 4 f16 slots take, and aggregate tok/s at that count;
4. a returning conversation with a ~2k-token history after its slot was reused: time to first token
   with the RAM prompt cache vs without.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

QUOTED = (
    "Our team met on Tuesday to review the quarterly results. Revenue grew by twelve percent compared "
    "with the previous quarter, driven mostly by the new subscription plans launched in March. Costs "
    "rose by four percent because we hired three engineers and moved to a larger office. The board "
    "asked us to prepare a plan for the European launch, including pricing in euros, a support team "
    "that covers three time zones, and a marketing budget that stays under two hundred thousand euros."
)
QUOTE_PROMPT = f"Here is a text:\n\n{QUOTED}\n\nRepeat the text above exactly, word for word."
FREE_PROMPT = "Write a long story about a dragon who learns to bake bread. Describe every step."


def load(path: Path, args: argparse.Namespace, parallel: int = 1, ctx: int | None = None, **options):  # noqa: ANN003, ANN201
    from selfhost.chat.model import ChatModel, EngineOptions

    return ChatModel.load(
        Path(path),
        ctx=ctx or args.ctx,
        threads=args.threads,
        parallel=parallel,
        gpu_layers=args.gpu_layers,
        options=EngineOptions(**options),
    )


def one(model, question: str, max_tokens: int) -> dict:  # noqa: ANN001
    """One greedy reply, cold cache: text, generation tok/s, drafted/accepted."""
    from selfhost.runtime.jobs import Job, JobText
    from selfhost.runtime.sampler import SamplingParams

    model.engine.clear_cache()
    tokens = model.tokenize_prompt(model.render([{"role": "user", "content": question}]))
    job = model.engine.submit(Job(tokens, SamplingParams(temperature=0), max_tokens=max_tokens))
    text = "".join(c.text for c in job.chunks() if isinstance(c, JobText))
    end = job.end
    gen_s = end.total_s - end.time_to_first_token_s
    return {
        "text": text,
        "tps": (end.generated_tokens - 1) / gen_s if gen_s > 0 else 0.0,
        "generated": end.generated_tokens,
        "drafted": end.drafted_tokens,
        "accepted": end.accepted_tokens,
    }


def compare(label: str, models: dict[str, object], args: argparse.Namespace) -> None:
    """Alternate the models on the quote and free-form workloads; print tok/s, ratio, same output."""
    for workload, question in (("quote", QUOTE_PROMPT), ("free-form", FREE_PROMPT)):
        runs: dict[str, list[dict]] = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                runs[name].append(one(model, question, args.max_tokens))
        base_name = next(iter(models))
        base = statistics.median(r["tps"] for r in runs[base_name])
        for name, rs in runs.items():
            tps = statistics.median(r["tps"] for r in rs)
            drafted, accepted = sum(r["drafted"] for r in rs), sum(r["accepted"] for r in rs)
            same = all(r["text"] == runs[base_name][0]["text"] for r in rs)
            rate = f"{accepted / drafted:6.0%}" if drafted else "     -"
            print(
                f"{label:<11}{workload:<10}{name:<22}{rs[0]['generated']:>5}{tps:>9.1f}{tps / base:>8.2f}x"
                f"{rate:>8}  {'same' if same else 'DIFFERENT'}"
            )


def kv_slots(path: Path, args: argparse.Namespace) -> None:
    """Slots of --ctx tokens that fit in the KV memory of 4 f16 slots; aggregate tok/s at that count."""
    from selfhost.runtime import gguf_info
    from selfhost.runtime.jobs import Job
    from selfhost.runtime.kvcache import KVSettings
    from selfhost.runtime.memory import kv_bytes_per_token
    from selfhost.runtime.sampler import SamplingParams

    info = gguf_info.inspect(path)
    budget = 4 * kv_bytes_per_token(info, KVSettings()) * args.ctx
    print(f"\nKV cache: slots of {args.ctx} tokens in {budget / 2**20:.0f} MiB (4 f16 slots), 64 tokens each")
    base = None
    for kind in ("f16", "q8_0", "q4_0"):
        kv = KVSettings(type_k=kind, type_v=kind, flash_attn="on")  # type: ignore[arg-type]
        slots = int(budget // (kv_bytes_per_token(info, kv) * args.ctx))
        model = load(path, args, parallel=slots, kv=kv)
        prompts = [
            model.tokenize_prompt(
                model.render([{"role": "user", "content": f"Tell me fact number {i} about cats."}])
            )
            for i in range(slots)
        ]
        t = time.perf_counter()
        jobs = [model.engine.submit(Job(p, SamplingParams(temperature=0), max_tokens=64)) for p in prompts]
        while any(j.end is None for j in jobs):
            model.engine.step()
        wall = time.perf_counter() - t
        model.close()
        tps = sum(j.end.generated_tokens for j in jobs) / wall
        base = base or (slots, tps)
        print(
            f"  {kind:<5} {slots:>3} slots ({slots / base[0]:.2f}x)  "
            f"aggregate {tps:7.1f} tok/s ({tps / base[1]:.2f}x)"
        )


def returning(path: Path, args: argparse.Namespace) -> None:
    """TTFT of a returning ~2k-token conversation after another took its only slot, cache vs none."""
    from selfhost.runtime.jobs import Job
    from selfhost.runtime.sampler import SamplingParams

    notes, ctx = (110, 4096) if args.ctx >= 2048 else (20, 1024)  # ~2k tokens; a small one for --ctx < 2048
    history = " ".join(
        f"Note {i}: the meeting about project {i} moved to room {i % 7}." for i in range(notes)
    )
    print("\nreturning conversation (its slot was taken by another), time to first token:")
    results = {}
    for cache_ram in (0, 1024):
        model = load(path, args, ctx=ctx, cache_ram_mb=cache_ram)

        def ask(*turns: str, model=model) -> tuple[float, int, int]:  # noqa: ANN001
            msgs = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)
            ]
            tokens = model.tokenize_prompt(model.render(msgs))
            job = model.engine.submit(Job(tokens, SamplingParams(temperature=0), max_tokens=2))
            for _ in job.chunks():
                pass
            return job.end.time_to_first_token_s, len(tokens), job.end.prompt_tokens - job.end.reused_tokens

        ttfts = []
        for r in range(args.repeats):
            ask(history + f" (copy {r})")
            ask(f"Something else {r}: " + history[::-1])  # takes the slot
            ttft, n, evaluated = ask(history + f" (copy {r})", "Noted.", "Which room is project 5 in?")
            ttfts.append(ttft)
        model.close()
        results[cache_ram] = statistics.median(ttfts)
        label = f"--cache-ram {cache_ram}"
        print(
            f"  {label:<16} {n} prompt tokens, {evaluated} evaluated, "
            f"TTFT {results[cache_ram] * 1000:8.1f} ms"
        )
    print(f"  speed-up {results[0] / results[1024]:.1f}x (goal >= 5x)")


def run(args: argparse.Namespace) -> None:
    from selfhost.quantize.dequantize import dequantize_gguf
    from selfhost.runtime.speculative import SpecSettings

    path = Path(args.model)
    print(
        f"model {path.name}, threads {args.threads}, ctx {args.ctx}, max tokens {args.max_tokens}, "
        f"median of {args.repeats}, load {os.getloadavg()[0]:.2f}"
    )
    print(f"{'':<11}{'workload':<10}{'engine':<22}{'gen':>5}{'tok/s':>9}{'ratio':>9}{'accept':>8}  output")
    plain = load(path, args)
    ngram = load(
        path, args, spec=SpecSettings(mode="ngram", draft_max=args.spec_draft, ngram=args.spec_ngram)
    )
    compare("n-gram", {"none": plain, f"ngram n={args.spec_ngram} k={args.spec_draft}": ngram}, args)
    ngram.close()
    plain.close()
    with tempfile.TemporaryDirectory() as tmp:
        target = dequantize_gguf(path, Path(tmp) / "target-f16.gguf", "f16")
        big = load(target, args)
        drafted = load(target, args, draft_model=str(path))
        compare("draft", {"F16 alone": big, f"F16 + {path.stem[-4:]} draft": drafted}, args)
        drafted.close()
        big.close()
    kv_slots(path, args)
    returning(path, args)
    print(f"load at the end {os.getloadavg()[0]:.2f}")
