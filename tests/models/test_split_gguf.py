"""Split GGUFs (`-00001-of-00003.gguf`) end to end against the fake Hub, and GGUFs already in the HF cache.

The 3-part model is written by the gguf package (GGUFWriter's split_max_tensors, like llama.cpp's
gguf-split); llama.cpp loads it through the first part; the fake Hub serves it over HTTP.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from pathlib import Path

import pytest

from selfhost import paths
from selfhost.cli.app import app
from selfhost.errors import DownloadError, IntegrityError, NotFoundError
from selfhost.events import Progress, run_to_end
from selfhost.models import hfcache, hub
from selfhost.models.pull import pull
from selfhost.models.resolve import resolve_model
from selfhost.models.store import Store
from tests.conftest import one_error_line
from tests.fakes.hubserver import FakeHub
from tests.fakes.tinygguf import gguf_bytes
from tests.models.test_pull import state

REPO = "test/split-GGUF"
FAST = ["--threads", "1"]


@functools.cache
def split_parts() -> dict[str, bytes]:
    """name -> bytes of a tiny random llama written as a 3-part split GGUF (21 tensors, 8 per part)."""
    from tests.fakes.tinygguf import write_tiny_llama

    folder = Path(tempfile.mkdtemp())
    first = write_tiny_llama(folder / "tiny-F32.gguf", split_max_tensors=8)
    parts = sorted(folder.glob("tiny-F32-*-of-*.gguf"))
    assert first == parts[0] and [p.name for p in parts] == hub.split_part_names(first.name)
    return {p.name: p.read_bytes() for p in parts}


NAMES = list(split_parts())
REGISTRY = f"""
[models.tinysplit]
repo = "{REPO}"
default_quant = "F32"
context_length = 128
license = "mit"
description = "tiny random model in three parts"
files = {{ F32 = "{NAMES[0]}" }}
size_gb = {{ F32 = 0.001 }}
"""


@pytest.fixture
def split_hub(fake_hub: FakeHub) -> FakeHub:  # noqa: F811 - the fixture imported above
    for name, data in split_parts().items():
        fake_hub.add_file(REPO, name, data)
    paths.user_registry().write_text(REGISTRY)
    return fake_hub


def _write(data: bytes) -> Path:
    path = Path(tempfile.mkdtemp()) / "single-F32.gguf"
    path.write_bytes(data)
    return path


def run(name: str, **kwargs) -> list:
    return list(pull(name, **kwargs))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_three_parts_exist_and_are_valid_gguf():
    assert NAMES == [f"tiny-F32-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert all(data[:4] == b"GGUF" for data in split_parts().values())


@pytest.mark.needs_model
def test_pull_resumes_a_cut_in_part_2_verifies_each_part_and_registers_one_model(split_hub, runner):
    data = split_parts()
    p1, p2, p3 = (data[n] for n in NAMES)
    half = len(p2) // 2
    split_hub.cut_at[(REPO, NAMES[1])] = half
    with pytest.raises(DownloadError, match="run the same command again"):
        run("tinysplit", retries=1)
    assert Store().list() == []  # nothing registered
    layout = hub.CacheLayout.for_repo(REPO)
    assert layout.blob(sha(p1)).exists()  # part 1 complete and verified
    assert layout.incomplete(sha(p2)).stat().st_size == half
    assert not (layout.folder / "snapshots").exists()  # no half model visible in the cache

    split_hub.cut_at.clear()
    split_hub.reset_counters()
    events = run("tinysplit")
    record = run_to_end(events).record
    assert split_hub.bytes_served == len(p2) - half + len(p3)  # only what was missing
    assert any(rng == f"bytes={half}-" for _, _, rng in split_hub.requests)
    resumed = [e for e in events if isinstance(e, Progress) and e.task == NAMES[1]]
    assert resumed[0].metrics["resumed_from"] == half and resumed[0].done == half
    commit = split_hub.repos[REPO].commit
    assert record.name == "tinysplit:F32" and record.path == layout.pointer(commit, NAMES[0])
    assert record.parts == [layout.pointer(commit, n) for n in NAMES]
    assert record.size == len(p1) + len(p2) + len(p3) and record.sha256 == sha(p1)
    for name, part in zip(NAMES, record.parts, strict=True):
        assert part.resolve() == layout.blob(sha(data[name]))  # each blob named by its verified sha256
    assert [r.name for r in Store().list()] == ["tinysplit:F32"]

    # chat loads it through llama.cpp's split loading (the first part) and answers
    result = runner.invoke(
        app, ["chat", "tinysplit", "-p", "hi", "-n", "4", "--seed", "1", "--json", "--no-log", *FAST]
    )
    assert result.exit_code == 0, result.output
    start_line, _, body = result.output.partition("\n")
    assert "tinysplit:F32" in start_line and "0/2 layers" in start_line
    assert json.loads(body)["usage"]["generated_tokens"] > 0

    listed = runner.invoke(app, ["models", "list"])
    assert "3 parts" in listed.output and "tinysplit:F32" in listed.output
    from selfhost.units import human_bytes

    assert f"1 model(s), {human_bytes(record.size)} on disk" in listed.output  # every part counted
    shown = json.loads(runner.invoke(app, ["models", "show", "tinysplit", "--json"]).stdout)

    single = json.loads(
        runner.invoke(app, ["models", "show", str(_write(gguf_bytes("f32"))), "--json"]).stdout
    )
    assert shown["parts"] == 3 and shown["size"] == record.size
    assert shown["parameters"] == single["parameters"]  # all parts' tensors: the same model as one file

    # rm removes every part: snapshot links and blobs
    removed = runner.invoke(app, ["models", "rm", "tinysplit", "--yes"])
    assert removed.exit_code == 0, removed.output
    assert "freed" in removed.output
    assert not any(p.exists() or p.is_symlink() for p in record.parts)
    assert not any(layout.blob(sha(d)).exists() for d in data.values())
    assert Store().list() == []


def test_dry_run_lists_every_part(split_hub, runner):
    plan = run_to_end(run("tinysplit", dry_run=True))
    assert [f.file for f in plan.files] == NAMES
    assert plan.to_download == sum(len(d) for d in split_parts().values())
    result = runner.invoke(app, ["pull", "tinysplit", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"{NAMES[0]} and 2 more parts" in result.output and all(n in result.output for n in NAMES)
    assert split_hub.bytes_served == 0


def test_missing_part_is_a_clear_error_and_nothing_is_fetched(fake_hub, runner):  # noqa: F811
    for name in (NAMES[0], NAMES[2]):
        fake_hub.add_file(REPO, name, split_parts()[name])
    paths.user_registry().write_text(REGISTRY)
    before = state()
    result = runner.invoke(app, ["pull", "tinysplit"])
    assert result.exit_code != 0
    line = one_error_line(result)
    assert "has 3 parts, missing tiny-F32-00002-of-00003.gguf" in line
    assert state() == before and fake_hub.bytes_served == 0
    with pytest.raises(NotFoundError):
        run(f"{REPO}:F32")


def test_corrupt_part_is_a_clear_error_and_nothing_registered(split_hub, runner):
    split_hub.corrupt.add((REPO, NAMES[2]))
    result = runner.invoke(app, ["pull", "tinysplit"])
    assert result.exit_code != 0
    assert f"{NAMES[2]} is corrupt" in one_error_line(result, progress=4)  # NAME, then each part
    assert Store().list() == []
    layout = hub.CacheLayout.for_repo(REPO)
    assert not layout.blob(sha(split_parts()[NAMES[2]])).exists()  # the bad copy is deleted
    assert not (layout.folder / "snapshots").exists()
    with pytest.raises(IntegrityError):
        run("tinysplit")


def test_offline_registers_a_cached_split_and_a_missing_part_is_refused_before_llama_cpp(split_hub, runner):
    record = run_to_end(run("tinysplit")).record
    paths.store_file().unlink()
    split_hub.reset_counters()
    again = run_to_end(run("tinysplit", offline=True)).record
    assert again.parts == record.parts and split_hub.requests == []

    record.parts[2].unlink()  # a part vanished from the cache
    result = runner.invoke(app, ["chat", "tinysplit", "-p", "hi", *FAST])
    assert result.exit_code != 0
    assert "split GGUF with 1 of 3 parts missing" in one_error_line(result)


@pytest.mark.needs_model
def test_quantize_a_split_input_writes_one_file(split_hub, runner):
    run("tinysplit")
    result = runner.invoke(app, ["quantize", "tinysplit", "--type", "Q8_0", "--threads", "1"])
    assert result.exit_code == 0, result.output
    from selfhost.runtime import gguf_info

    out = resolve_model("tinysplit:Q8_0")
    assert out.parts == [] and not hub.is_split(out.path.name)
    info = gguf_info.inspect(out.path)
    per_part = [gguf_info.inspect(p).n_tensors for p in resolve_model("tinysplit:F32").parts]
    assert per_part == [8, 8, 5]
    assert info.quant == "Q8_0" and info.n_tensors == sum(per_part)  # every part's tensors, in one file


# -- GGUFs already in the Hugging Face cache ----------------------------------------------------------
@pytest.mark.needs_model
def test_hf_cache_gguf_is_listed_and_usable_without_a_copy(fake_hub, runner):  # noqa: F811
    from huggingface_hub import hf_hub_download


    fake_hub.add_file("someone/tiny-GGUF", "tiny-F32.gguf", gguf_bytes("f32"))
    for name, data in split_parts().items():
        fake_hub.add_file(REPO, name, data)
    single = Path(hf_hub_download("someone/tiny-GGUF", "tiny-F32.gguf", cache_dir=hub.cache_dir()))
    for name in NAMES:
        hf_hub_download(REPO, name, cache_dir=hub.cache_dir())

    found = {c.name: c for c in hfcache.scan()}
    assert set(found) == {"someone/tiny-GGUF:F32", f"{REPO}:F32"}
    assert found["someone/tiny-GGUF:F32"].path == single and found[f"{REPO}:F32"].parts[0].name == NAMES[0]

    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    assert "Hugging Face cache" in listed.output and "someone/tiny-GGUF:F32" in listed.output
    assert "(3 parts)" in listed.output

    resolved = resolve_model("someone/tiny-GGUF:F32")
    assert resolved.path == single and resolved.record is None
    for ref in ("someone/tiny-GGUF", f"{REPO}:F32"):
        result = runner.invoke(app, ["chat", ref, "-p", "hi", "-n", "2", "--json", "--no-log", *FAST])
        assert result.exit_code == 0, result.output
    assert Store().list() == [] and list(paths.models_dir().iterdir()) == []  # no copy, nothing registered

    # once pulled, a cached file is registered and no longer listed twice
    fake_hub.reset_counters()
    run("someone/tiny-GGUF:F32")
    assert fake_hub.bytes_served == 0
    listed = runner.invoke(app, ["models", "list"])
    assert listed.output.count("someone/tiny-GGUF:F32") == 1


def test_incomplete_cached_split_is_not_listed(fake_hub):  # noqa: F811
    from huggingface_hub import hf_hub_download

    for name, data in split_parts().items():
        fake_hub.add_file(REPO, name, data)
    hf_hub_download(REPO, NAMES[0], cache_dir=hub.cache_dir())
    assert hfcache.scan() == []
    with pytest.raises(NotFoundError, match="is not downloaded"):
        resolve_model(f"{REPO}:F32")


def test_importing_a_local_split_copies_every_part_and_rm_removes_them(tmp_path, runner):
    for name, data in split_parts().items():
        (tmp_path / name).write_bytes(data)
    record = run_to_end(pull(str(tmp_path / NAMES[0]))).record
    assert record.name == "tiny:F32" and record.source == "local"
    assert [p.name for p in record.parts] == [f"tiny-F32-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert all(p.parent == paths.models_dir() for p in record.parts)
    assert [p.read_bytes() for p in record.parts] == list(split_parts().values())
    assert resolve_model("tiny").parts == record.parts

    for bad, expected in ((NAMES[1], "is part 2 of a split GGUF"), (NAMES[0], "missing beside it")):
        if expected == "missing beside it":
            (tmp_path / NAMES[2]).unlink()
        result = runner.invoke(app, ["pull", str(tmp_path / bad)])
        assert result.exit_code != 0 and expected in one_error_line(result)

    assert runner.invoke(app, ["models", "rm", "tiny:F32", "--yes"]).exit_code == 0
    assert list(paths.models_dir().iterdir()) == [] and Store().list() == []


@pytest.mark.needs_model
def test_metadata_only_first_part_loads_and_a_truncated_part_is_refused_before_llama_cpp(tmp_path, runner):
    from tests.fakes.tinygguf import write_tiny_llama

    first = write_tiny_llama(tmp_path / "meta-F32.gguf", split_max_tensors=8, small_first_shard=True)
    assert first.name == "meta-F32-00001-of-00004.gguf"
    ok = runner.invoke(app, ["chat", str(first), "-p", "hi", "-n", "2", "--json", "--no-log", *FAST])
    assert ok.exit_code == 0, ok.output

    second = first.with_name("meta-F32-00002-of-00004.gguf")
    second.write_bytes(second.read_bytes()[:-100])
    bad = runner.invoke(app, ["chat", str(first), "-p", "hi", *FAST])
    assert bad.exit_code != 0
    assert "meta-F32-00002-of-00004.gguf is truncated" in one_error_line(bad)
