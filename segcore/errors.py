"""The one exception family meant for users.

A ``SegcoreError`` carries a message that names the file (or flag) at fault and the problem;
the CLI prints it on one line and exits with code 2, without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class SegcoreError(Exception):
    """An error caused by the user's input, with a message meant for the user."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        text = " ".join(str(message).split())  # always one line
        super().__init__(f"{self.path}: {text}" if self.path else text)


class DataError(SegcoreError):
    """A dataset item or layout is invalid (bad image, bad mask, missing pair, ...)."""
