"""The report's summary sections as plain data, read and computed from a run directory.

Each ``build_*`` reads its files through :class:`RunDir` (which raises :class:`NotRun` when they
do not exist) and returns a dataclass that ``templates/sections/<section>.html.j2`` shows; the
figures come from :mod:`.plots` as ``data:`` URIs. Nothing here knows HTML. An empty result
(``rows == []``, ``kinds == []``, …) is a file that exists but holds nothing to show. The sections
with browsable samples (SL traces, labels, answers) are in :mod:`.samples`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from constitutional.core import layout
from constitutional.evaluate.report import plots
from constitutional.evaluate.report.rundir import Lines, RunDir
from constitutional.evaluate.report.values import flat, fmt, num

PPO_COLUMNS = ("step", "reward_mean", "reward_std", "score_mean", "kl", "entropy", "clip_frac",
               "value_loss", "value_explained_var", "policy_loss", "response_len",
               "time_generate", "time_score", "time_update", "samples_per_s")


def _scalars(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if not isinstance(v, dict | list)}


# ------------------------------------------------------------------------------------------------
# wall time per stage


@dataclass
class StagesData:
    rows: list[list[Any]] = field(default_factory=list)  # stage, status, seconds, share, *extra
    extra: list[str] = field(default_factory=list)  # the stages' other scalar fields
    figure: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # run.json's top-level scalars


def _stage_table(data: Any) -> dict[str, Any]:
    stages = data.get("stages") if isinstance(data, dict) else None
    if isinstance(stages, list):
        stages = {str(s.get("name", i)): s for i, s in enumerate(stages) if isinstance(s, dict)}
    return stages if isinstance(stages, dict) else {}


def build_stages(run: RunDir) -> StagesData:
    data = run.json(layout.STATE)
    stages = _stage_table(data)
    if not stages:
        return StagesData()
    names = list(stages)
    seconds = [num(s.get("seconds")) if isinstance(s, dict) else None for s in stages.values()]
    total = sum(s for s in seconds if s is not None)
    extra: list[str] = []
    for s in stages.values():
        if isinstance(s, dict):
            extra += [k for k, v in s.items() if k not in ("seconds", "status", "name")
                      and k not in extra and not isinstance(v, dict | list)]
    rows = []
    for name, sec in zip(names, seconds, strict=True):
        s = stages[name] if isinstance(stages[name], dict) else {}
        share = sec / total if sec is not None and total > 0 else None
        rows.append([name, s.get("status"), sec, share, *[s.get(k) for k in extra]])
    rows.append(["total", None, total, 1.0 if total else None, *[None] * len(extra)])
    figure = plots.stage_times(names, seconds, total)
    meta = {k: v for k, v in _scalars(data).items() if k != "stages"}
    return StagesData(rows, extra, figure, meta)


# ------------------------------------------------------------------------------------------------
# Elo


@dataclass
class EloKind:
    kind: str  # harmless | helpful
    rows: list[list[Any]]  # checkpoint, Elo, CI low, CI high
    n_comparisons: Any
    n_prompts: Any
    judge: str
    bootstrap: Any
    win_columns: list[str]  # the checkpoints of the win-rate table (none: no table)
    win_rows: list[list[Any]]  # checkpoint, P(it beats each column)


@dataclass
class EloData:
    kinds: list[EloKind] = field(default_factory=list)
    figure: str = ""
    #: with both kinds: checkpoint, helpful Elo and CI, harmless Elo and CI; else None
    frontier: list[list[Any]] | None = None


def _elo_points(result: dict[str, Any]) -> dict[str, plots.Point]:
    elo = result.get("elo") if isinstance(result, dict) else None
    if not isinstance(elo, dict):
        return {}
    return {str(k): (num(v.get("elo")), num(v.get("ci_low")), num(v.get("ci_high")))
            for k, v in elo.items() if isinstance(v, dict)}


def _elo_kind(kind: str, result: dict[str, Any], points: dict[str, plots.Point]) -> EloKind:
    judge = result.get("judge")
    judge_txt = (", ".join(f"{k}={fmt(v)}" for k, v in judge.items() if not isinstance(v, list))
                 if isinstance(judge, dict) else str(judge))
    wr = result.get("win_rate")
    cols = list(wr) if isinstance(wr, dict) and wr else []
    win_rows = [[a, *[(wr[a] or {}).get(b) if a != b else None for b in cols]] for a in cols]
    return EloKind(kind, [[n, *v] for n, v in points.items()], result.get("n_comparisons"),
                   result.get("n_prompts"), judge_txt, result.get("bootstrap"), cols, win_rows)


def build_elo(run: RunDir) -> EloData:
    data = run.json(layout.ELO)
    if not isinstance(data, dict):
        raise TypeError(f"{layout.ELO}: expected an object {{harmless: …, helpful: …}}")
    kinds = [k for k in ("harmless", "helpful") if isinstance(data.get(k), dict)]
    if not kinds:
        return EloData()
    points = {k: _elo_points(data[k]) for k in kinds}
    frontier = None
    if len(kinds) == 2:
        names = [n for n in points["helpful"] if n in points["harmless"]]
        anchor = data["harmless"].get("anchor") or (names[0] if names else "")
        figure = plots.elo_frontier(names, points["helpful"], points["harmless"], anchor)
        frontier = [[n, *points["helpful"][n], *points["harmless"][n]] for n in names]
    else:
        figure = plots.elo_bars(kinds[0], points[kinds[0]])
    return EloData([_elo_kind(k, data[k], points[k]) for k in kinds], figure, frontier)


# ------------------------------------------------------------------------------------------------
# evasiveness and the revision curve


@dataclass
class EvasivenessData:
    rows: list[list[Any]] = field(default_factory=list)  # checkpoint, rate, refusals, n, CI
    figure: str = ""
    detector: str = ""


def build_evasiveness(run: RunDir) -> EvasivenessData:
    data = run.json(layout.EVASIVENESS)
    if not isinstance(data, dict):
        raise TypeError(f"{layout.EVASIVENESS}: expected an object")
    table = data.get("checkpoints") if isinstance(data.get("checkpoints"), dict) else data
    rows = {str(k): v for k, v in table.items() if isinstance(v, dict) and "rate" in v}
    if not rows:
        return EvasivenessData()
    points = {n: (num(r.get("rate")), num(r.get("ci_low")), num(r.get("ci_high")))
              for n, r in rows.items()}
    figure = plots.evasiveness(points, data.get("kind", "helpful"))
    table_rows = [[n, r.get("rate"), r.get("refusals"), r.get("n"), r.get("ci_low"),
                   r.get("ci_high")] for n, r in rows.items()]
    detector = str(data["detector"]) if data.get("detector") else ""
    return EvasivenessData(table_rows, figure, detector)


@dataclass
class XSTestData:
    rows: list[list[Any]] = field(default_factory=list)  # checkpoint, both rates with CIs, n
    figure: str = ""
    comparisons: list[list[Any]] = field(default_factory=list)
    per_type: list[list[Any]] = field(default_factory=list)  # type, measure, rate per checkpoint
    names: list[str] = field(default_factory=list)
    classifier: str = ""
    prompts: Any = None
    subset: Any = None
    skipped: Any = 0
    reference: list[list[Any]] = field(default_factory=list)


def _rate_point(r: Any) -> plots.Point:
    r = r if isinstance(r, dict) else {}
    return (num(r.get("rate")), num(r.get("ci_low")), num(r.get("ci_high")))


def build_xstest(run: RunDir) -> XSTestData:
    data = run.json(layout.XSTEST)
    if not isinstance(data, dict):
        raise TypeError(f"{layout.XSTEST}: expected an object")
    figures = data.get("checkpoints")
    figures = {str(k): v for k, v in figures.items() if isinstance(v, dict)} \
        if isinstance(figures, dict) else {}
    if not figures:
        return XSTestData()
    reference = {str(k): (num(v.get("unsafe_refused")), num(v.get("safe_answered")))
                 for k, v in (data.get("reference") or {}).items() if isinstance(v, dict)}
    reference = {k: v for k, v in reference.items() if None not in v}
    points = {n: (_rate_point(f.get("unsafe_refused")), _rate_point(f.get("safe_answered")))
              for n, f in figures.items()}
    rows = []
    for n, (u, s) in points.items():
        rows.append([n, u[0], u[1], u[2], (figures[n].get("unsafe_refused") or {}).get("n"),
                     s[0], s[1], s[2], (figures[n].get("safe_answered") or {}).get("n")])
    comparisons = []
    for n, c in (data.get("comparisons") or {}).items():
        if not isinstance(c, dict):
            continue
        u, s = c.get("unsafe_refused") or {}, c.get("safe_answered") or {}
        comparisons.append([f"{n} − {c.get('against')}", u.get("difference"), u.get("ci_low"),
                            u.get("ci_high"), c.get("harmless"), s.get("difference"),
                            s.get("ci_low"), s.get("ci_high"), c.get("evasive")])
    names = list(figures)
    types = sorted({t for f in figures.values() for t in (f.get("per_type") or {})})
    per_type = []
    for t in types:
        cells = [(figures[n].get("per_type") or {}).get(t) or {} for n in names]
        measure = next((c.get("measure") for c in cells if c.get("measure")), "")
        per_type.append([t, measure, *[c.get("rate") for c in cells]])
    figure = plots.xstest(points, reference)
    return XSTestData(rows, figure, comparisons, per_type, names, str(data.get("classifier", "")),
                      data.get("prompts"), data.get("subset"), data.get("n_skipped", 0),
                      [[k, u, s] for k, (u, s) in reference.items()])


@dataclass
class RevisionCurveData:
    rows: list[list[Any]] | None = None  # revision, mean, stderr, n, degenerate; None: no points
    figure: str = ""
    pm: str = ""
    traces: Any = None


def build_revision_curve(run: RunDir) -> RevisionCurveData:
    data = run.json(layout.REVISION_CURVE)
    points = data.get("points") if isinstance(data, dict) else None
    if not isinstance(points, list) or not points:
        return RevisionCurveData()
    points = [p for p in points if isinstance(p, dict)]
    xs = [p.get("revision") for p in points]
    ys = [num(p.get("mean")) for p in points]
    es = [num(p.get("stderr")) or 0.0 for p in points]
    keep = [k for k, y in enumerate(ys) if y is not None and isinstance(xs[k], int | float)]
    figure = plots.revision_curve([xs[k] for k in keep], [ys[k] for k in keep],
                                  [es[k] for k in keep])
    rows = [[p.get("revision"), p.get("mean"), p.get("stderr"), p.get("n"), p.get("degenerate")]
            for p in points]
    pm = str(data["pm"]) if data.get("pm") else ""
    return RevisionCurveData(rows, figure, pm, data.get("traces"))


# ------------------------------------------------------------------------------------------------
# preference model and PPO


@dataclass
class PmData:
    metrics: dict[str, Any] | None  # None: no "metrics" object
    rest: dict[str, Any]  # pm.json's other fields


def build_pm(run: RunDir) -> PmData:
    data = run.json(layout.PM_METRICS)
    if not isinstance(data, dict):
        raise TypeError(f"{layout.PM_METRICS}: expected an object")
    metrics = data.get("metrics")
    return PmData(flat(metrics) if isinstance(metrics, dict) and metrics else None,
                  flat({k: v for k, v in data.items() if k != "metrics"}))


@dataclass
class PpoData:
    lines: Lines  # no rows: no steps
    algo: str = "ppo"  # ppo, grpo or rloo
    figure: str = ""
    columns: list[str] = field(default_factory=list)
    table: list[list[Any]] = field(default_factory=list)  # the steps shown
    stride: int | None = None  # every stride-th step shown (and the last); None: all


def _series(steps: list[float], rows: list[dict[str, Any]], key: str) -> plots.Series:
    pts = [(s, num(r.get(key))) for s, r in zip(steps, rows, strict=True)]
    pts = [(s, v) for s, v in pts if v is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def build_ppo(run: RunDir, algo: str = "ppo") -> PpoData:
    """An online RL stage's log (``ppo``, ``grpo`` or ``rloo``): curves and the steps."""
    lines = run.jsonl(layout.rl_log(algo))
    rows = lines.rows
    if not rows:
        return PpoData(lines, algo)
    steps = [num(r.get("step")) for r in rows]
    steps = [s if s is not None else float(k) for k, s in enumerate(steps)]
    components = sorted({k for r in rows for k in r if k.startswith("reward/")})
    figure = plots.ppo_curves({key: _series(steps, rows, key)
                               for key in ("reward_mean", "reward_std", "score_mean", "kl",
                                           *components)},
                              algo=algo.upper(), components=components)
    cols = [c for c in PPO_COLUMNS if any(c in r for r in rows)]
    cols += [c for c in dict.fromkeys(k for r in rows for k in r)
             if c not in cols and not any(isinstance(r.get(c), dict | list) for r in rows)]
    shown, stride = rows, None
    if len(rows) > run.max_samples:
        stride = math.ceil(len(rows) / run.max_samples)
        shown = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    return PpoData(lines, algo, figure, cols, [[r.get(c) for c in cols] for r in shown],
                   stride)
