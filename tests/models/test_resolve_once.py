"""One place turns a name into a model: each command resolves its model name once and hands it down;
the serve settings have one source of defaults; keep-alive durations read as Ollama reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfhost.cli.app import app
from selfhost.models import resolve
from selfhost.models.store import ModelRecord, Store
from tests.conftest import REPO


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every name the resolver looks up (its one entry to the store, the HF cache and the registry)."""
    calls: list[str] = []
    locate = resolve._locate

    def counting(name, store):  # noqa: ANN001, ANN202
        calls.append(name.text)
        return locate(name, store)

    monkeypatch.setattr(resolve, "_locate", counting)
    return calls


def test_chat_resolves_its_model_name_once(runner, tiny_gguf: Path, counted: list[str]) -> None:
    size = tiny_gguf.stat().st_size
    Store().add(ModelRecord(name="tiny", path=tiny_gguf, size=size, sha256=None, source="local"))
    args = ["chat", "tiny", "-p", "hi", "--max-tokens", "2", "--threads", "1", "--no-log"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert counted == ["tiny"]


def test_quantize_resolves_its_model_name_once(runner, tiny_gguf: Path, counted: list[str]) -> None:
    result = runner.invoke(app, ["quantize", str(tiny_gguf), "--type", "Q8_0", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert counted == [str(tiny_gguf)]


def test_the_loaders_never_import_the_resolver() -> None:
    """ChatModel.load, the runtime and the server's loads take a resolved model or a path."""
    import ast

    root = REPO / "selfhost"
    runtime = [f"runtime/{p.name}" for p in (root / "runtime").glob("*.py")]
    for module in ("chat/model.py", "chat/session.py", "serve/server.py", *runtime):
        tree = ast.parse((root / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "selfhost.models.resolve":
                names = {a.name for a in node.names}
                assert names <= {"ResolvedModel"}, (module, names)  # the type, under TYPE_CHECKING


def test_serve_defaults_have_one_source(runner) -> None:
    """The CLI's defaults and bounds are ServeOptions' (both built from selfhost.serve.defaults)."""
    import typer.main

    from selfhost.serve.defaults import SERVE
    from selfhost.serve.server import ServeOptions

    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    options = {p.name: p for p in command.params}
    for name, setting in SERVE.items():
        field = ServeOptions.model_fields[name]
        assert field.default == setting.default == options[name].default, name
        if setting.ge is not None:
            flag = "--" + name.replace("_", "-")
            refused = runner.invoke(app, ["serve", flag, str(setting.ge - 1)])
            assert refused.exit_code == 2 and flag in refused.output, (name, refused.output)
            with pytest.raises(ValueError):
                ServeOptions(**{name: setting.ge - 1})


@pytest.mark.needs_model
def test_embedding_and_chat_models_share_the_gpu_layers_default() -> None:
    """The drift the issue names: the embedding model defaulted to 0 GPU layers, the chat model to all."""
    from selfhost.runtime.llama_backend import backend_info, default_gpu_layers

    assert default_gpu_layers() == (-1 if backend_info().gpu_offload else 0)
    source = (REPO / "selfhost/serve/manager.py").read_text()
    assert "gpu_layers or 0" not in source and "default_gpu_layers()" in source


@pytest.mark.parametrize(
    "value, seconds",
    [("5m", 300.0), ("1h30m", 5400.0), ("45s", 45.0), ("-1", -1.0), (-5, -1.0), (0, 0.0), ("0", 0.0),
     (90, 90.0), ("2.5", 2.5), (None, None)],
)  # fmt: skip
def test_keep_alive_reads_like_ollama(value, seconds) -> None:
    from selfhost.serve.config import parse_keep_alive

    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m5", "", True])
def test_bad_keep_alive_is_refused(value) -> None:
    from selfhost.serve.config import parse_keep_alive

    with pytest.raises(ValueError):
        parse_keep_alive(value)


def test_per_model_settings_merge_home_then_config(tmp_path: Path, isolated_home: Path) -> None:
    from selfhost.errors import UsageError
    from selfhost.serve.config import read_config

    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.toml").write_text('[serve.models."a"]\nparallel = 2\nctx = 4096\n')
    config = tmp_path / "serve.toml"
    config.write_text('[serve]\nkeep_alive = "10m"\n[serve.models."a"]\nctx = 16384\n'
                      "[serve.models.b]\nparallel = 8\n")
    server, models = read_config(config)
    assert server == {"keep_alive": "10m"}
    assert (models["a"].parallel, models["a"].ctx, models["b"].parallel) == (2, 16384, 8)
    config.write_text('[serve.models."a"]\nslots = 2\n')
    with pytest.raises(UsageError, match='serve.models."a"'):
        read_config(config)


def test_a_misspelt_serve_key_in_a_config_file_is_one_line(runner, tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('[serve]\nkeep_alive = "1m"\nmax_model = 2\n')
    result = runner.invoke(app, ["serve", "--config", str(config), "--port", "0"])
    assert result.exit_code != 0 and "max-model" in result.output and "Traceback" not in result.output
