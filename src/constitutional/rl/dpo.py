"""``cai rl train --algo dpo``: offline DPO on the AI-labelled pairs, through TRL's DPOTrainer.

This is the lighter path of Hugging Face's CAI recipe: no PM, no sampling during training.

Soft labels
-----------
TRL's DPO loss has no per-example label or weight, but it has *label smoothing* (conservative
DPO): ``L = −(1 − ε)·log σ(βh) − ε·log σ(−βh)``. With a per-example ``ε = 1 − p`` that would be
exactly the soft-label loss. TRL takes one ε for the whole run, so we:

1. orient each pair by its label (``chosen`` = the answer with p ≥ 0.5) — the threshold;
2. drop near-ties, pairs with ``p < min_confidence`` (default 0.55: a coin-flip label teaches
   nothing and only adds noise);
3. set ``label_smoothing = 1 − mean(p)`` over the kept pairs (``label_smoothing="auto"``), i.e.
   the label noise the soft labels themselves report, so a labeller that is only 70% sure on
   average gets cDPO with ε = 0.3. A number overrides it; 0 gives plain DPO on hard labels.

The reference model is the starting policy (TRL makes the frozen copy; with LoRA it disables the
adapters). Checkpoints go to ``OUT/checkpoints``; ``resume`` continues from the newest one. The
output is a plain model directory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from constitutional.core import layout
from constitutional.core.errors import UserError
from constitutional.core.io import stable_hash
from constitutional.core.settings import Field
from constitutional.models import BUILTIN_MODEL
from constitutional.train import BatchSize, LoraTrainSettings, TrainRun

log = logging.getLogger(__name__)


class DPOSettings(LoraTrainSettings):
    """``dpo:``: offline DPO on the AI-labelled pairs (see the module docstring)."""

    beta: float = Field(0.1, gt=0, description="β: how strongly the policy is held to the "
                                                "reference (DPO's implicit KL penalty).")
    label_smoothing: float | Literal["auto"] = Field(
        "auto", description="'auto' (1 − the mean label of the kept pairs) or a number in "
                            "[0, 0.5); 0 is plain DPO on hard labels.",
        json_schema_extra={"cli_type": str})
    min_confidence: float = Field(0.55, ge=0.5, lt=1, description="Drop pairs labelled below "
                                                                  "this.")
    learning_rate: float | None = Field(None, gt=0, description="Peak learning rate (default "
                                                                "5e-7, or 5e-5 with LoRA).")
    batch_size: BatchSize = 4

    @field_validator("label_smoothing", mode="before")
    @classmethod
    def _auto_or_number(cls, value: Any) -> Any:
        number = value
        if isinstance(value, str) and value != "auto":
            try:
                number = float(value)
            except ValueError:
                number = None
        if value != "auto" and (isinstance(number, bool) or not isinstance(number, int | float)
                                or not 0 <= number < 0.5):
            raise ValueError(f"must be 'auto' or a number in [0, 0.5), got {value!r}")
        return value if value == "auto" else float(number)


class DPOStageConfig(TrainRun, DPOSettings):
    """Settings of ``cai rl dpo``: the tunable ones, and the run's inputs and output."""

    labels: str = Field(description="A `cai rl label` run directory, or a JSONL of "
                                    "prompt/chosen/rejected rows (+ score = P(chosen)).")
    policy: str = Field(BUILTIN_MODEL, description="The SL-CAI policy (directory or spec).")
    out: str = Field(description="Run directory (the trained policy and its checkpoints).",
                     json_schema_extra={"cli": ["--out"]})


@dataclass
class DPOResult:
    out_dir: Path
    metrics: dict[str, Any]


def dpo_rows(config: DPOStageConfig) -> tuple[list[dict[str, Any]], float]:
    """The kept pairs in TRL's conversational format, and the label smoothing to use."""
    from constitutional.rl.preference import load_comparisons

    comps = load_comparisons(config.labels)
    kept = [c for c in comps if c.p >= config.min_confidence]
    if not kept:
        raise UserError(f"no pair has a label of at least {config.min_confidence} "
                        f"({len(comps)} pairs)", field="min_confidence")
    smoothing = (1 - sum(c.p for c in kept) / len(kept) if config.label_smoothing == "auto"
                 else float(config.label_smoothing))
    rows = [{"id": c.id, "prompt": c.prompt,
             "chosen": [{"role": "assistant", "content": c.chosen}],
             "rejected": [{"role": "assistant", "content": c.rejected}]} for c in kept]
    log.info("DPO: %d of %d pairs kept (p >= %.2f), label smoothing %.3f", len(kept), len(comps),
             config.min_confidence, smoothing)
    return rows, min(max(smoothing, 0.0), 0.49)


def dpo_train(config: DPOStageConfig) -> DPOResult:
    """DPO of ``config.policy`` on the kept pairs; save the policy to ``config.out``."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from constitutional.prompts.sources import split_of
    from constitutional.train import TrainJob, causal_lm, process_state, run_trainer, write_report

    t0 = time.perf_counter()
    config.check_machine()  # a model setting this machine cannot honour stops here, at once
    rows, smoothing = dpo_rows(config)
    train = [r for r in rows if split_of(stable_hash(r["id"]), config.eval_fraction) == "train"]
    held = [r for r in rows if split_of(stable_hash(r["id"]), config.eval_fraction) == "test"]
    if not train:
        raise UserError("no training pairs after the held-out split", field="eval_fraction")
    out = Path(config.out)

    def datasets(tokenizer: Any) -> tuple[Any, Any]:
        keep = ("prompt", "chosen", "rejected")
        return (Dataset.from_list([{k: r[k] for k in keep} for r in train]),
                Dataset.from_list([{k: r[k] for k in keep} for r in held]) if held else None)

    trained = run_trainer(config, TrainJob(
        model=config.policy, out=out, trainer_class=DPOTrainer, args_class=DPOConfig,
        args={"beta": config.beta, "label_smoothing": smoothing,
              "max_length": config.max_length},
        learning_rate=config.learning_rate or (5e-5 if config.lora else 5e-7),
        datasets=datasets, load_model=causal_lm, evaluate="epoch" if held else "no",
        before={"eval_margin_before": "eval_rewards/margins",
                "eval_accuracy_before": "eval_rewards/accuracies"},
        after={"eval_margin": "eval_rewards/margins",
               "eval_accuracy": "eval_rewards/accuracies"},
        log_keys=("step", "loss", "rewards/margins", "rewards/accuracies", "eval_loss",
                  "eval_rewards/margins")))
    metrics = {"label_smoothing": round(smoothing, 4), "pairs": len(rows),
               "train_pairs": len(train), "eval_pairs": len(held), **trained,
               "wall_seconds": round(time.perf_counter() - t0, 2)}
    if process_state(config.device).is_main_process:
        write_report(out / Path(layout.DPO_METRICS).name, config, metrics)
    return DPOResult(out, metrics)
