"""``cai eval elo|evasiveness|revision-curve`` and ``cai report``: thin commands over
:mod:`constitutional.evaluate`. The eval commands are added to :data:`constitutional.cli_rl.
eval_app`; :func:`report_cmd` is registered on the root app by :mod:`constitutional.cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from constitutional.cli_rl import BUILTIN, DeviceOpt, eval_app
from constitutional.errors import UserError
from constitutional.logging_setup import err_console

out = Console()

AnswersOpt = Annotated[Path, typer.Option(
    "--answers", help="answers.jsonl (rows: checkpoint, prompt_id, kind harmless|helpful, prompt, "
                      "answer), or the directory holding it.")]


def _fmt(x: Any, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _answers_file(path: Path) -> Path:
    return path / "answers.jsonl" if path.is_dir() else path


def _pm_dir(spec: str) -> str:
    return spec.removeprefix("pm:")


@eval_app.command("elo")
def elo_cmd(
    answers: AnswersOpt,
    judge: Annotated[str, typer.Option(help="pm:DIR for a preference-model judge; any other "
                                            "model spec is a feedback-model judge, scored in "
                                            "both orders.")] = BUILTIN,
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="Results (JSON); default: elo.json next to the answers.")] = None,
    kind: Annotated[list[str] | None, typer.Option(
        help="harmless and/or helpful (repeatable; default: every kind in the file).")] = None,
    constitution: Annotated[str, typer.Option(help="Feedback judge: the constitution whose "
                                                   "feedback principles it asks.")] = "default",
    principles: Annotated[int, typer.Option("--principles", "-k", help="Feedback judge: "
                                            "average over K sampled principles.")] = 1,
    few_shot: Annotated[int, typer.Option(help="Feedback judge: demonstrations first.")] = 4,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples (over prompts) for the "
                                                "95% intervals; 0 for none.")] = 1000,
    anchor: Annotated[str | None, typer.Option(help="The checkpoint at Elo 0 (default: the "
                                                    "first in the file).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for principles, demonstrations and the "
                                           "bootstrap.")] = 0,
    device: DeviceOpt = None,
) -> None:
    """Elo per checkpoint for harmlessness and helpfulness, from pairwise AI judgements."""
    from constitutional.evaluate.elo import make_judge, run_elo

    if bootstrap < 0:
        raise UserError(f"must be at least 0, got {bootstrap}", field="bootstrap")
    answers = _answers_file(answers)
    target = out_path or answers.parent / "elo.json"
    the_judge = make_judge(judge, constitution=constitution, principles=principles,
                           few_shot=few_shot, seed=seed, device=device)
    results = run_elo(answers, the_judge, target, kinds=kind, bootstrap=bootstrap, seed=seed,
                      anchor=anchor)
    t = Table(title=f"Elo (judge {judge}; 95% bootstrap CIs; anchor at 0)")
    for col in ("kind", "checkpoint", "Elo", "95% CI", "comparisons"):
        t.add_column(col)
    for k, result in results.items():
        for name, e in result["elo"].items():
            t.add_row(k, name, _fmt(e["elo"]), f"[{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}]",
                      str(result["n_comparisons"]))
    out.print(t)
    out.print(f"results → {target}", markup=False, highlight=False, soft_wrap=True)


@eval_app.command("evasiveness")
def evasiveness_cmd(
    answers: AnswersOpt,
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="Results (JSON); default: evasiveness.json next to the answers.")] = None,
    kind: Annotated[str, typer.Option(help="Which prompts: helpful (benign, the default) or "
                                           "harmless.")] = "helpful",
) -> None:
    """The share of prompts each checkpoint refuses (see constitutional.evaluate.evasive)."""
    from constitutional.evaluate.evasive import run_evasiveness

    if kind not in ("harmless", "helpful"):
        raise UserError(f"must be harmless or helpful, got {kind!r}", field="kind")
    answers = _answers_file(answers)
    target = out_path or answers.parent / "evasiveness.json"
    result = run_evasiveness(str(answers), str(target), kind=kind)
    t = Table(title=f"Evasiveness on {kind} prompts (95% Wilson CIs)")
    for col in ("checkpoint", "refusal rate", "refusals", "n", "95% CI"):
        t.add_column(col)
    for name, r in result["checkpoints"].items():
        t.add_row(name, _fmt(r["rate"], 3), str(r["refusals"]), str(r["n"]),
                  f"[{_fmt(r['ci_low'], 3)}, {_fmt(r['ci_high'], 3)}]")
    out.print(t)
    out.print(f"results → {target}", markup=False, highlight=False, soft_wrap=True)


@eval_app.command("revision-curve")
def revision_curve_cmd(
    traces: Annotated[Path, typer.Option(help="A `cai sl revise` run directory or its "
                                              "revise.traces.jsonl.")],
    pm: Annotated[str, typer.Option(help="The preference model: DIR or pm:DIR.")],
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="Results (JSON); default: revision_curve.json next to the traces.")] = None,
    device: DeviceOpt = None,
) -> None:
    """The harmlessness PM score against the number of revisions (the paper's Figure 5)."""
    from constitutional.evaluate.elo import load_pm_judge
    from constitutional.evaluate.revision_curve import TRACES_FILE, run_revision_curve

    file = traces / TRACES_FILE if traces.is_dir() else traces
    target = out_path or file.parent / "revision_curve.json"
    judge = load_pm_judge(_pm_dir(pm), device=device)
    result = run_revision_curve(file, judge.pm, target, pm_name=judge.name)
    t = Table(title="PM score per revision (mean ± standard error)")
    for col in ("revision", "mean", "std. error", "n", "degenerate skipped"):
        t.add_column(col)
    for p in result["points"]:
        t.add_row(str(p["revision"]), _fmt(p["mean"], 3), _fmt(p["stderr"], 3), str(p["n"]),
                  str(p["degenerate"]))
    out.print(t)
    out.print(f"results → {target}", markup=False, highlight=False, soft_wrap=True)


def report_cmd(
    run: Annotated[Path, typer.Argument(help="The run directory.")],
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="Where to write the page (default: RUN/report.html).")] = None,
    max_samples: Annotated[int, typer.Option(help="Browsable samples per list at most.")] = 200,
) -> None:
    """Write one self-contained report.html (plots, tables, samples) for a run directory."""
    from constitutional.evaluate.report import SECTION_FILES, TITLES, report_status, write_report

    path = write_report(run, out_path, max_samples=max_samples)
    status = report_status(run)
    t = Table(title="Report sections")
    for col in ("section", "status", "reads"):
        t.add_column(col)
    for sid, state in status.items():
        t.add_row(TITLES[sid], state if state == "ok" else f"[dim]{state}[/]",
                  ", ".join(SECTION_FILES[sid]))
    err_console.print(t)
    out.print(f"report → {path}", markup=False, highlight=False, soft_wrap=True)
