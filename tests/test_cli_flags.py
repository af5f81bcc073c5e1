"""Every `--flag` that selfhost's own text names (errors, hints, notices, help) is a real option of some
`selfhost` command: an error message never sends a user to a flag that does not exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import typer

from selfhost.cli.app import app

PACKAGE = Path(__file__).resolve().parent.parent / "selfhost"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# Flags of other programs that selfhost runs or quotes (nvidia-smi's query, pip's install options, ...).
FOREIGN = {"--query-gpu", "--format", "--no-cache-dir", "--force-reinstall", "--index-url", "--target",
           "--build"}


def known_flags() -> set[str]:
    flags = {"-h", "--help"}
    stack = [typer.main.get_command(app)]
    while stack:
        command = stack.pop()
        for param in command.params:
            flags.update(param.opts)
            flags.update(getattr(param, "secondary_opts", []))
        stack.extend(getattr(command, "commands", {}).values())
    return flags


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of docstring constants (they may describe other tools' flags, e.g. a bench's)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def named_flags(path: Path) -> dict[str, int]:
    """flag -> first line where a non-docstring string constant of `path` names it."""
    tree = ast.parse(path.read_text("utf-8"))
    docs = _docstrings(tree)
    named: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            for flag in FLAG.findall(node.value):
                named.setdefault(flag, node.lineno)
    return named


def test_every_flag_named_in_selfhost_text_exists():
    known = known_flags() | FOREIGN
    unknown = {
        f"{path.relative_to(PACKAGE.parent)}:{line}": flag
        for path in sorted(PACKAGE.rglob("*.py"))
        for flag, line in named_flags(path).items()
        if flag not in known
    }
    assert unknown == {}


def test_the_check_catches_a_made_up_flag(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text('raise ValueError("bad value", "pass --max-iters 10 instead")\n')
    assert named_flags(bad) == {"--max-iters": 1}
    assert "--max-iters" not in known_flags() and "--iters" in known_flags()
