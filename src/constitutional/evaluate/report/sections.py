"""The report's sections: their titles and the files each reads (relative to the run directory).

A section ``sid`` is built by ``SECTIONS[sid]`` (``render.py``) into plain data and shown by
``templates/sections/<sid>.html.j2``.
"""

from __future__ import annotations

from pathlib import Path

SECTION_FILES: dict[str, tuple[str, ...]] = {
    "verdict": ("run.json", "eval/xstest.json", "rl/label.summary.json",
                "calibrate/calibrate.summary.json", "pm/pm.json", "eval/elo.json",
                "eval/evasiveness.json", "ppo/ppo_log.jsonl"),
    "stages": ("run.json",),
    "xstest": ("eval/xstest.json",),
    "elo": ("eval/elo.json",),
    "evasiveness": ("eval/evasiveness.json",),
    "revision-curve": ("eval/revision_curve.json",),
    "sl": ("sl/revise.traces.jsonl", "sl/revise.summary.json"),
    "labels": ("rl/labels.jsonl", "rl/label.summary.json", "rl/pairs.jsonl"),
    "pm": ("pm/pm.json",),
    "ppo": ("ppo/ppo_log.jsonl",),
    "grpo": ("grpo/grpo_log.jsonl",),
    "rloo": ("rloo/rloo_log.jsonl",),
    "answers": ("eval/answers.jsonl",),
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
