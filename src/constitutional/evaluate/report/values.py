"""A run's JSON values as the report's plain text (the template escapes it, nothing here does)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any


@dataclass
class Turn:
    """One message of a conversation; ``None`` prints as nothing."""

    role: Any
    content: Any


#: A prompt as the page shows it: one text, or its messages.
Conversation = str | list[Turn]


def num(value: Any) -> float | None:
    """A finite number as a float, anything else (bools included) as ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def is_number(value: Any) -> bool:
    """Whether a table cell is numeric (right-aligned)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell's text: numbers rounded, None as an en dash, containers as compact JSON."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) < 1e-9:  # floating-point noise (e.g. a bootstrap bound of the anchor)
            value = 0.0
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
            return f"{value:.{digits}g}"
        return f"{value:,.{digits}f}"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)[:300]
    return str(value)


def flat(data: dict[str, Any]) -> dict[str, Any]:
    """Scalars as they are; a small dict of scalars inline; larger containers left out."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and all(not isinstance(x, dict | list) for x in v.values()):
            out[k] = ", ".join(f"{a}: {fmt(b)}" for a, b in v.items())
        elif not isinstance(v, dict | list):
            out[k] = v
    return out


def conversation(messages: Any) -> Conversation:
    """A prompt's text, or its messages (a prompt of another shape as its JSON)."""
    if isinstance(messages, str):
        return messages
    if not isinstance(messages, list):
        return json.dumps(messages, ensure_ascii=False)
    return [Turn(m.get("role", "?"), m.get("content", "")) for m in messages
            if isinstance(m, dict)]


def prompt_text(messages: Any) -> str:
    """The last user turn of a prompt (for one-line summaries)."""
    if isinstance(messages, str):
        return messages
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                return str(m.get("content", ""))
    return ""


def short(text: str, n: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def summary_line(messages: Any) -> str:
    """A prompt in one short line (a sample's ``<summary>``)."""
    return short(prompt_text(messages))
