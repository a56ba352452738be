"""The paper's published constitution files (Bai et al. 2022, supplementary repository).

``CritiqueRevisionInstructions.json``, ``CritiqueRevisionFewShotPrompts.json``,
``RLMadisonInstructions.json``, ``RLMadisonFewShotPrompts.json`` and
``RLMadisonPrecogFewShotPrompts.json``, given as a directory or as individual files (a renamed file
is recognised by its structure). Principles keep the paper's names (``harmful0`` …; the unnamed
feedback principles become ``feedback0`` …) and the request text without the
``CritiqueRequest:``/``Critique:``/``Options:`` scaffolding, which the stages add back. The paper's
feedback demonstrations list correct and incorrect answers without positions; the correct one is
placed at (A) for even and (B) for odd examples, so that the demonstrations do not teach a position
bias.

Every error is a :class:`~constitutional.core.errors.UserError` naming the file, the line of the
entry, the entry and the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from itertools import product
from pathlib import Path
from typing import Any

from constitutional.core.errors import UserError
from constitutional.core.io import json_entries, read_utf8
from constitutional.core.messages import parse_hh_transcript, split_turns

from .model import (
    LETTERS,
    ChainOfThoughtExample,
    Constitution,
    CritiquePrinciple,
    CritiqueRevisionExample,
    FeedbackExample,
    FeedbackPrinciple,
)

#: The paper's five files and what each holds.
PAPER_FILES: dict[str, str] = {
    "CritiqueRevisionInstructions.json": "critiques",
    "CritiqueRevisionFewShotPrompts.json": "critique_examples",
    "RLMadisonInstructions.json": "feedback",
    "RLMadisonFewShotPrompts.json": "feedback_examples",
    "RLMadisonPrecogFewShotPrompts.json": "cot_examples",
}


def _strip_scaffold(text: str, head: str, tail: str) -> str:
    """``"\\n\\nCritiqueRequest: X\\n\\nCritique:"`` → ``"X"`` (lenient if a label is absent)."""
    text = text.strip()
    if text.startswith(head + ":"):
        text = text[len(head) + 1 :]
    if tail and text.endswith(tail + ":"):
        text = text[: -len(tail) - 1]
    return text.strip()


def _paper_error(path: Path, line: int, label: str, message: str,
                 fld: str | None = None) -> UserError:
    return UserError(f"{label}: {message}", file=path, line=line, field=fld)


def _paper_critiques(path: Path, entries: list[tuple[Any, Any, int]]) -> list[CritiquePrinciple]:
    out = []
    first_line: dict[str, int] = {}
    for name, value, line in entries:
        label = f"entry {name!r}"
        if str(name) in first_line:
            raise _paper_error(path, line, label, f"duplicate principle id {name!r} (first on "
                               f"line {first_line[str(name)]})", "id")
        first_line[str(name)] = line
        if not isinstance(value, Mapping):
            raise _paper_error(path, line, label, "expected an object with prompt and edit_request")
        prompts = value.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        edit = value.get("edit_request")
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise _paper_error(path, line, label, "missing critique request", "prompt")
        if not isinstance(edit, str) or not edit.strip():
            raise _paper_error(path, line, label, "missing revision request", "edit_request")
        revision = _strip_scaffold(edit, "RevisionRequest", "Revision")
        for j, prompt in enumerate(prompts):
            pid = str(name) if len(prompts) == 1 else f"{name}.{j}"
            out.append(CritiquePrinciple(id=pid, revision=revision, tags=("paper",),
                                         critique=_strip_scaffold(prompt, "CritiqueRequest",
                                                                  "Critique")))
    return out


def _paper_feedback(path: Path, entries: list[tuple[Any, Any, int]]) -> list[FeedbackPrinciple]:
    out = []
    for i, value, line in entries:
        if not isinstance(value, str) or not value.strip():
            raise _paper_error(path, line, f"entry #{i}", "expected a non-empty instruction")
        text = value.strip()
        text = text[: -len("Options:")].strip() if text.endswith("Options:") else text
        out.append(FeedbackPrinciple(id=f"feedback{i}", text=text, tags=("paper",)))
    return out


_CR_LABELS = ("Human", "Assistant", "CritiqueRequest", "Critique", "RevisionRequest", "Revision")
_CR_TAIL = ["CritiqueRequest", "Critique", "RevisionRequest", "Revision"]


def _paper_cr_examples(path: Path,
                       entries: list[tuple[Any, Any, int]]) -> list[CritiqueRevisionExample]:
    out = []
    for i, value, line in entries:
        label = f"few-shot #{i}"
        if not isinstance(value, str):
            raise _paper_error(path, line, label, "expected a text block")
        try:
            turns = split_turns(value, _CR_LABELS)
        except ValueError as err:
            raise _paper_error(path, line, label, str(err)) from None
        while turns and not turns[-1][1]:
            turns.pop()  # the trailing "Human:" that starts the next demonstration
        k = next((j for j, (name, _) in enumerate(turns) if name not in ("Human", "Assistant")),
                 len(turns))
        messages = [{"role": "user" if n == "Human" else "assistant", "content": c}
                    for n, c in turns[:k]]
        tail = turns[k:]
        if not messages or messages[-1]["role"] != "assistant":
            raise _paper_error(path, line, label, "needs a conversation ending in an Assistant "
                               "turn before CritiqueRequest:", "Assistant")
        names = [name for name, _ in tail]
        for j, expected in enumerate(_CR_TAIL):
            if j >= len(names) or names[j] != expected:
                answer = " (its answer)" if expected == "Revision" else ""
                raise _paper_error(path, line, label, f"few-shot example is missing its "
                                   f"{expected}: turn{answer}; expected "
                                   f"{' → '.join(_CR_TAIL)}", expected)
            if not tail[j][1]:
                raise _paper_error(path, line, label, f"{expected}: is empty", expected)
        if len(tail) > len(_CR_TAIL):
            raise _paper_error(path, line, label, "only one critique/revision round per "
                               "demonstration is supported", tail[len(_CR_TAIL)][0])
        out.append(CritiqueRevisionExample(
            id=f"paper-critique-{i}", messages=messages, critique_request=tail[0][1],
            critique=tail[1][1], revision_request=tail[2][1], revision=tail[3][1],
        ))
    return out


def _paper_fb_examples(path: Path, entries: list[tuple[Any, Any, int]]) -> list[FeedbackExample]:
    out = []
    for i, value, line in entries:
        label = f"few-shot #{i}"
        if not isinstance(value, Mapping):
            raise _paper_error(path, line, label, "expected an object with prompt, corrects, "
                               "incorrects")
        prompt = value.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _paper_error(path, line, label, "missing", "prompt")
        try:
            messages = parse_hh_transcript(prompt)
        except ValueError as err:
            raise _paper_error(path, line, label, f"bad transcript: {err}", "prompt") from None
        if messages[-1]["role"] != "user":
            raise _paper_error(path, line, label, "must end with a Human turn", "prompt")
        for key in ("corrects", "incorrects"):
            answers = value.get(key)
            if not isinstance(answers, list) or not answers or not all(
                isinstance(a, str) and a.strip() for a in answers
            ):
                what = "its answer (no correct option)" if key == "corrects" else (
                    "an incorrect option")
                raise _paper_error(path, line, label, f"few-shot example is missing {what}", key)
        pairs = list(product(value["corrects"], value["incorrects"]))
        for j, (right, wrong) in enumerate(pairs):
            first = len(out) % 2 == 0
            options = [right.strip(), wrong.strip()] if first else [wrong.strip(), right.strip()]
            eid = f"paper-feedback-{i}" if len(pairs) == 1 else f"paper-feedback-{i}.{j}"
            out.append(FeedbackExample(id=eid, messages=messages, options=options,
                                       answer="A" if first else "B"))
    return out


_COT_HEAD = re.compile(r"Consider the following conversation between a human[^:]*:[ \t]*\n")
_COT_OPTION = re.compile(r"\(([A-J])\)\s*\[\[\[(.*?)\]\]\]", re.DOTALL)
_COT_REASON = re.compile(
    r"\n\s*Assistant:\s*(?:Let's think step by step:?)?(.*?)(?=\n\s*Human:|\Z)", re.DOTALL)
_COT_ANSWER = re.compile(r"answer is:?\s*\(?([A-J])\)?")


def _paper_cot_examples(path: Path,
                        entries: list[tuple[Any, Any, int]]) -> list[ChainOfThoughtExample]:
    out = []
    for i, value, line in entries:
        label = f"few-shot #{i}"
        text = value.get("prompt") if isinstance(value, Mapping) else None
        if not isinstance(text, str) or not text.strip():
            raise _paper_error(path, line, label, "missing", "prompt")
        head = _COT_HEAD.search(text)
        options = _COT_OPTION.findall(text)
        if not head or len(options) < 2:
            raise _paper_error(path, line, label, "expected 'Consider the following "
                               "conversation …', the conversation and (A) [[[…]]] (B) [[[…]]]",
                               "prompt")
        first_option = _COT_OPTION.search(text)
        end = text.find("{}", head.end())
        end = end if end != -1 else first_option.start() if first_option else len(text)
        try:
            turns = split_turns(text[head.end() : end], ("H", "A"))
        except ValueError as err:
            raise _paper_error(path, line, label, f"bad conversation: {err}", "prompt") from None
        messages = [{"role": "user" if n == "H" else "assistant", "content": c}
                    for n, c in turns if c]
        after = text[_end_of_options(text):]
        reasoning = _COT_REASON.search(after)
        answer = _COT_ANSWER.search(after)
        letters = [letter for letter, _ in options]
        if not answer or answer.group(1) not in letters:
            raise _paper_error(path, line, label, "few-shot example has no answer "
                               "('So the answer is: (X)')", "answer")
        if not reasoning or not reasoning.group(1).strip():
            raise _paper_error(path, line, label, "chain-of-thought example has no reasoning",
                               "reasoning")
        if letters != list(LETTERS[: len(letters)]):
            raise _paper_error(path, line, label, f"options must be (A), (B) …, got {letters}",
                               "prompt")
        if not messages or messages[-1]["role"] != "user":
            raise _paper_error(path, line, label, "the conversation must end with an H: turn",
                               "prompt")
        out.append(ChainOfThoughtExample(
            id=f"paper-cot-{i}", messages=messages, options=[o.strip() for _, o in options],
            reasoning=reasoning.group(1).strip(), answer=answer.group(1),
        ))
    return out


def _end_of_options(text: str) -> int:
    *_, last = _COT_OPTION.finditer(text)
    return last.end()


def _detect_paper_kind(kind: str, entries: list[tuple[Any, Any, int]]) -> str | None:
    """Which of the five files this is, from its structure (for renamed files)."""
    if not entries:
        return None
    first = entries[0][1]
    if kind == "dict" and isinstance(first, Mapping) and "edit_request" in first:
        return "critiques"
    if kind != "list":
        return None
    if isinstance(first, str):
        return "critique_examples" if "CritiqueRequest:" in first else "feedback"
    if isinstance(first, Mapping) and "corrects" in first:
        return "feedback_examples"
    if isinstance(first, Mapping) and "[[[" in str(first.get("prompt", "")):
        return "cot_examples"
    return None


_PAPER_PARSERS: dict[str, Callable[[Path, list[tuple[Any, Any, int]]], list[Any]]] = {
    "critiques": _paper_critiques,
    "feedback": _paper_feedback,
    "critique_examples": _paper_cr_examples,
    "feedback_examples": _paper_fb_examples,
    "cot_examples": _paper_cot_examples,
}


def load_paper_files(paths: Sequence[Path], name: str, source: str | None = None) -> Constitution:
    """A constitution from some of the paper's five files, each recognised by name or structure."""
    parts: dict[str, list[Any]] = {}
    origin: dict[str, Path] = {}
    for path in paths:
        text = read_utf8(path)
        kind, entries = json_entries(text, path)
        what = PAPER_FILES.get(path.name) or _detect_paper_kind(kind, entries)
        if what is None:
            raise UserError(f"not one of the paper's files ({', '.join(PAPER_FILES)})",
                            file=path, line=1)
        if what in origin:
            raise UserError(f"holds the same part ({what}) as {origin[what]}", file=path, line=1)
        expected = "dict" if what == "critiques" else "list"
        if kind != expected:
            raise UserError(f"expected a JSON {'object' if expected == 'dict' else 'array'} "
                            f"at the top level for {what}", file=path, line=1)
        if not entries:
            raise UserError("file has no entries", file=path, line=1)
        origin[what] = path
        parts[what] = _PAPER_PARSERS[what](path, entries)
    if not parts.get("critiques") and not parts.get("feedback"):
        files = ", ".join(str(p) for p in paths)
        raise UserError(f"constitution has no principles: give CritiqueRevisionInstructions.json "
                        f"and/or RLMadisonInstructions.json (got {files})",
                        file=paths[0] if len(paths) == 1 else None)
    return Constitution(
        name=name, description="The published constitution of Bai et al. (2022), paper format.",
        critiques=parts.get("critiques", []), feedback=parts.get("feedback", []),
        critique_examples=parts.get("critique_examples", []),
        feedback_examples=parts.get("feedback_examples", []),
        cot_examples=parts.get("cot_examples", []),
        source=source or ", ".join(str(p) for p in paths), origin="paper",
    )
