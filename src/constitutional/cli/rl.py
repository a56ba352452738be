"""``cai rl …``: the RL-CAI stages, in the paper's order: ``sample`` two answers per prompt,
``label`` them with AI feedback (``calibrate``: how often that labelling agrees with people),
train the preference model (``pm``), then ``ppo`` (the paper) or ``dpo`` (offline, lighter). ``rl train --algo ppo|dpo`` is kept for one
release."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from constitutional.cli.options import (
    DeviceOpt,
    OutOpt,
    RayOptions,
    err_console,
    model_options,
    of,
    out,
    print_line,
    ray_options,
    settings_command,
)
from constitutional.core import layout
from constitutional.core.errors import UserError
from constitutional.prompts.selection import PromptSelection
from constitutional.rl.calibrate import CalibrateConfig
from constitutional.rl.dpo import DPOStageConfig
from constitutional.rl.grpo import GRPOConfig
from constitutional.rl.label import LabelConfig
from constitutional.rl.ppo import PPOConfig
from constitutional.rl.preference import PMConfig
from constitutional.rl.sample import SampleConfig

rl_app = typer.Typer(
    help="RL-CAI: answer pairs, soft AI preference labels, the preference model, PPO or DPO.",
    no_args_is_help=True,
)
OUT = {"out": ["--out"]}


@settings_command(rl_app, "sample", PromptSelection, SampleConfig, RayOptions)
def sample_cmd(
    values: dict[str, Any],
    out_dir: OutOpt,
    device: DeviceOpt = None,
) -> None:
    """Two answers per prompt from MODEL: the pairs dataset (RUN/pairs.jsonl)."""
    from constitutional.models import load_model
    from constitutional.rl.sample import sample

    selection = of(PromptSelection, values)
    config = of(SampleConfig, {k: v for k, v in values.items() if k != "prompts"},
                prompts=selection.prompts)
    records = selection.load()
    ray = ray_options(values, device)
    if ray is not None:
        from constitutional.distributed.ray import ray_sample

        result = ray_sample(records, config, out_dir, ray)
    else:
        lm = load_model(config.model, **model_options(device)) if device else None
        result = sample(records, config, out_dir, model=lm)
    err_console.print(
        f"[dim]{result.generated} new pairs in {result.seconds:.1f}s "
        f"({result.pairs - result.generated} already done)"
        + (f", {result.identical} with identical answers" if result.identical else "") + "[/]")
    print_line(f"{result.pairs} pairs → {result.out / 'pairs.jsonl'}")


@settings_command(rl_app, "label", LabelConfig, RayOptions,
                  context_settings={"allow_extra_args": True})  # the HI of `--clamp LO HI`
def label_cmd(
    values: dict[str, Any],
    ctx: typer.Context,
    pairs: Annotated[str, typer.Option(help="A run directory from `rl sample` (its pairs.jsonl) "
                                            "or a JSONL file with prompt/response_a/response_b.")],
    out_dir: OutOpt,
    device: DeviceOpt = None,
) -> None:
    """Soft AI preference labels: p_a = P(response_a preferred), from option log-probabilities."""
    from constitutional.models import load_model
    from constitutional.rl.label import label, load_pairs

    config = of(LabelConfig, _with_clamp(values, ctx))
    rows = load_pairs(pairs)
    ray = ray_options(values, device)
    if ray is not None:
        from constitutional.distributed.ray import ray_label

        result = ray_label(rows, config, out_dir, ray)
    else:
        lm = load_model(config.feedback_model, **model_options(device)) if device else None
        result = label(rows, config, out_dir, model=lm)
    passes = result.stats.get("forward_passes")
    err_console.print(
        f"[dim]{result.labelled} pairs labelled in {result.seconds:.1f}s "
        f"({result.pairs - result.labelled} already done)"
        + (f", {passes} forward passes" if passes is not None else "") + "[/]")
    print_line(f"{result.pairs} labels → {result.out / 'labels.jsonl'} · preferences → "
               f"{result.out / 'preferences.jsonl'}")
    print_line(f"mean p_a {result.mean_p_a:.3f} · "
               + quality_line(result.position_bias_rate, result.order_agreement,
                              result.mean_abs_p_a_minus_half))


def _pct(x: float | None) -> str:
    return "n/a (one order)" if x is None else f"{x:.1%}"


def quality_line(bias: float | None, agreement: float | None, margin: float | None) -> str:
    """The label-quality figures in one line (`rl label`, `rl calibrate`)."""
    lean = "n/a" if margin is None else f"{margin:.3f}"
    return (f"position-bias rate {_pct(bias)} · order agreement {_pct(agreement)} · "
            f"mean |p_a − 0.5| {lean}")


def _with_clamp(values: dict[str, Any], ctx: typer.Context) -> dict[str, Any]:
    """``--clamp LO HI``: typer takes LO, the HI comes as an extra argument."""
    extra = list(ctx.args)
    if extra and "clamp" not in values:
        raise UserError(f"unexpected argument {extra[0]!r}")
    if extra:
        values["clamp"] = " ".join([values["clamp"], *extra])
    return values


@settings_command(rl_app, "calibrate", CalibrateConfig,
                  context_settings={"allow_extra_args": True})  # the HI of `--clamp LO HI`
def calibrate_cmd(
    values: dict[str, Any],
    ctx: typer.Context,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Directory for the rows and the summary (resumable); default "
                      "runs/calibrate/<data name>.")] = None,
    device: DeviceOpt = None,
) -> None:
    """The feedback model's accuracy on human-labelled comparisons, asked exactly as `rl label`
    asks: does it prefer the response people chose?"""
    from constitutional.models import load_model
    from constitutional.rl.calibrate import SUMMARY, calibrate

    config = of(CalibrateConfig, _with_clamp(values, ctx))
    target = out_dir or Path("runs") / "calibrate" / Path(config.data).stem
    lm = load_model(config.feedback_model, **model_options(device)) if device else None
    result = calibrate(config, target, model=lm)
    s = result.summary
    lo, hi = result.ci95
    ties = f", {s['ties']} ties counted as half" if s["ties"] else ""
    print_line(f"accuracy {s['accuracy']:.3f} ({s['correct']}/{s['n']} prefer the human-chosen "
               f"response{ties}), 95% CI [{lo:.3f}, {hi:.3f}] (Wilson) · "
               f"{config.feedback_model} · {config.data}")
    if s["verdict"] == "at chance":
        print_line("at chance: the interval contains 0.5, so this feedback model agrees with "
                   "people no more often than a coin flip: its labels carry no measurable signal")
    elif s["verdict"] == "below chance":
        print_line("below chance: the interval is below 0.5, so this feedback model prefers the "
                   "responses people rejected")
    print_line(quality_line(s["position_bias_rate"], s["order_agreement"],
                            s["mean_abs_p_a_minus_half"]))
    if s["n_skipped"]:
        first = s["skipped"][0]
        where = f"line {first['line']}" + (f" field {first['field']!r}" if first["field"] else "")
        print_line(f"skipped {s['n_skipped']} row(s) that could not be used (first: {where}: "
                   f"{first['reason']}); all are listed in the summary")
    err_console.print(f"[dim]{result.labelled} comparisons labelled "
                      f"({len(result.rows) - result.labelled} already done) in "
                      f"{s['seconds_this_call']:.1f}s[/]")
    print_line(f"per-row results → {result.out / 'calibrate.jsonl'} · summary → "
               f"{result.out / SUMMARY}")


@settings_command(rl_app, "pm", PMConfig, names={**OUT, "model": ["--model", "-m"]})
def pm_cmd(values: dict[str, Any]) -> None:
    """Train the preference model on soft AI labels (+ human comparisons)."""
    from constitutional.rl.preference import pm_train

    result = pm_train(PMConfig(**values))
    m = result.metrics
    print_line(f"PM → {result.out_dir} · held-out accuracy {m['eval_accuracy_before']:.3f} → "
               f"{m['eval_accuracy']:.3f} ({m['eval_rows']} comparisons) · "
               f"{m['train_rows']} trained ({m['ai_comparisons']} AI, "
               f"{m['human_comparisons']} human available) · {m['wall_seconds']:.0f}s")


@settings_command(rl_app, "ppo", PPOConfig, names=OUT)
def ppo_cmd(values: dict[str, Any]) -> None:
    """PPO of the policy against the PM with a KL penalty to the SL-CAI model (the paper)."""
    run_ppo(PPOConfig(**values))


@settings_command(rl_app, "grpo", GRPOConfig, names=OUT)
def grpo_cmd(values: dict[str, Any]) -> None:
    """GRPO (TRL's GRPOTrainer) of the policy against the PM, the constitution as a judge, or a
    callable (--reward), with a KL penalty to the starting policy."""
    run_online(GRPOConfig(**values, algo="grpo"))


@settings_command(rl_app, "rloo", GRPOConfig, names=OUT)
def rloo_cmd(values: dict[str, Any]) -> None:
    """RLOO (TRL's RLOOTrainer): GRPO's settings, leave-one-out baseline."""
    run_online(GRPOConfig(**values, algo="rloo"))


def run_online(config: GRPOConfig) -> None:
    from constitutional.rl.grpo import grpo_train

    names = list(config.reward)
    table = Table("step", "reward", *[f"reward/{n}" for n in names], "KL", "entropy", "len",
                  title=config.algo.upper(), show_edge=False)

    def cell(row: dict, key: str, f: str) -> str:
        value = row.get(key)
        return f"{value:{f}}" if isinstance(value, int | float) else "-"

    def on_step(row: dict) -> None:
        err_console.print(f"[dim]step {row['step']}/{config.steps} · reward "
                          f"{cell(row, 'reward_mean', '.3f')} · KL {cell(row, 'kl', '.3f')}[/]")

    result = grpo_train(config, on_step=on_step)
    for row in result.log:
        table.add_row(str(row["step"]), cell(row, "reward_mean", ".3f"),
                      *[cell(row, f"reward/{k}", ".3f") for k in
                        [c.removeprefix("reward/") for c in row if c.startswith("reward/")]],
                      cell(row, "kl", ".3f"), cell(row, "entropy", ".2f"),
                      cell(row, "response_len", ".1f"))
    if table.row_count:
        out.print(table)
    print_line(f"{config.algo.upper()} policy → {result.out_dir} · {len(result.log)} steps · "
               f"log → {result.out_dir / config.log_file} · {result.seconds:.0f}s")


@settings_command(rl_app, "dpo", DPOStageConfig, names=OUT)
def dpo_cmd(values: dict[str, Any]) -> None:
    """Offline DPO of the policy on the AI preference labels (lighter than PPO)."""
    run_dpo(DPOStageConfig(**values))


@settings_command(rl_app, "train", PPOConfig, DPOStageConfig, names=OUT, only_given=True,
                  hidden=True)
def train_cmd(
    values: dict[str, Any],
    algo: Annotated[str, typer.Option(help="ppo (the paper) or dpo (offline, lighter).")]
    = "ppo",
) -> None:
    """Deprecated: `rl ppo` or `rl dpo` (kept for one release)."""
    if algo not in ("ppo", "dpo"):
        raise UserError(f"unknown algorithm {algo!r}; choose ppo or dpo", field="algo")
    err_console.print(f"[dim]`cai rl train --algo {algo}` is now `cai rl {algo}`[/]")
    model = PPOConfig if algo == "ppo" else DPOStageConfig
    values = {"resume": True, "save_steps": 10, **values}  # this command's old defaults
    config = model(**{k: v for k, v in values.items() if k in model.model_fields})
    (run_ppo if algo == "ppo" else run_dpo)(config)


def run_ppo(config: PPOConfig) -> None:
    from constitutional.rl.ppo import ppo_train

    table = Table("step", "reward", "PM score", "KL", "entropy", "clip", "len", "gen s",
                  "score s", "update s", title="PPO", show_edge=False)

    def on_step(row: dict) -> None:
        err_console.print(
            f"[dim]step {row['step']}/{config.steps} · reward {row['reward_mean']:.3f} · "
            f"KL {row['kl']:.3f} · entropy {row['entropy']:.2f}[/]")
        table.add_row(*(f"{row[k]:{f}}" for k, f in (
            ("step", ""), ("reward_mean", ".3f"), ("score_mean", ".3f"), ("kl", ".3f"),
            ("entropy", ".2f"), ("clip_frac", ".3f"), ("response_len", ".1f"),
            ("time_generate", ".1f"), ("time_score", ".1f"), ("time_update", ".1f"))))

    result = ppo_train(config, on_step=on_step)
    if table.row_count:
        out.print(table)
    print_line(f"PPO policy → {result.out_dir} · {result.steps} steps · log → "
               f"{result.out_dir / Path(layout.PPO_LOG).name} · {result.seconds:.0f}s")


def run_dpo(config: DPOStageConfig) -> None:
    from constitutional.rl.dpo import dpo_train

    result = dpo_train(config)
    m = result.metrics
    print_line(f"DPO policy → {result.out_dir} · {m['train_pairs']} pairs · label smoothing "
               f"{m['label_smoothing']:.3f} · held-out margin {m.get('eval_margin_before')} "
               f"→ {m.get('eval_margin')} · {m['wall_seconds']:.0f}s")
