"""Constitutions: the principles (and few-shot demonstrations) that steer CAI.

A :class:`Constitution` holds

* critique/revision principle pairs (SL-CAI): a critique request and the matching revision request;
* feedback principles (RL-CAI): the instruction placed before the (A)/(B) options;
* few-shot demonstrations for each stage: critique→revision conversations, feedback examples with
  the correct option, and chain-of-thought feedback examples that end in an answer.

Two file formats load into it (:func:`load_constitution`):

Our YAML (``data/constitutions/default.yaml`` is the reference)::

    name: my-constitution
    description: one line
    critique_revision:
      - id: harm-general          # stable id, unique within the list
        tags: [harm]              # optional; lets a user keep a subset (Constitution.filter)
        weight: 1.0               # optional; relative sampling weight (0 = never sampled)
        critique: Point out …
        revision: Rewrite …
    feedback:
      - id: fb-harm
        tags: [harm]
        text: Which response …
    few_shot:
      critique_revision:
        - id: ex-1
          principle: harm-general  # or critique_request: / revision_request: written out
          conversation: [{user: "…"}, {assistant: "…"}]
          critique: …
          revision: …
      feedback:
        - {conversation: [{user: "…"}], options: ["…", "…"], answer: A}
      chain_of_thought:
        - {conversation: […], options: […], reasoning: "…", answer: B}

The paper's published files (Bai et al. 2022, supplementary repository):
``CritiqueRevisionInstructions.json``, ``CritiqueRevisionFewShotPrompts.json``,
``RLMadisonInstructions.json``, ``RLMadisonFewShotPrompts.json`` and
``RLMadisonPrecogFewShotPrompts.json``, given as a directory or as individual files. Principles keep
the paper's names (``harmful0`` …; the unnamed feedback principles become ``feedback0`` …) and the
request text without the ``CritiqueRequest:``/``Critique:``/``Options:`` scaffolding, which the
stages add back. The paper's feedback demonstrations list correct and incorrect answers without
positions; the correct one is placed at (A) for even and (B) for odd examples, so that the
demonstrations do not teach a position bias.

Every validation error is a :class:`~constitutional.errors.UserError` naming the file, the line,
the entry and the field.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Any, TypeVar

import yaml

from constitutional._files import json_entries, line_of_entry, load_yaml, read_utf8
from constitutional.errors import UserError
from constitutional.sources import parse_hh_transcript, split_turns

BUILTIN_DIR = Path(__file__).parent / "data" / "constitutions"

#: The paper's five files and what each holds.
PAPER_FILES: dict[str, str] = {
    "CritiqueRevisionInstructions.json": "critiques",
    "CritiqueRevisionFewShotPrompts.json": "critique_examples",
    "RLMadisonInstructions.json": "feedback",
    "RLMadisonFewShotPrompts.json": "feedback_examples",
    "RLMadisonPrecogFewShotPrompts.json": "cot_examples",
}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_LETTERS = "ABCDEFGHIJ"
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "system": "system"}

Message = dict[str, str]
RngLike = random.Random | int | None


# ------------------------------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class CritiquePrinciple:
    """An SL-CAI principle: how to critique a response, and how to revise it accordingly."""

    id: str
    critique: str
    revision: str
    tags: tuple[str, ...] = ()
    weight: float = 1.0


@dataclass(frozen=True)
class FeedbackPrinciple:
    """An RL-CAI principle: the instruction placed before the (A)/(B) options."""

    id: str
    text: str
    tags: tuple[str, ...] = ()
    weight: float = 1.0


@dataclass(frozen=True)
class CritiqueRevisionExample:
    """A demonstration: a conversation ending in an assistant turn, its critique and revision."""

    id: str
    messages: list[Message]
    critique_request: str
    critique: str
    revision_request: str
    revision: str
    principle: str | None = None


@dataclass(frozen=True)
class FeedbackExample:
    """A demonstration: a conversation ending in a user turn, options, and the correct letter."""

    id: str
    messages: list[Message]
    options: list[str]
    answer: str
    principle: str | None = None

    @property
    def answer_index(self) -> int:
        return _LETTERS.index(self.answer)


@dataclass(frozen=True)
class ChainOfThoughtExample:
    """A feedback demonstration that reasons step by step before giving its answer."""

    id: str
    messages: list[Message]
    options: list[str]
    reasoning: str
    answer: str
    principle: str | None = None

    @property
    def answer_index(self) -> int:
        return _LETTERS.index(self.answer)


P = TypeVar("P", CritiquePrinciple, FeedbackPrinciple)


def _rng(rng: RngLike) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def weighted_sample(rng: RngLike, items: Sequence[P], k: int = 1, *,
                    replace: bool = False) -> list[P]:
    """``k`` items drawn with probability proportional to their ``weight``, reproducibly.

    Without replacement this is Efraimidis–Spirakis sampling (key ``u ** (1 / w)``), so with
    equal weights it is a uniform sample; items of weight 0 are never drawn.
    """
    rng = _rng(rng)
    pool = [item for item in items if item.weight > 0]
    if k < 1:
        raise UserError(f"must be at least 1, got {k}", field="k")
    if not pool:
        raise UserError("no principles to sample from (none, or all have weight 0)")
    if replace:
        return rng.choices(pool, weights=[p.weight for p in pool], k=k)
    if k > len(pool):
        raise UserError(f"cannot draw {k} distinct principles from {len(pool)}", field="k")
    keys = [(rng.random() ** (1.0 / p.weight), i) for i, p in enumerate(pool)]
    keys.sort(reverse=True)
    return [pool[i] for _, i in keys[:k]]


@dataclass(frozen=True)
class Constitution:
    """Principles and few-shot demonstrations; see the module docstring for the formats."""

    name: str
    critiques: list[CritiquePrinciple]
    feedback: list[FeedbackPrinciple]
    critique_examples: list[CritiqueRevisionExample] = field(default_factory=list)
    feedback_examples: list[FeedbackExample] = field(default_factory=list)
    cot_examples: list[ChainOfThoughtExample] = field(default_factory=list)
    description: str = ""
    source: str = ""
    origin: str = "yaml"  # "yaml" or "paper"

    # -- look-ups -------------------------------------------------------------------------------

    def critique(self, principle_id: str) -> CritiquePrinciple:
        return _by_id(self.critiques, principle_id, "critique/revision")

    def feedback_principle(self, principle_id: str) -> FeedbackPrinciple:
        return _by_id(self.feedback, principle_id, "feedback")

    @property
    def tags(self) -> list[str]:
        """Every tag used, in first-use order."""
        seen: dict[str, None] = {}
        for p in [*self.critiques, *self.feedback]:
            seen.update(dict.fromkeys(p.tags))
        return list(seen)

    def counts(self) -> dict[str, int]:
        return {
            "critiques": len(self.critiques),
            "feedback": len(self.feedback),
            "critique_examples": len(self.critique_examples),
            "feedback_examples": len(self.feedback_examples),
            "cot_examples": len(self.cot_examples),
        }

    def summary(self) -> str:
        """E.g. ``16 critique/revision principles, 16 feedback principles, 5/5/6 few-shot …``."""
        c = self.counts()
        return (
            f"{c['critiques']} critique/revision principles, {c['feedback']} feedback principles, "
            f"{c['critique_examples']}/{c['feedback_examples']}/{c['cot_examples']} few-shot "
            "(critique-revision/feedback/chain-of-thought)"
        )

    # -- subsets and sampling -------------------------------------------------------------------

    def filter(
        self,
        tags: str | Iterable[str] | None = None,
        *,
        ids: Iterable[str] | None = None,
        exclude_tags: str | Iterable[str] | None = None,
    ) -> Constitution:
        """The principles that carry any of ``tags`` (and whose id is in ``ids``, if given),
        minus those carrying any of ``exclude_tags``. Few-shot demonstrations are kept."""
        want = _as_set(tags)
        unwanted = _as_set(exclude_tags)
        id_set = set(ids) if ids is not None else None
        if id_set is not None:
            unknown = id_set - {p.id for p in [*self.critiques, *self.feedback]}
            if unknown:
                raise UserError(f"unknown principle id(s): {', '.join(sorted(unknown))}",
                                field="ids")

        def keep(p: CritiquePrinciple | FeedbackPrinciple) -> bool:
            return (
                (not want or bool(want & set(p.tags)))
                and (id_set is None or p.id in id_set)
                and not unwanted & set(p.tags)
            )

        critiques = [p for p in self.critiques if keep(p)]
        feedback = [p for p in self.feedback if keep(p)]
        if not critiques and not feedback:
            known = ", ".join(self.tags) or "none"
            raise UserError(f"no principles match (tags in this constitution: {known})",
                            field="tags")
        label = ",".join(sorted(want)) or ",".join(sorted(id_set or [])) or "subset"
        return replace(self, name=f"{self.name}[{label}]", critiques=critiques, feedback=feedback)

    subset = filter

    def sample_critiques(self, rng: RngLike, k: int = 1, *,
                         replace: bool = False) -> list[CritiquePrinciple]:
        """``k`` critique/revision principles by weight, reproducible from ``random.Random(seed)``.
        """
        return weighted_sample(rng, self.critiques, k, replace=replace)

    def sample_feedback(self, rng: RngLike, k: int = 1, *,
                        replace: bool = False) -> list[FeedbackPrinciple]:
        """``k`` feedback principles by weight; reproducible from ``random.Random(seed)``."""
        return weighted_sample(rng, self.feedback, k, replace=replace)

    # -- export ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Our YAML schema (so a paper-format constitution can be saved, edited and mixed)."""

        def principle(p: CritiquePrinciple | FeedbackPrinciple) -> dict[str, Any]:
            d: dict[str, Any] = {"id": p.id}
            if p.tags:
                d["tags"] = list(p.tags)
            if p.weight != 1.0:
                d["weight"] = p.weight
            if isinstance(p, CritiquePrinciple):
                d.update(critique=p.critique, revision=p.revision)
            else:
                d["text"] = p.text
            return d

        def conv(messages: list[Message]) -> list[dict[str, str]]:
            return [{"role": m["role"], "content": m["content"]} for m in messages]

        def head(e: CritiqueRevisionExample | FeedbackExample | ChainOfThoughtExample,
                 ) -> dict[str, Any]:
            d: dict[str, Any] = {"id": e.id}
            if e.principle is not None:
                d["principle"] = e.principle
            d["conversation"] = conv(e.messages)
            return d

        return {
            "name": self.name,
            "description": self.description,
            "critique_revision": [principle(p) for p in self.critiques],
            "feedback": [principle(p) for p in self.feedback],
            "few_shot": {
                "critique_revision": [
                    {**head(e), "critique_request": e.critique_request, "critique": e.critique,
                     "revision_request": e.revision_request, "revision": e.revision}
                    for e in self.critique_examples
                ],
                "feedback": [
                    {**head(e), "options": list(e.options), "answer": e.answer}
                    for e in self.feedback_examples
                ],
                "chain_of_thought": [
                    {**head(e), "options": list(e.options), "reasoning": e.reasoning,
                     "answer": e.answer}
                    for e in self.cot_examples
                ],
            },
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100)


def _by_id(items: Sequence[P], principle_id: str, what: str) -> P:
    for item in items:
        if item.id == principle_id:
            return item
    raise UserError(f"no {what} principle with id {principle_id!r}")


def _as_set(value: str | Iterable[str] | None) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, str):
        return {t.strip() for t in value.split(",") if t.strip()}
    return set(value)


# ------------------------------------------------------------------------------------------------
# validation helpers (our YAML)


@dataclass(frozen=True)
class _Entry:
    """Where an entry sits, for error messages: file, a label like ``feedback #3 'fb-x'``, line."""

    file: str
    label: str
    data: Mapping[str, Any]

    def line(self, key: str | None = None) -> int | None:
        return line_of_entry(self.data, key)

    def error(self, message: str, fld: str | None = None, *, at_key: bool = True) -> UserError:
        line = self.line(fld if at_key and fld in self.data else None)
        return UserError(f"{self.label}: {message}", file=self.file, line=line, field=fld)


def _check_keys(entry: _Entry, allowed: Sequence[str]) -> None:
    for key in entry.data:
        if key not in allowed:
            raise entry.error(f"unknown field (expected: {', '.join(allowed)})", str(key))


def _text(entry: _Entry, key: str, *, required: bool = True, what: str = "missing") -> str | None:
    value = entry.data.get(key)
    if value is None:
        if required:
            raise entry.error(what, key, at_key=False)
        return None
    if not isinstance(value, str):
        raise entry.error(f"expected text, got {type(value).__name__}", key)
    if not value.strip():
        if required:
            raise entry.error(f"{what} (empty)" if what != "missing" else "is empty", key)
        return None
    return value.strip()


def _tags(entry: _Entry) -> tuple[str, ...]:
    value = entry.data.get("tags")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
        raise entry.error("expected a list of tag names", "tags")
    return tuple(dict.fromkeys(t.strip() for t in value))


def _weight(entry: _Entry) -> float:
    value = entry.data.get("weight", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise entry.error(f"expected a number >= 0, got {value!r}", "weight")
    return float(value)


def _id(entry: _Entry, *, default: str | None = None) -> str:
    value = entry.data.get("id", default)
    if value is None:
        raise entry.error("missing (every principle needs a stable id)", "id", at_key=False)
    value = str(value)
    if not _ID.match(value):
        raise entry.error(f"bad id {value!r} (letters, digits, _ . : - only)", "id")
    return value


def _messages(entry: _Entry, key: str = "conversation") -> list[Message]:
    value = entry.data.get(key)
    if value is None:
        raise entry.error("missing", key, at_key=False)
    if isinstance(value, str):
        try:
            return parse_hh_transcript(value)
        except ValueError as err:
            raise entry.error(f"bad Human:/Assistant: transcript: {err}", key) from None
    if not isinstance(value, list) or not value:
        raise entry.error("expected a list of messages", key)
    messages = []
    for item in value:
        where = _Entry(entry.file, entry.label, item) if isinstance(item, Mapping) else entry
        if isinstance(item, Mapping) and "role" in item:
            role, content = str(item.get("role")).lower(), item.get("content")
        elif isinstance(item, Mapping) and len(item) == 1:
            role, content = str(next(iter(item))).lower(), next(iter(item.values()))
        else:
            raise where.error("each message is {role: …, content: …} or {user: …}", key)
        if role not in _ROLES or not isinstance(content, str) or not content.strip():
            raise where.error("each message needs a role (user/assistant/system) and text", key)
        messages.append({"role": _ROLES[role], "content": content.strip()})
    return messages


def _options_answer(entry: _Entry) -> tuple[list[str], str]:
    options = entry.data.get("options")
    if not isinstance(options, list) or len(options) < 2 or not all(
        isinstance(o, str) and o.strip() for o in options
    ):
        raise entry.error("expected a list of at least two option texts", "options",
                          at_key="options" in entry.data)
    if len(options) > len(_LETTERS):
        raise entry.error(f"at most {len(_LETTERS)} options", "options")
    answer = entry.data.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise entry.error("few-shot example has no answer", "answer", at_key=False)
    letter = str(answer).strip().strip("()").upper()
    if len(letter) != 1 or letter not in _LETTERS[: len(options)]:
        raise entry.error(
            f"expected one of {', '.join(_LETTERS[: len(options)])}, got {answer!r}", "answer")
    return [o.strip() for o in options], letter


def _unique(items: Sequence[Any], entries: Sequence[_Entry]) -> None:
    first: dict[str, _Entry] = {}
    for item, entry in zip(items, entries, strict=True):
        if item.id in first:
            raise entry.error(f"duplicate id {item.id!r} (first on line {first[item.id].line()})",
                              "id")
        first[item.id] = entry


def _entries(data: Mapping[str, Any], key: str, file: str, prefix: str = "") -> list[_Entry]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError("expected a list", file=file, line=line_of_entry(data, key),
                        field=prefix + key)
    out = []
    for i, item in enumerate(value, 1):
        if not isinstance(item, Mapping):
            raise UserError(f"entry #{i} is not a mapping", file=file,
                            line=line_of_entry(data, key), field=prefix + key)
        name = f" {item['id']!r}" if item.get("id") is not None else ""
        out.append(_Entry(file, f"{prefix}{key} #{i}{name}", item))
    return out


# ------------------------------------------------------------------------------------------------
# our YAML


_TOP = ("name", "description", "version", "critique_revision", "feedback", "few_shot")
_FEW_SHOT = ("critique_revision", "feedback", "chain_of_thought")


def _critique_principle(e: _Entry) -> CritiquePrinciple:
    _check_keys(e, ("id", "critique", "revision", "tags", "weight"))
    return CritiquePrinciple(id=_id(e), critique=_text(e, "critique") or "",
                             revision=_text(e, "revision") or "", tags=_tags(e), weight=_weight(e))


def _feedback_principle(e: _Entry) -> FeedbackPrinciple:
    _check_keys(e, ("id", "text", "tags", "weight"))
    return FeedbackPrinciple(id=_id(e), text=_text(e, "text") or "", tags=_tags(e),
                             weight=_weight(e))


def _principle_ref(e: _Entry, known: set[str]) -> str | None:
    ref = e.data.get("principle")
    if ref is None:
        return None
    if str(ref) not in known:
        raise e.error(f"unknown principle id {ref!r}", "principle")
    return str(ref)


def _cr_example(e: _Entry, i: int, c: Mapping[str, CritiquePrinciple]) -> CritiqueRevisionExample:
    _check_keys(e, ("id", "principle", "conversation", "critique_request", "critique",
                    "revision_request", "revision"))
    ref = _principle_ref(e, set(c))
    messages = _messages(e)
    if messages[-1]["role"] != "assistant":
        raise e.error("must end with the assistant response being critiqued", "conversation")
    request = _text(e, "critique_request", required=ref is None,
                    what="missing (give critique_request or principle)")
    revision_request = _text(e, "revision_request", required=ref is None,
                             what="missing (give revision_request or principle)")
    if ref is not None:
        request = request or c[ref].critique
        revision_request = revision_request or c[ref].revision
    return CritiqueRevisionExample(
        id=_id(e, default=f"critique-example-{i}"),
        messages=messages,
        critique_request=request or "",
        critique=_text(e, "critique", what="few-shot example has no critique") or "",
        revision_request=revision_request or "",
        revision=_text(e, "revision", what="few-shot example has no revision (its answer)") or "",
        principle=ref,
    )


def _prompt_messages(e: _Entry) -> list[Message]:
    messages = _messages(e)
    if messages[-1]["role"] != "user":
        raise e.error("must end with the user turn that the options answer", "conversation")
    return messages


def _feedback_example(e: _Entry, i: int, known: set[str]) -> FeedbackExample:
    _check_keys(e, ("id", "principle", "conversation", "options", "answer"))
    ref = _principle_ref(e, known)
    messages = _prompt_messages(e)
    options, answer = _options_answer(e)
    return FeedbackExample(id=_id(e, default=f"feedback-example-{i}"), messages=messages,
                           options=options, answer=answer, principle=ref)


def _cot_example(e: _Entry, i: int, known: set[str]) -> ChainOfThoughtExample:
    _check_keys(e, ("id", "principle", "conversation", "options", "reasoning", "answer"))
    ref = _principle_ref(e, known)
    messages = _prompt_messages(e)
    options, answer = _options_answer(e)
    reasoning = _text(e, "reasoning", what="chain-of-thought example has no reasoning") or ""
    return ChainOfThoughtExample(id=_id(e, default=f"cot-example-{i}"), messages=messages,
                                 options=options, reasoning=reasoning, answer=answer,
                                 principle=ref)


def _build_list(entries: list[_Entry], make: Callable[[_Entry, int], Any]) -> list[Any]:
    items = [make(e, i) for i, e in enumerate(entries)]
    _unique(items, entries)
    return items


def parse_constitution(data: Any, file: str, *, default_name: str = "") -> Constitution:
    """Validate a loaded YAML document (from :func:`~constitutional._files.load_yaml`)."""
    if not isinstance(data, Mapping):
        raise UserError("expected a mapping with critique_revision and feedback lists",
                        file=file, line=1)
    top = _Entry(file, "constitution", data)
    _check_keys(top, _TOP)
    critiques = _build_list(_entries(data, "critique_revision", file),
                            lambda e, i: _critique_principle(e))
    feedback = _build_list(_entries(data, "feedback", file), lambda e, i: _feedback_principle(e))
    if not critiques and not feedback:
        raise UserError(
            "constitution has no principles (critique_revision and feedback are both empty)",
            file=file, line=line_of_entry(data, "critique_revision") or 1,
            field="critique_revision",
        )
    few = data.get("few_shot") or {}
    if not isinstance(few, Mapping):
        raise top.error("expected a mapping with critique_revision/feedback/chain_of_thought",
                        "few_shot")
    _check_keys(_Entry(file, "few_shot", few), _FEW_SHOT)
    by_id = {p.id: p for p in critiques}
    fb_ids = {p.id for p in feedback}
    cr_ex = _build_list(_entries(few, "critique_revision", file, "few_shot."),
                        lambda e, i: _cr_example(e, i, by_id))
    fb_ex = _build_list(_entries(few, "feedback", file, "few_shot."),
                        lambda e, i: _feedback_example(e, i, fb_ids))
    cot_ex = _build_list(_entries(few, "chain_of_thought", file, "few_shot."),
                         lambda e, i: _cot_example(e, i, fb_ids))
    name = data.get("name", default_name)
    description = data.get("description", "")
    for key, value in (("name", name), ("description", description)):
        if not isinstance(value, str):
            raise top.error("expected text", key)
    return Constitution(
        name=name or default_name, description=" ".join(description.split()),
        critiques=critiques, feedback=feedback, critique_examples=cr_ex,
        feedback_examples=fb_ex, cot_examples=cot_ex, source=file, origin="yaml",
    )


def _load_yaml_file(path: Path) -> Constitution:
    data = load_yaml(read_utf8(path), path)
    return parse_constitution(data, str(path), default_name=path.stem)


# ------------------------------------------------------------------------------------------------
# the paper's JSON files


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
        if letters != list(_LETTERS[: len(letters)]):
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


def _load_paper_files(paths: Sequence[Path], name: str, source: str | None = None) -> Constitution:
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


def _load_dir(path: Path) -> Constitution:
    files = [path / name for name in PAPER_FILES if (path / name).is_file()]
    if files:
        return _load_paper_files(files, name=path.name or "paper", source=str(path))
    for candidate in ("constitution.yaml", "constitution.yml"):
        if (path / candidate).is_file():
            return _load_yaml_file(path / candidate)
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
        return _load_paper_files(paths, name="paper")
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_dir(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            return _load_yaml_file(path)
        if suffix == ".json":
            return _load_paper_files([path], name=path.stem)
        raise UserError("unknown constitution file type; expected .yaml or the paper's .json",
                        file=path)
    if "," in text:
        return load_constitution([p.strip() for p in text.split(",") if p.strip()])
    if _looks_like_name(text):
        builtin = BUILTIN_DIR / f"{text}.yaml"
        if builtin.is_file():
            return _load_yaml_file(builtin)
        raise UserError(f"unknown constitution {text!r}; built-ins: {', '.join(builtin_names())} "
                        "(or give a YAML file or a directory in the paper's format)")
    raise UserError("no such file or directory", file=text)


def builtin_constitutions() -> list[Constitution]:
    return [load_constitution(name) for name in builtin_names()]
