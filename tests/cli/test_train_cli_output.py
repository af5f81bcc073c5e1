"""`selfhost train|gpt|mnist ...` output: progress on stderr, results on stdout, --json that parses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")
Image = pytest.importorskip("PIL.Image")

from selfhost.cli.app import app  # noqa: E402
from selfhost.train.mnist.idx import load_mnist  # noqa: E402
from tests.fakes.terminal import Terminal  # noqa: E402
from tests.train.test_train_gpt import TINY_FLAGS  # noqa: E402


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def small_mnist(mnist_subset) -> Path:  # noqa: ANN001
    return mnist_subset(512, 200)


def mnist_args(data: Path, out: Path) -> list[str]:
    return ["train", "mnist", "--data", str(data), "--out", str(out), "--limit", "512", "--test-limit", "200",
            "--batch-size", "64", "--epochs", "1", "--device", "cpu", "--no-augment"]  # fmt: skip


def test_redirected_stdout_gets_no_progress_bar(small_mnist: Path, tmp_path: Path) -> None:
    """`selfhost train mnist ... > out.txt` in a terminal: the live bars go to the terminal (stderr),
    out.txt holds the result only, without a carriage return or an escape sequence."""
    from tests.conftest import checkout_env

    env = {k: v for k, v in checkout_env().items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env.update(SELFHOST_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="2", TERM="xterm-256color")
    out_txt = tmp_path / "out.txt"
    command = [sys.executable, "-m", "selfhost", *mnist_args(small_mnist, tmp_path / "run")]
    with Terminal(columns=100) as term, open(out_txt, "wb") as fh:
        proc = subprocess.run(command, stdin=term.fd, stdout=fh, stderr=term.fd, env=env, timeout=300)
    terminal_text = term.text()
    assert proc.returncode == 0, terminal_text[-3000:]
    stdout = out_txt.read_text("utf-8")
    assert "\r" not in stdout and "\x1b" not in stdout, repr(stdout[:500])
    assert "confusion matrix" in stdout and "test accuracy" in stdout
    assert "training on cpu" not in stdout and "epoch 1/1" not in stdout  # progress is not the result
    assert "training on cpu" in terminal_text and "epoch 1/1" in terminal_text
    assert "\x1b[" in terminal_text  # the terminal did get the live bar: its control sequences


def test_train_commands_print_json(small_mnist: Path, tmp_path: Path, runner, isolated_home: Path) -> None:  # noqa: ANN001
    from selfhost.models.store import Store

    trained = runner.invoke(app, [*mnist_args(small_mnist, tmp_path / "mnist"), "--json"])
    assert trained.exit_code == 0, trained.output
    result = json.loads(trained.stdout)
    assert result["epochs"] == 1 and 0 <= result["test_accuracy"] <= 1
    assert Path(result["model_path"]).is_file() and sum(map(sum, result["confusion"])) == 200
    assert "epoch 1/1" in trained.stderr  # progress still shown, on stderr

    digit = tmp_path / "digit.png"
    Image.fromarray(load_mnist(small_mnist).test_images[0]).save(digit)
    model = result["model_path"]
    predicted = runner.invoke(app, ["mnist", "predict", str(digit), "--model", model, "--json"])
    assert predicted.exit_code == 0, predicted.output
    [prediction] = json.loads(predicted.stdout)
    assert prediction["path"] == str(digit) and prediction["digit"] == prediction["top"][0][0]

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 60, "utf-8")
    gpt = ["train", "gpt", "-d", str(text), "--iters", "2", "--eval-interval", "2", *TINY_FLAGS]
    estimate = runner.invoke(app, [*gpt, "--estimate", "--json"])
    assert estimate.exit_code == 0, estimate.output
    assert json.loads(estimate.stdout)["n_params"] > 0
    trained = runner.invoke(app, [*gpt, "--name", "tiny", "--json"])
    assert trained.exit_code == 0, trained.output
    run = json.loads(trained.stdout)
    assert run["run"]["step"] == 2 and run["export"]["name"] == "tiny" and run["export"]["quant"] == "F16"
    assert Store().find("tiny").path == Path(run["export"]["path"]).resolve()
    assert "step 2: train loss" in trained.stderr

    gguf = tmp_path / "tiny.gguf"
    exported = runner.invoke(app, ["gpt", "export", "tiny", "-t", "f32", "-o", str(gguf), "--no-register",
                                   "--json"])  # fmt: skip
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout) == {"path": str(gguf), "name": None, "quant": "F32",
                                           "size": gguf.stat().st_size,
                                           "checkpoint": str(isolated_home / "runs" / "tiny")}

    for args in (["list"], ["show", "tiny"], ["compare", "tiny", str(tmp_path / "mnist")]):
        shown = runner.invoke(app, ["train", "runs", *args, "--json"])
        assert shown.exit_code == 0, shown.output
        json.loads(shown.stdout)


def test_gpt_commands_sit_beside_mnist_and_train_keeps_the_old_spellings(runner) -> None:  # noqa: ANN001
    """`selfhost gpt export|sample` as `selfhost mnist predict|eval`; `train export|sample` still work."""
    top = runner.invoke(app, ["--help"]).output
    assert "gpt " in top and "mnist " in top
    train = runner.invoke(app, ["train", "--help"]).output
    assert "export" not in train and "sample" not in train  # hidden: the old spellings
    for group in (["gpt"], ["train"]):
        for command in ("export", "sample"):
            shown = runner.invoke(app, [*group, command, "--help"])
            assert shown.exit_code == 0 and "--json" in shown.output, shown.output
