"""``cai rl pm``, ``cai rl train`` and ``cai eval pm``: thin commands over
:mod:`constitutional.rl.preference`, :mod:`constitutional.rl.ppo` and :mod:`constitutional.rl.dpo`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from constitutional.cli_rl import BUILTIN, eval_app, rl_app
from constitutional.errors import UserError
from constitutional.logging_setup import err_console

out = Console()


@rl_app.command("pm")
def pm_cmd(
    labels: Annotated[str, typer.Option(help="A `cai rl label` run directory, or a JSONL of "
                                             "prompt/chosen/rejected rows (+ score = P(chosen)).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where the PM (a model directory) goes.")],
    model: Annotated[str, typer.Option("--model", "-m", help="The base model that gets the "
                                                             "scalar head.")] = BUILTIN,
    human_prefs: Annotated[str | None, typer.Option(
        help="Human helpfulness comparisons (hard labels): prompt/chosen/rejected JSONL or "
             "HH-RLHF transcripts.")] = None,
    human_ratio: Annotated[float, typer.Option(help="Share of human comparisons in the mix.")]
    = 0.5,
    epochs: Annotated[float, typer.Option(help="Training epochs.")] = 1.0,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-5,
    batch_size: Annotated[int, typer.Option(help="Comparisons per device batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    max_length: Annotated[int, typer.Option(help="Tokens per conversation at most.")] = 1024,
    eval_fraction: Annotated[float, typer.Option(help="Held-out share (accuracy).")] = 0.1,
    eval_steps: Annotated[int | None, typer.Option(help="Evaluate every N steps (default: "
                                                        "each epoch).")] = None,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest "
                                                          "checkpoint.")] = False,
) -> None:
    """Train the preference model on soft AI labels (+ human comparisons)."""
    from constitutional.rl.preference import PMConfig, pm_train

    config = PMConfig(labels=labels, model=model, out=str(out_dir), human_prefs=human_prefs,
                      human_ratio=human_ratio, epochs=epochs, learning_rate=learning_rate,
                      batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
                      eval_fraction=eval_fraction, eval_steps=eval_steps, save_steps=save_steps,
                      seed=seed, resume=resume)
    result = pm_train(config)
    m = result.metrics
    out.print(f"PM → {result.out_dir} · held-out accuracy {m['eval_accuracy_before']:.3f} → "
              f"{m['eval_accuracy']:.3f} ({m['eval_rows']} comparisons) · "
              f"{m['train_rows']} trained ({m['ai_comparisons']} AI, {m['human_comparisons']} "
              f"human available) · {m['wall_seconds']:.0f}s", markup=False, highlight=False,
              soft_wrap=True)


@eval_app.command("pm")
def eval_pm_cmd(
    pm: Annotated[Path, typer.Option(help="A preference model directory.")],
    data: Annotated[Path, typer.Option(help="Comparisons: prompt/chosen/rejected JSONL, HH-RLHF "
                                            "transcripts, or the paper's multiple-choice rows "
                                            "(text_correct/text_incorrect).")],
    out_path: Annotated[Path | None, typer.Option("--out", help="Per-row results (JSONL).")]
    = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N rows.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda …")] = None,
) -> None:
    """A preference model's accuracy on comparisons, with a 95% confidence interval."""
    import json

    from constitutional.rl.preference import evaluate_pm, load_pm
    from constitutional.store import atomic_write_jsonl, atomic_write_text

    if not data.is_file():
        raise UserError("not found", file=data)
    result = evaluate_pm(load_pm(pm, device=device), data, limit=limit)
    lo, hi = result.ci95
    target = out_path or pm / "eval" / f"{data.stem}.jsonl"
    atomic_write_jsonl(target, result.rows)
    atomic_write_text(target.with_suffix(".summary.json"), json.dumps({
        "pm": str(pm), "data": str(data), "accuracy": result.accuracy, "correct": result.correct,
        "n": result.n, "ci95": list(result.ci95), "at_chance": lo <= 0.5 <= hi,
        "n_skipped": len(result.skipped), "skipped": result.skipped}, indent=2) + "\n")
    out.print(f"accuracy {result.accuracy:.3f} ({result.correct}/{result.n}), 95% CI "
              f"[{lo:.3f}, {hi:.3f}] (Wilson) · {pm} · {data}", markup=False, highlight=False,
              soft_wrap=True)
    if lo <= 0.5 <= hi:
        out.print("at chance: the interval includes 50%, so this PM's preferences are not "
                  "distinguishable from a coin flip on this data", markup=False,
                  highlight=False, soft_wrap=True)
    if result.skipped:
        first = result.skipped[0]
        out.print(f"skipped {len(result.skipped)} row(s) that could not be used (first: line "
                  f"{first['line']}: {first['reason']}); all are listed in the summary",
                  markup=False, highlight=False, soft_wrap=True)


@rl_app.command("train")
def train_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory (the trained policy, "
                                                        "logs, checkpoints).")],
    algo: Annotated[str, typer.Option(help="ppo (the paper) or dpo (offline, lighter).")]
    = "ppo",
    policy: Annotated[str, typer.Option(help="The SL-CAI policy (directory or spec).")] = BUILTIN,
    pm: Annotated[str | None, typer.Option(help="PPO: the preference model directory.")] = None,
    prompts: Annotated[str | None, typer.Option(help="PPO: red-team prompts (spec).")] = None,
    helpful: Annotated[str | None, typer.Option(help="PPO: helpful prompts mixed in (spec).")]
    = None,
    helpful_ratio: Annotated[float, typer.Option(help="PPO: share of helpful prompts.")] = 0.5,
    labels: Annotated[str | None, typer.Option(help="DPO: a `cai rl label` run directory or a "
                                                    "preferences JSONL.")] = None,
    limit: Annotated[int | None, typer.Option(help="PPO: prompts per source at most.")] = None,
    steps: Annotated[int, typer.Option(help="PPO steps (rollout batches).")] = 20,
    rollout_batch: Annotated[int, typer.Option(help="PPO: prompts per step.")] = 16,
    minibatch: Annotated[int, typer.Option(help="PPO: minibatch size.")] = 8,
    ppo_epochs: Annotated[int, typer.Option(help="PPO: passes over each rollout batch.")] = 2,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    learning_rate: Annotated[float | None, typer.Option(
        help="Learning rate (default: PPO 1e-6; DPO 5e-7, or 5e-5 with LoRA).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="PPO: answer tokens at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="PPO: sampling temperature.")] = 1.0,
    kl_coef: Annotated[float, typer.Option(help="PPO: β, the KL penalty to the reference.")]
    = 0.05,
    adaptive_kl: Annotated[bool, typer.Option("--adaptive-kl", help="PPO: adapt β towards "
                                                                    "--target-kl.")] = False,
    target_kl: Annotated[float, typer.Option(help="PPO: the adaptive controller's target.")]
    = 6.0,
    vf_coef: Annotated[float, typer.Option(help="PPO: value loss weight.")] = 0.1,
    value_train: Annotated[str, typer.Option(help="PPO: 'full' (the whole value model learns) or "
                                                  "'head' (only its scalar head; faster).")]
    = "full",
    beta: Annotated[float, typer.Option(help="DPO: β.")] = 0.1,
    label_smoothing: Annotated[str, typer.Option(help="DPO: 'auto' (1 − mean label) or a "
                                                      "number.")] = "auto",
    min_confidence: Annotated[float, typer.Option(help="DPO: drop pairs labelled below this.")]
    = 0.55,
    epochs: Annotated[float, typer.Option(help="DPO: epochs.")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="DPO: pairs per device batch.")] = 4,
    lora: Annotated[bool, typer.Option("--lora", help="Train LoRA adapters (merged at the "
                                                      "end).")] = False,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the newest "
                                                                      "checkpoint.")] = True,
) -> None:
    """RL of the policy: PPO against the PM with a KL penalty (the paper), or offline DPO."""
    if algo == "ppo":
        from constitutional.rl.ppo import PPOConfig, ppo_train

        if pm is None or prompts is None:
            raise UserError("PPO needs --pm and --prompts", field="pm" if pm is None else
                            "prompts")
        config = PPOConfig(
            policy=policy, pm=pm, prompts=prompts, out=str(out_dir), helpful=helpful,
            helpful_ratio=helpful_ratio, limit=limit, steps=steps, rollout_batch=rollout_batch,
            minibatch=minibatch, ppo_epochs=ppo_epochs, grad_accum=grad_accum,
            learning_rate=learning_rate or 1e-6, max_new_tokens=max_new_tokens,
            temperature=temperature, kl_coef=kl_coef, adaptive_kl=adaptive_kl,
            target_kl=target_kl, vf_coef=vf_coef, value_train=value_train, lora=lora, save_steps=save_steps, seed=seed,
            resume=resume)
        table = Table("step", "reward", "PM score", "KL", "entropy", "clip", "len", "gen s",
                      "score s", "update s", title="PPO", show_edge=False)

        def on_step(row: dict) -> None:
            err_console.print(
                f"[dim]step {row['step']}/{steps} · reward {row['reward_mean']:.3f} · "
                f"KL {row['kl']:.3f} · entropy {row['entropy']:.2f}[/]")
            table.add_row(str(row["step"]), f"{row['reward_mean']:.3f}",
                          f"{row['score_mean']:.3f}", f"{row['kl']:.3f}",
                          f"{row['entropy']:.2f}", f"{row['clip_frac']:.3f}",
                          f"{row['response_len']:.1f}", f"{row['time_generate']:.1f}",
                          f"{row['time_score']:.1f}", f"{row['time_update']:.1f}")

        result = ppo_train(config, on_step=on_step)
        if table.row_count:
            out.print(table)
        out.print(f"PPO policy → {result.out_dir} · {result.steps} steps · log → "
                  f"{result.out_dir / 'ppo_log.jsonl'} · {result.seconds:.0f}s", markup=False,
                  highlight=False, soft_wrap=True)
    elif algo == "dpo":
        from constitutional.rl.dpo import DPOStageConfig, dpo_train

        if labels is None:
            raise UserError("DPO needs --labels", field="labels")
        smoothing: float | str = label_smoothing
        if label_smoothing != "auto":
            try:
                smoothing = float(label_smoothing)
            except ValueError:
                raise UserError(f"expected 'auto' or a number, got {label_smoothing!r}",
                                field="label_smoothing") from None
        config = DPOStageConfig(labels=labels, policy=policy, out=str(out_dir), beta=beta,
                                label_smoothing=smoothing, min_confidence=min_confidence,
                                epochs=epochs, learning_rate=learning_rate,
                                batch_size=batch_size, grad_accum=grad_accum, lora=lora,
                                save_steps=save_steps, seed=seed, resume=resume)
        result = dpo_train(config)
        m = result.metrics
        out.print(f"DPO policy → {result.out_dir} · {m['train_pairs']} pairs · label smoothing "
                  f"{m['label_smoothing']:.3f} · held-out margin {m.get('eval_margin_before')} "
                  f"→ {m.get('eval_margin')} · {m['wall_seconds']:.0f}s", markup=False,
                  highlight=False, soft_wrap=True)
    else:
        raise UserError(f"unknown algorithm {algo!r}; choose ppo or dpo", field="algo")
