"""List functions longer than a limit: `python scripts/long_functions.py [--limit 80] [PATHS]`.

Prints `file:line:function:lines` for each one over the limit (nested functions count on their own
and inside their parent) and exits 1 if there is any. Default path: selfhost/.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path


def long_functions(path: Path, limit: int) -> Iterator[tuple[int, str, int]]:
    """(first line, qualified name, length in lines) of each function in `path` longer than `limit`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[int, str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                length = (child.end_lineno or child.lineno) - child.lineno + 1  # def line to last line
                if not isinstance(child, ast.ClassDef) and length > limit:
                    yield child.lineno, name, length
                yield from walk(child, name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("selfhost")])
    parser.add_argument("--limit", type=int, default=80, help="most lines a function may have (default 80)")
    parser.add_argument("--exclude", action="append", default=[], help="skip paths containing this")
    args = parser.parse_args(argv)
    files = sorted(f for p in args.paths for f in ([p] if p.is_file() else p.rglob("*.py")))
    found = 0
    for file in files:
        if any(part in str(file) for part in args.exclude):
            continue
        for line, name, length in long_functions(file, args.limit):
            print(f"{file}:{line}:{name}:{length}")
            found += 1
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
