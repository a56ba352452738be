"""The constitution's data model: principles, few-shot demonstrations, weighted sampling.

A :class:`Constitution` holds

* critique/revision principle pairs (SL-CAI): a critique request and the matching revision request;
* feedback principles (RL-CAI): the instruction placed before the (A)/(B) options;
* few-shot demonstrations for each stage: critique→revision conversations, feedback examples with
  the correct option, and chain-of-thought feedback examples that end in an answer.

It is read from our YAML (:mod:`.schema`) or the paper's files (:mod:`.paper_format`); see
:func:`constitutional.constitution.load_constitution`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import yaml

from constitutional.core.errors import UserError

#: The option letters of feedback demonstrations, (A) to (J).
LETTERS = "ABCDEFGHIJ"

Message = dict[str, str]
RngLike = random.Random | int | None

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
        return LETTERS.index(self.answer)


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
        return LETTERS.index(self.answer)


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
    """Principles and few-shot demonstrations; see :mod:`constitutional.constitution` for the
    formats."""

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
