"""`cai sl …`: SL-CAI critique→revision data generation and supervised finetuning."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from constitutional.cli.options import (
    RayOptions,
    of,
    out,
    ray_options,
    settings_command,
)
from constitutional.sl.revise import ReviseConfig
from constitutional.sl.train import SLTrainConfig

sl_app = typer.Typer(help="SL-CAI: critique→revision data and supervised finetuning.",
                     no_args_is_help=True)


@settings_command(sl_app, "revise", ReviseConfig, RayOptions)
def revise_cmd(
    values: dict[str, Any],
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Answer red-team prompts, then critique and revise the answers N times."""
    from constitutional.sl.revise import revise

    config = of(ReviseConfig, values)
    ray = ray_options(values)
    if ray is not None:
        from constitutional.distributed.ray import ray_revise

        result = ray_revise(config, ray)
    else:
        result = revise(config, show_progress=not quiet)
    _revise_table(result)


def _revise_table(result: Any) -> None:
    s = result.summary
    t = Table(title=f"sl revise · {result.run_dir}")
    t.add_column("")
    t.add_column("value", justify="right")
    computed = s["steps_computed"]
    rows = [
        ("prompts", s["prompts"]),
        ("rounds", s["revisions"]),
        ("steps computed (answer/critique/revision)",
         f"{computed.get('answer', 0)}/{computed.get('critique', 0)}/{computed.get('revision', 0)}"),
        ("steps resumed from disk", s["steps_resumed"]),
        ("generated tokens", s["generated_tokens"]),
        ("tokens/s", s["tokens_per_second"]),
        ("degenerate (answer/critique/revision)",
         "/".join(str(s["degenerate"][k]) for k in ("answer", "critique", "revision"))),
        ("prompts with a usable final revision", s["with_final_revision"]),
        ("wall time (s)", s["wall_seconds"]),
    ]
    if "executor" in s:
        e = s["executor"]
        ray_row = (f"ray: {e['shards']} shards ({e['shards_skipped']} already done), "
                   f"{e['actors']} actors, {e['shard_retries']} retries")
        rows.append(("executor", ray_row))
    for k, v in rows:
        t.add_row(k, str(v))
    out.print(t)


@settings_command(sl_app, "train", SLTrainConfig, names={"out": ["--out"],
                                                       "model": ["--model", "-m"]})
def train_cmd(values: dict[str, Any]) -> None:
    """Supervised finetuning on the revisions, mixed with helpful samples (TRL SFTTrainer)."""
    from constitutional.sl.train import sl_train

    result = sl_train(SLTrainConfig(**values))
    if not result.main_process:  # under `accelerate launch`, the main process reports
        return
    m = result.metrics
    t = Table(title=f"sl train · {result.out_dir}")
    t.add_column("")
    t.add_column("value", justify="right")
    for key in ("revision_rows", "helpful_rows", "train_rows", "eval_rows", "steps", "train_loss",
                "eval_loss_before", "eval_loss_after", "wall_seconds"):
        if key in m:
            t.add_row(key.replace("_", " "), str(m[key]))
    out.print(t)
    for entry in m.get("train_log", []):
        if "loss" in entry:
            out.print(f"  step {entry['step']:>4}  train loss {entry['loss']:.4f}", highlight=False)
        elif "eval_loss" in entry:
            out.print(f"  step {entry['step']:>4}  eval loss  {entry['eval_loss']:.4f}",
                      highlight=False)
