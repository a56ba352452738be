"""`cai sl …`: SL-CAI critique→revision data generation and supervised finetuning."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from constitutional.cli_exec import (
    CpusPerActorOpt,
    ExecutorOpt,
    GpusPerActorOpt,
    NumActorsOpt,
    NumShardsOpt,
    RayAddressOpt,
    ray_options,
)

sl_app = typer.Typer(help="SL-CAI: critique→revision data and supervised finetuning.",
                     no_args_is_help=True)
out = Console()


@sl_app.command("revise")
def revise_cmd(
    prompts: Annotated[str, typer.Option(help="Red-team prompt source (see `cai prompts show`).")],
    out_dir: Annotated[str, typer.Option("--out", help="Run directory (resumes if it exists).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model spec (the helpful model).")
                     ] = "builtin:smollm2-135m-instruct",
    constitution: Annotated[str, typer.Option(help="Built-in name, YAML file or paper dir.")
                            ] = "default",
    revisions: Annotated[int, typer.Option(help="Critique→revision rounds (paper: 4).")] = 4,
    few_shot: Annotated[int, typer.Option(help="Demonstrations placed before each context.")] = 3,
    no_critique: Annotated[bool, typer.Option(help="Direct revision, no critique (ablation).")
                           ] = False,
    prompt_format: Annotated[str, typer.Option("--format", help="chat, or text for base models.")
                             ] = "chat",
    history: Annotated[str, typer.Option(help="full: rounds see earlier rounds; latest: only "
                                              "the latest revision.")] = "full",
    tag: Annotated[list[str] | None, typer.Option(help="Only principles with this tag.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use at most this many prompts.")] = None,
    prompt_seed: Annotated[int | None, typer.Option(help="Sample --limit prompts with this seed.")
                           ] = None,
    field: Annotated[str | None, typer.Option(help="Column of the prompt in a file.")] = None,
    split: Annotated[str | None, typer.Option(help="train or test split of the prompts.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for principles and sampling.")] = 0,
    temperature: Annotated[float, typer.Option()] = 0.7,
    top_p: Annotated[float, typer.Option()] = 0.95,
    max_new_tokens: Annotated[int, typer.Option(help="For answers and revisions.")] = 256,
    critique_max_new_tokens: Annotated[int, typer.Option()] = 192,
    sft_revisions: Annotated[str, typer.Option(help="final, or all revisions as in the paper.")
                             ] = "final",
    chunk_size: Annotated[int, typer.Option(help="Prompts per model call (and per write).")] = 64,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    num_actors: NumActorsOpt = None,
    num_shards: NumShardsOpt = None,
    cpus_per_actor: CpusPerActorOpt = 1,
    gpus_per_actor: GpusPerActorOpt = None,
) -> None:
    """Answer red-team prompts, then critique and revise the answers N times."""
    from constitutional.sl.revise import ReviseConfig, revise

    config = ReviseConfig(
        prompts=prompts, model=model, out=out_dir, constitution=constitution,
        revisions=revisions, few_shot=few_shot, critique=not no_critique,
        prompt_format=prompt_format, history=history, tags=list(tag or []), limit=limit,
        prompt_seed=prompt_seed, field=field, split=split, seed=seed, temperature=temperature,
        top_p=top_p, max_new_tokens=max_new_tokens,
        critique_max_new_tokens=critique_max_new_tokens, sft_revisions=sft_revisions,
        chunk_size=chunk_size,
    )
    ray = ray_options(executor, ray_address, num_actors, num_shards, cpus_per_actor,
                      gpus_per_actor)
    if ray is not None:
        from constitutional.distributed.ray import ray_revise

        result = ray_revise(config, ray)
    else:
        result = revise(config, show_progress=not quiet)
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


@sl_app.command("train")
def train_cmd(
    data: Annotated[str, typer.Option(help="A `cai sl revise` run directory (or a JSONL file).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model to finetune.")
                     ] = "builtin:smollm2-135m-instruct",
    out_dir: Annotated[str | None, typer.Option("--out", help="Output model directory "
                                                "(default: DATA/model).")] = None,
    helpful: Annotated[str | None, typer.Option(help="Benign prompts whose answers are mixed in, "
                                                "e.g. builtin:helpful.")] = None,
    helpful_ratio: Annotated[float, typer.Option(help="Share of helpful samples in the mix.")
                             ] = 0.25,
    helpful_model: Annotated[str | None, typer.Option(help="Who answers the helpful prompts "
                                                      "(default: --model).")] = None,
    epochs: Annotated[float, typer.Option()] = 2.0,
    learning_rate: Annotated[float | None, typer.Option(help="Default 2e-5, or 2e-4 with LoRA.")
                             ] = None,
    batch_size: Annotated[int, typer.Option()] = 8,
    grad_accum: Annotated[int, typer.Option()] = 1,
    max_length: Annotated[int, typer.Option()] = 1024,
    eval_fraction: Annotated[float, typer.Option()] = 0.1,
    lora: Annotated[bool, typer.Option(help="Train LoRA adapters (merged at the end).")] = False,
    lora_r: Annotated[int, typer.Option()] = 16,
    save_steps: Annotated[int, typer.Option()] = 50,
    seed: Annotated[int, typer.Option()] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint.")] = False,
) -> None:
    """Supervised finetuning on the revisions, mixed with helpful samples (TRL SFTTrainer)."""
    from constitutional.sl.train import SLTrainConfig, sl_train

    config = SLTrainConfig(
        data=data, model=model, out=out_dir, helpful=helpful, helpful_ratio=helpful_ratio,
        helpful_model=helpful_model, epochs=epochs, learning_rate=learning_rate,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
        eval_fraction=eval_fraction, lora=lora, lora_r=lora_r, lora_alpha=2 * lora_r,
        save_steps=save_steps, seed=seed, resume=resume,
    )
    result = sl_train(config)
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
