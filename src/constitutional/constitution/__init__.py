"""Constitutions: the principles (and few-shot demonstrations) that steer CAI.

A :class:`Constitution` (:mod:`.model`) holds critique/revision principles (SL-CAI), feedback
principles (RL-CAI) and few-shot demonstrations for each stage. Two file formats load into it
(:func:`load_constitution`):

* our YAML (:mod:`.schema`; ``data/constitutions/default.yaml`` is the reference), and
* the paper's published files (Bai et al. 2022), as a directory or as individual JSON files
  (:mod:`.paper_format`).

Every validation error is a :class:`~constitutional.core.errors.UserError` naming the file, the line,
the entry and the field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from constitutional.core.errors import UserError

from .model import (
    LETTERS,
    ChainOfThoughtExample,
    Constitution,
    CritiquePrinciple,
    CritiqueRevisionExample,
    FeedbackExample,
    FeedbackPrinciple,
    Message,
    RngLike,
    weighted_sample,
)
from .paper_format import PAPER_FILES, load_paper_files
from .schema import load_yaml_file, parse_constitution

__all__ = [
    "BUILTIN_DIR", "LETTERS", "PAPER_FILES", "ChainOfThoughtExample", "Constitution",
    "CritiquePrinciple", "CritiqueRevisionExample", "FeedbackExample", "FeedbackPrinciple",
    "Message", "RngLike", "builtin_constitutions", "builtin_names", "load_constitution",
    "parse_constitution", "weighted_sample",
]

BUILTIN_DIR = Path(__file__).parent.parent / "data" / "constitutions"


def _load_dir(path: Path) -> Constitution:
    files = [path / name for name in PAPER_FILES if (path / name).is_file()]
    if files:
        return load_paper_files(files, name=path.name or "paper", source=str(path))
    for candidate in ("constitution.yaml", "constitution.yml"):
        if (path / candidate).is_file():
            return load_yaml_file(path / candidate)
    raise UserError(f"no constitution here: expected constitution.yaml or the paper's files "
                    f"({', '.join(PAPER_FILES)})", file=path)


# ------------------------------------------------------------------------------------------------
# entry points


def builtin_names() -> list[str]:
    """The built-in constitutions (``default`` first)."""
    names = sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
    return sorted(names, key=lambda n: n != "default")


def _looks_like_name(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", text))


def load_constitution(spec: str | Path | Sequence[str | Path] | Constitution) -> Constitution:
    """Load a constitution from a built-in name, a YAML file, a paper-format directory, or
    one or more paper-format JSON files (a list, or a comma-separated string)."""
    if isinstance(spec, Constitution):
        return spec
    if isinstance(spec, (list, tuple)):
        paths = [Path(p).expanduser() for p in spec]
        if len(paths) == 1:
            return load_constitution(paths[0])
        for path in paths:
            if not path.is_file():
                raise UserError("no such file", file=path)
            if path.suffix.lower() != ".json":
                raise UserError("only the paper's .json files can be combined", file=path)
        return load_paper_files(paths, name="paper")
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_dir(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            return load_yaml_file(path)
        if suffix == ".json":
            return load_paper_files([path], name=path.stem)
        raise UserError("unknown constitution file type; expected .yaml or the paper's .json",
                        file=path)
    if "," in text:
        return load_constitution([p.strip() for p in text.split(",") if p.strip()])
    if _looks_like_name(text):
        builtin = BUILTIN_DIR / f"{text}.yaml"
        if builtin.is_file():
            return load_yaml_file(builtin)
        raise UserError(f"unknown constitution {text!r}; built-ins: {', '.join(builtin_names())} "
                        "(or give a YAML file or a directory in the paper's format)")
    raise UserError("no such file or directory", file=text)


def builtin_constitutions() -> list[Constitution]:
    return [load_constitution(name) for name in builtin_names()]
