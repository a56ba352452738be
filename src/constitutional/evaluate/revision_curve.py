"""The harmlessness PM score against the number of revisions (the paper's Figure 5).

From a ``cai sl revise`` run's ``revise.traces.jsonl``: revision 0 is each prompt's initial
answer, revision ``r`` the answer after ``r`` critique→revision rounds. Every usable one is scored
by a preference model (``pm.score(conversations)``, each conversation the prompt followed by the
answer as the assistant's turn), and the curve is the mean score per revision number with its
standard error (sample standard deviation / √n).

Degenerate outputs — the initial answer when ``initial_degenerate`` is set, a round whose
``degenerate`` is set (empty or looping text, see :func:`constitutional.sl.prompts.
degenerate_reason`) — are skipped and counted per revision number, so a point's ``n`` is the
number of answers actually scored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from constitutional.core.errors import UserError
from constitutional.core.io import atomic_write_text, jsonl_objects
from constitutional.core.messages import coerce_messages
from constitutional.core.progress import chunks, progress

TRACES_FILE = "revise.traces.jsonl"


def load_traces(path: str | Path) -> list[dict[str, Any]]:
    """Read ``revise.traces.jsonl`` (a run directory or the file); bad rows are one-line errors
    naming the line and field."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / TRACES_FILE
    traces = []
    for number, row in jsonl_objects(path, required=("prompt", "initial", "rounds")):
        where: dict[str, Any] = {"file": path, "line": number}
        coerce_messages(row["prompt"], **where, field="prompt", text=False)  # checks it
        if not isinstance(row["initial"], str):
            raise UserError("expected text", **where, field="initial")
        if not isinstance(row["rounds"], list):
            raise UserError("expected a list of rounds", **where, field="rounds")
        for r in row["rounds"]:
            if not isinstance(r, dict) or not isinstance(r.get("revision"), str):
                raise UserError("each round needs a revision text", **where, field="rounds")
        traces.append(row)
    if not traces:
        raise UserError("no traces (the file has no rows)", file=path, line=1)
    return traces


def _mean_stderr(values: Sequence[float]) -> tuple[float | None, float | None]:
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def revision_curve(traces: Sequence[dict[str, Any]], pm: Any, *,
                   chunk_size: int = 32) -> dict[str, Any]:
    """Score every usable answer of every trace with ``pm``; the mean ± stderr per revision.

    Returns ``{"points": [{"revision", "mean", "stderr", "n", "degenerate"}], "traces",
    "degenerate_skipped", "pm"}``; revision 0 is the initial answer.
    """
    if not callable(getattr(pm, "score", None)):
        raise TypeError("the revision curve needs a PM with score(conversations)")
    items: list[tuple[int, list[dict[str, str]]]] = []
    degenerate: dict[int, int] = {}
    depth = max((len(t["rounds"]) for t in traces), default=0)
    for t in traces:
        answers = [(0, t["initial"], bool(t.get("initial_degenerate")))]
        answers += [(int(r.get("round", k + 1)), r["revision"], bool(r.get("degenerate")))
                    for k, r in enumerate(t["rounds"])]
        for number, text, bad in answers:
            degenerate.setdefault(number, 0)
            if bad:
                degenerate[number] += 1
                continue
            items.append((number, [*t["prompt"], {"role": "assistant", "content": text}]))
    scores: list[float] = []
    with progress("scoring revisions", len(items)) as advance:
        for chunk in chunks(items, chunk_size):
            scores += [float(s) for s in pm.score([c for _, c in chunk])]
            advance(len(chunk))
    by_revision: dict[int, list[float]] = {r: [] for r in range(depth + 1)}
    for (number, _), s in zip(items, scores, strict=True):
        by_revision.setdefault(number, []).append(s)
    points = []
    for number in sorted(by_revision):
        mean, stderr = _mean_stderr(by_revision[number])
        points.append({"revision": number, "mean": mean, "stderr": stderr,
                       "n": len(by_revision[number]), "degenerate": degenerate.get(number, 0)})
    name = str(getattr(pm, "path", None) or getattr(pm, "spec", None) or type(pm).__name__)
    return {"points": points, "traces": len(traces),
            "degenerate_skipped": sum(degenerate.values()), "pm": name,
            "score": "PM reward of the prompt followed by the answer; mean ± standard error"}


def run_revision_curve(traces_path: str | Path, pm: Any, out: str | Path | None = None,
                       *, pm_name: str | None = None) -> dict[str, Any]:
    """:func:`revision_curve` over a run's traces, written to ``out`` (JSON) when given."""
    result = revision_curve(load_traces(traces_path), pm)
    if pm_name:
        result["pm"] = pm_name
    result["traces_file"] = str(traces_path)
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result
