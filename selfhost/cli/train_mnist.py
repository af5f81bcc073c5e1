"""`selfhost train mnist` and `selfhost mnist predict|eval`: flags map onto selfhost.train.mnist."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from selfhost.cli.console import console, plain

mnist_app = typer.Typer(
    help="Use the MNIST digit classifier trained by `selfhost train mnist`.", no_args_is_help=True
)


def _percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class _Renderer:
    """Renders the core's events: download bars, one bar per epoch, one line per finished epoch."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.tasks: dict[Any, Any] = {}

    def __enter__(self) -> _Renderer:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def handle(self, event: object) -> None:
        from selfhost.train.mnist import download as dl

        p = self.progress
        if isinstance(event, dl.FileProgress):
            key = ("file", event.file)
            if key not in self.tasks:
                self.tasks[key] = p.add_task(f"download {event.file}", total=event.total, info="")
            p.update(self.tasks[key], completed=event.received, total=event.total)
        elif isinstance(event, dl.MirrorFailed):
            key = ("file", event.file)
            if key in self.tasks:
                p.remove_task(self.tasks.pop(key))
            p.console.print(
                f"{event.url} failed ({event.reason}); trying the next mirror",
                style="yellow",
                markup=False,
                highlight=False,
            )
        elif isinstance(event, dl.FileReady):
            key = ("file", event.file)
            if key in self.tasks:
                p.remove_task(self.tasks.pop(key))
            if event.downloaded:
                p.console.print(f"downloaded and verified {event.path}", highlight=False, markup=False)


def _render_training(events: Any) -> Any:
    from selfhost.train.mnist.train import EpochEnd, Finished, Started, Step

    finished = None
    with _Renderer() as view:
        p = view.progress
        for event in events:
            if isinstance(event, Started):
                where = f"{event.threads} CPU threads" if event.threads else "GPU"
                resumed = f", resuming after epoch {event.start_epoch}" if event.start_epoch else ""
                p.console.print(
                    f"training on {event.device} ({where}): {event.n_train:,} images, test {event.n_test:,}, "
                    f"{event.parameters:,} parameters, {event.epochs} epochs{resumed}",
                    highlight=False,
                    markup=False,
                )
            elif isinstance(event, Step):
                key = ("epoch", event.epoch)
                if key not in view.tasks:
                    view.tasks[key] = p.add_task(f"epoch {event.epoch}", total=event.steps, info="")
                p.update(view.tasks[key], completed=event.step, info=f"loss {event.loss:.4f}")
            elif isinstance(event, EpochEnd):
                task = view.tasks.pop(("epoch", event.epoch), None)
                if task is not None:
                    p.remove_task(task)
                p.console.print(
                    f"epoch {event.epoch}/{event.epochs}  loss {event.train_loss:.4f}  "
                    f"train {_percent(event.train_accuracy)}  test {_percent(event.test_accuracy)}  "
                    f"{event.images_per_s:,.0f} images/s  elapsed {_duration(event.elapsed_s)}  "
                    f"ETA {_duration(event.eta_s)}",
                    highlight=False,
                )
            elif isinstance(event, Finished):
                finished = event
            else:
                view.handle(event)
    return finished


def _confusion_table(confusion: list[list[int]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("true \\ predicted", justify="right")
    for digit in range(10):
        table.add_column(str(digit), justify="right")
    table.add_column("accuracy", justify="right")
    for digit, row in enumerate(confusion):
        total = sum(row)
        cells = [f"[bold]{n}[/]" if i == digit else (str(n) if n else "[dim]·[/]") for i, n in enumerate(row)]
        table.add_row(str(digit), *cells, _percent(row[digit] / total) if total else "-")
    return table


def train_mnist(
    epochs: Annotated[
        int | None, typer.Option(help="Epochs (default 5; with --resume: the run's own).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the one-cycle schedule (AdamW).")] = 0.01,
    device: Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed (weights, shuffling, augmentation).")] = 0,
    augment: Annotated[bool, typer.Option(help="Random small rotations, shifts and scales.")] = True,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default SELFHOST_HOME/runs/mnist).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Directory with the four MNIST IDX files (gz or not); default: download once."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last epoch.")
    ] = False,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Train on the first N training images only.")
    ] = None,
    test_limit: Annotated[
        int | None, typer.Option(min=1, help="Test on the first N test images only.")
    ] = None,
    tensorboard: Annotated[
        bool, typer.Option("--tensorboard", help="Also write TensorBoard event files (run/tensorboard).")
    ] = False,
) -> None:
    """Train the MNIST digit classifier (a small CNN: ~99.4% test accuracy in about a minute on a CPU).

    Metrics go to <run>/metrics.jsonl as training goes; `selfhost train runs` shows them."""
    from selfhost.cli.train_runs import print_curves
    from selfhost.train import runs
    from selfhost.train.mnist.train import TrainConfig, train

    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        device=device,
        seed=seed,
        augment=augment,
        out=out,
        data=data,
        resume=resume,
        train_limit=limit,
        test_limit=test_limit,
    )
    settings = {k: v for k, v in vars(config).items() if k not in ("out", "data", "resume")}
    events = runs.record(train(config), tensorboard=tensorboard, data=data, config=settings)
    done = _render_training(events)
    if done is None:
        return
    print_curves(done.model_path.parent)
    console.print(_confusion_table(done.confusion, "confusion matrix on the test set (rows: true digit)"))
    console.print(
        plain("test accuracy ")
        + plain(_percent(done.test_accuracy), style="bold")
        + plain(
            f" after {done.epochs} epochs ({_duration(done.elapsed_s)}); model saved to {done.model_path}"
        ),
        highlight=False,
    )


MODEL_OPTION = typer.Option(help="Model file (default: the last one `selfhost train mnist` saved).")


def predict(
    images: Annotated[
        list[Path],
        typer.Argument(metavar="IMAGE...", help="PNG/JPG images of one digit each (any size/polarity)."),
    ],
    model: Annotated[Path | None, MODEL_OPTION] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "cpu",
) -> None:
    """Print the digit in each image and the top-3 probabilities."""
    from rich.table import Table

    from selfhost.train.mnist.predict import predict as run

    table = Table()
    for column in ("image", "digit", "top 3"):
        table.add_column(column)
    for p in run(images, model, device):
        table.add_row(
            plain(p.path), plain(p.digit, style="bold"), "  ".join(f"{d}: {_percent(v)}" for d, v in p.top)
        )
    console.print(table)


def evaluate(
    model: Annotated[Path | None, MODEL_OPTION] = None,
    data: Annotated[
        Path | None, typer.Option(help="Directory with the MNIST IDX files (default: download).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    limit: Annotated[int | None, typer.Option(min=1, help="Test on the first N test images only.")] = None,
    errors: Annotated[
        Path | None, typer.Option("--errors", help="Write a PNG grid of misclassified test digits.")
    ] = None,
    max_errors: Annotated[int, typer.Option(min=1, help="Digits in the --errors grid at most.")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Re-measure a saved model's accuracy on the MNIST test set."""
    from selfhost.train.mnist.predict import EvalReport, evaluate_saved

    if errors is not None:
        from selfhost import plots

        plots.pyplot()  # a missing matplotlib fails now, not after the evaluation
    report = None
    with _Renderer() as view:
        for event in evaluate_saved(model, data, device, limit, max_errors if errors else 0):
            if isinstance(event, EvalReport):
                report = event
            else:
                view.handle(event)
    assert report is not None
    if errors is not None:
        _errors_png(report, errors)
    if as_json:
        import json
        import sys

        data_out = {"model": str(report.model_path), "accuracy": report.accuracy, "loss": report.loss,
                    "n": report.n, "confusion": report.confusion,
                    "errors_png": str(errors) if errors else None,
                    "errors": [{"index": e.index, "true": e.true, "predicted": e.predicted}
                               for e in report.errors]}  # fmt: skip
        sys.stdout.write(json.dumps(data_out, indent=2) + "\n")
        return
    trained = report.metadata.get("epochs_done", "?")
    console.print(_confusion_table(report.confusion, "confusion matrix (rows: true digit)"))
    console.print(
        plain(f"{report.model_path} ({trained} epochs): test accuracy ")
        + plain(_percent(report.accuracy), style="bold")
        + plain(f" on {report.n:,} images, loss {report.loss:.4f}"),
        highlight=False,
    )
    if errors is not None:
        console.print(f"misclassified digits: {errors} ({len(report.errors)} shown)", markup=False)


def _errors_png(report: Any, path: Path) -> None:
    from selfhost import plots

    wrong = report.n - sum(report.confusion[i][i] for i in range(10))
    shown = len(report.errors)
    title = f"{wrong} of {report.n:,} test digits misclassified"
    title += f" (first {shown})" if shown < wrong else ""
    plots.digits_png([e.image for e in report.errors], [e.predicted for e in report.errors],
                     [e.true for e in report.errors], path, title=title)  # fmt: skip


def register(app: typer.Typer, train: typer.Typer) -> None:
    train.command("mnist")(train_mnist)
    mnist_app.command("predict")(predict)
    mnist_app.command("eval")(evaluate)
    app.add_typer(mnist_app, name="mnist")
