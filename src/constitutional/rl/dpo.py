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

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from constitutional.errors import UserError
from constitutional.store import atomic_write_text, stable_hash

log = logging.getLogger(__name__)


@dataclass
class DPOStageConfig:
    labels: str  # a `cai rl label` run directory, or a prompt/chosen/rejected(/score) JSONL
    policy: str  # the SL-CAI model (spec or directory)
    out: str
    beta: float = 0.1
    label_smoothing: float | str = "auto"
    min_confidence: float = 0.55
    epochs: float = 1.0
    learning_rate: float | None = None  # default 5e-7 full, 5e-5 LoRA
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    eval_fraction: float = 0.1
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    save_steps: int = 50
    logging_steps: int = 5
    seed: int = 0
    resume: bool = False

    def validate(self) -> None:
        if self.beta <= 0:
            raise UserError("must be positive", field="beta")
        if not 0.5 <= self.min_confidence < 1:
            raise UserError("must be in [0.5, 1)", field="min_confidence")
        if self.label_smoothing != "auto" and not (
                isinstance(self.label_smoothing, int | float) and 0 <= self.label_smoothing < 0.5):
            raise UserError("must be 'auto' or a number in [0, 0.5)", field="label_smoothing")
        if not 0 <= self.eval_fraction < 1:
            raise UserError("must be in [0, 1)", field="eval_fraction")
        for name in ("batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise UserError("must be at least 1", field=name)


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
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from constitutional.sources import split_of
    from constitutional.training import LogCallback, eval_before, trainable_model_path, trainer_args

    config.validate()
    t0 = time.perf_counter()
    rows, smoothing = dpo_rows(config)
    train = [r for r in rows if split_of(stable_hash(r["id"]), config.eval_fraction) == "train"]
    held = [r for r in rows if split_of(stable_hash(r["id"]), config.eval_fraction) == "test"]
    if not train:
        raise UserError("no training pairs after the held-out split", field="eval_fraction")
    path = trainable_model_path(config.policy)
    out = Path(config.out)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    keep = ("prompt", "chosen", "rejected")
    train_ds = Dataset.from_list([{k: r[k] for k in keep} for r in train])
    eval_ds = Dataset.from_list([{k: r[k] for k in keep} for r in held]) if held else None
    checkpoints = out / "checkpoints"
    args = DPOConfig(
        beta=config.beta, label_smoothing=smoothing, max_length=config.max_length,
        **trainer_args(output_dir=str(checkpoints), epochs=config.epochs,
                       learning_rate=config.learning_rate or (5e-5 if config.lora else 5e-7),
                       batch_size=config.batch_size, grad_accum=config.grad_accum,
                       logging_steps=config.logging_steps, save_steps=config.save_steps,
                       seed=config.seed, evaluate="epoch" if eval_ds is not None else "no"))
    trainer = DPOTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogCallback())
    metrics: dict[str, Any] = {"label_smoothing": smoothing, "pairs": len(rows),
                               "train_pairs": len(train), "eval_pairs": len(held)}
    resume = config.resume and any(checkpoints.glob("checkpoint-*"))
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    if eval_ds is not None:
        before = eval_before(trainer)
        metrics["eval_margin_before"] = before.get("eval_rewards/margins")
        metrics["eval_accuracy_before"] = before.get("eval_rewards/accuracies")
    metrics["train_loss"] = result.training_loss
    metrics["steps"] = result.global_step
    metrics["train_log"] = [
        {k: v for k, v in e.items() if k in ("step", "loss", "rewards/margins",
                                             "rewards/accuracies", "eval_loss",
                                             "eval_rewards/margins")}
        for e in trainer.state.log_history if "loss" in e or "eval_loss" in e]
    if eval_ds is not None:
        after = trainer.evaluate()
        metrics["eval_margin"] = after.get("eval_rewards/margins")
        metrics["eval_accuracy"] = after.get("eval_rewards/accuracies")
    final = trainer.model
    if trainer.accelerator.is_main_process:
        if config.lora:
            final.save_pretrained(out / "adapter")
            final = final.merge_and_unload()
        final.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    for k, v in list(metrics.items()):
        if isinstance(v, float) and math.isfinite(v):
            metrics[k] = round(v, 4)
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 2)
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        atomic_write_text(out / "dpo.json", json.dumps(
            {"config": asdict(config), "metrics": metrics}, indent=2, default=str) + "\n")
    return DPOResult(out, metrics)
