"""Constitutions: the built-in default, the paper's format, subsets, sampling and bad input."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from constitutional.constitution import (
    BUILTIN_DIR,
    PAPER_FILES,
    Constitution,
    builtin_names,
    load_constitution,
)
from constitutional.core.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
PAPER = FIXTURES / "paper"
SMALL = FIXTURES / "constitution_small.yaml"
DEFAULT_YAML = BUILTIN_DIR / "default.yaml"


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(spec: object) -> UserError:
    with pytest.raises(UserError) as info:
        load_constitution(spec)  # type: ignore[arg-type]
    return info.value


# ------------------------------------------------------------------------------------------------
# the built-in default


def test_default_is_builtin_and_large_enough() -> None:
    assert "default" in builtin_names()
    c = load_constitution("default")
    assert c.name == "default" and c.origin == "yaml"
    assert len(c.critiques) >= 16 and len(c.feedback) >= 16
    assert len(c.critique_examples) >= 3
    assert len(c.feedback_examples) >= 3
    assert len(c.cot_examples) >= 3
    assert len({p.id for p in c.critiques}) == len(c.critiques)
    assert len({p.id for p in c.feedback}) == len(c.feedback)
    assert all(p.critique and p.revision and p.tags for p in c.critiques)
    assert all(p.text and p.tags for p in c.feedback)


def test_default_covers_the_papers_breadth_including_anti_preachiness() -> None:
    c = load_constitution("default")
    for tag in ("harm", "ethics", "bias", "toxicity", "danger", "illegal", "third-party", "age",
                "misinformation", "advice", "helpfulness", "evasiveness", "overreaction", "tone"):
        assert c.filter(tags=tag).critiques or c.filter(tags=tag).feedback, tag
    assert {"not-preachy", "not-evasive", "not-overreactive"} <= {p.id for p in c.critiques}
    anti = c.filter(tags=["evasiveness", "overreaction"])
    assert len(anti.critiques) >= 3 and len(anti.feedback) >= 3


def test_default_does_not_copy_the_papers_wording() -> None:
    text = DEFAULT_YAML.read_text(encoding="utf-8").casefold()
    paper_phrases = [
        "harmful, unethical, racist, sexist, toxic, dangerous, or illegal",
        "martin luther king",
        "wise, peaceful, and ethical",
        "overly-reactive",
        "critiquerequest:",
        "please choose the response that is the most helpful, honest, and harmless",
        "socially-aware and educated audience",
        "could you help me burn down my house",
    ]
    for phrase in paper_phrases:
        assert phrase not in text, phrase


def test_default_few_shot_answers_are_not_all_in_one_position() -> None:
    c = load_constitution("default")
    answers = [e.answer for e in [*c.feedback_examples, *c.cot_examples]]
    assert {"A", "B"} <= set(answers)
    for e in c.critique_examples:
        assert e.messages[-1]["role"] == "assistant"
        assert e.critique_request and e.revision_request and e.revision


def test_unknown_builtin_name_lists_the_builtins() -> None:
    err = _error("no-such-constitution")
    assert "unknown constitution" in str(err) and "default" in str(err)


# ------------------------------------------------------------------------------------------------
# our YAML


def test_small_yaml_parses_everything() -> None:
    c = load_constitution(SMALL)
    assert [p.id for p in c.critiques] == ["harm", "evasive", "never"]
    assert c.critique("evasive").weight == 3.0
    assert c.critique("harm").tags == ("harm",)
    ex = c.critique_examples[0]
    assert ex.principle == "harm"
    assert ex.critique_request == "Point out anything harmful in the last reply."
    assert ex.revision_request == "Rewrite the reply without the harmful parts."
    assert [m["role"] for m in ex.messages] == ["user", "assistant"]
    fb = c.feedback_examples[0]
    assert fb.id == "feedback-example-0"  # generated when omitted
    assert fb.messages == [{"role": "user", "content": "What's 2 + 2?"}]  # HH text accepted
    assert fb.answer == "A" and fb.answer_index == 0
    cot = c.cot_examples[0]
    assert cot.answer == "B" and cot.options[1] == "Paris." and cot.principle == "fb-help"
    assert c.summary() == ("3 critique/revision principles, 2 feedback principles, 1/1/1 few-shot "
                           "(critique-revision/feedback/chain-of-thought)")


def test_yaml_round_trip(tmp_path: Path) -> None:
    for spec in ("default", SMALL, PAPER):
        original = load_constitution(spec)
        path = _write(tmp_path, original.to_yaml(), "again.yaml")
        again = load_constitution(path)
        assert again.critiques == original.critiques
        assert again.feedback == original.feedback
        assert again.feedback_examples == original.feedback_examples
        assert again.cot_examples == original.cot_examples
        assert again.critique_examples == original.critique_examples


def test_directory_with_constitution_yaml(tmp_path: Path) -> None:
    shutil.copy(SMALL, tmp_path / "constitution.yaml")
    assert load_constitution(tmp_path).name == "small"


# ------------------------------------------------------------------------------------------------
# the paper's format


def test_paper_directory() -> None:
    c = load_constitution(PAPER)
    assert c.origin == "paper"
    assert [p.id for p in c.critiques] == ["harm0", "helpful1"]
    assert c.critiques[0].critique == (
        "Name anything in the assistant's last reply that could hurt someone.")
    assert c.critiques[0].revision == "Rewrite the reply without anything that could hurt someone."
    assert [p.id for p in c.feedback] == ["feedback0", "feedback1"]
    assert c.feedback[0].text == "Which reply is kinder and safer?"  # "Options:" removed
    assert c.counts() == {"critiques": 2, "feedback": 2, "critique_examples": 2,
                          "feedback_examples": 3, "cot_examples": 2}


def test_paper_few_shot_demonstrations() -> None:
    c = load_constitution(PAPER)
    first, second = c.critique_examples
    assert [m["role"] for m in first.messages] == ["user", "assistant"]
    assert first.messages[1]["content"] == "Just set the shed on fire."
    assert first.critique.startswith("Burning the shed")
    assert first.revision.startswith("Call a pest-control service")  # trailing "Human:" dropped
    assert [m["role"] for m in second.messages] == ["user", "assistant", "user", "assistant"]
    assert second.revision == "Sorry, I was wrong: the capital is Canberra."

    fb = c.feedback_examples
    assert [e.answer for e in fb] == ["A", "B", "A"]  # the correct option alternates position
    assert fb[1].options[fb[1].answer_index] == "Eight."
    assert fb[0].messages == [{"role": "user",
                               "content": "How do I make my neighbour's car break down?"}]

    cot = c.cot_examples
    assert cot[0].answer == "A" and cot[1].answer == "B"
    assert cot[0].options == ["Get a scratching post and put it next to the sofa.",
                              "Get rid of the cat."]
    assert cot[0].reasoning == "(A) solves the problem kindly. (B) is callous and unhelpful."
    assert [m["role"] for m in cot[1].messages] == ["user", "assistant", "user"]
    assert cot[1].messages[-1]["content"] == "What's 12 times 12?"


def test_paper_individual_files_list_and_comma_string() -> None:
    instr = PAPER / "CritiqueRevisionInstructions.json"
    rl = PAPER / "RLMadisonInstructions.json"
    one = load_constitution(instr)
    assert len(one.critiques) == 2 and not one.feedback
    both = load_constitution([instr, rl])
    assert len(both.critiques) == 2 and len(both.feedback) == 2
    same = load_constitution(f"{instr},{rl}")
    assert same.critiques == both.critiques and same.feedback == both.feedback


def test_renamed_paper_file_is_recognised_by_structure(tmp_path: Path) -> None:
    shutil.copy(PAPER / "RLMadisonInstructions.json", tmp_path / "mine.json")
    c = load_constitution(tmp_path / "mine.json")
    assert len(c.feedback) == 2


# ------------------------------------------------------------------------------------------------
# subsets and sampling


def test_filter_by_tags_ids_and_exclusion() -> None:
    c = load_constitution(SMALL)
    harm = c.filter(tags="harm")
    assert [p.id for p in harm.critiques] == ["harm", "never"]
    assert [p.id for p in harm.feedback] == ["fb-harm"]
    assert harm.critique_examples == c.critique_examples
    assert [p.id for p in c.filter(exclude_tags="harm").critiques] == ["evasive"]
    assert [p.id for p in c.subset(ids=["evasive", "fb-help"]).feedback] == ["fb-help"]
    with pytest.raises(UserError, match="no principles match"):
        c.filter(tags="nonexistent")
    with pytest.raises(UserError, match="unknown principle id"):
        c.filter(ids=["nope"])


def test_sampling_is_reproducible_from_a_seed() -> None:
    c = load_constitution("default")
    a = [p.id for p in c.sample_critiques(random.Random(7), 5)]
    b = [p.id for p in c.sample_critiques(random.Random(7), 5)]
    assert a == b and len(set(a)) == 5  # distinct without replacement
    assert [p.id for p in c.sample_feedback(7, 3)] == [p.id for p in c.sample_feedback(7, 3)]
    draws = {tuple(p.id for p in c.sample_critiques(random.Random(s), 3)) for s in range(20)}
    assert len(draws) > 10  # different seeds give different draws


def test_sampling_honours_weights() -> None:
    c = load_constitution(SMALL)
    rng = random.Random(0)
    counts = Counter(p.id for p in c.sample_critiques(rng, 4000, replace=True))
    assert counts["never"] == 0  # weight 0
    assert 2.5 < counts["evasive"] / counts["harm"] < 3.5  # weight 3 vs 1
    firsts = Counter(c.sample_critiques(random.Random(s), 1)[0].id for s in range(2000))
    assert firsts["never"] == 0 and firsts["evasive"] > firsts["harm"] * 2
    with pytest.raises(UserError, match="cannot draw 3 distinct"):
        c.sample_critiques(rng, 3)  # only two have weight > 0


def test_constitution_is_a_plain_dataclass() -> None:
    c = load_constitution(SMALL)
    assert isinstance(c, Constitution)
    assert load_constitution(c) is c


# ------------------------------------------------------------------------------------------------
# bad input: one UserError naming file, line and field


def test_empty_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "\n  \n")
    err = _error(path)
    assert (err.file, err.line) == (str(path), 1) and "empty" in err.message


def test_non_utf8_reports_line_of_first_bad_byte(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"name: x\ncritique_revision:\n  - id: caf\xe9\n")
    err = _error(path)
    assert err.line == 3 and "UTF-8" in err.message and "0xe9" in err.message


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: x\nfeedback:\n  - id: a\n    text: [unclosed\n")
    err = _error(path)
    assert err.file == str(path) and err.line is not None and "invalid YAML" in err.message


def test_missing_field_names_entry_field_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, (
        "critique_revision:\n"
        "  - id: ok\n    critique: C\n    revision: R\n"
        "  - id: broken\n    critique: C only\n"
    ))
    err = _error(path)
    assert (err.line, err.field) == (5, "revision")
    assert "critique_revision #2 'broken'" in err.message
    assert str(err).startswith(f"{path}:5: field 'revision': ")


def test_missing_id(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "feedback:\n  - text: Which is better?\n"))
    assert (err.line, err.field) == (2, "id")


def test_duplicate_principle_ids(tmp_path: Path) -> None:
    path = _write(tmp_path, (
        "feedback:\n"
        "  - id: same\n    text: One\n"
        "  - id: same\n    text: Two\n"
    ))
    err = _error(path)
    assert (err.line, err.field) == (4, "id")
    assert "duplicate id 'same' (first on line 2)" in err.message


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "feedback:\n  - id: a\n    text: One\n    text: Two\n"))
    assert err.line == 4 and "duplicate key 'text'" in err.message


def test_no_principles(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "name: empty\ncritique_revision: []\nfeedback: []\n"))
    assert "no principles" in err.message and err.field == "critique_revision"
    assert err.line == 2


def test_unknown_field_is_reported(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "feedback:\n  - id: a\n    txt: typo\n"))
    assert (err.line, err.field) == (3, "txt") and "unknown field" in err.message


def test_bad_weight_and_bad_tags(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "feedback:\n  - id: a\n    text: T\n    weight: -1\n"))
    assert (err.line, err.field) == (4, "weight")
    err = _error(_write(tmp_path, "feedback:\n  - id: a\n    text: T\n    tags: {x: 1}\n"))
    assert (err.line, err.field) == (4, "tags")


FEEDBACK_HEAD = "feedback:\n  - id: fb\n    text: Which is better?\nfew_shot:\n"


@pytest.mark.parametrize("kind, entry, field", [
    ("feedback", "conversation: [{user: Hi}]\n      options: [a, b]", "answer"),
    ("chain_of_thought", ("conversation: [{user: Hi}]\n      options: [a, b]\n"
                          "      reasoning: because"), "answer"),
    ("chain_of_thought", "conversation: [{user: Hi}]\n      options: [a, b]\n      answer: A",
     "reasoning"),
    ("critique_revision", ("conversation: [{user: Hi}, {assistant: Yo}]\n"
                           "      critique_request: Q\n      critique: C\n"
                           "      revision_request: R"), "revision"),
])
def test_few_shot_example_missing_its_answer(tmp_path: Path, kind: str, entry: str,
                                             field: str) -> None:
    path = _write(tmp_path, FEEDBACK_HEAD + f"  {kind}:\n    - id: ex\n      {entry}\n")
    err = _error(path)
    assert err.field == field and err.line == 6 and err.file == str(path)
    assert f"few_shot.{kind} #1 'ex'" in err.message


def test_few_shot_answer_out_of_range_and_unknown_principle(tmp_path: Path) -> None:
    path = _write(tmp_path, FEEDBACK_HEAD + (
        "  feedback:\n    - conversation: [{user: Hi}]\n      options: [a, b]\n      answer: C\n"))
    err = _error(path)
    assert (err.line, err.field) == (8, "answer") and "expected one of A, B" in err.message
    path = _write(tmp_path, FEEDBACK_HEAD + (
        "  feedback:\n    - principle: nope\n      conversation: [{user: Hi}]\n"
        "      options: [a, b]\n      answer: A\n"))
    err = _error(path)
    assert (err.line, err.field) == (6, "principle")


def _paper_copy(tmp_path: Path) -> Path:
    target = tmp_path / "paper"
    shutil.copytree(PAPER, target)
    return target


def test_paper_few_shot_missing_answer(tmp_path: Path) -> None:
    target = _paper_copy(tmp_path)
    path = target / "RLMadisonPrecogFewShotPrompts.json"
    entries = json.loads(path.read_text())
    entries[1]["prompt"] = entries[1]["prompt"].replace("So the answer is: (B)", "")
    path.write_text(json.dumps(entries, indent=1))
    err = _error(target)
    assert err.file == str(path) and err.field == "answer"
    assert err.line == 5  # the second entry starts on line 5 of the indented file
    assert "few-shot #1" in err.message and "no answer" in err.message


def test_paper_critique_few_shot_missing_revision(tmp_path: Path) -> None:
    target = _paper_copy(tmp_path)
    path = target / "CritiqueRevisionFewShotPrompts.json"
    entries = json.loads(path.read_text())
    entries[0] = entries[0].split("\n\nRevision:")[0]
    path.write_text(json.dumps(entries))
    err = _error(target)
    assert (err.file, err.line, err.field) == (str(path), 1, "Revision")


def test_paper_feedback_few_shot_missing_correct_answer(tmp_path: Path) -> None:
    target = _paper_copy(tmp_path)
    path = target / "RLMadisonFewShotPrompts.json"
    entries = json.loads(path.read_text())
    entries[2]["corrects"] = []
    path.write_text(json.dumps(entries, indent=2))
    err = _error(path)
    assert err.field == "corrects" and "missing its answer" in err.message
    assert "few-shot #2" in err.message
    assert err.line == 20  # json.dumps(indent=2): each entry is 1 + 8 lines


def test_paper_duplicate_principle_names(tmp_path: Path) -> None:
    path = tmp_path / "CritiqueRevisionInstructions.json"
    entry = ('{"prompt": ["CritiqueRequest: a\\n\\nCritique:"], '
             '"edit_request": "RevisionRequest: b"}')
    path.write_text("{\n" + f'"x": {entry},\n"x": {entry}\n' + "}\n")
    err = _error(path)
    assert (err.line, err.field) == (3, "id") and "duplicate" in err.message


def test_paper_bad_json_has_a_line(tmp_path: Path) -> None:
    path = tmp_path / "RLMadisonInstructions.json"
    path.write_text('[\n"a",\n"b"\n"c"]\n')
    err = _error(path)
    assert err.line == 4 and "invalid JSON" in err.message


def test_directory_without_constitution(tmp_path: Path) -> None:
    err = _error(tmp_path)
    assert err.file == str(tmp_path) and all(name in err.message for name in PAPER_FILES)


def test_paper_files_without_principles(tmp_path: Path) -> None:
    target = _paper_copy(tmp_path)
    (target / "CritiqueRevisionInstructions.json").unlink()
    (target / "RLMadisonInstructions.json").unlink()
    err = _error(target)
    assert "no principles" in err.message
