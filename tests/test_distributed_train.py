"""Training under `accelerate launch`: 2 CPU processes (gloo) match 1 process.

`run_accelerate` launches any `cai` command the way a user does on a multi-GPU machine
(`accelerate launch --config_file configs/accelerate/… -m constitutional …`), here with
`configs/accelerate/cpu_2proc.yaml`. SFT, the preference model, DPO and PPO each train once on
one process and once on two with the same global batch; the losses and the final weights must
agree to float32 rounding.

Why the tolerances are what they are (all four tests). Same rows, same order, and every loss
averaged over the whole global batch, so the gradients are mathematically equal; only float32
summation order differs (one batched sum vs two partial sums + a gloo all-reduce, and other
padding widths). Measured: relative loss differences ~1e-7 (float32 eps) and weights within
~1e-7. We allow rel 1e-4 on the losses and 1e-5 absolute on the weights, which training moves by
~1e-3 or more: far above rounding noise, far below what a real bug gives. Examples of such bugs,
each of which changes the losses in the second or third digit: per-process instead of global
token averaging, a different sample order, a dropped shard, or a process that trains without
gradient synchronisation, which is what `trainer.evaluate()` before `trainer.train()` caused
(the evaluation prepares the model, and `train()` then skips the DDP wrapper).
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
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
ACCELERATE = Path(sys.executable).parent / "accelerate"


def run_accelerate(args: list[str], nproc: int, *, timeout: float = 600,
                   config: Path = CPU_CONFIG) -> str:
    """Run ``cai ARGS`` under ``accelerate launch`` with ``nproc`` processes (CPU ones with the
    default ``config``); return stdout.

    Both 1 and N processes go through the same launcher (torchrun), so the only difference
    between the runs is the number of processes.
    """
    from conftest import free_port

    cmd = [str(ACCELERATE), "launch", "--config_file", str(config), "--num_processes",
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


def weight_gap(base: Path, one: Path, two: Path) -> tuple[float, float]:
    """How far training moved the weights (1 process), and how far 2 processes ended from 1."""
    from safetensors.torch import load_file

    w0, w1, w2 = (load_file(str(d / "model.safetensors")) for d in (base, one, two))
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1 if k in w0)
    differ = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    return moved, differ


def train_losses(metrics: dict) -> list[float]:
    return [e["loss"] for e in metrics["train_log"] if "loss" in e]


@pytest.mark.slow
def test_sft_on_two_processes_matches_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    from constitutional.core.io import stable_hash
    from constitutional.prompts.sources import split_of

    # 20 training rows (divisible by the global batch) and a held-out set, as `sl train` splits
    # them by id: with a held-out set the trainer evaluates before training, which is what once
    # left the model without its DDP wrapper
    rows, n_train = [], 0
    for i, row in enumerate(sft_rows(60)):
        row["id"] = stable_hash("sft", i)
        is_train = split_of(row["id"], 0.2) == "train"
        if is_train and n_train == 20:
            continue
        n_train += is_train
        rows.append(row)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def train(nproc: int, per_device_batch: int) -> tuple[dict, str]:
        out = tmp_path / f"model-{nproc}"
        stdout = run_accelerate(
            ["sl", "train", "--data", str(data), "-m", str(tiny_model_dir), "--out", str(out),
             "--epochs", "3", "--batch-size", str(per_device_batch), "--eval-fraction", "0.2",
             "--learning-rate", "1e-3"], nproc)
        return json.loads((out / "sl_train.json").read_text())["metrics"], stdout

    # the same global batch (4): 4 on one process, 2 on each of two; batch i of 4 = batches 2i,
    # 2i+1 of 2 split over the ranks; the loss is averaged over the tokens of the whole global
    # batch (transformers' average_tokens_across_devices)
    one, _ = train(1, 4)
    two, stdout = train(2, 2)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert stdout.count("sl train ·") == 1  # only the main process reports
    assert one["steps"] == two["steps"] == 15
    losses_1, losses_2 = train_losses(one), train_losses(two)
    assert len(losses_1) == 3 and losses_2 == pytest.approx(losses_1, rel=1e-4)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    assert two["eval_loss_after"] == pytest.approx(one["eval_loss_after"], rel=1e-4)
    assert one["eval_loss_after"] < one["eval_loss_before"]  # it did learn
    moved, differ = weight_gap(tiny_model_dir, tmp_path / "model-1", tmp_path / "model-2")
    assert moved > 1e-3 and differ < 1e-5, (moved, differ)


@pytest.mark.slow
def test_pm_on_two_processes_matches_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The soft-label PM: 48 training comparisons, global batch 8 (8 × 1 process, 4 × 2)."""
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
    losses_1, losses_2 = train_losses(one), train_losses(two)
    assert len(losses_1) >= 2 and losses_2 == pytest.approx(losses_1, rel=1e-4)
    # (not `train_loss`: the Trainer adds the steps after the last logging step from the main
    # process's own losses, so with 12 steps logged every 5 it is partly one process's figure)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    assert one["eval_loss"] < one["eval_loss_before"] and one["eval_accuracy"] >= 0.9
    moved, differ = weight_gap(tiny_model_dir, tmp_path / "pm-1", tmp_path / "pm-2")
    assert moved > 1e-3 and differ < 1e-5, (moved, differ)


@pytest.mark.slow
def test_dpo_on_two_processes_matches_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """TRL's DPOTrainer with our soft-label orientation: 40 training pairs, global batch 8."""
    from test_pm import marker_pairs

    from constitutional.core.io import stable_hash
    from constitutional.prompts.sources import split_of
    from constitutional.rl.preference import load_comparisons

    data = marker_pairs(tmp_path / "all.jsonl", n=200)
    lines = data.read_text().splitlines()
    ids = [c.id for c in load_comparisons(data)]
    # 40 training and 8 held-out pairs (the split is by id): whole global batches, so that no
    # process pads its last batch with repeated pairs and the held-out means average equal batches
    keep, count = [], {"train": 0, "test": 0}
    for line, cid in zip(lines, ids, strict=True):
        split = split_of(stable_hash(cid), 0.1)
        if count[split] < {"train": 40, "test": 8}[split]:
            count[split] += 1
            keep.append(line)
    assert count == {"train": 40, "test": 8}
    labels = tmp_path / "prefs.jsonl"
    labels.write_text("\n".join(keep) + "\n")

    def train(nproc: int, per_device_batch: int) -> dict:
        out = tmp_path / f"dpo-{nproc}"
        run_accelerate(["rl", "train", "--algo", "dpo", "--labels", str(labels), "--policy",
                        str(tiny_model_dir), "--out", str(out), "--epochs", "2",
                        "--batch-size", str(per_device_batch), "--learning-rate", "1e-3"], nproc)
        return json.loads((out / "dpo.json").read_text())["metrics"]

    one, two = train(1, 8), train(2, 4)
    assert (one["train_pairs"], one["eval_pairs"]) == (40, 8) and one["steps"] == two["steps"] == 10
    losses_1, losses_2 = train_losses(one), train_losses(two)
    assert len(losses_1) >= 2 and losses_2 == pytest.approx(losses_1, rel=1e-4)
    assert two["eval_margin"] == pytest.approx(one["eval_margin"], rel=1e-4)
    assert one["eval_margin"] > one["eval_margin_before"] + 0.1  # it did learn
    moved, differ = weight_gap(tiny_model_dir, tmp_path / "dpo-1", tmp_path / "dpo-2")
    assert moved > 1e-3 and differ < 1e-5, (moved, differ)


@pytest.mark.slow
@pytest.mark.parametrize("value_train, steps", [("head", 2), ("full", 2)])
def test_ppo_on_two_processes_matches_one_process(tiny_model_dir: Path, tmp_path: Path,
                                                 value_train: str, steps: int) -> None:
    """Our PPO, with each critic: 8 prompts per step (8 on one process, 4 + 4 on two), one
    minibatch per epoch.
    Each process samples its own prompts (sampling is seeded per prompt, so the answers do not
    depend on the process), advantages are whitened over the whole rollout and the token means
    are taken over all processes' tokens, so the updates are the one-process updates.

    The policy is a peaked tiny Llama: sampling from a near-uniform distribution over 49k tokens
    turns float32 noise (other batch widths on other processes) into a different token every few
    hundred draws, which would make the runs part for a reason that has nothing to do with
    training. Two steps for the same reason: at lr 1e-3 the policy is 1.7 nats from the
    reference after step 2, and at step 3 (measured) the two runs' samples part (reward_mean
    -0.536 against -0.560, both answers 12 tokens). With one joint clip they parted at step 4;
    clipped apart, the critic's gradient (norm 0.17) is no longer scaled down by the policy's
    (17), so the critic, and with it the advantages, move further per step.
    Rollouts in float32: in bfloat16 (the default on CPUs that have it) that noise is far
    larger, and the two runs' samples part by step 3 (measured: reward_mean -0.678 against
    -0.580), as they would for any two batchings. With the value head alone (value_train: head)
    the two runs' samples part at step 3 for the same reason (measured: head weights equal to
    1.5e-7 after step 2, then one token flips), so that run takes 2 steps. Its head is called
    outside DDP; without our all-reduce of its gradients the runs part at step 1
    (value_loss 0.14117 against 0.14065)."""
    from tiny_models import make_tiny_llama, make_tiny_pm

    policy = make_tiny_llama(tmp_path / "policy", tiny_model_dir, initializer_range=0.6)
    pm = make_tiny_pm(tmp_path / "pm", tiny_model_dir, seed=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about thing {i}, please."}) + "\n"
                               for i in range(16)))

    def train(nproc: int) -> list[dict]:
        out = tmp_path / f"ppo-{nproc}"
        run_accelerate(["rl", "train", "--algo", "ppo", "--policy", str(policy), "--pm",
                        str(pm), "--prompts", str(prompts), "--out", str(out), "--steps",
                        str(steps),
                        "--rollout-batch", "8", "--minibatch", "8", "--ppo-epochs", "2",
                        "--max-new-tokens", "12", "--learning-rate", "1e-3", "--kl-coef",
                        "0.05", "--rollout-dtype", "float32", "--value-train", value_train],
                       nproc)
        return [json.loads(line) for line in (out / "ppo_log.jsonl").read_text().splitlines()]

    one, two = train(1), train(2)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, steps + 1))
    for a, b in zip(one, two, strict=True):
        for key in ("reward_mean", "score_mean", "kl", "policy_loss", "value_loss",
                    "response_len", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert max(abs(r["kl"]) for r in one) > 1e-4  # the policy did move away from the reference
    moved, differ = weight_gap(policy, tmp_path / "ppo-1", tmp_path / "ppo-2")
    # float32 sums in another order on two processes: 1.1e-5 with the lock's versions (torch
    # 2.13.0, accelerate 1.15.0, transformers 5.23.0), on this code and on the code before it;
    # still 500x below how far the weights moved
    assert moved > 1e-3 and differ < 3e-5, (moved, differ)
    from safetensors.torch import load_file

    heads = [load_file(str(d / "checkpoints" / f"step-{steps}" / "value.safetensors"))
             ["score.weight"] for d in (tmp_path / "ppo-1", tmp_path / "ppo-2")]
    start = load_file(str(pm / "model.safetensors"))["score.weight"]
    assert (heads[0] - start).abs().max() > 1e-3  # the critic learned
    assert (heads[0] - heads[1]).abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_grpo_on_two_processes_matches_one_process(tiny_model_dir: Path, tmp_path: Path,
                                                  algo: str) -> None:
    """`cai rl grpo` / `rloo` (TRL's trainers, our engine sampling): 4 prompts × 2 answers per
    step, all 8 on one process, 4 + 4 (two whole groups each) on two. Our engine seeds each
    answer by (step, prompt, sample), so both runs sample the same answers, and TRL gathers the
    rewards before the group advantages: the updates are the one-process updates. A peaked
    policy, float32 rollouts and prompts of one length, for the reasons in the PPO test above;
    two steps, because at lr 1e-3 float32 noise flips one of the 96 tokens sampled in step 3
    (measured: reward_mean -0.333 against -0.309; steps 1 and 2 equal)."""
    from tiny_models import make_tiny_llama, make_tiny_pm

    policy = make_tiny_llama(tmp_path / "policy", tiny_model_dir, initializer_range=0.6)
    pm = make_tiny_pm(tmp_path / "pm", tiny_model_dir, seed=1)
    prompts = tmp_path / "prompts.jsonl"
    # prompts of one token length: no padding, so both layouts compute the same float sums
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about thing {c}, please."})
                               + "\n" for c in "ABCDEFGHIJKLMNOP"))

    def train(nproc: int) -> list[dict]:
        out = tmp_path / f"{algo}-{nproc}"
        run_accelerate(["rl", algo, "--policy", str(policy), "--pm", str(pm), "--reward", "pm",
                        "--prompts", str(prompts), "--out", str(out), "--steps", "2",
                        "--prompts-per-step", "4", "--group-size", "2", "--max-new-tokens",
                        "12", "--learning-rate", "1e-3", "--beta", "0.05", "--rollout-dtype",
                        "float32", "--generation", "cai"], nproc)
        return [json.loads(line) for line in (out / f"{algo}_log.jsonl").read_text()
                .splitlines()]

    one, two = train(1), train(2)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        for key in ("reward_mean", "reward_std", "kl", "response_len", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert max(abs(r["kl"]) for r in one) > 1e-4  # the policy did move away from the reference
    moved, differ = weight_gap(policy, tmp_path / f"{algo}-1", tmp_path / f"{algo}-2")
    print(f"{algo}: weights moved {moved:.2e}; 2 processes against 1: {differ:.2e}")
    assert moved > 1e-3 and differ < 3e-5, (moved, differ)


# ------------------------------------------------------------------------------------------------
# the shared recipe (constitutional.train.run_trainer): the order distributed training needs

FSDP_ON_CPU = (
    "FSDP needs 2 GPUs here: accelerate (1.15) never runs FSDP on CPU. On a machine without "
    "CUDA our trainers run with use_cpu=True, PartialState(cpu=True) then makes the run "
    "MULTI_CPU over gloo, and AcceleratorState switches to DistributedType.FSDP only for GPU-type "
    "runs (MULTI_GPU, MULTI_NPU, ...): an FSDP config on CPU silently trains with DDP (with "
    "use_cpu=False, each process trains alone, DistributedType.NO). No error is raised either "
    "way, so the CPU test below checks the order FSDP and ZeRO-3 need instead.")


def fake_trl(events: list, main: bool) -> tuple[type, object, type, list]:
    """A TRL arguments class, a model loader and a trainer class that log what is done to them
    in ``events`` (``main``: whether the trainer's process is the main one)."""
    from types import SimpleNamespace

    class Args:
        def __init__(self, **kwargs: object) -> None:
            events.append("args")
            self.kwargs = kwargs

    class Model:
        def merge_and_unload(self) -> Model:
            events.append("merge")
            return self

        def save_pretrained(self, path: Path, **kwargs: object) -> None:
            events.append(("save_pretrained", Path(path)))

    def load_model(path: str, tokenizer: object, kwargs: dict) -> Model:
        events.append("model")
        assert tokenizer.pad_token is not None
        assert kwargs["trust_remote_code"] is False  # the model settings' from_pretrained kwargs
        return Model()

    class Trainer:
        def __init__(self, *, model: Model, args: Args, train_dataset: object,
                     eval_dataset: object, processing_class: object, peft_config: object,
                     **kwargs: object) -> None:
            events.append("trainer")
            self.model, self.args, self.peft_config, self.kwargs = model, args, peft_config, kwargs
            self.state = SimpleNamespace(log_history=[])
            self.accelerator = SimpleNamespace(wait_for_everyone=lambda: events.append("wait"))
            made.append(self)

        def remove_callback(self, callback: object) -> None:
            pass

        def add_callback(self, callback: object) -> None:
            pass

        def train(self, resume_from_checkpoint: object = None) -> SimpleNamespace:
            events.append(("train", resume_from_checkpoint))
            self.state.log_history = [{"step": 0, "eval_loss": 2.0, "eval_runtime": 0.1},
                                      {"step": 1, "loss": 1.5, "grad_norm": 3.0, "epoch": 1.0}]
            return SimpleNamespace(training_loss=1.234567, global_step=1)

        def evaluate(self) -> dict:
            events.append("evaluate")
            return {"eval_loss": 1.0}

        def save_model(self, path: str) -> None:
            events.append(("save_model", Path(path)))

        def is_world_process_zero(self) -> bool:
            return main

    made: list[Trainer] = []
    return Args, load_model, Trainer, made


@pytest.mark.parametrize(("lora", "main"), [(False, False), (True, True), (True, False)])
def test_recipe_loads_the_model_after_the_arguments_and_saves_on_every_process(
        tiny_model_dir: Path, tmp_path: Path, lora: bool, main: bool) -> None:
    """The training arguments come first (they set up the processes; DeepSpeed ZeRO-3 partitions
    only a model loaded after them); every process calls ``trainer.save_model`` (it gathers FSDP /
    ZeRO-3 shards, and only the main process writes); LoRA is merged by the main process only.
    (Under FSDP itself: :func:`test_sft_under_fsdp_saves_full_weights`, on GPUs.)"""
    from constitutional.train import LoraTrainSettings, TrainJob, TrainRun, run_trainer

    class Config(TrainRun, LoraTrainSettings):
        pass

    events: list = []
    args_class, load_model, trainer_class, made = fake_trl(events, main)
    out = tmp_path / "out"
    checkpoint = out / "checkpoints" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")  # written last: a complete checkpoint
    metrics = run_trainer(Config(lora=lora, lora_r=4, resume=True, seed=7), TrainJob(
        model=str(tiny_model_dir), out=out, trainer_class=trainer_class, args_class=args_class,
        learning_rate=1e-3, datasets=lambda tokenizer: (["train"], ["held out"]),
        load_model=load_model, args={"beta": 0.1},
        trainer_kwargs=lambda tokenizer: {"data_collator": "collator"},
        before={"loss_before": "eval_loss"}, after={"loss_after": "eval_loss"}))

    saves = ([("save_model", out / "adapter"), *(["merge", ("save_pretrained", out)] if main
                                                 else [])] if lora else [("save_model", out)])
    assert events == ["args", "model", "trainer", ("train", str(checkpoint)), "evaluate", *saves,
                      "wait"]
    trainer = made[0]
    assert trainer.args.kwargs["beta"] == 0.1 and trainer.args.kwargs["eval_on_start"]
    assert (trainer.args.kwargs["learning_rate"], trainer.args.kwargs["seed"]) == (1e-3, 7)
    assert trainer.kwargs == {"data_collator": "collator"}
    # LoRA's alpha defaults to twice the rank
    assert (trainer.peft_config.lora_alpha if lora else trainer.peft_config) == (8 if lora
                                                                                 else None)
    assert metrics == {"loss_before": 2.0, "train_loss": 1.2346, "steps": 1,
                       "train_log": [{"step": 0, "eval_loss": 2.0},
                                     {"step": 1, "loss": 1.5, "epoch": 1.0}],
                       "loss_after": 1.0}


@pytest.mark.slow
def test_sft_under_fsdp_saves_full_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`cai sl train` under FSDP (configs/accelerate/fsdp.yaml, 2 processes): the saved model is
    whole (gathered from the shards), loads with ``from_pretrained``, and has trained."""
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip(FSDP_ON_CPU)
    from transformers import AutoModelForCausalLM

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(24)))
    out = tmp_path / "model"
    run_accelerate(["sl", "train", "--data", str(data), "-m", str(tiny_model_dir), "--out",
                    str(out), "--epochs", "2", "--batch-size", "2", "--eval-fraction", "0",
                    "--learning-rate", "1e-3"], 2, config=FSDP_CONFIG)
    assert json.loads((out / "sl_train.json").read_text())["metrics"]["processes"] == 2
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert trained.keys() == base.keys()
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in base.items()}
    moved = max((trained[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3, moved
