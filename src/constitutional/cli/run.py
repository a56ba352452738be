"""``cai run CONFIG.yaml``: the whole pipeline (see :mod:`constitutional.pipeline`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from constitutional.cli.options import out
from constitutional.core.log import err_console


def run_cmd(
    config_file: Annotated[Path | None, typer.Argument(
        metavar="CONFIG", help="A YAML config (configs/demo.yaml, configs/paper.yaml); "
                               "omitted: the defaults.")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a setting: --set rl.steps=4 --set executor=ray (repeatable).")]
    = None,
    run_dir: Annotated[Path | None, typer.Option(
        "--out", help="Run directory (default: runs/<config name>).")] = None,
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="Run only these stages (repeatable).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="Only warnings and the final "
                                                        "table.")] = False,
) -> None:
    """Run every stage — revise, sl train, rl sample/label, pm, ppo/dpo, eval, report — into
    one run directory; re-running skips what is done and resumes what was interrupted."""
    from constitutional.config import load_config
    from constitutional.pipeline import Pipeline

    config = load_config(config_file, overrides or [])
    root = run_dir or Path("runs") / (config_file.stem if config_file else "default")
    pipeline = Pipeline(config, root)
    handler = logging.FileHandler(root / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    lib = logging.getLogger("constitutional")
    lib.addHandler(handler)
    if lib.level == logging.NOTSET or lib.level > logging.INFO:
        lib.setLevel(logging.INFO)
    if quiet:
        for h in logging.getLogger().handlers:
            h.setLevel(logging.WARNING)

    def on_stage(name: str, status: str, seconds: float) -> None:
        if quiet:
            return
        if status == "running":
            err_console.print(f"[bold]▶ {name}[/]")
        elif status == "skipped":
            err_console.print(f"[dim]✓ {name}: up to date, skipped[/]")
        else:
            err_console.print(f"[green]✓ {name}[/] [dim]{seconds:.1f}s[/]")

    try:
        state = pipeline.run(only=only, on_stage=on_stage)
    finally:
        lib.removeHandler(handler)
        handler.close()
    table = Table("stage", "status", "seconds", "result", title=f"cai run → {root}",
                  show_edge=False)
    for name, entry in state["stages"].items():
        extra = {k: v for k, v in entry.items()
                 if k not in ("fingerprint", "status", "seconds", "seconds_before")}
        table.add_row(name, entry.get("status", ""), f"{entry.get('seconds', 0):.1f}",
                      json.dumps(extra, default=str)[:120] if extra else "")
    gates = state.get("gates")
    if isinstance(gates, dict):  # the quality gates' verdict (constitutional.rl.gates)
        status = gates.get("status", "")
        table.add_row("gates", f"[bold red]{status}[/]" if status in ("warn", "fail") else status,
                      "", Text(str(gates.get("message", ""))))
    out.print(table)
    out.print(f"report → {root / 'report.html'} · total {state['total_seconds_this_call']:.0f}s "
              f"this call", markup=False, highlight=False, soft_wrap=True)
