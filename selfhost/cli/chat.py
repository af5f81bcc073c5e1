"""`selfhost chat`: a thin renderer over selfhost.chat.session.ChatSession (REPL and one-shot).

Ctrl-C during a reply stops it and keeps the partial reply (marked "interrupted"; /undo or
/retry drops it); Ctrl-C twice at the prompt, or Ctrl-D, leaves.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

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
    show_notices,
)
from selfhost.cli.console import console, err_console
from selfhost.cli.output import print_error, write_json
from selfhost.errors import SelfhostError, UsageError

if TYPE_CHECKING:
    from selfhost.chat.history import HistoryStore
    from selfhost.chat.messages import Conversation

HELP = """\
/help              this list
/system TEXT       set the system prompt (no TEXT: show it)
/reset             start a new conversation
/undo              remove the last message and its reply
/retry             generate the last reply again
/history           show the conversation
/stats             speed, tokens reused from the KV cache, context used
/think [on|off]    thinking models: think before answering or not (no argument: toggle)
/save FILE         export the conversation (.md or .json)
/load FILE         continue a conversation exported as .json
/exit              leave (also Ctrl-D, or Ctrl-C twice)
A line with only \"\"\" starts and ends a multi-line message."""


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)


def chat(
    model: str | None = typer.Argument(
        None, help="Alias, pulled name or .gguf path (default: embedded model)."
    ),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Answer this one message and exit."),
    system: str | None = typer.Option(None, "--system", "-s", help="System prompt."),
    temperature: float = typer.Option(
        0.8, "--temperature", "-t", min=0.0, help="Sampling temperature (0: greedy)"
    ),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0),
    top_k: int = typer.Option(40, "--top-k", min=0),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", min=0.0),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Seed each reply's sampling (reproducible)."),
    max_tokens: int | None = typer.Option(
        None,
        "--max-tokens",
        "-n",
        min=1,
        help="Longest reply (default: until the model stops or the context is full)",
    ),
    ctx: int | None = typer.Option(
        None, "--ctx", min=16, help="Context size in tokens (default: the model's, capped by memory and 8192)"
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (default: all cores)."),
    gpu_layers: int | None = typer.Option(
        None,
        "--gpu-layers",
        min=-1,
        help="Layers to offload (-1: all; default: all when the build has a GPU).",
    ),
    raw: bool = typer.Option(False, "--raw", help="Plain text completion, no chat template."),
    schema_file: str | None = typer.Option(None, "--schema", help="JSON schema file the reply must follow."),
    grammar_file: str | None = typer.Option(
        None, "--grammar", help="GBNF grammar file (llama.cpp's format) the whole reply must follow."
    ),
    as_json: bool = typer.Option(False, "--json", help="One-shot: print the reply and usage as JSON."),
    think: bool | None = typer.Option(
        None,
        "--think/--no-think",
        help="Thinking models: reason before answering or not (default: the model's template).",
    ),
    hide_thinking: bool = typer.Option(
        False, "--hide-thinking", help="Do not show a thinking model's reasoning (it is still kept)."
    ),
    resume: bool = typer.Option(False, "--continue", "-c", help="Continue the last conversation."),
    conversation: int | None = typer.Option(None, "--conversation", help="Continue conversation ID."),
    no_log: bool = typer.Option(False, "--no-log", help="Do not write this chat to the history."),
    pull: bool = typer.Option(False, "--pull", help=PULL_HELP),
    spec: str = SPEC_OPTION,
    spec_draft: int = SPEC_DRAFT_OPTION,
    spec_ngram: int = SPEC_NGRAM_OPTION,
    draft_model: str | None = DRAFT_MODEL_OPTION,
    cache_type_k: str = CACHE_TYPE_K_OPTION,
    cache_type_v: str = CACHE_TYPE_V_OPTION,
    flash_attn: str = FLASH_ATTN_OPTION,
    cache_ram: int = typer.Option(
        0, "--cache-ram", min=0, help="Prompt cache in RAM, MB (0: none; 1024 when --cache-dir is set)."
    ),
    cache_dir: Path | None = CACHE_DIR_OPTION,
) -> None:
    """Chat with a local model: a REPL, or one answer with -p (stdin is added when piped)."""
    from selfhost.chat.history import ChatLog
    from selfhost.chat.session import ChatSession, Sampling

    if resume and conversation is not None:
        raise UsageError("use either --continue or --conversation ID, not both")
    if as_json and prompt is None:
        raise UsageError("--json needs a one-shot message", hint='add -p "..."')
    schema = _load_schema(schema_file)
    store, previous = _open_history(no_log, resume, conversation)
    sampling = Sampling(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repeat_penalty=repeat_penalty,
        seed=seed,
        max_tokens=max_tokens,
    )
    log = ChatLog(store)
    model = ensure_model(model, pull)  # auto-pull: an alias or owner/repo not downloaded yet
    options = engine_options(
        spec,
        spec_draft,
        spec_ngram,
        draft_model,
        cache_type_k,
        cache_type_v,
        flash_attn,
        cache_ram,
        cache_dir,
        pull,
    )
    session = ChatSession.load(
        model,
        ctx=ctx,
        threads=threads,
        gpu_layers=gpu_layers,
        raw=raw,
        sampling=sampling,
        system=system,
        schema=schema,
        log=log,
        options=options,
        think=think,
        grammar=_read_text(grammar_file),
    )
    show_notices(session.model.engine)
    session.show_thinking = not hide_thinking  # read by the renderer only
    if previous is not None:
        session.load_conversation(previous, keep_system=system is not None)
        log.conversation_id = previous.id if store is not None else None
    line = session.summary.line() + ("" if prompt is not None else " · /help for commands")
    err_console.print(line, markup=False, highlight=False, soft_wrap=True, style="dim")

    try:
        if prompt is not None:
            _one_shot(session, _with_stdin(prompt), as_json)
        else:
            _repl(session)
    finally:
        if options.cache_dir is not None:  # the slot's state goes to --cache-dir for the next --continue
            session.model.close()
            show_notices(session.model.engine)


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc


def _load_schema(schema_file: str | None) -> dict[str, Any] | None:
    if schema_file is None:
        return None
    from selfhost.chat.schema import load_schema

    return load_schema(Path(schema_file))


def _open_history(
    no_log: bool, resume: bool, conversation: int | None
) -> tuple[HistoryStore | None, Conversation | None]:
    """The history store to log to (None with --no-log) and the conversation to continue (or None)."""
    from selfhost.chat.history import HistoryStore

    store = None if no_log else HistoryStore()
    if not resume and conversation is None:
        if store is not None:
            store.schema_version()  # a corrupt history database stops us before the model loads
        return store, None
    source = store or HistoryStore()
    conv_id = conversation if conversation is not None else source.latest_id()
    if conv_id is None:
        raise UsageError("there is no conversation to continue yet")
    return store, source.get(conv_id)


def _with_stdin(prompt: str) -> str:
    """`cat notes.txt | selfhost chat -p "summarise"`: the piped text, then the instruction."""
    if sys.stdin is None or sys.stdin.isatty():
        return prompt
    piped = sys.stdin.read()
    return f"{piped.rstrip()}\n\n{prompt}" if piped.strip() else prompt


# ----------------------------------------------------------------------------- rendering
def _stream(chunks: Iterable[object], echo: bool = True, thinking: bool = True) -> object | None:
    """Print text chunks as they come (reasoning dimmed on stderr, apart); return the DoneChunk."""
    from selfhost.chat.messages import DoneChunk, ReasoningChunk, TextChunk, TrimChunk

    done = None
    in_thought = False
    try:
        for chunk in chunks:
            if isinstance(chunk, ReasoningChunk):
                if echo and thinking:
                    if not in_thought:
                        err_console.print("Thinking...", markup=False, highlight=False, style="dim italic")
                    in_thought = True
                    err_console.out(chunk.text, end="", highlight=False, style="dim")
                    err_console.file.flush()
            elif isinstance(chunk, TextChunk):
                if echo:
                    if in_thought:
                        err_console.print("\n...done thinking.\n", markup=False, style="dim italic")
                        in_thought = False
                    console.out(chunk.text, end="", highlight=False)
                    console.file.flush()
            elif isinstance(chunk, TrimChunk):
                err_console.print(
                    f"[dropped the {chunk.dropped_turns} oldest turn(s) to fit the context; "
                    f"{chunk.dropped_total} out of context so far]",
                    markup=False,
                    highlight=False,
                    style="yellow",
                )
            elif isinstance(chunk, DoneChunk):
                done = chunk
    finally:
        if in_thought:  # the reply ended (or was stopped) while still thinking
            err_console.print("", markup=False)
        # Ctrl-C may land here, between two chunks: closing the stream now (not at garbage
        # collection) lets the engine record the partial reply before anyone looks at it.
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return done


def _finish_note(reason: str) -> str | None:
    return {
        "length": "[reply stopped at --max-tokens]",
        "context": "[reply stopped: the context is full]",
        "interrupted": "[interrupted]",
    }.get(reason)


def _one_shot(session, text: str, as_json: bool) -> None:  # noqa: ANN001
    if not text.strip():
        raise UsageError("the message is empty")
    done = _stream(session.chat(text), echo=not as_json, thinking=getattr(session, "show_thinking", True))
    unsaved = _take_unsaved(session)
    assert done is not None
    reply, usage = done.message, done.usage
    if as_json:
        payload = {
            "model": session.summary.name,
            "reply": reply.content,
            "reasoning": reply.reasoning,
            "finish_reason": reply.finish_reason,
            "conversation_id": session.log.conversation_id,
            "usage": usage.model_dump(),
        }
        if session.schema is not None:
            payload["schema_valid"] = done.schema_valid
            payload["data"] = json.loads(reply.content) if done.schema_valid else None
        write_json(payload)
    else:
        console.out("", highlight=False)
        note = _finish_note(usage.finish_reason)
        if note:
            err_console.print(note, markup=False, highlight=False, style="dim")
    if unsaved is not None:
        raise unsaved
    if session.schema is not None and not done.schema_valid:
        raise SelfhostError(done.schema_error or "the reply does not match the schema")


# ----------------------------------------------------------------------------- the REPL
def _read_message() -> str:
    """One message: a line, or the lines between two lines holding only \"\"\"."""
    line = input(">>> ")
    if line.strip() != '"""':
        return line
    lines = []
    while True:
        more = input("... ")
        if more.strip() == '"""':
            return "\n".join(lines)
        lines.append(more)


def _repl(session) -> None:  # noqa: ANN001
    if sys.stdin is not None and sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - Windows
            pass
    interrupted_at_prompt = False
    while True:
        try:
            text = _read_message()
        except EOFError:
            console.out("", highlight=False)
            return
        except KeyboardInterrupt:
            if interrupted_at_prompt:
                console.out("", highlight=False)
                return
            interrupted_at_prompt = True
            console.print("\n(Ctrl-C again or Ctrl-D to exit)", markup=False, style="dim")
            continue
        interrupted_at_prompt = False
        if not text.strip():
            continue
        try:
            if text.startswith("/"):
                if _command(session, text) == "exit":
                    return
            else:
                _turn(session, session.chat(text))
        except (SelfhostError, OSError) as exc:
            print_error(exc)


def _turn(session, chunks) -> None:  # noqa: ANN001
    """Stream one reply; Ctrl-C stops it and keeps what was generated (the session logs the turn)."""
    try:
        done = _stream(chunks, thinking=getattr(session, "show_thinking", True))
        console.out("", highlight=False)
        note = _finish_note(done.usage.finish_reason) if done is not None else None
        if note:
            console.print(note, markup=False, style="dim")
    except KeyboardInterrupt:
        console.print("\n[interrupted]", markup=False, style="dim")
    show_notices(session.model.engine)
    unsaved = _take_unsaved(session)
    if unsaved is not None:
        print_error(unsaved)


def _take_unsaved(session):  # noqa: ANN001, ANN202
    """The history error of the last turn (the reply was shown but not written), once."""
    unsaved, session.unsaved = session.unsaved, None
    return unsaved


def _command(session, text: str) -> str | None:  # noqa: ANN001
    name, _, arg = text.strip().partition(" ")
    arg = arg.strip()
    say = console.print
    if name in ("/exit", "/quit", "/bye"):
        return "exit"
    if name in ("/help", "/?"):
        say(HELP, markup=False)
    elif name == "/system":
        if not arg:
            say(f"system prompt: {session.system!r}" if session.system else "no system prompt", markup=False)
        else:
            session.set_system(arg)
            say("system prompt set", markup=False, style="dim")
    elif name == "/reset":
        session.reset()
        say("new conversation", markup=False, style="dim")
    elif name == "/undo":
        removed = session.undo()
        say(f"removed {removed} message(s)" if removed else "nothing to undo", markup=False, style="dim")
    elif name == "/retry":
        _turn(session, session.retry())
    elif name == "/think":
        _set_think(session, arg)
    elif name == "/history":
        _show_history(session)
    elif name == "/stats":
        _show_stats(session)
    elif name == "/save":
        if not arg:
            raise UsageError("/save needs a file name", hint="/save chat.md or /save chat.json")
        from selfhost.chat import export

        conv = session.conversation()
        path = export.save(conv, Path(arg))
        say(f"saved {len(conv.messages)} message(s) to {path}", markup=False, style="dim")
    elif name == "/load":
        if not arg:
            raise UsageError("/load needs a file name", hint="/load chat.json")
        from selfhost.chat import export

        conv = export.load(Path(arg))
        session.load_conversation(conv)
        session.log.start_new()
        say(f"loaded {len(conv.messages)} message(s) from {arg}", markup=False, style="dim")
    else:
        raise UsageError(f"unknown command {name}", hint="type /help for the list")
    return None


def _set_think(session, arg: str) -> None:  # noqa: ANN001
    """/think, /think on, /think off: the model template's own switch (refused where it has none)."""
    if arg not in ("", "on", "off"):
        raise UsageError(f"/think {arg}: use /think, /think on or /think off")
    before = session.think
    current = before if before is not None else session.model.family.reasons
    session.think = {"on": True, "off": False}.get(arg, not current)
    try:
        session.template_vars()
    except SelfhostError:
        session.think = before
        raise
    console.print(f"thinking {'on' if session.think else 'off'}", markup=False, style="dim")


def _show_history(session) -> None:  # noqa: ANN001
    if session.system:
        console.print(f"system: {session.system}", markup=False)
    if not session.messages:
        console.print("(no messages yet)", markup=False, style="dim")
    for i, m in enumerate(session.messages):
        flags = []
        if m.tokens is not None:
            flags.append(f"{m.tokens} tok")
        if m.finish_reason and m.finish_reason != "stop":
            flags.append(m.finish_reason)
        if i < session.window_start:
            flags.append("out of context")
        if m.reasoning:
            console.print(f"{m.role} (reasoning): {m.reasoning}", markup=False, highlight=False, style="dim")
        console.print(f"{m.role} ({', '.join(flags)}): {m.content}", markup=False, highlight=False)


def _show_stats(session) -> None:  # noqa: ANN001
    u = session.last_usage
    say = console.print
    if u is None:
        say("no reply yet", markup=False, style="dim")
        return
    say(
        f"last reply: {u.generated_tokens} tokens at {u.generation_tokens_per_s:.1f} tok/s, "
        f"first token after {u.time_to_first_token_s * 1000:.0f} ms ({u.finish_reason})",
        markup=False,
    )
    say(
        f"prompt: {u.prompt_tokens} tokens, {u.reused_tokens} reused from the KV cache, {u.evaluated_tokens} "
        f"evaluated at {u.prompt_tokens_per_s:.1f} tok/s",
        markup=False,
    )
    out_of_context = sum(1 for m in session.messages[: session.window_start] if m.role == "user")
    say(
        f"context: {u.context_used}/{u.context_size} tokens used; {out_of_context} turn(s) dropped so far",
        markup=False,
    )
    if u.drafted_tokens:
        rate = u.accepted_tokens / u.drafted_tokens
        say(
            f"speculative: {u.drafted_tokens} tokens drafted, {u.accepted_tokens} accepted ({rate:.0%})",
            markup=False,
        )
    if u.restored_tokens:
        say(f"prompt cache: {u.restored_tokens} prompt tokens restored", markup=False)
    t = session.totals
    say(
        f"session: {t['turns']} replies, {t['generated']} generated, "
        f"{t['evaluated']} prompt tokens evaluated, {t['reused']} reused",
        markup=False,
    )
