"""The page: each section built (``build.py``, ``samples.py``) and shown by its template.

Rendering is Jinja2's, with autoescaping: every ``{{ … }}`` in the templates is escaped, whatever
it prints. A section's body is rendered on its own, so that a file that cannot be read (or shown)
fails only its section, never the report.
"""

from __future__ import annotations

import datetime as _dt
import functools
import html
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from constitutional.core import layout
from constitutional.core.errors import UserError
from constitutional.core.io import atomic_write_text
from constitutional.evaluate.report.build import (
    build_elo,
    build_evasiveness,
    build_pm,
    build_ppo,
    build_revision_curve,
    build_stages,
    build_xstest,
)
from constitutional.evaluate.report.rundir import NotRun, RunDir
from constitutional.evaluate.report.samples import build_answers, build_labels, build_sl
from constitutional.evaluate.report.sections import SECTION_FILES, TITLES
from constitutional.evaluate.report.values import fmt, is_number
from constitutional.evaluate.report.verdict import build_verdict

log = logging.getLogger(__name__)

REPORT_FILE = layout.REPORT
#: Each section's builder: run directory → the data its template shows (in page order).
SECTIONS: dict[str, Callable[[RunDir], Any]] = {
    "verdict": build_verdict,  # first: before any table
    "stages": build_stages,
    "xstest": build_xstest,  # the measure people validated, before the AI judges
    "elo": build_elo,
    "evasiveness": build_evasiveness,
    "revision-curve": build_revision_curve,
    "sl": build_sl,
    "labels": build_labels,
    "pm": build_pm,
    "ppo": build_ppo,
    "grpo": functools.partial(build_ppo, algo="grpo"),
    "rloo": functools.partial(build_ppo, algo="rloo"),
    "answers": build_answers,
}


@dataclass
class SectionView:
    """One section of the page: its body, or why there is none."""

    id: str
    title: str
    reads: tuple[str, ...]  # the files it reads
    body: Markup | None = None  # its rendered template
    missing: str | None = None  # not run: the file looked for
    error_type: str | None = None  # could not be built: the exception
    error: str | None = None


def _escape(value: Any) -> Markup:
    """The environment's escaping (``finalize``, before autoescape): ``None`` prints as nothing,
    and quotes as ``html.escape`` writes them (``&#x27;``, as the report always has)."""
    if hasattr(value, "__html__"):
        return Markup(value)
    return Markup(html.escape("" if value is None else str(value), quote=True))


@functools.cache
def environment() -> Environment:
    env = Environment(loader=PackageLoader("constitutional.evaluate.report", "templates"),
                      autoescape=True, undefined=StrictUndefined, finalize=_escape,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["filename"] = lambda rel: PurePosixPath(rel).name
    env.globals["layout"] = layout  # the run directory's file names
    env.tests["cell_number"] = is_number
    return env


def _section(run: RunDir, sid: str) -> SectionView:
    view = SectionView(sid, TITLES[sid], SECTION_FILES[sid])
    try:
        data = SECTIONS[sid](run)
        view.body = Markup(environment().get_template(f"sections/{sid}.html.j2").render(d=data))
    except NotRun as missing:
        view.missing = str(missing.args[0])
    except Exception as err:  # noqa: BLE001 - a bad file must not stop the report
        log.warning("report section %s: %s: %s", sid, type(err).__name__, err)
        view.error_type, view.error = type(err).__name__, str(err)
    return view


def render_report(run_dir: str | Path, *, max_samples: int = 200) -> str:
    """The report's HTML for ``run_dir`` (see the package docstring)."""
    path = Path(run_dir)
    run = RunDir(path, max_samples)
    return environment().get_template("report.html.j2").render(
        sections=[_section(run, sid) for sid in SECTIONS],
        run_name=path.resolve().name, run_path=str(path.resolve()),
        written=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))


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
