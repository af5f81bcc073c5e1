"""Training, checkpoints, resume, prediction on rendered images, and the CLI (real torch, real data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selfhost.cli.app import app
from selfhost.errors import DependencyError, IntegrityError, NotFoundError, UsageError
from selfhost.events import Notice, Progress, Result
from selfhost.train.common import require_torch
from selfhost.train.mnist.idx import load_mnist

try:
    torch = require_torch(passive_openmp=True)  # first: torch loads with the trainer's OpenMP settings
except DependencyError:
    pytest.skip("PyTorch is not installed", allow_module_level=True)
PIL = pytest.importorskip("PIL.Image")

from selfhost.train.mnist.predict import evaluate_saved, predict, preprocess  # noqa: E402
from selfhost.train.mnist.train import TrainConfig, TrainResult, load_classifier, train  # noqa: E402


def is_epoch_end(event: object) -> bool:
    """The Progress of the task "test": one per epoch, with the epoch's train and test metrics."""
    return isinstance(event, Progress) and event.task == "test"


def epoch_ends(events: list) -> list[Progress]:
    return [e for e in events if is_epoch_end(e)]


def result_of(events) -> TrainResult:  # noqa: ANN001
    results = [e.value for e in events if isinstance(e, Result)]
    assert len(results) == 1
    return results[0]


@pytest.fixture(scope="module")
def small_data(mnist_subset) -> Path:  # noqa: ANN001
    return mnist_subset(1024, 256)


@pytest.fixture(scope="module")
def trained(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult, list]:
    """Two epochs on the first 10,000 training images, tested on the first 2,000 test images (CPU)."""
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        data=mnist_dir, out=out, epochs=2, device="cpu", train_limit=10_000, test_limit=2_000
    )
    events = list(train(config))
    assert isinstance(events[-1], Result)
    return out, events[-1].value, events


@pytest.mark.slow
def test_short_training_learns(trained: tuple[Path, TrainResult, list]) -> None:
    out, done, events = trained
    started = events[0]
    assert isinstance(started, Notice) and "10,000 images, test 2,000" in started.message
    epochs = epoch_ends(events)
    assert [e.done for e in epochs] == [1, 2] and epochs[-1].finished
    assert isinstance(done, TrainResult) and done.test_accuracy >= 0.95, done.test_accuracy
    assert epochs[1].metrics["train_loss"] < epochs[0].metrics["train_loss"]
    assert epochs[1].metrics["test_accuracy"] == done.test_accuracy
    assert sum(map(sum, done.confusion)) == 2_000
    assert sum(done.confusion[i][i] for i in range(10)) == round(done.test_accuracy * 2_000)
    assert all(e.metrics["images_per_s"] > 0 for e in epochs)
    steps = [e for e in events if isinstance(e, Progress) and e.task.startswith("epoch ")]
    assert steps[-1].task == "epoch 2" and steps[-1].finished and steps[-1].metrics["lr"] > 0

    model, metadata = load_classifier(out / "model.safetensors")
    assert metadata["format"] == "selfhost-mnist" and metadata["epochs_done"] == "2"
    assert float(metadata["test_accuracy"]) == pytest.approx(done.test_accuracy, abs=1e-6)


def render(
    digit: np.ndarray, path: Path, size: tuple[int, int], invert: bool, offset: tuple[int, int]
) -> None:
    """An MNIST digit scaled up, on a bigger canvas, off-centre, optionally dark-on-light."""
    image = PIL.fromarray(255 - digit if invert else digit)
    image = image.resize(size, PIL.Resampling.BICUBIC)
    canvas = PIL.new("L", (size[0] + 90, size[1] + 60), 255 if invert else 0)
    canvas.paste(image, offset)
    canvas.convert("RGB").save(path)


@pytest.mark.slow
def test_saved_model_predicts_rendered_digits(trained, mnist_dir: Path, tmp_path: Path, runner) -> None:
    out, _, _ = trained
    test = load_mnist(mnist_dir)
    images, labels = [], []
    for i in range(6):  # test digits 7 2 1 0 4 1: dark-on-light PNG/JPG and light-on-dark, various sizes
        path = tmp_path / f"digit{i}.{'jpg' if i == 3 else 'png'}"
        render(test.test_images[i], path, (84 + 20 * i, 112), invert=i % 2 == 0, offset=(10 * i, 30))
        images.append(path)
        labels.append(int(test.test_labels[i]))

    # Preprocessing rebuilds an MNIST-like image: ink on black, 20x20 box, mass centred.
    pixels = preprocess(images[0]).astype(float)
    assert pixels.shape == (28, 28) and pixels.max() == 255 and pixels[0].sum() == 0
    ys, xs = np.indices(pixels.shape)
    assert (
        abs((ys * pixels).sum() / pixels.sum() - 14) < 1 and abs((xs * pixels).sum() / pixels.sum() - 14) < 1
    )
    rows = np.flatnonzero(pixels.max(axis=1) > 0)
    assert 19 <= rows[-1] - rows[0] + 1 <= 21

    predictions = list(predict(images, out / "model.safetensors"))
    assert [p.digit for p in predictions] == labels
    model = load_classifier(out / "model.safetensors")[0]
    for path, p in zip(images, predictions, strict=True):
        assert len(p.top) == 3 and p.top[0][1] >= p.top[1][1] >= p.top[2][1]
        # the probabilities are the saved network's softmax on the MNIST-normalised pixels
        pixels = torch.from_numpy(preprocess(path)).float()[None, None] / 255.0
        with torch.no_grad():
            probs = torch.softmax(model((pixels - 0.1307) / 0.3081), dim=1)[0]
        assert [(d, pytest.approx(float(probs[d]), abs=1e-6)) for d, _ in p.top] == p.top
        assert p.top[0][1] > 0.5 and sum(prob for _, prob in p.top) <= 1 + 1e-6

    result = runner.invoke(
        app, ["mnist", "predict", str(images[0]), str(images[1]), "--model", str(out / "model.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert "digit0.png" in result.output and "digit1.png" in result.output
    lines = [line for line in result.output.splitlines() if "digit0.png" in line]
    assert f"│ {labels[0]} " in lines[0]


@pytest.mark.slow
def test_eval_remeasures_the_saved_model(trained, mnist_dir: Path, runner) -> None:
    out, done, _ = trained
    report = list(evaluate_saved(out / "model.safetensors", mnist_dir, "cpu", limit=2_000))[-1].value
    assert report.accuracy == pytest.approx(done.test_accuracy) and report.confusion == done.confusion
    result = runner.invoke(
        app,
        [
            "mnist",
            "eval",
            "--model",
            str(out / "model.safetensors"),
            "--data",
            str(mnist_dir),
            "--limit",
            "2000",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"test accuracy {100 * done.test_accuracy:.2f}%" in result.output
    assert "confusion matrix" in result.output and "on 2,000 images" in result.output


def tiny(data: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(data=data, out=out, device="cpu", train_limit=512, batch_size=64, **kw)


def test_resume_continues_an_interrupted_run(small_data: Path, tmp_path: Path) -> None:
    events = train(tiny(small_data, tmp_path, epochs=2))
    for event in events:  # stop after the first epoch, as Ctrl-C would
        if is_epoch_end(event):
            break
    events.close()
    first = load_classifier(tmp_path / "model.safetensors")[1]
    assert first["epochs_done"] == "1"
    resumed = list(train(tiny(small_data, tmp_path, resume=True)))
    assert isinstance(resumed[0], Notice) and resumed[0].message.endswith("2 epochs, resuming after epoch 1")
    assert [(e.done, e.total) for e in epoch_ends(resumed)] == [(2, 2)]
    assert load_classifier(tmp_path / "model.safetensors")[1]["epochs_done"] == "2"
    with pytest.raises(UsageError, match="already trained 2 epochs"):
        list(train(tiny(small_data, tmp_path, resume=True)))
    with pytest.raises(NotFoundError, match="nothing to resume"):
        list(train(tiny(small_data, tmp_path / "empty", resume=True)))


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(small_data: Path, tmp_path: Path) -> None:
    """Training is deterministic: stop after epoch 1, resume, and the weights equal a straight 2-epoch run."""
    straight = result_of(train(tiny(small_data, tmp_path / "a", epochs=2)))
    events = train(tiny(small_data, tmp_path / "b", epochs=2))
    for event in events:
        if is_epoch_end(event):
            break
    events.close()
    after_one = load_classifier(tmp_path / "b" / "model.safetensors")[0].state_dict()
    resumed = result_of(train(tiny(small_data, tmp_path / "b", resume=True)))
    wa = load_classifier(straight.model_path)[0].state_dict()
    wb = load_classifier(resumed.model_path)[0].state_dict()
    assert not all(torch.equal(wa[k], after_one[k]) for k in wa)  # epoch 2 changed the weights
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-6, msg=name)
    assert resumed.test_accuracy == pytest.approx(straight.test_accuracy)


def test_same_seed_same_model(small_data: Path, tmp_path: Path) -> None:
    a = result_of(train(tiny(small_data, tmp_path / "a", epochs=1)))
    b = result_of(train(tiny(small_data, tmp_path / "b", epochs=1)))
    wa, wb = (load_classifier(x.model_path)[0].state_dict() for x in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_corrupt_model_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(IntegrityError, match="not a readable safetensors file"):
        load_classifier(bad)


# ---- the CLI ------------------------------------------------------------------------------------


def test_cli_train_and_resume(small_data: Path, tmp_path: Path, runner) -> None:
    args = [
        "train",
        "mnist",
        "--data",
        str(small_data),
        "--out",
        str(tmp_path),
        "--limit",
        "512",
        "--test-limit",
        "200",
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "--no-augment",
    ]
    result = runner.invoke(app, [*args, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "training on cpu" in result.output and "512 images, test 200" in result.output
    assert "epoch 1/1" in result.output
    assert "images/s" in result.output and "ETA" in result.output
    assert "confusion matrix" in result.output and "test accuracy" in result.output
    assert (tmp_path / "model.safetensors").is_file()
    result = runner.invoke(app, [*args, "--resume", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "resuming after epoch 1" in result.output and "epoch 2/2" in result.output


def one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, (
        result.output
    )
    return lines[0]


def test_cli_bad_inputs(tmp_path: Path, runner) -> None:
    line = one_line_error(runner.invoke(app, ["train", "mnist", "--data", str(tmp_path / "nope")]))
    assert "does not exist" in line
    line = one_line_error(runner.invoke(app, ["train", "mnist", "--data", str(tmp_path)]))
    assert "has no train-images-idx3-ubyte" in line
    line = one_line_error(runner.invoke(app, ["mnist", "predict", str(tmp_path / "x.png")]))
    assert "no MNIST model" in line and "selfhost train mnist" in line
    line = one_line_error(runner.invoke(app, ["train", "mnist", "--lr", "0", "--data", str(tmp_path)]))
    assert "--lr" in line
    if not torch.cuda.is_available():
        line = one_line_error(
            runner.invoke(app, ["train", "mnist", "--device", "cuda", "--data", str(tmp_path)])
        )
        assert "no CUDA GPU" in line


@pytest.mark.slow
def test_cli_bad_images(trained, tmp_path: Path, runner) -> None:
    model = str(trained[0] / "model.safetensors")
    line = one_line_error(
        runner.invoke(app, ["mnist", "predict", str(tmp_path / "missing.png"), "--model", model])
    )
    assert "missing.png does not exist" in line
    (tmp_path / "notes.png").write_text("not an image")
    line = one_line_error(
        runner.invoke(app, ["mnist", "predict", str(tmp_path / "notes.png"), "--model", model])
    )
    assert "not a readable image" in line
    PIL.new("L", (50, 50), 255).save(tmp_path / "blank.png")
    line = one_line_error(
        runner.invoke(app, ["mnist", "predict", str(tmp_path / "blank.png"), "--model", model])
    )
    assert "no digit found" in line


def test_cli_eval_downloads_from_configured_mirror(trained, mnist_dir: Path, runner, monkeypatch) -> None:
    from tests.train.test_mnist_data import Mirror

    mirror = Mirror("good", {f.name: f.read_bytes() for f in mnist_dir.glob("*.gz")})
    monkeypatch.setenv("SELFHOST_MNIST_MIRRORS", mirror.url)
    try:
        model = str(trained[0] / "model.safetensors")
        result = runner.invoke(app, ["mnist", "eval", "--model", model, "--limit", "500", "--device", "cpu"])
    finally:
        mirror.close()
    assert result.exit_code == 0, result.output
    assert "downloaded and verified" in result.output and "on 500 images" in result.output
    assert len(mirror.requests) == 4


def test_no_torch_import_for_help_and_missing_torch_is_one_line(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from selfhost.cli.app import app\n"
        "r = CliRunner().invoke(app, ['mnist', '--help'])\n"
        "r2 = CliRunner().invoke(app, ['train', 'mnist', '--help'])\n"
        "assert r.exit_code == 0 and r2.exit_code == 0 and '--resume' in r2.output\n"
        "print(sorted({'torch', 'numpy', 'PIL', 'safetensors'} & set(sys.modules)))\n"
        "sys.modules['torch'] = None\n"  # as if PyTorch were not installed
        f"r = CliRunner().invoke(app, ['train', 'mnist', '--data', {str(tmp_path)!r}])\n"
        "print(r.exit_code, r.output.strip())\n"
    )
    from tests.conftest import checkout_env

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=checkout_env()
    )
    first, second = out.stdout.strip().splitlines()
    assert first == "[]"
    assert second.startswith("1 error: PyTorch is not installed") and "selfhost[train]" in second


def test_model_of_another_layout_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from selfhost.train.mnist.net import Net

    path = tmp_path / "old.safetensors"
    save_file(
        dict(Net().state_dict()),
        str(path),
        metadata={"format": "selfhost-mnist", "arch": "old", "channels": "16,32,64"},
    )
    with pytest.raises(IntegrityError, match="another network layout"):
        load_classifier(path)
