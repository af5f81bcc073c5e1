"""Pictures of results: training curves, quantization quality, misclassified digits (PNG, matplotlib),
and a small curve for the terminal (plotille's braille plots).

Both libraries come with the `plot` extra and are imported on first use only; matplotlib always
draws off-screen (Agg backend), so it works without a display. PNGs are written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfhost.atomic import atomic_path
from selfhost.errors import DependencyError

if TYPE_CHECKING:
    from selfhost.train.runs import Series

PLOT_HINT = "pip install 'selfhost[plot]'"
_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
           "tab:gray", "tab:olive", "tab:cyan"]  # fmt: skip


def available() -> bool:
    """Whether matplotlib can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise DependencyError("matplotlib is not installed (needed for plots)", hint=PLOT_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


# -- training curves ----------------------------------------------------------------------------
def curves_png(runs: Sequence[tuple[str, dict[str, list[Series]]]], path: Path, title: str = "") -> Path:
    """One panel per metric family (loss, accuracy); every run in its own colour.

    Train loss (per log interval) is a thin line, eval values are dashed with markers."""
    plt = pyplot()
    panels = [p for p in ("loss", "accuracy") if any(p in curves for _, curves in runs)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.4 * max(1, len(panels)), 4.2), squeeze=False,
                             layout="constrained")  # fmt: skip
    for ax, panel in zip(axes[0], panels, strict=False):
        for i, (name, curves) in enumerate(runs):
            color = _COLORS[i % len(_COLORS)]
            for j, s in enumerate(curves.get(panel, [])):
                label = s.label if len(runs) == 1 else f"{name}: {s.label}"
                if s.label == "train loss":
                    ax.plot(s.x, s.y, color=color, linewidth=1.0, alpha=0.55, label=label)
                else:
                    style = ("--", "o") if j % 2 else (":", "s")
                    ax.plot(s.x, s.y, color=color, linestyle=style[0], marker=style[1], markersize=4,
                            linewidth=1.6, label=label)  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def terminal_curve(series: Sequence[Series], width: int = 80, height: int = 12, y_label: str = "loss") -> str:
    """A braille line plot at most `width` columns wide (ANSI colours; Rich strips them off a terminal)."""
    try:
        import plotille
    except ImportError:
        raise DependencyError("plotille is not installed (needed for curves)", hint=PLOT_HINT) from None

    fig = plotille.Figure()
    fig.width = max(10, width - 24)  # the y axis labels and the x axis arrow take ~24 columns
    fig.height = height
    fig.x_label, fig.y_label = "step", y_label
    fig.y_ticks_fkt = lambda low, high: f"{low:.4g}"
    fig.x_ticks_fkt = lambda low, high: f"{low:.0f}"
    xs = [x for s in series for x in s.x]
    ys = [y for s in series for y in s.y]
    if xs:
        fig.set_x_limits(min_=min(xs), max_=max(xs) if max(xs) > min(xs) else min(xs) + 1)
        low, high = min(ys), max(ys)
        pad = (high - low) * 0.05 or abs(high) * 0.05 or 1.0
        fig.set_y_limits(min_=low - pad, max_=high + pad)
    for i, s in enumerate(series):
        if len(s.x) == 1:
            fig.scatter(s.x, s.y, label=s.label, lc=_TERMINAL_COLORS[i % 4], marker="o")
        else:
            fig.plot(s.x, s.y, label=s.label, lc=_TERMINAL_COLORS[i % 4], marker=None if i == 0 else "o")
    return fig.show(legend=True)


_TERMINAL_COLORS = ["blue", "red", "green", "yellow"]


# -- quantization quality -----------------------------------------------------------------------
def quality_png(rows: Sequence[Any], path: Path, title: str = "") -> Path:
    """`selfhost compare`: perplexity increase (%) and tokens/s against file size, one point per model."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    unit, scale = ("GB", 1e9) if max(r.size for r in rows) >= 1e9 else ("MB", 1e6)
    sizes = [r.size / scale for r in rows]
    ref = next((r for r in rows if r.reference), rows[0])
    increase = [100 * (r.ppl - ref.ppl) / ref.ppl for r in rows]
    left.plot(sizes, increase, "o-", color="tab:red")
    for r, x, y in zip(rows, sizes, increase, strict=True):
        left.annotate(f"{r.quant}\n{r.ppl:.3f}", (x, y), textcoords="offset points", xytext=(5, 5),
                      fontsize=8)
    left.set_xlabel(f"file size ({unit})")
    left.set_ylabel(f"perplexity increase over {ref.quant} (%)")
    right.plot(sizes, [r.gen_tok_s for r in rows], "o-", color="tab:blue", label="generation tok/s")
    right.plot(sizes, [r.prompt_tok_s for r in rows], "s--", color="tab:green", label="prompt tok/s")
    for r, x, y in zip(rows, sizes, [r.gen_tok_s for r in rows], strict=True):
        right.annotate(r.quant, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    right.set_xlabel(f"file size ({unit})")
    right.set_ylabel("tokens/s")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# -- misclassified digits -----------------------------------------------------------------------
def digits_png(images: Sequence[Any], predicted: Sequence[int], true: Sequence[int], path: Path,
               columns: int = 8, title: str = "") -> Path:  # fmt: skip
    """A grid of 28x28 images, each titled with its predicted and true label."""
    plt = pyplot()
    n = max(1, len(images))
    rows = (n + columns - 1) // columns
    cols = min(columns, n)
    fig, axes = plt.subplots(rows, cols, figsize=(1.35 * cols, 1.5 * rows + 0.3), squeeze=False,
                             layout="constrained")  # fmt: skip
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, p, t in zip(axes.flat, images, predicted, true, strict=False):
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"pred {p} / true {t}", fontsize=8, color="tab:red")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
