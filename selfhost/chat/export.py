"""Export a conversation as Markdown or JSON, and read a JSON export back (/load)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from selfhost.atomic import write_text
from selfhost.chat.messages import Conversation
from selfhost.errors import NotFoundError, UsageError

FORMATS = ("md", "json")


def to_markdown(conversation: Conversation) -> str:
    title = conversation.title or "Conversation"
    lines = [f"# {title}", ""]
    meta = []
    if conversation.id is not None:
        meta.append(f"conversation {conversation.id}")
    if conversation.model:
        meta.append(f"model `{conversation.model}`")
    meta.append(conversation.created_at.strftime("%Y-%m-%d %H:%M UTC"))
    lines += ["_" + " · ".join(meta) + "_", ""]
    if conversation.system:
        lines += ["## System", "", conversation.system, ""]
    for m in conversation.messages:
        heading = {"user": "User", "assistant": "Assistant", "system": "System"}[m.role]
        if m.finish_reason and m.finish_reason != "stop":
            heading += f" ({m.finish_reason})"
        lines += [f"## {heading}", ""]
        if m.reasoning:  # a thinking model's reasoning, quoted apart from the answer
            lines += ["> **Thinking**", ">", *[f"> {line}".rstrip() for line in m.reasoning.splitlines()], ""]
        lines += [m.content, ""]
    return "\n".join(lines).rstrip() + "\n"


def to_json(conversation: Conversation) -> str:
    return conversation.model_dump_json(indent=2) + "\n"


def format_for(path: Path, explicit: str | None = None) -> str:
    fmt = explicit or Path(path).suffix.lower().lstrip(".")
    fmt = {"markdown": "md"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise UsageError(f"cannot tell the export format of '{path}'", hint="use a .md or .json file name")
    return fmt


def render(conversation: Conversation, fmt: str) -> str:
    return to_markdown(conversation) if fmt == "md" else to_json(conversation)


def save(conversation: Conversation, path: Path, fmt: str | None = None) -> Path:
    """Write an export atomically; the format follows the suffix unless given."""
    path = Path(path).expanduser()
    write_text(path, render(conversation, format_for(path, fmt)))
    return path


def load(path: Path) -> Conversation:
    """Read a JSON export (as written by `save`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFoundError(f"no such file: {path}")
    if path.suffix.lower() != ".json":
        raise UsageError(f"cannot load '{path}'", hint="load a .json export (Markdown is for reading)")
    try:
        conversation = Conversation.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise UsageError(f"{path} is not a selfhost conversation export: {first}") from exc
    for m in conversation.messages:
        m.id = None  # a loaded conversation is logged as a new one
    conversation.id = None
    return conversation
