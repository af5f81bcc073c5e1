"""List functions longer than a limit: `python scripts/long_functions.py [--limit 80] [PATHS]`.

Prints `file:line:function:lines` for each one over the limit (nested functions count on their own
and inside their parent) and exits 1 if there is any. Default path: selfhost/.

A function's length is its body: from the first statement after the docstring to its last line. The
signature is not counted, so a Typer command's option list (declarations, one per flag) does not hide
or excuse the logic below it; `--with-signature` counts from the `def` line instead.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef, with_signature: bool) -> int:
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    first = node.lineno if with_signature else body[0].lineno
    return (node.end_lineno or node.lineno) - first + 1


def long_functions(path: Path, limit: int, with_signature: bool = False) -> Iterator[tuple[int, str, int]]:
    """(first line, qualified name, length in lines) of each function in `path` longer than `limit`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[int, str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = _length(child, with_signature)
                    if length > limit:
                        yield child.lineno, name, length
                yield from walk(child, name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("selfhost")])
    parser.add_argument("--limit", type=int, default=80, help="most lines a function may have (default 80)")
    parser.add_argument("--with-signature", action="store_true", help="count from the def line")
    parser.add_argument("--exclude", action="append", default=[], help="skip paths containing this")
    args = parser.parse_args(argv)
    files = sorted(f for p in args.paths for f in ([p] if p.is_file() else p.rglob("*.py")))
    found = 0
    for file in files:
        if any(part in str(file) for part in args.exclude):
            continue
        for line, name, length in long_functions(file, args.limit, args.with_signature):
            print(f"{file}:{line}:{name}:{length}")
            found += 1
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
