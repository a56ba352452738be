"""The report's sections: their titles and the files each reads (:mod:`constitutional.core.layout`).

A section ``sid`` is built by ``SECTIONS[sid]`` (``render.py``) into plain data and shown by
``templates/sections/<sid>.html.j2``.
"""

from __future__ import annotations

from pathlib import Path

from constitutional.core import layout

SECTION_FILES: dict[str, tuple[str, ...]] = {
    "verdict": (layout.STATE, layout.XSTEST, layout.LABEL_SUMMARY, layout.CALIBRATION_SUMMARY,
                layout.PM_METRICS, layout.ELO, layout.EVASIVENESS, layout.PPO_LOG),
    "stages": (layout.STATE,),
    "xstest": (layout.XSTEST,),
    "elo": (layout.ELO,),
    "evasiveness": (layout.EVASIVENESS,),
    "revision-curve": (layout.REVISION_CURVE,),
    "sl": (layout.SL_TRACES, layout.SL_SUMMARY),
    "labels": (layout.LABELS, layout.LABEL_SUMMARY, layout.PAIRS),
    "pm": (layout.PM_METRICS,),
    "ppo": (layout.PPO_LOG,),
    "grpo": (layout.rl_log(layout.GRPO),),
    "rloo": (layout.rl_log(layout.RLOO),),
    "answers": (layout.ANSWERS,),
}
TITLES = {
    "verdict": "Verdict: did it work, and did each stage carry signal?",
    "stages": "Wall time per stage",
    "xstest": "XSTest: harmless without being evasive",
    "elo": "Elo: harmlessness and helpfulness, by an AI judge",
    "evasiveness": "Evasiveness",
    "revision-curve": "PM score against revision number",
    "sl": "SL-CAI: critique → revision traces",
    "labels": "RL-CAI: soft AI labels",
    "pm": "Preference model",
    "ppo": "PPO: reward and KL",
    "grpo": "GRPO: reward and KL",
    "rloo": "RLOO: reward and KL",
    "answers": "Answers side by side",
}


def report_status(run_dir: str | Path) -> dict[str, str]:
    """``{section: "ok" | "not run"}``: whether any of each section's files exist."""
    run = Path(run_dir)
    return {s: ("ok" if any((run / f).is_file() for f in files) else "not run")
            for s, files in SECTION_FILES.items()}
