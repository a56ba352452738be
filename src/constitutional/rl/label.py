"""``cai rl label``: soft AI preference labels, as in the paper.

For each pair and each of ``K`` principles sampled for it (the paper's ensembling), and for each
order of the two responses (``both_orders``), the feedback model is asked (through
:mod:`constitutional.rl.feedback`, which the Elo judge uses too) the question built by
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

Label quality
-------------
Besides the position-bias rate, the summary (and :class:`LabelResult`) reports

* the **order agreement**: the share of pairs (scored in both orders) for which both orders
  prefer the same *response* — P(response_a) > 0.5 in both, or < 0.5 in both, each averaged over
  principles and before clamping. A labeller that reads the content agrees with itself near 1; a
  coin flip agrees half the time; a labeller that always picks one position agrees never. Outside
  exact ties, agreement and position bias add up to 1;
* the **mean |p_a − 0.5|** (``mean_abs_p_a_minus_half``): how far the soft labels lean, 0 for
  labels that are all 0.5 (a PM trained on them learns nothing), 0.5 for certain ones.

:func:`label_quality` computes the three from label records (it reads only their
``judgements``), for ``rl calibrate`` and the quality gates of ``cai run`` too.

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
``chosen`` is preferred, and ``p_a``) and ``label.summary.json`` (the mean p_a and the
label-quality figures above).

A label record: ``id``, ``pair_id``, ``prompt`` (messages), ``response_a``, ``response_b``,
``p_a``, ``principle_ids``, ``judgements`` (per principle and order: ``principle``, ``k``,
``order`` "ab" or "ba", ``logprob_A``, ``logprob_B``, ``p_A``, ``p_response_a``,
``p_response_a_clamped``, ``cot``), ``cot`` (the reasoning texts, or null), ``position_biased``,
``feedback_model``, ``constitution``, ``few_shot_ids``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from constitutional.constitution import Constitution, load_constitution
from constitutional.core.errors import UserError
from constitutional.core.io import (
    JsonlStore,
    RunDir,
    atomic_write_jsonl,
    atomic_write_text,
    jsonl_objects,
    stable_hash,
)
from constitutional.core.messages import coerce_messages
from constitutional.core.progress import chunks, progress
from constitutional.core.settings import Field, Settings
from constitutional.core.stats import mean_abs_from_half, share
from constitutional.models import BUILTIN_MODEL, LanguageModel, load_model
from constitutional.rl.feedback import (
    ORDERS,
    ChainOfThought,
    FeedbackScorer,
    Question,
    ensemble,
    few_shot_block,
    pair_principles,
)

log = logging.getLogger(__name__)

STAGE = "label"
RECORDS = "label.records.jsonl"
LABELS = "labels.jsonl"
PREFERENCES = "preferences.jsonl"
SUMMARY = "label.summary.json"
PAIRS = "pairs.jsonl"
DEFAULT_COT_CLAMP = (0.4, 0.6)

Clamp = tuple[float, float] | None


def parse_clamp(value: Any) -> Any:
    """A clamp as given on the command line or in YAML: "auto" (0.4–0.6 with chain of thought,
    none without), "none"/None (no clamping), or two numbers LO HI ("0.4 0.6", "0.4,0.6" or a
    list)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        if value.strip().lower() == "none":
            return None
        value = value.replace(",", " ").split()
        try:
            value = [float(v) for v in value]
        except ValueError:
            raise ValueError(f"expected --clamp LO HI or --clamp none, got "
                             f"{' '.join(value)!r}") from None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"expected --clamp LO HI or --clamp none, got {value!r}")
    lo, hi = (float(v) for v in value)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"must satisfy 0 <= LO <= HI <= 1, got {lo} {hi}")
    return [lo, hi]


class LabelSettings(Settings):
    """How ``rl label`` asks the feedback model (``label:`` in a run config)."""

    principles: int = Field(1, ge=1, description="K: average P(A) over K sampled principles.",
                            json_schema_extra={"cli": ["--principles", "-k"]})
    few_shot: int = Field(4, ge=0, description="Feedback demonstrations before each question.")
    both_orders: bool = Field(True, description="Also score the swapped order and average.",
                              json_schema_extra={"cli": ["--both-orders/--one-order"]})
    cot: bool = Field(False, description="Reason step by step before answering.")
    clamp: list[float] | Literal["auto"] | None = Field(
        "auto", description="Clamp each probability: `--clamp LO HI` or `--clamp none` "
                            "(default: 0.4 0.6 with --cot, none without).",
        json_schema_extra={"cli_type": str, "show_default": False})
    prompt_format: Literal["auto", "chat", "raw"] = Field(
        "auto", description="auto, chat (chat template) or raw (pretrained models).",
        json_schema_extra={"cli": ["--format"]})
    tags: str | None = Field(None, description="Only principles with any of these "
                                               "comma-separated tags.")
    chunk_size: int = Field(16, ge=1, description="Pairs scored and saved together.")
    cot_max_new_tokens: int = Field(192, ge=1, description="Reasoning tokens at most.")
    cot_temperature: float = Field(0.0, ge=0, description="Reasoning sampling temperature.")

    _parse_clamp = field_validator("clamp", mode="before")(classmethod(
        lambda cls, v: parse_clamp(v)))

    def resolved_clamp(self) -> Clamp:
        if self.clamp == "auto":
            return DEFAULT_COT_CLAMP if self.cot else None
        if self.clamp is None:
            return None
        lo, hi = self.clamp
        return (float(lo), float(hi))


class LabelConfig(LabelSettings):
    """Settings of ``rl label``; see the module docstring for what each does."""

    positional = ("feedback_model",)

    feedback_model: str = Field(BUILTIN_MODEL, description="The feedback model's spec (may "
                                                           "differ from the policy).")
    constitution: str = Field("default", description="A built-in name, a YAML file, or the "
                                                     "paper's files.")
    seed: int = Field(0, description="Seed for principle and demonstration sampling.")

    def pinned(self, constitution: Constitution) -> dict[str, Any]:
        """What a run directory is pinned to (chunk_size only changes the schedule)."""
        d = self.model_dump()
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
    order_agreement: float | None = None  # None: one order only
    mean_abs_p_a_minus_half: float | None = None


# ------------------------------------------------------------------------------------------------
# the maths (pure functions; P(A) and the mean are in constitutional.rl.feedback)


def clamp(p: float, bounds: Clamp) -> float:
    if bounds is None:
        return p
    lo, hi = bounds
    return min(max(p, lo), hi)


def is_position_biased(p_first_ab: float, p_first_ba: float) -> bool:
    """True when the same position wins in both orders (see the module docstring)."""
    return (p_first_ab - 0.5) * (p_first_ba - 0.5) > 0


def orders_agree(p_first_ab: float, p_first_ba: float) -> bool:
    """True when both orders prefer the same response: in order "ba" response_a is option (B),
    so its probability there is 1 − P(A) (see "Label quality" in the module docstring)."""
    return (p_first_ab - 0.5) * ((1.0 - p_first_ba) - 0.5) > 0


def order_means(judgements: Sequence[dict[str, Any]]) -> tuple[float, float] | None:
    """A record's P(A) per order, averaged over its principles and before clamping: ``(ab, ba)``,
    or None when it was scored in one order only."""
    by_order = {o: [j["p_A"] for j in judgements if j.get("order") == o] for o in ORDERS}
    if not all(by_order.values()):
        return None
    return ensemble(by_order["ab"]), ensemble(by_order["ba"])


def label_quality(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The label-quality figures of label records: ``pairs_both_orders``,
    ``position_bias_rate`` and ``order_agreement`` (None with one order), and
    ``mean_abs_p_a_minus_half`` (see "Label quality" in the module docstring)."""
    means = [order_means(r.get("judgements") or []) for r in records]
    both = [m for m in means if m is not None]
    return {
        "pairs_both_orders": len(both),
        "position_bias_rate": share(is_position_biased(*m) for m in both),
        "order_agreement": share(orders_agree(*m) for m in both),
        "mean_abs_p_a_minus_half": mean_abs_from_half(r["p_a"] for r in records),
    }


# ------------------------------------------------------------------------------------------------
# inputs


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
        messages = coerce_messages(row["prompt"], **where, field="prompt")
        pid = str(row.get("id") or stable_hash(messages, row["response_a"], row["response_b"]))
        pairs.setdefault(pid, {"id": pid, "prompt": messages, "response_a": row["response_a"],
                               "response_b": row["response_b"]})
    if not pairs:
        raise UserError("no pairs (the file has no rows)", file=path, line=1)
    return list(pairs.values())


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
        labeller = Labeller(lm, constitution, config)
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
    quality = label_quality(records)
    return LabelResult(
        out=run.path, pairs=len(records), labelled=len(pending),
        position_bias_rate=sum(biased) / len(biased) if biased else None,
        mean_p_a=sum(r["p_a"] for r in records) / len(records),
        seconds=time.perf_counter() - t0, stats=stats, records=records,
        order_agreement=quality["order_agreement"],
        mean_abs_p_a_minus_half=quality["mean_abs_p_a_minus_half"],
    )


class Labeller:
    """Builds the questions of a chunk, asks the feedback model, assembles the records."""

    def __init__(self, lm: LanguageModel, constitution: Constitution, config: LabelConfig):
        self.constitution, self.config = constitution, config
        self.scorer = FeedbackScorer(lm, config.prompt_format)
        self.mode = self.scorer.mode
        self.clamp = config.resolved_clamp()
        self.shots = [few_shot_block(constitution, config.few_shot, k, config.seed, config.cot)
                      for k in range(config.principles)]
        self.orders = ORDERS if config.both_orders else ORDERS[:1]
        self.cot = (ChainOfThought(config.cot_max_new_tokens, config.cot_temperature, config.seed)
                    if config.cot else None)

    def label_chunk(self, chunk: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        cfg = self.config
        principles = [pair_principles(self.constitution, pair["prompt"], cfg.principles, cfg.seed)
                      for _, pair in chunk]
        rows: list[Question] = []
        for k in range(cfg.principles):
            # one score call per member: every row in it starts with the same few-shot block
            member = []
            for i, (_, pair) in enumerate(chunk):
                member += self.scorer.questions(i, k, pair["prompt"], principles[i][k].text,
                                                pair["response_a"], pair["response_b"],
                                                self.orders)
            self.scorer.score(member, self.shots[k][0], cot=self.cot)
            rows += member
        return [self._record(rid, pair, principles[i], [r for r in rows if r.item == i])
                for i, (rid, pair) in enumerate(chunk)]

    def _record(self, rid: str, pair: dict[str, Any], principles: list[Any],
                rows: list[Question]) -> dict[str, Any]:
        judgements = []
        for r in rows:
            p_first, p_resp = r.p_first, r.p_response_a
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
    quality = label_quality(records)
    summary = {
        "pairs": len(records),
        "feedback_model": config.feedback_model,
        "mean_p_a": sum(r["p_a"] for r in records) / max(len(records), 1),
        "position_bias_rate": sum(biased) / len(biased) if biased else None,
        "position_bias_definition": "share of pairs whose principle-averaged, unclamped P(A) "
                                    "is on the same side of 0.5 in both orders",
        "order_agreement": quality["order_agreement"],
        "order_agreement_definition": "share of pairs for which both orders prefer the same "
                                      "response (principle-averaged, unclamped)",
        "mean_abs_p_a_minus_half": quality["mean_abs_p_a_minus_half"],
        "pairs_both_orders": quality["pairs_both_orders"],
        "seconds_this_call": seconds,
        "model_stats_this_call": stats,
    }
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
