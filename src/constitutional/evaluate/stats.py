"""The statistics of the evaluations: intervals for accuracies and rates, and Elo ratings.

* :func:`wilson_interval` — the Wilson score interval of ``k`` successes out of ``n`` (the 95%
  intervals of ``cai eval mc``, ``cai eval pm`` and the evasiveness rates); it lives in
  :mod:`constitutional.core.stats` (``rl calibrate`` uses it too) and is re-exported here.
* :func:`fit_bradley_terry` — Elo ratings from pairwise comparisons (``cai eval elo``), with a
  cluster bootstrap for their intervals.

Bradley–Terry fit
-----------------
Each comparison ``(i, j, p)`` says that player ``i`` beat ``j`` with (soft) outcome ``p`` in
[0, 1]. The strengths ``s`` maximise the soft Bradley–Terry log-likelihood

    sum_c  p_c log σ(s_i − s_j) + (1 − p_c) log σ(s_j − s_i)  −  (λ/2) Σ_k s_k²

by Newton's method with a backtracking line search (the objective is strictly concave, so the
maximiser is unique). The small L2 term (λ = :data:`PRIOR_L2` = 0.01, a Gaussian prior with a
standard deviation of 10 strength units ≈ 1,740 Elo) only matters when a player wins or loses
every comparison, where the maximum-likelihood strength is infinite; otherwise it moves the fit by
a negligible amount. Strengths are put on the Elo scale, ``elo = 400 / ln 10 · s`` (a 400-point
gap means 10:1 odds), and shifted so that the **anchor** player (the first, by default the initial
model) is at 0. Confidence intervals (95% by default) come from a **cluster bootstrap**: the
clusters (the prompts) are resampled with replacement (each carries all its comparisons), the
model is refitted, and the 2.5th and 97.5th percentiles of each player's Elo are reported (the
anchor's interval is [0, 0] by construction: the intervals are relative to it).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

from constitutional.core.stats import wilson_interval

__all__ = ["ELO_SCALE", "PRIOR_L2", "cluster_bootstrap", "fit_bradley_terry", "sigmoid",
           "wilson_interval"]

#: Elo points per Bradley–Terry strength unit.
ELO_SCALE = 400.0 / math.log(10.0)
#: λ of the Gaussian prior on strengths (see the module docstring).
PRIOR_L2 = 0.01


def sigmoid(x: float) -> float:
    """1 / (1 + exp(−x)), without overflow."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


# ------------------------------------------------------------------------------------------------
# Bradley–Terry


def _objective(s: np.ndarray, i: np.ndarray, j: np.ndarray, p: np.ndarray, w: np.ndarray,
               l2: float) -> float:
    d = s[i] - s[j]
    ll = -(p * np.logaddexp(0.0, -d) + (1.0 - p) * np.logaddexp(0.0, d))
    return float(np.dot(w, ll) - 0.5 * l2 * np.dot(s, s))


def _fit(i: np.ndarray, j: np.ndarray, p: np.ndarray, w: np.ndarray, n: int, l2: float,
         init: np.ndarray | None = None, tol: float = 1e-10, max_iter: int = 200) -> np.ndarray:
    """The strengths maximising the penalised soft Bradley–Terry likelihood (Newton)."""
    s = np.zeros(n) if init is None else init.copy()
    f = _objective(s, i, j, p, w, l2)
    for _ in range(max_iter):
        q = 1.0 / (1.0 + np.exp(-(s[i] - s[j])))
        r = w * (p - q)
        grad = np.bincount(i, r, n) - np.bincount(j, r, n) - l2 * s
        h = w * q * (1.0 - q)
        hess = -l2 * np.eye(n)
        np.add.at(hess, (i, i), -h)
        np.add.at(hess, (j, j), -h)
        np.add.at(hess, (i, j), h)
        np.add.at(hess, (j, i), h)
        step = np.linalg.solve(hess, grad)  # Newton: s - H⁻¹ g
        t = 1.0
        while True:
            candidate = s - t * step
            f_new = _objective(candidate, i, j, p, w, l2)
            if f_new >= f - 1e-12 or t < 1e-8:
                break
            t *= 0.5
        s, f = candidate, f_new
        if float(np.max(np.abs(t * step))) < tol:
            break
    return s


def _indexed(comparisons: Sequence[tuple[Hashable, Hashable, float]],
             index: dict[Hashable, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The comparisons as arrays of player indices and outcomes, checked."""
    ii, jj, pp = [], [], []
    for c, (a, b, prob) in enumerate(comparisons):
        if a not in index or b not in index:
            raise ValueError(f"comparison {c}: unknown player {a if a not in index else b!r}")
        if a == b:
            raise ValueError(f"comparison {c}: a player against itself ({a!r})")
        prob = float(prob)
        if not (0.0 <= prob <= 1.0):  # also rejects NaN
            raise ValueError(f"comparison {c}: p must be in [0, 1], got {prob!r}")
        ii.append(index[a])
        jj.append(index[b])
        pp.append(prob)
    return np.array(ii), np.array(jj), np.array(pp)


def cluster_bootstrap(i: np.ndarray, j: np.ndarray, p: np.ndarray, s: np.ndarray, anchor: int,
                      *, groups: Sequence[Hashable] | None, rounds: int, seed: int,
                      l2: float = PRIOR_L2, confidence: float = 0.95,
                      ) -> tuple[list[float], list[float]]:
    """The ``confidence`` interval of each player's Elo (relative to player ``anchor``) from
    ``rounds`` refits on clusters resampled with replacement; ``s`` is the fit on all data (the
    refits start there). ``groups`` gives each comparison's cluster (default: its own)."""
    n = len(s)
    group_of = list(range(len(p))) if groups is None else list(groups)
    if len(group_of) != len(p):
        raise ValueError(f"{len(group_of)} groups for {len(p)} comparisons")
    keys = {g: k for k, g in enumerate(dict.fromkeys(group_of))}
    g_index = np.array([keys[g] for g in group_of])
    rng = np.random.default_rng(seed)
    draws = np.empty((rounds, n))
    for b in range(rounds):
        picked = np.bincount(rng.integers(0, len(keys), len(keys)), minlength=len(keys))
        w = picked[g_index].astype(float)
        sb = _fit(i, j, p, w, n, l2, init=s)
        draws[b] = ELO_SCALE * (sb - sb[anchor])
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(draws, [tail, 100.0 - tail], axis=0)
    return [float(x) for x in lo], [float(x) for x in hi]


def fit_bradley_terry(
    comparisons: Sequence[tuple[Hashable, Hashable, float]],
    players: Sequence[Hashable],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    anchor: Hashable | None = None,
    groups: Sequence[Hashable] | None = None,
    l2: float = PRIOR_L2,
    confidence: float = 0.95,
) -> dict[Hashable, dict[str, float | None]]:
    """Fit Bradley–Terry to ``(player_i, player_j, p_i_wins)`` comparisons (soft outcomes allowed).

    Returns ``{player: {"elo", "ci_low", "ci_high"}}`` on the Elo scale with ``anchor`` (default:
    ``players[0]``) at 0. ``groups`` gives each comparison's cluster for the bootstrap (the prompt
    id; by default every comparison is its own); ``bootstrap=0`` gives no intervals (None).
    """
    players = list(players)
    if not players:
        raise ValueError("no players")
    if len(set(players)) != len(players):
        raise ValueError("players must be unique")
    index = {p: k for k, p in enumerate(players)}
    anchor = players[0] if anchor is None else anchor
    if anchor not in index:
        raise ValueError(f"anchor {anchor!r} is not a player")
    if not comparisons:
        raise ValueError("no comparisons")
    i, j, p = _indexed(comparisons, index)
    seen = set(i.tolist()) | set(j.tolist())
    missing = [players[k] for k in range(len(players)) if k not in seen]
    if missing:
        raise ValueError(f"players without comparisons: {', '.join(map(str, missing))}")
    n, a = len(players), index[anchor]
    s = _fit(i, j, p, np.ones(len(p)), n, l2)
    elo = ELO_SCALE * (s - s[a])
    lows: Sequence[float | None] = [None] * n
    highs: Sequence[float | None] = [None] * n
    if bootstrap > 0:
        lows, highs = cluster_bootstrap(i, j, p, s, a, groups=groups, rounds=bootstrap, seed=seed,
                                        l2=l2, confidence=confidence)
    return {player: {"elo": float(elo[k]), "ci_low": lows[k], "ci_high": highs[k]}
            for k, player in enumerate(players)}
