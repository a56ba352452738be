"""Content digests of stage inputs: cached by (path, size, mtime), recomputed when either moves;
and a run directory whose run.json cannot be read is one line, not a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from constitutional.config import RunConfig
from constitutional.core.errors import UserError
from constitutional.pipeline import Pipeline, file_digest


def _model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"A" * 1000)
    (d / "config.json").write_text('{"x": 1}')
    (d / "sl_train.json").write_text('{"wall": 1}')  # bookkeeping, not part of the model
    return d


def test_digest_follows_content_and_ignores_bookkeeping(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    first = file_digest(d)
    (d / "sl_train.json").write_text('{"wall": 2}')
    assert file_digest(d) == first
    (d / "model.safetensors").write_bytes(b"B" * 1000)
    assert file_digest(d) != first


def test_cache_skips_unchanged_files_and_rehashes_changed_ones(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    weights = d / "model.safetensors"
    cache: dict = {}
    first = file_digest(d, cache)
    assert first == file_digest(d)  # the cache does not change the digest
    assert set(cache) == {str(weights.resolve()), str((d / "config.json").resolve())}
    st = weights.stat()

    # Same size, same mtime, other bytes: the cache is trusted, so the file was not read again.
    weights.write_bytes(b"B" * 1000)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_digest(d, cache) == first

    # A new mtime (a rewrite) is re-hashed ...
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second = file_digest(d, cache)
    assert second != first and second == file_digest(d)
    # ... and so is a new size with the old mtime.
    weights.write_bytes(b"B" * 1001)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert file_digest(d, cache) not in (first, second)


def test_pipeline_keeps_the_digests_in_run_json(tmp_path: Path) -> None:
    pipe = Pipeline(RunConfig(), tmp_path / "run")
    stage = next(s for s in pipe.stages if s.inputs)
    for rel in stage.inputs:
        p = pipe.p(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("content")
    fp = pipe.fingerprint(stage)
    pipe.save_state()
    again = Pipeline(RunConfig(), tmp_path / "run")
    assert again.state["digests"] == pipe.state["digests"] and pipe.state["digests"]
    assert again.fingerprint(stage) == fp


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"no": "stages"}'])
def test_unreadable_run_json_is_one_line(tmp_path: Path, text: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(text)
    with pytest.raises(UserError) as err:
        Pipeline(RunConfig(), run)
    assert "run.json" in str(err.value) and "\n" not in str(err.value)
    assert (run / "run.json").read_text() == text  # nothing written over it
