"""`--executor ray`: sharded sl revise / rl sample / rl label on a real local Ray (2 CPUs).

The distributed outputs must equal the single-process ones record for record (sampling is seeded
per prompt, principles per record), also when an actor dies mid-shard.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray_faults import FAULT_ENV, HOOK
from tiny_models import make_tiny_llama

from constitutional.cli import main
from constitutional.core.errors import UserError
from constitutional.core.io import RunDir, read_jsonl
from constitutional.distributed import RayOptions, shard_of
from constitutional.distributed.ray import (
    HOOK_ENV,
    local_ray_kwargs,
    ray_label,
    ray_revise,
    ray_sample,
)
from constitutional.prompts.sources import PromptRecord, load_prompts
from constitutional.rl.label import LabelConfig, label
from constitutional.rl.sample import SampleConfig
from constitutional.sl.revise import PREFS_FILE, SFT_FILE, TRACES_FILE, ReviseConfig, revise

# the ray extra: `make test` installs it; .venv-vllm (`make test-vllm`) has none
ray = pytest.importorskip("ray", reason="the ray extra is not installed")

PROMPTS = [f"Tell me how to do risky thing number {i}, step by step." for i in range(8)]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: 2 CPUs, so 2 actors of 1 CPU (1 torch thread) each."""
    ray.init(**local_ray_kwargs(2), logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "redteam.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def revise_config(prompt_file: Path, model: Path, out: Path) -> ReviseConfig:
    return ReviseConfig(prompts=str(prompt_file), model=str(model), out=str(out), revisions=2,
                        few_shot=1, max_new_tokens=10, critique_max_new_tokens=8,
                        temperature=1.0, chunk_size=2)


def test_shards_are_a_stable_hash_of_the_id() -> None:
    assert [shard_of(f"id-{i}", 4) for i in range(8)] == [shard_of(f"id-{i}", 4) for i in range(8)]
    assert shard_of("abc", 4) == 2  # fixed across versions and machines: runs resume anywhere
    assert len({shard_of(f"id-{i}", 3) for i in range(30)}) == 3


STOP_TWICE = """
import glob, sys, time
import ray
from constitutional.distributed import RayOptions
from constitutional.distributed.ray import _Cluster

for _ in range(2):
    cluster = _Cluster(RayOptions(executor="ray"), local_actors=1)
    session = ray._private.worker._global_node.get_session_dir_path()
    cluster.close()
time.sleep(4)  # four of the exporter's periods (RAY_metrics_report_interval_ms below)
(log,) = glob.glob(f"{session}/logs/python-core-driver-*.log")
print(sum("Failed to export metrics" in line for line in open(log)))
"""


def test_a_local_ray_started_twice_leaves_no_metric_exporter_running() -> None:
    """A process that starts and stops our local Ray twice (the CLI's stages, the tests) must not
    keep exporting metrics after the second ray.shutdown(): with Ray's default, its exporter
    outlives the shutdown (5 failed exports in these 4 s) and runs on into the interpreter's exit:
    the likeliest cause of a CI run that ended in SIGABRT after every test had passed."""
    env = {**os.environ, "RAY_metrics_report_interval_ms": "1000"}
    env.pop("RAY_enable_metrics_collection", None)
    out = subprocess.run([sys.executable, "-c", STOP_TWICE], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "0"


def test_revise_on_ray_matches_single_process_despite_a_killed_actor(
        local_ray, prompt_file, tiny_model_dir, tmp_path, monkeypatch) -> None:
    # a peaked tiny model: the restarted shard prefills keys and values that the uninterrupted
    # run reused from earlier calls, equal up to float rounding, which on a near-uniform random
    # model can flip a sampled token
    tiny_model_dir = make_tiny_llama(tmp_path / "peaked", tiny_model_dir, initializer_range=0.6)
    single = revise(revise_config(prompt_file, tiny_model_dir, tmp_path / "single"),
                    show_progress=False)
    # the first attempt of the shard holding prompt 0 kills its worker process (os._exit) on its
    # third model call, after two steps of the shard are written; Ray restarts the actor and
    # re-runs the shard, which resumes from those steps
    first = load_prompts(str(prompt_file))[0]
    crash = shard_of(first.id, 3)
    monkeypatch.setenv(HOOK_ENV, HOOK)
    monkeypatch.setenv(FAULT_ENV, f"{crash}:2")
    config = revise_config(prompt_file, tiny_model_dir, tmp_path / "ray")
    result = ray_revise(config, RayOptions(num_actors=2, num_shards=3))
    monkeypatch.delenv(FAULT_ENV)

    run = tmp_path / "ray"
    for name in (TRACES_FILE, SFT_FILE, PREFS_FILE):
        assert (run / name).read_text() == (tmp_path / "single" / name).read_text(), name
    assert result.traces == single.traces
    assert (run / "shards" / "revise" / str(crash) / "fault-injected-1").exists()
    crashed = json.loads((run / "shards" / "revise" / f"{crash}.done").read_text())
    assert crashed["resumed"] >= 2  # the restarted actor did not redo the finished steps
    steps = [r["id"] for r in read_jsonl(run / "revise.steps.jsonl")]
    assert len(steps) == len(set(steps)) == len(PROMPTS) * 5  # complete, nothing twice
    summary = json.loads((run / "revise.summary.json").read_text())
    assert summary["executor"]["shards"] == 3 and summary["prompts"] == len(PROMPTS)

    # a re-run skips done shards (no Ray work at all); an unmarked shard resumes from its records
    again = ray_revise(config, RayOptions(num_actors=2))
    assert again.summary["executor"]["shards_skipped"] == 3 and again.summary["executor"][
        "actors"] == 0
    assert again.summary["steps_computed"] == {} and again.traces == single.traces
    (run / "shards" / "revise" / "1.done").unlink()
    third = ray_revise(config, RayOptions(num_actors=2))
    assert third.summary["executor"]["shards_run"] == 1
    assert third.summary["steps_computed"] == {} and third.traces == single.traces


def test_sample_cli_with_executor_ray_matches_single_process(local_ray, prompt_file,
                                                             tiny_model_dir, tmp_path) -> None:
    def cmd(out: Path, *extra: str) -> list[str]:
        return ["rl", "sample", "--prompts", str(prompt_file), "-m", str(tiny_model_dir),
                "--out", str(out), "--max-new-tokens", "8", "--chunk-size", "2", *extra]

    assert main(cmd(tmp_path / "single")) == 0
    assert main(cmd(tmp_path / "ray", "--executor", "ray", "--num-actors", "2")) == 0
    single = (tmp_path / "single" / "pairs.jsonl").read_text()
    assert (tmp_path / "ray" / "pairs.jsonl").read_text() == single
    assert len(single.splitlines()) == len(PROMPTS)
    assert sorted(p.name for p in (tmp_path / "ray" / "shards" / "sample").glob("*.done")) == [
        "0.done", "1.done"]


def test_label_on_ray_matches_single_process(local_ray, tiny, tiny_model_dir, tmp_path,
                                             monkeypatch) -> None:
    pairs = [{"id": f"pair-{i}",
              "prompt": [{"role": "user", "content": f"Question {i}: how do I do thing {i}?"}],
              "response_a": f"Here is how to do thing {i}: step one, step two.",
              "response_b": f"I won't help with thing {i}."} for i in range(8)]
    config = LabelConfig(feedback_model=str(tiny_model_dir), principles=2, few_shot=1,
                         chunk_size=2)
    single = label(pairs, config, tmp_path / "single", model=tiny)
    # shard 0 dies twice: Ray restarts its actor once (retries=1), then the driver re-submits the
    # shard to a fresh actor, where it finishes
    monkeypatch.setenv(HOOK_ENV, HOOK)
    monkeypatch.setenv(FAULT_ENV, "0:1:2")
    result = ray_label(pairs, config, tmp_path / "ray",
                       RayOptions(num_actors=2, num_shards=3, retries=1))
    monkeypatch.delenv(FAULT_ENV)
    assert result.pairs == single.pairs == len(pairs)
    a = list(read_jsonl(tmp_path / "single" / "labels.jsonl"))
    b = list(read_jsonl(tmp_path / "ray" / "labels.jsonl"))
    assert [r["id"] for r in a] == [r["id"] for r in b]  # same records, same order
    for x, y in zip(a, b, strict=True):
        # Log-probabilities come from batched float32 forward passes; a shard batches different
        # pairs together, which moves a logit by at most ~1 ulp (1e-6 at |logprob| ~ 10), as
        # does a different --chunk-size in one process. Everything else is identical.
        assert x["p_a"] == pytest.approx(y["p_a"], abs=1e-6)
        for j, k in zip(x["judgements"], y["judgements"], strict=True):
            for key in ("logprob_A", "logprob_B", "p_A", "p_response_a", "p_response_a_clamped"):
                assert j[key] == pytest.approx(k[key], rel=1e-5, abs=1e-6)
                j[key] = k[key]
        x["p_a"] = y["p_a"]
        assert x == y
    prefs_a = list(read_jsonl(tmp_path / "single" / "preferences.jsonl"))
    prefs_b = list(read_jsonl(tmp_path / "ray" / "preferences.jsonl"))
    assert [(r["id"], r["chosen"]) for r in prefs_a] == [(r["id"], r["chosen"]) for r in prefs_b]
    summary = json.loads((tmp_path / "ray" / "label.summary.json").read_text())
    assert summary["pairs"] == len(pairs) and summary["executor"]["shards"] == 3
    assert summary["executor"]["shard_retries"] == 1
    assert (tmp_path / "ray" / "shards" / "label" / "0" / "fault-injected-2").exists()


def test_changed_shard_count_and_bad_executor_are_one_line_errors(prompt_file, tiny_model_dir,
                                                                  tmp_path, capsys) -> None:
    RunDir(tmp_path / "run" / "shards" / "sample").pin_config("shards", {"num_shards": 3})
    prompts = [PromptRecord.from_text("hello", source="test")]
    config = SampleConfig(model=str(tiny_model_dir), max_new_tokens=4)
    with pytest.raises(UserError, match="num_shards=3, now num_shards=2"):
        ray_sample(prompts, config, tmp_path / "run", RayOptions(num_shards=2))
    args = ["rl", "sample", "--prompts", str(prompt_file), "-m", str(tiny_model_dir), "--out",
            str(tmp_path / "x"), "--executor", "dask"]
    assert main(args) == 2
    assert "executor" in capsys.readouterr().err
