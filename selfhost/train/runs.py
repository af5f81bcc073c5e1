"""Run records: what a training run did, kept beside its checkpoints so it can be looked at later.

The trainers (`train.gpt.trainer`, `train.mnist.train`) keep a `RunRecorder` as they go, which
writes, in the run folder:

- `metrics.jsonl`: one JSON object per line and per log interval (`"kind": "train"`) or eval/epoch
  (`"kind": "eval"`): step, losses/accuracies, lr, tokens/s or images/s, elapsed seconds. Each row is
  one `write` to a file opened for appending (a crash can only leave a torn last line, which readers
  skip); a resumed run first rewrites the file atomically to the rows of its checkpoint's steps, so
  the log continues without duplicates or gaps. pandas reads it with `read_json(path, lines=True)`.
- `run.json`: kind, config, data, device, status, best and final metrics, wall time, exported model.
- `tensorboard/` (optional): the same scalars as TensorBoard event files.

No torch, matplotlib or Rich here; `selfhost.plots` draws what this module reads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from selfhost import atomic, paths
from selfhost.errors import DependencyError, NotFoundError, UsageError

METRICS_FILE = "metrics.jsonl"
INFO_FILE = "run.json"
CURVE_FILE = "curve.png"
TENSORBOARD_DIR = "tensorboard"
# Files that make a folder a training run (older runs have no run.json yet).
_RUN_MARKERS = (INFO_FILE, METRICS_FILE, "ckpt.pt", "model.safetensors")


# -- metrics.jsonl ------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete row of a run's metrics.jsonl (a torn last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text("utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class MetricsLog:
    """Appends rows to metrics.jsonl, one complete line per `os.write`."""

    def __init__(self, run_dir: Path, keep: Any = None) -> None:
        """`keep(row) -> bool` selects the rows of an earlier invocation to continue from (None: none)."""
        self.path = Path(run_dir) / METRICS_FILE
        kept = [row for row in read_metrics(run_dir) if keep(row)] if keep else []
        atomic.write_text(self.path, "".join(_line(row) for row in kept))
        self.kept = kept
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, row: dict[str, Any]) -> None:
        if self._fd is not None:
            os.write(self._fd, _line(row).encode("utf-8"))

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


def _line(row: dict[str, Any]) -> str:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, separators=(",", ":")) + "\n"


# -- TensorBoard --------------------------------------------------------------------------------
class _TensorBoard:
    """Scalars as TensorBoard event files in <run>/tensorboard (needs the `tensorboard` package)."""

    def __init__(self, run_dir: Path, purge_step: int | None) -> None:
        writer_class = require_tensorboard()
        self.writer = writer_class(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge_step)

    def write(self, row: dict[str, Any]) -> None:
        prefix = "train" if row["kind"] == "train" else "eval"
        for key, value in row.items():
            if key not in ("kind", "step", "epoch") and isinstance(value, int | float):
                self.writer.add_scalar(f"{prefix}/{key}", value, row["step"])

    def close(self) -> None:
        self.writer.close()


def require_tensorboard() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DependencyError(
            "TensorBoard is not installed", hint="pip install 'selfhost[tensorboard]'"
        ) from None
    return SummaryWriter


# -- run.json -----------------------------------------------------------------------------------
def read_info(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / INFO_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_info(run_dir: Path, info: dict[str, Any]) -> None:
    info["updated"] = _now()
    atomic.write_text(Path(run_dir) / INFO_FILE, json.dumps(info, indent=2, default=str) + "\n")


def note_export(run_dir: Path, name: str | None, path: Path) -> None:
    """Remember in run.json which model file (and store name) a run was exported to."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any((run_dir / m).exists() for m in _RUN_MARKERS):
        return
    info = read_info(run_dir)
    info["exported"] = {"name": name, "path": str(path)}
    write_info(run_dir, info)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- recording a run ----------------------------------------------------------------------------
class RunRecorder:
    """Writes a run's metrics rows and run.json as its trainer goes (gpt and mnist alike).

    A run starts (start_step 0) or continues after step `start_step`, keeping the earlier rows that
    `keep(row)` selects. `enabled=False` (the other ranks of a DDP run) writes nothing."""

    def __init__(self, run_dir: Path, kind: str, info: dict[str, Any], *, start_step: int = 0,
                 keep: Callable[[dict[str, Any]], bool] | None = None, tensorboard: bool = False,
                 data: Path | None = None, enabled: bool = True) -> None:  # fmt: skip
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.log: MetricsLog | None = None
        self.tb: _TensorBoard | None = None
        self.t0 = time.perf_counter()
        if not enabled:
            return
        previous = read_info(self.run_dir) if start_step else {}
        self.log = MetricsLog(self.run_dir, keep if start_step else None)
        self.base_elapsed = max((r.get("elapsed_s") or 0.0 for r in self.log.kept), default=0.0)
        if not start_step:  # a new run in this folder: earlier event files describe another run
            shutil.rmtree(self.run_dir / TENSORBOARD_DIR, ignore_errors=True)
        if tensorboard:
            self.tb = _TensorBoard(self.run_dir, purge_step=start_step + 1 if start_step else None)
        created = previous.get("created", _now())
        data_path = str(Path(data).resolve()) if data else previous.get("data")
        self.info = {**previous, "name": self.run_dir.name, "kind": kind, "created": created,
                     "data": data_path, "status": "running", **info}  # fmt: skip
        self.info.setdefault("best", {})
        self.info.setdefault("final", {})
        write_info(self.run_dir, self.info)

    def elapsed(self) -> float:
        return round(self.base_elapsed + time.perf_counter() - self.t0, 3)

    def row(self, row: dict[str, Any], durable: bool = False) -> None:
        """Append one metrics row (`kind` train or eval, `step`, metrics); `durable`: also sync run.json."""
        if self.log is None:
            return
        row["elapsed_s"] = self.elapsed()
        self.log.append(row)
        if self.tb is not None:
            self.tb.write(row)
        self.info["steps"] = row["step"]
        self.info["wall_s"] = row["elapsed_s"]
        if durable:
            self.log.sync()
            write_info(self.run_dir, self.info)

    def eval_row(self, row: dict[str, Any], best_key: str, higher_is_better: bool = False) -> None:
        """An eval: the final metrics, the best one so far by `best_key`, and a durable row."""
        if self.log is None:
            return
        metrics = {k: v for k, v in row.items() if k not in ("kind", "images_per_s")}
        self.info["final"] = metrics
        best = self.info["best"].get(best_key)
        value = row[best_key]
        if best is None or (value > best if higher_is_better else value < best):
            keys = ("step", "epoch", best_key)
            self.info["best"] = {k: row[k] for k in keys if k in row}
        self.row({"kind": "eval", **row}, durable=True)

    def end(self, status: str, **info: Any) -> None:
        """The run stopped (`done`, `interrupted`, `failed`); `info` is added to run.json."""
        if self.log is None:
            return
        self.log.close()
        if self.tb is not None:
            self.tb.close()
        self.info.update(info, status=status, wall_s=self.elapsed())
        write_info(self.run_dir, self.info)
        self.log = None


@contextmanager
def recording(recorder: RunRecorder) -> Iterator[RunRecorder]:
    """End the record with `done`, `interrupted` (Ctrl-C, or the consumer stopped the trainer's
    generator early) or `failed`, whichever way the block is left; an explicit end() wins."""
    status = "failed"
    try:
        yield recorder
        status = "done"
    except (KeyboardInterrupt, GeneratorExit):
        status = "interrupted"
        raise
    finally:
        recorder.end(status)


# -- looking at runs ----------------------------------------------------------------------------
@dataclass
class RunSummary:
    name: str
    path: Path
    kind: str  # gpt | mnist | unknown
    status: str  # running | done | interrupted | failed | unknown
    steps: int | None = None
    max_steps: int | None = None
    wall_s: float | None = None
    device: str | None = None
    created: str | None = None
    updated: str | None = None
    data: str | None = None
    best: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    exported: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def is_run(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in _RUN_MARKERS)


def find_run(ref: str | Path) -> Path:
    """A run by name (a folder under SELFHOST_HOME/runs) or by its folder's path."""
    path = Path(ref)
    candidates = [paths.runs_dir() / str(ref)] if len(path.parts) == 1 else []
    candidates.append(path)
    for candidate in candidates:
        if is_run(candidate):
            return candidate
    raise NotFoundError(f"no training run '{ref}'", hint="see `selfhost train runs list`")


def find_checkpoint(ref: str | Path) -> Path:
    """What `gpt export|sample` read: a checkpoint file (.pt) as given, else a run by name or folder."""
    path = Path(ref)
    if path.is_file():
        return path
    return find_run(ref)


def summarize(run_dir: Path) -> RunSummary:
    run_dir = Path(run_dir)
    info = read_info(run_dir)
    kind = info.get("kind") or ("gpt" if (run_dir / "ckpt.pt").exists()
                                else "mnist" if (run_dir / "model.safetensors").exists() else "unknown")
    device = info.get("device_name") or info.get("device")
    if info.get("device_name") and info.get("device") and info["device"] not in info["device_name"].lower():
        device = f"{info['device']} ({info['device_name']})"
    return RunSummary(
        name=run_dir.name, path=run_dir, kind=kind, status=info.get("status", "unknown"),
        steps=info.get("steps"), max_steps=info.get("max_steps"), wall_s=info.get("wall_s"), device=device,
        created=info.get("created"), updated=info.get("updated"), data=info.get("data"),
        best=info.get("best") or {}, final=info.get("final") or {}, exported=info.get("exported"),
        config=info.get("config") or {},
    )  # fmt: skip


def list_runs() -> list[RunSummary]:
    """Every run under SELFHOST_HOME/runs, most recently updated first."""
    runs = [summarize(p) for p in sorted(paths.runs_dir().iterdir()) if is_run(p)]
    return sorted(runs, key=lambda r: r.updated or "", reverse=True)


def remove_run(ref: str | Path) -> RunSummary:
    """Delete a run folder (checkpoints, logs, plots). Exported models stay in the store."""
    run_dir = find_run(ref)
    summary = summarize(run_dir)
    if summary.status == "running" and _recently_updated(run_dir):
        raise UsageError(f"run '{summary.name}' looks like it is still training",
                         hint="stop it first (Ctrl-C), then remove it")  # fmt: skip
    shutil.rmtree(run_dir)
    return summary


def _recently_updated(run_dir: Path, seconds: float = 120.0) -> bool:
    newest = max((p.stat().st_mtime for p in run_dir.iterdir() if p.is_file()), default=0.0)
    return time.time() - newest < seconds


@dataclass
class Series:
    """One curve: x (steps) and y values of one metric of one run."""

    label: str
    x: list[float]
    y: list[float]


def series(rows: list[dict[str, Any]], kind: str, metric: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[metric]) for r in rows if r.get("kind") == kind and r.get(metric) is not None]
    return [float(x) for x, _ in points], [float(y) for _, y in points]


def curves(run_dir: Path) -> dict[str, list[Series]]:
    """A run's curves by panel: 'loss' (train loss, eval losses) and 'accuracy' (mnist)."""
    rows = read_metrics(run_dir)
    panels: dict[str, list[Series]] = {"loss": [], "accuracy": []}
    for kind, metric, panel in (("train", "loss", "loss"), ("eval", "val_loss", "loss"),
                                ("eval", "test_loss", "loss"), ("eval", "train_accuracy", "accuracy"),
                                ("eval", "test_accuracy", "accuracy")):  # fmt: skip
        x, y = series(rows, kind, metric)
        if x:
            label = "train loss" if (kind, metric) == ("train", "loss") else metric.replace("_", " ")
            panels[panel].append(Series(label, x, y))
    return {k: v for k, v in panels.items() if v}


def require_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = read_metrics(run_dir)
    if not rows:
        raise NotFoundError(f"run '{Path(run_dir).name}' has no metrics yet ({METRICS_FILE})",
                            hint="runs record their metrics from this version of selfhost on")  # fmt: skip
    return rows
