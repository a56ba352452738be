"""The data the benchmarks read (bench/_data.py): pyrit's human-labelled responses."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _data import pyrit_scorer_pairs  # bench/ is not a package: on the path above


def test_pyrit_scorer_pairs() -> None:
    pairs = pyrit_scorer_pairs()
    assert len(pairs) == 395
    assert Counter(p.harmful for p in pairs)[True] > 100
    assert Counter(p.harmful for p in pairs)[False] > 100
    assert all(p.prompt and p.response for p in pairs)
    graded = pyrit_scorer_pairs("harm")
    assert {p.score for p in graded} > {0.0, 1.0}
