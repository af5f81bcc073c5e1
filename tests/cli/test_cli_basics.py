"""The executable itself: help, version, lazy imports, the error boundary."""

from __future__ import annotations

import subprocess
import sys

import pytest

from selfhost.cli.app import app
from tests.conftest import checkout_env, selfhost_command


def test_help_lists_commands(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("pull", "models", "quantize", "chat", "train"):
        assert command in result.output


def test_version(runner):
    from selfhost import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


HELP_MUST_NOT_IMPORT = (
    "torch", "llama_cpp", "fastapi", "uvicorn", "numpy", "huggingface_hub", "gguf", "pydantic",
    "rich.markdown", "rich.traceback", "markdown_it", "pygments",
)  # fmt: skip


# Typer coerces parameters through pydantic (a group's help too): only the root help avoids it.
@pytest.mark.parametrize(
    "args, allowed",
    [
        (["--help"], set()),
        (["train", "--help"], {"pydantic"}),
        (["chat", "--help"], {"pydantic"}),
        (["history", "rm", "--help"], {"pydantic"}),
    ],
)
def test_help_is_built_without_heavy_modules(args, allowed):
    """What `selfhost ... --help` imports, through the real entry point: a module set, not a timing."""
    code = (
        "import sys\n"
        f"sys.argv = ['selfhost', *{args!r}]\n"
        "from selfhost.cli.app import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "sys.stderr.write('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=checkout_env()
    )
    assert "Usage: selfhost" in out.stdout
    imported = set(out.stderr.split())
    heavy = {
        m
        for m in imported
        if any(m == h or m.startswith(h + ".") for h in set(HELP_MUST_NOT_IMPORT) - allowed)
    }
    assert not heavy, sorted(heavy)


def test_installed_executable_reports_one_line_errors(tmp_path):
    env = checkout_env(SELFHOST_HOME=str(tmp_path))
    ok = subprocess.run(selfhost_command("--help"), capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "chat" in ok.stdout
    bad = subprocess.run(
        selfhost_command("models", "show", "no-such-model"), capture_output=True, text=True, env=env
    )
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.mark.needs_model
def test_info_reports_measured_backend(runner):
    import json

    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # the whole stdout is the JSON
    assert data["llama_backend"] in {"CPU", "CUDA", "Metal", "Vulkan", "SYCL", "HIP", "GPU"}
    assert "AVX" in data["llama_system_info"] or data["llama_gpu_offload"]
    assert data["torch"]["installed"] is True


def test_boundary_maps_typed_errors_to_one_line(monkeypatch):
    import typer
    from typer.testing import CliRunner

    from selfhost.cli.app import boundary
    from selfhost.errors import NotFoundError

    demo = typer.Typer()

    @demo.command()
    def fail() -> None:
        raise NotFoundError("no model named 'x'", hint="see `selfhost models list`")

    @demo.command()
    def disk() -> None:
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    for command in demo.registered_commands:
        command.callback = boundary(command.callback)
    runner = CliRunner()
    result = runner.invoke(demo, ["fail"])
    assert result.exit_code == 1
    assert result.output.strip() == "error: no model named 'x' (see `selfhost models list`)"
    result = runner.invoke(demo, ["disk"])
    assert result.exit_code == 1 and "disk is full" in result.output
    monkeypatch.setenv("SELFHOST_DEBUG", "1")
    result = runner.invoke(demo, ["fail"])
    assert isinstance(result.exception, NotFoundError)


def test_ci_turns_skips_into_failures(tmp_path):
    """With CI=true a test that skips (missing ../shared/data or optional package) fails instead."""
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n"
    )
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n\ndef test_needs_data():\n    pytest.skip('no data')\n"
    )
    (tmp_path / "test_module.py").write_text(
        "import pytest\n\npytest.importorskip('no_such_package_xyz')\n\ndef test_x():\n    pass\n"
    )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command.append("--continue-on-collection-errors")
    quiet = subprocess.run(command, capture_output=True, text=True, env=checkout_env(CI=""), cwd=tmp_path)
    assert quiet.returncode == 0 and "2 skipped" in quiet.stdout, quiet.stdout
    ci = subprocess.run(command, capture_output=True, text=True, env=checkout_env(CI="true"), cwd=tmp_path)
    assert ci.returncode != 0 and "skipped" not in ci.stdout.splitlines()[-1], ci.stdout
    assert "FAILED test_probe.py::test_needs_data - skipped under CI=true" in ci.stdout
    assert "ERROR test_module.py - module skipped under CI=true" in ci.stdout
