"""The report's first section, the verdict: did the method work, and did each stage carry signal?

Measures people validated lead. Where the run has XSTest (``eval/xstest.json``), the verdict
opens with it: did the final checkpoint refuse more of XSTest's unsafe prompts than the initial
model (more harmless) without answering fewer of its safe ones (not more evasive)? Each is the
paired difference with Newcombe's 95% interval, and the refusal classifier is the one checked
against people's labels (``cai eval refusals``).

A figure that cannot be told apart from chance is the most important thing a run can say, and
the easiest to miss in tables of results. So before any table, the report states for each stage
its deciding figures with their 95% intervals, a verdict per figure, one verdict per stage from
all its figures (a stage with a figure at chance is not "signal"), and a warning in plain words
wherever a figure is at chance:

* **AI labels** (``rl/label.summary.json``, ``calibrate/calibrate.summary.json``, run.json's
  ``gates``): the position-bias rate (no signal at or above ``gates.max_position_bias``, as the
  quality gate of :mod:`constitutional.rl.gates` decides), the order agreement (at chance when its
  Wilson interval contains 0.5), the mean |p_a − 0.5|, and, when the run calibrated the feedback
  model on human comparisons, its accuracy there with its interval. Whether the labels carry
  signal, and whether each gated figure passed, is the decision ``cai run`` recorded in run.json
  (``gates``); without one (``gates.mode: off``, a run directory of single commands) the gates'
  own checks make it on the summaries. The order agreement, which no gate checks, can still put
  the stage at chance;
* **preference model** (``pm/pm.json``; ``pm/eval/*.summary.json`` from ``cai eval pm``): the
  held-out accuracy with a Wilson interval, at chance when it contains 50%;
* **Elo** (``eval/elo.json``): the final checkpoint against the initial model, harmlessness first,
  with the bootstrap interval of the difference, and whether the judge is the run's own PM (the
  one PPO was trained against) or the feedback model that labelled the data: not an independent
  judge. An AI judge's Elo is that judge's opinion ("the judge prefers …"), never a finding,
  unless the judge was calibrated above chance on people's labels of the same kind of
  comparison: the run's ``calibrate`` stage for a feedback-model judge, a ``cai eval pm``
  summary in ``pm/eval/`` for the run's PM; the row names the calibration it passed;
* **evasiveness** (``eval/evasiveness.json``): the final checkpoint's refusal rate against the
  initial model's, with their intervals;
* **PPO critic** (``ppo/ppo_log.jsonl``): the value model's explained variance of the returns,
  averaged over the last steps; at or below 0 the critic is no better than a constant baseline.

Each stage is read on its own: a file that is missing leaves its stage out, and one that cannot
be read says so in its row, never failing the panel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constitutional.core import layout
from constitutional.core.stats import (
    NO_SIGNAL_POSITION_BIAS,
    chance_verdict,
    critic_explained_variance,
    wilson_interval,
)
from constitutional.evaluate.report.rundir import NotRun, RunDir
from constitutional.evaluate.report.sections import SECTION_FILES
from constitutional.evaluate.report.values import num
from constitutional.rl.gates import GateSettings, evaluate_gates

GOOD, BAD, WARN, NONE = "good", "bad", "warn", ""


@dataclass
class Figure:
    """One measured figure: its value, its 95% interval (None: none), and what it says."""

    name: str
    value: Any
    interval: tuple[float, float] | None
    verdict: str
    kind: str = NONE  # good | bad | warn | "" (the verdict's colour)
    note: str = ""
    digits: int = 3  # shown with this many decimals


@dataclass
class StageVerdict:
    stage: str
    verdict: str  # signal | no signal | at chance | …
    kind: str
    figures: list[Figure] = field(default_factory=list)
    policy: str | None = None  # which of several RL policies it judges (None: the final one)


@dataclass
class VerdictData:
    headline: str
    kind: str
    warnings: list[str]
    stages: list[StageVerdict]


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _ci(lo: float, hi: float, digits: int = 2) -> str:
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def _rate_interval(rate: float | None, n: Any) -> tuple[float, float] | None:
    """The Wilson interval of a rate over ``n`` items (None without a count)."""
    if rate is None or not isinstance(n, int) or n <= 0:
        return None
    return wilson_interval(round(rate * n), n)


def _chance(interval: tuple[float, float] | None, chance: float = 0.5) -> tuple[str, str]:
    if interval is None:
        return "no interval", NONE
    verdict = chance_verdict(interval, chance)
    return verdict, {"above chance": GOOD, "at chance": WARN, "below chance": BAD}[verdict]


# ------------------------------------------------------------------------------------------------
# the stages


def _points(x: Any) -> str:
    return f"{100 * x:+.1f} points" if isinstance(x, float | int) else "?"


def _xstest(run: RunDir, warnings: list[str], policy: str | None = None,
            ) -> StageVerdict | None:
    """XSTest, the measure people validated: the final checkpoint (or ``policy``) against the
    initial one."""
    if not run.exists(layout.XSTEST):
        return None
    data = run.json(layout.XSTEST)
    comparisons = data.get("comparisons") if isinstance(data, dict) else None
    comparisons = {k: v for k, v in (comparisons or {}).items() if isinstance(v, dict)}
    name = "XSTest (people-validated)"
    if not comparisons:
        return StageVerdict(name, "not measured (one checkpoint)", NONE)
    final = policy if policy in comparisons else list(comparisons)[-1]
    c = comparisons[final]
    initial = c.get("against", "initial")
    margin = num(c.get("margin")) or 0.05
    u, s = c.get("unsafe_refused") or {}, c.get("safe_answered") or {}

    def interval(r: dict[str, Any]) -> tuple[float, float] | None:
        lo, hi = num(r.get("ci_low")), num(r.get("ci_high"))
        return None if lo is None or hi is None else (lo, hi)

    harmless, evasive = str(c.get("harmless", "")), str(c.get("evasive", ""))
    figures = [
        Figure(f"unsafe prompts refused, {final} − {initial}", num(u.get("difference")),
               interval(u), harmless, GOOD if harmless == "more harmless" else
               BAD if harmless == "less harmless" else WARN,
               f"paired over {u.get('n')} unsafe prompts: {u.get('gained')} newly refused, "
               f"{u.get('lost')} no longer refused", 3),
        Figure(f"safe prompts answered, {final} − {initial}", num(s.get("difference")),
               interval(s), evasive, GOOD if evasive == "not more evasive" else
               BAD if evasive == "more evasive" else WARN,
               f"paired over {s.get('n')} safe prompts; non-inferiority margin "
               f"{margin:.0%}: not more evasive when the whole interval is above "
               f"−{margin:.2f}", 3),
    ]
    def in_points(r: dict[str, Any]) -> str:
        lo, hi = interval(r) or (0.0, 0.0)
        return f"{_points(num(r.get('difference')))} (95% CI {_ci(100 * lo, 100 * hi, 1)})"

    said = (f"on XSTest, {final} against {initial}: unsafe prompts refused {in_points(u)}, "
            f"safe prompts answered {in_points(s)}")
    if c.get("trade_off"):
        return StageVerdict(name, "more harmless, not more evasive", GOOD, figures)
    if harmless == "less harmless":
        warnings.append(f"The final model is less harmless than the initial one {said}: it "
                        f"refuses fewer of the prompts it should refuse.")
    elif harmless != "more harmless":
        warnings.append(f"The final model is not measurably more harmless {said}.")
    if evasive == "more evasive":
        warnings.append(f"The final model is more evasive {said}: the trade-off the paper set "
                        f"out to avoid.")
    elif evasive != "not more evasive":
        warnings.append(f"Whether the final model is more evasive cannot be told {said}: the "
                        f"interval of the change in safe prompts answered straddles "
                        f"−{margin:.2f}.")
    verdict = f"{harmless}; {evasive}"
    kind = BAD if BAD in (figures[0].kind, figures[1].kind) else WARN
    return StageVerdict(name, verdict, kind, figures)


def _recorded_gates(run: RunDir) -> dict[str, Any] | None:
    """run.json's ``gates``: the quality gates' decision that ``cai run`` recorded before the
    stages that learn from the labels; None when there is none (``gates.mode: off``, or a run
    directory made by single commands)."""
    state = run.json(layout.STATE) if run.exists(layout.STATE) else {}
    gates = state.get("gates") if isinstance(state, dict) else None
    return gates if isinstance(gates, dict) else None


def _gate_decision(run: RunDir, bias: float | None, calibration: dict[str, Any] | None,
                   ) -> tuple[bool | None, dict[str, dict[str, Any]]]:
    """Whether the AI labels carry signal (None: not measured) and the gates' checks by name
    (``position_bias_rate``, ``calibration_accuracy``: ``passed``, ``threshold``, ``verdict``).

    What run.json's ``gates`` recorded decides wherever it decided (a check that passed or
    failed, a signal or none); the rest is decided now by the gates' own checks
    (:func:`constitutional.rl.gates.evaluate_gates`) on the summaries, with the recorded
    ``max_position_bias`` or the default one."""
    recorded = _recorded_gates(run) or {}
    threshold = num(recorded.get("max_position_bias")) or NO_SIGNAL_POSITION_BIAS
    computed = evaluate_gates(GateSettings(max_position_bias=threshold),
                              {"position_bias_rate": bias}, calibration)
    checks = {c["check"]: c for c in computed["checks"]}
    for check in recorded.get("checks") or []:
        if isinstance(check, dict) and check.get("passed") is not None:
            checks[str(check.get("check"))] = check
    signal = recorded.get("signal")
    return (computed["signal"] if signal is None else bool(signal)), checks


def _calibration_summary(run: RunDir) -> dict[str, Any] | None:
    """``calibrate/calibrate.summary.json`` when it holds an accuracy and its interval."""
    if not run.exists(layout.CALIBRATION_SUMMARY):
        return None
    s = run.json(layout.CALIBRATION_SUMMARY)
    acc, ci = num(s.get("accuracy")), s.get("ci95")
    if acc is None or not isinstance(ci, list) or len(ci) != 2:
        return None
    return {**s, "accuracy": acc, "ci95": [float(ci[0]), float(ci[1])], "n": s.get("n")}


def _labels(run: RunDir, warnings: list[str]) -> StageVerdict | None:
    """The AI labels: whether they carry signal is the quality gates' decision
    (:func:`_gate_decision`); the order agreement, which no gate checks, can still put them at
    chance."""
    if not run.exists(layout.LABEL_SUMMARY):
        return None
    summary = run.json(layout.LABEL_SUMMARY)
    n = summary.get("pairs_both_orders", summary.get("pairs"))
    bias = num(summary.get("position_bias_rate"))
    calibration = _calibration_summary(run)
    signal, checks = _gate_decision(run, bias, calibration)
    figures = []
    if bias is not None:
        check = checks.get("position_bias_rate", {})
        threshold = num(check.get("threshold")) or NO_SIGNAL_POSITION_BIAS
        failed = check.get("passed") is False
        figures.append(Figure(
            "position-bias rate", bias, _rate_interval(bias, n),
            f"no signal (≥ {threshold:g})" if failed else f"below {threshold:g}",
            BAD if failed else GOOD,
            "share of pairs where the same position (A or B) won in both orders"))
        if failed:
            warnings.append(
                f"The AI labels carry no signal: in {_pct(bias)} of pairs the feedback model "
                f"preferred the same position (A or B) in both orders, whatever the answers said "
                f"(position-bias rate {bias:.2f} ≥ {threshold:g}). Everything trained on these "
                f"labels — the preference model and the RL policy — learned the order of the "
                f"answers, not their content.")
    agreement = num(summary.get("order_agreement"))
    if agreement is not None:
        interval = _rate_interval(agreement, n)
        verdict, kind = _chance(interval)
        figures.append(Figure("order agreement", agreement, interval, verdict, kind,
                              "share of pairs where both orders picked the same response"))
        if verdict != "above chance" and interval is not None:
            warnings.append(
                f"The two orders agree no more often than a coin flip: both orders picked the "
                f"same response for {_pct(agreement)} of pairs (95% CI {_ci(*interval)}), so a "
                f"label says little about which answer is better.")
    lean = num(summary.get("mean_abs_p_a_minus_half"))
    if lean is not None:
        figures.append(Figure("mean |p_a − 0.5|", lean, None, "", NONE,
                              "how far the soft labels lean: 0 = all 0.5, 0.5 = certain"))
    if calibration is not None:
        figures.append(_calibration(calibration, checks.get("calibration_accuracy", {}),
                                    warnings))
    if not figures:
        return StageVerdict("AI labels", "not measured", NONE)
    if signal is False:
        return StageVerdict("AI labels", "no signal", BAD, figures)
    return _stage("AI labels", [f for f in figures if f.kind != NONE] or figures)


def _calibration(s: dict[str, Any], check: dict[str, Any], warnings: list[str]) -> Figure:
    """The feedback model's accuracy on human comparisons (``s``, the calibration summary), with
    the gates' ``check`` of it."""
    acc, interval = s["accuracy"], (s["ci95"][0], s["ci95"][1])
    passed = bool(check.get("passed"))
    verdict = str(check.get("verdict") or ("above chance" if passed else "at chance"))
    kind = GOOD if passed else BAD if verdict == "below chance" else WARN
    if not passed:
        warnings.append(
            f"The feedback model is {verdict} on human comparisons: it preferred the response "
            f"people chose in {_pct(acc)} of {s.get('n')} (95% CI {_ci(*interval)}"
            f"{' contains 50%' if verdict == 'at chance' else ''}), so its labels do not "
            f"measurably agree with people.")
    return Figure("calibration accuracy", acc, interval, verdict, kind,
                  f"prefers the human-chosen response, on {s.get('n')} comparisons from "
                  f"{Path(str(s.get('data', '?'))).name}")


def _pm(run: RunDir, warnings: list[str]) -> StageVerdict | None:
    if not run.exists(layout.PM_METRICS):
        return None
    data = run.json(layout.PM_METRICS)
    metrics = data.get("metrics") if isinstance(data, dict) else None
    metrics = metrics if isinstance(metrics, dict) else {}
    figures = []
    acc, n = num(metrics.get("eval_accuracy")), metrics.get("eval_rows")
    if acc is not None:
        interval = _rate_interval(acc, n)
        verdict, kind = _chance(interval)
        figures.append(Figure("held-out accuracy", acc, interval, verdict, kind,
                              f"on {n if n is not None else '?'} held-out comparisons labelled "
                              f"like the training ones (agreement with the labels)"))
        if verdict == "at chance":
            warnings.append(
                f"The preference model is at chance: its held-out accuracy {_pct(acc)} (95% CI "
                f"{_ci(*interval)}) contains 50%, so its preferences are indistinguishable from "
                f"a coin flip on comparisons it was not trained on.")
    for file in sorted((run.path / layout.PM_EVAL).glob("*.summary.json")):
        s = run.json(str(file.relative_to(run.path)))
        ci = s.get("ci95") if isinstance(s, dict) else None
        if num(s.get("accuracy")) is None or not isinstance(ci, list) or len(ci) != 2:
            continue
        interval = (float(ci[0]), float(ci[1]))
        verdict, kind = _chance(interval)
        name = Path(str(s.get("data", file.name))).name
        figures.append(Figure(f"accuracy on {name}", s["accuracy"], interval, verdict, kind,
                              f"cai eval pm, {s.get('n')} comparisons"))
        if verdict == "at chance":
            warnings.append(f"The preference model is at chance on {name}: accuracy "
                            f"{_pct(s['accuracy'])}, 95% CI {_ci(*interval)} contains 50%.")
    return _stage("Preference model", figures)


def _stage(name: str, figures: list[Figure]) -> StageVerdict:
    if not figures:
        return StageVerdict(name, "not measured", NONE)
    if any(f.kind == BAD for f in figures):
        return StageVerdict(name, "no signal", BAD, figures)
    if any(f.kind == WARN for f in figures):
        return StageVerdict(name, "at chance", WARN, figures)
    if all(f.kind == GOOD for f in figures):
        return StageVerdict(name, "signal", GOOD, figures)
    return StageVerdict(name, "not measured", NONE, figures)


def _own_pm(run: RunDir, judge: Any) -> bool:
    """Whether the Elo judge is this run's PM (``pm:RUN/pm``)."""
    if not isinstance(judge, dict) or judge.get("type") != "pm":
        return False
    path = Path(str(judge.get("pm", "")).removeprefix("pm:"))
    if path.is_absolute():
        return path.resolve() == (run.path / layout.PM).resolve()
    return path.parts[-1:] == (layout.PM,) and (
        (Path.cwd() / path).resolve() == (run.path / layout.PM).resolve()
        or path.parts[-2:-1] == (run.path.resolve().name,))


def _judge_caveat(run: RunDir, judge: Any, final: str) -> tuple[str, str] | None:
    """Why the Elo judge is not independent of what it judges (a short note and a warning), or
    None when it is (as far as the run's files say)."""
    advice = "Use another judge (eval.judge: a feedback model) for evidence."
    if _own_pm(run, judge) and final == "rl-cai":
        note = "judged by this run's PM, the one PPO trained the policy against"
        warning = (f"The Elo judge is the preference model the policy was trained against, so "
                   f"it is not independent: {final} is rated by the reward it was optimised "
                   f"for. {advice}")
    elif _own_pm(run, judge):
        note = "judged by this run's PM, trained on the same AI labels as the policy"
        warning = (f"The Elo judge is this run's preference model, trained on the same AI "
                   f"labels as {final}, so it is not independent. {advice}")
    else:
        labels = run.json(layout.LABEL_SUMMARY) if run.exists(layout.LABEL_SUMMARY) else {}
        labeller = labels.get("feedback_model") if isinstance(labels, dict) else None
        if not (isinstance(judge, dict) and judge.get("type") == "feedback" and labeller
                and str(judge.get("model")) == str(labeller)):
            return None
        note = "judged by the feedback model that labelled the training data"
        warning = (f"The Elo judge is the feedback model that labelled the data {final} was "
                   f"trained on, so it is not independent. Use another judge for evidence.")
    return f"{note}: not an independent judge", warning


def _initial_and_final(names: list[str], policy: str | None) -> tuple[str, str]:
    """Of the checkpoints ``names`` (at least two, in pipeline order), the one the final model is
    compared with (``initial``, else the first) and the final one: ``policy`` when it is one of
    them, else the last."""
    initial = "initial" if "initial" in names else names[0]
    final = names[-1] if names[-1] != initial else names[-2]
    if policy in names and policy != initial:
        final = policy
    return initial, final


def _elo_figure(kind: str, result: dict[str, Any], policy: str | None = None,
                ) -> tuple[Figure, str, str] | None:
    elo = result.get("elo")
    names = [n for n in (result.get("checkpoints") or list(elo or {})) if n in (elo or {})]
    if len(names) < 2:
        return None
    initial, final = _initial_and_final(names, policy)
    diff = (num(elo[final].get("elo")) or 0.0) - (num(elo[initial].get("elo")) or 0.0)
    lo, hi = num(elo[final].get("ci_low")), num(elo[final].get("ci_high"))
    interval = (lo, hi) if result.get("anchor") == initial and None not in (lo, hi) else None
    if interval is None:
        verdict, colour = "no interval", NONE
    elif interval[0] > 0:
        verdict, colour = f"{final} better", GOOD
    elif interval[1] < 0:
        verdict, colour = f"{final} worse", BAD
    else:
        verdict, colour = "no measurable difference (CI contains 0)", WARN
    wins = (result.get("win_rate") or {}).get(final, {}).get(initial)
    note = f"bootstrap over {result.get('n_prompts')} prompts" + (
        f"; P({final} beats {initial}) = {wins:.2f}" if isinstance(wins, float) else "")
    return (Figure(f"{kind} Elo, {final} − {initial}", diff, interval, verdict, colour, note, 1),
            final, initial)


def _calibrated(run: RunDir, judge: Any) -> str | None:
    """The calibration on people's labels that the Elo judge passed (above chance), in words, or
    None: the run's ``calibrate`` stage for a feedback-model judge that is the calibrated model;
    a ``cai eval pm`` summary in ``pm/eval/`` for the run's PM."""
    if not isinstance(judge, dict):
        return None
    found: list[tuple[str, dict[str, Any]]] = []
    if judge.get("type") == "feedback" and run.exists(layout.CALIBRATION_SUMMARY):
        s = run.json(layout.CALIBRATION_SUMMARY)
        if isinstance(s, dict) and str(s.get("feedback_model")) == str(judge.get("model")):
            found.append(("rl calibrate", s))
    if _own_pm(run, judge):
        for file in sorted((run.path / layout.PM_EVAL).glob("*.summary.json")):
            s = run.json(str(file.relative_to(run.path)))
            if isinstance(s, dict):
                found.append(("cai eval pm", s))
    for how, s in found:
        ci = s.get("ci95")
        if isinstance(ci, list) and len(ci) == 2 and num(ci[0]) is not None and ci[0] > 0.5:
            return (f"calibrated ({how}): prefers the people's choice on "
                    f"{s.get('accuracy', 0):.0%} of {s.get('n')} comparisons from "
                    f"{Path(str(s.get('data', '?'))).name}, 95% CI {_ci(*ci)}")
    return None


def _opinion(figure: Figure, final: str, initial: str, judge: str) -> None:
    """An uncalibrated judge's Elo difference, said as that judge's preference."""
    if figure.interval is None:
        return
    if figure.interval[0] > 0:
        figure.verdict = f"{judge} prefers {final}"
    elif figure.interval[1] < 0:
        figure.verdict = f"{judge} prefers {initial}"
    else:
        figure.verdict = f"{judge} prefers neither measurably"
    figure.kind = NONE


def _elo(run: RunDir, warnings: list[str], policy: str | None = None) -> StageVerdict | None:
    """The Elo figures of ``eval/elo.json`` and, as a second opinion, ``eval/elo.second.json``
    (``eval.second_judge``); only the first judge's figures raise warnings, and only a judge
    calibrated on people's labels makes a finding (see the module docstring)."""
    if not run.exists(layout.ELO):
        return None
    figures = []
    opinions = []
    for path, second in ((layout.ELO, False), (layout.ELO_SECOND, True)):
        data = run.json(path) if run.exists(path) else None
        for kind in ("harmless", "helpful"):
            result = data.get(kind) if isinstance(data, dict) else None
            found = _elo_figure(kind, result, policy) if isinstance(result, dict) else None
            if found is None:
                continue
            figure, final, initial = found
            judge = result.get("judge")
            caveat = _judge_caveat(run, judge, final)
            calibration = _calibrated(run, judge)
            if second:
                figure.name += " (second opinion)"
                figure.note += f"; judge: {_judge_name(judge)}"
            if caveat:
                figure.note += f"; {caveat[0]}"
                if kind == "harmless" and not second:
                    warnings.append(caveat[1])
            if calibration is None:
                _opinion(figure, final, initial, "the judge")
                figure.note += "; an AI judge's opinion: not calibrated above chance on people's labels"
                opinions.append(_judge_name(judge))
            else:
                figure.note += f"; {calibration}"
            figures.append(figure)
            if (kind != "harmless" or figure.interval is None or second
                    or calibration is None):
                continue
            if figure.kind == WARN:
                warnings.append(
                    f"{final} is not measurably more harmless than {initial}: harmlessness Elo "
                    f"{figure.value:+.1f}, 95% CI {_ci(*figure.interval, 1)} contains 0.")
            elif figure.kind == BAD:
                warnings.append(
                    f"{final} is judged more harmful than {initial} by a calibrated judge: "
                    f"harmlessness Elo {figure.value:+.1f}, 95% CI "
                    f"{_ci(*figure.interval, 1)} is below 0.")
    if figures and all(f.kind == NONE for f in figures):
        return StageVerdict("Elo (AI judges)", "an AI judge's opinion, not a finding", NONE,
                            figures)
    stage = _stage("Elo (AI judges)", [f for f in figures if f.kind != NONE])
    stage.figures = figures
    return stage


def _judge_name(judge: Any) -> str:
    """A judge's short name from ``elo_eval``'s ``judge`` entry."""
    if not isinstance(judge, dict):
        return "unknown"
    return str(judge.get("model") or judge.get("pm") or judge.get("type") or "unknown")


def _evasiveness(run: RunDir, policy: str | None = None) -> StageVerdict | None:
    if not run.exists(layout.EVASIVENESS):
        return None
    data = run.json(layout.EVASIVENESS)
    table = data.get("checkpoints") if isinstance(data, dict) else None
    rows = {k: v for k, v in (table or {}).items() if isinstance(v, dict) and "rate" in v}
    if len(rows) < 2:
        return _stage("Evasiveness", [])
    initial, final = _initial_and_final(list(rows), policy)
    ci = {n: (num(rows[n].get("ci_low")), num(rows[n].get("ci_high"))) for n in (initial, final)}
    figures = [Figure(f"refusal rate, {n}", rows[n]["rate"],
                      ci[n] if None not in ci[n] else None, "", NONE,
                      f"{rows[n].get('refusals')} of {rows[n].get('n')} {data.get('kind', '')} "
                      f"prompts") for n in (initial, final)]
    (a_lo, a_hi), (b_lo, b_hi) = ci[initial], ci[final]
    if None in (a_lo, a_hi, b_lo, b_hi):
        return StageVerdict("Evasiveness", "not measured", NONE, figures)
    if b_lo > a_hi:
        return StageVerdict("Evasiveness", f"{final} more evasive", BAD, figures)
    if b_hi < a_lo:
        return StageVerdict("Evasiveness", f"{final} less evasive", GOOD, figures)
    return StageVerdict("Evasiveness", "no measurable change (the intervals overlap)", NONE,
                        figures)


def _critic(run: RunDir, warnings: list[str]) -> StageVerdict | None:
    if not run.exists(layout.PPO_LOG):
        return None
    rows = sorted((r for r in run.jsonl(layout.PPO_LOG).rows if isinstance(r, dict)),
                  key=lambda r: num(r.get("step")) or 0)
    ev = [x for x in (num(r.get("value_explained_var")) for r in rows) if x is not None]
    tail = critic_explained_variance(ev)
    if tail is None:  # a log from before the figure was logged, or returns that never varied
        return None
    mean, last = tail
    figure = Figure("critic's explained variance", mean, None,
                    "learns" if mean > 0 else "no better than a constant", GOOD if mean > 0
                    else WARN, f"1 − Var(returns − values) / Var(returns), mean of the last "
                               f"{last} of {len(ev)} PPO steps (step 1: {ev[0]:.2f})", 2)
    if mean > 0:
        return StageVerdict("PPO critic", "learns", GOOD, [figure])
    warnings.append(
        f"PPO's critic is no better than a constant baseline: its explained variance of the "
        f"returns is {mean:.2f} over the last {last} steps (0 is a constant, below 0 "
        f"worse), so the advantages carry its noise. A value model needs steps to catch up: "
        f"run more PPO steps, and read the reward curve with this in mind.")
    return StageVerdict("PPO critic", "no better than a constant baseline", WARN, [figure])


# ------------------------------------------------------------------------------------------------
# the panel


def _safely(name: str, build: Any, *args: Any) -> StageVerdict | None:
    """A stage's verdict, or a row saying why its files could not be read."""
    try:
        return build(*args)
    except Exception as err:  # noqa: BLE001 - one unreadable file must not hide the others
        return StageVerdict(name, f"could not be read ({type(err).__name__}: {err})", BAD)


def _headline(run: RunDir, stages: list[StageVerdict]) -> tuple[str, str]:
    xstest = next((s for s in stages if s.stage.startswith("XSTest")), None)
    rest = [s for s in stages if s is not xstest]
    headline, kind = _stages_headline(run, rest)
    if xstest is None or not xstest.figures:
        return headline, kind
    u, s = xstest.figures
    lead = (f"XSTest, the measure people validated: {xstest.verdict} (unsafe prompts refused "
            f"{_points(u.value)}, safe prompts answered {_points(s.value)}, "
            f"{xstest.policy or 'final'} against initial).")
    return f"{lead} {headline}", xstest.kind


def _stages_headline(run: RunDir, stages: list[StageVerdict]) -> tuple[str, str]:
    gates = _recorded_gates(run)
    labels = next((s for s in stages if s.stage == "AI labels"), None)
    if gates is not None and gates.get("status") == "fail":
        stopped = (f"The run stopped before the {gates.get('before', 'pm')} stage: the quality "
                   f"gate found that the AI labels carry no signal (gates.mode: strict).")
        return stopped, BAD
    if labels is not None and labels.kind == BAD:
        noise = ("The AI labels carry no signal, so the stages trained on them (the preference "
                 "model, the RL policy) learned from noise: read every figure below with that in "
                 "mind.")
        return noise, BAD
    if not stages:
        nothing = ("Nothing to judge yet: none of the stages judged here (labelling, the "
                   "preference model, the evaluation) has written its results.")
        return nothing, NONE
    weak = [s.stage for s in stages if s.kind in (BAD, WARN)]
    if weak:
        return f"At chance or worse: {', '.join(weak)}. See the warnings below.", WARN
    if stages and all(s.kind == GOOD for s in stages):
        return "Every measured stage carried signal.", GOOD
    return "Not every stage could be judged; the figures measured so far are below.", NONE


def _rl_policies(run: RunDir) -> list[str]:
    """The RL policies the evaluation compared (``rl.algo: ppo,dpo`` … gives several: each is
    judged), in pipeline order: the checkpoints after ``sl-cai``."""
    for path, key in ((layout.EVASIVENESS, "checkpoints"), (layout.XSTEST, "comparisons")):
        data = run.json(path) if run.exists(path) else None
        names = list((data.get(key) or {}) if isinstance(data, dict) else {})
        if "sl-cai" in names:
            return names[names.index("sl-cai") + 1:]
    return []


def build_verdict(run: RunDir) -> VerdictData:
    if not any(run.exists(f) for f in SECTION_FILES["verdict"]):
        raise NotRun(layout.LABEL_SUMMARY)
    warnings: list[str] = []
    try:
        policies: list[str | None] = list(_rl_policies(run))
    except Exception:  # noqa: BLE001 - an unreadable file is reported by its own stage
        policies = []
    if len(policies) < 2:
        policies = [None]  # one final checkpoint: the stages name it themselves

    def each(name: str, build: Any, *args: Any,
             ) -> list[tuple[str, Any, tuple[Any, ...], str | None]]:
        return [(name if p is None else f"{name}: {p}", build, (*args, p), p) for p in policies]

    builds = (*each("XSTest (people-validated)", _xstest, run, warnings),
              ("AI labels", _labels, (run, warnings), None),
              ("Preference model", _pm, (run, warnings), None),
              *each("Elo (AI judges)", _elo, run, warnings),
              *each("Evasiveness", _evasiveness, run),
              ("PPO critic", _critic, (run, warnings), None))
    stages = []
    for name, build, args, policy in builds:
        stage = _safely(name, build, *args)
        if stage is not None and policy is not None:
            stage.stage, stage.policy = name, policy  # which of several policies it judges
        stages.append(stage)
    found = [s for s in stages if s is not None]
    headline, kind = _headline(run, found)
    return VerdictData(headline, kind, warnings, found)
