"""Reading a run directory: JSON files, JSON-lines files with their unreadable lines counted."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class NotRun(Exception):
    """The section's input files do not exist (``args[0]``: the file looked for)."""


@dataclass
class Lines:
    """The JSON-object lines of ``rel`` and how many lines could not be read."""

    rel: str
    rows: list[dict[str, Any]]
    bad: int


@dataclass
class Shown:
    """The first ``limit`` of ``total`` samples (``items``: the ones shown)."""

    items: list[Any]
    total: int
    limit: int


class RunDir:
    def __init__(self, path: Path, max_samples: int) -> None:
        self.path, self.max_samples = path, max_samples

    def exists(self, rel: str) -> bool:
        return (self.path / rel).is_file()

    def json(self, rel: str) -> Any:
        file = self.path / rel
        if not file.is_file():
            raise NotRun(rel)
        return json.loads(file.read_text(encoding="utf-8", errors="replace"))

    def jsonl(self, rel: str) -> Lines:
        file = self.path / rel
        if not file.is_file():
            raise NotRun(rel)
        rows, bad = [], 0
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
        return Lines(rel, rows, bad)

    def shown(self, items: list[Any]) -> Shown:
        """The first ``max_samples`` of ``items``."""
        return Shown(items[: self.max_samples], len(items), self.max_samples)
