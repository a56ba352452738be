"""The report's sections with browsable samples as plain data: SL traces, soft labels, answers.

As in :mod:`.build`: read and computed here, shown by ``templates/sections/<section>.html.j2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from constitutional.core import layout
from constitutional.evaluate.report import plots
from constitutional.evaluate.report.rundir import Lines, NotRun, RunDir, Shown
from constitutional.evaluate.report.sections import SECTION_FILES
from constitutional.evaluate.report.values import Conversation, conversation, flat, num
from constitutional.evaluate.report.values import summary_line as _summary_line


def _summary_file(run: RunDir, rel: str) -> dict[str, Any] | None:
    """A summary JSON's scalars (None: not an object)."""
    summary = run.json(rel)
    return flat(summary) if isinstance(summary, dict) else None


# ------------------------------------------------------------------------------------------------
# SL-CAI traces


@dataclass
class Round:
    number: Any
    principle: Any
    degenerate: bool
    critique_request: Any  # shown when truthy
    critique: Any  # shown unless None
    revision_request: Any  # shown when truthy
    revision: Any


@dataclass
class Trace:
    summary: str  # the prompt in one line
    principles: str
    degenerate: int  # degenerate rounds
    prompt: Conversation
    initial: Any
    initial_degenerate: bool
    rounds: list[Round]


@dataclass
class SlData:
    summary: dict[str, Any] | None = None  # revise.summary.json (None: none, or not an object)
    lines: Lines | None = None  # the traces file (None: no traces)
    shown: Shown | None = None  # of Trace


def _round(r: dict[str, Any]) -> Round:
    return Round(r.get("round"), r.get("principle"), bool(r.get("degenerate")),
                 r.get("critique_request"), r.get("critique"), r.get("revision_request"),
                 r.get("revision", ""))


def _trace(t: dict[str, Any]) -> Trace:
    rounds = [r for r in t.get("rounds") or [] if isinstance(r, dict)]
    return Trace(_summary_line(t.get("prompt")), ", ".join(str(r.get("principle")) for r in rounds),
                 sum(bool(r.get("degenerate")) for r in rounds), conversation(t.get("prompt")),
                 t.get("initial", ""), bool(t.get("initial_degenerate")),
                 [_round(r) for r in rounds])


def build_sl(run: RunDir) -> SlData:
    data = SlData()
    have_summary = run.exists(layout.SL_SUMMARY)
    if have_summary:
        data.summary = _summary_file(run, layout.SL_SUMMARY)
    if not run.exists(layout.SL_TRACES):
        if not have_summary:
            raise NotRun(layout.SL_TRACES)
        return data
    data.lines = run.jsonl(layout.SL_TRACES)
    shown = run.shown(data.lines.rows)
    shown.items = [_trace(t) for t in shown.items]
    data.shown = shown
    return data


# ------------------------------------------------------------------------------------------------
# RL-CAI soft labels


@dataclass
class Histogram:
    figure: str
    rows: list[list[Any]]  # bin from, to, pairs


@dataclass
class PositionBias:
    pairs: int  # pairs scored in both orders (0: no figure, no table)
    biased: int = 0
    rate: float = 0.0
    figure: str = ""


@dataclass
class LabelSample:
    p_a: float | None
    p_b: float | None
    summary: str
    biased: bool
    prompt: Conversation
    response_a: Any
    response_b: Any
    judgements: list[list[Any]]  # principle, order, P(first), P(A), P(A) clamped
    cot: list[Any]


@dataclass
class LabelsData:
    pairs: Lines | None = None  # rl/pairs.jsonl, if there
    summary: dict[str, Any] | None = None  # label.summary.json, if there and an object
    labels: Lines | None = None  # None: not labelled yet
    histogram: Histogram | None = None  # None: no p_a values
    bias: PositionBias | None = None
    shown: Shown | None = None  # of LabelSample


def _histogram(labels: list[dict[str, Any]]) -> Histogram | None:
    values = [v for v in (num(r.get("p_a")) for r in labels) if v is not None]
    if not values:
        return None
    import numpy as np

    counts, edges = np.histogram(values, bins=20, range=(0.0, 1.0))
    return Histogram(plots.soft_labels(values, edges),
                     [[float(edges[k]), float(edges[k + 1]), int(counts[k])]
                      for k in range(len(counts))])


def _position_bias(labels: list[dict[str, Any]]) -> PositionBias:
    xs, ys, biased = [], [], 0
    for r in labels:
        by: dict[str, list[float]] = {"ab": [], "ba": []}
        for j in r.get("judgements") or []:
            if isinstance(j, dict) and j.get("order") in by and num(j.get("p_A")) is not None:
                by[j["order"]].append(float(j["p_A"]))
        if by["ab"] and by["ba"]:
            x, y = sum(by["ab"]) / len(by["ab"]), sum(by["ba"]) / len(by["ba"])
            xs.append(x)
            ys.append(y)
            biased += (x - 0.5) * (y - 0.5) > 0
    if not xs:
        return PositionBias(0)
    return PositionBias(len(xs), biased, biased / len(xs), plots.position_bias(xs, ys, biased))


def _label_sample(r: dict[str, Any]) -> LabelSample:
    p_a = num(r.get("p_a"))
    judgements = [[j.get("principle"), j.get("order"), j.get("p_A"), j.get("p_response_a"),
                   j.get("p_response_a_clamped")]
                  for j in r.get("judgements") or [] if isinstance(j, dict)]
    return LabelSample(p_a, None if p_a is None else 1 - p_a, _summary_line(r.get("prompt")),
                       bool(r.get("position_biased")), conversation(r.get("prompt")),
                       r.get("response_a", ""), r.get("response_b", ""), judgements,
                       [c for c in r.get("cot") or [] if c])


def build_labels(run: RunDir) -> LabelsData:
    if not any(run.exists(f) for f in SECTION_FILES["labels"]):
        raise NotRun(layout.LABELS)
    data = LabelsData()
    if run.exists(layout.PAIRS):
        data.pairs = run.jsonl(layout.PAIRS)
    if run.exists(layout.LABEL_SUMMARY):
        data.summary = _summary_file(run, layout.LABEL_SUMMARY)
    if not run.exists(layout.LABELS):
        return data
    data.labels = run.jsonl(layout.LABELS)
    labels = data.labels.rows
    data.histogram = _histogram(labels)
    data.bias = _position_bias(labels)
    shown = run.shown(labels)
    shown.items = [_label_sample(r) for r in shown.items]
    data.shown = shown
    return data


# ------------------------------------------------------------------------------------------------
# answers side by side


@dataclass
class Answer:
    checkpoint: str
    text: Any
    refusal: str | None  # the detector's reason, when it is a refusal


@dataclass
class PromptAnswers:
    pid: str
    summary: str
    prompt: Conversation
    answers: list[Answer]  # in checkpoint order


@dataclass
class AnswerKind:
    kind: str
    shown: Shown  # of PromptAnswers


@dataclass
class AnswersData:
    lines: Lines  # no rows: nothing to show
    summary: list[list[Any]]  # kind, checkpoint, answers, refusals, mean length
    kinds: list[AnswerKind]


def _answer_summary(rows: list[dict[str, Any]], kinds: list[str],
                    checkpoints: list[str]) -> list[list[Any]]:
    from constitutional.evaluate.evasive import refusal_reason

    summary = []
    for kind in kinds:
        for c in checkpoints:
            texts = [r.get("answer") for r in rows
                     if str(r.get("kind", "?")) == kind and str(r.get("checkpoint")) == c]
            texts = [t for t in texts if isinstance(t, str)]
            if texts:
                summary.append([kind, c, len(texts), sum(bool(refusal_reason(t)) for t in texts),
                                sum(len(t) for t in texts) / len(texts)])
    return summary


def _answer_kind(run: RunDir, rows: list[dict[str, Any]], kind: str,
                 checkpoints: list[str]) -> AnswerKind:
    prompts: dict[str, dict[str, Any]] = {}
    for r in rows:
        if str(r.get("kind", "?")) != kind:
            continue
        entry = prompts.setdefault(str(r.get("prompt_id")), {"prompt": r.get("prompt"),
                                                             "answers": {}})
        entry["answers"][str(r.get("checkpoint"))] = r.get("answer")
    shown = run.shown(list(prompts.items()))
    shown.items = [PromptAnswers(pid, _summary_line(entry["prompt"]),
                                 conversation(entry["prompt"]),
                                 _answers_of(entry["answers"], checkpoints))
                   for pid, entry in shown.items]
    return AnswerKind(kind, shown)


def _answers_of(answers: dict[str, Any], checkpoints: list[str]) -> list[Answer]:
    """One prompt's answers in checkpoint order, refusals marked by the detector."""
    from constitutional.evaluate.evasive import refusal_reason

    out = []
    for c in checkpoints:
        if c in answers:
            a = answers[c]
            out.append(Answer(c, a, refusal_reason(a) if isinstance(a, str) else None))
    return out


def build_answers(run: RunDir) -> AnswersData:
    lines = run.jsonl(layout.ANSWERS)
    rows = lines.rows
    checkpoints = list(dict.fromkeys(str(r.get("checkpoint")) for r in rows))
    kinds = list(dict.fromkeys(str(r.get("kind", "?")) for r in rows))
    return AnswersData(lines, _answer_summary(rows, kinds, checkpoints),
                       [_answer_kind(run, rows, k, checkpoints) for k in kinds])
