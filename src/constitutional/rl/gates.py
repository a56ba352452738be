"""Quality gates: does the AI feedback carry any signal before a PM and a policy are trained on it?

``cai run`` checks the gates once per call, before the first stage that learns from the labels
(``pm``, ``ppo``, ``dpo``), from what the label and calibration stages wrote (it only reads: no
stage's settings, fingerprint or outputs depend on the gates). The labels carry **no signal**
when

* their **position-bias rate** (``rl/label.summary.json``) is at least ``max_position_bias``: the
  feedback model picked the same *position* in both orders for that share of pairs, so the
  labels follow the order of the answers, not what they say; or
* with ``calibration`` data, the 95% Wilson interval of the feedback model's **accuracy on
  human-labelled comparisons** (``calibrate/calibrate.summary.json``, see
  :mod:`constitutional.rl.calibrate`) is not above 0.5: at chance (it contains 0.5), or below.

What happens then is ``mode``: ``warn`` (the default) logs one WARNING line and goes on,
``strict`` stops the run with one error line (exit 2) before those stages, keeping everything
written so far, and ``off`` checks nothing. Either way (but ``off``) run.json gets a ``gates``
entry (:func:`evaluate_gates`), which the final table and the report's verdict show.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from constitutional.core import layout
from constitutional.core.settings import Field, Settings
from constitutional.core.stats import NO_SIGNAL_POSITION_BIAS, chance_verdict

#: The stages that learn from the labels; the gates are checked before the first of them.
GATED_STAGES = ("pm", "ppo", "dpo")


class GateSettings(Settings):
    """``gates:``: when the AI labels carry no signal, warn, stop, or do nothing."""

    mode: Literal["warn", "strict", "off"] = Field(
        "warn", description="warn (log one warning and go on), strict (stop before the PM and "
                            "RL stages) or off.")
    calibration: str | None = Field(
        None, description="Human-labelled comparisons (HH-RLHF rows or prompt/chosen/rejected "
                          "JSONL) the feedback model is calibrated on after labelling; null: no "
                          "calibration stage.")
    calibration_limit: int | None = Field(100, ge=1, description="Calibration rows at most.")
    calibration_sample: bool = Field(False, description="A seeded sample of the calibration "
                                                        "rows instead of the first ones.")
    max_position_bias: float = Field(
        NO_SIGNAL_POSITION_BIAS, ge=0, le=1,
        description="Labels with a position-bias rate at or above this carry no signal.")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare ``off`` as false: ``mode: off`` means off."""
        return "off" if value is False else value


def _bias_check(settings: GateSettings, summary: dict[str, Any] | None) -> dict[str, Any]:
    bias = summary.get("position_bias_rate") if summary else None
    check: dict[str, Any] = {"check": "position_bias_rate", "value": bias,
                             "threshold": settings.max_position_bias}
    if summary is None:
        return {**check, "passed": None, "message": f"not measured (no {layout.LABEL_SUMMARY})"}
    if bias is None:
        return {**check, "passed": None,
                "message": "not measured (labels scored in one order only)"}
    if bias >= settings.max_position_bias:
        return {**check, "passed": False, "message": (
            f"position-bias rate {bias:.2f} ≥ gates.max_position_bias "
            f"{settings.max_position_bias:g}: the feedback model picked the same position in "
            f"both orders for {bias:.0%} of pairs, whatever the answers said")}
    return {**check, "passed": True,
            "message": f"position-bias rate {bias:.2f} < {settings.max_position_bias:g}"}


def _calibration_check(summary: dict[str, Any]) -> dict[str, Any]:
    lo, hi = summary["ci95"]
    acc, n = summary["accuracy"], summary["n"]
    verdict = chance_verdict((lo, hi), summary.get("chance", 0.5))
    figure = f"calibration accuracy {acc:.2f} on {n} human comparisons, 95% CI [{lo:.2f}, {hi:.2f}]"
    check = {"check": "calibration_accuracy", "value": acc, "ci95": [lo, hi], "n": n,
             "verdict": verdict}
    if verdict == "above chance":
        return {**check, "passed": True, "message": f"{figure}: above chance"}
    why = ("contains 0.5: at chance, the labeller agrees with people no more often than a coin "
           "flip" if verdict == "at chance" else
           "is below 0.5: the labeller prefers the answers people rejected")
    return {**check, "passed": False, "message": f"{figure} {why}"}


def evaluate_gates(settings: GateSettings, label_summary: dict[str, Any] | None,
                   calibration_summary: dict[str, Any] | None) -> dict[str, Any]:
    """The gates entry of run.json: ``mode``, ``status`` (``pass``; ``warn`` or ``fail`` when the
    labels carry no signal under mode warn or strict; ``not measured``), ``signal`` (False when a
    check failed, None when nothing was measured), ``checks`` (each with its figure, threshold or interval, ``passed`` and a
    message), ``max_position_bias`` and ``message`` (one line)."""
    checks = [_bias_check(settings, label_summary)]
    if calibration_summary is not None:
        checks.append(_calibration_check(calibration_summary))
    elif settings.calibration:
        checks.append({"check": "calibration_accuracy", "value": None, "passed": None,
                       "message": f"not measured (no {layout.CALIBRATION_SUMMARY})"})
    failed = [c for c in checks if c["passed"] is False]
    if failed:
        status = "fail" if settings.mode == "strict" else "warn"
        message = "the AI labels carry no signal: " + "; ".join(c["message"] for c in failed)
    elif any(c["passed"] for c in checks):
        status, message = "pass", "; ".join(c["message"] for c in checks)
    else:
        status, message = "not measured", "; ".join(c["message"] for c in checks)
    signal = False if failed else (True if status == "pass" else None)
    return {"mode": settings.mode, "status": status, "signal": signal,
            "max_position_bias": settings.max_position_bias, "checks": checks,
            "message": message}
