"""The one exception type users see.

Every error a user can cause (bad input, bad option) is raised as ``SpineqprepError`` with a
message that names the file and the fix. The command line prints the message alone (no
traceback) and exits with ``exit_code``.
"""

from __future__ import annotations

from pathlib import Path


class SpineqprepError(Exception):
    """A user-facing error: ``str(err)`` is the whole message."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.fix = fix
        text = message if path is None else f"{path}: {message}"
        if fix:
            text = f"{text}\n  fix: {fix}"
        super().__init__(text)


class InputError(SpineqprepError):
    """The input dataset (files, sidecars, tables) is wrong."""


class UsageError(SpineqprepError):
    """The command line or configuration is wrong."""

    exit_code = 2


def one_line(message: object, limit: int = 300) -> str:
    """A message folded onto one line and cut to ``limit`` characters: for the reason of a
    failed step in a QC table, where a multi-line or huge message would break the row."""
    return " ".join(str(message).split())[:limit]
