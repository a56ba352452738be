"""Shared fixtures: real tiny models, the built-in model, and real local servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may need the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BUILTIN = "builtin:smollm2-135m-instruct"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def builtin_dir() -> Path:
    """The built-in model converted to safetensors (cached under $CAI_HOME after the first run)."""
    from constitutional.models.builtin import ensure_checkpoint

    return ensure_checkpoint("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, builtin_dir: Path) -> Path:
    """A random-init 2-layer Llama (hidden 64) with the built-in model's real tokenizer."""
    from tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", builtin_dir)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path):
    from constitutional.models import load_model

    return load_model(str(tiny_model_dir))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError as err:  # refused while starting; HTTPError (e.g. 500) means it is up
            if isinstance(err, urllib.error.HTTPError):
                return
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not come up in {timeout}s:\n{log.read_text()[-3000:]}")


def start_server(cmd: list[str], health: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    wait_http(health, proc, log)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def hf_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[str]:
    """`transformers serve` on 127.0.0.1 serving the tiny model. Yields the base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "transformers-serve.log"
    proc = start_server(
        [str(VENV_BIN / "transformers"), "serve", "--host", "127.0.0.1", "--port", str(port),
         str(tiny_model_dir)],
        f"http://127.0.0.1:{port}/health", log,
    )
    yield f"http://127.0.0.1:{port}/v1"
    stop(proc)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on the built-in GGUF. Yields the base URL.

    Model name on the server: ``smollm2``.
    """
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed; `make test` builds it (see Makefile)")
    from constitutional.models.builtin import gguf_path

    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "llama-server.log"
    proc = start_server(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path("smollm2-135m-instruct")),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--model_alias", "smollm2",
         "--n_threads", "2"],
        f"http://127.0.0.1:{port}/v1/models", log,
    )
    yield f"http://127.0.0.1:{port}/v1"
    stop(proc)
