"""`selfhost --help` without the ~60 ms of imports Typer's help renderer does not need here.

typer.rich_utils imports rich.markdown (markdown-it, pygments) and rich.traceback (attrs) at its top,
for markdown-mode help and pretty tracebacks, both off in selfhost. `load_help_renderer()` imports it
with stand-ins for those two classes that load the real ones if they are ever used.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

UNUSED_CLASSES = {"rich.markdown": "Markdown", "rich.traceback": "Traceback"}  # module: class


def _deferred(module: str, name: str) -> type:
    """A stand-in for class `module.name` that imports the real one when it is first used."""

    def real() -> Any:
        return getattr(importlib.import_module(module), name)

    class Deferred(type):
        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            return real()(*args, **kwargs)

        def __getattr__(cls, attr: str) -> Any:
            return getattr(real(), attr)

    return Deferred(name, (), {})


def load_help_renderer() -> None:
    """Import typer.rich_utils with stand-ins for its unused heavy imports (help is instant)."""
    if "typer.rich_utils" in sys.modules or any(m in sys.modules for m in UNUSED_CLASSES):
        return
    stubs = {}
    for module, name in UNUSED_CLASSES.items():
        stubs[module] = types.ModuleType(module)
        setattr(stubs[module], name, _deferred(module, name))
    sys.modules.update(stubs)
    try:
        import typer.rich_utils  # noqa: F401
    except ImportError:  # a Typer that needs more from them: it imports them itself later
        pass
    finally:
        for module, stub in stubs.items():
            if sys.modules.get(module) is stub:
                del sys.modules[module]
