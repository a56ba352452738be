"""The public files users bring, read as they are (quirks reproduced in our own fixtures, as
found in the paper's MC evals and HH-RLHF's harmless-base test set):

* multiple-choice options of several tokens (" (A)" is " (", "A", ")"), rows with more than
  two options, 64+ rows of mixed lengths, and rows that cannot be used (skipped and counted);
* HH-RLHF comparisons whose preferred answer is empty (a comparison, not a broken row).

Scores are checked against one plain forward pass per (row, option); the work is checked by
the tokens each call runs through the model (each context once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_eval_mc import direct_logprob as direct  # one plain forward pass per option

from constitutional.evaluate.mc import (
    MCConfig,
    chat_context,
    evaluate_mc,
    load_mc_rows,
    run_mc,
    swapped_row,
)
from constitutional.evaluate.pm import evaluate_pm
from constitutional.rl.preference import load_comparisons, load_pm

FIXTURES = Path(__file__).parent / "fixtures"
QUIRKS = FIXTURES / "mc" / "quirks.jsonl"
HH = FIXTURES / "pm" / "hh_quirks.jsonl"
CAI = [sys.executable, "-m", "constitutional.cli"]


def test_quirks_fixture_rows_are_read_and_bad_rows_skipped() -> None:
    rows, skipped = load_mc_rows(QUIRKS)
    assert len(rows) == 72
    assert [(s.line, s.field) for s in skipped] == [(11, "incorrects"), (31, None),
                                                    (51, "prompt")]
    assert any(len(r.corrects) + len(r.incorrects) > 2 for r in rows)
    lengths = sorted(len(r.prompt) for r in rows)
    assert lengths[-1] > 3 * lengths[0]  # mixed lengths


@pytest.mark.parametrize("chat", [False, True])
def test_multi_token_and_many_options_equal_direct_scores(tiny, chat: bool) -> None:
    rows = load_mc_rows(QUIRKS)[0][:12]
    assert tiny.tokenizer(" (A)", add_special_tokens=False)["input_ids"].__len__() > 1
    result = evaluate_mc(rows, MCConfig(tiny.spec, chat=chat), model=tiny)
    for row, res in zip(rows, result.rows, strict=True):
        text = tiny.render(chat_context(row.prompt)) if chat else row.prompt
        want = [direct(tiny, text, o, not chat) for o in row.corrects + row.incorrects]
        got = res["logprobs_corrects"] + res["logprobs_incorrects"]
        assert got == pytest.approx(want, abs=1e-4)


def test_each_context_is_computed_once(tiny) -> None:
    rows = load_mc_rows(QUIRKS)[0]
    contexts = [r.prompt for r in rows]
    options = [r.corrects + r.incorrects for r in rows]
    tok = tiny.tokenizer
    naive = sum(len(tok(c + o)["input_ids"]) for c, os in zip(contexts, options, strict=True)
                for o in os)
    once = sum(len(tok(c)["input_ids"]) for c in contexts)
    before = tiny.stats.to_dict()
    tiny.score(contexts, options)
    fed = tiny.stats.scored_tokens - before["scored_tokens"]
    passes = tiny.stats.forward_passes - before["forward_passes"]
    # the contexts once, plus a few tokens per option; far from one sequence per option
    assert once <= fed < once + 4 * sum(len(o) for o in options) < naive
    # batched: far fewer passes than one per (row, option)
    assert passes < sum(len(o) for o in options) / 2


@pytest.mark.parametrize("chat", [False, True])  # chat: the template's system prompt is a
def test_debias_shares_the_conversation_between_letterings(tiny, chat: bool) -> None:
    rows = [r for r in load_mc_rows(QUIRKS)[0] if len(r.corrects) + len(r.incorrects) == 2][:16]
    # (with chat, a prefix every row shares, below each question's own shared conversation)
    for debias in (False, True):
        before = tiny.stats.scored_tokens
        result = evaluate_mc(rows, MCConfig(tiny.spec, chat=chat, debias=debias), model=tiny)
        fed = tiny.stats.scored_tokens - before
        if not debias:
            plain = fed
    for row, res in zip(rows[:3], result.rows, strict=False):  # and the scores stay exact
        swapped = swapped_row(row)[0]
        text = tiny.render(chat_context(swapped.prompt)) if chat else swapped.prompt
        want = [direct(tiny, text, o, not chat) for o in swapped.corrects + swapped.incorrects]
        got = res["swapped"]["logprobs_corrects"] + res["swapped"]["logprobs_incorrects"]
        assert got == pytest.approx(want, abs=1e-4)
    # the second lettering costs its options block, not the whole conversation again
    assert plain < fed < 1.5 * plain


def test_cli_skips_bad_rows_and_reports_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "res.jsonl"
    proc = subprocess.run([*CAI, "eval", "mc", "-m", str(tiny_model_dir), "--data", str(QUIRKS),
                           "--out", str(out), "--limit", "20"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "skipped 1 row(s)" in proc.stdout and "line 11 field 'incorrects'" in proc.stdout
    summary = json.loads((tmp_path / "res.summary.json").read_text())
    assert summary["n"] == 20 and summary["n_skipped"] == 1
    assert summary["skipped"][0]["line"] == 11


def test_hh_empty_answer_is_a_comparison_and_bad_rows_are_skipped() -> None:
    skipped: list = []
    comps = load_comparisons(HH, skipped=skipped, branching=True)
    assert len(comps) == 67
    assert [(e.line, e.field) for e in skipped] == [(41, "rejected"), (61, None)]
    empty = [c for c in comps if c.chosen == ""]
    assert len(empty) == 1 and empty[0].prompt[-1]["role"] == "user"
    # transcripts that branch before the final answer: two whole conversations for a PM...
    (branch,) = [c for c in comps if c.conversations is not None]
    chosen, rejected = branch.pair()
    assert len(chosen) == 3 and len(rejected) == 2 and branch.prompt == chosen[:1]
    # ...but no shared prompt to train on, so training skips them
    skipped = []
    assert len(load_comparisons(HH, skipped=skipped)) == 66
    assert skipped[-1].line == 69 and "branch" in skipped[-1].message


@pytest.fixture(scope="module")
def tiny_pm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A PM directory as `cai rl pm` writes one: the tiny Llama with a scalar head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("pm") / "pm"
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    model.config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(out)
    return load_pm(out, batch_size=8)


@pytest.mark.parametrize("max_tokens", [None, 4096])  # CPU default: one pair per pass
def test_pm_pairs_share_the_context_and_equal_full_scores(tiny_pm, max_tokens) -> None:
    comps = load_comparisons(HH, skipped=[])
    prompts = [c.prompt for c in comps]
    pairs = [c.pair() for c in load_comparisons(HH, skipped=[], branching=True)]
    a2, b2 = tiny_pm.score_conversation_pairs([x for x, _ in pairs], [y for _, y in pairs],
                                              max_tokens=max_tokens)
    assert a2 == pytest.approx(tiny_pm.score([x for x, _ in pairs]), abs=1e-4)
    assert b2 == pytest.approx(tiny_pm.score([y for _, y in pairs]), abs=1e-4)
    a, b = tiny_pm.score_pairs(prompts, [c.chosen for c in comps], [c.rejected for c in comps],
                               max_tokens=max_tokens)
    full_a = tiny_pm.score_answers(prompts, [c.chosen for c in comps])
    full_b = tiny_pm.score_answers(prompts, [c.rejected for c in comps])
    assert a == pytest.approx(full_a, abs=1e-4) and b == pytest.approx(full_b, abs=1e-4)
    assert len({round(x, 4) for x in a}) > 10  # real, varied scores


def test_eval_pm_reads_the_whole_file(tiny_pm) -> None:
    result = evaluate_pm(tiny_pm, HH)
    assert result.n == 67 and len(result.skipped) == 2


def test_run_mc_on_a_file_with_no_usable_row_is_one_error(tmp_path: Path) -> None:
    from constitutional.core.errors import UserError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"nope": 1}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: field 'corrects': missing \(no usable"):
        run_mc(bad, MCConfig("unused"), tmp_path / "o.jsonl")


def test_cli_eval_pm_reads_the_file_and_reports_skips(tiny_pm, tmp_path: Path) -> None:
    pm_dir = tmp_path / "pm"
    tiny_pm.model.save_pretrained(pm_dir)
    tiny_pm.tokenizer.save_pretrained(pm_dir)
    out = tmp_path / "pm_eval.jsonl"
    proc = subprocess.run([*CAI, "eval", "pm", "--pm", str(pm_dir), "--data", str(HH),
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "skipped 2 row(s)" in proc.stdout
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["n"] == 67 and summary["n_skipped"] == 2
    lo, hi = summary["ci95"]
    assert summary["at_chance"] == (lo <= 0.5 <= hi)
    assert ("at chance" in proc.stdout) == summary["at_chance"]


def test_options_one_at_a_time_equal_options_together(tiny, monkeypatch) -> None:
    """Big batches read the options one index at a time (the context's cache cropped back after
    each) instead of all together from a repeated cache: the same scores, more passes."""
    rows = load_mc_rows(QUIRKS)[0][:9]
    contexts, options = [r.prompt for r in rows], [r.corrects + r.incorrects for r in rows]
    before = tiny.stats.forward_passes
    together = tiny.score(contexts, options)
    passes_together = tiny.stats.forward_passes - before
    monkeypatch.setattr(tiny.scorer, "SCORE_REPEAT_TOKENS", 0)
    before = tiny.stats.forward_passes
    apart = tiny.score(contexts, options)
    assert tiny.stats.forward_passes - before > passes_together
    for a, b in zip(apart, together, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
