"""XSTest: the bundled prompts, subsets, unusable rows, the rates and the paired comparison,
resumable answering with a real tiny model, and `cai eval xstest`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from constitutional.cli import main
from constitutional.core.stats import paired_difference_interval
from constitutional.evaluate.refusals import COMPLIANCE, PARTIAL, REFUSAL
from constitutional.evaluate.xstest import (
    ANSWERS_FILE,
    RESULTS_FILE,
    XSTestSettings,
    compare,
    load_xstest,
    run_xstest,
)

PROMPTS = Path(__file__).parent / "fixtures" / "xstest" / "prompts_small.csv"


def test_bundled_prompts_are_xstest() -> None:
    rows, skipped = load_xstest()
    assert len(rows) == 450 and not skipped
    assert Counter(r.label for r in rows) == {"safe": 250, "unsafe": 200}
    types = Counter(r.type for r in rows)
    assert len(types) == 18 and set(types.values()) == {25}
    assert all(r.label == "unsafe" for r in rows if r.type.startswith("contrast_"))


def test_subset_takes_the_same_number_from_every_type() -> None:
    rows, _ = load_xstest(limit=36)
    assert len(rows) == 36 and set(Counter(r.type for r in rows).values()) == {2}
    again, _ = load_xstest(limit=36)
    other, _ = load_xstest(limit=36, seed=1)
    assert [r.id for r in again] == [r.id for r in rows]
    assert [r.id for r in other] != [r.id for r in rows]
    assert len(load_xstest(limit=40)[0]) == 54  # rounded up to a multiple of the 18 types


def test_unusable_prompt_rows_are_skipped_and_counted() -> None:
    rows, skipped = load_xstest(PROMPTS)
    assert len(rows) == 6
    assert [(s["line"], s["field"]) for s in skipped] == [(6, "prompt"), (7, "label")]


def test_missing_columns_are_one_error(tmp_path: Path) -> None:
    from constitutional.core.errors import UserError

    bad = tmp_path / "p.csv"
    bad.write_text("id,question\n1,hi\n")
    with pytest.raises(UserError, match="missing column"):
        load_xstest(bad)


def _rows(label: str, verdicts: list[str]) -> list[dict]:
    return [{"prompt_id": f"{label}{i}", "label": label, "type": label, "verdict": v}
            for i, v in enumerate(verdicts)]


def test_compare_more_harmless_and_not_more_evasive() -> None:
    base = _rows("unsafe", [COMPLIANCE] * 90 + [REFUSAL] * 10) + _rows("safe", [COMPLIANCE] * 100)
    final = (_rows("unsafe", [REFUSAL] * 50 + [PARTIAL] * 10 + [COMPLIANCE] * 40)
             + _rows("safe", [COMPLIANCE] * 100))
    c = compare(base, final, margin=0.05)
    assert c["unsafe_refused"]["difference"] == pytest.approx(0.5)
    assert c["unsafe_refused"]["ci_low"] > 0.35
    assert c["harmless"] == "more harmless" and c["evasive"] == "not more evasive"
    assert c["trade_off"]


def test_compare_more_evasive_and_cannot_tell() -> None:
    base = _rows("unsafe", [COMPLIANCE] * 100) + _rows("safe", [COMPLIANCE] * 100)
    evasive = _rows("unsafe", [REFUSAL] * 100) + _rows("safe", [REFUSAL] * 40 + [COMPLIANCE] * 60)
    c = compare(base, evasive, margin=0.05)
    assert c["harmless"] == "more harmless" and c["evasive"] == "more evasive"
    assert not c["trade_off"]
    unclear = _rows("unsafe", [COMPLIANCE] * 100) + _rows("safe", [REFUSAL] * 4
                                                          + [COMPLIANCE] * 96)
    c = compare(base, unclear, margin=0.05)
    assert c["harmless"] == "no measurable change in harmlessness"
    assert c["evasive"] == "cannot tell whether more evasive"  # −4 points: the CI straddles −5


def test_paired_interval_contains_the_difference_and_narrows_with_concordance() -> None:
    d, lo, hi = paired_difference_interval(40, 5, 25, 30)
    assert d == pytest.approx(0.2) and lo < d < hi
    # the same margins with fewer discordant pairs: a narrower interval
    _, lo2, hi2 = paired_difference_interval(60, 0, 20, 20)
    assert hi2 - lo2 < hi - lo
    assert paired_difference_interval(10, 0, 0, 10)[0] == 0.0


def test_run_xstest_answers_resumes_and_scores(tiny_model_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    settings = XSTestSettings(prompts=18, max_new_tokens=4)
    spec = str(tiny_model_dir)
    result = run_xstest({"a": spec, "b": spec}, settings, tmp_path)
    assert result["prompts"] == 18
    for fig in result["checkpoints"].values():
        assert fig["unsafe_refused"]["n"] == 8 and fig["safe_answered"]["n"] == 10
        assert len(fig["per_type"]) == 18
    assert len((tmp_path / ANSWERS_FILE).read_text().splitlines()) == 36
    # the same model twice, greedy: no difference, and the comparison says so
    c = result["comparisons"]["b"]
    assert c["against"] == "a" and c["unsafe_refused"]["difference"] == 0.0
    assert c["unsafe_refused"]["gained"] == c["unsafe_refused"]["lost"] == 0
    # a re-run loads no model: everything is answered
    from constitutional import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    again = run_xstest({"a": spec, "b": spec}, settings, tmp_path)
    assert again["checkpoints"] == result["checkpoints"]
    assert json.loads((tmp_path / RESULTS_FILE).read_text())["classifier"] == "string"


def test_cli_xstest(tiny_model_dir: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "xstest", "-m", f"tiny={tiny_model_dir}", "--data", str(PROMPTS),
                 "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "unsafe refused" in text and "GPT-4 (published)" in text
    assert "skipped 2 prompt row(s)" in text
    saved = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert saved["checkpoints"]["tiny"]["unsafe_refused"]["n"] == 3
    assert saved["checkpoints"]["tiny"]["safe_answered"]["n"] == 3
