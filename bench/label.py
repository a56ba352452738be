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

    python bench/label.py [--pairs 100] [--naive-pairs 10] [--few-shot 4] [--max-chars 1000]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import tempfile
import time
from collections import defaultdict

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--naive-pairs", type=int, default=10)
    parser.add_argument("--few-shot", type=int, default=4)
    parser.add_argument("--max-chars", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=16)
    args = parser.parse_args()

    from constitutional.models import load_model
    from constitutional.rl.label import LabelConfig, label

    pairs = bench_pairs(args.pairs, args.max_chars)
    lm = load_model(BUILTIN)
    config = LabelConfig(BUILTIN, few_shot=args.few_shot, principles=1, both_orders=True,
                         chunk_size=args.chunk_size)
    print(f"model: {BUILTIN} (float32, {lm.device}); {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
          "threads")
    print(f"settings (both sides): default constitution, --few-shot {args.few_shot}, K=1, both "
          f"orders; {args.pairs} pairs from pyrit scorer-eval responses cut to {args.max_chars} "
          "chars")

    with tempfile.TemporaryDirectory() as tmp:
        before = lm.stats.forward_passes
        t0 = time.perf_counter()
        result = label(pairs, config, tmp, model=lm)
        ours_s = time.perf_counter() - t0
        passes = lm.stats.forward_passes - before
    ours = {(r["pair_id"], j["order"]): j["p_A"] for r in result.records for j in r["judgements"]}
    ours_rate = len(pairs) / ours_s
    rows = 2 * len(pairs)
    contexts = _contexts(pairs[:5], args.few_shot)
    tokens = sum(len(lm.encode(ctx)) for ctx in contexts) / len(contexts)
    demos = len(lm.encode(contexts[0][:-2])) if args.few_shot else 0
    print(f"ours : {len(pairs)} labels ({rows} rows, ~{tokens:.0f} tokens per row of which "
          f"{demos} are the few-shot block) in "
          f"{ours_s:.1f}s = {ours_rate:.3f} labels/s ({passes} forward passes, chunk size "
          f"{args.chunk_size})")

    subset = pairs[: args.naive_pairs]
    naive_p, naive_s = naive_label(lm, subset, args.few_shot)
    naive_rate = len(subset) / naive_s
    print(f"naive: {len(subset)} labels ({4 * len(subset)} full forward passes, one per option) "
          f"in {naive_s:.1f}s = {naive_rate:.3f} labels/s")
    keys = [(p["id"], o) for p in subset for o in ("ab", "ba")]
    diff = max(abs(ours[k] - q) for k, q in zip(keys, naive_p, strict=True))
    print(f"agreement: max |P(A) ours - P(A) naive| = {diff:.2e} over {len(keys)} judgements")
    print(f"ratio: ours / naive = {ours_rate / naive_rate:.1f}x (goal >= 20x on 2 CPU cores)")


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
