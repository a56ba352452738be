"""``cai eval mc``: the paper's multiple-choice evaluations.

The format (Bai et al. 2022; the paper's 438 HHH comparisons use it) is one JSON object per line::

    {"prompt": "… (A) … (B) …\\n\\nThe answer is:", "corrects": [" (A)"], "incorrects": [" (B)"]}

A row is **correct** when its best correct option's log-likelihood (summed over the option's
tokens, given the prompt) is strictly higher than every incorrect option's. The accuracy is
reported with a 95% Wilson score interval.

* ``chat``: the prompt is sent through the model's chat template. A ``Human:``/``Assistant:``
  transcript becomes those turns; otherwise the text before the final "The answer is:" is the user
  turn and "The answer is:" starts the assistant turn, which the options continue.
* ``debias``: the option blocks ``(A) …``, ``(B) …`` are parsed out of the prompt and their texts
  put in reverse order (for two options: swapped), and the letters of the answer options are
  mapped accordingly; each option's log-likelihood is the mean over the two letterings, so a
  preference for a letter cancels out.
* Rows are batched through ``score``, which computes each context once and reads every option,
  of one token or several, as its continuation; with ``debias`` both letterings go to ``score``
  together, so the conversation they share is computed once.
* A row that cannot be used (bad JSON, a missing or wrong field; with ``debias``, no option
  blocks) is skipped, counted and listed in the summary (``skipped``); only a file with no
  usable row at all is an error.

Label quality
-------------
The summary also reports the figures ``rl label`` reports for AI labels:

* ``mean_abs_p_a_minus_half``: the mean of |p − 0.5|, where p = σ(ℓ_correct − ℓ_incorrect) is
  the two-way normalised probability of the best correct option against the best incorrect one
  (from the log-likelihoods decided on): how far the model leans, 0 for a model that cannot
  tell the options apart;
* with ``debias``, ``position_bias_rate``: the share of rows whose choice (the option, by its
  text, with the highest log-likelihood) **flips** with the lettering — the model followed the
  letters, not the texts — and ``order_agreement``: the share whose choice is the same in both
  letterings (outside exact ties, the two add up to 1). Without ``debias`` both are null.

Per-row results (JSONL): ``id``, ``line``, ``correct``, ``corrects``, ``incorrects``,
``logprobs_corrects``, ``logprobs_incorrects`` (the ones decided on: the mean over letterings with
``debias``) and, with ``debias``, ``original`` and ``swapped`` (each with the prompt's own
log-likelihoods, and ``choice``: the index, in ``corrects`` + ``incorrects``, of the option it
picked), ``choice_flips`` (its choice differs between the letterings).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress

from constitutional.core.errors import UserError
from constitutional.core.io import atomic_write_jsonl, atomic_write_text, jsonl_objects, stable_hash
from constitutional.core.log import err_console
from constitutional.core.messages import parse_hh_transcript
from constitutional.core.settings import CLI_HIDDEN, Field, Settings
from constitutional.core.stats import mean_abs_from_half, share
from constitutional.evaluate.stats import sigmoid, wilson_interval
from constitutional.models import BUILTIN_MODEL, LanguageModel, load_model
from constitutional.models.base import Prompt

log = logging.getLogger(__name__)

ANSWER_PREFIX = "The answer is:"
_MARKER = re.compile(r"(?m)^[ \t]*\(([A-Z])\)[ \t]?")
_OPTION = re.compile(r"^(\s*\()([A-Z])(\)\s*)$")
_BLOCK_END = re.compile(r"\n\s*\n(?=(?:Human|Assistant):)")


@dataclass(frozen=True)
class MCRow:
    """One question: the prompt, and its correct and incorrect option continuations."""

    line: int
    prompt: str
    corrects: list[str]
    incorrects: list[str]

    @property
    def id(self) -> str:
        return stable_hash(self.prompt, self.corrects, self.incorrects)


class MCConfig(Settings):
    """How ``eval mc`` asks the model."""

    positional = ("model",)

    model: str = Field(BUILTIN_MODEL, description="Model spec.",
                       json_schema_extra={"cli": ["--model", "-m"]})
    chat: bool = Field(False, description="Use the model's chat template.",
                       json_schema_extra={"cli": ["--chat"]})
    debias: bool = Field(False, description="Also score with the option letters swapped and "
                                            "average.", json_schema_extra={"cli": ["--debias"]})
    limit: int | None = Field(None, ge=1, description="Only the first N rows.")
    answer_prefix: str = Field(ANSWER_PREFIX, description="The text after the question, before "
                                                          "the options' letters.",
                               json_schema_extra=CLI_HIDDEN)
    chunk_size: int = Field(64, ge=1, description="Rows sent to score() together.")


@dataclass
class MCResult:
    accuracy: float
    correct: int
    n: int
    ci95: tuple[float, float]
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # rows that could not be used
    position_bias_rate: float | None = None  # with debias: rows whose choice flips
    order_agreement: float | None = None  # with debias: rows whose choice is the same
    mean_abs_p_a_minus_half: float | None = None

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "rows"}
        d["ci95"] = list(self.ci95)
        d["n_skipped"] = len(self.skipped)
        # the accuracy of a random pick: 1 / options per row, averaged
        d["chance"] = (sum(1 / (len(r["corrects"]) + len(r["incorrects"])) * len(r["corrects"])
                           for r in self.rows) / len(self.rows)) if self.rows else 0.5
        d["at_chance"] = self.ci95[0] <= d["chance"] <= self.ci95[1]
        return d


# ------------------------------------------------------------------------------------------------
# the file


def _options(value: Any, key: str, where: dict[str, Any]) -> list[str]:
    if not isinstance(value, list) or not value:
        raise UserError("expected a non-empty list of option strings", **where, field=key)
    if not all(isinstance(v, str) and v for v in value):
        raise UserError("every option must be a non-empty string", **where, field=key)
    return list(value)


@dataclass(frozen=True)
class Skipped:
    """A row that could not be used: its line, the field at fault and why."""

    line: int
    field: str | None
    reason: str

    def warning(self, file: str | Path) -> str:
        """One line: ``FILE:LINE: field 'F': reason (row skipped)``."""
        return f"{UserError(self.reason, file=file, line=self.line, field=self.field)} " \
            "(row skipped)"


def _parse_row(data: dict[str, Any], number: int, where: dict[str, Any]) -> MCRow:
    if not isinstance(data["prompt"], str) or not data["prompt"].strip():
        raise UserError("expected a non-empty string", **where, field="prompt")
    return MCRow(number, data["prompt"], _options(data["corrects"], "corrects", where),
                 _options(data["incorrects"], "incorrects", where))


def load_mc_rows(path: str | Path, limit: int | None = None,
                 ) -> tuple[list[MCRow], list[Skipped]]:
    """Read a multiple-choice file: the usable rows, and the rows skipped with their reasons.

    A row that cannot be used is skipped and counted, never fatal; a file that is wrong as a
    whole (missing, not UTF-8, no usable row) raises one :class:`UserError` naming the file,
    line and field."""
    path = Path(path).expanduser()
    if limit is not None and limit < 1:
        raise UserError(f"must be at least 1, got {limit}", field="limit")
    rows: list[MCRow] = []
    errors: list[UserError] = []  # every unusable row, in line order
    for number, data in jsonl_objects(path, required=("prompt", "corrects", "incorrects"),
                                      skipped=errors):
        try:
            rows.append(_parse_row(data, number, {"file": path, "line": number}))
        except UserError as err:
            errors.append(err)
        if limit is not None and len(rows) >= limit:
            break
    skipped = [Skipped(err.line or 0, err.field, err.message) for err in errors]
    if not rows:
        if errors:
            first = errors[0]
            raise UserError(f"{first.message} (no usable row: {len(skipped)} skipped)",
                            file=path, line=first.line, field=first.field)
        raise UserError("no rows", file=path, line=1)
    for s in skipped:
        log.warning("%s", s.warning(path))
    return rows, skipped


def load_mc(path: str | Path, limit: int | None = None) -> list[MCRow]:
    """The usable rows of a multiple-choice file (see :func:`load_mc_rows`)."""
    return load_mc_rows(path, limit)[0]


# ------------------------------------------------------------------------------------------------
# prompts


def chat_context(prompt: str, answer_prefix: str = ANSWER_PREFIX) -> Prompt:
    """The prompt as a conversation (see the module docstring)."""
    if prompt.lstrip().startswith("Human:"):
        try:
            messages = parse_hh_transcript(prompt)
        except ValueError:
            messages = []
        if messages:
            if messages[-1]["role"] == "user" and messages[-1]["content"].endswith(answer_prefix):
                body = messages[-1]["content"][: -len(answer_prefix)].rstrip()
                messages[-1]["content"] = body
                messages.append({"role": "assistant", "content": answer_prefix})
            return messages
    body = prompt.rstrip()
    if body.endswith(answer_prefix):
        return [{"role": "user", "content": body[: -len(answer_prefix)].strip()},
                {"role": "assistant", "content": answer_prefix}]
    return [{"role": "user", "content": body.strip()}]


def option_spans(prompt: str, answer_prefix: str = ANSWER_PREFIX) -> list[tuple[str, int, int]]:
    """``(letter, start, end)`` of each option block's text: markers ``(A)``, ``(B)`` … at the
    start of a line, in order from A. The last block ends at a blank line before a
    ``Human:``/``Assistant:`` turn, at the line holding the final answer prefix, or at the end."""
    markers = list(_MARKER.finditer(prompt))
    # take the last run of markers A, B, C … (a conversation above may use letters too)
    run: list[re.Match[str]] = []
    for m in markers:
        if m.group(1) == "A":
            run = [m]
        elif run and ord(m.group(1)) == ord(run[-1].group(1)) + 1:
            run.append(m)
    if len(run) < 2:
        return []
    tail_start = run[-1].end()
    ends = [len(prompt)]
    cut = prompt.rfind(answer_prefix)
    if cut >= tail_start:
        ends.append(prompt.rfind("\n", tail_start, cut) if "\n" in prompt[tail_start:cut]
                    else cut)
    turn = _BLOCK_END.search(prompt, tail_start)
    if turn:
        ends.append(turn.start())
    bounds = [m.start() for m in run[1:]] + [min(ends)]
    spans = []
    for m, end in zip(run, bounds, strict=True):
        start = m.end()
        while end > start and prompt[end - 1].isspace():
            end -= 1
        spans.append((m.group(1), start, end))
    return spans


def swapped_row(row: MCRow, answer_prefix: str = ANSWER_PREFIX) -> tuple[MCRow, dict[str, str]]:
    """``row`` with its option texts in reverse order and the answer letters mapped to match.

    Returns the new row and the letter mapping (old letter → new letter)."""
    spans = option_spans(row.prompt, answer_prefix)
    where = {"file": None, "line": row.line}
    if not spans:
        raise UserError("--debias needs option blocks '(A) …', '(B) …' at line starts in the "
                        "prompt", line=row.line, field="prompt")
    letters = [letter for letter, _, _ in spans]
    mapping = dict(zip(letters, reversed(letters), strict=True))
    texts = {letter: row.prompt[s:e] for letter, s, e in spans}
    prompt = row.prompt
    for letter, s, e in reversed(spans):  # the text now at `letter` is the one mapped to it
        source = next(old for old, new in mapping.items() if new == letter)
        prompt = prompt[:s] + texts[source] + prompt[e:]

    def remap(options: list[str], key: str) -> list[str]:
        out = []
        for option in options:
            m = _OPTION.match(option)
            if not m or m.group(2) not in mapping:
                raise UserError(f"--debias needs options like ' (A)' naming one of the prompt's "
                                f"options {', '.join(letters)}, got {option!r}", **where,
                                field=key)
            out.append(m.group(1) + mapping[m.group(2)] + m.group(3))
        return out

    return MCRow(row.line, prompt, remap(row.corrects, "corrects"),
                 remap(row.incorrects, "incorrects")), mapping


# ------------------------------------------------------------------------------------------------
# scoring


def is_correct(logprobs_corrects: Sequence[float], logprobs_incorrects: Sequence[float]) -> bool:
    return max(logprobs_corrects) > max(logprobs_incorrects)


def choice(logprobs: Sequence[float]) -> int:
    """The index of the option with the highest log-likelihood (the first of equals)."""
    return max(range(len(logprobs)), key=lambda k: (logprobs[k], -k))


def p_correct(logprobs_corrects: Sequence[float], logprobs_incorrects: Sequence[float]) -> float:
    """σ(best correct − best incorrect): the two-way normalised probability of the right
    answer (see "Label quality" in the module docstring)."""
    return sigmoid(max(logprobs_corrects) - max(logprobs_incorrects))


def _contexts(rows: Sequence[MCRow], config: MCConfig) -> list[Prompt]:
    return [chat_context(r.prompt, config.answer_prefix) if config.chat else r.prompt
            for r in rows]


def _score_rows(lm: LanguageModel, rows: Sequence[MCRow], swapped: Sequence[MCRow],
                config: MCConfig, advance: Any) -> tuple[list[list[float]], list[list[float]]]:
    """Scores of ``rows`` and, with ``--debias``, of their swapped letterings. Both letterings
    of a chunk go to ``score`` together, so the backend computes the text they share (the
    conversation before the options) once."""
    out: list[list[float]] = []
    out_swapped: list[list[float]] = []
    for start in range(0, len(rows), config.chunk_size):
        part = list(rows[start : start + config.chunk_size])
        twins = list(swapped[start : start + config.chunk_size])
        scores = lm.score(_contexts(part + twins, config),
                          [[*r.corrects, *r.incorrects] for r in part + twins])
        out += scores[: len(part)]
        out_swapped += scores[len(part) :]
        advance(len(part) + len(twins))
    return out, out_swapped


def evaluate_mc(rows: Sequence[MCRow], config: MCConfig, *,
                model: LanguageModel | None = None) -> MCResult:
    """Score every row; return the accuracy, its 95% interval and per-row results."""
    if not rows:
        raise UserError("no rows to evaluate")
    rows = list(rows[: config.limit] if config.limit else rows)
    swaps = [swapped_row(r, config.answer_prefix) for r in rows] if config.debias else []
    lm = model or load_model(config.model)
    t0 = time.perf_counter()
    before = lm.stats.to_dict()
    total = len(rows) * (2 if config.debias else 1)
    bar = Progress(console=err_console, transient=True, disable=not err_console.is_terminal)
    with bar:
        task = bar.add_task("multiple choice", total=total)

        def advance(n: int) -> None:
            bar.advance(task, n)

        scores, swapped_scores = _score_rows(lm, rows, [s for s, _ in swaps], config, advance)
    results = []
    for i, row in enumerate(rows):
        nc = len(row.corrects)
        lc, li = scores[i][:nc], scores[i][nc:]
        result: dict[str, Any] = {"id": row.id, "line": row.line, "corrects": row.corrects,
                                  "incorrects": row.incorrects}
        if swaps:
            swapped, mapping = swaps[i]
            sc, si = swapped_scores[i][:nc], swapped_scores[i][nc:]
            result["original"] = {"logprobs_corrects": lc, "logprobs_incorrects": li,
                                  "choice": choice([*lc, *li])}
            result["swapped"] = {"prompt": swapped.prompt, "mapping": mapping,
                                 "logprobs_corrects": sc, "logprobs_incorrects": si,
                                 "choice": choice([*sc, *si])}
            result["choice_flips"] = result["original"]["choice"] != result["swapped"]["choice"]
            lc = [(x + y) / 2 for x, y in zip(lc, sc, strict=True)]
            li = [(x + y) / 2 for x, y in zip(li, si, strict=True)]
        result.update(logprobs_corrects=lc, logprobs_incorrects=li, correct=is_correct(lc, li))
        results.append(result)
    correct = sum(r["correct"] for r in results)
    stats = {k: v - before[k] for k, v in lm.stats.to_dict().items()
             if isinstance(v, int | float) and isinstance(before.get(k), int | float)}
    if model is None:
        lm.close()
    flips = [r["choice_flips"] for r in results] if swaps else []
    return MCResult(accuracy=correct / len(results), correct=correct, n=len(results),
                    ci95=wilson_interval(correct, len(results)), rows=results,
                    seconds=time.perf_counter() - t0, stats=stats,
                    config=config.model_dump(), position_bias_rate=share(flips),
                    order_agreement=share(not f for f in flips),
                    mean_abs_p_a_minus_half=mean_abs_from_half(
                        p_correct(r["logprobs_corrects"], r["logprobs_incorrects"])
                        for r in results))


def run_mc(data: str | Path, config: MCConfig, out: str | Path, *,
           model: LanguageModel | None = None) -> MCResult:
    """Load ``data``, evaluate, write per-row results to ``out`` and a summary beside it.

    Rows that cannot be used (bad JSON or fields; with ``--debias``, no option blocks to swap)
    are skipped, counted in ``result.skipped`` and listed in the summary."""
    rows, skipped = load_mc_rows(data, config.limit)
    if config.debias:
        usable, unswappable = [], []
        for row in rows:
            try:
                swapped_row(row, config.answer_prefix)
                usable.append(row)
            except UserError as err:
                unswappable.append(Skipped(row.line, err.field, err.message))
        if not usable:
            first = unswappable[0]
            raise UserError(f"{first.reason} (no usable row: "
                            f"{len(skipped) + len(unswappable)} skipped)",
                            file=data, line=first.line, field=first.field)
        for skip in unswappable:
            log.warning("%s", skip.warning(data))
        rows, skipped = usable, skipped + unswappable
    result = evaluate_mc(rows, config, model=model)
    result.skipped = [asdict(s) for s in sorted(skipped, key=lambda s: s.line)]
    out = Path(out)
    atomic_write_jsonl(out, result.rows)
    summary = {**result.summary(), "data": str(data), "results": str(out)}
    atomic_write_text(summary_path(out), json.dumps(summary, indent=2) + "\n")
    return result


def summary_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".summary.json")
