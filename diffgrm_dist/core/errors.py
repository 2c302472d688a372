"""Errors the CLI turns into one clear message and a non-zero exit code."""

from __future__ import annotations

from pathlib import Path


class DiffGRMError(Exception):
    """Base class: a problem the user can fix (bad input, bad config)."""


class ConfigError(DiffGRMError):
    """A config file or override names an unknown key or a value of the wrong type."""


class DataError(DiffGRMError):
    """Input data is missing or malformed; the message names the file, line and field."""

    def __init__(self, path: str | Path, message: str, line: int | None = None,
                 field: str | None = None) -> None:
        where = str(path)
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f" (field {field!r})"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
        self.field = field

