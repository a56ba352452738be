"""``cai rl sample``: two answers per prompt from the policy, the pairs dataset of RL-CAI.

Files in the run directory:

* ``sample.config.json`` — the pinned settings (model, sampling, system prompt, prompt spec);
  re-running with the same settings resumes, different settings are a one-line error;
* ``sample.records.jsonl`` — finished pairs, appended a chunk at a time as they complete;
* ``pairs.jsonl`` — the pairs dataset (written atomically at the end, in prompt order), one row
  per prompt: ``id``, ``prompt_id``, ``prompt`` (messages), ``response_a``, ``response_b``,
  ``model``, ``sampling``. Load it with ``datasets.load_dataset("json", data_files=…)``.

A pair's ``id`` is a hash of the prompt id, the model spec, the system prompt and the sampling
parameters (seed included). Sampling is seeded per prompt, so a resumed run reproduces an
uninterrupted one record for record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import model_validator

from constitutional.core.errors import UserError
from constitutional.core.io import JsonlStore, RunDir, atomic_write_jsonl, stable_hash
from constitutional.core.progress import chunks, progress
from constitutional.core.settings import CLI_HIDDEN, Field, Settings
from constitutional.models import BUILTIN_MODEL, LanguageModel, SamplingParams, load_model
from constitutional.prompts.sources import PromptRecord

log = logging.getLogger(__name__)

STAGE = "sample"
RECORDS = "sample.records.jsonl"
PAIRS = "pairs.jsonl"


class SampleSettings(Settings):
    """How ``rl sample`` answers each prompt, twice (``sample:`` in a run config)."""

    temperature: float = Field(1.0, description="Sampling temperature.")
    top_p: float = Field(1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(256, description="Tokens per answer at most.")
    system: str | None = Field(None, description="System prompt for the policy.")
    chunk_size: int = Field(16, ge=1, description="Prompts generated and saved together.")


class SampleConfig(SampleSettings):
    """Settings of ``cai rl sample``."""

    model: str = Field(BUILTIN_MODEL, description="The policy's model spec.",
                       json_schema_extra={"cli": ["--model", "-m"]})
    seed: int = Field(0, description="Sampling seed (per prompt).")
    prompts: str = Field("", description="The prompt spec, recorded for provenance.",
                         json_schema_extra=CLI_HIDDEN)

    @model_validator(mode="after")
    def _check_sampling(self) -> SampleConfig:
        self.sampling()
        return self

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, seed=self.seed, n=2)

    def pinned(self) -> dict[str, Any]:
        """The settings a run directory is pinned to (chunk_size only changes the schedule)."""
        d = self.model_dump()
        d.pop("chunk_size")
        return d


@dataclass
class SampleResult:
    out: Path
    pairs: int
    generated: int  # pairs generated in this call (the rest were already done)
    identical: int  # pairs whose two answers are the same text
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)


def pair_id(prompt: PromptRecord, config: SampleConfig) -> str:
    return stable_hash("rl-sample", prompt.id, config.model, config.system,
                       config.sampling().to_dict())


def _conversation(prompt: PromptRecord, system: str | None) -> list[dict[str, str]]:
    messages = [dict(m) for m in prompt.messages]
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def sample(
    prompts: Sequence[PromptRecord],
    config: SampleConfig,
    out: str | Path,
    *,
    model: LanguageModel | None = None,
) -> SampleResult:
    """Answer every prompt twice and write the pairs dataset to ``out``; resumable."""
    params = config.sampling()  # validates the sampling values
    if not prompts:
        raise UserError("no prompts to answer")
    run = RunDir(out)
    run.pin_config(STAGE, config.pinned())
    store = JsonlStore(run / RECORDS)
    ids = [pair_id(p, config) for p in prompts]
    pending: dict[str, PromptRecord] = {}  # by id: duplicates are answered once
    for rid, prompt in zip(ids, prompts, strict=True):
        if rid not in store:
            pending.setdefault(rid, prompt)
    todo = list(pending.items())
    t0 = time.perf_counter()
    if todo:
        log.info("rl sample: %d of %d prompts to answer (%d done) with %s",
                 len(todo), len(prompts), len(prompts) - len(todo), config.model)
        lm = model or load_model(config.model)
        before = lm.stats.to_dict()
        with progress("sampling pairs", len(todo)) as advance:
            for chunk in chunks(todo, config.chunk_size):
                conversations = [_conversation(p, config.system) for _, p in chunk]
                answers = lm.generate(conversations, params)
                records = []
                for j, (rid, p) in enumerate(chunk):
                    records.append({
                        "id": rid, "prompt_id": p.id, "prompt": conversations[j],
                        "response_a": answers[2 * j], "response_b": answers[2 * j + 1],
                        "model": config.model, "sampling": params.to_dict(),
                        "source": p.source,
                    })
                store.append(records)
                advance(len(chunk))
        stats = {k: v - before[k] for k, v in lm.stats.to_dict().items()
                 if isinstance(v, int | float) and isinstance(before.get(k), int | float)}
        if model is None:
            lm.close()
    else:
        stats = {}
    rows = [store.get(i) for i in dict.fromkeys(ids)]
    atomic_write_jsonl(run / PAIRS, rows)  # type: ignore[arg-type]
    identical = sum(r["response_a"] == r["response_b"] for r in rows if r)
    if identical:
        log.warning("rl sample: %d pairs have two identical answers (their labels will be 0.5 "
                    "with both orders)", identical)
    return SampleResult(out=run.path, pairs=len(rows), generated=len(todo), identical=identical,
                        seconds=time.perf_counter() - t0, stats=stats)
