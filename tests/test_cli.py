"""The `cai` command line: answers, model listing, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from constitutional.cli import main

CAI = [sys.executable, "-m", "constitutional.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CAI, *args], capture_output=True, text=True, timeout=600, check=False)


def test_generate_with_tiny_model(tiny_model_dir: Path, capsys) -> None:
    rc = main(["generate", "-m", str(tiny_model_dir), "--max-new-tokens", "5", "Hello"])
    assert rc == 0
    assert capsys.readouterr().out.strip()


def test_generate_samples(tiny_model_dir: Path, capsys) -> None:
    rc = main(["generate", "-m", str(tiny_model_dir), "--max-new-tokens", "5", "--temperature",
               "1", "-n", "2", "--seed", "3", "--system", "Be kind.", "Hi"])
    assert rc == 0
    assert capsys.readouterr().out.count("sample") == 2


def test_models_lists_builtin(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "builtin:smollm2" in out and "openai" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "-m", "nonsense", "x"], "unknown model spec"),
        (["generate", "-m", "./no/such/dir", "x"], "model directory not found"),
        (["generate", "-m", "builtin:nope", "x"], "unknown built-in model"),
        (["generate", "-m", "openai:localhost-no-scheme", "x"], "bad OpenAI spec"),
        (["generate", "--temperature", "-1", "x"], "temperature must be >= 0"),
        (["generate", "--dtype", "fp8", "x"], "unknown dtype 'fp8'"),
        (["generate", "-m", "openai:http://127.0.0.1:9/v1#m", "--dtype", "bfloat16", "x"],
         "--dtype applies to the hf and vllm backends"),
        (["generate", "--max-new-tokens", "many", "x"], "--max-new-tokens"),
        (["generate", "--top-p", "2", "x"], "top_p"),
        (["no-such-command"], "No such command"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_unreachable_server_is_one_line() -> None:
    from conftest import free_port

    proc = run_cli("generate", "-m", f"openai:http://127.0.0.1:{free_port()}/v1#m", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "cannot reach" in proc.stderr


def test_model_dir_without_config(tmp_path: Path) -> None:
    proc = run_cli("generate", "-m", str(tmp_path), "x")
    assert proc.returncode == 2 and "no config.json" in proc.stderr


@pytest.mark.slow
def test_cai_generate_builtin_answers() -> None:
    proc = run_cli("generate", "-m", "builtin:smollm2-135m-instruct", "--max-new-tokens", "24",
                   "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_library_logs_follow_stderr_after_it_is_swapped(monkeypatch):
    """The CLI's log handler writes to the stderr of the moment: a program (or a test) that swaps
    stderr and closes the old stream does not get "--- Logging error ---" from library logs."""
    import io
    import logging
    import sys

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    main(["models"])
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("constitutional.test").warning("still heard")
    assert "still heard" in second.getvalue()
    assert "Logging error" not in second.getvalue()
