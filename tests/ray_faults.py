"""Fault injection for the Ray tests, loaded in the actors through ``$CAI_RAY_MODEL_HOOK``.

With ``CAI_RAY_FAULT=SHARD:CALLS[:TIMES]`` in the environment, the first ``TIMES`` (default 1)
attempts of shard ``SHARD`` kill their worker process (``os._exit(1)``) on model call
``CALLS + 1``, after ``CALLS`` chunks are written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from constitutional.models import LanguageModel

FAULT_ENV = "CAI_RAY_FAULT"
HOOK = f"{Path(__file__).resolve()}:wrap"


class FaultyModel(LanguageModel):
    """Exits the process on model call ``calls + 1``."""

    def __init__(self, inner: LanguageModel, calls: int) -> None:
        self.inner, self.calls, self.spec, self.stats = inner, calls, inner.spec, inner.stats

    def __getattr__(self, name: str) -> Any:  # tokenizer, encode … of the real backend
        return getattr(self.inner, name)

    def _tick(self) -> None:
        self.calls -= 1
        if self.calls < 0:
            os._exit(1)

    def generate(self, prompts: Any, params: Any) -> list[str]:
        self._tick()
        return self.inner.generate(prompts, params)

    def score(self, contexts: Any, options: Any) -> list[list[float]]:
        self._tick()
        return self.inner.score(contexts, options)


def calls_before_crash(index: int, shard_dir: Path) -> int | None:
    """Model calls before this attempt's injected crash, or None."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    parts = spec.split(":")
    shard, calls, times = parts[0], parts[1] if len(parts) > 1 else "0", (parts[2:] or ["1"])[0]
    if int(shard) != index:
        return None
    shard_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, int(times) + 1):  # one marker per crashed attempt
        try:
            marker = shard_dir / f"fault-injected-{attempt}"
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return int(calls)
    return None


def wrap(lm: LanguageModel, index: int, shard_dir: Path) -> LanguageModel:
    calls = calls_before_crash(index, shard_dir)
    return lm if calls is None else FaultyModel(lm, calls)
