"""Conversations: the message type, checking the messages a user gives us, and HH-RLHF
transcripts.

A conversation is a list of ``{"role", "content"}`` messages, ``role`` one of :data:`ROLES`.

* :func:`coerce_messages` turns a value from a user's file (a text, or a list of messages) into
  a conversation; anything else is a :class:`~constitutional.core.errors.UserError` of one line
  naming the file, the line and the field.
* :func:`parse_hh_transcript` reads Anthropic's HH-RLHF transcripts
  (``"\\n\\nHuman: …\\n\\nAssistant: …"``); :func:`split_turns` splits any such labelled-turn
  text; :data:`HH_LABELS` are the labels a role is written with.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

from constitutional.core.errors import UserError

Message: TypeAlias = dict[str, str]
Conversation: TypeAlias = list[Message]

ROLES = ("system", "user", "assistant")
#: How each role is written in a Human:/Assistant: transcript.
HH_LABELS = {"user": "Human", "assistant": "Assistant", "system": "System"}


def is_message(value: Any) -> bool:
    """True for a ``{"role": one of ROLES, "content": str}`` mapping (other keys allowed)."""
    return (isinstance(value, dict) and value.get("role") in ROLES
            and isinstance(value.get("content"), str))


def coerce_messages(value: Any, *, file: str | Path | None = None, line: int | None = None,
                    field: str = "prompt", text: bool = True) -> Conversation:
    """A user's value as a conversation: a non-blank text is one user message (unless ``text``
    is False), a non-empty list must hold messages (see :func:`is_message`; other keys are
    dropped). Anything else is a one-line :class:`UserError` naming ``file``, ``line`` and
    ``field``."""
    where: dict[str, Any] = {"file": file, "line": line, "field": field}
    if text and isinstance(value, str):
        if not value.strip():
            raise UserError("is empty", **where)
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        want = "a string or a list" if text else "a list"
        raise UserError(f"expected {want} of {{role, content}} messages", **where)
    if not all(is_message(m) for m in value):
        raise UserError("each message needs a role (system/user/assistant) and content", **where)
    return [{"role": m["role"], "content": m["content"]} for m in value]


# ------------------------------------------------------------------------------------------------
# transcripts


def looks_like_hh(text: str) -> bool:
    """True when ``text`` starts (after whitespace) with an HH-RLHF ``Human:`` turn."""
    return text.lstrip().startswith("Human:")


def split_turns(text: str, labels: Sequence[str]) -> list[tuple[str, str]]:
    """Split ``"\\n\\nLabel: …\\n\\nOther: …"`` text into ``(label, content)`` turns.

    A turn starts at the beginning of the text or after a blank line. Raises ``ValueError`` if
    there is text before the first turn or no turn at all.
    """
    names = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    pattern = re.compile(rf"(?:\A|\n\n)({names}):")
    body = text.lstrip("\n")
    matches = list(pattern.finditer(body))
    if not matches:
        raise ValueError(f"no turns found (expected {', '.join(x + ':' for x in labels)})")
    if body[: matches[0].start()].strip():
        raise ValueError(f"unexpected text before the first turn: {body[:40]!r}")
    turns = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(body)
        turns.append((match.group(1), body[match.end() : end].strip()))
    return turns


def parse_hh_transcript(text: str, *, keep_empty_answer: bool = False) -> Conversation:
    """Parse an Anthropic HH-RLHF transcript into ``[{"role", "content"}, …]``.

    ``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` gives a user and an assistant message. Trailing
    empty turns (a transcript that ends in ``"Assistant:"`` awaiting the answer) are dropped,
    except, with ``keep_empty_answer``, a final empty assistant turn after a user turn: in a
    comparison (HH-RLHF's ``chosen``/``rejected``) an empty answer is a legitimate response
    (a few rows of ``harmless-base/test`` prefer it). Raises ``ValueError`` on text that is not
    in that format.
    """
    turns = split_turns(text, (HH_LABELS["user"], HH_LABELS["assistant"]))
    messages = [
        {"role": "user" if label == HH_LABELS["user"] else "assistant", "content": content}
        for label, content in turns
    ]
    empty_answer = (keep_empty_answer and len(messages) >= 2
                    and messages[-1] == {"role": "assistant", "content": ""}
                    and messages[-2]["role"] == "user" and messages[-2]["content"] != "")
    while messages and not messages[-1]["content"]:
        messages.pop()
    if empty_answer:
        messages.append({"role": "assistant", "content": ""})
    if not messages:
        raise ValueError("the transcript has no non-empty turn")
    return messages
