"""The store manifest and GGUF validation: the foundation every command relies on."""

from __future__ import annotations

import os

import pytest

from selfhost.errors import GGUFError, NotFoundError
from selfhost.models.names import split_tag as split_name
from selfhost.models.store import ModelRecord, Store
from selfhost.runtime.gguf_info import inspect


def _record(name: str, path, source: str = "quantized") -> ModelRecord:
    return ModelRecord(name=name, path=path, size=path.stat().st_size, sha256="0" * 64, source=source)


def test_split_name():
    assert split_name("qwen2.5-0.5b:Q8_0") == ("qwen2.5-0.5b", "Q8_0")
    assert split_name("owner/repo:Q4_K_M") == ("owner/repo", "Q4_K_M")
    assert split_name("my-gpt") == ("my-gpt", None)


def test_find_prefers_exact_then_single_then_preferred(tmp_path):
    store = Store(tmp_path / "store.json")
    for quant in ("Q8_0", "Q4_K_M"):
        f = tmp_path / f"m-{quant}.gguf"
        f.write_bytes(b"x")
        store.add(_record(f"m:{quant}", f))
    assert store.find("m:Q8_0").name == "m:Q8_0"
    assert store.find("m", prefer_quant="Q4_K_M").name == "m:Q4_K_M"
    with pytest.raises(NotFoundError, match="ambiguous"):
        store.find("m")
    with pytest.raises(NotFoundError):
        store.find("other")


def test_remove_keeps_a_blob_another_name_still_uses(tmp_path):
    store = Store(tmp_path / "store.json")
    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    links = []
    for name in ("a", "b"):
        link = tmp_path / f"{name}.gguf"
        os.symlink(blob, link)
        links.append(link)
        store.add(_record(f"{name}:Q8_0", link, source="hub"))
    store.remove("a:Q8_0")
    assert not links[0].exists() and blob.exists() and links[1].exists()
    store.remove("b:Q8_0")
    assert not blob.exists()
    assert store.list() == []


def test_corrupt_manifest_is_one_clear_error(tmp_path):
    manifest = tmp_path / "store.json"
    manifest.write_text("{not json")
    with pytest.raises(Exception, match="corrupt"):
        Store(manifest).list()


def test_inspect_reads_real_metadata(smollm2_gguf):
    info = inspect(smollm2_gguf)
    assert info.architecture == "llama"
    assert info.quant == "Q4_1"
    assert info.vocab_size == 49152 and info.context_length == 8192 and info.n_layers == 30
    assert info.chat_template and "im_start" in info.chat_template
    assert 130e6 < info.n_params < 140e6


@pytest.mark.parametrize("cut", [10, 100, 5000, -1000])
def test_inspect_rejects_truncated_and_foreign_files(tiny_gguf, tmp_path, cut):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(GGUFError):
        inspect(bad)
    bad.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(GGUFError, match="not a GGUF"):
        inspect(bad)
