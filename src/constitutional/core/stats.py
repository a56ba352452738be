"""The small statistics every layer reports: an interval for a rate, and whether a figure is
distinguishable from chance.

* :func:`wilson_interval` — the Wilson score interval of ``k`` successes out of ``n`` (the 95%
  intervals of ``cai eval mc``, ``cai eval pm``, ``cai rl calibrate`` and the evasiveness rates;
  :mod:`constitutional.evaluate.stats` re-exports it).
* :func:`paired_difference_interval` — Newcombe's interval for the difference of two rates
  measured on the same items (XSTest: a checkpoint against the initial model, prompt by prompt).
* :func:`chance_verdict` — "above chance", "at chance" (the interval contains chance) or "below
  chance", the words the CLI, the quality gates and the report's verdict use.
* :func:`share` and :func:`mean_abs_from_half` — the label-quality figures of ``rl label``,
  ``rl calibrate`` and ``eval mc --debias``: the share of items with a property (position-biased,
  both orders agreeing), and the mean distance of soft labels from 0.5.
* :func:`critic_explained_variance` — PPO's critic over the end of a run: the mean of the last
  steps' explained variance, which the PPO log's warning and the report's verdict both judge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

#: The position-bias rate at or above which AI labels are said to carry no signal (the default of
#: ``gates.max_position_bias``, and the report's verdict when a run has no gates entry).
NO_SIGNAL_POSITION_BIAS = 0.9


def wilson_interval(k: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for ``k`` successes out of ``n`` (95% by default). ``k`` may be
    fractional (a tie counted as half a success)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference_interval(both: int, first_only: int, second_only: int, neither: int,
                               z: float = 1.959964) -> tuple[float, float, float]:
    """(difference, low, high): the second rate minus the first, over items measured twice, with
    Newcombe's hybrid score interval for paired proportions (Newcombe 1998, *Statistics in
    Medicine* 17, method 10), built from the two Wilson intervals and the correlation of the two
    measurements. ``both``/``neither``: items where both / neither measurement was a success;
    ``first_only``/``second_only``: the discordant ones."""
    n = both + first_only + second_only + neither
    if n == 0:
        return (0.0, -1.0, 1.0)
    p1, p2 = (both + first_only) / n, (both + second_only) / n
    l1, u1 = wilson_interval(both + first_only, n, z)
    l2, u2 = wilson_interval(both + second_only, n, z)
    # the phi coefficient of the 2x2 table, with Newcombe's continuity correction when positive
    rows = (both + first_only) * (second_only + neither)
    cols = (both + second_only) * (first_only + neither)
    cross = both * neither - first_only * second_only
    if rows == 0 or cols == 0:
        phi = 0.0
    else:
        phi = (max(cross - n / 2, 0.0) if cross > 0 else cross) / math.sqrt(rows * cols)
    d = p2 - p1
    low = d - math.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2,
                            0.0))
    high = d + math.sqrt(max((u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2,
                             0.0))
    return (d, max(-1.0, low), min(1.0, high))


def chance_verdict(interval: Iterable[float | None], chance: float = 0.5) -> str:
    """``"above chance"`` when the whole interval is above ``chance``, ``"below chance"`` when it
    is below, else ``"at chance"`` (the interval contains it: no measurable signal)."""
    lo, hi = interval
    if lo is not None and lo > chance:
        return "above chance"
    if hi is not None and hi < chance:
        return "below chance"
    return "at chance"


def share(flags: Iterable[bool | None]) -> float | None:
    """The share of ``True`` among the flags that are not ``None`` (None when there are none)."""
    known = [bool(f) for f in flags if f is not None]
    return sum(known) / len(known) if known else None


def mean_abs_from_half(probabilities: Iterable[float]) -> float | None:
    """The mean of ``|p − 0.5|``: 0 for labels that never lean, 0.5 for certain ones."""
    ps = [abs(float(p) - 0.5) for p in probabilities]
    return sum(ps) / len(ps) if ps else None


#: Steps at the end of a PPO run over which the critic's explained variance is averaged.
CRITIC_LAST_STEPS = 5


def critic_explained_variance(values: Iterable[float | None],
                              last: int = CRITIC_LAST_STEPS) -> tuple[float, int] | None:
    """The mean of the last ``last`` known per-step explained variances and how many there were
    (None when none is known); at or below 0 the critic is no better than a constant."""
    known = [float(v) for v in values if v is not None]
    tail = known[-last:]
    return (sum(tail) / len(tail), len(tail)) if tail else None
