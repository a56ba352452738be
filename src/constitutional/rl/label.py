"""``cai rl label``: soft AI preference labels, as in the paper.

For each pair and each of ``K`` principles sampled for it (the paper's ensembling), and for each
order of the two responses (``both_orders``), the feedback model sees the question built by
:mod:`constitutional.rl.prompts` — few-shot demonstrations first, then the conversation, the
principle, options (A) and (B) and the answer prefix ``The answer is: (`` — and we read the
log-probabilities ``a`` and ``b`` of the next tokens ``A`` and ``B``. Both are single tokens, so
the backend reads them from **one forward pass** per (pair, principle, order).

* P(first option) = exp(a) / (exp(a) + exp(b)); in the swapped order response_a is option (B), so
  its probability there is 1 − P(A).
* With ``cot`` the model first continues "Let's think step by step:" (batched generation); the
  letters are then read after its reasoning and "So the answer is: (". Each such probability is
  clamped to ``clamp`` (default [0.4, 0.6]) because chain-of-thought answers are overconfident.
* **p_a**, the soft label, is the mean over principles and orders of the (clamped) probability
  that response_a is preferred. Labels come only from log-probabilities; no text is parsed.

Position bias
-------------
With both orders, a pair is **position-biased** when the feedback model prefers the same
*position* in both orders — P(A) > 0.5 in the original order and P(A) > 0.5 in the swapped one (or
both < 0.5), each P(A) averaged over the pair's principles and before clamping — so its decision
follows the position, not the content. The position-bias rate is the share of such pairs (the
quantity Lee et al.'s RLAIF study reports; up to 56% for small labelers). A pair scoring exactly
0.5 in either order is not counted as biased.

Prefix reuse
------------
The few-shot block is sampled once per ensemble member ``k`` (which demonstrations, in which
order, each with its own sampled principle, seeded by ``seed`` and ``k``) and is the same for
every pair, and all rows of member ``k`` in a chunk go to the backend in one ``score`` call, so a
backend that shares a common prefix across a batch computes the demonstrations once per batch.
The per-pair principle comes after the demonstrations. A pair's principles are seeded by its
conversation, so a pair and its swap get the same principles.

Files in the run directory: ``label.config.json`` (pinned settings), ``label.records.jsonl``
(finished labels, appended a chunk at a time), and, written atomically at the end in pair order,
``labels.jsonl`` (one record per pair, below), ``preferences.jsonl`` (``prompt``/``chosen``/
``rejected`` in TRL's conversational format, with ``score`` = the soft probability that
``chosen`` is preferred, and ``p_a``) and ``label.summary.json``.

A label record: ``id``, ``pair_id``, ``prompt`` (messages), ``response_a``, ``response_b``,
``p_a``, ``principle_ids``, ``judgements`` (per principle and order: ``principle``, ``k``,
``order`` "ab" or "ba", ``logprob_A``, ``logprob_B``, ``p_A``, ``p_response_a``,
``p_response_a_clamped``, ``cot``), ``cot`` (the reasoning texts, or null), ``position_biased``,
``feedback_model``, ``constitution``, ``few_shot_ids``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from constitutional._files import jsonl_objects
from constitutional.constitution import Constitution, load_constitution
from constitutional.errors import UserError
from constitutional.models import LanguageModel, SamplingParams, load_model
from constitutional.models.base import ROLES, Prompt
from constitutional.rl import chunks, progress
from constitutional.rl import prompts as P
from constitutional.store import (
    JsonlStore,
    RunDir,
    atomic_write_jsonl,
    atomic_write_text,
    stable_hash,
)

log = logging.getLogger(__name__)

STAGE = "label"
RECORDS = "label.records.jsonl"
LABELS = "labels.jsonl"
PREFERENCES = "preferences.jsonl"
SUMMARY = "label.summary.json"
PAIRS = "pairs.jsonl"
ORDERS = ("ab", "ba")
DEFAULT_COT_CLAMP = (0.4, 0.6)

Clamp = tuple[float, float] | None


@dataclass(frozen=True)
class LabelConfig:
    """Settings of ``rl label``; see the module docstring for what each does."""

    feedback_model: str
    constitution: str = "default"
    principles: int = 1  # K, the ensemble size
    few_shot: int = 4  # demonstrations before each question
    both_orders: bool = True
    cot: bool = False
    # "auto": [0.4, 0.6] with cot, none without; or (lo, hi); or None for no clamping
    clamp: Clamp | Literal["auto"] = "auto"
    prompt_format: str = "auto"  # auto (chat if the model has a chat template), chat, raw
    tags: str | None = None  # keep only feedback principles with any of these tags
    seed: int = 0
    chunk_size: int = 16  # pairs scored (and written) together
    cot_max_new_tokens: int = 192
    cot_temperature: float = 0.0

    def resolved_clamp(self) -> Clamp:
        if self.clamp == "auto":
            return DEFAULT_COT_CLAMP if self.cot else None
        if self.clamp is None:
            return None
        lo, hi = self.clamp
        return (float(lo), float(hi))

    def validate(self) -> None:
        def bad(name: str, want: str) -> UserError:
            return UserError(f"must be {want}, got {getattr(self, name)!r}", field=name)

        if self.principles < 1:
            raise bad("principles", "at least 1")
        if self.few_shot < 0:
            raise bad("few_shot", "at least 0")
        if self.chunk_size < 1:
            raise bad("chunk_size", "at least 1")
        if self.prompt_format not in ("auto", *P.MODES):
            raise bad("prompt_format", "auto, chat or raw")
        clamp = self.resolved_clamp()
        if clamp is not None:
            lo, hi = clamp
            if not (0.0 <= lo <= hi <= 1.0):
                raise UserError(f"must satisfy 0 <= LO <= HI <= 1, got {lo} {hi}", field="clamp")
        if self.cot:
            SamplingParams(temperature=self.cot_temperature, max_new_tokens=self.cot_max_new_tokens)

    def pinned(self, constitution: Constitution) -> dict[str, Any]:
        """What a run directory is pinned to (chunk_size only changes the schedule)."""
        d = asdict(self)
        d.pop("chunk_size")
        # as given ("auto" follows cot), so that turning --cot on reports cot as the change
        d["clamp"] = self.clamp if self.clamp in ("auto", None) else list(self.clamp)
        d["constitution_hash"] = stable_hash(constitution.to_dict())
        return d


@dataclass
class LabelResult:
    out: Path
    pairs: int
    labelled: int  # labelled in this call (the rest were already done)
    position_bias_rate: float | None
    mean_p_a: float
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# the maths (pure functions)


def option_probability(logprob_a: float, logprob_b: float) -> float:
    """P(A) = exp(a) / (exp(a) + exp(b)), computed stably (0.5 when both are -inf)."""
    if logprob_a == logprob_b:
        return 0.5
    m = max(logprob_a, logprob_b)
    ea, eb = math.exp(logprob_a - m), math.exp(logprob_b - m)
    return ea / (ea + eb)


def prob_response_a(p_first: float, order: str) -> float:
    """The probability that response_a is preferred, from P(option A) in ``order``."""
    return p_first if order == "ab" else 1.0 - p_first


def clamp(p: float, bounds: Clamp) -> float:
    if bounds is None:
        return p
    lo, hi = bounds
    return min(max(p, lo), hi)


def ensemble(probabilities: Sequence[float]) -> float:
    """The soft label: the mean of the per-principle, per-order probabilities."""
    if not probabilities:
        raise ValueError("nothing to average")
    return sum(probabilities) / len(probabilities)


def is_position_biased(p_first_ab: float, p_first_ba: float) -> bool:
    """True when the same position wins in both orders (see the module docstring)."""
    return (p_first_ab - 0.5) * (p_first_ba - 0.5) > 0


# ------------------------------------------------------------------------------------------------
# inputs


def _messages(value: Any, where: dict[str, Any]) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise UserError("is empty", **where, field="prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise UserError("expected a string or a list of {role, content} messages", **where,
                        field="prompt")
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(
                m.get("content"), str):
            raise UserError("each message needs a role (system/user/assistant) and content",
                            **where, field="prompt")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_pairs(spec: str | Path) -> list[dict[str, Any]]:
    """Pairs from a run directory (its ``pairs.jsonl``) or a JSONL file with ``prompt`` (text or
    messages), ``response_a`` and ``response_b`` (and optionally ``id``)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / PAIRS).is_file():
            raise UserError(f"no {PAIRS} here; run `cai rl sample --out {path}` first", file=path)
        path = path / PAIRS
    pairs: dict[str, dict[str, Any]] = {}
    for number, row in jsonl_objects(path, required=("prompt", "response_a", "response_b")):
        where: dict[str, Any] = {"file": path, "line": number}
        for key in ("response_a", "response_b"):
            if not isinstance(row[key], str):
                raise UserError(f"expected text, got {type(row[key]).__name__}", **where,
                                field=key)
        messages = _messages(row["prompt"], where)
        pid = str(row.get("id") or stable_hash(messages, row["response_a"], row["response_b"]))
        pairs.setdefault(pid, {"id": pid, "prompt": messages, "response_a": row["response_a"],
                               "response_b": row["response_b"]})
    if not pairs:
        raise UserError("no pairs (the file has no rows)", file=path, line=1)
    return list(pairs.values())


# ------------------------------------------------------------------------------------------------
# prompts for one ensemble member


def special_tokens(lm: LanguageModel) -> list[str]:
    """The model's special-token strings, to be quoted inside untrusted text."""
    tok = getattr(lm, "tokenizer", None)
    if tok is None:
        return []
    found = set(getattr(tok, "all_special_tokens", []) or [])
    found |= {str(t) for t in (getattr(tok, "added_tokens_decoder", {}) or {}).values()}
    return sorted(t for t in found if len(t) > 1)


def resolve_format(lm: LanguageModel, prompt_format: str) -> str:
    if prompt_format != "auto":
        return prompt_format
    tok = getattr(lm, "tokenizer", None)
    return "chat" if tok is None or getattr(tok, "chat_template", None) else "raw"


def few_shot_block(constitution: Constitution, n: int, k: int, seed: int,
                   cot: bool) -> tuple[list[P.Shot], list[str]]:
    """Member ``k``'s demonstrations: ``n`` drawn (seeded) from the constitution, each with its
    own sampled principle. The same for every pair, so their prefix can be shared."""
    if n == 0:
        return [], []
    examples = constitution.cot_examples if cot else constitution.feedback_examples
    if n > len(examples):
        what = "chain-of-thought" if cot else "feedback"
        raise UserError(f"asked for {n} demonstrations but constitution {constitution.name!r} "
                        f"has {len(examples)} {what} demonstrations", field="few_shot")
    rng = random.Random(stable_hash("few-shot", seed, k, cot))
    chosen = rng.sample(examples, n)
    shots, ids = [], []
    for example in chosen:
        principle = constitution.sample_feedback(rng, 1)[0]
        reasoning = getattr(example, "reasoning", None) if cot else None
        shots.append(P.shot(example.messages, principle.text, example.options[:2],
                            example.answer, reasoning))
        ids.append(f"{example.id}:{principle.id}")
    return shots, ids


def pair_principles(constitution: Constitution, messages: list[dict[str, str]], k: int,
                    seed: int) -> list[Any]:
    """The ``k`` principles of a pair, seeded by its conversation (so its swap gets the same)."""
    rng = random.Random(stable_hash("principles", seed, messages))
    return constitution.sample_feedback(rng, k)


@dataclass
class _Row:
    pair: int  # index in the chunk
    k: int
    order: str
    question: str
    cot: str | None = None
    logprobs: tuple[float, float] = (0.0, 0.0)


# ------------------------------------------------------------------------------------------------
# the stage


def resolve_constitution(config: LabelConfig,
                         constitution: Constitution | None = None) -> Constitution:
    """The constitution a run uses (loaded, filtered by tags), checked against the settings."""
    constitution = constitution or load_constitution(config.constitution)
    if config.tags:
        constitution = constitution.filter(tags=config.tags)
    if not constitution.feedback:
        raise UserError(f"constitution {constitution.name!r} has no feedback principles",
                        field="constitution")
    if config.principles > len([p for p in constitution.feedback if p.weight > 0]):
        raise UserError(f"cannot draw {config.principles} distinct principles from "
                        f"{len(constitution.feedback)}", field="principles")
    few_shot_block(constitution, config.few_shot, 0, config.seed, config.cot)  # validates N
    return constitution


def label(
    pairs: Sequence[dict[str, Any]],
    config: LabelConfig,
    out: str | Path,
    *,
    model: LanguageModel | None = None,
    constitution: Constitution | None = None,
) -> LabelResult:
    """Label every pair with a soft preference p_a and write the outputs to ``out``; resumable."""
    config.validate()
    if not pairs:
        raise UserError("no pairs to label")
    constitution = resolve_constitution(config, constitution)
    run = RunDir(out)
    pinned = config.pinned(constitution)
    run.pin_config(STAGE, pinned)
    store = JsonlStore(run / RECORDS)
    ids = [stable_hash("rl-label", p["id"], pinned) for p in pairs]
    pending: dict[str, dict[str, Any]] = {}
    for rid, pair in zip(ids, pairs, strict=True):
        if rid not in store:
            pending.setdefault(rid, pair)
    t0 = time.perf_counter()
    stats: dict[str, Any] = {}
    if pending:
        log.info("rl label: %d of %d pairs to label (%d done) with %s, K=%d, %s, %s",
                 len(pending), len(pairs), len(pairs) - len(pending), config.feedback_model,
                 config.principles, "both orders" if config.both_orders else "one order",
                 "chain of thought" if config.cot else "direct answer")
        lm = model or load_model(config.feedback_model)
        before = lm.stats.to_dict()
        labeller = _Labeller(lm, constitution, config)
        todo = list(pending.items())
        with progress("labelling pairs", len(todo)) as advance:
            for chunk in chunks(todo, config.chunk_size):
                store.append(labeller.label_chunk(chunk))
                advance(len(chunk))
        stats = {k: v - before[k] for k, v in lm.stats.to_dict().items()
                 if isinstance(v, int | float) and isinstance(before.get(k), int | float)}
        if model is None:
            lm.close()
    records = [store.get(i) for i in dict.fromkeys(ids)]
    records = [r for r in records if r is not None]
    write_outputs(run.path, records, config, time.perf_counter() - t0, stats)
    biased = [r["position_biased"] for r in records if r["position_biased"] is not None]
    return LabelResult(
        out=run.path, pairs=len(records), labelled=len(pending),
        position_bias_rate=sum(biased) / len(biased) if biased else None,
        mean_p_a=sum(r["p_a"] for r in records) / len(records),
        seconds=time.perf_counter() - t0, stats=stats, records=records,
    )


class _Labeller:
    """Builds the questions of a chunk, runs the model, assembles the records."""

    def __init__(self, lm: LanguageModel, constitution: Constitution, config: LabelConfig):
        self.lm, self.constitution, self.config = lm, constitution, config
        self.mode = resolve_format(lm, config.prompt_format)
        self.special = special_tokens(lm)
        self.clamp = config.resolved_clamp()
        self.shots = [few_shot_block(constitution, config.few_shot, k, config.seed, config.cot)
                      for k in range(config.principles)]
        self.orders = ORDERS if config.both_orders else ORDERS[:1]

    def label_chunk(self, chunk: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        cfg = self.config
        principles = [pair_principles(self.constitution, pair["prompt"], cfg.principles, cfg.seed)
                      for _, pair in chunk]
        rows: list[_Row] = []
        for k in range(cfg.principles):
            # one score call per member: every row in it starts with the same few-shot block
            member = []
            for i, (_, pair) in enumerate(chunk):
                for order in self.orders:
                    a, b = pair["response_a"], pair["response_b"]
                    options = (a, b) if order == "ab" else (b, a)
                    q = P.question(pair["prompt"], principles[i][k].text, options, self.special)
                    member.append(_Row(i, k, order, q))
            self._score(member, self.shots[k][0])
            rows += member
        return [self._record(rid, pair, principles[i], [r for r in rows if r.pair == i])
                for i, (rid, pair) in enumerate(chunk)]

    def _score(self, rows: list[_Row], shots: list[P.Shot]) -> None:
        contexts: list[Prompt]
        if self.config.cot:
            params = SamplingParams(temperature=self.config.cot_temperature,
                                    max_new_tokens=self.config.cot_max_new_tokens,
                                    stop=P.COT_STOP, seed=self.config.seed)
            reasoning = self.lm.generate([P.cot_prompt(shots, r.question, self.mode)
                                          for r in rows], params)
            for r, text in zip(rows, reasoning, strict=True):
                r.cot = P.clean_reasoning(text, self.special)
            contexts = [P.cot_answer_prompt(shots, r.question, r.cot or "", self.mode)
                        for r in rows]
        else:
            contexts = [P.answer_prompt(shots, r.question, self.mode) for r in rows]
        for r, (a, b) in zip(rows, self.lm.score(contexts, list(P.LETTERS)), strict=True):
            r.logprobs = (a, b)

    def _record(self, rid: str, pair: dict[str, Any], principles: list[Any],
                rows: list[_Row]) -> dict[str, Any]:
        judgements = []
        for r in rows:
            p_first = option_probability(*r.logprobs)
            p_resp = prob_response_a(p_first, r.order)
            judgements.append({
                "principle": principles[r.k].id, "k": r.k, "order": r.order,
                "logprob_A": r.logprobs[0], "logprob_B": r.logprobs[1], "p_A": p_first,
                "p_response_a": p_resp, "p_response_a_clamped": clamp(p_resp, self.clamp),
                "cot": r.cot,
            })
        biased = None
        if self.config.both_orders:
            by_order = {o: [j["p_A"] for j in judgements if j["order"] == o] for o in ORDERS}
            biased = is_position_biased(ensemble(by_order["ab"]), ensemble(by_order["ba"]))
        return {
            "id": rid, "pair_id": pair["id"], "prompt": pair["prompt"],
            "response_a": pair["response_a"], "response_b": pair["response_b"],
            "p_a": ensemble([j["p_response_a_clamped"] for j in judgements]),
            "principle_ids": [p.id for p in principles],
            "judgements": judgements,
            "cot": [j["cot"] for j in judgements] if self.config.cot else None,
            "position_biased": biased,
            "feedback_model": self.config.feedback_model,
            "constitution": self.constitution.name,
            "few_shot_ids": [ids for _, ids in self.shots],
            "prompt_format": self.mode,
        }


def preference_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``prompt``/``chosen``/``rejected`` in TRL's conversational format; ``score`` is the soft
    probability that ``chosen`` is preferred (>= 0.5); ties (p_a == 0.5) keep response_a."""
    rows = []
    for r in records:
        a_wins = r["p_a"] >= 0.5
        chosen, rejected = ((r["response_a"], r["response_b"]) if a_wins
                            else (r["response_b"], r["response_a"]))
        rows.append({
            "id": r["id"], "prompt": r["prompt"],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "score": r["p_a"] if a_wins else 1.0 - r["p_a"], "p_a": r["p_a"],
        })
    return rows


def write_outputs(out: Path, records: Sequence[dict[str, Any]], config: LabelConfig,
                  seconds: float, stats: dict[str, Any]) -> None:
    atomic_write_jsonl(out / LABELS, records)
    atomic_write_jsonl(out / PREFERENCES, preference_rows(records))
    biased = [r["position_biased"] for r in records if r["position_biased"] is not None]
    summary = {
        "pairs": len(records),
        "feedback_model": config.feedback_model,
        "mean_p_a": sum(r["p_a"] for r in records) / max(len(records), 1),
        "position_bias_rate": sum(biased) / len(biased) if biased else None,
        "position_bias_definition": "share of pairs whose principle-averaged, unclamped P(A) "
                                    "is on the same side of 0.5 in both orders",
        "seconds_this_call": seconds,
        "model_stats_this_call": stats,
    }
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
