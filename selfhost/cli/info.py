"""`selfhost info`: which backends this installation got (llama.cpp build, PyTorch device)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from selfhost.cli.console import console
from selfhost.cli.output import Output

if TYPE_CHECKING:
    from selfhost.system_info import SystemInfo


def info(json_output: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
    """Show versions, SELFHOST_HOME, the llama.cpp backend (CPU/CUDA/Metal) and the PyTorch device."""
    from selfhost.system_info import collect

    Output(json_output).result(collect(), _print_info)


def _print_info(data: SystemInfo) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_row("selfhost", data.selfhost_version)
    table.add_row("python", f"{data.python} on {data.platform}")
    table.add_row("home", data.home)
    offload = "GPU offload available" if data.llama_gpu_offload else "no GPU offload in this build"
    table.add_row("llama.cpp", f"{data.llama_backend} ({offload}), llama-cpp-python {data.llama_cpp_version}")
    table.add_row("llama.cpp features", data.llama_system_info)
    t = data.torch
    torch_line = f"{t.version} on {t.device}" if t.installed else "not installed (selfhost[train])"
    table.add_row("pytorch", torch_line)
    table.add_row("embedded model", data.embedded_model or "not installed (selfhost[demo])")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
