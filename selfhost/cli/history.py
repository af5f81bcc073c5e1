"""`selfhost history list|show|search|export|rm`: the chat log in SELFHOST_HOME/history.db."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from selfhost.cli.console import console, plain
from selfhost.cli.output import Output
from selfhost.errors import UsageError

if TYPE_CHECKING:
    from selfhost.chat.history import ConversationSummary, SearchHit
    from selfhost.chat.messages import Conversation

JSON_OPTION_HELP = "Print machine-readable JSON."

history_app = typer.Typer(help="Browse, search, export and delete saved chats.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(history_app, name="history")


@history_app.command("list")
def list_conversations(
    limit: int = typer.Option(
        20, "--limit", "-n", min=1, help="How many conversations to show (newest first)."
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_OPTION_HELP),
) -> None:
    """List saved conversations, newest first."""
    from selfhost.chat.history import HistoryStore

    Output(as_json).result(HistoryStore().list(limit=limit), _print_conversations)


def _print_conversations(rows: list[ConversationSummary]) -> None:
    from rich.table import Table

    if not rows:
        console.print("no saved conversations yet (start one with `selfhost chat`)", markup=False)
        return
    table = Table(box=None)
    for column in ("id", "updated", "model", "messages", "title"):
        table.add_column(column, justify="right" if column in ("id", "messages") else "left")
    for r in rows:
        table.add_row(
            str(r.id),
            r.updated_at.strftime("%Y-%m-%d %H:%M"),
            plain(r.model or "-"),
            str(r.n_messages),
            plain(r.title),
        )
    console.print(table)


@history_app.command("show")
def show(
    conversation_id: int = typer.Argument(..., help="Conversation ID (see `history list`)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_OPTION_HELP),
) -> None:
    """Print a conversation."""
    from selfhost.chat.history import HistoryStore

    Output(as_json).result(HistoryStore().get(conversation_id), _print_conversation)


def _print_conversation(conversation: Conversation) -> None:
    from selfhost.chat.export import to_markdown

    console.print(to_markdown(conversation), markup=False, highlight=False, end="")


@history_app.command("search")
def search(
    text: str = typer.Argument(..., help="Text to look for (case-insensitive)."),
    limit: int = typer.Option(50, "--limit", "-n", min=1),
    as_json: bool = typer.Option(False, "--json", help=JSON_OPTION_HELP),
) -> None:
    """Find messages containing TEXT."""
    from selfhost.chat.history import HistoryStore

    if not text.strip():
        raise UsageError("the search text is empty")

    def print_hits(hits: list[SearchHit]) -> None:
        if not hits:
            console.print(f"no message contains {text!r}", markup=False)
        for hit in hits:
            line = f"{hit.conversation_id:>5}  {hit.role:<9} {hit.snippet}"
            console.print(line, markup=False, highlight=False)

    Output(as_json).result(HistoryStore().search(text, limit=limit), print_hits)


@history_app.command("export")
def export_conversation(
    conversation_id: int = typer.Argument(..., help="Conversation ID."),
    fmt: str | None = typer.Option(None, "--format", "-f", help="md or json (default: from -o, else md)."),
    output: str | None = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
) -> None:
    """Export a conversation as Markdown or JSON."""
    from selfhost.chat import export
    from selfhost.chat.history import HistoryStore

    if fmt is not None and fmt not in export.FORMATS:
        raise UsageError(f"unknown format '{fmt}'", hint="use --format md or --format json")
    conversation = HistoryStore().get(conversation_id)
    if output is None:
        console.out(export.render(conversation, fmt or "md"), end="", highlight=False)
        return
    path = export.save(conversation, Path(output), fmt)
    Output().notice(f"wrote {path}")


@history_app.command("rm")
def remove(
    conversation_id: int = typer.Argument(..., help="Conversation ID."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a conversation."""
    from selfhost.chat.history import HistoryStore

    store = HistoryStore()
    conversation = store.get(conversation_id)
    title = conversation.title or "(untitled)"
    question = f"delete conversation {conversation_id} ({title!r}, {len(conversation.messages)} messages)?"
    out = Output()
    out.confirm(question, yes)
    store.delete(conversation_id)
    out.notice(f"deleted conversation {conversation_id}")
