"""`selfhost serve`: an OpenAI-compatible server for every local model (flags -> ServeOptions -> serve),
and `selfhost ps`: what a running server holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from selfhost import env
from selfhost.cli.common import (
    CACHE_DIR_OPTION,
    CACHE_TYPE_K_OPTION,
    CACHE_TYPE_V_OPTION,
    DRAFT_MODEL_OPTION,
    FLASH_ATTN_OPTION,
    PULL_HELP,
    SPEC_DRAFT_OPTION,
    SPEC_NGRAM_OPTION,
    SPEC_OPTION,
    engine_options,
    ensure_model,
)
from selfhost.cli.console import err_console
from selfhost.cli.output import Output, fmt_bytes, fmt_duration
from selfhost.serve.defaults import SERVE


def option(name: str, *flags: str) -> Any:
    """The typer option of serve setting `name`: default, bounds and help from selfhost.serve.defaults."""
    s = SERVE[name]
    return typer.Option(s.default, *flags, min=s.ge, max=s.le, help=s.help)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("ps")(ps)


def serve(
    models: list[str] | None = typer.Argument(  # noqa: B008
        None, help="Models to load now (alias, pulled name or .gguf path); the rest load on demand."
    ),
    host: str = option("host", "--host"),
    port: int = option("port", "--port"),
    parallel: int | None = option("parallel", "--parallel"),
    ctx: int | None = option("ctx", "--ctx"),
    gpu_layers: int | None = option("gpu_layers", "--gpu-layers"),
    threads: int | None = option("threads", "--threads"),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        help="Require `Authorization: Bearer KEY` or `x-api-key: KEY` (or set SELFHOST_API_KEY).",
    ),
    log: bool = typer.Option(False, "--log", help="Write served conversations to the chat history."),
    max_queue: int | None = option("max_queue", "--max-queue"),
    max_body: int = option("max_body", "--max-body"),
    embedding_model: str | None = typer.Option(
        None, "--embedding-model", help="The model /v1/embeddings uses when a request names none."
    ),
    prefill_chunk: int = option("prefill_chunk", "--prefill-chunk"),
    keep_alive: str = option("keep_alive", "--keep-alive"),
    max_models: int | None = option("max_models", "--max-models"),
    config: str | None = typer.Option(
        None, "--config", help="TOML file: [serve] flags and [serve.models.\"NAME\"] per-model settings."
    ),
    rerank_model: str | None = typer.Option(
        None, "--rerank-model", help="A reranker (kind rerank, e.g. bge-reranker-v2-m3) for /v1/rerank."
    ),
    metrics_public: bool = typer.Option(
        False, "--metrics-public", help="Serve /metrics (Prometheus) without the API key."
    ),
    pull: bool = typer.Option(False, "--pull", help=PULL_HELP + " Requests for such models pull too."),
    spec: str = SPEC_OPTION,
    spec_draft: int = SPEC_DRAFT_OPTION,
    spec_ngram: int = SPEC_NGRAM_OPTION,
    draft_model: str | None = DRAFT_MODEL_OPTION,
    cache_type_k: str = CACHE_TYPE_K_OPTION,
    cache_type_v: str = CACHE_TYPE_V_OPTION,
    flash_attn: str = FLASH_ATTN_OPTION,
    cache_ram: int = typer.Option(
        1024, "--cache-ram", min=0, help="Prompt cache in RAM for conversations whose slot was reused, MB."
    ),
    cache_dir: Path | None = CACHE_DIR_OPTION,
    cors_origin: list[str] | None = typer.Option(  # noqa: B008 (a repeatable option)
        None, "--cors-origin", metavar="URL", help="Let this browser origin (http://host:port) call the API."
    ),
    open_page: bool = typer.Option(False, "--open", help="Open the chat page in the default web browser."),
) -> None:
    """Serve every local model over an OpenAI-compatible HTTP API: loaded on first use, unloaded when idle."""
    from selfhost.serve.config import read_config
    from selfhost.serve.server import ServeOptions
    from selfhost.serve.server import serve as run

    file_options, settings = read_config(Path(config) if config else None)
    key = api_key or env.api_key()
    if host not in ("127.0.0.1", "localhost", "::1") and key is None:
        Output().notice(
            f"warning: listening on {host} without --api-key: "
            "anyone who can reach this machine can use the model",
            level="warning",
        )
    flags = dict(
        host=host, port=port, parallel=parallel, ctx=ctx, gpu_layers=gpu_layers, threads=threads,
        max_queue=max_queue, max_body=max_body, prefill_chunk=prefill_chunk, keep_alive=keep_alive,
        max_models=max_models,
    )  # fmt: skip
    # a flag given on the command line wins over the config file, the file over the defaults
    given = {k: v for k, v in flags.items() if v != SERVE[k].default}
    values = {**flags, **file_options, **given, "cors_origins": cors_origin or []}
    options = _options(ServeOptions, values, models or [], key, log, embedding_model, pull)
    options.engine = engine_options(
        spec, spec_draft, spec_ngram, draft_model, cache_type_k, cache_type_v, flash_attn, cache_ram,
        cache_dir, pull,
    )  # fmt: skip
    preload = [ensure_model(m, pull) for m in options.models]  # each name resolved once, handed down
    embedding = ensure_model(embedding_model, pull, purpose="embedding") if embedding_model else None
    reranker = ensure_model(rerank_model, pull, purpose="rerank") if rerank_model else None
    options = options.model_copy(update={"metrics_public": metrics_public})

    def ready(lines: list[str], url: str) -> None:
        for line in lines:
            err_console.print(line, markup=False, highlight=False, soft_wrap=True, style="dim")
        auth = " (API key required)" if key else ""
        err_console.print(
            f"serving on {url}{auth} · Ctrl-C to stop", markup=False, highlight=False, soft_wrap=True
        )
        page = page_url(url)
        err_console.print(f"chat page: {page}", markup=False, highlight=False, soft_wrap=True)
        if open_page:
            import webbrowser

            webbrowser.open(page)

    run(options, ready, preload=preload, embedding=embedding, settings=settings, reranker=reranker)
    err_console.print("stopped", markup=False, highlight=False, style="dim")


def page_url(api_url: str) -> str:
    """The chat page of a server whose API is at `api_url` (any-address hosts open on the loopback)."""
    base = api_url.removesuffix("/v1")
    for anywhere, loopback in (("//0.0.0.0:", "//127.0.0.1:"), ("//[::]:", "//[::1]:")):
        base = base.replace(anywhere, loopback)
    return base + "/"


def _options(cls: Any, values: dict[str, Any], models: list[str], key: str | None, log: bool,
             embedding_model: str | None, pull: bool) -> Any:  # fmt: skip
    from pydantic import ValidationError

    from selfhost.errors import UsageError

    try:
        return cls(**values, models=models, api_key=key, log=log, embedding_model=embedding_model, pull=pull)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "--" + ".".join(str(p) for p in err["loc"]).replace("_", "-")
        raise UsageError(f"{where}: {err['msg']}") from None


def ps(
    host: str = option("host", "--host"),
    port: int = option("port", "--port"),
    api_key: str | None = typer.Option(None, "--api-key", help="The server's API key (or SELFHOST_API_KEY)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Models a running `selfhost serve` holds: memory, slots busy, context, backend, when each unloads."""
    from selfhost.serve.client import server_status

    key = api_key or env.api_key()
    out = Output(as_json)
    status = server_status(host, port, key)
    out.result(status, lambda value: _print_status(value, out))


def _print_status(status: dict[str, Any], out: Output) -> None:
    import time

    from rich.table import Table

    from selfhost.cli.console import plain

    table = Table(title="loaded models")
    for col in ("name", "kind", "memory", "slots busy", "context", "backend", "until"):
        table.add_column(col, justify="right" if col in ("memory", "slots busy", "context") else "left")
    for m in status["models"]:
        if m["expires_at"] is None:
            until = "in use" if m["requests"] else "forever"
        else:
            until = f"in {fmt_duration(max(0.0, m['expires_at'] - time.time()))}"
        backend = f"{m['backend']} {m['layers_offloaded']}/{m['layers']}"
        table.add_row(plain(m["name"]), m["kind"], fmt_bytes(m["memory"]), f"{m['slots_busy']}/{m['slots']}",
                      str(m["context"]), backend, until)  # fmt: skip
    out.console.print(table)
    for name in status["loading"]:
        out.console.print(plain(f"loading {name}"))
    for p in status["pulling"]:
        total = f" of {fmt_bytes(p['total'])}" if p["total"] else ""
        out.console.print(plain(f"pulling {p['name']}: {fmt_bytes(p['done'])}{total}"))
    if not status["models"] and not status["loading"]:
        out.console.print(plain("no model loaded: the next request loads one", "dim"))
