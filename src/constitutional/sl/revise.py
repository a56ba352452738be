"""SL-CAI data generation: answer red-team prompts, then critique and revise, N rounds.

The stage runs **round-wise and batched**: for a chunk of prompts (``chunk_size``, 64), every
initial answer, then every first critique, then every first revision, and so on; then the next
chunk. Each call to the model gets the whole chunk, which the backend sorts by length and
batches; the few-shot block comes first and is the same for every sample, so the `hf` backend
computes its KV cache once, and on CPU it keeps each record's keys and values from one step to
the next, so that a critique or revision prefills only its new request.

**Resumable.** Every finished step of every record is appended (fsynced) to
``revise.steps.jsonl`` as its chunk completes. Killing the process at any moment and re-running
the same command continues where it stopped: finished steps are read back, missing ones are
computed. Sampling is seeded per prompt (see :class:`~constitutional.models.SamplingParams`), and
a record's principles are drawn from ``(seed, prompt id, round)``, so a partly finished round is
recomputed exactly as an uninterrupted run would have computed it.

**A teacher** (``critic_model``, ``--critic-model``): by default the policy critiques and
revises its own answers, as in the paper. With a critic model set, the policy writes only the
initial answers and the critic every critique and revision, so the revisions the policy is then
finetuned on are the teacher's: a distilled SL-CAI. The critic is recorded in the pinned
settings and traces only when set, so self-critique runs keep their record ids.

Outputs in the run directory (JSONL, loadable with ``datasets.load_dataset("json", …)``):

* ``revise.traces.jsonl`` — one full trace per prompt: prompt id and messages, the initial
  answer, each round's principle id, critique and revision, model spec, sampling and seed;
* ``revise.sft.jsonl`` — TRL ``prompt``/``completion`` conversational rows (final revision, or
  every revision with ``sft_revisions="all"`` as the paper did);
* ``revise.prefs.jsonl`` — ``prompt``/``chosen``/``rejected`` (final revision vs initial answer),
  usable as-is by TRL's DPOTrainer;
* ``revise.summary.json`` — counts, tokens, tokens/s, degenerate outputs, wall time.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from constitutional.constitution import Constitution, CritiquePrinciple, load_constitution
from constitutional.core.errors import UserError
from constitutional.core.io import (
    JsonlStore,
    RunDir,
    atomic_write_jsonl,
    atomic_write_text,
    stable_hash,
)
from constitutional.core.log import err_console
from constitutional.core.settings import Field, Settings
from constitutional.models import BUILTIN_MODEL, LanguageModel, SamplingParams, load_model
from constitutional.prompts.selection import PromptSelection
from constitutional.prompts.sources import PromptRecord
from constitutional.sl.prompts import (
    STOP,
    Round,
    build_context,
    clean_revision,
    critique_prefix,
    degenerate_reason,
)

log = logging.getLogger(__name__)

STEPS_FILE = "revise.steps.jsonl"
TRACES_FILE = "revise.traces.jsonl"
SFT_FILE = "revise.sft.jsonl"
PREFS_FILE = "revise.prefs.jsonl"
SUMMARY_FILE = "revise.summary.json"


class ReviseSettings(Settings):
    """The tunable settings of SL-CAI's critique→revision loop (``revise:`` in a run config)."""

    revisions: int = Field(4, ge=1, description="Critique→revision rounds (paper: 4).")
    few_shot: int = Field(3, ge=0, description="Demonstrations placed before each context.")
    critique: bool = Field(True, description="Critique before revising; --no-critique is the "
                                             "paper's direct-revision ablation.")
    prompt_format: Literal["chat", "text"] = Field(
        "chat", description="chat (chat models), or text: the paper's transcript, for base "
                            "models.", json_schema_extra={"cli": ["--format"]})
    history: Literal["full", "latest"] = Field(
        "full", description="full: rounds see earlier rounds (the paper); latest: only the "
                            "latest revision.")
    tags: list[str] = Field(default_factory=list, description="Only principles with this tag "
                                                              "(repeatable).",
                            json_schema_extra={"cli": ["--tag"]})
    temperature: float = Field(0.7, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(0.95, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(256, description="Tokens at most, for answers and "
                                                       "revisions.")
    critique_max_new_tokens: int = Field(192, description="Tokens at most, for "
                                                                "critiques.")
    sft_revisions: Literal["final", "all"] = Field(
        "final", description="SFT rows from the final revision, or from all revisions as in "
                             "the paper.")
    chunk_size: int = Field(64, ge=1, description="Prompts per model call (and per write).")
    critic_model: str | None = Field(
        None, description="Model spec that writes the critiques and revisions (a teacher: a "
                          "distilled SL-CAI); default: the policy critiques and revises its own "
                          "answers, as in the paper.")

    critic_layout: Literal["conversation", "review"] | None = Field(
        None, description="chat format: review (the critic is handed the exchange as a "
                          "transcript to critique and rewrite) or conversation (it continues "
                          "the conversation, the paper's self-critique); default: review with a "
                          "critic model, conversation without.")

    # unset: the pinned settings, record ids and fingerprints of self-critique runs stay
    omit_unset = ("critic_model", "critic_layout")

    @property
    def layout(self) -> str:
        """The chat layout of the critiques and revisions (see ``critic_layout``)."""
        if self.critic_layout is not None:
            return self.critic_layout
        return "review" if self.critic_model is not None else "conversation"


class ReviseConfig(ReviseSettings, PromptSelection):
    """Settings of ``cai sl revise``. Everything but ``out``/``chunk_size``/``sft_revisions`` is
    pinned in the run directory."""

    model: str = Field(BUILTIN_MODEL, description="Model spec (the helpful model).",
                       json_schema_extra={"cli": ["--model", "-m"]})
    out: str = Field(description="Run directory (resumes if it exists).")
    constitution: str = Field("default", description="Built-in name, YAML file or paper dir.")
    seed: int = Field(0, description="Seed for principles and sampling.")

    @model_validator(mode="after")
    def _check_sampling(self) -> ReviseConfig:
        self.answer_params()  # SamplingParams checks the sampling values (declared there)
        self.critique_params()
        return self

    def pinned(self) -> dict[str, Any]:
        d = self.settings_dump()
        for k in ("out", "chunk_size", "sft_revisions"):
            d.pop(k)
        return d

    def answer_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, seed=self.seed,
                              stop=STOP[self.prompt_format])

    def critique_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.critique_max_new_tokens, seed=self.seed,
                              stop=STOP[self.prompt_format])


@dataclass
class ReviseResult:
    run_dir: Path
    summary: dict[str, Any]
    traces: list[dict[str, Any]]


# ------------------------------------------------------------------------------------------------
# state of one record, rebuilt from its finished steps


@dataclass
class _Record:
    id: str
    prompt: PromptRecord
    principles: list[CritiquePrinciple]
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # step key -> step record

    def text(self, key: str) -> str | None:
        step = self.steps.get(key)
        return None if step is None else step["text"]

    def rounds(self, upto: int, pending: str | None, with_critique: bool,
               history: str) -> list[Round]:
        """Finished rounds 1..upto-1 plus round ``upto`` filled up to the ``pending`` part."""
        rounds = []
        for r in range(1, upto + 1):
            p = self.principles[r - 1]
            crit_req = p.critique if with_critique else None
            critique = self.text(f"critique:{r}") if with_critique else None
            if r == upto and pending == "critique":
                rounds.append(Round(crit_req))
                break
            revision = None if (r == upto and pending == "revision") else self.text(f"revision:{r}")
            rounds.append(Round(crit_req, critique, p.revision, revision))
        if history == "latest" and len(rounds) > 1:
            return rounds[-1:]
        return rounds

    def current_answer(self, upto: int, history: str) -> str:
        """The answer the next round critiques: the initial one, or with history=latest the
        latest usable revision."""
        answer = self.text("answer") or ""
        if history == "latest":
            for r in range(upto - 1, 0, -1):
                step = self.steps.get(f"revision:{r}")
                if step and not step["degenerate"]:
                    return step["text"]
        return answer


def _step_keys(revisions: int, with_critique: bool) -> list[str]:
    keys = ["answer"]
    for r in range(1, revisions + 1):
        if with_critique:
            keys.append(f"critique:{r}")
        keys.append(f"revision:{r}")
    return keys


def choose_few_shot(constitution: Constitution, k: int, seed: int) -> list[Any]:
    examples = list(constitution.critique_examples)
    if k > len(examples):
        raise UserError(
            f"asked for {k} few-shot demonstrations but the constitution has {len(examples)}",
            field="few_shot",
        )
    rng = random.Random(stable_hash(seed, "few-shot"))
    return rng.sample(examples, k) if k else []


def sample_principles(constitution: Constitution, seed: int, prompt_id: str,
                      revisions: int) -> list[CritiquePrinciple]:
    """One principle per round, drawn at random; reproducible from (seed, prompt id, round)."""
    return [
        constitution.sample_critiques(random.Random(stable_hash(seed, prompt_id, r)), 1)[0]
        for r in range(1, revisions + 1)
    ]


# ------------------------------------------------------------------------------------------------
# the stage


def revise(config: ReviseConfig, model: LanguageModel | None = None, *,
           critic: LanguageModel | None = None, show_progress: bool = True,
           prompts: Sequence[PromptRecord] | None = None) -> ReviseResult:
    """Run (or resume) SL-CAI critique→revision generation into ``config.out``.

    ``model`` is ``config.model`` (the policy) already loaded; with ``config.critic_model`` set,
    the policy writes only the initial answers and the critic (``critic``, the loaded
    ``config.critic_model``) every critique and revision. ``prompts`` replaces loading
    ``config.prompts`` (a shard of them, for a distributed run); the record ids do not change.
    A model is loaded only when some step of its own is still to compute.
    """
    t_start = time.perf_counter()
    run = RunDir(config.out)
    constitution = load_constitution(config.constitution)
    if config.tags:
        constitution = constitution.filter(tags=config.tags)
    if not constitution.critiques:
        raise UserError("the constitution has no critique/revision principles",
                        field="constitution")
    few_shot = choose_few_shot(constitution, config.few_shot, config.seed)
    if prompts is None:
        prompts = config.load()
    prompts = [p for p in prompts if p.messages and p.messages[-1]["role"] == "user"]
    if not prompts:
        raise UserError("no prompts that end in a user turn", file=config.prompts)
    run.pin_config("revise", config.pinned())

    store = JsonlStore(run / STEPS_FILE)
    records = _load_records(store, prompts, constitution, config)
    resumed = sum(len(r.steps) for r in records)
    if resumed:
        log.info("resuming: %d finished steps found in %s", resumed, run / STEPS_FILE)
    lm, critic_lm = _models(config, records, model, critic)
    used = list({id(m): m for m in (lm, critic_lm) if m is not None}.values())
    before = [(m.stats.generated_tokens, m.stats.seconds) for m in used]
    step_counts = _run_steps((lm, critic_lm), config, few_shot, records, store, show_progress)
    traces = [_trace(rec, config, few_shot) for rec in records]
    _write_outputs(run, traces, config)
    generated = sum(m.stats.generated_tokens - t for m, (t, _) in zip(used, before, strict=True))
    gen_seconds = sum(m.stats.seconds - sec for m, (_, sec) in zip(used, before, strict=True))
    degenerate = Counter(key.split(":")[0] for rec in records
                         for key, step_rec in rec.steps.items() if step_rec["degenerate"])
    summary = {
        "prompts": len(records),
        "revisions": config.revisions,
        "steps_computed": dict(step_counts),
        "steps_resumed": resumed,
        "generated_tokens": generated,
        "generation_seconds": round(gen_seconds, 2),
        "tokens_per_second": round(generated / gen_seconds, 1) if gen_seconds else None,
        "degenerate": {k: degenerate.get(k, 0) for k in ("answer", "critique", "revision")},
        "with_final_revision": sum(t["final"] is not None for t in traces),
        **step_quality(traces),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "model": lm.spec if lm else config.model,
    }
    if config.critic_model is not None:
        summary["critic_model"] = critic_lm.spec if critic_lm else config.critic_model
    atomic_write_text(run / SUMMARY_FILE, _json(summary))
    return ReviseResult(run.path, summary, traces)


def _models(config: ReviseConfig, records: Sequence[_Record], model: LanguageModel | None,
            critic: LanguageModel | None) -> tuple[LanguageModel | None, LanguageModel | None]:
    """(policy, critic): the given or loaded models, each None when nothing is left for it; the
    critic is the policy itself unless ``config.critic_model`` is set."""
    keys = _step_keys(config.revisions, config.critique)
    missing = {k.split(":")[0] for rec in records for k in keys if k not in rec.steps}
    if config.critic_model is None:
        lm = model or (load_model(config.model) if missing else None)
        return lm, lm
    lm = model or (load_model(config.model) if "answer" in missing else None)
    critic_lm = critic or (load_model(config.critic_model) if missing - {"answer"} else None)
    return lm, critic_lm


def _load_records(store: JsonlStore, prompts: Sequence[PromptRecord],
                  constitution: Constitution, config: ReviseConfig) -> list[_Record]:
    """One record per prompt, with its principles drawn and its finished steps read back."""
    key = stable_hash(config.pinned())
    records = []
    for p in prompts:
        rid = stable_hash(key, p.id)
        rec = _Record(rid, p, sample_principles(constitution, config.seed, p.id, config.revisions))
        for step in _step_keys(config.revisions, config.critique):
            done = store.get(f"{rid}:{step}")
            if done is not None:
                rec.steps[step] = done
        records.append(rec)
    return records


def _run_steps(models: tuple[LanguageModel | None, LanguageModel | None], config: ReviseConfig,
               few_shot: Sequence[Any], records: list[_Record], store: JsonlStore,
               show_progress: bool) -> Counter[str]:
    """Compute every missing step, a chunk of records at a time; the steps computed per kind.
    ``models``: (the policy, for the answers; the critic, for critiques and revisions)."""
    step_counts: Counter[str] = Counter()
    progress = Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err_console, disable=not show_progress,
                        transient=False)
    steps = _step_keys(config.revisions, config.critique)
    with progress:
        tasks = {step: progress.add_task(
            step.replace(":", " "), total=len(records),
            completed=sum(step in r.steps for r in records)) for step in steps}
        # a chunk of records goes through every step before the next chunk starts, so that the
        # backend still holds the keys and values of the chunk's previous step (see
        # models.engines.cascade: a critique's context extends its answer's)
        for start in range(0, len(records), config.chunk_size):
            group = records[start : start + config.chunk_size]
            for step in steps:
                chunk = [r for r in group if step not in r.steps]
                if not chunk:
                    continue
                lm = models[0] if step == "answer" else models[1]
                assert lm is not None  # loaded whenever a step of its own is still to compute
                finished = _run_step(lm, config, few_shot, chunk, step)
                store.append(finished)
                for rec, step_rec in zip(chunk, finished, strict=True):
                    rec.steps[step] = step_rec
                step_counts[step.split(":")[0]] += len(chunk)
                progress.advance(tasks[step], len(chunk))
    return step_counts


def _run_step(lm: LanguageModel, config: ReviseConfig, few_shot: Sequence[Any],
              chunk: list[_Record], step: str) -> list[dict[str, Any]]:
    kind, _, round_str = step.partition(":")
    r = int(round_str) if round_str else 0
    contexts = []
    for rec in chunk:
        conversation = rec.prompt.messages
        if kind == "answer":
            # in the review layout the demonstrations are the critic's: the policy answers the
            # red-team prompt as it is
            demos = [] if config.layout == "review" else few_shot
            contexts.append(build_context(config.prompt_format, demos, conversation,
                                          with_critique=config.critique))
            continue
        rounds = rec.rounds(r, kind, config.critique, config.history)
        answer = rec.current_answer(r, config.history)
        contexts.append(build_context(config.prompt_format, few_shot, conversation, answer,
                                      rounds, with_critique=config.critique,
                                      layout=config.layout))
    params = config.critique_params() if kind == "critique" else config.answer_params()
    outputs = lm.generate(contexts, params)
    finished = []
    if kind == "critique":  # the part of the critique its context already holds
        lead = critique_prefix(config.prompt_format, config.layout)
        outputs = [lead + raw for raw in outputs]
    for rec, raw in zip(chunk, outputs, strict=True):
        text = clean_revision(raw) if kind == "revision" else raw.strip()
        step_rec: dict[str, Any] = {
            "id": f"{rec.id}:{step}", "record": rec.id, "step": kind, "round": r,
            "text": text, "degenerate": degenerate_reason(text),
        }
        if kind != "answer":
            step_rec["principle"] = rec.principles[r - 1].id
        if text != raw:
            step_rec["raw"] = raw
        finished.append(step_rec)
    return finished


#: A revision that is a full refusal of at most this many words declines flatly (no
#: explanation, no redirection).
FLAT_REFUSAL_WORDS = 30


def step_quality(traces: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the critic did, by the refusal classifier (:mod:`constitutional.evaluate.refusals`):
    critiques that decline to critique or ask for the reply they were given, and final
    revisions that refuse (fully, partially, and flatly: a full refusal of at most
    :data:`FLAT_REFUSAL_WORDS` words)."""
    from constitutional.core.refusals import PARTIAL, REFUSAL, declines, string_label

    critiques = [r["critique"] for t in traces for r in t["rounds"] if r.get("critique")]
    finals = [t["final"] for t in traces if t.get("final")]
    labels = [string_label(text)[0] for text in finals]
    return {
        "critiques": len(critiques),
        "critiques_declining": sum(declines(c) for c in critiques),
        "critiques_asking_for_reply": sum(bool(_ASKS_FOR_REPLY.search(c)) for c in critiques),
        "final_revisions": len(finals),
        "revisions_full_refusal": labels.count(REFUSAL),
        "revisions_partial_refusal": labels.count(PARTIAL),
        "revisions_flat_refusal": sum(label == REFUSAL and len(text.split()) <= FLAT_REFUSAL_WORDS
                                      for label, text in zip(labels, finals, strict=True)),
    }


_ASKS_FOR_REPLY = re.compile(r"\b(?:please\s+)?(?:provide|share|give|show|send)\s+(?:me\s+)?"
                             r"(?:with\s+)?(?:the|your)\s+(?:assistant's\s+)?(?:most\s+recent\s+|"
                             r"last\s+|latest\s+)?(?:reply|response|message|conversation)\b",
                             re.IGNORECASE)


def _trace(rec: _Record, config: ReviseConfig, few_shot: Sequence[Any]) -> dict[str, Any]:
    rounds = []
    final = None
    for r in range(1, config.revisions + 1):
        p = rec.principles[r - 1]
        revision = rec.steps[f"revision:{r}"]
        rounds.append({
            "round": r,
            "principle": p.id,
            "critique_request": p.critique if config.critique else None,
            "critique": rec.text(f"critique:{r}") if config.critique else None,
            "revision_request": p.revision,
            "revision": revision["text"],
            "degenerate": revision["degenerate"],
        })
        if not revision["degenerate"]:
            final = revision["text"]
    answer = rec.steps["answer"]
    return {
        "id": rec.id,
        "prompt_id": rec.prompt.id,
        "prompt": rec.prompt.messages,
        "source": rec.prompt.source,
        "initial": answer["text"],
        "initial_degenerate": answer["degenerate"],
        "rounds": rounds,
        "final": final,
        "model": config.model,
        **({"critic_model": config.critic_model} if config.critic_model is not None else {}),
        "constitution": config.constitution,
        "few_shot": [ex.id for ex in few_shot],
        "sampling": config.answer_params().to_dict(),
        "seed": config.seed,
    }


def _write_outputs(run: RunDir, traces: list[dict[str, Any]], config: ReviseConfig) -> None:
    atomic_write_jsonl(run / TRACES_FILE, traces)
    atomic_write_jsonl(run / SFT_FILE, sft_rows(traces, config.sft_revisions))
    atomic_write_jsonl(run / PREFS_FILE, preference_rows(traces))


def sft_rows(traces: Sequence[dict[str, Any]], which: str = "final") -> list[dict[str, Any]]:
    """TRL conversational prompt/completion rows: the prompt and a revision (final, or all)."""
    rows = []
    for t in traces:
        if which == "all":
            texts = [r["revision"] for r in t["rounds"] if not r["degenerate"]]
        else:
            texts = [t["final"]] if t["final"] is not None else []
        for i, text in enumerate(texts):
            rows.append({"id": f"{t['id']}:{i}", "prompt": t["prompt"],
                         "completion": [{"role": "assistant", "content": text}]})
    return rows


def preference_rows(traces: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """prompt/chosen/rejected rows (final revision over initial answer) for TRL's DPOTrainer."""
    rows = []
    for t in traces:
        if t["final"] is None or t["initial_degenerate"] or t["final"] == t["initial"]:
            continue
        rows.append({"id": t["id"], "prompt": t["prompt"],
                     "chosen": [{"role": "assistant", "content": t["final"]}],
                     "rejected": [{"role": "assistant", "content": t["initial"]}]})
    return rows


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
