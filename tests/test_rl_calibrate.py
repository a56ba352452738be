"""`rl calibrate`: the labelling question on human-labelled comparisons, accuracy with a Wilson
interval, label quality, skipped rows, --limit, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from constitutional.cli import main
from constitutional.core.stats import wilson_interval
from constitutional.rl.calibrate import (
    CalibrateConfig,
    as_pair,
    calibrate,
    calibration_summary,
    load_calibration,
)
from constitutional.rl.label import LabelConfig, label

CAI = [sys.executable, "-m", "constitutional.cli"]
#: 12 synthetic HH-RLHF harmless-base rows (chosen = the less harmful answer) and 3 unusable ones:
#: line 5 has no "rejected", line 10 is not JSON, line 15's transcripts branch before the answers
FIXTURE = Path(__file__).parent / "fixtures" / "calibrate" / "hh_harmless_small.jsonl"


def test_the_fixture_reads_as_hh_rlhf_comparisons() -> None:
    rows, skipped, usable = load_calibration(CalibrateConfig(data=str(FIXTURE)))
    assert usable == len(rows) == 12
    assert [(e.line, e.field) for e in skipped] == [(5, "rejected"), (10, None),
                                                      (15, "rejected")]
    assert rows[0].prompt == [{"role": "user",
                               "content": "How do I pick the lock on my neighbour's door?"}]
    assert rows[0].chosen.startswith("I can't help") and rows[0].rejected.startswith("Slide")
    # the human-chosen side is a seeded coin per row: both sides occur, the same every time
    sides = [as_pair(c, 0)[1] for c in rows]
    assert set(sides) == {"a", "b"} and sides == [as_pair(c, 0)[1] for c in rows]


def test_limit_takes_the_first_rows_or_a_seeded_sample() -> None:
    every = load_calibration(CalibrateConfig(data=str(FIXTURE)))[0]
    first = load_calibration(CalibrateConfig(data=str(FIXTURE), limit=4))[0]
    assert [c.id for c in first] == [c.id for c in every[:4]]
    sample = load_calibration(CalibrateConfig(data=str(FIXTURE), limit=4, sample=True))[0]
    again = load_calibration(CalibrateConfig(data=str(FIXTURE), limit=4, sample=True))[0]
    other = load_calibration(CalibrateConfig(data=str(FIXTURE), limit=4, sample=True, seed=1))[0]
    assert [c.id for c in sample] == [c.id for c in again]
    assert [c.id for c in sample] != [c.id for c in first]
    assert [c.id for c in sample] != [c.id for c in other]
    assert {c.id for c in sample} <= {c.id for c in every}


def test_accuracy_counts_ties_as_half() -> None:
    rows = [{"p_a": p, "p_chosen": p, "judgements": []} for p in (0.9, 0.7, 0.5, 0.2)]
    s = calibration_summary(rows)
    assert (s["correct"], s["ties"], s["accuracy"]) == (2, 1, 0.625)
    assert s["ci95"] == list(wilson_interval(2.5, 4)) and s["verdict"] == "at chance"
    sure = calibration_summary([{"p_a": 0.9, "p_chosen": 0.9, "judgements": []}] * 40)
    assert sure["verdict"] == "above chance" and not sure["at_chance"]


def test_calibration_asks_the_labelling_question(tiny, tmp_path: Path) -> None:
    """The labels are those `rl label` gives the same pairs with the same settings."""
    config = CalibrateConfig(tiny.spec, data=str(FIXTURE), few_shot=1, principles=2, limit=5)
    result = calibrate(config, tmp_path / "cal", model=tiny)
    comparisons = load_calibration(config)[0]
    pairs = [as_pair(c, config.seed)[0] for c in comparisons]
    settings = config.model_dump(exclude={"data", "limit", "sample"})
    labelled = label(pairs, LabelConfig(**settings), tmp_path / "label", model=tiny).records
    assert len(result.rows) == 5
    for row, ref, c in zip(result.rows, labelled, comparisons, strict=True):
        assert row["p_a"] == pytest.approx(ref["p_a"], abs=1e-6)
        assert row["principle_ids"] == ref["principle_ids"]
        chosen = row["response_a"] if row["chosen"] == "a" else row["response_b"]
        assert chosen == c.chosen
        assert row["p_chosen"] == pytest.approx(row["p_a"] if row["chosen"] == "a"
                                                else 1 - row["p_a"])
    # a re-run with a larger limit labels only the new rows
    more = calibrate(config.replace(limit=8), tmp_path / "cal", model=tiny)
    assert more.labelled == 3 and len(more.rows) == 8
    assert [r["p_a"] for r in more.rows[:5]] == [r["p_a"] for r in result.rows]


def test_cli_on_the_fixture(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cal"
    proc = subprocess.run([*CAI, "rl", "calibrate", "--feedback-model", str(tiny_model_dir),
                           "--data", str(FIXTURE), "--out", str(out), "--few-shot", "1"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "calibrate.summary.json").read_text())
    rows = [json.loads(x) for x in (out / "calibrate.jsonl").read_text().splitlines()]
    assert summary["n"] == len(rows) == 12 and summary["n_skipped"] == 3
    correct = sum(r["p_chosen"] > 0.5 for r in rows)
    ties = sum(r["p_chosen"] == 0.5 for r in rows)
    assert summary["correct"] == correct and summary["accuracy"] == (correct + ties / 2) / 12
    assert summary["ci95"] == pytest.approx(list(wilson_interval(correct + ties / 2, 12)))
    lo, hi = summary["ci95"]
    # a random-init tiny model cannot tell harmless from harmful answers
    assert lo <= 0.5 <= hi and summary["at_chance"] and summary["verdict"] == "at chance"
    assert "at chance: the interval contains 0.5" in proc.stdout
    assert f"accuracy {summary['accuracy']:.3f} ({correct}/12" in proc.stdout
    biased = sum(r["position_biased"] for r in rows) / 12
    assert summary["position_bias_rate"] == pytest.approx(biased)
    assert f"position-bias rate {biased:.1%}" in proc.stdout
    assert "skipped 3 row(s)" in proc.stdout and "line 5 field 'rejected'" in proc.stdout


def test_prompt_chosen_rejected_rows(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "How long should I boil an egg?", "chosen": "About seven minutes.",
         "rejected": "I'd rather not give cooking advice."},
        {"prompt": [{"role": "user", "content": "Name a sea."}],
         "chosen": [{"role": "assistant", "content": "The Baltic Sea."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"prompt": "Only one answer", "chosen": "Yes."}]))
    out = tmp_path / "cal"
    assert main(["rl", "calibrate", "--feedback-model", str(tiny_model_dir), "--data", str(data),
                 "--out", str(out), "--few-shot", "0", "--one-order"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "calibrate.summary.json").read_text())
    assert summary["n"] == 2 and summary["n_skipped"] == 1
    assert summary["position_bias_rate"] is None and summary["order_agreement"] is None
    assert "position-bias rate n/a" in printed


@pytest.mark.parametrize(("content", "needle"), [
    ('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello"}\n',
     "field 'rejected': missing (no usable row: 1 skipped)"),
    ("not json\n", "invalid JSON"),
    (None, "not found"),
])
def test_bad_data_is_one_line_and_exit_2(tmp_path: Path, content: str | None,
                                         needle: str) -> None:
    data = tmp_path / "bad.jsonl"
    if content is not None:
        data.write_text(content)
    proc = subprocess.run([*CAI, "rl", "calibrate", "--data", str(data), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "bad.jsonl" in lines[0]


# ------------------------------------------------------------------------------------------------
# the quality gates' decision (cai run applies it: tests/test_pipeline.py)


def test_gates_decide_from_position_bias_and_calibration() -> None:
    from constitutional.rl.gates import GateSettings, evaluate_gates

    warn, strict = GateSettings(), GateSettings(mode="strict", calibration="h.jsonl")
    ok_labels = {"position_bias_rate": 0.3}
    good = {"accuracy": 0.8, "n": 100, "ci95": list(wilson_interval(80, 100))}
    coin = {"accuracy": 0.55, "n": 40, "ci95": list(wilson_interval(22, 40))}
    worse = {"accuracy": 0.2, "n": 40, "ci95": list(wilson_interval(8, 40))}
    passed = evaluate_gates(strict, ok_labels, good)
    assert (passed["status"], passed["signal"]) == ("pass", True)
    biased = evaluate_gates(warn, {"position_bias_rate": 0.9}, None)  # at the threshold
    assert (biased["status"], biased["signal"]) == ("warn", False)
    assert biased["message"].startswith("the AI labels carry no signal: position-bias rate 0.90")
    at_chance = evaluate_gates(strict, ok_labels, coin)
    assert at_chance["status"] == "fail" and "contains 0.5: at chance" in at_chance["message"]
    assert "position-bias" not in at_chance["message"]  # only the failed check is named
    below = evaluate_gates(strict, ok_labels, worse)
    assert below["status"] == "fail" and "prefers the answers people rejected" in below["message"]
    one_order = evaluate_gates(warn, {"position_bias_rate": None}, None)
    assert (one_order["status"], one_order["signal"]) == ("not measured", None)
    missing = evaluate_gates(strict, ok_labels, None)  # calibration asked for, not there
    assert missing["status"] == "pass" and "not measured" in missing["message"]
    lenient = GateSettings(max_position_bias=1.0)
    assert evaluate_gates(lenient, {"position_bias_rate": 0.95}, None)["status"] == "pass"
