"""Run directories and resumable record files.

A stage reads and writes only its run directory. Records carry their own identity (a hash of what
produced them), so resuming, de-duplicating and sharding need no other bookkeeping:

* :class:`JsonlStore` is an append-only JSONL file of finished records keyed by ``id``. Each
  append is flushed and fsynced; a line torn by a kill is dropped when the file is next opened,
  and a record written twice is read once (the last copy wins).
* :func:`atomic_write_text` / :func:`atomic_write_jsonl` write derived outputs through a
  temporary file and ``os.replace``, so a reader never sees half a file.
* :class:`RunDir` pins a stage's settings in ``<stage>.config.json``: re-running with the same
  settings resumes, different settings are a one-line error instead of silently mixed outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from constitutional.errors import UserError


def stable_hash(*parts: Any, length: int = 16) -> str:
    """A hex digest of JSON-serialisable ``parts`` (key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    atomic_write_text(path, "".join(lines))
    return len(lines)


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Read a JSONL file written by this module (a torn last line is ignored)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                yield json.loads(line)


class JsonlStore:
    """Append-only JSONL of records with an ``id`` field; safe to kill at any moment."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._recover()

    def _recover(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line torn by a kill: drop it
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for raw in data[:end].splitlines():
            if raw.strip():
                rec = json.loads(raw)
                self._records[rec["id"]] = rec

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, record_id: str) -> dict[str, Any] | None:
        return self._records.get(record_id)

    def records(self) -> list[dict[str, Any]]:
        return list(self._records.values())

    def append(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append finished records (each with an ``id``) and make them durable."""
        lines = []
        for rec in records:
            if "id" not in rec:
                raise ValueError("record without an id")
            self._records[rec["id"]] = dict(rec)
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        if lines:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
        return len(lines)


class RunDir:
    """A run directory. Stages pin their settings here so that a re-run resumes safely."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run directory {self.path} is a file")
        self.path.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def pin_config(self, stage: str, config: Mapping[str, Any]) -> None:
        """Write ``<stage>.config.json``, or check that an existing one has the same settings."""
        file = self.path / f"{stage}.config.json"
        current = json.loads(json.dumps(config, sort_keys=True, default=str))
        if file.exists():
            try:
                before = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise UserError(f"cannot read ({err.msg})", file=file, line=err.lineno) from err
            changed = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
            if changed:
                k = changed[0]
                raise UserError(
                    f"this run directory was made with {k}={before.get(k)!r}, now {k}="
                    f"{current.get(k)!r}; use a new --out, or the same settings to resume",
                    file=file, field=k,
                )
            return
        atomic_write_text(file, json.dumps(current, indent=2, sort_keys=True) + "\n")
