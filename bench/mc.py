"""`cai eval mc` throughput on the paper's multiple-choice file, against a naive loop.

Both sides score the same rows of ``HarmfulVsEthical.jsonl`` (the paper's published evals, as
they are: options " (A)"/" (B)" are three tokens each for this tokenizer) with the built-in
model (SmolLM2-135M-Instruct, float32, CPU), and read the same log-likelihoods:

* **ours**: ``constitutional.evaluate.mc.evaluate_mc`` (what `cai eval mc` runs): each context
  computed once, every option read as its continuation, rows batched; with ``--debias`` both
  letterings go together and share their conversation;
* **naive**: one row at a time, one full forward pass per option over context + option (and,
  with ``--debias``, per lettering), as an lm-eval-style loop does. Its rate is measured on the
  first ``--naive-rows`` rows (a rate, so a subset is enough).

Two settings, one after the other in the same run: the raw prompt, and ``--chat --debias``.
The raw setting also runs on the ``vllm`` backend in float32 and bfloat16 (child processes in
the vLLM environment, see ``bench/_sides.py``), with its start-up and its verdicts against ours.
Prints rows/s for both sides, the ratio and the agreement of the scores; timings are never
asserted. Model load is excluded from both sides.

    python bench/mc.py [--data PATH] [--rows N] [--naive-rows 24] [--bf16]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from _sides import run_side, vllm_python, write_side

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUILTIN = "builtin:smollm2-135m-instruct"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / \
    "HarmfulVsEthical.jsonl"


def naive(lm, rows, chat: bool, debias: bool) -> tuple[list[list[float]], float]:
    """Per row, the (lettering-averaged) log-likelihood of every option: one full forward pass
    per (row, lettering, option), one sequence at a time."""
    from constitutional.evaluate.mc import chat_context, swapped_row

    tok, model = lm.tokenizer, lm.model
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for row in rows:
            variants = [row] + ([swapped_row(row)[0]] if debias else [])
            per = []
            for v in variants:
                text = lm.render(chat_context(v.prompt)) if chat else v.prompt
                ctx = tok(text, add_special_tokens=not chat)["input_ids"]
                scores = []
                for option in v.corrects + v.incorrects:
                    full = tok(text + option, add_special_tokens=not chat)["input_ids"]
                    logits = model(torch.tensor([full])).logits[0]  # every position, as plain
                    logp = torch.log_softmax(logits.float(), -1)
                    scores.append(float(sum(logp[p - 1, full[p]]
                                            for p in range(len(ctx), len(full)))))
                per.append(scores)
            out.append([sum(x) / len(per) for x in zip(*per, strict=True)])
    return out, time.perf_counter() - t0


def run_mc(spec: str, dtype: str, data: Path, n: int | None) -> dict:
    """Load ``spec`` in ``dtype`` and score the rows raw: start-up, seconds, the scores."""
    from constitutional.evaluate.mc import MCConfig, evaluate_mc, load_mc
    from constitutional.models import load_model

    rows = load_mc(data, n)
    t0 = time.perf_counter()
    lm = load_model(spec, dtype=dtype)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate_mc(rows, MCConfig(spec), model=lm)
    return {"startup": startup, "seconds": time.perf_counter() - t0,
            "scores": [r["logprobs_corrects"] + r["logprobs_incorrects"] for r in result.rows],
            "correct": [r["correct"] for r in result.rows]}


def vllm_sides(args, fp32, naive_rate: float) -> None:
    """The raw setting on the vllm backend (float32 and bfloat16), in the vLLM environment."""
    py = vllm_python(args.vllm_python)
    if py is None:
        print("[raw, vllm] no environment with vLLM here (make test-vllm builds .venv-vllm)")
        return
    a = [r["logprobs_corrects"] + r["logprobs_incorrects"] for r in fp32.rows]
    for dtype in ("float32", "bfloat16"):
        got = run_side(py, "mc.py", ["--side", f"vllm:{BUILTIN}@{dtype}", "--data",
                                     str(args.data)] + (["--rows", str(args.rows)]
                                                        if args.rows else []))
        if not got:
            continue
        n = len(got["scores"])
        rate = n / got["seconds"]
        deltas = sorted(abs(x - y) for u, v in zip(a, got["scores"], strict=True)
                        for x, y in zip(u, v, strict=True))
        same = sum(r["correct"] == c for r, c in zip(fp32.rows, got["correct"], strict=True))
        print(f"[raw, vllm {dtype}] {n} rows in {got['seconds']:.1f}s = {rate:.3f} rows/s = "
              f"{rate / naive_rate:.2f}x the naive loop; start-up {got['startup']:.1f}s "
              f"({n / (got['seconds'] + got['startup']):.3f} rows/s with it); vs hf float32: "
              f"same verdict on {same}/{n} rows, |delta log-likelihood| median "
              f"{deltas[len(deltas) // 2]:.1e}, max {deltas[-1]:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rows", type=int, default=None, help="default: every row")
    parser.add_argument("--naive-rows", type=int, default=24)
    parser.add_argument("--bf16", action="store_true",
                        help="also time our path in bfloat16 and compare it with float32")
    parser.add_argument("--vllm-python", help="the interpreter that has vLLM (default .venv-vllm)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--side-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        spec, dtype = args.side.split("@")
        write_side(args.side_out, run_mc(spec, dtype, args.data, args.rows))
        return
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: not found (the paper's HarmfulVsEthical.jsonl; pass "
                         "--data PATH)")

    from constitutional.evaluate.mc import MCConfig, evaluate_mc, load_mc
    from constitutional.models import load_model

    rows = load_mc(args.data, args.rows)
    lm = load_model(BUILTIN)
    print(f"model: {BUILTIN} (float32, {lm.device}, engine {lm.engine}); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads")
    lengths = [len(lm.tokenizer(r.prompt)["input_ids"]) for r in rows]
    print(f"data: {args.data.name}, {len(rows)} rows, prompts of {min(lengths)}-{max(lengths)} "
          f"tokens (mean {sum(lengths) / len(lengths):.0f}); options "
          f"{lm.tokenizer(' (A)', add_special_tokens=False)['input_ids'].__len__()} tokens each")
    for chat, debias in ((False, False), (True, True)):
        mode = "--chat --debias" if chat else "raw"
        before = lm.stats.to_dict()
        t0 = time.perf_counter()
        result = evaluate_mc(rows, MCConfig(BUILTIN, chat=chat, debias=debias), model=lm)
        ours_s = time.perf_counter() - t0
        passes = lm.stats.forward_passes - before["forward_passes"]
        fed = lm.stats.scored_tokens - before["scored_tokens"]
        ours_rate = len(rows) / ours_s
        print(f"[{mode}] ours : {len(rows)} rows in {ours_s:.1f}s = {ours_rate:.3f} rows/s "
              f"({passes} forward passes, {fed} tokens through the model); accuracy "
              f"{result.accuracy:.3f}")
        subset = rows[: args.naive_rows]
        want, naive_s = naive(lm, subset, chat, debias)
        naive_rate = len(subset) / naive_s
        print(f"[{mode}] naive: {len(subset)} rows in {naive_s:.1f}s = {naive_rate:.3f} rows/s "
              "(one full forward pass per option" + (" and lettering" if debias else "") + ")")
        got = [r["logprobs_corrects"] + r["logprobs_incorrects"] for r in result.rows]
        diff = max(abs(a - b) for g, w in zip(got, want, strict=False)
                   for a, b in zip(g, w, strict=True))
        same = sum((g[0] > max(g[1:])) == (w[0] > max(w[1:]))
                   for g, w in zip(got, want, strict=False))
        print(f"[{mode}] agreement: max |log-likelihood ours - naive| = {diff:.1e}; same verdict "
              f"on {same}/{len(want)} rows")
        goal = " (goal >= 4x)" if not chat else ""
        print(f"[{mode}] ratio: ours / naive = {ours_rate / naive_rate:.2f}x{goal}")
        if args.bf16 and not chat:
            bf16(rows, result, naive_rate)
        if not chat:
            vllm_sides(args, result, naive_rate)


def bf16(rows, fp32, naive_rate: float) -> None:
    """The same rows through the same code in bfloat16 (AVX512-BF16 here): speed, and how far
    its scores and verdicts move from float32's. Not a default: that is for the numbers."""
    from constitutional.evaluate.mc import MCConfig, evaluate_mc
    from constitutional.models import load_model

    lm = load_model(BUILTIN, dtype="bfloat16")
    t0 = time.perf_counter()
    result = evaluate_mc(rows, MCConfig(BUILTIN), model=lm)
    rate = len(rows) / (time.perf_counter() - t0)
    a = [r["logprobs_corrects"] + r["logprobs_incorrects"] for r in fp32.rows]
    b = [r["logprobs_corrects"] + r["logprobs_incorrects"] for r in result.rows]
    deltas = sorted(abs(x - y) for u, v in zip(a, b, strict=True) for x, y in zip(u, v,
                                                                                 strict=True))
    same = sum(r["correct"] == q["correct"] for r, q in zip(fp32.rows, result.rows, strict=True))
    print(f"[raw, bfloat16] ours: {rate:.3f} rows/s = {rate / naive_rate:.2f}x the float32 naive "
          f"loop; vs float32: same verdict on {same}/{len(rows)} rows, |delta log-likelihood| "
          f"median {deltas[len(deltas) // 2]:.3f}, max {deltas[-1]:.3f}")


if __name__ == "__main__":
    main()
