"""The layering rules of the README's Architecture section, checked on the source tree."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "selfhost"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (lazy imports included)."""
    tree = ast.parse(path.read_text("utf-8"))
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _core_files() -> list[Path]:
    """Everything but the CLI package and the `python -m selfhost` entry point."""
    return [
        p for p in PACKAGE.rglob("*.py")
        if "cli" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"
    ]


def test_core_modules_never_import_typer_rich_or_the_cli():
    offenders = {
        _module_name(p): sorted(m for m in _imports(p) if m.split(".")[0] in {"typer", "rich"}
                                or m.startswith("selfhost.cli"))
        for p in _core_files()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_runtime_imports_nothing_above_it():
    """selfhost.runtime (the llama.cpp runtime) sits below models/, chat/, serve/ and cli/: it may use
    only itself, errors, events, atomic writes and env (the SELFHOST_* variables)."""
    allowed = ("selfhost.runtime", "selfhost.errors", "selfhost.events", "selfhost.atomic", "selfhost.env")
    offenders = {
        _module_name(p): sorted(m for m in _imports(p) if m.split(".")[0] == "selfhost"
                                and m != "selfhost" and not m.startswith(allowed))
        for p in (PACKAGE / "runtime").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_private_llama_cpp_python_api_is_used_in_one_module():
    """`llm._model`, `llama_cpp._internals`, `_ggml`: only selfhost/runtime/llama_private.py."""
    private = re.compile(r"\b(llm|self\.llm)\._model\b|\b_internals\b|\b_ggml\b|llama_cpp\._")
    users = sorted(
        _module_name(p) for p in PACKAGE.rglob("*.py")
        if p.name != "llama_private.py" and private.search(p.read_text("utf-8"))
    )
    assert users == []


def test_no_import_cycles_between_selfhost_modules_at_import_time():
    """Module-level imports only (lazy ones inside functions cannot form an import-time cycle)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text("utf-8"))
        top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        top = ast.Module(body=top_level, type_ignores=[])
        path_imports = set()
        for node in ast.walk(top):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                path_imports.add(node.module)
                path_imports.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                path_imports.update(a.name for a in node.names)
        graph[name] = {m for m in path_imports if m in modules and m != name}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, " -> ".join([*stack, node, nxt])
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_no_function_body_over_80_lines():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "long_functions.py"), str(PACKAGE)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout


def test_long_operations_use_the_one_event_vocabulary():
    """No module defines its own Notice/Progress/Finished-style event classes beside selfhost.events."""
    names = {"Notice", "Progress", "Finished", "Done", "Started", "Step", "StepEvent", "EvalEvent",
             "TensorDone", "WindowDone", "ChunkDone", "FileProgress", "Retrying", "Converted"}
    defined = {
        f"{_module_name(p)}.{node.name}"
        for p in PACKAGE.rglob("*.py")
        if p.name != "events.py"
        for node in ast.walk(ast.parse(p.read_text("utf-8")))
        if isinstance(node, ast.ClassDef) and node.name in names
    }
    assert defined == set()


def _selfhost_env_reads(path: Path) -> list[str]:
    """SELFHOST_* names a module reads itself: a string literal starting SELFHOST_ passed to or indexed
    on os.environ / os.getenv (get, [], setdefault, pop, in)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        value = node.value if isinstance(node, ast.Constant) else None
        if isinstance(value, str) and re.fullmatch(r"SELFHOST_[A-Z0-9_]+", value):
            found.append(node)
    source = path.read_text("utf-8")
    reads = []
    for const in found:
        line = source.splitlines()[const.lineno - 1]
        if re.search(r"\bos\.environ\b|\bgetenv\(", line):
            reads.append(f"{const.value} (line {const.lineno})")
    return reads


def test_only_env_py_reads_selfhost_variables():
    """One place reads every SELFHOST_* variable, typed, with one boolean rule (selfhost/env.py)."""
    offenders = {
        _module_name(p): reads for p in PACKAGE.rglob("*.py")
        if p.name != "env.py" and (reads := _selfhost_env_reads(p))
    }
    assert offenders == {}


def test_env_rule_catches_a_direct_read(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text('import os\nDEBUG = os.environ.get("SELFHOST_DEBUG")\n')
    assert _selfhost_env_reads(bad) == ["SELFHOST_DEBUG (line 2)"]


def test_env_flags_share_one_boolean_rule(monkeypatch):
    from selfhost import env

    for off in ("", "0", "false", "No", "OFF"):
        monkeypatch.setenv(env.DEBUG, off)
        assert env.debug() is False, off
    for on in ("1", "true", "yes", "on"):
        monkeypatch.setenv(env.DEBUG, on)
        assert env.debug() is True, on


def test_default_home_is_the_platforms_data_directory(monkeypatch, tmp_path: Path):
    """No SELFHOST_HOME: platformdirs' per-user data directory (XDG_DATA_HOME honoured on Linux)."""
    from selfhost import paths

    monkeypatch.delenv("SELFHOST_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert paths.home() == tmp_path / "xdg" / "selfhost" and paths.home().is_dir()


def test_json_writer_converts_through_pydantic_core_and_keeps_to_json_hooks():
    import dataclasses
    import datetime as dt
    import enum

    from selfhost.cli.output import jsonable

    class Color(enum.Enum):
        RED = "red"

    class Hooked:
        def to_json(self) -> dict:
            return {"hooked": Path("/x")}

    @dataclasses.dataclass
    class Row:
        where: Path
        when: dt.datetime
        color: Color
        inner: Hooked

    row = Row(Path("/a/b"), dt.datetime(2026, 1, 2, 3, 4), Color.RED, Hooked())
    assert jsonable({1: [row], "s": {3}}) == {
        "1": [{"where": "/a/b", "when": "2026-01-02T03:04:00", "color": "red", "inner": {"hooked": "/x"}}],
        "s": [3],
    }


def test_cli_command_modules_do_not_import_each_other():
    """Shared CLI helpers live in cli/common.py, cli/output.py, cli/console.py and cli/plots.py; a command
    module never imports another command module (app.py registers them all)."""
    shared = {"selfhost.cli", "selfhost.cli.common", "selfhost.cli.output", "selfhost.cli.console",
              "selfhost.cli.plots", "selfhost.cli.help_renderer"}  # fmt: skip
    cli = PACKAGE / "cli"
    commands = {_module_name(p) for p in cli.glob("*.py")} - shared - {"selfhost.cli.app"}
    offenders = {
        _module_name(p): sorted(m for m in _imports(p) if m in commands or m.rsplit(".", 1)[0] in commands)
        for p in cli.glob("*.py") if _module_name(p) in commands | shared
    }
    assert {k: v for k, v in offenders.items() if v} == {}
