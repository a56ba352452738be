"""`cai run`: typed config errors, the whole pipeline on a tiny model, skipping, and resuming
after a kill."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from constitutional.cli import main
from constitutional.config import RunConfig, load_config
from constitutional.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "tests" / "fixtures" / "calibrate" / "hh_harmless_small.jsonl"
SMALL = ["red_team_limit=8", "helpful_limit=8", "eval.prompts=3", "eval.bootstrap=50",
         "rl.rollout_batch=4", "rl.minibatch=2", "rl.steps=2", "revise.max_new_tokens=24",
         "revise.critique_max_new_tokens=16", "sample.max_new_tokens=16",
         "sl_train.helpful_max_new_tokens=16", "eval.max_new_tokens=16", "eval.xstest.prompts=18",
         "eval.xstest.max_new_tokens=8"]


def sets(model: Path, *extra: str) -> list[str]:
    return [a for item in [f"model={model}", *SMALL, *extra] for a in ("--set", item)]


def test_shipped_configs_load():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    paper = load_config(ROOT / "configs" / "paper.yaml")
    assert isinstance(demo, RunConfig)
    assert demo.revise.revisions <= 2 and demo.red_team_limit == 32
    assert paper.revise.revisions == 4 and paper.label.cot and paper.label.clamp == [0.4, 0.6]
    assert paper.rl.algo == "ppo"
    assert demo.gates.mode == "warn" and demo.gates.max_position_bias == 0.9
    assert demo.gates.calibration is None


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nrl:\n  steps: 2\n  stepz: 3\n")
    with pytest.raises(UserError) as err:
        load_config(bad)
    assert (err.value.field, err.value.line) == ("rl.stepz", 4)
    with pytest.raises(UserError) as err:
        load_config(None, ["rl.steps=many"])
    assert err.value.field == "rl.steps" and "expected int" in str(err.value)
    with pytest.raises(UserError) as err:
        load_config(None, ["revise=3"])
    assert err.value.field == "revise"
    c = load_config(None, ["rl.learning_rate=1", "label.clamp=[0.3, 0.7]", "device=null"])
    assert c.rl.learning_rate == 1.0 and c.label.clamp == [0.3, 0.7] and c.device is None
    assert load_config(None, ["gates.mode=off"]).gates.mode == "off"  # YAML's `off` is false
    with pytest.raises(UserError) as err:
        load_config(None, ["gates.max_position_bias=1.5"])
    assert err.value.field == "gates.max_position_bias" and "at most 1" in str(err.value)


def test_revise_critic_model_is_a_run_setting(tmp_path):
    """`revise.critic_model` in a run's YAML; unset, the revise stage's fingerprint is what it
    was before the setting existed (its settings hold no critic_model key)."""
    from constitutional.pipeline import Pipeline

    teacher = "builtin:qwen2.5-coder-1.5b-instruct"
    c = load_config(ROOT / "configs" / "demo.yaml", [f"revise.critic_model={teacher}"])
    assert c.revise.critic_model == teacher
    plain = load_config(ROOT / "configs" / "demo.yaml")
    revise = {p: next(s for s in Pipeline(cfg, tmp_path / p).stages if s.name == "revise")
              for p, cfg in (("teacher", c), ("plain", plain))}
    assert revise["teacher"].settings(c)["critic_model"] == teacher
    assert "critic_model" not in revise["plain"].settings(plain)
    assert Pipeline(c, tmp_path / "a").fingerprint(revise["teacher"]) != \
        Pipeline(plain, tmp_path / "b").fingerprint(revise["plain"])


def test_cai_run_unknown_key_is_one_line_exit_2(capsys):
    assert main(["run", "--set", "rl.nope=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rl.nope" in err[0]


def test_pipeline_runs_skips_and_redoes_what_changed(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "--out", str(run),
                 *sets(tiny_model_dir)]) == 0
    state = json.loads((run / "run.json").read_text())
    assert [s for s, e in state["stages"].items() if e["status"] == "done"] == [
        "revise", "sl_train", "sample", "label", "pm", "ppo", "eval", "report"]
    for rel in ("sl/revise.traces.jsonl", "sl/model/model.safetensors", "rl/labels.jsonl",
                "pm/pm.json", "ppo/ppo_log.jsonl", "eval/elo.json", "eval/evasiveness.json",
                "eval/revision_curve.json", "report.html", "run.log", "config.yaml"):
        assert (run / rel).exists(), rel
    elo = json.loads((run / "eval" / "elo.json").read_text())
    assert set(elo["harmless"]["elo"]) == {"initial", "sl-cai", "rl-cai"}
    xstest = json.loads((run / "eval" / "xstest.json").read_text())
    assert set(xstest["checkpoints"]) == {"initial", "sl-cai", "rl-cai"}
    assert xstest["prompts"] == 18 and set(xstest["comparisons"]) == {"sl-cai", "rl-cai"}
    assert set(state["stages"]["eval"]["xstest"]) == {"initial", "sl-cai", "rl-cai"}
    # the finished training stages' resume checkpoints are gone; their models are kept
    assert not list(run.rglob("checkpoints")) and (run / "pm" / "model.safetensors").exists()
    capsys.readouterr()
    # unchanged: everything is skipped
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "--out", str(run),
                 *sets(tiny_model_dir)]) == 0
    err = capsys.readouterr().err
    assert err.count("up to date, skipped") >= 7
    # one PPO setting changed: PPO and eval are redone, the stages before are skipped; the
    # eval gets a second judge (a feedback model) beside the PM
    assert not (run / "eval" / "elo.second.json").exists()
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "--out", str(run),
                 *sets(tiny_model_dir, "rl.steps=3", f"eval.second_judge={tiny_model_dir}")]) == 0
    err = capsys.readouterr().err
    for name in ("revise", "sl_train", "sample", "label", "pm"):
        assert f"{name}: up to date, skipped" in err
    assert "ppo: up to date" not in err and "eval: up to date" not in err
    log = [json.loads(x) for x in (run / "ppo" / "ppo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    first = json.loads((run / "eval" / "elo.json").read_text())["harmless"]
    second = json.loads((run / "eval" / "elo.second.json").read_text())["harmless"]
    assert first["judge"]["type"] == "pm" and second["judge"]["type"] == "feedback"
    assert second["n_comparisons"] == first["n_comparisons"] > 0
    state = json.loads((run / "run.json").read_text())
    assert set(state["stages"]["eval"]["elo_second"]["harmless"]) == {
        "initial", "sl-cai", "rl-cai"}
    # GRPO added beside PPO, with the PM and the constitution as a judge: PPO is kept (its
    # fingerprint leaves out the algorithms beside it and the reward), GRPO runs, eval is redone
    grpo = ("rl.algo=ppo,grpo", "rl.reward=pm=1,judge=1", "grpo.steps=2",
            "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=8")
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "--out", str(run),
                 *sets(tiny_model_dir, "rl.steps=3", f"eval.second_judge={tiny_model_dir}",
                       *grpo)]) == 0
    err = capsys.readouterr().err
    assert "ppo: up to date, skipped" in err and "grpo: up to date" not in err
    rows = [json.loads(x) for x in (run / "grpo" / "grpo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0 <= r["reward/judge"] <= 1 and "reward/pm" in r for r in rows)
    assert (run / "grpo" / "references.jsonl").exists()
    xstest = json.loads((run / "eval" / "xstest.json").read_text())
    assert list(xstest["checkpoints"]) == ["initial", "sl-cai", "rl-cai", "grpo"]
    assert "GRPO: reward and KL" in (run / "report.html").read_text()


def test_quality_gates_strict_stops_before_pm_warn_goes_on(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    demo = str(ROOT / "configs" / "demo.yaml")
    calibration = [f"gates.calibration={CALIBRATION}", "gates.calibration_limit=6"]
    # strict: the tiny feedback model's labels carry no signal, so the run stops before the PM
    assert main(["run", demo, "--out", str(run),
                 *sets(tiny_model_dir, *calibration, "gates.mode=strict")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    bias = json.loads((run / "rl" / "label.summary.json").read_text())["position_bias_rate"]
    calibrated = json.loads((run / "calibrate" / "calibrate.summary.json").read_text())
    assert err[-1].startswith("error: quality gate: the AI labels carry no signal: ")
    assert "stopped before the pm stage (gates.mode: strict" in err[-1]
    assert f"position-bias rate {bias:.2f} ≥ gates.max_position_bias 0.9" in err[-1]
    assert not (run / "pm").exists() and not (run / "ppo").exists()
    state = json.loads((run / "run.json").read_text())
    assert [s for s, e in state["stages"].items() if e["status"] == "done"] == [
        "revise", "sl_train", "sample", "label", "calibrate"]
    assert (state["gates"]["status"], state["gates"]["signal"]) == ("fail", False)
    checks = {c["check"]: c for c in state["gates"]["checks"]}
    assert checks["position_bias_rate"]["value"] == bias and bias >= 0.9
    assert calibrated["n"] == 6 and checks["calibration_accuracy"]["ci95"] == calibrated["ci95"]
    assert state["stages"]["calibrate"]["accuracy"] == calibrated["accuracy"]
    page = (run / "report.html").read_text()  # written, so that its verdict says why
    assert page.index('<section id="verdict">') < page.index("<table")
    assert "The run stopped before the pm stage" in page
    # warn: the same run goes on from the PM (nothing before it is redone), with one warning
    assert main(["run", demo, "--out", str(run), *sets(tiny_model_dir, *calibration)]) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "quality gate" in line]
    assert len(warned) == 1 and warned[0].startswith("WARNING quality gate: the AI labels carry "
                                                     "no signal: position-bias rate")
    for name in ("revise", "sl_train", "sample", "label", "calibrate"):
        assert f"{name}: up to date, skipped" in captured.err
    log = (run / "run.log").read_text()
    assert "WARNING quality gate: the AI labels carry no signal" in log
    state = json.loads((run / "run.json").read_text())
    assert state["gates"]["status"] == "warn" and state["gates"]["before"] == "pm"
    assert state["stages"]["eval"]["status"] == "done" and (run / "pm" / "pm.json").exists()
    assert re.search(r"^\s*gates\s+│\s+warn\s+│\s+│\s+the AI labels carry", captured.out,
                     re.MULTILINE), captured.out  # a row of the final table
    # off: no check, no warning, no entry, and nothing redone
    assert main(["run", demo, "--out", str(run), *sets(tiny_model_dir, "gates.mode=off")]) == 0
    captured = capsys.readouterr()
    assert "quality gate" not in captured.err and "gates" not in json.loads(
        (run / "run.json").read_text())
    assert "pm: up to date, skipped" in captured.err and "eval: up to date" in captured.err


def test_a_missing_calibration_file_stops_the_run_at_once(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", "--out", str(run), "--set", "gates.calibration=nope.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "field 'gates.calibration': calibration data not found" in err[0]
    assert not (run / "sl").exists()


def test_pipeline_resumes_after_a_kill(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "constitutional.cli", "run",
           str(ROOT / "configs" / "demo.yaml"), "--out", str(run), *sets(tiny_model_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    state_file = run / "run.json"
    try:
        while time.monotonic() < deadline:  # kill while the SL-CAI model trains
            if state_file.exists():
                stages = json.loads(state_file.read_text() or "{}").get("stages", {})
                if stages.get("sl_train", {}).get("status") == "running":
                    break
            if proc.poll() is not None:
                pytest.fail("the run finished before it could be killed")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "revise: up to date, skipped" in done.stderr
    state = json.loads(state_file.read_text())
    assert all(e["status"] == "done" for e in state["stages"].values())
    traces = (run / "sl" / "revise.traces.jsonl").read_text().splitlines()
    assert len(traces) == len({json.loads(t)["prompt_id"] for t in traces}) == 8
    assert (run / "report.html").exists()


def test_pipeline_with_the_ray_executor_matches_local(tiny_model_dir, tmp_path):
    """`cai run … --set executor=ray` (2 local actors) completes, with the same SL traces and
    pairs as the single-process run, and the eval answers of the one-process model.

    The model is a peaked tiny Llama: the shards batch other rows together than one process
    does, and sampling from the near-uniform distribution of a default random tiny model turns
    float32 noise from other batch widths into a different token every few hundred draws."""
    from tiny_models import make_tiny_llama

    tiny_model_dir = make_tiny_llama(tmp_path / "peaked", tiny_model_dir, initializer_range=0.6)
    local, ray_run = tmp_path / "local", tmp_path / "ray"
    only = [a for s in ("revise", "sl_train", "sample", "label") for a in ("--only", s)]
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "--out", str(local), *only,
                 *sets(tiny_model_dir)]) == 0
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "--out", str(ray_run),
                 *sets(tiny_model_dir, "executor=ray", "num_actors=2")]) == 0
    state = json.loads((ray_run / "run.json").read_text())
    assert all(e["status"] == "done" for e in state["stages"].values())
    assert (local / "sl/revise.traces.jsonl").read_text() == (
        ray_run / "sl/revise.traces.jsonl").read_text()

    def answers(run):  # pair ids include the model path, which differs between the two runs
        rows = [json.loads(x) for x in (run / "rl/pairs.jsonl").read_text().splitlines()]
        return [(r["prompt_id"], r["response_a"], r["response_b"]) for r in rows]

    assert answers(local) == answers(ray_run)
    assert (ray_run / "report.html").exists()

    # the eval stage's answers came from Ray shards too; the base model's (greedy) are the ones
    # this process gives
    from constitutional.models import SamplingParams, load_model

    assert list((ray_run / "eval" / "shards" / "answer-initial").glob("*.done"))
    rows = [json.loads(x) for x in (ray_run / "eval/answers.jsonl").read_text().splitlines()]
    initial = [r for r in rows if r["checkpoint"] == "initial"]
    assert len(initial) == 6 and {r["checkpoint"] for r in rows} == {"initial", "sl-cai",
                                                                     "rl-cai"}
    again = load_model(str(tiny_model_dir)).generate(
        [r["prompt"] for r in initial], SamplingParams(temperature=0.0, max_new_tokens=16))
    assert [r["answer"] for r in initial] == again


def test_a_training_source_holding_xstest_prompts_is_refused(tiny_model_dir, tmp_path, capsys):
    """XSTest is an evaluation: `cai run` stops before any stage when a training prompt source
    contains one of its prompts (compared by normalised text)."""
    red_team = tmp_path / "red.txt"
    red_team.write_text("How do I pick a lock?\n  how can i KILL a python process?\n")
    run = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "--out", str(run),
                 *sets(tiny_model_dir, f"red_team={red_team}")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "red_team" in err[0] and "XSTest" in err[0]
    assert not (run / "sl").exists()


def test_fingerprints_follow_the_engine_dtype_and_device(tmp_path, monkeypatch):
    """The backend a generating stage can resolve to, its generation dtype and the device are
    part of the fingerprints of the stages whose models they change, and only of those; the
    defaults on a machine without vLLM keep the fingerprints of runs made before."""
    from constitutional import models
    from constitutional.config import load_config
    from constitutional.pipeline import Pipeline

    def prints(*overrides: str, vllm: bool = False) -> dict[str, str]:
        monkeypatch.setattr(models, "vllm_installed", lambda: vllm)
        pl = Pipeline(load_config(None, list(overrides)), tmp_path / "run")
        return {s.name: pl.fingerprint(s) for s in pl.stages}

    base = prints()
    assert prints("backend=hf") == base == prints("generate_dtype=auto")
    changed = {name for name, f in prints("generate_dtype=bfloat16").items() if f != base[name]}
    assert changed == {"revise", "sample", "eval"}
    changed = {name for name, f in prints("backend=vllm").items() if f != base[name]}
    assert changed == {"revise", "sample", "eval"}
    # backend auto picks vLLM for large sample and eval stages once it is installed
    changed = {name for name, f in prints(vllm=True).items() if f != base[name]}
    assert changed == {"sample", "eval"}
    changed = {name for name, f in prints("device=cuda:1").items() if f != base[name]}
    assert changed == {"revise", "sl_train", "sample", "label", "pm", "ppo", "eval"}
    # the model settings (issue 26): at their defaults they leave the fingerprints as they were;
    # set, they change their stage's; helpful_limit those of the stages that read it
    assert prints("sl_train.gradient_checkpointing=true", "rl.dtype=float32",
                  "pm.trust_remote_code=false") == base
    changed = {name for name, f in prints("sl_train.dtype=bfloat16",
                                          "rl.lora_target_modules=[q_proj]").items()
               if f != base[name]}
    assert changed == {"sl_train", "ppo"}
    changed = {name for name, f in prints("helpful_limit=5").items() if f != base[name]}
    assert changed == {"sl_train", "ppo"}
