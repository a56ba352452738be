"""``cai report RUN``: one self-contained ``report.html`` for a run directory.

The page has no scripts and loads nothing: the plots are matplotlib PNGs embedded as base64
``data:`` URLs, the CSS is inline, and a Content-Security-Policy forbids any other source, so it
opens offline, from an e-mail attachment or a CI artefact alike. Samples are browsable with plain
``<details>`` elements. Every piece of text from the run is escaped (Jinja2's autoescaping).

The page opens with the **verdict** (``verdict.py``): for each stage, whether it carried signal,
with its deciding figures, their 95% intervals, and a warning in plain words wherever a figure is
at chance — before any table.

The package: ``verdict.py``, ``build.py`` and ``samples.py`` read the run directory and compute
each section's plain data, ``plots.py`` draws its figures, ``templates/`` shows it
(``report.html.j2``, the page; ``sections/<section>.html.j2``, one per section;
``macros.html.j2``, tables, notes, figures, conversations), and ``render.py`` puts them
together. ``sections.py`` lists the sections.

It reads whatever exists of this layout (a section whose files are missing says "not run"; a file
that cannot be read says so in its section; the report itself never fails because of a run's
contents):

=============================  ===================================================================
``run.json``                   ``{"stages": {name: {"seconds", "status", …}}, "gates": …}`` — wall
                               time table; the quality gates' verdict
``sl/revise.traces.jsonl``     critique→revision traces with the principle used
``sl/revise.summary.json``     SL-CAI counts
``rl/pairs.jsonl``             answer pairs (counted)
``rl/labels.jsonl``            soft labels: histogram of p_a, position bias, labelled pairs
``rl/label.summary.json``      labelling summary (mean p_a, position bias, order agreement)
``calibrate/calibrate.…``      ``summary.json``: the feedback model's accuracy on human comparisons
``pm/pm.json``                 ``{"metrics": {…}}`` — preference-model metrics
``pm/eval/*.summary.json``     ``cai eval pm`` accuracies (in the verdict)
``ppo/ppo_log.jsonl``          one row per PPO step — reward and KL curves
``eval/elo.json``              ``{"harmless": elo_eval(…), "helpful": …}`` — the Elo frontier
``eval/evasiveness.json``      refusal rate per checkpoint
``eval/revision_curve.json``   PM score per revision number
``eval/answers.jsonl``         each checkpoint's answers, side by side
=============================  ===================================================================
"""

from __future__ import annotations

from constitutional.evaluate.report.build import PPO_COLUMNS
from constitutional.evaluate.report.render import (
    REPORT_FILE,
    SECTIONS,
    render_report,
    write_report,
)
from constitutional.evaluate.report.sections import SECTION_FILES, TITLES, report_status
from constitutional.evaluate.report.values import fmt

_fmt = fmt  # a table cell's text (the tests' name for it)

__all__ = ["PPO_COLUMNS", "REPORT_FILE", "SECTIONS", "SECTION_FILES", "TITLES", "render_report",
           "report_status", "write_report"]
