"""The `selfhost` command: assembles the command modules and owns the one error boundary.

Each command module exposes `register(app)` (train modules: `register(app, train)`); the
boundary wraps every registered callback so a user-caused error prints one line and exits
non-zero, in the installed executable and under `typer.testing.CliRunner` alike.
"""

from __future__ import annotations

import functools
import sys
import typing
from collections.abc import Callable
from typing import Any

import typer

from selfhost import __version__
from selfhost.cli import (
    chat,
    convert,
    history,
    info,
    models,
    pull,
    quantize,
    serve,
    train_gpt,
    train_mnist,
    train_runs,
)
from selfhost.cli.console import err_console
from selfhost.cli.output import print_error
from selfhost.errors import SelfhostError

app = typer.Typer(
    rich_markup_mode=None,  # click's plain help: Typer's Rich help renderer costs ~0.1 s on every --help
    name="selfhost",
    help="Run the whole local-LLM loop on your own machine: pull, quantize, chat, serve, train.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
train_app = typer.Typer(
    rich_markup_mode=None,
    help="Train your own models (needs the `train` extra: PyTorch).", no_args_is_help=True
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"selfhost {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Run the whole local-LLM loop on your own machine: pull, quantize, chat, serve, train."""


def debug_enabled() -> bool:
    from selfhost import env

    return env.debug()


def boundary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map typed errors to one line on stderr and a non-zero exit (SELFHOST_DEBUG=1: traceback)."""

    # Resolve string annotations (`from __future__ import annotations`) once, here: Typer would
    # otherwise evaluate each of them four times while building the commands, on every run.
    fn.__annotations__ = typing.get_type_hints(fn, include_extras=True)

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (SelfhostError, OSError) as exc:
            if debug_enabled():
                raise
            raise typer.Exit(print_error(exc)) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            err_console.print("interrupted", markup=False)
            raise typer.Exit(130) from None

    return guarded


def _guard(typer_app: typer.Typer) -> None:
    for command in typer_app.registered_commands:
        if command.callback is not None and not getattr(command.callback, "__wrapped__", None):
            command.callback = boundary(command.callback)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _guard(group.typer_instance)


pull.register(app)
models.register(app)
quantize.register(app)
convert.register(app)
chat.register(app)
serve.register(app)
history.register(app)
info.register(app)
train_gpt.register(app, train_app)
train_mnist.register(app, train_app)
train_runs.register(app, train_app)
app.add_typer(train_app, name="train")
_guard(app)


def main() -> None:
    """Entry point of the `selfhost` executable."""
    try:
        app(prog_name="selfhost")
    except SelfhostError as exc:  # raised outside a command (e.g. while parsing)
        sys.exit(print_error(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if debug_enabled():
            raise
        err_console.print(
            f"internal error: {type(exc).__name__}: {exc} (set SELFHOST_DEBUG=1 for the traceback)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(70)
