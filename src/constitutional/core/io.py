"""Files: strict reading of user files (UTF-8, JSON and YAML with line numbers, JSONL with
skipped rows counted), run directories and resumable record files.

Reading raises :class:`~constitutional.core.errors.UserError` naming the file and the line, so
that a bad file is reported in one line instead of a traceback.

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

import yaml

from constitutional.core.errors import UserError


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


# ------------------------------------------------------------------------------------------------
# strict reading of user files


def line_of(text: str, offset: int) -> int:
    """The 1-based line number of character ``offset`` in ``text``."""
    return text.count("\n", 0, offset) + 1


def decode_utf8(data: bytes, file: str | Path) -> str:
    """Decode ``data`` as UTF-8 (a leading BOM is dropped); report the first bad byte's line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        bad = data[err.start : err.start + 1].hex()
        raise UserError(
            f"not valid UTF-8 (byte 0x{bad} at column {column}); save the file as UTF-8",
            file=file,
            line=line,
        ) from None


def read_utf8(path: str | Path, *, allow_empty: bool = False) -> str:
    """Read a UTF-8 text file; an unreadable, non-UTF-8 or (unless allowed) blank file is an
    error."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError("no such file", file=path) from None
    except IsADirectoryError:
        raise UserError("is a directory, expected a file", file=path) from None
    except OSError as err:
        raise UserError(f"cannot read: {err.strerror or err}", file=path) from None
    text = decode_utf8(data, path)
    if not allow_empty and not text.strip():
        raise UserError("file is empty", file=path, line=1)
    return text


def _json_error(err: json.JSONDecodeError, file: str | Path) -> UserError:
    return UserError(f"invalid JSON: {err.msg} (column {err.colno})", file=file, line=err.lineno)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def json_entries(text: str, file: str | Path) -> tuple[str, list[tuple[str | int, Any, int]]]:
    """Parse a JSON document whose top level is an array or an object, keeping entry lines.

    Returns ``(kind, entries)`` where ``kind`` is ``"list"`` or ``"dict"`` and each entry is
    ``(index_or_key, value, line)`` with the 1-based line on which the entry starts.
    """
    try:
        json.loads(text)  # validate first, so that errors carry json's own line and column
    except json.JSONDecodeError as err:
        raise _json_error(err, file) from None
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    opener = text[pos] if pos < len(text) else ""
    if opener not in "[{":
        raise UserError("expected a JSON array or object at the top level", file=file, line=1)
    kind = "list" if opener == "[" else "dict"
    closer = "]" if kind == "list" else "}"
    entries: list[tuple[str | int, Any, int]] = []
    pos = _skip_ws(text, pos + 1)
    index = 0
    while text[pos] != closer:
        line = line_of(text, pos)
        if kind == "dict":
            key, pos = decoder.raw_decode(text, pos)
            pos = _skip_ws(text, pos) + 1  # the ':'
            value, pos = decoder.raw_decode(text, _skip_ws(text, pos))
            entries.append((key, value, line))
        else:
            value, pos = decoder.raw_decode(text, pos)
            entries.append((index, value, line))
            index += 1
        pos = _skip_ws(text, pos)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    return kind, entries


class LineDict(dict):  # type: ignore[type-arg]
    """A YAML mapping that remembers its own line and the line of each key."""

    line: int = 0
    key_lines: dict[Any, int]


class _LineLoader(yaml.SafeLoader):
    """A safe loader whose mappings are :class:`LineDict` s; duplicate keys are errors."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in result
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "unhashable key", key_node.start_mark) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, file: str | Path) -> Any:
    """``yaml.safe_load`` whose mappings carry line numbers (see :func:`line_of_entry`)."""
    try:
        return yaml.load(text, Loader=_LineLoader)  # a SafeLoader subclass: safe
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        problem = err.problem or err.context or "syntax error"
        raise UserError(f"invalid YAML: {problem}", file=file, line=line) from None
    except yaml.YAMLError as err:
        raise UserError(f"invalid YAML: {err}", file=file) from None


def line_of_entry(entry: Any, key: Any = None) -> int | None:
    """The line of a mapping loaded by :func:`load_yaml`, or of one of its keys."""
    if not isinstance(entry, LineDict):
        return None
    if key is not None and key in entry.key_lines:
        return entry.key_lines[key]
    return entry.line


def jsonl_values(path: str | Path, *,
                 skipped: list[UserError] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, value)`` for each non-blank line of a user's JSONL file, whatever
    JSON value the line holds.

    The file must be UTF-8 and not blank (see :func:`read_utf8`). Invalid JSON is a
    :class:`UserError` naming the file and line; with a ``skipped`` list, such a line is appended
    to it and skipped instead.
    """
    text = read_utf8(path)
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            error = UserError(f"invalid JSON: {err.msg} (column {err.colno})", file=path,
                              line=number)
            if skipped is None:
                raise error from None
            skipped.append(error)
            continue
        yield number, value


def jsonl_objects(path: str | Path, *, required: tuple[str, ...] = (),
                  skipped: list[UserError] | None = None,
                  ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line of a user's JSONL file.

    Invalid JSON, a line that is not an object, or a missing ``required`` key is a
    :class:`UserError` naming the file, line and field; with a ``skipped`` list, such a line is
    appended to it and skipped instead.
    """
    for number, row in jsonl_values(path, skipped=skipped):
        try:
            if not isinstance(row, dict):
                raise UserError("expected a JSON object per line", file=path, line=number)
            for key in required:
                if key not in row:
                    raise UserError("missing", file=path, line=number, field=key)
        except UserError as err:
            if skipped is None:
                raise
            skipped.append(err)
            continue
        yield number, row
