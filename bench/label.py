"""Labelling throughput: `cai rl label` (the library function) vs a naive one-pair-at-a-time loop.

Both sides label the same pairs with the built-in model (SmolLM2-135M-Instruct) and the same
settings — the default constitution, the same few-shot demonstrations and principle per pair,
both orders, K=1 — and read the same P(A):

* **ours**: ``constitutional.rl.label.label`` — one forward pass per (pair, principle, order)
  reading both option tokens, pairs batched, the few-shot prefix shared within a batch (when the
  backend shares prefixes);
* **naive**: one pair at a time, one full forward pass per option — P(A) from a forward pass over
  context + "A" and another over context + "B" — no batching, no prefix reuse. Its rate is
  measured on the first ``--naive-pairs`` pairs (a rate, so a subset is enough).

The pairs: 100 pairs built from the human-labelled responses in pyrit's scorer-eval CSVs (read
offline from the wheel), two responses per objective, each cut to ``--max-chars`` characters (about
what `cai rl sample --max-new-tokens 256` gives). Prints labels/s for both and the ratio; timings
are never asserted.

Ours runs four ways, one after the other: the `hf` backend in float32 and in bfloat16 (this
process), and the `vllm` backend in float32 and bfloat16 (child processes in the vLLM
environment, see ``bench/_sides.py``). Each side's start-up (model load) is printed and charged
once; the 10x-larger run is projected from the measured rate (one prefill per label, nothing
batched across labels, so the cost is linear). Every side's P(A) is compared with the hf float32
side: the bf16 gate (same A/B choice on >= 99% of judgements, |ΔP(A)| <= 0.01).

    python bench/label.py [--pairs 100] [--naive-pairs 10] [--few-shot 4] [--max-chars 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _sides import run_side, vllm_python, write_side

BUILTIN = "builtin:smollm2-135m-instruct"


def bench_pairs(n: int, max_chars: int, seed: int = 0) -> list[dict]:
    """``n`` pairs of (prompt, two responses) from pyrit's human-labelled objective responses."""
    from _data import pyrit_scorer_pairs

    rows = pyrit_scorer_pairs("objective")
    by_prompt: dict[str, list] = defaultdict(list)
    for r in rows:
        by_prompt[r.prompt].append(r)
    pairs = []
    for prompt, responses in by_prompt.items():  # objectives with two or more responses first
        if len(responses) >= 2:
            pairs.append((prompt, responses[0].response, responses[1].response))
    rng = random.Random(seed)
    singles = [r for rs in by_prompt.values() if len(rs) == 1 for r in rs]
    while len(pairs) < n:  # then a response to the prompt, against another prompt's response
        a, b = rng.sample(singles, 2)
        pairs.append((a.prompt, a.response, b.response))
    return [{"id": f"bench-{i}", "prompt": [{"role": "user", "content": p}],
             "response_a": a[:max_chars], "response_b": b[:max_chars]}
            for i, (p, a, b) in enumerate(pairs[:n])]


def naive_label(lm, pairs: list[dict], few_shot: int, seed: int = 0) -> tuple[list[float], float]:
    """P(A) per (pair, order) with one full forward pass per option, one sequence at a time."""
    from constitutional.constitution import load_constitution
    from constitutional.rl import prompts as P
    from constitutional.rl.feedback import few_shot_block, pair_principles, special_tokens

    constitution = load_constitution("default")
    shots, _ = few_shot_block(constitution, few_shot, 0, seed, False)
    special = special_tokens(lm)
    tok, model = lm.tokenizer, lm.model
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for pair in pairs:
            principle = pair_principles(constitution, pair["prompt"], 1, seed)[0]
            for options in ((pair["response_a"], pair["response_b"]),
                            (pair["response_b"], pair["response_a"])):
                q = P.question(pair["prompt"], principle.text, options, special)
                text = lm.render(P.answer_prompt(shots, q, "chat"))
                logps = []
                for letter in P.LETTERS:
                    ids = tok(text + letter, add_special_tokens=False, return_tensors="pt")
                    logits = model(**ids).logits  # every position, as a plain forward does
                    logps.append(float(torch.log_softmax(logits[0, -2].float(), -1)
                                       [ids["input_ids"][0, -1]]))
                a, b = logps
                out.append(1 / (1 + math.exp(b - a)))
    return out, time.perf_counter() - t0


def run_labels(spec: str, dtype: str, pairs: list[dict], args) -> dict:
    """Load ``spec`` in ``dtype`` and label ``pairs``: start-up, seconds, P(A) per judgement and
    the soft label p_a per pair."""
    from constitutional.models import load_model
    from constitutional.rl.label import LabelConfig, label

    t0 = time.perf_counter()
    lm = load_model(spec, dtype=dtype)
    startup = time.perf_counter() - t0
    config = LabelConfig(spec, few_shot=args.few_shot, principles=1, both_orders=True,
                         chunk_size=args.chunk_size)
    with tempfile.TemporaryDirectory() as tmp:
        before = lm.stats.forward_passes
        t0 = time.perf_counter()
        result = label(pairs, config, tmp, model=lm)
        seconds = time.perf_counter() - t0
    return {"startup": startup, "seconds": seconds,
            "passes": lm.stats.forward_passes - before,
            "p_A": {f"{r['pair_id']}|{j['order']}": j["p_A"] for r in result.records
                    for j in r["judgements"]},
            "p_a": {r["pair_id"]: r["p_a"] for r in result.records}}


def agreement(ref: dict, other: dict) -> str:
    """The A/B choice and |ΔP(A)| of ``other`` against ``ref``, per judgement and per label."""
    def stats(a: dict, b: dict) -> tuple[int, int, float, float]:
        keys = sorted(a)
        same = sum((a[k] > 0.5) == (b[k] > 0.5) for k in keys)
        diffs = sorted(abs(a[k] - b[k]) for k in keys)
        return same, len(keys), diffs[-1], statistics.median(diffs)

    js, jn, jmax, jmed = stats(ref["p_A"], other["p_A"])
    ls, ln, lmax, lmed = stats(ref["p_a"], other["p_a"])
    return (f"judgements {js}/{jn} same choice ({js / jn:.1%}), |ΔP(A)| max {jmax:.4f} median "
            f"{jmed:.4f} · labels p_a {ls}/{ln} same side ({ls / ln:.1%}), max {lmax:.4f} "
            f"median {lmed:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--naive-pairs", type=int, default=10)
    parser.add_argument("--few-shot", type=int, default=4)
    parser.add_argument("--max-chars", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--vllm-python", help="the interpreter that has vLLM (default .venv-vllm)")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # "SPEC@DTYPE": one side, as JSON
    parser.add_argument("--side-out", help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:  # the pairs come from the parent (the vLLM environment has no pyrit)
        spec, dtype = args.side.split("@")
        pairs = json.loads(Path(args.pairs_file).read_text())
        write_side(args.side_out, run_labels(spec, dtype, pairs, args))
        return
    pairs = bench_pairs(args.pairs, args.max_chars)

    print(f"model: {BUILTIN}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
          "threads")
    print(f"settings (every side): default constitution, --few-shot {args.few_shot}, K=1, both "
          f"orders; {args.pairs} pairs from pyrit scorer-eval responses cut to {args.max_chars} "
          "chars\n")

    sides: dict[str, dict] = {}
    for dtype in ("float32", "bfloat16"):
        sides[f"cai rl label, hf {dtype}"] = run_labels(BUILTIN, dtype, pairs, args)
    py = vllm_python(args.vllm_python)
    if py is None:
        print("vLLM: no environment with vLLM here (make test-vllm builds .venv-vllm); skipped")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            pairs_file = Path(tmp) / "pairs.json"
            pairs_file.write_text(json.dumps(pairs))
            for dtype in ("float32", "bfloat16"):
                got = run_side(py, "label.py", ["--side", f"vllm:{BUILTIN}@{dtype}",
                                                "--pairs-file", str(pairs_file),
                                                "--few-shot", str(args.few_shot),
                                                "--chunk-size", str(args.chunk_size)])
                if got:
                    sides[f"cai rl label, vllm {dtype}"] = got

    from constitutional.models import load_model

    lm = load_model(BUILTIN, dtype="float32")
    contexts = _contexts(pairs[:5], args.few_shot)
    tokens = sum(len(lm.encode(ctx)) for ctx in contexts) / len(contexts)
    demos = len(lm.encode(contexts[0][:-2])) if args.few_shot else 0
    subset = pairs[: args.naive_pairs]
    naive_p, naive_s = naive_label(lm, subset, args.few_shot)
    naive_rate = len(subset) / naive_s
    print(f"{len(pairs)} labels = {2 * len(pairs)} rows of ~{tokens:.0f} tokens, {demos} of them "
          "the few-shot block")
    n = len(pairs)
    print(f"{'side':<30}{'start-up s':>11}{'label s':>9}{'labels/s':>10}{'× naive':>9}"
          f"{f'{n} with start-up':>18}{f'{10 * n}, projected':>18}")
    for name, r in sides.items():
        rate = n / r["seconds"]
        total = n / (r["seconds"] + r["startup"])
        ten = 10 * n / (10 * r["seconds"] + r["startup"])  # one prefill per label: linear
        print(f"{name:<30}{r['startup']:>11.1f}{r['seconds']:>9.1f}{rate:>10.3f}"
              f"{rate / naive_rate:>9.1f}{f'{total:.3f}/s':>18}{f'{ten:.3f}/s':>18}")
    print(f"{'naive loop, hf float32':<30}{'':>11}{naive_s:>9.1f}{naive_rate:>10.3f}{1:>9.1f}"
          f"   ({len(subset)} pairs, 4 full passes per pair)")

    ref = next(iter(sides.values()))
    keys = [f"{p['id']}|{o}" for p in subset for o in ("ab", "ba")]
    diff = max(abs(ref["p_A"][k] - q) for k, q in zip(keys, naive_p, strict=True))
    print(f"\nagreement with the naive loop (hf float32): max |ΔP(A)| = {diff:.2e} over "
          f"{len(keys)} judgements")
    print("agreement with hf float32 (the bf16 gate: same choice on >= 99% and |ΔP(A)| <= 0.01):")
    for name, r in list(sides.items())[1:]:
        print(f"  {name}: {agreement(ref, r)}")
    best = max(sides, key=lambda k: len(pairs) / sides[k]["seconds"])
    print(f"\nfastest: {best}, {len(pairs) / sides[best]['seconds'] / naive_rate:.1f}x the naive "
          "loop (goal >= 16x with >= 99% agreement against float32)")


def _contexts(pairs: list[dict], few_shot: int) -> list:
    from constitutional.constitution import load_constitution
    from constitutional.rl import prompts as P
    from constitutional.rl.feedback import few_shot_block, pair_principles

    c = load_constitution("default")
    shots, _ = few_shot_block(c, few_shot, 0, 0, False)
    out = []
    for pair in pairs:
        principle = pair_principles(c, pair["prompt"], 1, 0)[0]
        for options in ((pair["response_a"], pair["response_b"]),
                        (pair["response_b"], pair["response_a"])):
            out.append(P.answer_prompt(shots, P.question(pair["prompt"], principle.text,
                                                         options), "chat"))
    return out


if __name__ == "__main__":
    main()
