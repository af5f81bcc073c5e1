"""The one model-name grammar (selfhost.models.names): every form parses one way, and `pull` and
`resolve` (what chat, serve, quantize, compare and `models show` load) give the same answer for it."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import pytest

from selfhost import paths
from selfhost.cli.app import app
from selfhost.errors import NotFoundError, SelfhostError, UsageError
from selfhost.events import run_to_end
from selfhost.models.names import ModelName, check_store_name, parse_name, split_tag
from selfhost.models.pull import pull
from selfhost.models.resolve import NotDownloaded, resolve_model
from selfhost.models.store import ModelRecord, Store
from tests.conftest import TINY_REPO
from tests.fakes.tinygguf import gguf_bytes
from tests.models.test_pull import state

FAST = ["--threads", "1"]


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home folder with a GGUF in it, a working directory with one, and one in its parent."""
    home = tmp_path / "home"
    work = tmp_path / "work" / "sub"
    for folder in (home, work, work.parent):
        folder.mkdir(parents=True, exist_ok=True)
    (home / "h.gguf").write_bytes(gguf_bytes("f32"))
    (work / "w.gguf").write_bytes(gguf_bytes("f32"))
    (work.parent / "up.gguf").write_bytes(gguf_bytes("f32"))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return tmp_path


# (text, kind, base, quant, file, the store name pull registers); "{tmp}" stands for the test's folder
FORMS = [
    ("tiny", "alias", "tiny", None, None, "tiny:F16"),  # the registry's default quant
    ("tiny:F32", "alias", "tiny", "F32", None, "tiny:F32"),
    ("tiny:f32", "alias", "tiny", "F32", None, "tiny:F32"),  # the quant is case-insensitive
    ("  tiny:f32 ", "alias", "tiny", "F32", None, "tiny:F32"),
    (f"{TINY_REPO}:F32", "hub", TINY_REPO, "F32", None, f"{TINY_REPO}:F32"),
    (f"{TINY_REPO}:f16", "hub", TINY_REPO, "F16", None, f"{TINY_REPO}:F16"),
    (f"{TINY_REPO}:tiny-F32.gguf", "hub", TINY_REPO, None, "tiny-F32.gguf", f"{TINY_REPO}:F32"),
    ("my-gpt", "store", "my-gpt", None, None, "my-gpt:Q8_0"),
    ("my-gpt:q8_0", "store", "my-gpt", "Q8_0", None, "my-gpt:Q8_0"),
    ("~/h.gguf", "path", "{tmp}/home/h.gguf", None, None, "h:F32"),
    ("w.gguf", "path", "w.gguf", None, None, "w:F32"),
    ("./w.gguf", "path", "w.gguf", None, None, "w:F32"),
    ("../up.gguf", "path", "../up.gguf", None, None, "up:F32"),
    ("../sub/../up.gguf", "path", "../sub/../up.gguf", None, None, "up:F32"),  # '..': as in the shell
    ("{tmp}/work/up.gguf", "path", "{tmp}/work/up.gguf", None, None, "up:F32"),
]
COLUMNS = ("text", "kind", "base", "quant", "file", "stored")


@pytest.mark.parametrize(COLUMNS, FORMS)
def test_every_form_parses_one_way(tiny_hub, places, text, kind, base, quant, file, stored):  # noqa: F811
    text, base = text.replace("{tmp}", str(places)), base.replace("{tmp}", str(places))
    name = parse_name(text)
    assert (name.kind, name.base, name.quant, name.file) == (kind, base, quant, file)
    canonical = str(name)  # reads back the same
    assert parse_name(canonical) == ModelName(canonical, kind, base, quant, file)


@pytest.mark.parametrize(COLUMNS, FORMS)
def test_pull_and_resolve_give_the_same_model(tiny_hub, places, text, kind, base, quant, file, stored):  # noqa: F811
    """Whatever `pull NAME` fetched or imported is exactly what `chat NAME` then loads."""
    text = text.replace("{tmp}", str(places))
    if kind == "store":  # a model selfhost made itself: nothing to fetch, pull answers with it
        made = Path(paths.models_dir()) / "my-gpt.gguf"
        made.parent.mkdir(parents=True, exist_ok=True)
        made.write_bytes(gguf_bytes("f32"))
        Store().add(ModelRecord(name="my-gpt:Q8_0", path=made, size=made.stat().st_size, sha256=None,
                                source="trained", quant="Q8_0"))  # fmt: skip
    with pytest.raises(NotDownloaded) if kind in ("alias", "hub") else contextlib.nullcontext():
        resolve_model(text)  # nothing downloaded yet
    record = run_to_end(pull(text)).record
    assert record.name == stored
    resolved = resolve_model(text)
    if kind == "path":  # pull imports a copy; resolve loads the file in place: the same bytes
        wanted = Path(base.replace("{tmp}", str(places)))
        assert resolved.path == wanted and record.source == "local"
        assert record.sha256 == hashlib.sha256(wanted.read_bytes()).hexdigest()
    else:
        assert resolved.record == record and resolved.name == stored


# text -> the message both pull and resolve refuse it with (no download, no store change)
BAD = [
    ("", UsageError, "empty model name"),
    (":Q4_0", UsageError, "bad model name"),
    ("tiny:Q4-K", UsageError, "bad quant 'Q4-K'"),
    ("tiny:x.gguf", UsageError, "a file can only be named for an owner/repo"),
    (f"{TINY_REPO}:../tiny-F32.gguf", UsageError, "unsafe file name"),
    (f"{TINY_REPO}:sub/../../x.gguf", UsageError, "unsafe file name"),
    ("a/../b", UsageError, "neither a file nor a model name"),  # never a repo, store name or alias
    ("../b", NotFoundError, "no such"),  # a path (it starts like one), and there is no such file
    ("owner/..", UsageError, "neither a file nor a model name"),
    ("./..:Q4_0", NotFoundError, "no such"),
    ("..:Q4_0", UsageError, "bad model name"),
    ("a/b/c", UsageError, "bad Hub repo id"),
    ("no-such-model", NotFoundError, "unknown model 'no-such-model'"),
]


@pytest.mark.parametrize(("text", "error", "message"), BAD)
def test_bad_names_are_refused_the_same_way_by_pull_and_resolve(tiny_hub, text, error, message):  # noqa: F811
    before = state()
    with pytest.raises(error, match=message):
        run_to_end(pull(text))
    with pytest.raises(error, match=message):
        resolve_model(text)
    assert state() == before and tiny_hub.bytes_served == 0


def test_split_tag_and_store_names():
    assert split_tag("owner/repo:sub/f-Q4_0.gguf") == ("owner/repo", "sub/f-Q4_0.gguf")
    assert split_tag("alias:Q8_0") == ("alias", "Q8_0") and split_tag("alias") == ("alias", None)
    assert check_store_name("my-gpt.v2") == "my-gpt.v2"
    for bad in ("my.gguf", "a:b", "../x", "a/b", "-x", ""):  # each would read back as something else
        with pytest.raises(UsageError):
            check_store_name(bad)


def test_store_name_that_is_also_a_file_here_is_the_file(tiny_hub, places):  # noqa: F811
    """An existing file wins over a store name (as before the grammar): `chat w.gguf` is that file."""
    assert parse_name("w.gguf").kind == "path"
    Path("tiny").write_bytes(gguf_bytes("f32"))  # a file named like the alias
    assert parse_name("tiny").kind == "path" and parse_name("tiny:F16").kind == "alias"


@pytest.mark.needs_model
def test_chat_and_quantize_take_the_name_pull_took(tiny_hub, runner):  # noqa: F811
    """`pull owner/repo:file.gguf` worked but `chat`/`quantize` on the same name said "no such model file"."""
    name = f"{TINY_REPO}:tiny-F32.gguf"
    pulled = runner.invoke(app, ["pull", name])
    assert pulled.exit_code == 0, pulled.output
    chat = runner.invoke(
        app, ["chat", name, "-p", "hi", "-n", "4", "--seed", "1", "--json", "--no-log", *FAST]
    )
    assert chat.exit_code == 0, chat.output
    assert json.loads(chat.stdout)["usage"]["generated_tokens"] > 0
    shown = json.loads(runner.invoke(app, ["models", "show", name, "--json"]).stdout)
    assert shown["name"] == f"{TINY_REPO}:F32" and shown["file"] == "tiny-F32.gguf"
    quantized = runner.invoke(app, ["quantize", name, "--type", "Q8_0", *FAST])
    assert quantized.exit_code == 0, quantized.output
    assert Store().get(f"{TINY_REPO}:Q8_0") is not None
    lower = runner.invoke(app, ["chat", "tiny:f32", "-p", "hi", "-n", "2", "--no-log", "--pull", *FAST])
    assert lower.exit_code == 0, lower.output  # alias:quant in lower case: the F32 file of the alias


def test_an_ambiguous_store_name_is_named_not_guessed(tiny_hub):  # noqa: F811
    for quant in ("F32", "F16"):
        run_to_end(pull(f"{TINY_REPO}:{quant}"))
    with pytest.raises(SelfhostError, match="ambiguous"):
        resolve_model(TINY_REPO)
