"""The executable itself: help, version, lazy imports, the error boundary."""

from __future__ import annotations

import os
import subprocess
import sys

from selfhost.cli.app import app


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


def test_help_imports_no_heavy_modules():
    code = (
        "import sys\n"
        "from selfhost.cli.app import app\n"
        "heavy = {'torch', 'llama_cpp', 'huggingface_hub', 'gguf', 'tokenizers', 'numpy'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_installed_executable_reports_one_line_errors(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "selfhost")
    env = {**os.environ, "SELFHOST_HOME": str(tmp_path)}
    ok = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "chat" in ok.stdout
    bad = subprocess.run([exe, "models", "show", "no-such-model"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_info_reports_measured_backend(runner):
    import json

    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
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
