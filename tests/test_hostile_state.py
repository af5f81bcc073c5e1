"""Races, faults and hostile state (issue 12, items 4-7 and 9): parallel history writers on a fresh
database, a full disk or a locked database, `models rm` through a symlink, Rich markup in
untrusted text, temp files of killed writers."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from selfhost import atomic, paths
from selfhost.chat.history import MIGRATIONS, HistoryStore
from selfhost.chat.messages import Conversation, Message
from selfhost.cli.app import app
from selfhost.errors import HistoryBusyError, HistoryDiskFullError
from tests.conftest import REPO
from tests.fakes.tinygguf import gguf_bytes


# -- 4: migrations race ------------------------------------------------------------------------
def _one_shot_chat(db: str, barrier: multiprocessing.synchronize.Barrier, i: int) -> None:
    barrier.wait(timeout=30)  # all 8 open the fresh database at the same moment
    store = HistoryStore(Path(db))
    conversation = Conversation(title=f"chat {i}", messages=[Message(role="user", content=f"hello {i}")])
    store.create(conversation)
    store.list()
    store.close()


def test_parallel_processes_on_a_fresh_history_database_lose_nothing(tmp_path: Path) -> None:
    """8 processes open a new history.db together, 20 times: every process saves its chat."""
    ctx = multiprocessing.get_context("fork")
    for round_no in range(20):
        db = tmp_path / f"history-{round_no}.db"
        barrier = ctx.Barrier(8)
        procs = [ctx.Process(target=_one_shot_chat, args=(str(db), barrier, i)) for i in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 8, f"round {round_no}: a process failed"
        store = HistoryStore(db)
        assert len(store.list()) == 8 and store.schema_version() == len(MIGRATIONS)
        store.close()
        with sqlite3.connect(db) as check:
            assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- 9: full disk, locked database -------------------------------------------------------------
def test_a_full_disk_is_reported_as_such_and_the_database_stays_intact(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    store = HistoryStore(db)
    store.create(Conversation(title="kept", messages=[Message(role="user", content="first")]))
    conn = store._conn()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own SQLITE_FULL, as on a full disk
    big = Message(role="assistant", content="x" * 200_000)
    with pytest.raises(HistoryDiskFullError) as caught:
        store.create(Conversation(title="lost", messages=[Message(role="user", content="q"), big]))
    assert "disk is full" in caught.value.message and "not saved" in caught.value.message
    assert "corrupt" not in str(caught.value)
    store.close()
    again = HistoryStore(db)
    assert [c.title for c in again.list()] == ["kept"]  # intact; nothing half-written
    again.close()


def test_a_locked_database_is_reported_as_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfhost.chat import history

    db = tmp_path / "history.db"
    HistoryStore(db).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    monkeypatch.setattr(history, "BUSY_TIMEOUT_S", 0.2)
    store = HistoryStore(db)
    with pytest.raises(HistoryBusyError, match="locked by another process"):
        store.create(Conversation(title="t", messages=[Message(role="user", content="m")]))
    holder.execute("ROLLBACK")
    store.create(Conversation(title="t", messages=[Message(role="user", content="m")]))
    assert len(store.list()) == 1


# -- 5: models rm and symlinks -----------------------------------------------------------------
def test_models_rm_never_deletes_a_file_outside_the_store_through_a_symlink(
    runner,
    tiny_gguf: Path,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    outside = tmp_path / "elsewhere" / "precious.gguf"
    outside.parent.mkdir()
    outside.write_bytes(tiny_gguf.read_bytes())
    link = paths.models_dir() / "precious-F32.gguf"
    link.symlink_to(outside)
    result = runner.invoke(app, ["pull", str(link)])
    assert result.exit_code == 0, result.output
    from selfhost.models.store import Store

    record = Store().find("precious")
    assert Path(record.path).is_symlink()
    result = runner.invoke(app, ["models", "rm", record.name, "--yes"])
    assert result.exit_code == 0, result.output
    assert outside.is_file() and outside.read_bytes() == tiny_gguf.read_bytes()
    assert Store().get(record.name) is None


# -- 6: Rich markup in untrusted text ----------------------------------------------------------
def test_markup_in_history_titles_registry_and_file_names_is_printed_as_text(
    runner,
    tiny_gguf: Path,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    HistoryStore().create(
        Conversation(title="[/] closing [bold]tags", messages=[Message(role="user", content="[/]")])
    )
    result = runner.invoke(app, ["history", "list"])
    assert result.exit_code == 0, result.output
    assert "[/] closing [bold]tags" in result.output

    paths.user_registry().write_text(
        '[models.evil]\nrepo = "x/y"\nrevision = "main"\ndefault_quant = "Q8_0"\ncontext_length = 2048\n'
        'license = "apache-2.0"\ndescription = "[/] a [red]model"\nfiles = { Q8_0 = "y-Q8_0.gguf" }\n'
    )
    result = runner.invoke(app, ["models", "list", "--available"])
    assert result.exit_code == 0, result.output
    assert "[/] a [red]model" in result.output

    weird = tmp_path / "[red]x[bold].gguf"  # a file name cannot hold '/', but tags would vanish
    weird.write_bytes(tiny_gguf.read_bytes())
    result = runner.invoke(app, ["pull", "--dry-run", str(weird)])
    assert result.exit_code == 0, result.output
    assert "[red]x[bold].gguf" in result.output


# -- 7: temp files of killed writers -----------------------------------------------------------
WRITER = """
import sys, time
from pathlib import Path
from selfhost import atomic
with atomic.atomic_path(Path(sys.argv[1]), suffix=sys.argv[2]) as tmp:
    tmp.write_bytes(b"x" * 1_000_000)
    print(tmp, flush=True)
    time.sleep(60)
"""


def _killed_writer(dest: Path, suffix: str) -> Path:
    """A real process killed -9 in the middle of an atomic write: its temp file stays behind."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(dest), suffix], stdout=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    tmp = Path(proc.stdout.readline().strip())  # type: ignore[union-attr]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert tmp.is_file()
    return tmp


def test_temp_files_of_killed_writers_are_counted_then_swept(runner) -> None:  # noqa: ANN001
    models = paths.models_dir()
    orphan = _killed_writer(models / "big-Q4_K_M.gguf", ".partial")
    with atomic.atomic_path(models / "live-Q8_0.gguf", suffix=".partial") as live:  # this process: alive
        live.write_bytes(b"y" * 2_000_000)
        old = models / ".legacy.gguf.abcd1234.partial"  # no PID in the name, untouched for two days
        old.write_bytes(b"z" * 10)
        os.utime(old, (time.time() - 2 * 86400,) * 2)
        result = runner.invoke(app, ["models", "list"])
        assert result.exit_code == 0, result.output
        assert "2 temp file(s) left by interrupted runs" in result.output and "models prune" in result.output
        assert orphan.exists() and old.exists() and live.exists()  # listing changes nothing
        assert "2.0 MB being written" in result.output  # counted in disk use while it exists
        result = runner.invoke(app, ["models", "prune", "--json"])
        assert result.exit_code == 0, result.output
        pruned = json.loads(result.stdout)
        assert sorted(pruned["removed"]) == sorted([str(orphan), str(old)])
        assert pruned["freed_bytes"] == 1_000_010 and pruned["in_progress_bytes"] == 2_000_000
        assert not orphan.exists() and not old.exists() and live.exists()
    assert not live.exists()


def test_checkpoint_writes_sweep_the_temp_files_of_a_killed_run(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from selfhost.train.gpt import checkpoint

    run = tmp_path / "run"
    run.mkdir()
    orphan = _killed_writer(run / "ckpt.pt", ".tmp")
    checkpoint.save(run / "ckpt.pt", {"model": {}})
    assert not orphan.exists()
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt"]


# -- 9: quantize on a full disk ----------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 24 MB filesystem (tmpfs), where this machine lets us mount one (root); else skipped."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_quantize_on_a_disk_that_fills_up_says_the_disk_is_full(tiny_gguf: Path, small_disk: Path) -> None:
    from selfhost.errors import DiskSpaceError
    from selfhost.events import Progress
    from selfhost.models.store import Store
    from selfhost.quantize.flow import QuantizeOptions, quantize

    out = small_disk / "tiny-Q8_0.gguf"
    events = quantize(str(tiny_gguf), QuantizeOptions(type="Q8_0", out=out, threads=1))
    with pytest.raises(DiskSpaceError, match="the disk is full"):
        for event in events:
            if isinstance(event, Progress) and event.done == 0:  # checks passed; now something fills the disk
                with open(small_disk / "filler", "wb", buffering=0) as fh, pytest.raises(OSError):
                    while True:
                        fh.write(b"\0" * (1 << 20))
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no partial output left
    assert Store().list() == []


def test_markup_in_hub_file_names_is_printed_as_text(runner, fake_hub) -> None:  # noqa: ANN001, F811
    fake_hub.add_file("test/odd", "weird[/]x/m[bold]-Q8_0.gguf", gguf_bytes("f32"))
    for args in (["pull", "--dry-run", "test/odd"], ["pull", "test/odd"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "weird[/]x/m[bold]-Q8_0.gguf" in result.output
