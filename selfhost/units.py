"""Human-readable quantities, shared by core messages and the CLI."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Decimal units, as disks and the Hub count: 1.5 GB is 1.5e9 bytes."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
