"""`eval mc`: the paper's multiple-choice format, accuracy with a CI, chat mode, letter swaps."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from constitutional.evaluate.mc import (
    MCConfig,
    MCRow,
    chat_context,
    evaluate_mc,
    load_mc,
    option_spans,
    run_mc,
    swapped_row,
)
from constitutional.evaluate.stats import wilson_interval

FIXTURES = Path(__file__).parent / "fixtures" / "mc"
SMALL = FIXTURES / "hhh_small.jsonl"
THREE = FIXTURES / "hhh_three_options.jsonl"
CAI = [sys.executable, "-m", "constitutional.cli"]


def direct_logprob(lm, text_context: str, option: str, special: bool) -> float:
    """log P(option | context) from one plain forward pass over context + option."""
    tok = lm.tokenizer
    ctx = tok(text_context, add_special_tokens=special)["input_ids"]
    full = tok(text_context + option, add_special_tokens=special)["input_ids"]
    assert full[: len(ctx)] == ctx
    with torch.inference_mode():
        logits = lm.model(torch.tensor([full])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[p - 1, full[p]] for p in range(len(ctx), len(full))))


def test_fixtures_are_in_the_paper_format() -> None:
    for path in (SMALL, THREE):
        rows = load_mc(path)
        assert rows and all(r.prompt.rstrip().endswith("The answer is:") for r in rows)
        assert all(o.startswith(" (") for r in rows for o in r.corrects + r.incorrects)


def test_accuracy_equals_a_direct_computation(tiny) -> None:
    rows = load_mc(SMALL)
    result = evaluate_mc(rows, MCConfig(tiny.spec), model=tiny)
    correct = 0
    for row, res in zip(rows, result.rows, strict=True):
        lc = [direct_logprob(tiny, row.prompt, o, True) for o in row.corrects]
        li = [direct_logprob(tiny, row.prompt, o, True) for o in row.incorrects]
        assert res["logprobs_corrects"] == pytest.approx(lc, abs=1e-4)
        assert res["logprobs_incorrects"] == pytest.approx(li, abs=1e-4)
        assert res["correct"] == (max(lc) > max(li))
        correct += max(lc) > max(li)
    assert result.correct == correct and result.n == len(rows)
    assert result.accuracy == correct / len(rows)
    assert result.ci95 == wilson_interval(correct, len(rows))


def test_chat_mode_uses_the_template(tiny) -> None:
    rows = load_mc(SMALL)[:2] + load_mc(THREE)[:1]
    plain = chat_context(rows[0].prompt)
    assert plain[-1] == {"role": "assistant", "content": "The answer is:"}
    assert plain[0]["role"] == "user" and plain[0]["content"].endswith("(B) I can't help with "
                                                                       "cooking questions.")
    hh = chat_context(rows[2].prompt)
    assert [m["role"] for m in hh] == ["user", "assistant"]
    assert hh[-1]["content"] == "The answer is:" and "(C) In unlabelled" in hh[0]["content"]
    result = evaluate_mc(rows, MCConfig(tiny.spec, chat=True), model=tiny)
    for row, res in zip(rows, result.rows, strict=True):
        text = tiny.render(chat_context(row.prompt))
        assert text.endswith("<|im_start|>assistant\nThe answer is:")
        lc = [direct_logprob(tiny, text, o, False) for o in row.corrects]
        assert res["logprobs_corrects"] == pytest.approx(lc, abs=1e-4)


def test_letter_swap_parses_and_maps_options() -> None:
    row = load_mc(SMALL)[0]
    spans = option_spans(row.prompt)
    assert [row.prompt[s:e] for _, s, e in spans] == [
        "Put the egg in boiling water for about eight minutes, then cool it in cold water.",
        "I can't help with cooking questions."]
    swapped, mapping = swapped_row(row)
    assert mapping == {"A": "B", "B": "A"}
    assert "(A) I can't help with cooking questions.\n(B) Put the egg" in swapped.prompt
    assert swapped.prompt.endswith("\n\nThe answer is:")
    assert swapped.corrects == [" (B)"] and swapped.incorrects == [" (A)"]
    assert swapped_row(swapped)[0] == row  # swapping twice restores the row
    three, mapping = swapped_row(load_mc(THREE)[0])
    assert mapping == {"A": "C", "B": "B", "C": "A"}
    assert "(A) In unlabelled drink bottles in the fridge.\n(B) Mixed" in three.prompt
    assert three.prompt.endswith("\n\nAssistant: The answer is:")
    assert three.corrects == [" (C)"] and three.incorrects == [" (B)", " (A)"]


def test_debias_averages_both_letterings(tiny) -> None:
    rows = load_mc(SMALL)[:4]
    plain = evaluate_mc(rows, MCConfig(tiny.spec), model=tiny)
    swapped = evaluate_mc([swapped_row(r)[0] for r in rows], MCConfig(tiny.spec), model=tiny)
    both = evaluate_mc(rows, MCConfig(tiny.spec, debias=True), model=tiny)
    for p, s, b in zip(plain.rows, swapped.rows, both.rows, strict=True):
        assert b["original"]["logprobs_corrects"] == pytest.approx(p["logprobs_corrects"])
        mean_c = [(x + y) / 2 for x, y in zip(p["logprobs_corrects"], s["logprobs_corrects"],
                                              strict=True)]
        mean_i = [(x + y) / 2 for x, y in zip(p["logprobs_incorrects"],
                                              s["logprobs_incorrects"], strict=True)]
        assert b["logprobs_corrects"] == pytest.approx(mean_c)
        assert b["logprobs_incorrects"] == pytest.approx(mean_i)
        assert b["correct"] == (max(mean_c) > max(mean_i))


def _choice(logprobs: list[float]) -> int:
    return logprobs.index(max(logprobs))


def test_debias_measures_position_bias_agreement_and_lean(tiny) -> None:
    rows = load_mc(SMALL) + load_mc(THREE)
    result = evaluate_mc(rows, MCConfig(tiny.spec, debias=True), model=tiny)
    flips = []
    for r in result.rows:  # the options keep their order (corrects, incorrects) in both
        o, s = r["original"], r["swapped"]
        flips.append(_choice(o["logprobs_corrects"] + o["logprobs_incorrects"])
                     != _choice(s["logprobs_corrects"] + s["logprobs_incorrects"]))
        assert r["choice_flips"] == flips[-1]
    assert result.position_bias_rate == pytest.approx(sum(flips) / len(flips))
    assert result.order_agreement == pytest.approx(1 - sum(flips) / len(flips))
    lean = [abs(1 / (1 + math.exp(max(r["logprobs_incorrects"]) - max(r["logprobs_corrects"])))
                - 0.5) for r in result.rows]
    assert result.mean_abs_p_a_minus_half == pytest.approx(sum(lean) / len(lean))
    summary = result.summary()
    assert summary["position_bias_rate"] == result.position_bias_rate
    assert {"accuracy", "ci95", "chance", "at_chance", "order_agreement"} <= set(summary)
    plain = evaluate_mc(rows[:3], MCConfig(tiny.spec), model=tiny)  # one lettering
    assert plain.position_bias_rate is None and plain.order_agreement is None
    assert 0 <= plain.mean_abs_p_a_minus_half <= 0.5


def test_single_token_options_take_one_pass(tiny) -> None:
    rows = [MCRow(i + 1, f"Question {i}? (A) yes (B) no\nThe answer is: (", ["A"], ["B"])
            for i in range(5)]
    before = tiny.stats.forward_passes
    evaluate_mc(rows, MCConfig(tiny.spec), model=tiny)
    # five rows, one batch, one pass (plus at most one for a shared prefix), not one per option
    assert tiny.stats.forward_passes - before <= 2


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)


def test_cli_writes_rows_and_summary(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "res.jsonl"
    proc = subprocess.run([*CAI, "eval", "mc", "-m", str(tiny_model_dir), "--data", str(SMALL),
                           "--out", str(out), "--limit", "3", "--debias"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "95% CI" in proc.stdout
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and all("swapped" in r for r in rows)
    summary = json.loads((tmp_path / "res.summary.json").read_text())
    assert summary["n"] == 3 and len(summary["ci95"]) == 2
    flips = sum(r["choice_flips"] for r in rows) / 3
    assert summary["position_bias_rate"] == pytest.approx(flips)
    assert summary["order_agreement"] == pytest.approx(1 - flips)
    assert f"(position-bias rate) {flips:.1%}" in proc.stdout
    assert f"mean |p − 0.5| {summary['mean_abs_p_a_minus_half']:.3f}" in proc.stdout


@pytest.mark.parametrize(
    ("content", "extra", "needle"),
    [
        (('{"prompt": "y The answer is:", "incorrects": [" (B)"]}\n'
          '{"prompt": "x", "corrects": [" (A)"]}\n'), [],
         "bad.jsonl:1: field 'corrects': missing (no usable row: 2 skipped)"),
        ("", [], "bad.jsonl:1: file is empty"),
        ("\n\n", [], "bad.jsonl:1: file is empty"),
        ('{"prompt": "x", "corrects": " (A)", "incorrects": [" (B)"]}\n', [],
         "bad.jsonl:1: field 'corrects': expected a non-empty list"),
        ('{"prompt": "x", "corrects": [" (A)"], "incorrects": []}\n', [],
         "bad.jsonl:1: field 'incorrects'"),
        ('{"prompt": 3, "corrects": [" (A)"], "incorrects": [" (B)"]}\n', [],
         "bad.jsonl:1: field 'prompt'"),
        ('{"prompt": "x", "corrects": [" (A)"],\n', [], "bad.jsonl:1: invalid JSON"),
        (('{"prompt": "no options here\\nThe answer is:", "corrects": [" (A)"], '
          '"incorrects": [" (B)"]}\n'), ["--debias"], "bad.jsonl:1: field 'prompt': --debias"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, content: str, extra: list[str],
                                          needle: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    proc = subprocess.run([*CAI, "eval", "mc", "-m", "builtin:smollm2-135m-instruct", "--data",
                           str(bad), "--out", str(tmp_path / "o.jsonl"), *extra],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


@pytest.mark.slow
def test_builtin_model_on_the_fixture(tmp_path: Path) -> None:
    result = run_mc(SMALL, MCConfig("builtin:smollm2-135m-instruct", chat=True),
                    tmp_path / "r.jsonl")
    assert result.n == 8 and 0 <= result.accuracy <= 1
    lo, hi = result.ci95
    assert lo <= result.accuracy <= hi
