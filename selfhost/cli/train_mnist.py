"""`selfhost train mnist` and `selfhost mnist predict|eval`: flags map onto selfhost.train.mnist."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from selfhost.cli.console import plain
from selfhost.cli.output import Output, fmt_duration
from selfhost.events import Event, Progress

JSON_OPTION = typer.Option("--json", help="Print the result as JSON (progress stays on stderr).")

mnist_app = typer.Typer(
    help="Use the MNIST digit classifier trained by `selfhost train mnist`.", no_args_is_help=True
)


def _percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def _show_epoch(out: Output, ev: Event) -> bool:
    """One line per finished epoch (the "test" Progress); the rest is rendered as usual."""
    if not (isinstance(ev, Progress) and ev.task == "test"):
        return False
    m = ev.metrics
    out.err.print(
        f"epoch {int(ev.done)}/{int(ev.total or 0)}  loss {m['train_loss']:.4f}  "
        f"train {_percent(m['train_accuracy'])}  test {_percent(m['test_accuracy'])}  "
        f"{m['images_per_s']:,.0f} images/s  elapsed {fmt_duration(m['elapsed_s'])}  "
        f"ETA {fmt_duration(m['eta_s'])}",
        markup=False,
        highlight=False,
    )
    return True


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
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Train the MNIST digit classifier (a small CNN: ~99.4% test accuracy in about a minute on a CPU).

    Metrics go to <run>/metrics.jsonl as training goes; `selfhost train runs` shows them."""
    from selfhost.train.common import require_torch

    require_torch(passive_openmp=True)
    from selfhost.cli.common import curves_png
    from selfhost.train.mnist.train import TrainConfig, train

    out_ = Output(as_json)
    config = TrainConfig.validated(dict(
        epochs=epochs, batch_size=batch_size, lr=lr, device=device, seed=seed, augment=augment, out=out,
        data=data, resume=resume, train_limit=limit, test_limit=test_limit, tensorboard=tensorboard,
    ))  # fmt: skip
    done = out_.run(train(config), on_event=lambda ev: _show_epoch(out_, ev))
    curves = curves_png(done.model_path.parent)
    out_.result({**vars(done), "curves": curves}, lambda _: _print_trained(out_, done, curves))


def _print_trained(out: Output, done: Any, curves: Path | None) -> None:
    from selfhost.cli.common import draw_curves

    draw_curves(out, done.model_path.parent)
    if curves is not None:
        out.console.print(f"curves: {curves}", markup=False)
    out.console.print(_confusion_table(done.confusion, "confusion matrix on the test set (rows: true digit)"))
    took = fmt_duration(done.elapsed_s)
    out.console.print(
        plain("test accuracy ")
        + plain(_percent(done.test_accuracy), style="bold")
        + plain(f" after {done.epochs} epochs ({took}); model saved to {done.model_path}"),
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
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Print the digit in each image and the top-3 probabilities."""
    from selfhost.train.mnist.predict import predict as run

    out = Output(as_json)
    out.result(list(run(images, model, device)), lambda found: _print_predictions(out, found))


def _print_predictions(out: Output, predictions: list[Any]) -> None:
    from rich.table import Table

    table = Table()
    for column in ("image", "digit", "top 3"):
        table.add_column(column)
    for p in predictions:
        table.add_row(
            plain(p.path), plain(p.digit, style="bold"), "  ".join(f"{d}: {_percent(v)}" for d, v in p.top)
        )
    out.console.print(table)


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
    from selfhost.train.mnist.predict import evaluate_saved

    if errors is not None:
        from selfhost.cli import plots

        plots.pyplot()  # a missing matplotlib fails now, not after the evaluation
    out = Output(as_json)
    report = out.run(evaluate_saved(model, data, device, limit, max_errors if errors else 0))
    if errors is not None:
        _errors_png(report, errors)
    out.result({**report.to_json(), "errors_png": errors}, lambda _: _print_report(out, report, errors))


def _print_report(out: Output, report: Any, errors: Path | None) -> None:
    trained = report.metadata.get("epochs_done", "?")
    out.console.print(_confusion_table(report.confusion, "confusion matrix (rows: true digit)"))
    out.console.print(
        plain(f"{report.model_path} ({trained} epochs): test accuracy ")
        + plain(_percent(report.accuracy), style="bold")
        + plain(f" on {report.n:,} images, loss {report.loss:.4f}"),
        highlight=False,
    )
    if errors is not None:
        out.console.print(f"misclassified digits: {errors} ({len(report.errors)} shown)", markup=False)


def _errors_png(report: Any, path: Path) -> None:
    from selfhost.cli import plots

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
