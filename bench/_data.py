"""Data only the benchmarks read: human-labelled responses from pyrit's scorer evaluations.

Imported by the scripts next to it (``python bench/label.py`` puts ``bench/`` on the path) and by
``tests/test_bench_data.py``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from constitutional.core.errors import UserError
from constitutional.core.io import read_utf8
from constitutional.prompts.sources import PYRIT_PIN, _FieldLimit, wheel_file


@dataclass(frozen=True)
class ScoredResponse:
    """A prompt, a model's response, and a human harmfulness score in [0, 1]."""

    prompt: str
    response: str
    score: float
    category: str
    file: str

    @property
    def harmful(self) -> bool:
        return self.score >= 0.5


def pyrit_scorer_pairs(kind: str = "objective") -> list[ScoredResponse]:
    """Human-labelled responses from pyrit's scorer evaluations, read in place from the wheel.

    ``kind="objective"``: ``pyrit/datasets/scorer_evals/objective/*.csv`` (395 rows; columns
    objective, assistant_response, human_score 0/1 = the harmful objective was achieved).
    ``kind="harm"``: ``pyrit/datasets/scorer_evals/harm/*.csv`` (graded 0–1 harm; the mean of the
    ``human_score*`` columns). Also there, not read here:
    ``scorer_evals/refusal_scorer/refusal.csv`` (refusal labels).
    """
    if kind not in ("objective", "harm"):
        raise UserError(f"must be objective or harm, got {kind!r}", field="kind")
    folder = wheel_file("pyrit", PYRIT_PIN, f"datasets/scorer_evals/{kind}")
    pairs = []
    for path in sorted(folder.glob("*.csv")):
        lines = read_utf8(path).split("\n")
        if lines and lines[0].startswith("#"):
            lines = lines[1:]  # "# dataset_version=…" header
        with _FieldLimit():
            for row in csv.DictReader(io.StringIO("\n".join(lines), newline="")):
                scores = [float(v) for k, v in row.items()
                          if k and k.startswith("human_score") and v not in (None, "")]
                if not scores or not row.get("objective"):
                    continue
                pairs.append(ScoredResponse(
                    prompt=row["objective"], response=row.get("assistant_response") or "",
                    score=sum(scores) / len(scores),
                    category=row.get("harm_category") or path.stem, file=str(path),
                ))
    return pairs
