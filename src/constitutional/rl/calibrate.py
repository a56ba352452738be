"""``cai rl calibrate``: does the feedback model agree with people?

The AI labels of ``rl label`` are only as good as the feedback model that gives them, and nothing
in the labels themselves says whether it reads the answers at all. Calibration asks the feedback
model **the exact labelling question** — the same :class:`~constitutional.rl.label.Labeller`
(hence :class:`~constitutional.rl.feedback.FeedbackScorer`), principles, demonstrations, orders,
prompt format, chain of thought and clamping as ``rl label`` with the same settings — about
comparisons that people have labelled, and counts how often it prefers the response they chose.

* **Data** (:func:`constitutional.rl.preference.load_comparisons`, as ``rl pm --human-prefs``
  reads it): HH-RLHF rows (``chosen``/``rejected`` holding whole ``Human:``/``Assistant:``
  transcripts; in the harmless-base split, chosen = the less harmful answer) or any
  ``prompt``/``chosen``/``rejected`` JSONL. A row that cannot be used (bad JSON, a missing
  field, transcripts that branch before their final answers, so that there is no one question
  to ask) is skipped, counted and listed in the summary; only a file without a usable row is an
  error. ``limit`` keeps the first N usable rows, or with ``sample`` a seeded sample of N.
* **Sides**: which of the two responses is response_a (option (A) in the first order) is a
  seeded coin per row, so that a labeller that always picks one position scores 50%, not 100% or
  0%, even with ``--one-order``.
* **Accuracy**: the share of rows whose soft label prefers the human-chosen response
  (P(chosen) > 0.5); a row scored exactly 0.5 counts as half (a tie). Its 95% **Wilson
  interval** (:func:`constitutional.core.stats.wilson_interval`) says whether the feedback model
  is distinguishable from a coin flip: an interval containing 0.5 is **at chance**.
* **Label quality**: the position-bias rate, the order agreement and the mean |p_a − 0.5| of
  these labels, as ``rl label`` reports them (:func:`constitutional.rl.label.label_quality`).

Files in ``out``: ``calibrate.config.json`` (pinned settings), ``calibrate.records.jsonl`` (rows
labelled so far; a re-run resumes, and a larger ``limit`` adds rows), ``calibrate.jsonl`` (the
rows of this call, in data order: a label record plus ``chosen`` "a" or "b", ``p_chosen`` and
``correct``) and ``calibrate.summary.json``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constitutional.core.errors import UserError
from constitutional.core.io import (
    JsonlStore,
    RunDir,
    atomic_write_jsonl,
    atomic_write_text,
    stable_hash,
)
from constitutional.core.progress import chunks, progress
from constitutional.core.settings import Field
from constitutional.core.stats import chance_verdict, wilson_interval
from constitutional.models import LanguageModel, load_model
from constitutional.rl.label import LabelConfig, Labeller, label_quality, resolve_constitution
from constitutional.rl.preference import Comparison, load_comparisons

log = logging.getLogger(__name__)

STAGE = "calibrate"
RECORDS = "calibrate.records.jsonl"
ROWS = "calibrate.jsonl"
SUMMARY = "calibrate.summary.json"
CHANCE = 0.5


class CalibrateConfig(LabelConfig):
    """Settings of ``rl calibrate``: the labelling settings of ``rl label``, and the data."""

    data: str = Field(description="Human-labelled comparisons: HH-RLHF rows (chosen/rejected "
                                  "transcripts) or prompt/chosen/rejected JSONL.")
    limit: int | None = Field(None, ge=1, description="Only N usable rows: the first N (or a "
                                                      "seeded sample of N with --sample).")
    sample: bool = Field(False, description="With --limit: a seeded random sample of the rows "
                                            "instead of the first ones.")

    def pinned(self, constitution: Any) -> dict[str, Any]:
        """As ``rl label`` pins it; the data and how many rows are taken only choose the rows
        (records are keyed by their content), so a re-run may change them."""
        d = super().pinned(constitution)
        for key in ("data", "limit", "sample"):
            d.pop(key)
        return d


@dataclass
class CalibrationResult:
    out: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    labelled: int = 0  # labelled in this call (the rest were already done)

    @property
    def accuracy(self) -> float:
        return self.summary["accuracy"]

    @property
    def ci95(self) -> tuple[float, float]:
        lo, hi = self.summary["ci95"]
        return lo, hi


# ------------------------------------------------------------------------------------------------
# the data


def load_calibration(config: CalibrateConfig) -> tuple[list[Comparison], list[UserError], int]:
    """The rows to ask about, the rows skipped (with their reasons) and how many were usable."""
    skipped: list[UserError] = []
    rows = load_comparisons(config.data, source="human", hard=True, skipped=skipped)
    usable = len(rows)
    if config.limit is not None and config.limit < usable:
        if config.sample:
            rng = random.Random(stable_hash("calibrate-sample", config.seed))
            keep = sorted(rng.sample(range(usable), config.limit))
            rows = [rows[k] for k in keep]
        else:
            rows = rows[: config.limit]
    return rows, skipped, usable


def chosen_side(comparison_id: str, seed: int) -> str:
    """``"a"`` or ``"b"``: where the human-chosen response goes (a seeded coin per row)."""
    return "a" if int(stable_hash("calibrate-side", seed, comparison_id), 16) % 2 == 0 else "b"


def as_pair(c: Comparison, seed: int) -> tuple[dict[str, Any], str]:
    side = chosen_side(c.id, seed)
    a, b = (c.chosen, c.rejected) if side == "a" else (c.rejected, c.chosen)
    pair = {"id": stable_hash("calibrate", c.id, c.prompt, c.chosen, c.rejected),
            "prompt": c.prompt, "response_a": a, "response_b": b}
    return pair, side


# ------------------------------------------------------------------------------------------------
# the figures


def calibration_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (ties as half), its Wilson interval and verdict, and the label-quality figures."""
    n = len(rows)
    wins = sum(r["p_chosen"] > 0.5 for r in rows)
    ties = sum(r["p_chosen"] == 0.5 for r in rows)
    k = wins + ties / 2
    ci = wilson_interval(k, n)
    verdict = chance_verdict(ci, CHANCE)
    return {"n": n, "correct": wins, "ties": ties, "accuracy": k / n if n else 0.0,
            "ci95": list(ci), "chance": CHANCE, "verdict": verdict,
            "at_chance": verdict == "at chance", **label_quality(rows)}


def _row(record: dict[str, Any], side: str) -> dict[str, Any]:
    p_chosen = record["p_a"] if side == "a" else 1.0 - record["p_a"]
    return {**record, "chosen": side, "p_chosen": p_chosen, "correct": p_chosen > 0.5}


# ------------------------------------------------------------------------------------------------
# the command


def calibrate(config: CalibrateConfig, out: str | Path, *,
              model: LanguageModel | None = None) -> CalibrationResult:
    """Ask the feedback model the labelling question about human-labelled comparisons; write
    the rows and the summary to ``out`` (resumable)."""
    constitution = resolve_constitution(config)
    comparisons, skipped, usable = load_calibration(config)
    run = RunDir(out)
    pinned = config.pinned(constitution)
    run.pin_config(STAGE, pinned)
    store = JsonlStore(run / RECORDS)
    todo: list[tuple[str, dict[str, Any], str]] = []
    for c in comparisons:
        pair, side = as_pair(c, config.seed)
        todo.append((stable_hash("rl-calibrate", pair["id"], pinned), pair, side))
    pending = list({rid: (rid, pair) for rid, pair, _ in todo if rid not in store}.values())
    t0 = time.perf_counter()
    stats: dict[str, Any] = {}
    if pending:
        log.info("rl calibrate: %d of %d human comparisons to label (%d done) with %s",
                 len(pending), len(todo), len(todo) - len(pending), config.feedback_model)
        lm = model or load_model(config.feedback_model)
        before = lm.stats.to_dict()
        labeller = Labeller(lm, constitution, config)
        with progress("calibrating", len(pending)) as advance:
            for chunk in chunks(pending, config.chunk_size):
                store.append(labeller.label_chunk(chunk))
                advance(len(chunk))
        stats = {k: v - before[k] for k, v in lm.stats.to_dict().items()
                 if isinstance(v, int | float) and isinstance(before.get(k), int | float)}
        if model is None:
            lm.close()
    rows = [_row(store.get(rid) or {}, side) for rid, _, side in todo if rid in store]
    summary = {
        "data": str(config.data), "feedback_model": config.feedback_model,
        **calibration_summary(rows),
        "accuracy_definition": "share of rows whose soft label prefers the human-chosen "
                               "response (P(chosen) > 0.5; exactly 0.5 counts as half)",
        "n_usable": usable, "limit": config.limit, "sample": config.sample,
        "n_skipped": len(skipped),
        "skipped": [{"line": e.line, "field": e.field, "reason": e.message} for e in skipped],
        "settings": pinned, "seconds_this_call": time.perf_counter() - t0,
        "model_stats_this_call": stats,
    }
    atomic_write_jsonl(run / ROWS, rows)
    atomic_write_text(run / SUMMARY, json.dumps(summary, indent=2, default=str) + "\n")
    for err in skipped[:20]:
        log.warning("%s (row skipped)", err)
    if len(skipped) > 20:
        log.warning("… and %d more rows skipped (all are listed in %s)", len(skipped) - 20,
                    run / SUMMARY)
    return CalibrationResult(run.path, summary, rows, len(pending))
