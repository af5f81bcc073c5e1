"""Quality report: size, bits per weight, perplexity and speed of several GGUF files on one text.

The reference is the highest-precision input (most bits per weight); every row reports its
perplexity increase over it, like llama.cpp's published quantization table.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from selfhost.errors import UsageError
from selfhost.events import Events, Progress, Result, nested
from selfhost.quantize.perplexity import perplexity
from selfhost.runtime import gguf_info


class QualityRow(BaseModel):
    name: str
    path: Path
    quant: str
    size: int
    bpw: float
    ppl: float
    ppl_increase: float | None = None  # vs the reference; None for the reference itself
    prompt_tok_s: float
    gen_tok_s: float
    reference: bool = False


class QualityReport(BaseModel):
    rows: list[QualityRow]
    window: int
    n_windows: int
    n_scored: int


def compare(
    models: list[str],
    text: str,
    *,
    window: int = 256,
    chunks: int | None = 8,
    threads: int | None = None,
    gen_tokens: int = 32,
) -> Events:
    """Evaluate every model (store name or .gguf path) on `text`; rows sorted by size, largest first.

    Yields Progress of task "perplexity <model>" per window; ends with Result(QualityReport)."""
    from selfhost.models.resolve import resolve_model

    if not models:
        raise UsageError("name at least one model to evaluate")
    resolved = [resolve_model(m, purpose="load") for m in models]
    infos = [gguf_info.inspect(r.path) for r in resolved]  # fail on a bad file before the slow part

    rows, results = [], []
    for model, info in zip(resolved, infos, strict=True):
        yield Progress(f"perplexity {model.name}", 0, None, unit="windows")  # loading the model
        result = yield from nested(perplexity(
            model.path, text, window=window, chunks=chunks, threads=threads, gen_tokens=gen_tokens,
            label=model.name,
        ))
        results.append(result)
        rows.append(QualityRow(
            name=model.name, path=model.path, quant=info.quant, size=info.size,
            bpw=round(info.bits_per_weight, 3), ppl=result.ppl,
            prompt_tok_s=result.prompt_tok_s, gen_tok_s=result.gen_tok_s,
        ))

    windows = {(r.window, r.n_scored) for r in results}
    if len(windows) > 1:  # different context limits clamp the window differently: not comparable
        raise UsageError("these models were scored on different windows; pass a --window all of them support")
    reference = max(rows, key=lambda r: r.bpw)
    for row in rows:
        row.reference = row is reference
        row.ppl_increase = None if row.reference else row.ppl - reference.ppl
    rows.sort(key=lambda r: -r.bpw)
    yield Result(QualityReport(
        rows=rows, window=results[0].window, n_windows=results[0].n_windows, n_scored=results[0].n_scored
    ))
