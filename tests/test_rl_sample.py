"""`rl sample`: two answers per prompt, batched, seeded per prompt, resumable."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from constitutional.core.errors import UserError
from constitutional.core.io import read_jsonl
from constitutional.prompts.sources import PromptRecord
from constitutional.rl.sample import SampleConfig, pair_id, sample

CAI = [sys.executable, "-m", "constitutional.cli"]


def prompts(n: int) -> list[PromptRecord]:
    return [PromptRecord.from_text(f"Tell me fact number {i} about the sea.", source="test")
            for i in range(n)]


def test_two_answers_per_prompt(tiny, tmp_path: Path) -> None:
    from datasets import load_dataset

    config = SampleConfig(model=tiny.spec, max_new_tokens=8, chunk_size=3)
    records = prompts(5)
    result = sample(records, config, tmp_path / "run", model=tiny)
    assert result.pairs == 5 and result.generated == 5
    rows = list(read_jsonl(tmp_path / "run" / "pairs.jsonl"))
    assert [r["prompt_id"] for r in rows] == [p.id for p in records]
    assert [r["id"] for r in rows] == [pair_id(p, config) for p in records]
    for row in rows:
        assert isinstance(row["response_a"], str) and isinstance(row["response_b"], str)
        assert row["sampling"]["temperature"] == 1.0 and row["sampling"]["n"] == 2
        assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
    # temperature 1: the two samples differ (random-init model, 8 tokens)
    assert sum(r["response_a"] != r["response_b"] for r in rows) >= 4
    ds = load_dataset("json", data_files=str(tmp_path / "run" / "pairs.jsonl"), split="train")
    assert len(ds) == 5 and {"prompt", "response_a", "response_b"} <= set(ds.column_names)


def test_samples_do_not_depend_on_chunking_and_resume_skips_done(tiny, tmp_path: Path) -> None:
    records = prompts(6)
    a = sample(records, SampleConfig(model=tiny.spec, max_new_tokens=6, chunk_size=1),
               tmp_path / "a", model=tiny)
    b = sample(records[:4], SampleConfig(model=tiny.spec, max_new_tokens=6, chunk_size=4),
               tmp_path / "b", model=tiny)
    before = tiny.stats.requests
    b = sample(records, SampleConfig(model=tiny.spec, max_new_tokens=6, chunk_size=4),
               tmp_path / "b", model=tiny)
    assert b.generated == 2 and tiny.stats.requests - before == 2
    assert a.pairs == b.pairs == 6
    assert (tmp_path / "a" / "pairs.jsonl").read_text() == (tmp_path / "b" / "pairs.jsonl").read_text()


def test_system_prompt_and_other_settings_are_pinned(tiny, tmp_path: Path) -> None:
    out = tmp_path / "run"
    sample(prompts(1), SampleConfig(model=tiny.spec, max_new_tokens=4, system="Be brief."), out,
           model=tiny)
    row = next(read_jsonl(out / "pairs.jsonl"))
    assert row["prompt"][0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(UserError, match="made with temperature=1.0, now temperature=0.5"):
        sample(prompts(1), SampleConfig(model=tiny.spec, max_new_tokens=4, system="Be brief.",
                                        temperature=0.5), out, model=tiny)


def _sample_cmd(prompts_file: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [*CAI, "rl", "sample", "--prompts", str(prompts_file), "-m", str(model), "--out",
            str(out), "--max-new-tokens", "8", "--chunk-size", "1", *extra]


def test_sample_resumes_after_kill(tiny_model_dir: Path, tmp_path: Path) -> None:
    n = 16
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("".join(f"Tell me fact number {i} about the sea.\n" for i in range(n)))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(_sample_cmd(prompts_file, killed, tiny_model_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = killed / "sample.records.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and 0 < records.read_bytes().count(b"\n") < n:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = len(list(read_jsonl(records)))
    assert 0 < partial < n
    for out in (killed, clean):
        run = subprocess.run(_sample_cmd(prompts_file, out, tiny_model_dir), check=False,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        if out == killed:
            assert f"({partial} already done)" in run.stderr
    resumed = (killed / "pairs.jsonl").read_text().splitlines()
    reference = (clean / "pairs.jsonl").read_text().splitlines()
    assert len(resumed) == n
    assert resumed == reference  # same ids, same order, same samples (seeded per prompt)
    lines = [json.loads(x) for x in records.read_text().splitlines()]
    assert len(lines) == len({r["id"] for r in lines}) == n


def test_sample_cli_errors_are_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts_file = tmp_path / "p.txt"
    prompts_file.write_text("Hello there\n")
    out = tmp_path / "run"
    ok = subprocess.run(_sample_cmd(prompts_file, out, tiny_model_dir), check=False,
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr
    assert "1 pairs" in ok.stdout
    cases = [
        (_sample_cmd(prompts_file, out, tiny_model_dir, "--seed", "3"),
         "this run directory was made with seed=0, now seed=3"),
        (_sample_cmd(prompts_file, tmp_path / "r2", tiny_model_dir, "--temperature", "-1"),
         "temperature must be >= 0"),
        (_sample_cmd(tmp_path / "missing.txt", tmp_path / "r3", tiny_model_dir), "no such file"),
    ]
    for cmd, needle in cases:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, (cmd, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], proc.stderr
