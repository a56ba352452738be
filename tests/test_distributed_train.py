"""Training under `accelerate launch`: 2 CPU processes (gloo) match 1 process.

`run_accelerate` launches any `cai` command the way a user does on a multi-GPU machine
(`accelerate launch --config_file configs/accelerate/… -m constitutional …`), here with
`configs/accelerate/cpu_2proc.yaml`; the preference-model and RL trainers can be tested the same
way.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
ACCELERATE = Path(sys.executable).parent / "accelerate"


def run_accelerate(args: list[str], nproc: int, *, timeout: float = 600) -> str:
    """Run ``cai ARGS`` under ``accelerate launch`` with ``nproc`` CPU processes; return stdout.

    Both 1 and N processes go through the same launcher (torchrun), so the only difference
    between the runs is the number of processes.
    """
    from conftest import free_port

    cmd = [str(ACCELERATE), "launch", "--config_file", str(CPU_CONFIG), "--num_processes",
           str(nproc), "--main_process_port", str(free_port()), "-m", "constitutional", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows of different lengths, so the two processes see different token counts."""
    rng = random.Random(seed)
    words = ["safe", "kind", "help", "answer", "please", "thank", "refuse", "explain", "careful",
             "legal", "doctor", "learn"]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": [{"role": "user", "content": f"Question {i}: {text(3, 15)}"}],
             "completion": [{"role": "assistant", "content": text(4, 30)}]} for i in range(n)]


@pytest.mark.slow
def test_sft_on_two_processes_matches_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(20)))

    def train(nproc: int, per_device_batch: int) -> tuple[dict, str]:
        out = tmp_path / f"model-{nproc}"
        stdout = run_accelerate(
            ["sl", "train", "--data", str(data), "-m", str(tiny_model_dir), "--out", str(out),
             "--epochs", "3", "--batch-size", str(per_device_batch), "--eval-fraction", "0",
             "--learning-rate", "1e-3"], nproc)
        return json.loads((out / "sl_train.json").read_text())["metrics"], stdout

    # the same global batch (4): 4 on one process, 2 on each of two
    one, _ = train(1, 4)
    two, stdout = train(2, 2)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert stdout.count("sl train ·") == 1  # only the main process reports

    # Tolerance. Same rows, same order (seeded sampler, batch i of 4 = batches 2i, 2i+1 of 2
    # split over the ranks) and the loss averaged over the tokens of the whole global batch
    # (transformers' average_tokens_across_devices), so the gradients are mathematically equal;
    # only float32 summation order differs (one batched sum vs. two partial sums + a gloo
    # all-reduce). Measured: relative loss differences ~1e-7 (float32 eps) and weights within
    # 1.2e-7 after 15 steps. We allow rel 1e-4 on the losses and 1e-5 on the weights (training
    # moved them by ~8e-3): far above rounding noise, far below what a real bug gives (per-rank
    # instead of global token averaging, a different sample order, or a dropped shard of the data
    # change the loss in the second or third digit).
    losses_1 = [e["loss"] for e in one["train_log"] if "loss" in e]
    losses_2 = [e["loss"] for e in two["train_log"] if "loss" in e]
    assert len(losses_1) == len(losses_2) == 3 and one["steps"] == two["steps"] == 15
    assert losses_2 == pytest.approx(losses_1, rel=1e-4)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    assert losses_1[-1] < losses_1[0]  # it did learn

    w0 = load_file(str(tiny_model_dir / "model.safetensors"))
    w1 = load_file(str(tmp_path / "model-1" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "model-2" / "model.safetensors"))
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    differ = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert moved > 1e-3 and differ < 1e-5, (moved, differ)


@pytest.mark.slow
def test_pm_trains_on_two_processes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The soft-label PM under DDP with 2 CPU processes: it starts from the same weights as one
    process (the new head is seeded), trains, writes its files once, and separates the pairs.

    Not yet asserted: the same loss as one process. SFT matches to float32 rounding, but the
    PM's 2-process loss curve differs from the 1-process one by ~1–2% (0.510 vs 0.501 train
    loss), while 1 process with batch 4 × 2 accumulation matches batch 8 exactly; the cause is
    still open."""
    from test_pm import marker_pairs

    data = marker_pairs(tmp_path / "prefs.jsonl", n=64)

    def train(nproc: int, per_device_batch: int) -> dict:
        out = tmp_path / f"pm-{nproc}"
        run_accelerate(["rl", "pm", "--labels", str(data), "-m", str(tiny_model_dir), "--out",
                        str(out), "--epochs", "2", "--batch-size", str(per_device_batch),
                        "--eval-fraction", "0.25", "--learning-rate", "1e-3"], nproc)
        return json.loads((out / "pm.json").read_text())["metrics"]

    one, two = train(1, 8), train(2, 4)
    assert one["steps"] == two["steps"] == 12  # 48 train comparisons / global batch 8 × 2 epochs
    assert two["eval_loss_before"] == pytest.approx(one["eval_loss_before"], rel=1e-5)
    assert two["eval_loss"] < two["eval_loss_before"] and two["eval_accuracy"] >= 0.9
    assert (tmp_path / "pm-2" / "model.safetensors").exists()
