"""Strict reading of user files: UTF-8 with line numbers, JSON entries with their lines.

Everything here raises :class:`~constitutional.errors.UserError` naming the file and the line, so
that a bad file is reported in one line instead of a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from constitutional.errors import UserError


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


def jsonl_objects(path: str | Path, *, required: tuple[str, ...] = (),
                  skipped: list[UserError] | None = None):
    """Yield ``(line number, object)`` for each non-blank line of a user's JSONL file.

    Invalid JSON, a line that is not an object, or a missing ``required`` key is a
    :class:`UserError` naming the file, line and field; with a ``skipped`` list, such a line is
    appended to it and skipped instead.
    """
    text = read_utf8(path)
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"invalid JSON: {err.msg} (column {err.colno})", file=path,
                                line=number) from None
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
