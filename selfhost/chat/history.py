"""Chat history in SQLite (SELFHOST_HOME/history.db) with numbered migrations.

Every completed turn is written in one transaction, so a crash loses at most the reply in
flight. A database that SQLite cannot read raises HistoryError and is never overwritten.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel

from selfhost import paths
from selfhost.chat.messages import Conversation, Message, conversation_title, utc_now
from selfhost.errors import HistoryBusyError, HistoryDiskFullError, HistoryError, NotFoundError

BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another process's transaction


def _m1_initial(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE conversations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            title TEXT NOT NULL DEFAULT '',
            model TEXT,
            system TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            tokens INTEGER,
            created_at TEXT NOT NULL,
            model TEXT
        )"""
    )
    db.execute("CREATE INDEX messages_by_conversation ON messages(conversation_id, seq)")


def _m2_finish_reason(db: sqlite3.Connection) -> None:
    """Replies remember why they ended (stop, length, context, interrupted)."""
    db.execute("ALTER TABLE messages ADD COLUMN finish_reason TEXT")


def _m3_updated_index(db: sqlite3.Connection) -> None:
    db.execute("CREATE INDEX conversations_by_updated ON conversations(updated_at)")


def _m4_reasoning(db: sqlite3.Connection) -> None:
    """A thinking model's reasoning, kept apart from its answer (`content`)."""
    db.execute("ALTER TABLE messages ADD COLUMN reasoning TEXT")


# Append only: migration N runs once on every database whose version is below N.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _m1_initial,
    _m2_finish_reason,
    _m3_updated_index,
    _m4_reasoning,
]


class ConversationSummary(BaseModel):
    id: int
    title: str
    model: str | None
    created_at: datetime
    updated_at: datetime
    n_messages: int


class SearchHit(BaseModel):
    conversation_id: int
    title: str
    role: str
    snippet: str
    created_at: datetime


class HistoryStore:
    """Conversations and their messages. Opens (and migrates) the database on first use."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else paths.history_db()
        self._db: sqlite3.Connection | None = None

    # ------------------------------------------------------------ connection
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = None
            try:
                # autocommit mode: transactions are explicit (BEGIN ... COMMIT), DDL included
                db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
                db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                db.execute("PRAGMA foreign_keys = ON")
                _enable_wal(db)
                self._migrate(db)
            except sqlite3.Error as exc:
                if db is not None:
                    db.close()
                raise self._error(exc) from exc
            except BaseException:
                if db is not None:
                    db.close()
                raise
            self._db = db
        return self._db

    def _error(self, exc: sqlite3.Error) -> HistoryError:
        """What went wrong, as what it is: a full disk and a busy database are not corruption."""
        code = getattr(exc, "sqlite_errorcode", None)
        text = str(exc).lower()
        if code == sqlite3.SQLITE_FULL or "disk is full" in text:
            return HistoryDiskFullError(
                f"the disk is full: the chat history {self.path} could not be written, "
                "so the last turn was not saved",
                hint="free some space; the database itself is intact",
            )
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in text or "busy" in text:
            return HistoryBusyError(
                f"the chat history {self.path} is locked by another process ({exc})",
                hint="close the other selfhost or sqlite3 using it and try again",
            )
        if code in (
            sqlite3.SQLITE_READONLY,
            sqlite3.SQLITE_CANTOPEN,
            sqlite3.SQLITE_IOERR,
            sqlite3.SQLITE_PERM,
        ):
            return HistoryError(
                f"the chat history {self.path} cannot be written or opened ({exc})",
                hint="check the permissions and free space of its folder",
            )
        return HistoryError(
            f"the chat history database {self.path} is unreadable or corrupt ({exc})",
            hint="move it aside to start a new one, or use --no-log; nothing was changed",
        )

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring the schema up to date in ONE write transaction: the version is read after
        BEGIN IMMEDIATE, so of two processes opening a fresh database only one migrates."""
        if _read_version(db) == len(MIGRATIONS):
            return  # the common case: nothing to do, no write lock taken
        with _transaction(db):
            db.execute(
                "CREATE TABLE IF NOT EXISTS _migrations "
                "(version INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)"
            )
            version = _read_version(db)
            if version > len(MIGRATIONS):
                raise HistoryError(
                    f"the chat history database {self.path} has schema version {version}, "
                    f"newer than this selfhost understands ({len(MIGRATIONS)})",
                    hint="upgrade selfhost",
                )
            for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                migration(db)
                db.execute(
                    "INSERT INTO _migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (number, migration.__name__.lstrip("_"), utc_now().isoformat()),
                )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        try:
            with _transaction(db):
                yield db
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from exc

    def schema_version(self) -> int:
        with self._tx() as db:
            return int(db.execute("SELECT MAX(version) FROM _migrations").fetchone()[0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # ------------------------------------------------------------------ writes
    def create(self, conversation: Conversation) -> int:
        """Insert a conversation and its messages; returns its id (also set on the object)."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO conversations (title, model, system, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    conversation.title,
                    conversation.model,
                    conversation.system,
                    conversation.created_at.isoformat(),
                    utc_now().isoformat(),
                ),
            )
            conversation.id = int(cur.lastrowid or 0)
            self._sync_messages(db, conversation.id, conversation.messages)
        return conversation.id

    def sync(
        self, conversation_id: int, system: str | None, messages: Sequence[Message], title: str = ""
    ) -> None:
        """Make the stored conversation match `messages` in one transaction.

        Messages without an id are inserted (and get one); stored messages that are no longer
        in the list (after /undo or /retry) are deleted.
        """
        with self._tx() as db:
            found = db.execute("SELECT id FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            if found is None:
                raise NotFoundError(f"no conversation {conversation_id} in the history")
            db.execute(
                "UPDATE conversations SET system = ?, updated_at = ?, title = CASE WHEN title = '' THEN ? "
                "ELSE title END WHERE id = ?",
                (system, utc_now().isoformat(), title, conversation_id),
            )
            self._sync_messages(db, conversation_id, messages)

    def _sync_messages(
        self, db: sqlite3.Connection, conversation_id: int, messages: Sequence[Message]
    ) -> None:
        keep = [m.id for m in messages if m.id is not None]
        marks = ",".join("?" * len(keep))
        db.execute(
            f"DELETE FROM messages WHERE conversation_id = ?{f' AND id NOT IN ({marks})' if keep else ''}",
            (conversation_id, *keep),
        )
        for seq, m in enumerate(messages):
            if m.id is None:
                cur = db.execute(
                    "INSERT INTO messages (conversation_id, seq, role, content, tokens, created_at, model, "
                    "finish_reason, reasoning) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        conversation_id,
                        seq,
                        m.role,
                        m.content,
                        m.tokens,
                        m.created_at.isoformat(),
                        m.model,
                        m.finish_reason,
                        m.reasoning,
                    ),
                )
                m.id = int(cur.lastrowid or 0)

    def update(self, conversation_id: int, *, title: str | None = None, system: str | None = None) -> None:
        """Rename a conversation and/or set its system prompt ("" clears it)."""
        with self._tx() as db:
            found = db.execute("SELECT title, system FROM conversations WHERE id = ?", (conversation_id,))
            row = found.fetchone()
            if row is None:
                raise NotFoundError(f"no conversation {conversation_id} in the history")
            new_title = " ".join(title.split())[:200] if title is not None else row[0]
            new_system = (system or None) if system is not None else row[1]
            db.execute(
                "UPDATE conversations SET title = ?, system = ?, updated_at = ? WHERE id = ?",
                (new_title, new_system, utc_now().isoformat(), conversation_id),
            )

    def delete(self, conversation_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            cur = db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            if cur.rowcount == 0:
                raise NotFoundError(f"no conversation {conversation_id} in the history")

    # ------------------------------------------------------------------- reads
    def list(self, limit: int | None = None) -> list[ConversationSummary]:
        sql = (
            "SELECT c.id, c.title, c.model, c.created_at, c.updated_at, COUNT(m.id) FROM conversations c "
            "LEFT JOIN messages m ON m.conversation_id = c.id GROUP BY c.id "
            "ORDER BY c.updated_at DESC, c.id DESC"
        )
        params: tuple[int, ...] = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (limit,)
        with self._tx() as db:
            rows = db.execute(sql, params).fetchall()
        return [
            ConversationSummary(
                id=r[0], title=r[1], model=r[2], created_at=r[3], updated_at=r[4], n_messages=r[5]
            )
            for r in rows
        ]

    def latest_id(self) -> int | None:
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM conversations ORDER BY updated_at DESC, id DESC LIMIT 1"
            ).fetchone()
        return int(row[0]) if row else None

    def get(self, conversation_id: int) -> Conversation:
        with self._tx() as db:
            row = db.execute(
                "SELECT id, title, model, system, created_at, updated_at FROM conversations WHERE id = ?",
                (conversation_id,),
            ).fetchone()
            if row is None:
                raise NotFoundError(
                    f"no conversation {conversation_id} in the history", hint="see `selfhost history list`"
                )
            rows = db.execute(
                "SELECT id, role, content, tokens, created_at, model, finish_reason, reasoning FROM messages "
                "WHERE conversation_id = ? ORDER BY seq, id",
                (conversation_id,),
            ).fetchall()
        messages = [
            Message(
                id=r[0],
                role=r[1],
                content=r[2],
                tokens=r[3],
                created_at=r[4],
                model=r[5],
                finish_reason=r[6],
                reasoning=r[7],
            )
            for r in rows
        ]
        return Conversation(
            id=row[0],
            title=row[1],
            model=row[2],
            system=row[3],
            created_at=row[4],
            updated_at=row[5],
            messages=messages,
        )

    def search(self, text: str, limit: int = 50) -> list[SearchHit]:
        """Messages containing `text` (case-insensitive), newest first."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._tx() as db:
            rows = db.execute(
                "SELECT m.conversation_id, c.title, m.role, m.content, m.created_at FROM messages m "
                "JOIN conversations c ON c.id = m.conversation_id WHERE m.content LIKE ? ESCAPE '\\' "
                "ORDER BY m.created_at DESC, m.id DESC LIMIT ?",
                (pattern, limit),
            ).fetchall()
        return [
            SearchHit(
                conversation_id=r[0], title=r[1], role=r[2], snippet=_snippet(r[3], text), created_at=r[4]
            )
            for r in rows
        ]


def _read_version(db: sqlite3.Connection) -> int:
    """The schema version (0: a new database). Needs no lock outside a transaction."""
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_migrations'"
    ).fetchone()
    if not exists:
        return 0
    return int(db.execute("SELECT COALESCE(MAX(version), 0) FROM _migrations").fetchone()[0])


def _enable_wal(db: sqlite3.Connection) -> None:
    """WAL lets readers run beside one writer. Some filesystems (network mounts) refuse it: then
    SQLite keeps its rollback journal, which is still correct, only less concurrent."""
    try:
        db.execute("PRAGMA journal_mode = WAL")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc).lower() and "busy" not in str(exc).lower():
            raise


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")  # may fail too (disk full, busy): then nothing of the block is kept
    except BaseException:
        if db.in_transaction:  # SQLITE_FULL may already have rolled it back
            db.execute("ROLLBACK")
        raise


def _snippet(content: str, text: str, width: int = 60) -> str:
    flat = " ".join(content.split())
    at = flat.lower().find(text.lower())
    if at < 0:
        return flat[: width * 2]
    start = max(0, at - width)
    end = min(len(flat), at + len(text) + width)
    return ("…" if start else "") + flat[start:end] + ("…" if end < len(flat) else "")


class ChatLog:
    """Keeps one live conversation written to the store; `store=None` (--no-log) keeps nothing."""

    def __init__(self, store: HistoryStore | None, conversation_id: int | None = None) -> None:
        self.store = store
        self.conversation_id = conversation_id

    def save(self, system: str | None, messages: Sequence[Message], model: str | None) -> None:
        """Write the conversation as it is now (one transaction); the first save creates it."""
        if self.store is None or (not messages and self.conversation_id is None):
            return
        title = conversation_title(messages)
        if self.conversation_id is None:
            conversation = Conversation(title=title, model=model, system=system, messages=list(messages))
            self.conversation_id = self.store.create(conversation)  # sets the ids on `messages` too
        else:
            self.store.sync(self.conversation_id, system, messages, title=title)

    def start_new(self) -> None:
        self.conversation_id = None
