"""User-facing errors.

A :class:`UserError` is a mistake in what the user gave us (a file, a flag, a model spec). The CLI
prints it as one line and exits with code 2; a traceback is reserved for our own bugs.
"""

from __future__ import annotations

import errno
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


#: errno values of a write that found no room (EFBIG: a file-size limit)
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_ROOM_TEXT = ("No space left", "StorageFull", "File too large", "FileTooLarge",
                 "Disk quota exceeded", "QuotaExceeded", "os error 28", "os error 27")


def out_of_space(err: BaseException) -> str | None:
    """The one line for an exception (or one in its chain) that says a write found no room: a
    full disk, a quota or a file-size limit, raised as ``OSError`` or as safetensors'
    ``SafetensorError`` (whose text is all it carries); ``None`` for any other exception."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_ROOM:
            where = f" {e.filename}" if e.filename else ""
            return (f"cannot write{where}: {e.strerror} (the disk is full or a size limit was "
                    "hit); what was written before is kept: free some space and run the same "
                    "command again to resume")
        if type(e).__name__ == "SafetensorError" and any(t in str(e) for t in _NO_ROOM_TEXT):
            return (f"cannot write a weights file: {str(e).splitlines()[0]} (the disk is full or "
                    "a size limit was hit); what was written before is kept: free some space "
                    "and run the same command again to resume")
        e = e.__cause__ or e.__context__
    return None
