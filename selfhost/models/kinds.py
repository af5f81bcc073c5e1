"""What a model is for: the registry's `kind` field and `models list --available --kind`.
Pure typing: the CLI imports it at start-up (the registry module needs pydantic)."""

from __future__ import annotations

from typing import Literal

Kind = Literal["chat", "embedding", "base", "rerank"]
