"""`make gpu-check` (bench/gpu_check.py, configs/gpu.yaml) on a machine without a GPU: the
script says it needs one and exits 0; the config is a valid run config of every stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
NO_GPU = "gpu-check needs a CUDA GPU; none here (torch.cuda.is_available() is False)"


@pytest.mark.parametrize("args", [[], ["--model", "some/model", "--set", "rl.steps=1"]])
def test_without_a_gpu_it_says_so_and_exits_0(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MODEL", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "run"), *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == NO_GPU
    assert not (tmp_path / "run").exists()  # nothing was started


def test_gpu_config_is_a_valid_run_of_every_stage(tmp_path: Path) -> None:
    from constitutional.config import RunConfig, load_config
    from constitutional.pipeline import Pipeline

    config = load_config(ROOT / "configs" / "gpu.yaml", ["model=/models/llama-3.1-8b-instruct"])
    assert isinstance(config, RunConfig)
    assert config.model == "/models/llama-3.1-8b-instruct"
    assert (config.device, config.backend, config.generate_dtype) == ("cuda", "vllm", "bfloat16")
    assert config.sl_train.lora and config.rl.lora  # a 7–8B policy trains as LoRA adapters
    assert config.vllm.for_stage("eval").gpu_memory_utilization == 0.5
    assert config.red_team_limit <= 16 and config.rl.steps <= 2  # small: a check, not a run
    stages = [s.name for s in Pipeline(config, tmp_path / "run").stages]
    assert stages == ["revise", "sl_train", "sample", "label", "pm", "ppo", "eval"]
