"""The report's figures: matplotlib PNGs returned as ``data:`` URIs, so the page loads nothing.

matplotlib's object API (no pyplot, no global backend state); each figure is drawn under the
report's font size. The functions take plain data (``build.py`` computes it) and return the URI.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable, Sequence
from typing import Any

#: A value and its confidence interval (low, high); any of them may be missing.
Point = tuple[float | None, float | None, float | None]
#: A curve: its x and y values.
Series = tuple[list[float], list[float]]


def _figure(width: float = 7.0, height: float = 4.2) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(draw: Callable[..., Any]) -> Callable[..., str]:
    """``draw(...)`` returns a figure; the wrapped function returns it as a PNG ``data:`` URI."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> str:
        import matplotlib

        with matplotlib.rc_context({"font.size": 9}):
            fig = draw(*args, **kwargs)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    return wrapper


def _err(value: float | None, lo: float | None, hi: float | None) -> tuple[float, float]:
    if value is None or lo is None or hi is None:
        return (0.0, 0.0)
    return (max(value - lo, 0.0), max(hi - value, 0.0))


def _errors(points: Sequence[Point]) -> list[tuple[float, ...]] | None:
    """matplotlib's asymmetric error bars (a row of lower and a row of upper lengths)."""
    return list(zip(*[_err(*p) for p in points], strict=True)) or None


@_png
def stage_times(names: list[str], seconds: list[float | None], total: float) -> Any:
    fig = _figure(7.0, 0.45 * len(names) + 1.2)
    ax = fig.subplots()
    ax.barh(names[::-1], [s or 0.0 for s in seconds][::-1], color="#4c72b0")
    ax.set_xlabel("wall time (s)")
    ax.set_title(f"wall time per stage (total {total:.1f} s)")
    return fig


@_png
def elo_frontier(names: list[str], helpful: dict[str, Point], harmless: dict[str, Point],
                 anchor: Any) -> Any:
    fig = _figure(6.8, 5.0)
    ax = fig.subplots()
    xs = [helpful[n][0] or 0.0 for n in names]
    ys = [harmless[n][0] or 0.0 for n in names]
    xerr = _errors([helpful[n] for n in names])
    yerr = _errors([harmless[n] for n in names])
    ax.plot(xs, ys, "-", color="#9aa5b8", zorder=1)
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o", color="#c44e52", ecolor="#4c72b0",
                capsize=4, zorder=2)
    for n, x, y in zip(names, xs, ys, strict=True):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.axhline(0, color="#dddddd", lw=0.8, zorder=0)
    ax.axvline(0, color="#dddddd", lw=0.8, zorder=0)
    ax.set_xlabel("helpfulness Elo")
    ax.set_ylabel("harmlessness Elo")
    ax.set_title(f"Elo frontier (anchor {anchor} = 0; 95% CIs)")
    return fig


@_png
def elo_bars(kind: str, points: dict[str, Point]) -> Any:
    names = list(points)
    fig = _figure(6.5, 4.0)
    ax = fig.subplots()
    vals = [points[n][0] or 0.0 for n in names]
    ax.bar(names, vals, yerr=_errors(list(points.values())), capsize=4, color="#4c72b0")
    ax.set_ylabel(f"{kind} Elo")
    ax.set_title(f"{kind} Elo (95% CIs)")
    return fig


@_png
def evasiveness(points: dict[str, Point], kind: Any) -> Any:
    names = list(points)
    rates = [p[0] for p in points.values()]
    err = _errors(list(points.values()))
    fig = _figure(6.5, 0.5 * len(names) + 1.6)
    ax = fig.subplots()
    ax.barh(names[::-1], [r or 0.0 for r in rates][::-1],
            xerr=[e[::-1] for e in err] if err else None, capsize=4, color="#dd8452")
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of benign prompts refused")
    ax.set_title(f"evasiveness ({kind} prompts; 95% Wilson CIs)")
    return fig


@_png
def revision_curve(xs: list[float], ys: list[float], stderrs: list[float]) -> Any:
    fig = _figure(6.5, 4.0)
    ax = fig.subplots()
    ax.errorbar(xs, ys, yerr=stderrs, fmt="o-", capsize=4, color="#55a868")
    ax.set_xlabel("number of revisions (0 = initial answer)")
    ax.set_ylabel("harmlessness PM score")
    ax.set_xticks(xs)
    ax.set_title("PM score against revision number (mean ± s.e.)")
    return fig


@_png
def soft_labels(values: list[float], edges: Sequence[float]) -> Any:
    fig = _figure(6.5, 3.8)
    ax = fig.subplots()
    ax.hist(values, bins=edges, color="#8172b3", edgecolor="white")
    ax.axvline(0.5, color="#444444", lw=1, ls="--")
    ax.set_xlabel("p_a = P(response A preferred)")
    ax.set_ylabel("pairs")
    ax.set_title(f"soft labels ({len(values)} pairs, mean {sum(values) / len(values):.3f})")
    return fig


@_png
def position_bias(xs: list[float], ys: list[float], biased: int) -> Any:
    fig = _figure(5.6, 5.0)
    ax = fig.subplots()
    ax.fill_between([0.5, 1.0], 0.5, 1.0, color="#f2c4c4", alpha=0.6, lw=0)
    ax.fill_between([0.0, 0.5], 0.0, 0.5, color="#f2c4c4", alpha=0.6, lw=0)
    ax.scatter(xs, ys, s=18, color="#4c72b0", alpha=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("P(A) in the original order")
    ax.set_ylabel("P(A) with the responses swapped")
    ax.set_title(f"position-bias rate {biased / len(xs):.1%} ({biased} of {len(xs)} pairs)")
    return fig


@_png
def ppo_curves(series: dict[str, Series], algo: str = "PPO",
               components: Sequence[str] = ()) -> Any:
    """Reward (± std) and PM score (PPO) or the reward's components (GRPO, RLOO) on the left,
    KL on the right; ``series`` by log column."""
    fig = _figure(10.0, 3.8)
    ax1, ax2 = fig.subplots(1, 2)
    x, y = series["reward_mean"]
    if x:
        ax1.plot(x, y, "-o", ms=3, color="#4c72b0", label="reward (mean)")
        sx, sd = series["reward_std"]
        if sx == x:
            ax1.fill_between(x, [a - b for a, b in zip(y, sd, strict=True)],
                             [a + b for a, b in zip(y, sd, strict=True)], color="#4c72b0",
                             alpha=0.15, lw=0, label="± std")
    x2, y2 = series["score_mean"]
    if x2:
        ax1.plot(x2, y2, "-", color="#55a868", label="PM score (mean)")
    for name in components if len(components) > 1 else ():
        xc, yc = series[name]
        if xc:
            ax1.plot(xc, yc, "--", lw=1, label=f"{name} (mean)")
            x2 = x2 or xc
    ax1.set_xlabel(f"{algo} step")
    ax1.set_ylabel("reward")
    ax1.set_title("reward")
    if x or x2:
        ax1.legend(fontsize=8)
    xk, yk = series["kl"]
    ax2.plot(xk, yk, "-o", ms=3, color="#c44e52")
    ax2.set_xlabel(f"{algo} step")
    ax2.set_ylabel("KL(policy ‖ reference)")
    ax2.set_title("KL")
    return fig


@_png
def xstest(points: dict[str, tuple[Point, Point]],
           reference: dict[str, tuple[float, float]]) -> Any:
    """XSTest's trade-off: safe prompts answered (x) against unsafe prompts refused (y), each
    checkpoint with its 95% intervals, the published models as hollow reference points. The
    top right corner is harmless without being evasive."""
    fig = _figure(6.4, 5.2)
    ax = fig.subplots()
    ax.fill_between([0.9, 1.0], 0.9, 1.0, color="#d8ecd8", lw=0, zorder=0)
    for name, (refused, answered) in reference.items():
        ax.scatter([answered], [refused], s=46, facecolors="none", edgecolors="#777777", zorder=2)
        ax.annotate(f"{name} (published)", (answered, refused), textcoords="offset points",
                    xytext=(-6, -12), fontsize=8, color="#555555", ha="right")
    names = list(points)
    xs = [points[n][1][0] or 0.0 for n in names]
    ys = [points[n][0][0] or 0.0 for n in names]
    ax.plot(xs, ys, "-", color="#9aa5b8", zorder=1)
    ax.errorbar(xs, ys, xerr=_errors([points[n][1] for n in names]),
                yerr=_errors([points[n][0] for n in names]), fmt="o", color="#c44e52",
                ecolor="#4c72b0", capsize=4, zorder=3)
    for n, x, y in zip(names, xs, ys, strict=True):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("safe prompts answered (not evasive →)")
    ax.set_ylabel("unsafe prompts refused (harmless →)")
    ax.set_title("XSTest: harmless without being evasive (95% Wilson CIs)")
    return fig
