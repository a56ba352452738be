"""``cai report RUN``: one self-contained ``report.html`` for a run directory.

The page has no scripts and loads nothing: the plots are matplotlib PNGs embedded as base64
``data:`` URLs, the CSS is inline, and a Content-Security-Policy forbids any other source, so it
opens offline, from an e-mail attachment or a CI artefact alike. Samples are browsable with plain
``<details>`` elements. Every piece of text from the run is escaped (``html.escape``).

It reads whatever exists of this layout (a section whose files are missing says "not run"; a file
that cannot be read says so in its section; the report itself never fails because of a run's
contents):

=============================  ===================================================================
``run.json``                   ``{"stages": {name: {"seconds", "status", …}}}`` — wall time table
``sl/revise.traces.jsonl``     critique→revision traces with the principle used
``sl/revise.summary.json``     SL-CAI counts
``rl/pairs.jsonl``             answer pairs (counted)
``rl/labels.jsonl``            soft labels: histogram of p_a, position bias, labelled pairs
``rl/label.summary.json``      labelling summary (mean p_a, position-bias rate)
``pm/pm.json``                 ``{"metrics": {…}}`` — preference-model metrics
``ppo/ppo_log.jsonl``          one row per PPO step — reward and KL curves
``eval/elo.json``              ``{"harmless": elo_eval(…), "helpful": …}`` — the Elo frontier
``eval/evasiveness.json``      refusal rate per checkpoint
``eval/revision_curve.json``   PM score per revision number
``eval/answers.jsonl``         each checkpoint's answers, side by side
=============================  ===================================================================
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from constitutional.errors import UserError
from constitutional.store import atomic_write_text

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
#: Files each section reads (relative to the run directory).
SECTION_FILES: dict[str, tuple[str, ...]] = {
    "stages": ("run.json",),
    "elo": ("eval/elo.json",),
    "evasiveness": ("eval/evasiveness.json",),
    "revision-curve": ("eval/revision_curve.json",),
    "sl": ("sl/revise.traces.jsonl", "sl/revise.summary.json"),
    "labels": ("rl/labels.jsonl", "rl/label.summary.json", "rl/pairs.jsonl"),
    "pm": ("pm/pm.json",),
    "ppo": ("ppo/ppo_log.jsonl",),
    "answers": ("eval/answers.jsonl",),
}
TITLES = {
    "stages": "Wall time per stage",
    "elo": "Elo: harmlessness and helpfulness",
    "evasiveness": "Evasiveness",
    "revision-curve": "PM score against revision number",
    "sl": "SL-CAI: critique → revision traces",
    "labels": "RL-CAI: soft AI labels",
    "pm": "Preference model",
    "ppo": "PPO: reward and KL",
    "answers": "Answers side by side",
}
PPO_COLUMNS = ("step", "reward_mean", "reward_std", "score_mean", "kl", "entropy", "clip_frac",
               "value_loss", "policy_loss", "response_len", "time_generate", "time_score",
               "time_update", "samples_per_s")

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:1.5rem}
header{background:#1d2330;color:#fff;padding:1.2rem 1.5rem}
header h1{margin:0 0 .3rem;font-size:1.5rem} header p{margin:0;color:#c9d1e0}
nav{margin:.8rem 0 0;display:flex;flex-wrap:wrap;gap:.4rem}
nav a{color:#fff;background:#38425a;padding:.15rem .55rem;border-radius:3px;text-decoration:none;
font-size:.85rem}
nav a.missing{background:#555c6b;color:#b8bfcc}
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;margin:1.2rem 0;
padding:1rem 1.3rem}
h2{margin:.2rem 0 .8rem;font-size:1.25rem} h3{font-size:1.05rem;margin:1.1rem 0 .5rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.88rem}
th,td{border:1px solid #dde1e8;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#eef1f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
div.tw{overflow-x:auto;max-width:100%}
caption{caption-side:top;text-align:left;font-weight:600;padding:.2rem 0}
figure{margin:.5rem 0 1rem} img{max-width:100%;height:auto;border:1px solid #eef1f5}
figcaption{font-size:.85rem;color:#4d5566}
.notrun{color:#6b7385;font-style:italic} .error{color:#a12b2b;font-weight:600}
.note{color:#4d5566;font-size:.88rem}
details{border:1px solid #dde1e8;border-radius:4px;margin:.35rem 0;padding:.3rem .6rem;
background:#fbfbfc} details[open]{background:#fff}
summary{cursor:pointer;font-size:.92rem}
pre.text{white-space:pre-wrap;overflow-wrap:anywhere;background:#f3f5f8;padding:.45rem .6rem;
border-radius:3px;margin:.25rem 0 .6rem;font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(250px,1fr));gap:.7rem}
.badge{display:inline-block;font-size:.75rem;padding:0 .4rem;border-radius:3px;margin-left:.3rem;
background:#e4e8ef;color:#38425a} .badge.warn{background:#fbe3c8;color:#7a4100}
.badge.bad{background:#f7d4d4;color:#8a1c1c} .badge.good{background:#d6efdc;color:#17572b}
.label{font-size:.8rem;color:#4d5566;text-transform:uppercase;letter-spacing:.03em}
"""

_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
        "form-action 'none'")


class _NotRun(Exception):
    """The section's input files do not exist."""


# ------------------------------------------------------------------------------------------------
# small HTML helpers


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any, digits: int = 3) -> str:
    """A table cell's text: numbers rounded, None as an en dash, containers as compact JSON."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) < 1e-9:  # floating-point noise (e.g. a bootstrap bound of the anchor)
            value = 0.0
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
            return f"{value:.{digits}g}"
        return f"{value:,.{digits}f}"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)[:300]
    return str(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None,
           digits: int = 3) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{_e(_fmt(v, digits))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return (f'<div class="tw"><table>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _kv_table(data: dict[str, Any], caption: str | None = None) -> str:
    return _table(("key", "value"), [(k, v) for k, v in data.items()], caption)


def _pre(text: Any) -> str:
    return f'<pre class="text">{_e(text)}</pre>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _conversation(messages: Any) -> str:
    if isinstance(messages, str):
        return _pre(messages)
    if not isinstance(messages, list):
        return _pre(json.dumps(messages, ensure_ascii=False))
    parts = []
    for m in messages:
        if isinstance(m, dict):
            parts.append(f'<div class="label">{_e(m.get("role", "?"))}</div>'
                         f'{_pre(m.get("content", ""))}')
    return "".join(parts)


def _prompt_text(messages: Any) -> str:
    """The last user turn of a prompt (for one-line summaries)."""
    if isinstance(messages, str):
        return messages
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                return str(m.get("content", ""))
    return ""


def _short(text: str, n: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


# ------------------------------------------------------------------------------------------------
# figures (matplotlib's object API: no pyplot, no global backend state)


def _figure(width: float = 7.0, height: float = 4.2) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _img(fig: Any, alt: str, caption: str | None = None) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">{cap}</figure>')


def _err(value: float | None, lo: float | None, hi: float | None) -> tuple[float, float]:
    if value is None or lo is None or hi is None:
        return (0.0, 0.0)
    return (max(value - lo, 0.0), max(hi - value, 0.0))


# ------------------------------------------------------------------------------------------------
# reading the run directory


class _Run:
    def __init__(self, path: Path, max_samples: int) -> None:
        self.path, self.max_samples = path, max_samples
        self.problems: list[str] = []

    def exists(self, rel: str) -> bool:
        return (self.path / rel).is_file()

    def json(self, rel: str) -> Any:
        file = self.path / rel
        if not file.is_file():
            raise _NotRun(rel)
        return json.loads(file.read_text(encoding="utf-8", errors="replace"))

    def jsonl(self, rel: str) -> tuple[list[dict[str, Any]], int]:
        """The JSON-object lines of a file and how many lines could not be read."""
        file = self.path / rel
        if not file.is_file():
            raise _NotRun(rel)
        rows, bad = [], 0
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
        return rows, bad


def _bad_lines(rel: str, bad: int) -> str:
    return (f'<p class="error">{bad} unreadable line(s) in {_e(rel)} were skipped.</p>'
            if bad else "")


def _capped(items: list[Any], limit: int, what: str) -> tuple[list[Any], str]:
    if len(items) <= limit:
        return items, ""
    return items[:limit], _note(f"Showing the first {limit} of {len(items)} {what}.")


# ------------------------------------------------------------------------------------------------
# sections


def _stages(run: _Run) -> str:
    data = run.json("run.json")
    stages = data.get("stages") if isinstance(data, dict) else None
    if isinstance(stages, list):
        stages = {str(s.get("name", i)): s for i, s in enumerate(stages) if isinstance(s, dict)}
    if not isinstance(stages, dict) or not stages:
        return '<p class="notrun">run.json has no stages.</p>'
    names = list(stages)
    seconds = [_num(s.get("seconds")) if isinstance(s, dict) else None for s in stages.values()]
    total = sum(s for s in seconds if s is not None)
    extra = []
    for s in stages.values():
        if isinstance(s, dict):
            extra += [k for k, v in s.items() if k not in ("seconds", "status", "name")
                      and k not in extra and not isinstance(v, dict | list)]
    rows = []
    for name, sec in zip(names, seconds, strict=True):
        s = stages[name] if isinstance(stages[name], dict) else {}
        share = sec / total if sec is not None and total > 0 else None
        rows.append([name, s.get("status"), sec, share, *[s.get(k) for k in extra]])
    rows.append(["total", None, total, 1.0 if total else None, *[None] * len(extra)])
    fig = _figure(7.0, 0.45 * len(names) + 1.2)
    ax = fig.subplots()
    ax.barh(names[::-1], [s or 0.0 for s in seconds][::-1], color="#4c72b0")
    ax.set_xlabel("wall time (s)")
    ax.set_title(f"wall time per stage (total {total:.1f} s)")
    out = _img(fig, "wall time per stage", "Seconds of wall time each stage took.")
    out += _table(["stage", "status", "seconds", "share", *extra], rows, "Wall time per stage")
    meta = {k: v for k, v in data.items() if k != "stages" and not isinstance(v, dict | list)}
    if meta:
        out += _kv_table(meta, "Run")
    return out


def _elo_points(result: dict[str, Any]) -> dict[str, tuple[float | None, float | None,
                                                           float | None]]:
    elo = result.get("elo") if isinstance(result, dict) else None
    if not isinstance(elo, dict):
        return {}
    return {str(k): (_num(v.get("elo")), _num(v.get("ci_low")), _num(v.get("ci_high")))
            for k, v in elo.items() if isinstance(v, dict)}


def _elo(run: _Run) -> str:
    data = run.json("eval/elo.json")
    if not isinstance(data, dict):
        raise TypeError("eval/elo.json: expected an object {harmless: …, helpful: …}")
    kinds = [k for k in ("harmless", "helpful") if isinstance(data.get(k), dict)]
    if not kinds:
        return '<p class="notrun">eval/elo.json holds no harmless or helpful results.</p>'
    points = {k: _elo_points(data[k]) for k in kinds}
    out = ""
    if len(kinds) == 2:
        names = [n for n in points["helpful"] if n in points["harmless"]]
        fig = _figure(6.8, 5.0)
        ax = fig.subplots()
        xs = [points["helpful"][n][0] or 0.0 for n in names]
        ys = [points["harmless"][n][0] or 0.0 for n in names]
        xerr = list(zip(*[_err(*points["helpful"][n]) for n in names], strict=True)) or None
        yerr = list(zip(*[_err(*points["harmless"][n]) for n in names], strict=True)) or None
        ax.plot(xs, ys, "-", color="#9aa5b8", zorder=1)
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o", color="#c44e52", ecolor="#4c72b0",
                    capsize=4, zorder=2)
        for n, x, y in zip(names, xs, ys, strict=True):
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
        ax.axhline(0, color="#dddddd", lw=0.8, zorder=0)
        ax.axvline(0, color="#dddddd", lw=0.8, zorder=0)
        ax.set_xlabel("helpfulness Elo")
        ax.set_ylabel("harmlessness Elo")
        anchor = data["harmless"].get("anchor") or (names[0] if names else "")
        ax.set_title(f"Elo frontier (anchor {anchor} = 0; 95% CIs)")
        out += _img(fig, "Elo frontier, harmlessness against helpfulness",
                    "Harmlessness Elo against helpfulness Elo per checkpoint (the paper's "
                    "Figure 2, with an AI judge); bars are 95% bootstrap intervals.")
        out += _table(["checkpoint", "helpful Elo", "helpful CI low", "helpful CI high",
                       "harmless Elo", "harmless CI low", "harmless CI high"],
                      [[n, *points["helpful"][n], *points["harmless"][n]] for n in names],
                      "Elo frontier", digits=1)
    else:
        kind = kinds[0]
        names = list(points[kind])
        fig = _figure(6.5, 4.0)
        ax = fig.subplots()
        vals = [points[kind][n][0] or 0.0 for n in names]
        err = list(zip(*[_err(*points[kind][n]) for n in names], strict=True)) or None
        ax.bar(names, vals, yerr=err, capsize=4, color="#4c72b0")
        ax.set_ylabel(f"{kind} Elo")
        ax.set_title(f"{kind} Elo (95% CIs)")
        out += _img(fig, f"{kind} Elo per checkpoint")
        out += _note(f"Only {kind} comparisons exist, so there is no frontier.")
    for kind in kinds:
        result = data[kind]
        judge = result.get("judge")
        judge_txt = (", ".join(f"{k}={_fmt(v)}" for k, v in judge.items()
                               if not isinstance(v, list)) if isinstance(judge, dict) else judge)
        out += f"<h3>{_e(kind)}</h3>"
        out += _note(f"{_fmt(result.get('n_comparisons'))} comparisons on "
                     f"{_fmt(result.get('n_prompts'))} prompts; judge: {judge_txt}; "
                     f"bootstrap: {_fmt(result.get('bootstrap'))}.")
        out += _table(["checkpoint", "Elo", "95% CI low", "95% CI high"],
                      [[n, *v] for n, v in points[kind].items()], f"{kind} Elo", digits=1)
        wr = result.get("win_rate")
        if isinstance(wr, dict) and wr:
            cols = list(wr)
            rows = [[a, *[(wr[a] or {}).get(b) if a != b else None for b in cols]] for a in cols]
            out += _table(["P(row beats column)", *cols], rows, f"{kind} win rates")
    return out


def _evasiveness(run: _Run) -> str:
    data = run.json("eval/evasiveness.json")
    if not isinstance(data, dict):
        raise TypeError("eval/evasiveness.json: expected an object")
    table = data.get("checkpoints") if isinstance(data.get("checkpoints"), dict) else data
    rows = {str(k): v for k, v in table.items() if isinstance(v, dict) and "rate" in v}
    if not rows:
        return '<p class="notrun">eval/evasiveness.json holds no rates.</p>'
    names = list(rows)
    rates = [_num(rows[n].get("rate")) for n in names]
    err = list(zip(*[_err(r, _num(rows[n].get("ci_low")), _num(rows[n].get("ci_high")))
                     for n, r in zip(names, rates, strict=True)], strict=True)) or None
    fig = _figure(6.5, 0.5 * len(names) + 1.6)
    ax = fig.subplots()
    ax.barh(names[::-1], [r or 0.0 for r in rates][::-1],
            xerr=[e[::-1] for e in err] if err else None, capsize=4, color="#dd8452")
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of benign prompts refused")
    ax.set_title(f"evasiveness ({data.get('kind', 'helpful')} prompts; 95% Wilson CIs)")
    out = _img(fig, "evasiveness per checkpoint", "The share of benign prompts each checkpoint "
               "refuses, by the refusal detector in constitutional.evaluate.evasive.")
    out += _table(["checkpoint", "refusal rate", "refusals", "n", "95% CI low", "95% CI high"],
                  [[n, rows[n].get("rate"), rows[n].get("refusals"), rows[n].get("n"),
                    rows[n].get("ci_low"), rows[n].get("ci_high")] for n in names],
                  "Evasiveness")
    if data.get("detector"):
        out += _note(f"Detector: {data['detector']}")
    return out


def _revision_curve(run: _Run) -> str:
    data = run.json("eval/revision_curve.json")
    points = data.get("points") if isinstance(data, dict) else None
    if not isinstance(points, list) or not points:
        return '<p class="notrun">eval/revision_curve.json holds no points.</p>'
    points = [p for p in points if isinstance(p, dict)]
    xs = [p.get("revision") for p in points]
    ys = [_num(p.get("mean")) for p in points]
    es = [_num(p.get("stderr")) or 0.0 for p in points]
    keep = [k for k, y in enumerate(ys) if y is not None and isinstance(xs[k], int | float)]
    fig = _figure(6.5, 4.0)
    ax = fig.subplots()
    ax.errorbar([xs[k] for k in keep], [ys[k] for k in keep], yerr=[es[k] for k in keep],
                fmt="o-", capsize=4, color="#55a868")
    ax.set_xlabel("number of revisions (0 = initial answer)")
    ax.set_ylabel("harmlessness PM score")
    ax.set_xticks([xs[k] for k in keep])
    ax.set_title("PM score against revision number (mean ± s.e.)")
    out = _img(fig, "PM score against revision number",
               "The preference model's score of the answer after each number of "
               "critique→revision rounds (the paper's Figure 5); degenerate revisions skipped.")
    out += _table(["revision", "mean score", "std. error", "n scored", "degenerate skipped"],
                  [[p.get("revision"), p.get("mean"), p.get("stderr"), p.get("n"),
                    p.get("degenerate")] for p in points], "PM score per revision")
    if isinstance(data, dict) and data.get("pm"):
        out += _note(f"PM: {data['pm']}; traces: {_fmt(data.get('traces'))}.")
    return out


def _flat(data: dict[str, Any]) -> dict[str, Any]:
    """Scalars as they are; a small dict of scalars inline; larger containers left out."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and all(not isinstance(x, dict | list) for x in v.values()):
            out[k] = ", ".join(f"{a}: {_fmt(b)}" for a, b in v.items())
        elif not isinstance(v, dict | list):
            out[k] = v
    return out


def _sl(run: _Run) -> str:
    out = ""
    have_summary = run.exists("sl/revise.summary.json")
    if have_summary:
        summary = run.json("sl/revise.summary.json")
        if isinstance(summary, dict):
            out += _kv_table(_flat(summary), "SL-CAI summary (revise.summary.json)")
    if not run.exists("sl/revise.traces.jsonl"):
        if not have_summary:
            raise _NotRun("sl/revise.traces.jsonl")
        return out + '<p class="notrun">No traces (sl/revise.traces.jsonl).</p>'
    traces, bad = run.jsonl("sl/revise.traces.jsonl")
    out += _bad_lines("sl/revise.traces.jsonl", bad)
    shown, note = _capped(traces, run.max_samples, "traces")
    out += f"<h3>Traces ({len(traces)})</h3>" + note
    for t in shown:
        rounds = [r for r in t.get("rounds") or [] if isinstance(r, dict)]
        principles = ", ".join(str(r.get("principle")) for r in rounds)
        degenerate = sum(bool(r.get("degenerate")) for r in rounds)
        badge = (f'<span class="badge warn">{degenerate} degenerate</span>' if degenerate
                 else "")
        body = '<div class="label">prompt</div>' + _conversation(t.get("prompt"))
        body += ('<div class="label">initial answer (revision 0)'
                 + (' <span class="badge warn">degenerate</span>' if t.get("initial_degenerate")
                    else "") + "</div>" + _pre(t.get("initial", "")))
        for r in rounds:
            flag = ' <span class="badge warn">degenerate</span>' if r.get("degenerate") else ""
            body += f"<h3>Round {_e(r.get('round'))} · principle <code>{_e(r.get('principle'))}"
            body += f"</code>{flag}</h3>"
            if r.get("critique_request"):
                body += '<div class="label">critique request</div>' + _pre(r["critique_request"])
            if r.get("critique") is not None:
                body += '<div class="label">critique</div>' + _pre(r.get("critique"))
            if r.get("revision_request"):
                body += '<div class="label">revision request</div>' + _pre(r["revision_request"])
            body += '<div class="label">revision</div>' + _pre(r.get("revision", ""))
        out += (f"<details><summary>{_e(_short(_prompt_text(t.get('prompt'))))} "
                f'<span class="badge">{_e(principles)}</span>{badge}</summary>{body}</details>')
    return out


def _labels(run: _Run) -> str:
    present = [f for f in SECTION_FILES["labels"] if run.exists(f)]
    if not present:
        raise _NotRun("rl/labels.jsonl")
    out = ""
    if run.exists("rl/pairs.jsonl"):
        pairs, bad = run.jsonl("rl/pairs.jsonl")
        out += _note(f"{len(pairs)} answer pairs in rl/pairs.jsonl.") + _bad_lines(
            "rl/pairs.jsonl", bad)
    if run.exists("rl/label.summary.json"):
        summary = run.json("rl/label.summary.json")
        if isinstance(summary, dict):
            out += _kv_table(_flat(summary), "Labelling summary (label.summary.json)")
    if not run.exists("rl/labels.jsonl"):
        return out + '<p class="notrun">Not labelled yet (no rl/labels.jsonl).</p>'
    labels, bad = run.jsonl("rl/labels.jsonl")
    out += _bad_lines("rl/labels.jsonl", bad)
    values = [v for v in (_num(r.get("p_a")) for r in labels) if v is not None]
    if values:
        import numpy as np

        counts, edges = np.histogram(values, bins=20, range=(0.0, 1.0))
        fig = _figure(6.5, 3.8)
        ax = fig.subplots()
        ax.hist(values, bins=edges, color="#8172b3", edgecolor="white")
        ax.axvline(0.5, color="#444444", lw=1, ls="--")
        ax.set_xlabel("p_a = P(response A preferred)")
        ax.set_ylabel("pairs")
        ax.set_title(f"soft labels ({len(values)} pairs, mean {sum(values) / len(values):.3f})")
        out += _img(fig, "histogram of soft labels p_a",
                    "The soft preference labels: the feedback model's probability that response "
                    "A is the better one, averaged over principles and both orders.")
        out += _table(["p_a from", "to", "pairs"],
                      [[float(edges[k]), float(edges[k + 1]), int(counts[k])]
                       for k in range(len(counts))], "Soft-label histogram", digits=2)
    out += _position_bias(labels)
    shown, note = _capped(labels, run.max_samples, "labelled pairs")
    out += f"<h3>Labelled pairs ({len(labels)})</h3>" + note
    for r in shown:
        p_a = _num(r.get("p_a"))
        biased = r.get("position_biased")
        badge = ' <span class="badge warn">position-biased</span>' if biased else ""
        body = '<div class="label">prompt</div>' + _conversation(r.get("prompt"))
        body += ('<div class="grid"><div><div class="label">response A · P(A) = '
                 f"{_e(_fmt(p_a))}</div>{_pre(r.get('response_a', ''))}</div>"
                 f'<div><div class="label">response B · P(B) = '
                 f"{_e(_fmt(None if p_a is None else 1 - p_a))}</div>"
                 f"{_pre(r.get('response_b', ''))}</div></div>")
        judgements = [j for j in r.get("judgements") or [] if isinstance(j, dict)]
        if judgements:
            body += _table(["principle", "order", "P(first option)", "P(response A)",
                            "P(response A), clamped"],
                           [[j.get("principle"), j.get("order"), j.get("p_A"),
                             j.get("p_response_a"), j.get("p_response_a_clamped")]
                            for j in judgements], "Judgements")
        cot = [c for c in r.get("cot") or [] if c]
        for c in cot:
            body += '<div class="label">chain of thought</div>' + _pre(c)
        out += (f"<details><summary>P(A) = {_e(_fmt(p_a))} · "
                f"{_e(_short(_prompt_text(r.get('prompt'))))}{badge}</summary>{body}</details>")
    return out


def _position_bias(labels: list[dict[str, Any]]) -> str:
    xs, ys, biased = [], [], 0
    for r in labels:
        by: dict[str, list[float]] = {"ab": [], "ba": []}
        for j in r.get("judgements") or []:
            if isinstance(j, dict) and j.get("order") in by and _num(j.get("p_A")) is not None:
                by[j["order"]].append(float(j["p_A"]))
        if by["ab"] and by["ba"]:
            x, y = sum(by["ab"]) / len(by["ab"]), sum(by["ba"]) / len(by["ba"])
            xs.append(x)
            ys.append(y)
            biased += (x - 0.5) * (y - 0.5) > 0
    if not xs:
        return _note("Position bias: n/a (labels scored in one order only).")
    rate = biased / len(xs)
    fig = _figure(5.6, 5.0)
    ax = fig.subplots()
    ax.fill_between([0.5, 1.0], 0.5, 1.0, color="#f2c4c4", alpha=0.6, lw=0)
    ax.fill_between([0.0, 0.5], 0.0, 0.5, color="#f2c4c4", alpha=0.6, lw=0)
    ax.scatter(xs, ys, s=18, color="#4c72b0", alpha=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("P(A) in the original order")
    ax.set_ylabel("P(A) with the responses swapped")
    ax.set_title(f"position-bias rate {rate:.1%} ({biased} of {len(xs)} pairs)")
    out = _img(fig, "position bias scatter",
               "Each pair's P(first option) in both orders (averaged over principles, before "
               "clamping). Pairs in the shaded quadrants prefer the same position whatever the "
               "content: they are position-biased.")
    out += _table(["pairs scored in both orders", "position-biased", "position-bias rate"],
                  [[len(xs), biased, rate]], "Position bias")
    return out


def _pm(run: _Run) -> str:
    data = run.json("pm/pm.json")
    if not isinstance(data, dict):
        raise TypeError("pm/pm.json: expected an object")
    out = ""
    metrics = data.get("metrics")
    if isinstance(metrics, dict) and metrics:
        out += _kv_table(_flat(metrics), "Preference-model metrics")
    rest = _flat({k: v for k, v in data.items() if k != "metrics"})
    if rest:
        out += _kv_table(rest, "Preference model")
    return out or '<p class="notrun">pm/pm.json has no metrics.</p>'


def _ppo(run: _Run) -> str:
    rows, bad = run.jsonl("ppo/ppo_log.jsonl")
    out = _bad_lines("ppo/ppo_log.jsonl", bad)
    if not rows:
        return out + '<p class="notrun">ppo/ppo_log.jsonl has no steps.</p>'
    steps = [_num(r.get("step")) for r in rows]
    steps = [s if s is not None else float(k) for k, s in enumerate(steps)]

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(s, _num(r.get(key))) for s, r in zip(steps, rows, strict=True)]
        pts = [(s, v) for s, v in pts if v is not None]
        return [s for s, _ in pts], [v for _, v in pts]

    fig = _figure(10.0, 3.8)
    ax1, ax2 = fig.subplots(1, 2)
    x, y = series("reward_mean")
    if x:
        ax1.plot(x, y, "-o", ms=3, color="#4c72b0", label="reward (mean)")
        sx, sd = series("reward_std")
        if sx == x:
            ax1.fill_between(x, [a - b for a, b in zip(y, sd, strict=True)],
                             [a + b for a, b in zip(y, sd, strict=True)], color="#4c72b0",
                             alpha=0.15, lw=0, label="± std")
    x2, y2 = series("score_mean")
    if x2:
        ax1.plot(x2, y2, "-", color="#55a868", label="PM score (mean)")
    ax1.set_xlabel("PPO step")
    ax1.set_ylabel("reward")
    ax1.set_title("reward")
    if x or x2:
        ax1.legend(fontsize=8)
    xk, yk = series("kl")
    ax2.plot(xk, yk, "-o", ms=3, color="#c44e52")
    ax2.set_xlabel("PPO step")
    ax2.set_ylabel("KL(policy ‖ reference)")
    ax2.set_title("KL")
    out += _img(fig, "PPO reward and KL curves",
                "Mean reward (± its standard deviation over the batch) and the PM score, and "
                "the KL divergence from the reference policy, per PPO step.")
    cols = [c for c in PPO_COLUMNS if any(c in r for r in rows)]
    cols += [c for c in dict.fromkeys(k for r in rows for k in r)
             if c not in cols and not any(isinstance(r.get(c), dict | list) for r in rows)]
    shown = rows
    note = ""
    if len(rows) > run.max_samples:
        stride = math.ceil(len(rows) / run.max_samples)
        shown = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
        note = _note(f"Showing every {stride}th of {len(rows)} steps (and the last).")
    out += note + _table(cols, [[r.get(c) for c in cols] for r in shown], "PPO steps")
    return out


def _answers(run: _Run) -> str:
    from constitutional.evaluate.evasive import refusal_reason

    rows, bad = run.jsonl("eval/answers.jsonl")
    out = _bad_lines("eval/answers.jsonl", bad)
    if not rows:
        return out + '<p class="notrun">eval/answers.jsonl has no rows.</p>'
    checkpoints = list(dict.fromkeys(str(r.get("checkpoint")) for r in rows))
    kinds = list(dict.fromkeys(str(r.get("kind", "?")) for r in rows))
    summary = []
    for kind in kinds:
        for c in checkpoints:
            texts = [r.get("answer") for r in rows
                     if str(r.get("kind", "?")) == kind and str(r.get("checkpoint")) == c]
            texts = [t for t in texts if isinstance(t, str)]
            if texts:
                summary.append([kind, c, len(texts), sum(bool(refusal_reason(t)) for t in texts),
                                sum(len(t) for t in texts) / len(texts)])
    out += _table(["prompts", "checkpoint", "answers", "refusals (detector)",
                   "mean length (characters)"], summary, "Answers per checkpoint", digits=1)
    for kind in kinds:
        prompts: dict[str, dict[str, Any]] = {}
        for r in rows:
            if str(r.get("kind", "?")) != kind:
                continue
            entry = prompts.setdefault(str(r.get("prompt_id")), {"prompt": r.get("prompt"),
                                                                 "answers": {}})
            entry["answers"][str(r.get("checkpoint"))] = r.get("answer")
        items, note = _capped(list(prompts.items()), run.max_samples, "prompts")
        out += f"<h3>{_e(kind)} prompts ({len(prompts)})</h3>" + note
        for pid, entry in items:
            cells = []
            for c in checkpoints:
                if c not in entry["answers"]:
                    continue
                answer = entry["answers"][c]
                reason = refusal_reason(answer) if isinstance(answer, str) else None
                badge = (f' <span class="badge bad" title="{_e(reason)}">refusal</span>'
                         if reason else "")
                cells.append(f'<div><div class="label">{_e(c)}{badge}</div>{_pre(answer)}</div>')
            out += (f"<details><summary>{_e(_short(_prompt_text(entry['prompt'])))} "
                    f'<span class="badge">{_e(pid)}</span></summary>'
                    f'<div class="label">prompt</div>{_conversation(entry["prompt"])}'
                    f'<div class="grid">{"".join(cells)}</div></details>')
    return out


SECTIONS: dict[str, Callable[[_Run], str]] = {
    "stages": _stages,
    "elo": _elo,
    "evasiveness": _evasiveness,
    "revision-curve": _revision_curve,
    "sl": _sl,
    "labels": _labels,
    "pm": _pm,
    "ppo": _ppo,
    "answers": _answers,
}


# ------------------------------------------------------------------------------------------------
# the page


def report_status(run_dir: str | Path) -> dict[str, str]:
    """``{section: "ok" | "not run"}``: whether any of each section's files exist."""
    run = Path(run_dir)
    return {s: ("ok" if any((run / f).is_file() for f in files) else "not run")
            for s, files in SECTION_FILES.items()}


def render_report(run_dir: str | Path, *, max_samples: int = 200) -> str:
    """The report's HTML for ``run_dir`` (see the module docstring)."""
    import matplotlib

    path = Path(run_dir)
    run = _Run(path, max_samples)
    sections, nav = [], []
    for sid, build in SECTIONS.items():
        ok = True
        try:
            with matplotlib.rc_context({"font.size": 9}):
                body = build(run)
        except _NotRun as missing:
            ok = False
            files = ", ".join(SECTION_FILES[sid])
            body = (f'<p class="notrun">Not run — no {_e(missing.args[0])} in this run '
                    f"directory (reads {_e(files)}).</p>")
        except Exception as err:  # noqa: BLE001 - a bad file must not stop the report
            log.warning("report section %s: %s: %s", sid, type(err).__name__, err)
            body = (f'<p class="error">Could not build this section: '
                    f"{_e(type(err).__name__)}: {_e(err)}</p>")
        cls = "" if ok else ' class="missing"'
        nav.append(f'<a href="#{sid}"{cls}>{_e(TITLES[sid])}</a>')
        sections.append(f'<section id="{sid}"><h2>{_e(TITLES[sid])}</h2>{body}</section>')
    stamp = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>Constitutional AI report · {_e(path.resolve().name)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>Constitutional AI report</h1><p>run directory "
        f"<code>{_e(path.resolve())}</code> · written {_e(stamp)}</p>"
        f"<nav>{''.join(nav)}</nav></header><main>{''.join(sections)}</main></body></html>\n"
    )


def write_report(run_dir: str | Path, out: str | Path | None = None, *,
                 max_samples: int = 200) -> Path:
    """Write ``run_dir/report.html`` (or ``out``) and return its path."""
    path = Path(run_dir).expanduser()
    if not path.exists():
        raise UserError("no such run directory", file=path)
    if not path.is_dir():
        raise UserError("expected a run directory, got a file", file=path)
    if max_samples < 1:
        raise UserError(f"must be at least 1, got {max_samples}", field="max_samples")
    target = Path(out) if out is not None else path / REPORT_FILE
    atomic_write_text(target, render_report(path, max_samples=max_samples))
    return target
