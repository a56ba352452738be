"""The checkpoints' answers to held-out prompts, the input of the Elo and evasiveness evals.

:func:`answer_rows` is what ``cai run``'s eval stage runs for each checkpoint, in this process or,
with ``executor: ray``, once per shard on a Ray actor (:func:`constitutional.distributed.ray.
ray_answer`). It appends a chunk of answers at a time to a record file, so a killed run keeps
what it finished and a re-run answers only the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional.core.io import JsonlStore
from constitutional.models import LanguageModel, SamplingParams

RECORDS = "answers.records.jsonl"


@dataclass(frozen=True)
class AnswerConfig:
    """How to answer: the sampling parameters, and how many prompts per model call."""

    params: SamplingParams
    chunk_size: int = 64


def answer_rows(lm: LanguageModel, rows: Sequence[dict[str, Any]], config: AnswerConfig,
                out: str | Path, *, records: str = RECORDS) -> int:
    """Answer each row's ``prompt`` (messages) with ``lm``; append ``{**row, "answer"}`` to
    ``out/<records>`` (``answers.records.jsonl``), skipping ids already there. Returns how many
    were answered."""
    store = JsonlStore(Path(out) / records)
    todo = [r for r in rows if r["id"] not in store]
    for start in range(0, len(todo), config.chunk_size):
        chunk = todo[start : start + config.chunk_size]
        answers = lm.generate([r["prompt"] for r in chunk], config.params)
        store.append({**r, "answer": a} for r, a in zip(chunk, answers, strict=True))
    return len(todo)
