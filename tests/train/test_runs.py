"""Run records: metrics.jsonl across --resume, TensorBoard, `selfhost train runs`, plots, piped tables."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")
Image = pytest.importorskip("PIL.Image")

from selfhost.cli import plots  # noqa: E402
from selfhost.cli.app import app  # noqa: E402
from selfhost.events import Progress, Result  # noqa: E402
from selfhost.train import runs  # noqa: E402
from selfhost.train.gpt import trainer  # noqa: E402
from selfhost.train.gpt.config import build_config  # noqa: E402
from tests.conftest import REPO, one_error_line  # noqa: E402
from tests.fakes.terminal import Terminal  # noqa: E402
from tests.train.test_train_gpt import TINY, TINY_FLAGS  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def is_step(ev: object) -> bool:
    """A logged training step (the first "train" Progress, the estimate, has no loss)."""
    return isinstance(ev, Progress) and ev.task == "train" and "loss" in ev.metrics


def run(req: trainer.TrainRequest, stop_at: int | None = None) -> list:
    """Train (the run records itself); a real SIGINT at step `stop_at`."""
    events = []
    try:
        for ev in trainer.train(req):
            events.append(ev)
            if stop_at is not None and is_step(ev) and ev.done == stop_at:
                os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
        events.append("KeyboardInterrupt")
    return events


def rows_of(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in runs.read_metrics(run_dir) if r["kind"] == kind]


def png_is_sane(path: Path, min_size: tuple[int, int] = (400, 250)) -> None:
    """A real picture: plausible size, not one flat colour, several colours drawn."""
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1]
        assert image.width <= 4000 and image.height <= 4000
        rgb = image.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 20
    background = max(colors)[0]
    assert background < 0.97 * rgb.width * rgb.height  # not blank


# -- metrics.jsonl --------------------------------------------------------------------------------
def test_metrics_one_row_per_log_interval_and_continue_after_resume(text_file: Path, tmp_path: Path) -> None:
    cfg = build_config("cpu-tiny", overrides={**TINY, "max_iters": 12, "eval_interval": 4, "log_interval": 2})
    full = run(trainer.TrainRequest(config=cfg, run_dir=tmp_path / "a", data=text_file))
    assert isinstance(full[-1], Result)
    train_rows = rows_of(tmp_path / "a", "train")
    # one row per log interval (and the first step), with every field
    assert [r["step"] for r in train_rows] == [1, 2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in rows_of(tmp_path / "a", "eval")] == [0, 4, 8, 12]
    for r in train_rows:
        assert set(r) >= {"step", "loss", "lr", "tokens_per_s", "elapsed_s"} and r["tokens_per_s"] > 0
    losses = {e.done: e.metrics["loss"] for e in full if is_step(e)}
    assert {r["step"]: r["loss"] for r in train_rows} == losses
    info = runs.read_info(tmp_path / "a")
    assert info["status"] == "done" and info["steps"] == 12 and info["kind"] == "gpt"
    vals = {e.done: e.metrics["val_loss"] for e in full if isinstance(e, Progress) and e.task == "eval"}
    assert info["best"]["val_loss"] == min(vals.values()) and info["final"]["val_loss"] == vals[12]

    # Ctrl-C at step 6, then a crash-like leftover: a row past the checkpoint and a torn line
    part = run(trainer.TrainRequest(config=cfg, run_dir=tmp_path / "b", data=text_file), stop_at=6)
    assert part[-1] == "KeyboardInterrupt" and runs.read_info(tmp_path / "b")["status"] == "interrupted"
    with open(tmp_path / "b" / runs.METRICS_FILE, "a") as fh:
        fh.write('{"kind":"train","step":7,"loss":99.0,"elapsed_s":1}\n{"kind":"train","st')
    run(trainer.TrainRequest(config=cfg, run_dir=tmp_path / "b", resume=True))
    rows = runs.read_metrics(tmp_path / "b")
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == [1, 2, 4, 6, 7, 8, 10, 12]  # 7: the first step after resuming is always logged
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 4, 8, 12]
    resumed = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    for step, loss in losses.items():  # the same numbers as the uninterrupted run
        assert resumed[step] == pytest.approx(loss, abs=1e-6)
    assert resumed[7] != 99.0
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed == sorted(elapsed)  # the clock continues across the resume
    assert (tmp_path / "b" / runs.METRICS_FILE).read_text().endswith("}\n")
    info = runs.read_info(tmp_path / "b")
    assert info["status"] == "done" and info["data"] == str(text_file.resolve())


def test_tensorboard_event_files(text_file: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = build_config("cpu-tiny", overrides={**TINY, "max_iters": 4, "eval_interval": 2, "log_interval": 1})
    req = trainer.TrainRequest(config=cfg, run_dir=tmp_path / "tb", data=text_file, tensorboard=True)
    list(trainer.train(req))
    acc = EventAccumulator(str(tmp_path / "tb" / runs.TENSORBOARD_DIR))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [0, 2, 4]
    first = rows_of(tmp_path / "tb", "train")[0]
    assert acc.Scalars("train/loss")[0].value == pytest.approx(first["loss"], rel=1e-6)


# -- selfhost train runs ------------------------------------------------------------------------
def test_cli_runs_list_show_compare_rm(runner, text_file: Path, tmp_path: Path, isolated_home: Path) -> None:  # noqa: ANN001
    base = ["train", "gpt", "-d", str(text_file), "--iters", "6", "--eval-interval", "3", "--no-export",
            "--log-interval", "1", *TINY_FLAGS]  # fmt: skip
    for name, lr in (("slow", "1e-4"), ("fast", "3e-3")):
        result = runner.invoke(app, [*base, "--name", name, "--lr", lr])
        assert result.exit_code == 0, result.output
    assert "curves:" in result.output and (isolated_home / "runs" / "fast" / runs.CURVE_FILE).is_file()
    assert "(step)" in result.output  # the terminal curve

    listed = runner.invoke(app, ["train", "runs", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    by_name = {r["name"]: r for r in json.loads(listed.output)}
    assert set(by_name) == {"slow", "fast"}
    assert by_name["fast"]["status"] == "done" and by_name["fast"]["steps"] == 6
    assert by_name["fast"]["config"]["learning_rate"] == 3e-3
    table = runner.invoke(app, ["train", "runs", "list"])
    assert "slow" in table.output and "val loss" in table.output

    shown = runner.invoke(app, ["train", "runs", "show", "fast", "--json"])
    data = json.loads(shown.output)
    assert [r["step"] for r in data["metrics"] if r["kind"] == "eval"] == [0, 3, 6]
    assert data["data"] == str(text_file.resolve()) and data["device"]
    shown = runner.invoke(app, ["train", "runs", "show", "fast"])
    assert shown.exit_code == 0, shown.output
    assert "learning_rate=0.003" in shown.output and "wall time" in shown.output

    png = tmp_path / "cmp.png"
    cmp = runner.invoke(app, ["train", "runs", "compare", "slow", "fast", "--plot", str(png)])
    assert cmp.exit_code == 0, cmp.output
    assert "learning_rate" in cmp.output  # the setting that differs gets a column
    png_is_sane(png, min_size=(500, 300))
    with Image.open(png) as image:
        r, g, b = np.asarray(image.convert("RGB"), dtype=int).transpose(2, 0, 1)
    blue = ((b > 150) & (r < 80)).sum()  # tab:blue, the first run
    orange = ((r > 200) & (g > 90) & (g < 160) & (b < 60)).sum()  # tab:orange, the second
    assert blue > 100 and orange > 100  # both runs are drawn

    refused = runner.invoke(app, ["train", "runs", "rm", "slow"])  # no terminal, no --yes
    assert refused.exit_code == 2 and "refusing without a terminal (pass --yes)" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and (isolated_home / "runs" / "slow").is_dir()
    removed = runner.invoke(app, ["train", "runs", "rm", "slow", "--yes", "--json"])
    assert removed.exit_code == 0 and not (isolated_home / "runs" / "slow").exists()
    assert json.loads(removed.stdout) == {"removed": "slow", "path": str(isolated_home / "runs" / "slow")}
    missing = runner.invoke(app, ["train", "runs", "show", "slow"])
    assert missing.exit_code != 0 and missing.output.startswith("error: no training run 'slow'")


def test_terminal_curve_fits_80_columns() -> None:
    from rich.text import Text

    steps = list(range(0, 2001, 10))
    train = runs.Series("train loss", steps, [4.2 / (1 + s / 300) + 0.8 for s in steps])
    val = runs.Series("val loss", steps[::25], [4.3 / (1 + s / 300) + 0.9 for s in steps[::25]])
    drawn = plots.terminal_curve([train, val], width=80, height=12)
    lines = Text.from_ansi(drawn).plain.splitlines()
    assert all(len(line) <= 80 for line in lines), max(len(line) for line in lines)
    assert max(len(line) for line in lines) >= 70  # it uses the room it has
    braille = [line for line in lines if re.search("[\u2801-\u28ff]", line)]
    assert len(braille) >= 10 and "train loss" in drawn and "val loss" in drawn
    assert plots.terminal_curve([runs.Series("one", [5], [1.0])], width=80)  # a single point works


# -- piped output, MNIST runs, misclassified digits --------------------------------------------
@pytest.fixture(scope="module")
def mnist_small(mnist_subset) -> Path:  # noqa: ANN001
    """The first 512 training images and the 10,000 test images (4-digit counts)."""
    return mnist_subset(512, 10_000)


def piped_run(args: list[str], home: Path) -> str:
    """`selfhost ARGS > file` typed in a 60-column terminal (a split pane): stdout piped, stdin that terminal,
    from which Rich would otherwise take the width to cut tables to."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(SELFHOST_HOME=str(home), OMP_NUM_THREADS="2")
    with Terminal(columns=60) as term:
        proc = subprocess.run([sys.executable, "-m", "selfhost", *args], stdin=term.fd, capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_piped_mnist_training_keeps_full_figures(mnist_small: Path, tmp_path: Path, runner) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    args = ["train", "mnist", "--data", str(mnist_small), "--out", str(out), "--limit", "512",
            "--batch-size", "64", "--device", "cpu", "--no-augment"]  # fmt: skip
    stdout = piped_run([*args, "--epochs", "1"], tmp_path / "home")
    rows = [line for line in stdout.splitlines() if re.match(r"^[│|]\s+\d\s+[│|]", line)]
    assert len(rows) == 10, stdout
    for line in rows:  # every confusion row ends with its full accuracy figure, nothing cut
        assert re.search(r"[│|]\s+(\d{1,3}\.\d\d%|-)\s+[│|]$", line), line
    assert "…" not in stdout and "\x1b[" not in stdout
    assert re.search(r"test accuracy \d{1,3}\.\d\d% after 1 epochs", stdout)
    assert f"model saved to {out / 'model.safetensors'}\n" in stdout  # long lines are not wrapped either

    resumed = runner.invoke(app, [*args, "--resume", "--epochs", "2"])
    assert resumed.exit_code == 0 and "resuming after epoch 1" in resumed.output, resumed.output
    rows = runs.read_metrics(out)
    assert [r["epoch"] for r in rows if r["kind"] == "eval"] == [1, 2]
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert train_steps == list(range(1, 17))  # 8 steps an epoch, each logged once, no gap at the resume
    assert all(r["lr"] > 0 and r["images_per_s"] > 0 for r in rows if r["kind"] == "train")
    info = runs.read_info(out)
    assert info["kind"] == "mnist" and info["status"] == "done" and info["epochs"] == 2
    assert info["best"]["test_accuracy"] == max(r["test_accuracy"] for r in rows if r["kind"] == "eval")


def test_mnist_eval_writes_a_grid_of_misclassified_digits(mnist_small: Path, tmp_path: Path, runner) -> None:  # noqa: ANN001
    from selfhost.train.mnist.train import TrainConfig, train

    list(train(TrainConfig(data=mnist_small, out=tmp_path, device="cpu", train_limit=512, batch_size=64,
                           epochs=1, augment=False)))  # fmt: skip
    png = tmp_path / "errors.png"
    model = str(tmp_path / "model.safetensors")
    args = ["mnist", "eval", "--model", model, "--data", str(mnist_small), "--device", "cpu",
            "--errors", str(png), "--max-errors", "12", "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    wrong = report["n"] - sum(report["confusion"][i][i] for i in range(10))
    assert wrong >= 12 and len(report["errors"]) == 12  # a barely trained model makes mistakes
    assert all(e["predicted"] != e["true"] for e in report["errors"])
    png_is_sane(png, min_size=(500, 150))


# -- selfhost compare --plot ----------------------------------------------------------------------
def test_compare_plot(runner, tiny_f32: Path, tmp_path: Path) -> None:  # noqa: ANN001
    from selfhost.quantize.flow import QuantizeOptions, run_quantize

    f32 = tiny_f32
    q8 = tmp_path / "tiny-q8.gguf"
    run_quantize(str(f32), QuantizeOptions(type="Q8_0", out=q8, threads=1, add_to_store=False))
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and then the other one sat there too. " * 40)
    png = tmp_path / "quality.png"
    args = ["compare", str(f32), str(q8), "--text", str(text), "--window", "64", "--chunks", "2",
            "--threads", "1", "--plot", str(png), "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # progress lines go to stderr
    assert [r["quant"] for r in report["rows"]] == ["F32", "Q8_0"]
    png_is_sane(png, min_size=(900, 300))


def test_missing_optional_packages_are_one_line_errors(
    runner, text_file: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    run_dir = isolated_home / "runs" / "handmade"
    run_dir.mkdir(parents=True)
    rows = [{"kind": "train", "step": s, "loss": 3.0 - s / 10, "elapsed_s": s} for s in range(1, 6)]
    (run_dir / runs.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setitem(sys.modules, "plotille", None)  # as if the plot extra were not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    shown = runner.invoke(app, ["train", "runs", "show", "handmade"])
    assert shown.exit_code == 0 and "no curves: plotille is not installed" in shown.output, shown.output
    png = str(isolated_home / "x.png")
    plotted = runner.invoke(app, ["train", "runs", "show", "handmade", "--plot", png])
    assert plotted.exit_code == 1 and plotted.output.startswith("error: matplotlib is not installed")
    assert "selfhost[plot]" in plotted.output and len(plotted.output.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    args = ["train", "gpt", "-d", str(text_file), "--tensorboard", "--no-export", *TINY_FLAGS]
    tb = runner.invoke(app, args)
    assert tb.exit_code == 1 and tb.output.strip() == (
        "error: TensorBoard is not installed (pip install 'selfhost[tensorboard]')"
    )
    assert not (isolated_home / "runs" / "text-gpt").exists()  # refused before anything was written


@pytest.mark.parametrize("command", ["export", "sample"])
def test_gpt_commands_on_a_missing_run_name_it(runner, tmp_path: Path, command: str) -> None:  # noqa: ANN001
    """A name that is no run, and a folder that holds none: one line naming what was asked for."""
    empty = tmp_path / "empty-run"
    empty.mkdir()
    for ref in ("nothing", str(empty)):
        line = one_error_line(runner.invoke(app, ["gpt", command, ref]))
        assert line == f"error: no training run '{ref}' (see `selfhost train runs list`)"
