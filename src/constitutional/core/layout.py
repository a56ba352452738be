"""The layout of a ``cai run`` directory: every path in it, relative to the run directory, named once.

The pipeline (:mod:`constitutional.pipeline`) builds its stages' outputs, inputs and directories
from these names, and the report (:mod:`constitutional.evaluate.report`) reads the same names; a
stage writes through its library function (``sl revise`` into ``sl/``, ``rl label`` into
``rl/``, …), which the pipeline points at the directory named here. Each name says which stage
writes it. Paths use ``/`` whatever the platform (``Path(root) / name`` joins them).

``tests/test_rundir_layout.py`` fails when one of these paths is spelled out again in the pipeline
or the report.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------------------
# the run's own files (``cai run``)

#: ``cai run``: per stage its fingerprint, status and wall seconds; the quality gates' decision
#: (``gates``); the file digests it cached.
STATE = "run.json"
#: ``cai run``: the resolved configuration, defaults filled in.
CONFIG = "config.yaml"
#: ``cai run`` (the pipeline's last step) and ``cai report``: the report.
REPORT = "report.html"

#: The file name of a model's weights in its directory (see :func:`weights`).
WEIGHTS = "model.safetensors"

# ------------------------------------------------------------------------------------------------
# SL-CAI

#: ``revise`` (``cai sl revise``): its directory (cleaned when the stage is redone).
SL = "sl"
#: ``revise``: the critique → revision traces, one prompt a line.
SL_TRACES = "sl/revise.traces.jsonl"
#: ``revise``: the SFT set (prompt, final revision) ``sl_train`` trains on.
SL_SFT = "sl/revise.sft.jsonl"
#: ``revise``: its counts and speed.
SL_SUMMARY = "sl/revise.summary.json"
#: ``sl_train`` (``cai sl train``): the SL-CAI model's directory.
SL_MODEL = "sl/model"
#: ``sl_train``: its metrics (not part of the model's weights digest).
SL_TRAIN_METRICS = "sl/model/sl_train.json"

# ------------------------------------------------------------------------------------------------
# RL-CAI: pairs, labels, calibration, preference model

#: ``sample`` (``cai rl sample``) and ``label`` (``cai rl label``): their directory.
RL = "rl"
#: ``sample``: two answers of the SL-CAI model per red-team prompt.
PAIRS = "rl/pairs.jsonl"
#: ``label``: the soft labels, one pair a line, with each judgement.
LABELS = "rl/labels.jsonl"
#: ``label``: the preference set (prompt, chosen, rejected, p) the PM and DPO train on.
PREFERENCES = "rl/preferences.jsonl"
#: ``label``: mean p_a, position-bias rate, order agreement (what the quality gates read).
LABEL_SUMMARY = "rl/label.summary.json"
#: ``calibrate`` (``cai rl calibrate``, when ``gates.calibration`` is set): its directory.
CALIBRATE = "calibrate"
#: ``calibrate``: the feedback model's accuracy on human-labelled comparisons.
CALIBRATION_SUMMARY = "calibrate/calibrate.summary.json"
#: ``pm`` (``cai rl pm``): the preference model's directory.
PM = "pm"
#: ``pm``: its metrics (held-out accuracy).
PM_METRICS = "pm/pm.json"
#: ``cai eval pm`` (no stage of ``cai run``): ``*.summary.json``, the PM's accuracy on
#: human-labelled comparisons, read by the report's verdict.
PM_EVAL = "pm/eval"

# ------------------------------------------------------------------------------------------------
# RL policies: each ``rl.algo`` stage writes into the directory named after it

#: ``ppo`` (``cai rl train``): the RL-CAI policy's directory.
PPO = "ppo"
#: ``ppo``: one row per step (reward, KL, …); ``grpo`` and ``rloo`` write theirs alike
#: (:func:`rl_log`).
PPO_LOG = "ppo/ppo_log.jsonl"
#: ``ppo``: its configuration (not part of the model's weights digest).
PPO_CONFIG = "ppo/ppo.config.json"
#: ``grpo`` (TRL's GRPO): its policy's directory.
GRPO = "grpo"
#: ``rloo`` (TRL's RLOO): its policy's directory.
RLOO = "rloo"
#: ``dpo`` (``cai rl dpo``): its policy's directory.
DPO = "dpo"
#: ``dpo``: its metrics (held-out margin).
DPO_METRICS = "dpo/dpo.json"

# ------------------------------------------------------------------------------------------------
# evaluation

#: ``eval``: its directory.
EVAL = "eval"
#: ``eval``: every checkpoint's answers to the held-out prompts, side by side.
ANSWERS = "eval/answers.jsonl"
#: ``eval`` (``eval.xstest``): XSTest's refused and answered rates per checkpoint and the
#: paired comparisons with the initial model.
XSTEST = "eval/xstest.json"
#: ``eval`` (``eval.judge``): the Elo ratings per kind (harmless, helpful).
ELO = "eval/elo.json"
#: ``eval`` (``eval.second_judge``): a second judge's Elo ratings.
ELO_SECOND = "eval/elo.second.json"
#: ``eval``: the refusal rate per checkpoint.
EVASIVENESS = "eval/evasiveness.json"
#: ``eval``: the PM's score of the SL traces against the revision number.
REVISION_CURVE = "eval/revision_curve.json"


def weights(directory: str) -> str:
    """The weights file of the model a stage saves in ``directory`` (``pm/model.safetensors``)."""
    return f"{directory}/{WEIGHTS}"


def rl_log(algo: str) -> str:
    """The per-step log of the online RL stage ``algo`` (``ppo``, ``grpo`` or ``rloo``):
    ``ALGO/ALGO_log.jsonl``."""
    return f"{algo}/{algo}_log.jsonl"
