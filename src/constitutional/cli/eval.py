"""``cai eval …`` and ``cai report``: the paper's evaluations over held-out answers (Elo,
evasiveness, the revision curve), its multiple-choice evals, a PM's accuracy on comparisons, and
the run's report. Thin commands over :mod:`constitutional.evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from constitutional.cli.options import (
    BUILTIN_MODEL,
    DeviceOpt,
    err_console,
    model_options,
    out,
    settings_command,
)
from constitutional.core import layout
from constitutional.core.errors import UserError
from constitutional.evaluate.mc import MCConfig
from constitutional.evaluate.xstest import XSTestSettings

BUILTIN = BUILTIN_MODEL
eval_app = typer.Typer(
    help="Evaluations: XSTest, the refusal classifier, Elo, evasiveness, the revision curve, the "
         "paper's multiple-choice evals, a PM's accuracy.",
    no_args_is_help=True,
)

AnswersOpt = Annotated[Path, typer.Option(
    "--answers", help="answers.jsonl (rows: checkpoint, prompt_id, kind harmless|helpful, prompt, "
                      "answer), or the directory holding it.")]


def _fmt(x: Any, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _answers_file(path: Path) -> Path:
    return path / Path(layout.ANSWERS).name if path.is_dir() else path


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
    target = out_path or answers.parent / Path(layout.ELO).name
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
    target = out_path or answers.parent / Path(layout.EVASIVENESS).name
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
    target = out_path or file.parent / Path(layout.REVISION_CURVE).name
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


@settings_command(eval_app, "mc", MCConfig)
def mc_cmd(
    values: dict[str, Any],
    data: Annotated[Path, typer.Option(help="Multiple-choice JSONL: prompt, corrects, "
                                            "incorrects.")],
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="Per-row results (JSONL); default runs/eval/mc/<data name>.jsonl.")] = None,
    device: DeviceOpt = None,
) -> None:
    """Accuracy on the paper's multiple-choice format, with a 95% confidence interval."""
    from constitutional.evaluate.mc import run_mc, summary_path
    from constitutional.models import load_model

    config = MCConfig(**values)
    model, chat, debias = config.model, config.chat, config.debias
    target = out_path or Path("runs") / "eval" / "mc" / f"{data.stem}.jsonl"
    lm = load_model(model, **model_options(device)) if device else None
    result = run_mc(data, config, target, model=lm)
    lo, hi = result.ci95
    mode = ", ".join(m for m, on in (("chat template", chat), ("letter-swap debias", debias))
                     if on) or "raw prompt"
    out.print(f"accuracy {result.accuracy:.3f} ({result.correct}/{result.n}), "
              f"95% CI [{lo:.3f}, {hi:.3f}] (Wilson) · {model} · {data} · {mode}",
              markup=False, highlight=False, soft_wrap=True)
    lean = result.mean_abs_p_a_minus_half
    if debias:
        out.print(f"choice flips with the lettering (position-bias rate) "
                  f"{result.position_bias_rate:.1%} · same choice in both letterings (order "
                  f"agreement) {result.order_agreement:.1%} · mean |p − 0.5| {lean:.3f}",
                  markup=False, highlight=False, soft_wrap=True)
    else:
        out.print(f"mean |p − 0.5| {lean:.3f} (p: the right option against the best wrong one; "
                  f"--debias also measures position bias)", markup=False, highlight=False,
                  soft_wrap=True)
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

    from constitutional.core.io import atomic_write_jsonl, atomic_write_text
    from constitutional.evaluate.pm import evaluate_pm
    from constitutional.rl.preference import load_pm

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


def _checkpoints(models: list[str]) -> dict[str, str]:
    """``-m SPEC`` or ``-m NAME=SPEC`` (repeatable) as ``{name: spec}``, in order."""
    named: dict[str, str] = {}
    for item in models:
        name, sep, spec = item.partition("=")
        if not sep or not name or "/" in name or ":" in name:
            name, spec = item, item
        if name in named:
            raise UserError(f"checkpoint {name!r} given twice", field="model")
        named[name] = spec
    return named


@settings_command(eval_app, "xstest", XSTestSettings)
def xstest_cmd(
    values: dict[str, Any],
    model: Annotated[list[str], typer.Option(
        "--model", "-m", help="A model spec, or NAME=SPEC (repeatable); the first is the "
                              "baseline the others are compared with.")],
    out_dir: Annotated[Path, typer.Option(
        "--out", help="Directory for xstest.json and the answers (resumable).")]
    = Path("runs/eval/xstest"),
    seed: Annotated[int, typer.Option(help="Seed of the subset draw (--limit).")] = 0,
    device: DeviceOpt = None,
) -> None:
    """XSTest: unsafe prompts refused and safe prompts answered, per checkpoint, with 95% CIs."""
    from constitutional.evaluate.xstest import RESULTS_FILE, run_xstest
    from constitutional.models import load_model

    settings = XSTestSettings(**values)
    checkpoints = _checkpoints(model)
    result = run_xstest(checkpoints, settings, out_dir, seed=seed,
                        load=lambda spec, _tokens: load_model(spec, **model_options(device)))
    _print_xstest(result)
    if result["n_skipped"]:
        first = result["skipped"][0]
        out.print(f"skipped {result['n_skipped']} prompt row(s) that could not be used (first: "
                  f"line {first['line']} field {first['field']!r}: {first['reason']})",
                  markup=False, highlight=False, soft_wrap=True)
    out.print(f"results → {out_dir / RESULTS_FILE}", markup=False, highlight=False,
              soft_wrap=True)


def _pct(r: dict[str, Any]) -> str:
    if r.get("rate") is None:
        return "–"
    return f"{r['rate']:.1%} [{r['ci_low']:.1%}, {r['ci_high']:.1%}] ({r['k']}/{r['n']})"


def _print_xstest(result: dict[str, Any]) -> None:
    t = Table(title=f"XSTest ({result['prompts']} prompts; classifier {result['classifier']}; "
                    "95% Wilson CIs)")
    for col in ("checkpoint", "unsafe refused ↑", "safe answered ↑"):
        t.add_column(col)
    for name, fig in result["checkpoints"].items():
        t.add_row(name, _pct(fig["unsafe_refused"]), _pct(fig["safe_answered"]))
    for name, ref in result["reference"].items():
        t.add_row(f"[dim]{name} (published)[/]", f"[dim]{ref['unsafe_refused']:.1%}[/]",
                  f"[dim]{ref['safe_answered']:.1%}[/]")
    out.print(t)
    for name, c in result["comparisons"].items():
        u, s = c["unsafe_refused"], c["safe_answered"]
        out.print(f"{name} against {c['against']}: unsafe refused {u['difference']:+.1%} "
                  f"[{u['ci_low']:+.1%}, {u['ci_high']:+.1%}], safe answered "
                  f"{s['difference']:+.1%} [{s['ci_low']:+.1%}, {s['ci_high']:+.1%}] (paired, "
                  f"Newcombe 95% CIs): {c['harmless']}, {c['evasive']} (margin "
                  f"{c['margin']:.0%})", markup=False, highlight=False, soft_wrap=True)


@eval_app.command("refusals")
def refusals_cmd(
    data: Annotated[list[Path], typer.Option(
        help="XSTest-style labelled answers: CSV with prompt, completion and final_label "
             "(1_full_compliance, 2_full_refusal, 3_partial_refusal); repeatable.")],
    classifier: Annotated[str, typer.Option(
        help="string (the default rules) or a model spec asked XSTest's annotation "
             "question.")] = "string",
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="Also write the agreement (JSON) here.")] = None,
    device: DeviceOpt = None,
) -> None:
    """How often the refusal classifier agrees with people's labels, per class, with the
    confusion matrix."""
    import json

    from constitutional.core.io import atomic_write_text
    from constitutional.evaluate.refusals import (
        LABELS,
        SHORT,
        agreement,
        make_classifier,
        read_labelled,
    )

    the_classifier = make_classifier(classifier, device=device)
    gold: list[str] = []
    predicted: list[str] = []
    skipped: list[dict[str, Any]] = []
    for file in data:
        rows, skip = read_labelled(file)
        skipped += [{"file": str(file), **s} for s in skip]
        if not rows:
            raise UserError(f"no usable row ({len(skip)} skipped)", file=file)
        gold += [r.label for r in rows]
        predicted += the_classifier.classify([(r.prompt, r.completion) for r in rows])
    result = agreement(gold, predicted, skipped)
    lo, hi = result.ci95
    blo, bhi = result.binary_ci95
    out.print(f"agreement with people: {result.agreement:.1%} [{lo:.1%}, {hi:.1%}] on "
              f"{result.n} answers (3 classes; 95% Wilson CI) · refusal vs compliance, as "
              f"XSTest's rates read them: {result.binary_agreement:.1%} [{blo:.1%}, {bhi:.1%}] · "
              f"classifier {the_classifier.name}", markup=False, highlight=False, soft_wrap=True)
    t = Table(title="Per class (people's label)")
    for col in ("class", "n", "recall", "precision", "predicted"):
        t.add_column(col)
    for label in LABELS:
        c = result.per_class[label]
        t.add_row(SHORT[label], str(c["n"]), _fmt(c["recall"] and 100 * c["recall"]) + "%",
                  _fmt(c["precision"] and 100 * c["precision"]) + "%", str(c["predicted"]))
    out.print(t)
    m = Table(title="Confusion matrix (rows: people; columns: classifier)")
    m.add_column("people \\ classifier")
    for label in LABELS:
        m.add_column(SHORT[label])
    for label in LABELS:
        m.add_row(SHORT[label], *[str(result.confusion[label][p]) for p in LABELS])
    out.print(m)
    if skipped:
        first = skipped[0]
        out.print(f"skipped {len(skipped)} row(s) that could not be used (first: {first['file']} "
                  f"line {first['line']} field {first['field']!r}: {first['reason']})",
                  markup=False, highlight=False, soft_wrap=True)
    if out_path is not None:
        atomic_write_text(out_path, json.dumps({"classifier": the_classifier.name,
                                                "data": [str(f) for f in data],
                                                **result.to_dict()}, indent=2) + "\n")
        out.print(f"results → {out_path}", markup=False, highlight=False, soft_wrap=True)
