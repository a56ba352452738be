"""The run directory's file names are declared once (:mod:`constitutional.core.layout`).

* the pipeline, the quality gates and the report spell out no run-directory path: every string in
  their code (docstrings aside) and in the report's templates is free of them;
* every stage's directory, outputs and inputs are names the layout declares;
* the layout's file names are the ones the stages' library functions write.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from constitutional.config import load_config
from constitutional.core import layout

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "constitutional"
REPORT = PACKAGE / "evaluate" / "report"
MODULES = [PACKAGE / "pipeline.py", PACKAGE / "rl" / "gates.py", *sorted(REPORT.glob("*.py"))]
TEMPLATES = sorted((REPORT / "templates").rglob("*.j2"))
CALIBRATION = ROOT / "tests" / "fixtures" / "calibrate" / "hh_harmless_small.jsonl"

#: ``dir/name.ext``: a file of the run directory, spelled out.
PATH = re.compile(r"\b[\w.-]+/[\w.-]*\.(?:jsonl?|safetensors|ya?ml)\b")
#: The layout's names: every path it declares, with the algorithms' weights and logs.
DIRECTORIES = {layout.SL, layout.SL_MODEL, layout.RL, layout.CALIBRATE, layout.PM,
               layout.PM_EVAL, layout.PPO, layout.GRPO, layout.RLOO, layout.DPO, layout.EVAL}
DECLARED = ({v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)}
            | {layout.weights(d) for d in DIRECTORIES}
            | {layout.rl_log(a) for a in (layout.PPO, layout.GRPO, layout.RLOO)})
FILES = {name for name in DECLARED if "." in Path(name).name}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _spelled_out(text: str) -> list[str]:
    """The run-directory paths in ``text``: a declared path or file name, or ``dir/name.ext``."""
    hits = PATH.findall(text)
    if text not in hits and (text in DECLARED - DIRECTORIES
                             or text in {Path(f).name for f in FILES}):
        hits.append(text)
    return hits


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_run_directory_path_is_spelled_out(module: Path) -> None:
    tree = ast.parse(module.read_text(encoding="utf-8"))
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            found += [(node.lineno, hit) for hit in _spelled_out(node.value)]
        # a path given to Pipeline.p (``pl.p("pm")``) or a stage's directory, outputs or inputs
        elif isinstance(node, ast.Call):
            func = node.func
            args = []
            if isinstance(func, ast.Attribute) and func.attr == "p":
                args = node.args
            elif isinstance(func, ast.Name) and func.id == "Stage":
                args = [node.args[1], node.args[2], node.args[4]]
            for arg in args:
                for c in ast.walk(arg):
                    if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value:
                        found.append((c.lineno, c.value))
    assert not found, f"{module.name}: use constitutional.core.layout for {found}"


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_no_run_directory_path_in_the_report_templates(template: Path) -> None:
    assert not PATH.findall(template.read_text(encoding="utf-8"))


def test_the_detector_finds_spelled_out_paths() -> None:
    assert _spelled_out("eval/elo.json: expected an object") == ["eval/elo.json"]
    assert _spelled_out("eval/elo.json") == ["eval/elo.json"]
    assert _spelled_out("run.json") == ["run.json"]
    assert _spelled_out("answers.jsonl") == ["answers.jsonl"]
    assert _spelled_out("prompt/chosen/rejected JSONL") == []
    assert _spelled_out("pm") == []  # a stage's name is also its directory's: see the Stage check


@pytest.mark.parametrize("sets", [
    [],
    ["rl.algo=ppo,grpo,rloo,dpo", "rl.reward=pm=1,judge=1", f"gates.calibration={CALIBRATION}"],
    ["rl.algo=grpo", "rl.reward=judge", "eval.xstest.enabled=false"],
])
def test_the_stages_use_declared_names(tmp_path: Path, sets: list[str]) -> None:
    from constitutional.pipeline import Pipeline

    config = load_config(ROOT / "configs" / "demo.yaml", sets)
    stages = Pipeline(config, tmp_path).stages
    for stage in stages:
        assert stage.directory in DIRECTORIES | {""}, stage.name
        assert set(stage.outputs) <= DECLARED, stage.name
        run_inputs = [i for i in stage.inputs if not Path(i).is_absolute()]  # not in RUN
        assert set(run_inputs) <= DECLARED, stage.name
    names = [s.name for s in stages]
    assert ("calibrate" in names) == bool(config.gates.calibration)
    assert ("grpo" in names) == ("grpo" in config.rl.algos())


def test_the_declared_files_are_the_ones_the_stages_write() -> None:
    from constitutional.evaluate import elo, revision_curve, xstest
    from constitutional.evaluate.report import REPORT_FILE
    from constitutional.rl import calibrate, label, preference, sample
    from constitutional.rl.ppo import trainer
    from constitutional.sl import revise

    written = {
        layout.SL_TRACES: f"{layout.SL}/{revise.TRACES_FILE}",
        layout.SL_SFT: f"{layout.SL}/{revise.SFT_FILE}",
        layout.SL_SUMMARY: f"{layout.SL}/{revise.SUMMARY_FILE}",
        layout.PAIRS: f"{layout.RL}/{sample.PAIRS}",
        layout.LABELS: f"{layout.RL}/{label.LABELS}",
        layout.PREFERENCES: f"{layout.RL}/{label.PREFERENCES}",
        layout.LABEL_SUMMARY: f"{layout.RL}/{label.SUMMARY}",
        layout.CALIBRATION_SUMMARY: f"{layout.CALIBRATE}/{calibrate.SUMMARY}",
        layout.PM_METRICS: f"{layout.PM}/{preference.PM_METRICS}",
        layout.PPO_LOG: f"{layout.PPO}/{trainer.LOG_FILE}",
        layout.PPO_CONFIG: f"{layout.PPO}/{trainer.CONFIG_FILE}",
        layout.ANSWERS: f"{layout.EVAL}/{elo.ANSWERS_FILE}",
        layout.XSTEST: f"{layout.EVAL}/{xstest.RESULTS_FILE}",
        layout.REPORT: REPORT_FILE,
    }
    assert {k: k for k in written} == written
    assert Path(layout.SL_TRACES).name == revision_curve.TRACES_FILE  # what the curve reads
    assert layout.rl_log(layout.PPO) == layout.PPO_LOG
