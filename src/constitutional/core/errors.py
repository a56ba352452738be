"""User-facing errors.

A :class:`UserError` is a mistake in what the user gave us (a file, a flag, a model spec). The CLI
prints it as one line and exits with code 2; a traceback is reserved for our own bugs.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input. ``str(err)`` is the one line the CLI prints."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        field = f"field '{self.field}': " if self.field else ""
        return f"{where}{field}{self.message}"
