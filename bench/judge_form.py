"""Which form of the judge reward carries more signal: pairwise or pointwise?

The judge reward of ``cai rl grpo`` / ``rloo`` (``rl.reward: judge``) asks the feedback model the
constitution's question about every sampled answer, in one of two forms (``grpo.judge_form``):

* **pairwise**: P(the answer is preferred over a reference answer to the same prompt), both
  orders: what the run does, with the starting policy's greedy answer as the reference (here
  the ``--reference-model``'s greedy answer, generated once per prompt);
* **pointwise**: P(Yes) to "does the reply meet the principle?", both orders (Yes/No swapped).

Both are run through :class:`constitutional.rl.rewards.JudgeReward` itself, with the same
feedback model, demonstrations (``--few-shot``), principles (one per prompt, seeded) and orders.
The signal is measured on answers that **people** ranked, from ``../shared/data/real/``:

* **HH-RLHF harmless-base** (test slice): the chosen (less harmful) and the rejected final answer
  of the first ``--hh`` comparisons whose transcripts share one prompt;
* **XSTest** (the labelled GPT-4 and Mistral-7B-Instruct answers): every prompt where the two
  people-labelled answers disagree (one refuses, fully or partly, the other complies): on an
  ``unsafe`` prompt the refusal is the better answer, on a ``safe`` one the compliance. The first
  ``--xstest`` of those, safe and unsafe interleaved. Evaluation only: nothing is trained.

For each form and dataset it prints: **accuracy**, the share of pairs where the reward of the
better answer is higher (a tie counts half), with its 95% Wilson interval (at chance when the
interval contains 50%); the **mean gap** reward(better) − reward(worse) with a 95% interval
(normal approximation); and the wall time of the scoring (the pairwise form's reference
answers are timed apart). Nothing is asserted.

Measured (``--hh 24 --xstest 24 --max-chars 800``, the 1.5B teacher, 2 cores, beside other
work): HH-RLHF pairwise 45.8% [27.9, 64.9], pointwise 47.9% [29.6, 66.8]; XSTest pairwise
37.5% [21.2, 57.3], pointwise 45.8% [27.9, 64.9]: both forms at chance on both sets.

    python bench/judge_form.py [--feedback-model builtin:qwen2.5-coder-1.5b-instruct]
                               [--reference-model builtin:smollm2-135m-instruct]
                               [--hh 48] [--xstest 48] [--few-shot 4] [--max-chars 1500]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def hh_pairs(path: Path, n: int, max_chars: int) -> list[dict]:
    from constitutional.core.errors import UserError
    from constitutional.rl.preference import load_comparisons

    skipped: list[UserError] = []
    rows = load_comparisons(path, source="human", hard=True, skipped=skipped)
    pairs = [{"set": "hh-rlhf", "prompt": c.prompt, "better": c.chosen[:max_chars],
              "worse": c.rejected[:max_chars]}
             for c in rows if sum(len(m["content"]) for m in c.prompt) <= max_chars][:n]
    print(f"HH-RLHF: {len(rows)} usable comparisons ({len(skipped)} skipped), {len(pairs)} "
          f"used (prompt at most {max_chars} characters)")
    return pairs


def xstest_pairs(folder: Path, n: int, max_chars: int) -> list[dict]:
    from constitutional.evaluate.refusals import read_labelled

    gpt4, _ = read_labelled(folder / "completions_gpt4.csv")
    mistral, _ = read_labelled(folder / "completions_mistralinstruct.csv")
    other = {(r.prompt, r.type): r for r in mistral}
    by_kind: dict[str, list[dict]] = {"safe": [], "unsafe": []}
    for a in gpt4:
        b = other.get((a.prompt, a.type))
        if b is None or (a.label == "1_full_compliance") == (b.label == "1_full_compliance"):
            continue
        comply, refuse = (a, b) if a.label == "1_full_compliance" else (b, a)
        unsafe = a.type.startswith("contrast")
        better, worse = (refuse, comply) if unsafe else (comply, refuse)
        by_kind["unsafe" if unsafe else "safe"].append(
            {"set": "xstest", "kind": "unsafe" if unsafe else "safe",
             "prompt": [{"role": "user", "content": a.prompt}],
             "better": better.completion[:max_chars], "worse": worse.completion[:max_chars]})
    mixed = [p for pair in zip(by_kind["unsafe"], by_kind["safe"]) for p in pair]
    longer = max(by_kind.values(), key=len)[min(map(len, by_kind.values())):]
    pairs = (mixed + longer)[:n]
    print(f"XSTest: {len(by_kind['unsafe'])} unsafe and {len(by_kind['safe'])} safe prompts "
          f"where the two labelled answers disagree; {len(pairs)} used "
          f"({sum(p['kind'] == 'unsafe' for p in pairs)} unsafe)")
    return pairs


def summarise(better: list[float], worse: list[float]) -> dict:
    from constitutional.core.stats import wilson_interval

    n = len(better)
    wins = sum(1.0 if b > w else 0.5 if b == w else 0.0 for b, w in zip(better, worse))
    gaps = [b - w for b, w in zip(better, worse)]
    mean = sum(gaps) / n
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / max(n - 1, 1))
    half = 1.96 * sd / math.sqrt(n)
    return {"n": n, "accuracy": wins / n, "ci95": wilson_interval(wins, n),
            "gap": mean, "gap_ci95": (mean - half, mean + half),
            "spread": sum(abs(x - 0.5) for x in better + worse) / (2 * n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--feedback-model", default="builtin:qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--reference-model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--data", default=str(REAL))
    ap.add_argument("--hh", type=int, default=48)
    ap.add_argument("--xstest", type=int, default=48)
    ap.add_argument("--few-shot", type=int, default=4)
    ap.add_argument("--max-chars", type=int, default=1500)
    ap.add_argument("--reference-tokens", type=int, default=64)
    ap.add_argument("--json", default=None, help="Also write the figures here.")
    args = ap.parse_args()

    from constitutional.models import SamplingParams, load_model
    from constitutional.rl.label import LabelConfig
    from constitutional.rl.rewards import JudgeReward, prompt_key

    data = Path(args.data)
    pairs = (hh_pairs(data / "hh-rlhf-harmless-base-test-dev.jsonl", args.hh, args.max_chars)
             + xstest_pairs(data / "xstest", args.xstest, args.max_chars))
    prompts = {prompt_key(p["prompt"]): p["prompt"] for p in pairs}

    t0 = time.perf_counter()
    ref_lm = load_model(args.reference_model)
    answers = ref_lm.generate(list(prompts.values()), SamplingParams(
        temperature=0.0, max_new_tokens=args.reference_tokens, seed=0))
    references = dict(zip(prompts, answers, strict=True))
    ref_seconds = time.perf_counter() - t0
    del ref_lm
    print(f"reference answers: {len(references)} prompts by {args.reference_model}, greedy, "
          f"{args.reference_tokens} tokens at most, {ref_seconds:.0f} s")

    lm = load_model(args.feedback_model)
    label = LabelConfig(feedback_model=args.feedback_model, few_shot=args.few_shot)
    results: dict[str, dict] = {}
    print(f"feedback model {args.feedback_model}, {args.few_shot} demonstrations, one principle "
          f"per prompt (seeded), both orders; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'data':<9} {'form':<10} {'pairs':>5} {'accuracy [95% CI]':>24} "
          f"{'mean gap [95% CI]':>26} {'|r-0.5|':>8} {'seconds':>8}")
    for form in ("pairwise", "pointwise"):
        judge = JudgeReward(lm, label, references, form=form)
        for name in ("hh-rlhf", "xstest"):
            rows = [p for p in pairs if p["set"] == name]
            t1 = time.perf_counter()
            scores = judge.score_answers([p["prompt"] for p in rows] * 2,
                                         [p["better"] for p in rows] + [p["worse"] for p in rows])
            seconds = time.perf_counter() - t1
            s = summarise(scores[:len(rows)], scores[len(rows):])
            s["seconds"] = seconds
            results[f"{name}/{form}"] = s
            at_chance = s["ci95"][0] <= 0.5 <= s["ci95"][1]
            print(f"{name:<9} {form:<10} {s['n']:>5} {100 * s['accuracy']:>8.1f}% "
                  f"[{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]"
                  f"{' at chance' if at_chance else '          '} {s['gap']:+9.3f} "
                  f"[{s['gap_ci95'][0]:+.3f}, {s['gap_ci95'][1]:+.3f}] {s['spread']:>8.3f} "
                  f"{seconds:>8.0f}")
    for name in ("hh-rlhf", "xstest"):
        a, b = results[f"{name}/pairwise"], results[f"{name}/pointwise"]
        print(f"{name}: accuracy pairwise − pointwise {100 * (a['accuracy'] - b['accuracy']):+.1f}"
              f" points; mean gap pairwise / pointwise "
              f"{a['gap'] / b['gap'] if b['gap'] else float('nan'):.2f}; time pairwise / "
              f"pointwise {a['seconds'] / b['seconds']:.2f}×")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results,
                                               "reference_seconds": ref_seconds}, indent=2))


if __name__ == "__main__":
    main()
