"""Download branches the happy path never takes: a server that ignores Range, a 416, a leftover partial
larger than the file, and two concurrent pulls of one blob (the per-blob lock)."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from selfhost.errors import SelfhostError
from selfhost.events import Progress
from selfhost.models import hub
from selfhost.models.store import Store
from tests.conftest import TINY_REGISTRY, TINY_REPO
from tests.fakes.tinygguf import gguf_bytes
from tests.models.test_pull import pulled, run


def partial_file(data: bytes):  # noqa: ANN201
    part = hub.CacheLayout.for_repo(TINY_REPO).incomplete(hashlib.sha256(data).hexdigest())
    part.parent.mkdir(parents=True, exist_ok=True)
    return part


def test_server_that_ignores_range_restarts_from_zero(tiny_hub):  # noqa: F811
    data = gguf_bytes("f32")
    part = partial_file(data)
    part.write_bytes(data[: len(data) // 2])  # good bytes, but the server will not resume
    tiny_hub.ignore_range = True
    events = run("tiny:F32")
    assert pulled(events).record.sha256 == hashlib.sha256(data).hexdigest()
    assert any(rng == f"bytes={len(data) // 2}-" for _, _, rng in tiny_hub.requests)  # it asked
    assert tiny_hub.bytes_served == len(data)  # and got (and kept only) the whole file once
    assert not part.exists()
    assert hub.CacheLayout.for_repo(TINY_REPO).blob(hashlib.sha256(data).hexdigest()).read_bytes() == data


def test_a_416_for_a_short_partial_is_one_clear_error_and_nothing_is_registered(tiny_hub):  # noqa: F811
    data = gguf_bytes("f32")
    part = partial_file(data)
    part.write_bytes(data[:1000])
    tiny_hub.range_status = 416  # the server disagrees about the bytes we have
    with pytest.raises(SelfhostError) as err:
        run("tiny:F32", retries=1)
    assert "HTTP 416" in str(err.value) and "\n" not in str(err.value)
    assert Store().list() == []
    tiny_hub.range_status = None  # a server that resumes again: the next run finishes
    assert pulled(run("tiny:F32")).record.sha256 == hashlib.sha256(data).hexdigest()


def test_leftover_partial_larger_than_the_file_is_discarded(tiny_hub):  # noqa: F811
    data = gguf_bytes("f32")
    part = partial_file(data)
    part.write_bytes(b"\x00" * (len(data) + 4096))  # junk from some other transfer
    events = run("tiny:F32")
    assert pulled(events).record.sha256 == hashlib.sha256(data).hexdigest()
    assert tiny_hub.bytes_served == len(data)
    assert all(rng is None for method, _, rng in tiny_hub.requests if method == "GET")  # no bogus Range
    assert next(e for e in events if isinstance(e, Progress)).metrics["resumed_from"] == 0


def test_two_concurrent_pulls_of_one_blob_download_it_once(fake_hub):  # noqa: F811
    from selfhost import paths

    data = gguf_bytes("f32", n_embd=256, n_ff=512)
    fake_hub.add_file(TINY_REPO, "tiny-F32.gguf", data)
    fake_hub.add_file(TINY_REPO, "tiny-F16.gguf", gguf_bytes("f16"))
    paths.user_registry().write_text(TINY_REGISTRY)
    fake_hub.throttle_bps = len(data)  # about a second per transfer
    results: dict[str, object] = {}

    def pull_in_thread(name: str) -> None:
        try:
            results[name] = pulled(run("tiny:F32"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[name] = exc

    first = threading.Thread(target=pull_in_thread, args=("first",))
    first.start()
    deadline = time.monotonic() + 30
    while fake_hub.bytes_served == 0 and time.monotonic() < deadline:  # the first transfer is running
        time.sleep(0.01)
    second = threading.Thread(target=pull_in_thread, args=("second",))
    second.start()
    first.join(60)
    second.join(60)
    digest = hashlib.sha256(data).hexdigest()
    assert [getattr(results[n], "record", results[n]).sha256 for n in ("first", "second")] == [digest] * 2
    assert fake_hub.bytes_served == len(data)  # the second waited for the lock, then reused the blob
    assert [r.name for r in Store().list()] == ["tiny:F32"]
    assert hub.CacheLayout.for_repo(TINY_REPO).blob(digest).read_bytes() == data
