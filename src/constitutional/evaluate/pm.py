"""``cai eval pm``: a preference model's accuracy on comparisons it was not trained on.

The PM (:mod:`constitutional.rl.preference`) scores each side of a comparison; a comparison is
**correct** when the preferred side scores higher. The accuracy is reported with a 95% Wilson
interval (:func:`constitutional.evaluate.stats.wilson_interval`).

The data:

* comparisons as ``cai rl pm`` reads them (:func:`constitutional.rl.preference.load_comparisons`):
  ``prompt``/``chosen``/``rejected`` rows or HH-RLHF transcripts, those that branch before their
  final answers scored as two whole conversations; a soft ``score`` counts towards the side it
  prefers, and exact ties (0.5) are left out;
* the paper's multiple-choice files, through their ``text_correct`` / ``text_incorrect`` fields
  (transcripts; the correct one must outscore every incorrect one). A text that is not a
  ``Human:``/``Assistant:`` transcript ending with the assistant is read as an answer to an empty
  question.

A row that cannot be used is skipped, counted and listed (``skipped``); only a file with no
usable row is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constitutional.core.errors import UserError
from constitutional.core.io import jsonl_objects
from constitutional.core.messages import Conversation, looks_like_hh, parse_hh_transcript
from constitutional.evaluate.stats import wilson_interval
from constitutional.rl.preference import PreferenceModel, load_comparisons

log = logging.getLogger(__name__)


@dataclass
class PMEval:
    accuracy: float
    correct: int
    n: int
    ci95: tuple[float, float]
    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # rows that could not be used


def evaluate_pm(pm: PreferenceModel, data: str | Path, *, limit: int | None = None) -> PMEval:
    """Accuracy of ``pm`` on a comparison file: ``prompt``/``chosen``/``rejected``, HH-RLHF
    transcripts, or the paper's multiple-choice rows (``text_correct``/``text_incorrect``).
    Rows with a soft ``score`` count towards the side they prefer; exact ties (0.5) are skipped."""
    file = Path(data)
    skipped: list[UserError] = []
    first = (next((row for _, row in jsonl_objects(file, skipped=[])), None)
             if file.is_file() else None)
    rows: list[dict[str, Any]] = []
    if first is not None and "text_correct" in first:
        items = load_mc_comparisons(file, skipped)[:limit]
        convs: list[Conversation] = []
        spans = []
        for correct, incorrect in items:
            start = len(convs)
            for text in [correct, *incorrect]:
                convs.append(_mc_messages(text))
            spans.append((start, len(convs)))
        scores = pm.score(convs)
        for (correct, _), (a, b) in zip(items, spans, strict=True):
            s = scores[a:b]
            rows.append({"text_correct": correct, "score_correct": s[0],
                         "scores_incorrect": s[1:], "correct": all(s[0] > x for x in s[1:])})
    else:
        comps = [c for c in load_comparisons(file, skipped=skipped, branching=True)
                 if c.p != 0.5][:limit]
        pairs = [c.pair() for c in comps]
        chosen, rejected = pm.score_conversation_pairs([a for a, _ in pairs],
                                                       [b for _, b in pairs])
        for c, sc, sr in zip(comps, chosen, rejected, strict=True):
            rows.append({"id": c.id, "score_chosen": sc, "score_rejected": sr, "p": c.p,
                         "correct": sc > sr})
    if not rows:
        raise UserError("no decided comparisons to evaluate", file=file, line=1)
    k = sum(r["correct"] for r in rows)
    for err in skipped:
        log.warning("%s (row skipped)", err)
    return PMEval(k / len(rows), k, len(rows), wilson_interval(k, len(rows)), rows,
                  [{"line": e.line, "field": e.field, "reason": e.message} for e in skipped])


# ------------------------------------------------------------------------------------------------
# the paper's multiple-choice files


def load_mc_comparisons(file: str | Path, skipped: list[UserError] | None = None,
                        ) -> list[tuple[str, list[str]]]:
    """The paper's multiple-choice rows through ``text_correct`` / ``text_incorrect``: a list of
    (correct transcript, [incorrect transcripts]). With a ``skipped`` list, unusable rows are
    appended to it and skipped (as :func:`constitutional.rl.preference.load_comparisons` does)."""
    file = Path(file)
    out = []
    for n, row in jsonl_objects(file, skipped=skipped):
        try:
            out.append(_mc_comparison(row, file, n))
        except UserError as err:
            if skipped is None:
                raise
            skipped.append(err)
    if not out:
        if skipped:
            first = skipped[0]
            raise UserError(f"{first.message} (no usable row: {len(skipped)} skipped)",
                            file=file, line=first.line, field=first.field)
        raise UserError("no rows", file=file, line=1)
    return out


def _mc_comparison(row: dict[str, Any], file: Path, n: int) -> tuple[str, list[str]]:
    for key in ("text_correct", "text_incorrect"):
        if key not in row:
            raise UserError("missing", file=file, line=n, field=key)
    correct = row["text_correct"]
    if isinstance(correct, list):
        if len(correct) != 1:
            raise UserError("expected one correct text", file=file, line=n,
                            field="text_correct")
        correct = correct[0]
    incorrect = row["text_incorrect"]
    incorrect = [incorrect] if isinstance(incorrect, str) else incorrect
    if not isinstance(correct, str) or not incorrect or not all(
            isinstance(t, str) for t in incorrect):
        raise UserError("expected strings", file=file, line=n, field="text_incorrect")
    return correct, list(incorrect)


def _mc_messages(text: str) -> Conversation:
    """A multiple-choice text as the conversation a PM reads. Not an error when it is no
    transcript (see the module docstring): these files are read as they are."""
    if looks_like_hh(text):
        try:
            msgs = parse_hh_transcript(text)
            if msgs[-1]["role"] == "assistant":
                return msgs
        except ValueError:
            pass
    return [{"role": "user", "content": ""}, {"role": "assistant", "content": text}]
