"""Chat history: SQLite store with numbered migrations, and `selfhost history` commands."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from selfhost import paths
from selfhost.chat.history import MIGRATIONS, ChatLog, HistoryStore
from selfhost.chat.messages import Conversation, Message
from selfhost.cli.app import app
from selfhost.errors import HistoryError, NotFoundError
from tests.conftest import DATA, checkout_env, selfhost_command


def talk(log: ChatLog, *pairs: tuple[str, str], system: str | None = None) -> list[Message]:
    messages: list[Message] = []
    for question, answer in pairs:
        messages.append(Message(role="user", content=question, tokens=3))
        messages.append(Message(role="assistant", content=answer, tokens=5, model="m", finish_reason="stop"))
        log.save(system, messages, "m")  # one transaction per completed turn
    return messages


def test_fresh_database_runs_every_migration_once(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.db")
    assert store.schema_version() == len(MIGRATIONS) == 4
    store.close()
    again = HistoryStore(tmp_path / "h.db")
    assert again.schema_version() == 4
    with sqlite3.connect(tmp_path / "h.db") as db:
        names = [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY version")]
    assert names == ["m1_initial", "m2_finish_reason", "m3_updated_index", "m4_reasoning"]


def test_old_database_is_migrated_in_place_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE _migrations (version INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)")
    MIGRATIONS[0](db)  # a database written by a selfhost that only knew migration 1
    db.execute("INSERT INTO _migrations VALUES (1, 'm1_initial', 'then')")
    db.execute(
        "INSERT INTO conversations (title, created_at, updated_at) VALUES ('old', '2025-01-01', '2025-01-01')"
    )
    db.execute(
        "INSERT INTO messages (conversation_id, seq, role, content, created_at) "
        "VALUES (1, 0, 'user', 'hi', '2025')"
    )
    db.close()
    store = HistoryStore(path)
    conv = store.get(1)
    assert store.schema_version() == 4
    assert conv.title == "old" and [(m.role, m.content, m.finish_reason) for m in conv.messages] == [
        ("user", "hi", None)
    ]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    HistoryStore(path).schema_version()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO _migrations VALUES (99, 'future', 'later')")
    with pytest.raises(HistoryError, match="newer than this selfhost"):
        HistoryStore(path).list()


def test_turns_are_synced_undo_deletes_and_search_finds(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.db")
    log = ChatLog(store)
    messages = talk(log, ("What is 100% sure?", "Nothing."), ("Name a city", "Paris"), system="be kind")
    assert log.conversation_id == 1 and all(m.id for m in messages)
    conv = store.get(1)
    assert conv.system == "be kind" and conv.title == "What is 100% sure?"
    assert [m.content for m in conv.messages] == ["What is 100% sure?", "Nothing.", "Name a city", "Paris"]
    assert conv.messages[1].tokens == 5 and conv.messages[1].model == "m"

    del messages[2:]  # /undo
    messages.append(Message(role="user", content="retry me"))
    log.save("be kind", messages, "m")
    assert [m.content for m in store.get(1).messages] == ["What is 100% sure?", "Nothing.", "retry me"]

    other = ChatLog(store)
    talk(other, ("Say 50_50", "ok"))
    assert [c.id for c in store.list()] == [2, 1]  # most recently updated first
    assert store.latest_id() == 2
    assert [h.conversation_id for h in store.search("100%")] == [1]
    assert [h.conversation_id for h in store.search("50_5")] == [2]  # LIKE wildcards are literal
    assert store.search("NOTHING")[0].snippet == "Nothing."
    assert store.search("absent") == []

    store.delete(1)
    with pytest.raises(NotFoundError):
        store.get(1)
    with pytest.raises(NotFoundError):
        store.delete(1)
    assert [c.id for c in store.list()] == [2]


def test_corrupt_database_raises_history_error_and_is_not_touched(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    path.write_bytes(b"\x00garbage" * 500)
    with pytest.raises(HistoryError, match="unreadable or corrupt"):
        HistoryStore(path).list()
    with pytest.raises(HistoryError):
        ChatLog(HistoryStore(path)).save(None, [Message(role="user", content="x")], "m")
    assert path.read_bytes() == b"\x00garbage" * 500


@pytest.fixture
def two_conversations() -> HistoryStore:
    store = HistoryStore()
    talk(ChatLog(store), ("What is the capital of France?", "Paris."), system="Answer briefly.")
    talk(ChatLog(store), ("Tell me a joke", "No."))
    return store


def test_history_cli_list_show_search(runner, two_conversations) -> None:
    listed = runner.invoke(app, ["history", "list"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert "title" in lines[0] and "Tell me a joke" in lines[1] and "capital of France" in lines[2]
    as_json = json.loads(runner.invoke(app, ["history", "list", "--json"]).output)
    assert [c["id"] for c in as_json] == [2, 1] and as_json[1]["n_messages"] == 2

    shown = runner.invoke(app, ["history", "show", "1"])
    assert shown.exit_code == 0
    assert (
        "## System\n\nAnswer briefly.\n\n## User\n\nWhat is the capital of France?\n\n## Assistant\n\nParis."
        in (shown.output)
    )
    found = runner.invoke(app, ["history", "search", "paris"])
    assert found.exit_code == 0 and "1  assistant Paris." in found.output
    none = runner.invoke(app, ["history", "search", "zebra"])
    assert "no message contains 'zebra'" in none.output
    missing = runner.invoke(app, ["history", "show", "9"])
    assert missing.exit_code == 1 and missing.output.startswith("error: no conversation 9")


def test_history_cli_export_and_rm(runner, two_conversations, tmp_path: Path) -> None:
    md = runner.invoke(app, ["history", "export", "1"])
    assert md.exit_code == 0 and md.output.startswith("# What is the capital of France?")
    out = tmp_path / "c.json"
    written = runner.invoke(app, ["history", "export", "1", "-o", str(out)])
    assert written.exit_code == 0, written.output
    conv = Conversation.model_validate_json(out.read_text())
    assert conv.id == 1 and [m.role for m in conv.messages] == ["user", "assistant"]
    forced = runner.invoke(app, ["history", "export", "1", "--format", "md", "-o", str(tmp_path / "c.txt")])
    assert forced.exit_code == 0 and (tmp_path / "c.txt").read_text().startswith("# What is")
    bad = runner.invoke(app, ["history", "export", "1", "-o", str(tmp_path / "c.pdf")])
    assert bad.exit_code == 2 and "export format" in bad.output

    gone = runner.invoke(app, ["history", "rm", "2", "--yes"])
    assert gone.exit_code == 0 and "deleted conversation 2" in gone.output
    assert [c.id for c in HistoryStore().list()] == [1]
    assert paths.history_db().exists()


def test_history_json_is_the_whole_stdout(runner, two_conversations) -> None:
    listed = runner.invoke(app, ["history", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [(c["id"], c["n_messages"]) for c in json.loads(listed.stdout)] == [(2, 2), (1, 2)]
    shown = runner.invoke(app, ["history", "show", "1", "--json"])
    assert shown.exit_code == 0, shown.output
    conversation = Conversation.model_validate(json.loads(shown.stdout))
    assert conversation.id == 1 and conversation.system == "Answer briefly."
    assert [m.content for m in conversation.messages] == ["What is the capital of France?", "Paris."]
    found = runner.invoke(app, ["history", "search", "paris", "--json"])
    assert found.exit_code == 0, found.output
    assert [(h["conversation_id"], h["role"]) for h in json.loads(found.stdout)] == [(1, "assistant")]
    assert json.loads(runner.invoke(app, ["history", "search", "zebra", "--json"]).stdout) == []
    assert json.loads(runner.invoke(app, ["history", "list", "--json", "-n", "1"]).stdout)[0]["id"] == 2


def test_history_rm_without_a_terminal_needs_yes(runner, two_conversations) -> None:
    refused = runner.invoke(app, ["history", "rm", "2"], input="y\n")  # piped input is not a person
    assert refused.exit_code == 2
    assert refused.stderr.strip().splitlines() == [
        "error: delete conversation 2 ('Tell me a joke', 2 messages): "
        "refusing without a terminal (pass --yes)"
    ]
    assert refused.stdout == "" and [c.id for c in HistoryStore().list()] == [2, 1]


def test_history_rm_asks_on_a_terminal(two_conversations) -> None:
    pexpect = pytest.importorskip("pexpect")

    def answer(reply: str) -> int:
        command = selfhost_command("history", "rm", "2")
        env = checkout_env(TERM="dumb")
        child = pexpect.spawn(command[0], command[1:], env=env, encoding="utf-8", timeout=60)
        try:
            child.expect_exact("delete conversation 2 ('Tell me a joke', 2 messages)? [y/N]:")
            child.sendline(reply)
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
        return child.exitstatus

    assert answer("n") == 1 and [c.id for c in HistoryStore().list()] == [2, 1]
    assert answer("y") == 0 and [c.id for c in HistoryStore().list()] == [1]


V1_FIXTURE = DATA / "history_v1.db"  # frozen; built from history_v1.sql


def test_committed_v1_database_is_migrated_keeping_every_row(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    path.write_bytes(V1_FIXTURE.read_bytes())
    with sqlite3.connect(path) as db:  # the fixture really is the old schema
        assert [r[1] for r in db.execute("PRAGMA table_info(messages)")][-1] == "model"
    store = HistoryStore(path)
    assert store.schema_version() == len(MIGRATIONS)
    first, second = store.get(1), store.get(2)
    assert (first.title, first.model, first.system) == (
        "capital of France",
        "smollm2-135m:Q4_1",
        "Answer briefly.",
    )
    assert [(m.role, m.content, m.tokens, m.finish_reason) for m in first.messages] == [
        ("user", "What is the capital of France?", 7, None),
        ("assistant", "Paris.", 3, None),
    ]
    assert second.system is None and second.messages[1].content == "Soft rain on the roof"
    assert [c.id for c in store.list()] == [2, 1]  # newest first (the index of migration 3)
    # New turns are written with today's columns next to the old rows.
    more = [
        Message(role="user", content="And Italy?", tokens=3),
        Message(role="assistant", content="Rome.", tokens=2, model="m", finish_reason="stop"),
    ]
    ChatLog(store, conversation_id=1).save(first.system, first.messages + more, "m")
    store.close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT conversation_id, seq, content, finish_reason FROM messages ORDER BY id")
        assert [r for r in rows if r[0] == 1] == [
            (1, 0, "What is the capital of France?", None),
            (1, 1, "Paris.", None),
            (1, 2, "And Italy?", None),
            (1, 3, "Rome.", "stop"),
        ]
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'conversations_by_updated'").fetchone()
    assert V1_FIXTURE.read_bytes() != path.read_bytes()


def test_a_failing_migration_rolls_back_and_leaves_the_database_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "history.db"
    path.write_bytes(V1_FIXTURE.read_bytes())
    ran: list[int] = []

    def broken_m2(db: sqlite3.Connection) -> None:
        MIGRATIONS_BEFORE[1](db)  # the real ALTER TABLE, then a crash before the migration is recorded
        ran.append(2)
        raise sqlite3.OperationalError("disk I/O error")

    MIGRATIONS_BEFORE = list(MIGRATIONS)
    monkeypatch.setattr("selfhost.chat.history.MIGRATIONS", [MIGRATIONS[0], broken_m2, *MIGRATIONS[2:]])
    with pytest.raises(HistoryError, match="unreadable or corrupt"):
        HistoryStore(path).list()
    assert ran == [2]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT MAX(version) FROM _migrations").fetchone()[0] == 1
        assert "finish_reason" not in [r[1] for r in db.execute("PRAGMA table_info(messages)")]
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 4
    monkeypatch.undo()  # the fixed selfhost migrates the same file
    store = HistoryStore(path)
    assert store.schema_version() == len(MIGRATIONS) and len(store.get(1).messages) == 2
