"""`selfhost serve`: an OpenAI-compatible server for a local model (flags -> ServeOptions -> serve)."""

from __future__ import annotations

import typer

from selfhost import env
from selfhost.cli.console import err_console
from selfhost.cli.output import Output
from selfhost.cli.pull import PULL_HELP, ensure_model


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    model: str | None = typer.Argument(
        None, help="Alias, pulled name or .gguf path (default: embedded model)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: any free port)."),
    parallel: int | None = typer.Option(
        None, "--parallel", min=1, max=64, help="Slots decoded together (default: up to 4, sized by memory)."
    ),
    ctx: int | None = typer.Option(
        None, "--ctx", min=16, help="Context per slot in tokens (default: by memory)."
    ),
    gpu_layers: int | None = typer.Option(None, "--gpu-layers", min=-1, help="Layers to offload (-1: all)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores)."),
    api_key: str | None = typer.Option(
        None, "--api-key", help="Require `Authorization: Bearer KEY` (or set SELFHOST_API_KEY)."
    ),
    log: bool = typer.Option(False, "--log", help="Write served conversations to the chat history."),
    max_queue: int | None = typer.Option(
        None, "--max-queue", min=0, help="Requests that may wait for a slot (default: 4 per slot); then 503."
    ),
    max_body: int = typer.Option(8 * 2**20, "--max-body", min=1024, help="Largest request body in bytes."),
    embedding_model: str | None = typer.Option(
        None, "--embedding-model", help="A second model for /v1/embeddings (default: the chat model)."
    ),
    prefill_chunk: int = typer.Option(
        256,
        "--prefill-chunk",
        min=16,
        help="Prompt tokens read per step, so new prompts do not stall replies.",
    ),
    pull: bool = typer.Option(False, "--pull", help=PULL_HELP),
    cors_origin: list[str] | None = typer.Option(  # noqa: B008 (a repeatable option)
        None, "--cors-origin", help="Let this browser origin (http://host:port) call the API; repeatable."
    ),
    open_page: bool = typer.Option(False, "--open", help="Open the chat page in the default web browser."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, batching concurrent requests."""
    from selfhost.serve.server import ServeOptions
    from selfhost.serve.server import serve as run

    key = api_key or env.api_key()
    if host not in ("127.0.0.1", "localhost", "::1") and key is None:
        Output().notice(
            f"warning: listening on {host} without --api-key: "
            "anyone who can reach this machine can use the model",
            level="warning",
        )
    model = ensure_model(model, pull)  # auto-pull: an alias or owner/repo not downloaded yet
    if embedding_model is not None:
        embedding_model = ensure_model(embedding_model, pull, purpose="embedding")
    options = ServeOptions(
        model=model,
        host=host,
        port=port,
        parallel=parallel,
        ctx=ctx,
        gpu_layers=gpu_layers,
        threads=threads,
        api_key=key,
        log=log,
        max_queue=max_queue,
        max_body=max_body,
        embedding_model=embedding_model,
        prefill_chunk=prefill_chunk,
        cors_origins=cors_origin or [],
    )

    def ready(line: str, url: str) -> None:
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

    run(options, ready)
    err_console.print("stopped", markup=False, highlight=False, style="dim")


def page_url(api_url: str) -> str:
    """The chat page of a server whose API is at `api_url` (any-address hosts open on the loopback)."""
    base = api_url.removesuffix("/v1")
    for anywhere, loopback in (("//0.0.0.0:", "//127.0.0.1:"), ("//[::]:", "//[::1]:")):
        base = base.replace(anywhere, loopback)
    return base + "/"
