"""The 2026 registry: schema (kind, min_llama_cpp, licences, pinned revisions), chat refusing embedding
models, `models list --available --kind/--fits`, and the maintainer's dry-run script."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfhost import paths
from selfhost.cli.app import app
from selfhost.errors import DependencyError, RegistryError, UsageError
from selfhost.models import hub
from selfhost.models.catalog import MemoryBudget, available_models, bytes_needed
from selfhost.models.registry import COMMIT_PATTERN, RegistryEntry, load_registry, parse_registry_file
from selfhost.models.resolve import _version_tuple, llama_cpp_version, model_kind, resolve_model
from selfhost.models.store import ModelRecord, Store
from tests.conftest import one_error_line
from tests.fakes.tinygguf import gguf_bytes

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--threads", "1"]


def register_as(name: str, path: Path, repo: str | None = None) -> ModelRecord:
    """A store record for `name` backed by a real (tiny) GGUF: the registry's metadata is what is tested."""
    record = ModelRecord(
        name=name, path=path, size=path.stat().st_size, sha256=None, source="local", repo=repo
    )
    return Store().add(record)


# -- the shipped registry ------------------------------------------------------------------------------
def test_every_entry_validates_against_the_strict_schema():
    shipped = parse_registry_file(ROOT / "models.toml")
    assert 20 <= len(shipped) <= 32  # 30 chat/base/embedding + 2 rerankers
    for alias, entry in shipped.items():
        RegistryEntry.model_validate(entry.model_dump())  # round-trips through the schema
        assert entry.size_gb.get(entry.default_quant), alias  # `--fits` needs the default quant's size
        assert entry.description and entry.params, alias
        assert entry.license not in ("other", "unknown"), alias
    kinds = {e.kind for e in shipped.values()}
    assert kinds == {"chat", "embedding", "base", "rerank"}
    assert shipped["smollm2-135m"].embedded and [a for a, e in shipped.items() if e.embedded] == [
        "smollm2-135m"
    ]
    big = [a for a, e in shipped.items() if 8 <= (e.size_gb[e.default_quant]) <= 22]
    assert len(big) >= 6 and "qwen3-30b-a3b" in big  # the RTX 4090 tier, with an MoE


def test_any_pinned_revision_is_40_hex_and_any_unpinned_one_says_why():
    for alias, entry in load_registry().models.items():
        if entry.pinned:
            assert COMMIT_PATTERN.fullmatch(entry.revision), alias
        else:
            assert entry.revision == "main" and entry.revision_note, alias
    assert RegistryEntry.model_validate(_entry(revision="a" * 40)).pinned
    assert not RegistryEntry.model_validate(_entry(revision="a" * 39)).pinned


def _entry(**overrides: object) -> dict:
    body = {
        "repo": "a/b", "default_quant": "Q8_0", "context_length": 128, "license": "mit",
        "description": "x", "files": {"Q8_0": "x-Q8_0.gguf"},
    }  # fmt: skip
    return {**body, **overrides}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('license = "other"', "says nothing"),
        ('kind = "vision"', "field 'kind'"),
        ('min_llama_cpp = "new"', "field 'min_llama_cpp'"),
        ("size_gb = { Q4_0 = 1.0 }", "size_gb names quants without a file"),
        ('embedded = true\nkind = "embedding"', "only a chat model"),
        ('revision = "main branch"', "field 'revision'"),
    ],
)
def test_schema_refuses_bad_values_with_file_entry_and_field(line, expected):
    base = (
        '[models.bad]\nrepo = "a/b"\ndefault_quant = "Q8_0"\ncontext_length = 1\ndescription = "x"\n'
        'files = { Q8_0 = "x-Q8_0.gguf" }\n'
    )
    if "license" not in line:
        base += 'license = "mit"\n'
    paths.user_registry().write_text(base + line + "\n")
    with pytest.raises(RegistryError) as err:
        load_registry()
    assert "entry 'bad'" in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize(
    ("file", "quant"),
    [
        ("gpt-oss-20b-mxfp4.gguf", "MXFP4"),
        ("gpt-oss-120b-MXFP4_MOE-00001-of-00002.gguf", "MXFP4_MOE"),
        ("Qwen3-0.6B-TQ1_0.gguf", "TQ1_0"),
        ("Qwen3-30B-A3B-Instruct-2507-UD-Q4_K_XL.gguf", "Q4_K_XL"),
        ("nomic-embed-text-v1.5.f16.gguf", "F16"),
    ],
)
def test_new_quant_names_are_recognised(file, quant):
    assert hub.quant_of(file) == quant


def test_pick_gguf_takes_a_split_quant_by_its_first_part():
    listing = hub.RepoListing("a/b", "main", "c" * 40)
    for name in ("m-Q8_0.gguf", "Q4/m-Q4_K_M-00001-of-00002.gguf", "Q4/m-Q4_K_M-00002-of-00002.gguf"):
        listing.files[name] = hub.RemoteFile(name, 1, None, "x")
    assert hub.pick_gguf(listing, "Q4_K_M") == ("Q4/m-Q4_K_M-00001-of-00002.gguf", "Q4_K_M")
    assert hub.split_parts(listing.files, "Q4/m-Q4_K_M-00001-of-00002.gguf", "a/b")[1].endswith("00002.gguf")


# -- kind: chat refuses embedding models ---------------------------------------------------------------
def test_every_embedding_entry_is_refused_by_chat(tiny_gguf, runner):
    embedding = {a: e for a, e in load_registry().models.items() if e.kind == "embedding"}
    assert len(embedding) >= 2
    for alias, entry in embedding.items():
        # not downloaded: still the clear line, not "run selfhost pull"
        with pytest.raises(UsageError, match="is an embedding model"):
            resolve_model(alias)
        register_as(f"{alias}:{entry.default_quant}", tiny_gguf, entry.repo)
        with pytest.raises(UsageError, match="cannot chat"):
            resolve_model(alias)
        assert resolve_model(alias, purpose="embedding").kind == "embedding"  # serve's /v1/embeddings
        assert resolve_model(alias, purpose="load").path == tiny_gguf  # quantize takes any kind
        result = runner.invoke(app, ["chat", alias, "-p", "hi", *FAST])
        assert result.exit_code != 0
        assert f"{alias}:{entry.default_quant} is an embedding model" in one_error_line(result)
    show = runner.invoke(app, ["models", "show", "nomic-embed-text-v1.5", "--json"])
    assert show.exit_code == 0 and json.loads(show.stdout)["kind"] == "embedding"


def test_every_rerank_entry_is_refused_by_chat_and_taken_by_serve(tiny_gguf):
    rerankers = {a: e for a, e in load_registry().models.items() if e.kind == "rerank"}
    assert {"bge-reranker-v2-m3", "qwen3-reranker-0.6b"} <= set(rerankers)
    for alias, entry in rerankers.items():
        with pytest.raises(UsageError, match="is a reranker"):
            resolve_model(alias)
        register_as(f"{alias}:{entry.default_quant}", tiny_gguf, entry.repo)
        with pytest.raises(UsageError, match="cannot chat"):
            resolve_model(alias)
        assert resolve_model(alias, purpose="rerank").kind == "rerank"  # serve --rerank-model


def test_chat_subprocess_refuses_an_embedding_model(tiny_gguf):
    entry = load_registry().get("nomic-embed-text-v1.5")
    register_as("nomic-embed-text-v1.5:Q8_0", tiny_gguf, entry.repo)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "selfhost", "chat", "nomic-embed-text-v1.5", "-p", "hi"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: nomic-embed-text-v1.5:Q8_0 is an embedding model: it turns text into vectors and cannot chat "
        "(use it through `selfhost serve` (/v1/embeddings), or chat with a chat model)"
    ]


def test_a_gguf_with_an_encoder_architecture_is_refused_by_chat_without_a_registry_entry(tmp_path):
    import gguf

    path = tmp_path / "bert-embed-F32.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 4), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UsageError, match="embedding model"):
        resolve_model(str(path))
    assert model_kind(resolve_model(str(path), purpose="inspect")) == "embedding"  # what serve asks


# -- min_llama_cpp --------------------------------------------------------------------------------------
def test_a_model_needing_a_newer_llama_cpp_is_refused_with_the_version(tiny_gguf, runner):
    installed = llama_cpp_version()
    assert installed
    paths.user_registry().write_text(
        '[models.future]\nrepo = "test/future-GGUF"\ndefault_quant = "F32"\ncontext_length = 128\n'
        'license = "mit"\ndescription = "needs tomorrow\'s llama.cpp"\nmin_llama_cpp = "99.1"\n'
        'files = { F32 = "future-F32.gguf" }\n'
        '[models.today]\nrepo = "test/today-GGUF"\ndefault_quant = "F32"\ncontext_length = 128\n'
        f'license = "mit"\ndescription = "runs now"\nmin_llama_cpp = "{installed}"\n'
        'files = { F32 = "today-F32.gguf" }\n'
    )
    register_as("future:F32", tiny_gguf, "test/future-GGUF")
    register_as("today:F32", tiny_gguf, "test/today-GGUF")
    with pytest.raises(DependencyError, match=rf"needs llama-cpp-python >= 99\.1 \(installed: {installed}\)"):
        resolve_model("future")
    with pytest.raises(DependencyError):
        resolve_model("future", purpose="load")  # quantize too
    assert resolve_model("future", purpose="inspect").path == tiny_gguf  # models show still works
    result = runner.invoke(app, ["chat", "future", "-p", "hi", *FAST])
    assert result.exit_code != 0
    line = one_error_line(result)
    assert "needs llama-cpp-python >= 99.1" in line and "pip install -U" in line
    ok = runner.invoke(app, ["chat", "today", "-p", "hi", "-n", "2", "--no-log", *FAST])
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("0.3.16", (0, 3, 16)), ("0.3.17rc1", (0, 3, 17)), ("0.3.36+cu124", (0, 3, 36)), ("not-a-version", ())],
)
def test_version_parsing(text, parsed):
    assert _version_tuple(text) == parsed


# -- models list --available --kind / --fits -------------------------------------------------------------
def test_available_filters_by_kind_and_fit():
    embedding = available_models(kind="embedding", budget=MemoryBudget(ram=None, vram=None))
    assert {r.alias for r in embedding} == {"nomic-embed-text-v1.5", "qwen3-embedding-0.6b"}
    assert all(r.fit == "?" for r in embedding)  # memory unknown: not claimed to fit

    laptop = available_models(fits=True, budget=MemoryBudget(ram=3 * 10**9, vram=None))
    assert laptop and all(r.fit == "ram" and r.need <= 3 * 10**9 for r in laptop)
    assert "smollm2-135m" in {r.alias for r in laptop} and "qwen3-8b" not in {r.alias for r in laptop}

    rtx4090 = available_models(
        fits=True, budget=MemoryBudget(ram=16 * 10**9, vram=24 * 10**9, gpu="RTX 4090")
    )
    by_alias = {r.alias: r for r in rtx4090}
    assert by_alias["qwen3-30b-a3b"].fit == "gpu" and by_alias["qwen3-32b"].fit == "gpu"
    assert bytes_needed(10**9) == int(1.1e9) + 500_000_000
    kinds = [r.entry.kind for r in available_models(budget=MemoryBudget(ram=None, vram=None))]
    assert kinds == sorted(kinds, key=["chat", "base", "embedding", "rerank"].index)  # grouped by kind


def test_cli_available_kind_and_fits(runner):
    result = runner.invoke(app, ["models", "list", "--available", "--kind", "embedding"])
    assert result.exit_code == 0, result.output
    assert "nomic-embed-text-v1.5" in result.output and "qwen3-0.6b " not in result.output
    rows = json.loads(runner.invoke(app, ["models", "list", "--available", "--fits", "--json"]).stdout)
    assert all(r["fit"] in ("gpu", "ram") for r in rows)
    bad = runner.invoke(app, ["models", "list", "--fits"])
    assert bad.exit_code != 0 and "--kind and --fits apply to --available" in one_error_line(bad)
    # a kind that does not exist is refused while parsing (the choices are registry.Kind's)
    bad = runner.invoke(app, ["models", "list", "--available", "--kind", "vision"])
    errors = [line for line in bad.output.splitlines() if "error" in line.lower()]
    assert bad.exit_code == 2 and len(errors) == 1 and "Traceback" not in bad.output
    assert "'--kind'" in errors[0] and "'chat', 'embedding', 'base', 'rerank'" in errors[0]


# -- the maintainer's check ----------------------------------------------------------------------------
def test_check_registry_script_dry_runs_every_entry(fake_hub):  # noqa: F811
    fake_hub.add_file("test/tiny-GGUF", "tiny-F32.gguf", gguf_bytes("f32"))
    paths.user_registry().write_text(
        '[models.tiny]\nrepo = "test/tiny-GGUF"\ndefault_quant = "F32"\ncontext_length = 128\n'
        'license = "mit"\ndescription = "x"\nfiles = { F32 = "tiny-F32.gguf" }\n'
        '[models.ghost]\nrepo = "test/tiny-GGUF"\ndefault_quant = "Q8_0"\ncontext_length = 128\n'
        'license = "mit"\ndescription = "x"\nfiles = { Q8_0 = "tiny-Q8_0.gguf" }\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": fake_hub.url}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_registry.py"), "tiny", "ghost", "--all-quants"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr  # one entry is broken
    lines = done.stdout.splitlines()
    tiny = next(line for line in lines if line.startswith("tiny:"))
    ghost = next(line for line in lines if line.startswith("ghost:"))
    assert "ok" in tiny and fake_hub.repos["test/tiny-GGUF"].commit[:10] in tiny
    assert "FAIL" in ghost and "tiny-Q8_0.gguf is not in" in ghost
    assert "1 of 2 failed" in done.stdout
    assert fake_hub.bytes_served == 0  # dry runs only


# -- content pins (sha256) -------------------------------------------------------------------------------
def test_a_reupload_on_the_hub_does_not_turn_the_embedded_copy_into_a_download(fake_hub, smollm2_gguf):  # noqa: F811
    from selfhost.events import run_to_end
    from selfhost.models.pull import pull

    entry = load_registry().get("smollm2-135m")
    assert entry.sha256["Q4_1"] == hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    fake_hub.add_file(entry.repo, entry.files["Q4_1"], gguf_bytes("f32"))  # "re-uploaded": other bytes
    record = run_to_end(pull("smollm2-135m")).record
    assert record.source == "embedded" and record.path == smollm2_gguf
    assert record.sha256 == entry.sha256["Q4_1"] and fake_hub.bytes_served == 0


def test_a_hub_file_that_differs_from_the_pinned_sha256_is_refused(fake_hub, runner):  # noqa: F811
    from selfhost.events import Notice, Result, run_to_end
    from selfhost.models.pull import PullPlan, pull

    data = gguf_bytes("f32")
    fake_hub.add_file("test/pinned-GGUF", "p-F32.gguf", data)
    body = (
        '[models.{alias}]\nrepo = "test/pinned-GGUF"\ndefault_quant = "F32"\ncontext_length = 128\n'
        'license = "mit"\ndescription = "x"\nfiles = {{ F32 = "p-F32.gguf" }}\nsha256 = {{ F32 = "{sha}" }}\n'
    )
    good = hashlib.sha256(data).hexdigest()
    paths.user_registry().write_text(
        body.format(alias="moved", sha="0" * 64) + body.format(alias="kept", sha=good)
    )
    result = runner.invoke(app, ["pull", "moved"])
    assert result.exit_code != 0
    line = one_error_line(result)
    assert (
        "is not the file moved:F32 pins" in line
        and "re-uploaded" in line
        and "test/pinned-GGUF:p-F32.gguf" in line
    )
    assert Store().list() == [] and fake_hub.bytes_served == 0
    events = list(pull("moved", dry_run=True))  # a dry run says so without failing
    assert any(isinstance(e, Notice) and "pins" in e.message for e in events)
    assert isinstance(events[-1], Result) and isinstance(events[-1].value, PullPlan)
    assert run_to_end(pull("kept")).record.sha256 == good
    with pytest.raises(RegistryError, match="64 lower-case hex"):
        paths.user_registry().write_text(body.format(alias="bad", sha="abc"))
        load_registry()
