#!/usr/bin/env python
"""The maintainer's pre-release check of models.toml: `selfhost pull ALIAS:QUANT --dry-run` for every entry.

Run it online (it talks to the Hub, or to HF_ENDPOINT; it downloads nothing and writes nothing):

    python scripts/check_registry.py                 # every alias, its default quant
    python scripts/check_registry.py --all-quants    # every file of every alias
    python scripts/check_registry.py qwen3-8b gpt-oss-20b --pins

One row per alias:quant: ok or FAIL (with the one-line error), the commit the revision resolved to, the
number of files (parts of a split GGUF), the Hub's size and the registry's size_gb (flagged when they
differ by more than 15 %). `--pins` prints the `revision = "<commit>"` lines that would pin each entry
to what was checked. Exit status 1 when any entry failed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from selfhost.errors import SelfhostError
from selfhost.events import Notice, run_to_end
from selfhost.models.names import split_tag
from selfhost.models.pull import PullPlan, pull
from selfhost.models.registry import load_registry

SIZE_TOLERANCE = 0.15


@dataclass
class Row:
    name: str
    status: str  # "ok" | "FAIL"
    commit: str = ""
    files: int = 0
    hub_gb: float | None = None
    registry_gb: float | None = None
    note: str = ""


def check(alias: str, quant: str, registry_gb: float | None) -> Row:
    name = f"{alias}:{quant}"
    events: list = []
    try:
        plan: PullPlan = run_to_end(pull(name, dry_run=True), events.append)
    except SelfhostError as exc:
        return Row(name, "FAIL", registry_gb=registry_gb, note=str(exc))
    pin_problems = [e.message for e in events if isinstance(e, Notice) and "pins" in e.message]
    sizes = [f.size for f in plan.files]
    hub_gb = sum(s for s in sizes if s is not None) / 1e9 if None not in sizes else None
    note = ""
    if hub_gb is not None and registry_gb is not None and abs(hub_gb - registry_gb) > SIZE_TOLERANCE * hub_gb:
        note = f"size_gb {registry_gb} is off: the Hub says {hub_gb:.2f}"
    status = "FAIL" if pin_problems else "ok"
    return Row(
        name, status, plan.commit or "", len(plan.files), hub_gb, registry_gb, " ".join(pin_problems) or note
    )


def render(rows: list[Row]) -> str:
    def gb(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "?"

    table = [("model", "status", "commit", "files", "hub GB", "registry GB", "note")]
    table += [
        (r.name, r.status, r.commit[:10], str(r.files or ""), gb(r.hub_gb), gb(r.registry_gb), r.note)
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in table
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("aliases", nargs="*", help="only these aliases (default: all)")
    parser.add_argument("--all-quants", action="store_true", help="check every quant, not just the default")
    parser.add_argument("--pins", action="store_true", help="print revision lines pinning what was checked")
    args = parser.parse_args(argv)

    registry = load_registry()
    unknown = [a for a in args.aliases if a not in registry.models]
    if unknown:
        print(f"error: unknown alias(es): {', '.join(unknown)}", file=sys.stderr)
        return 2
    rows = []
    for alias in args.aliases or sorted(registry.models):
        entry = registry.models[alias]
        quants = list(entry.files) if args.all_quants else [entry.default_quant]
        for quant in quants:
            rows.append(check(alias, quant, entry.size_gb.get(quant)))
            print(f"checked {rows[-1].name}: {rows[-1].status}", file=sys.stderr, flush=True)
    print(render(rows))
    failed = [r for r in rows if r.status != "ok"]
    print(f"\n{len(rows) - len(failed)} ok, {len(failed)} of {len(rows)} failed")
    if args.pins:
        pins = {split_tag(r.name)[0]: r.commit for r in rows if r.status == "ok"}
        for alias, commit in sorted(pins.items()):
            print(f'[models."{alias}"] revision = "{commit}"')
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
