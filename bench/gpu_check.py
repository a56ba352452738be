"""`make gpu-check MODEL=<model>`: every stage of `cai run configs/gpu.yaml` once, on one CUDA
GPU, with a 1–8B model of the user's (a directory or a hub id) and vLLM in process for the
stages that generate; prints each stage's wall time, peak GPU memory and generation tokens/s.

Each stage runs in a process of its own (this script again, with ``--stage``), so that what one
stage holds on the GPU (a vLLM engine keeps its memory until its process ends) is gone before
the next, and each peak is the stage's own. Two peaks are measured per stage:

* **torch peak**: ``torch.cuda.max_memory_allocated`` of the stage's process (the models it
  loads with transformers, training, the hf backend);
* **GPU peak**: the device's used memory (``torch.cuda.mem_get_info``, sampled every 50 ms),
  which also counts vLLM's engine process: the weights, and the KV cache it reserves
  (``vllm.gpu_memory_utilization`` of configs/gpu.yaml, a share of the whole GPU per engine).
  Other processes on the GPU count too; the table shows what was in use before the stage.

tokens/s is per stage, over the time the models spent generating (the models the stage loads are
counted through ``constitutional.models.load_model``): revise, sample and eval's answers; the
RL stage's own rollouts are not counted. The stage logs and a summary (``gpu_check.json``) go
into the run directory.

On a machine without a CUDA GPU it says so and exits 0.

    python bench/gpu_check.py --model DIR_OR_HUB_ID [--out runs/gpu-check] [--set key=value …]
        [--config configs/gpu.yaml]

e.g. ``--set vllm.gpu_memory_utilization=0.3 --set pm.model=<a smaller model>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

NO_GPU = "gpu-check needs a CUDA GPU; none here (torch.cuda.is_available() is False)"
ROOT = Path(__file__).resolve().parent.parent
MARK = ".gpu-check"  # a run directory this script made (and may start afresh)
GIB = 2**30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("MODEL") or None,
                    help="The model: a directory or a hub id, 1–8B parameters ($MODEL).")
    ap.add_argument("--config", default=str(ROOT / "configs" / "gpu.yaml"))
    ap.add_argument("--out", default="runs/gpu-check",
                    help="The run directory (started afresh when gpu-check made it).")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="Override a setting of the config, as cai run --set (repeatable).")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage, here
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    if args.stage:
        return run_stage(args)
    if not args.model:
        print("error: which model? make gpu-check MODEL=<a 1–8B model directory or hub id> "
              "(or --model)", file=sys.stderr)
        return 2
    return run_all(args)


# -- the parent: one process per stage ------------------------------------------------------------


def overrides(args: argparse.Namespace) -> list[str]:
    return [f"model={args.model}", *args.overrides]


def run_all(args: argparse.Namespace) -> int:
    import torch

    from constitutional.config import load_config
    from constitutional.core.errors import UserError
    from constitutional.models import vllm_installed
    from constitutional.pipeline import Pipeline

    try:
        config = load_config(args.config, overrides(args))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if config.backend == "vllm" and not vllm_installed():
        print("error: vLLM is not installed in this environment: pip install vllm (its CUDA "
              "build), or run without it: --set backend=hf", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARK).is_file():
            print(f"error: {out} exists and was not made by gpu-check; give another --out",
                  file=sys.stderr)
            return 2
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARK).write_text("made by bench/gpu_check.py; started afresh by its next run\n")
    stages = [s.name for s in Pipeline(config, out).stages] + ["report"]
    logs = out / "gpu-check"
    logs.mkdir()
    props = torch.cuda.get_device_properties(0)
    print(f"gpu-check: {args.model} on {props.name} ({props.total_memory / GIB:.1f} GiB), "
          f"stages {', '.join(stages)}; logs in {logs}", flush=True)
    results: list[dict[str, Any]] = []
    for stage in stages:
        result_file, log_file = logs / f"{stage}.json", logs / f"{stage}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage,
               "--result", str(result_file), "--config", args.config, "--out", str(out),
               "--model", args.model,
               *[x for o in args.overrides for x in ("--set", o)]]
        print(f"▶ {stage}", flush=True)
        with log_file.open("w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        if rc != 0 or not result_file.is_file():
            tail = log_file.read_text(errors="replace").splitlines()[-25:]
            print("\n".join(f"  | {line}" for line in tail), file=sys.stderr)
            print(f"error: stage {stage} failed (exit {rc}); its log: {log_file}",
                  file=sys.stderr)
            return 1
        results.append(json.loads(result_file.read_text()))
        print(f"  {row(results[-1])}", flush=True)
    summary = {"model": args.model, "gpu": props.name, "gpu_gib": round(props.total_memory / GIB,
                                                                         1),
               "config": args.config, "overrides": args.overrides, "stages": results}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(results))
    print(f"summary → {out / 'gpu_check.json'}")
    return 0


HEADER = ("stage", "seconds", "torch peak GiB", "GPU peak GiB", "GPU before GiB", "gen tokens",
          "tokens/s")


def cells(r: dict[str, Any]) -> tuple[str, ...]:
    tps = r.get("tokens_per_second")
    return (r["stage"], f"{r['seconds']:.1f}", f"{r['torch_peak_gib']:.2f}",
            f"{r['gpu_peak_gib']:.2f}", f"{r['gpu_before_gib']:.2f}",
            str(r.get("generated_tokens") or "-"), f"{tps:.1f}" if tps else "-")


def row(r: dict[str, Any]) -> str:
    return " · ".join(f"{h} {c}" for h, c in zip(HEADER[1:], cells(r)[1:], strict=True))


def table(results: list[dict[str, Any]]) -> str:
    rows = [HEADER, *(cells(r) for r in results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in rows)


# -- the child: one stage, measured ---------------------------------------------------------------


class PeakMemory(threading.Thread):
    """The device's peak used memory (all processes), sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        import torch

        self.torch = torch
        self.interval = interval
        self.done = threading.Event()
        self.before = self.used()
        self.peak = self.before

    def used(self) -> int:
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def sample(self) -> None:
        self.peak = max(self.peak, self.used())

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.sample()


def count_generation() -> list[Any]:
    """The ``stats`` (generated tokens, seconds) of every model the stage will load through
    ``constitutional.models.load_model``."""
    from constitutional import models

    stats: list[Any] = []
    load_model = models.load_model

    def counted(*args: Any, **kwargs: Any) -> Any:
        lm = load_model(*args, **kwargs)
        s = getattr(lm, "stats", None)
        if s is not None and all(s is not x for x in stats):
            stats.append(s)
        return lm

    models.load_model = counted
    return stats


def run_stage(args: argparse.Namespace) -> int:
    import torch

    from constitutional.core.log import setup_logging

    setup_logging()
    stats = count_generation()
    from constitutional.config import load_config
    from constitutional.pipeline import Pipeline

    config = load_config(args.config, overrides(args))
    pipeline = Pipeline(config, args.out)
    torch.cuda.init()
    torch.cuda.reset_peak_memory_stats()
    peak = PeakMemory()
    peak.start()
    t0 = time.perf_counter()
    try:
        state = pipeline.run(only=[args.stage])
    finally:
        peak.stop()
    seconds = time.perf_counter() - t0
    tokens = sum(s.generated_tokens for s in stats)
    gen_seconds = sum(s.seconds for s in stats if s.generated_tokens)
    entry = state["stages"].get(args.stage, {})
    result = {
        "stage": args.stage,
        "seconds": round(seconds, 2),
        "torch_peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
        "gpu_peak_gib": round(peak.peak / GIB, 3),
        "gpu_before_gib": round(peak.before / GIB, 3),
        "generated_tokens": tokens,
        "generation_seconds": round(gen_seconds, 2),
        "tokens_per_second": round(tokens / gen_seconds, 1) if tokens and gen_seconds else None,
        "run_json": {k: v for k, v in entry.items() if k != "fingerprint"},
    }
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
