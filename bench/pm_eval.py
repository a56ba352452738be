"""`cai eval pm` throughput on HH-RLHF comparisons, against a naive loop.

Both sides score the same comparisons of the HH-RLHF ``harmless-base/test`` slice (as it is,
its empty-answer row included) with the same preference model: the built-in model
(SmolLM2-135M-Instruct) with a scalar head, seeded (a trained PM has the same shapes and cost),
and read the same two scores per comparison:

* **ours**: ``PreferenceModel.score_conversation_pairs`` (what `cai eval pm` runs): the tokens
  that chosen and rejected share (the conversation before the final answers) computed once,
  with the first answer in the same pass, then the second answer from that cache;
* **naive**: one full forward pass per (comparison, answer), one sequence at a time. Its rate is
  measured on the first ``--naive-pairs`` comparisons.

Prints comparisons/s for both sides, the ratio and the agreement; timings are never asserted.

    python bench/pm_eval.py [--data PATH] [--pairs 400] [--naive-pairs 60]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / \
    "hh-rlhf-harmless-base-test-dev.jsonl"


def make_pm(out: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from constitutional.models.builtin import ensure_checkpoint
    from constitutional.rl.preference import load_pm

    src = ensure_checkpoint("smollm2-135m-instruct")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(src), num_labels=1)
    model.config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(out)
    return load_pm(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--naive-pairs", type=int, default=60)
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: not found (an HH-RLHF chosen/rejected file; pass --data)")

    from constitutional.rl.preference import _common_len, encode, load_comparisons

    skipped: list = []
    comps = load_comparisons(args.data, skipped=skipped, branching=True)[: args.pairs]
    with tempfile.TemporaryDirectory() as tmp:
        pm = make_pm(Path(tmp) / "pm")
    tok = pm.tokenizer
    print(f"PM: SmolLM2-135M-Instruct + scalar head (float32, {pm.device}); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads")
    both = [(encode(tok, x, pm.max_length), encode(tok, y, pm.max_length))
            for x, y in (c.pair() for c in comps)]
    share = sum(2 * _common_len(x, y) for x, y in both) / sum(len(x) + len(y) for x, y in both)
    conv = [x for x, _ in both]
    print(f"data: {args.data.name}, {len(comps)} comparisons ({len(skipped)} rows skipped, "
          f"{sum(c.chosen == '' or c.rejected == '' for c in comps)} with an empty answer); "
          f"conversations of {min(map(len, conv))}-{max(map(len, conv))} tokens, the shared "
          f"context is {share:.0%} of their tokens")

    t0 = time.perf_counter()
    pairs = [c.pair() for c in comps]
    a, b = pm.score_conversation_pairs([x for x, _ in pairs], [y for _, y in pairs])
    ours_s = time.perf_counter() - t0
    ours_rate = len(comps) / ours_s
    acc = sum(x > y for x, y in zip(a, b, strict=True)) / len(comps)
    print(f"ours : {len(comps)} comparisons in {ours_s:.1f}s = {ours_rate:.2f}/s (accuracy of "
          f"this untrained PM {acc:.3f}: at chance, as it should be)")

    subset = comps[: args.naive_pairs]
    want = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for c in subset:
            pair = []
            for conversation in c.pair():
                ids = encode(tok, conversation, pm.max_length)
                pair.append(float(pm.model(input_ids=torch.tensor([ids])).logits[0, 0]))
            want.append(pair)
    naive_s = time.perf_counter() - t0
    naive_rate = len(subset) / naive_s
    print(f"naive: {len(subset)} comparisons in {naive_s:.1f}s = {naive_rate:.2f}/s (one full "
          "forward pass per answer)")
    diff = max(max(abs(x - w[0]), abs(y - w[1])) for x, y, w in zip(a, b, want, strict=False))
    print(f"agreement: max |score ours - naive| = {diff:.1e} over {2 * len(want)} scores")
    print(f"ratio: ours / naive = {ours_rate / naive_rate:.2f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
