"""SL-CAI finetuning: supervised learning on the revisions, mixed with helpful samples.

Built on TRL's ``SFTTrainer``. The data are conversational ``prompt``/``completion`` rows, so the
loss is on the assistant's completion only (TRL's completion-only loss). As in the paper, the
revisions are mixed with *helpful samples*: the helpful model's own answers to benign prompts
(``--helpful builtin:helpful``), at ``helpful_ratio`` of the final mix. Those answers are generated
once and kept (resumable) in the run directory.

LoRA via PEFT is an option (``lora=True``); the adapters are merged at the end, so the output is
always a plain model directory that ``from_pretrained`` and ``cai generate -m DIR`` load.
Checkpoints go to ``OUT/checkpoints``; ``resume=True`` continues from the newest one.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from constitutional.errors import UserError
from constitutional.models import SamplingParams, load_model, parse_spec
from constitutional.sources import load_prompts, split_of
from constitutional.store import JsonlStore, RunDir, atomic_write_text, stable_hash

log = logging.getLogger(__name__)

HELPFUL_FILE = "sl_train.helpful.jsonl"


@dataclass
class SLTrainConfig:
    data: str  # a `cai sl revise` run directory, or a JSONL of prompt/completion rows
    model: str  # the model to finetune (spec)
    out: str | None = None  # default: DATA/model
    helpful: str | None = None  # benign prompts (spec) whose answers are mixed in
    helpful_ratio: float = 0.25  # share of helpful samples in the final mix
    helpful_model: str | None = None  # who answers them; default: the model being trained
    helpful_max_new_tokens: int = 192
    epochs: float = 2.0
    learning_rate: float | None = None  # default 2e-5 full, 2e-4 LoRA
    batch_size: int = 8
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
        if not 0 <= self.helpful_ratio < 1:
            raise UserError("must be in [0, 1)", field="helpful_ratio")
        if not 0 <= self.eval_fraction < 1:
            raise UserError("must be in [0, 1)", field="eval_fraction")
        for name in ("batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise UserError("must be at least 1", field=name)
        if self.epochs <= 0:
            raise UserError("must be positive", field="epochs")

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        data = Path(self.data)
        return (data if data.is_dir() else data.parent) / "model"


@dataclass
class SLTrainResult:
    out_dir: Path
    metrics: dict[str, Any]


def load_sft_rows(data: str) -> list[dict[str, Any]]:
    """Rows from a revise run directory or a JSONL file (prompt/completion or messages rows)."""
    path = Path(data)
    file = path / "revise.sft.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise UserError("not found (expected a `cai sl revise` run directory or a JSONL file)",
                        file=file)
    rows = []
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"invalid JSON ({err.msg})", file=file, line=n) from err
            if "messages" in row and "prompt" not in row:
                msgs = row["messages"]
                if not msgs or msgs[-1].get("role") != "assistant":
                    raise UserError("last message must be from the assistant", file=file, line=n,
                                    field="messages")
                row = {"prompt": msgs[:-1], "completion": msgs[-1:]}
            for key in ("prompt", "completion"):
                if key not in row:
                    raise UserError("missing", file=file, line=n, field=key)
            rows.append({"id": row.get("id") or stable_hash(row["prompt"], row["completion"]),
                         "prompt": row["prompt"], "completion": row["completion"]})
    if not rows:
        raise UserError("no training rows (did every revision come out degenerate?)", file=file,
                        line=1)
    return rows


def helpful_samples(config: SLTrainConfig, n: int, run: RunDir) -> list[dict[str, Any]]:
    """The helpful model's own answers to ``n`` benign prompts (generated once, kept)."""
    if n <= 0 or not config.helpful:
        return []
    spec = config.helpful_model or config.model
    params = SamplingParams(temperature=0.7, top_p=0.95, seed=config.seed,
                            max_new_tokens=config.helpful_max_new_tokens)
    prompts = load_prompts(config.helpful, limit=n, seed=config.seed, split="train")
    store = JsonlStore(run / HELPFUL_FILE)
    ids = {p.id: stable_hash(spec, p.id, params.to_dict()) for p in prompts}
    todo = [p for p in prompts if ids[p.id] not in store]
    if todo:
        log.info("answering %d helpful prompts with %s", len(todo), spec)
        lm = load_model(spec)
        for start in range(0, len(todo), 64):
            chunk = todo[start : start + 64]
            answers = lm.generate([p.messages for p in chunk], params)
            store.append({"id": ids[p.id], "prompt": p.messages,
                          "completion": [{"role": "assistant", "content": a.strip()}]}
                         for p, a in zip(chunk, answers, strict=True) if a.strip())
    return [store.get(ids[p.id]) for p in prompts if ids[p.id] in store]


def _model_path(spec: str) -> str:
    parsed = parse_spec(spec)
    if parsed.backend != "hf":
        raise UserError(f"cannot finetune {spec!r}: training needs a local or hub model",
                        field="model")
    if parsed.builtin:
        from constitutional.models.builtin import ensure_checkpoint

        return str(ensure_checkpoint(parsed.builtin))
    return parsed.target


def sl_train(config: SLTrainConfig) -> SLTrainResult:
    """Finetune ``config.model`` on the revisions (+ helpful samples); save to ``out_dir``."""
    config.validate()
    t0 = time.perf_counter()
    revisions = load_sft_rows(config.data)
    data_dir = Path(config.data) if Path(config.data).is_dir() else Path(config.data).parent
    run = RunDir(data_dir)
    r = config.helpful_ratio
    n_helpful = round(len(revisions) * r / (1 - r)) if config.helpful else 0
    helpful = helpful_samples(config, n_helpful, run)
    rows = [dict(row, kind="revision") for row in revisions] + [
        dict(row, kind="helpful") for row in helpful]
    random.Random(config.seed).shuffle(rows)
    train_rows, eval_rows = rows, []
    if config.eval_fraction:
        train_rows = [x for x in rows if split_of(x["id"], config.eval_fraction) == "train"]
        eval_rows = [x for x in rows if split_of(x["id"], config.eval_fraction) == "test"]
    if not train_rows:
        raise UserError("no training rows after the eval split", field="eval_fraction")
    log.info("training on %d rows (%d revisions, %d helpful), evaluating on %d", len(train_rows),
             sum(x["kind"] == "revision" for x in train_rows),
             sum(x["kind"] == "helpful" for x in train_rows), len(eval_rows))
    metrics = _train(config, train_rows, eval_rows)
    metrics.update({
        "revision_rows": len(revisions), "helpful_rows": len(helpful),
        "train_rows": len(train_rows), "eval_rows": len(eval_rows),
        "wall_seconds": round(time.perf_counter() - t0, 2),
    })
    atomic_write_text(config.out_dir / "sl_train.json",
                      json.dumps({"config": asdict(config), "metrics": metrics}, indent=2,
                                 default=str) + "\n")
    return SLTrainResult(config.out_dir, metrics)


def _train(config: SLTrainConfig, train_rows: list[dict[str, Any]],
           eval_rows: list[dict[str, Any]]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from constitutional.training import LogCallback

    path = _model_path(config.model)
    out = config.out_dir
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    lr = config.learning_rate or (2e-4 if config.lora else 2e-5)
    keep = ("prompt", "completion")
    train_ds = Dataset.from_list([{k: x[k] for k in keep} for x in train_rows])
    eval_ds = Dataset.from_list([{k: x[k] for k in keep} for x in eval_rows]) if eval_rows else None
    checkpoints = out / "checkpoints"
    args = SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs,
        learning_rate=lr,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        max_length=config.max_length,
        completion_only_loss=True,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        eval_strategy="epoch" if eval_ds is not None else "no",
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        dataloader_num_workers=0,
        disable_tqdm=True,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)  # the CLI prints the losses; the library logs them
    trainer.add_callback(LogCallback())
    metrics: dict[str, Any] = {}
    if eval_ds is not None:
        metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    resume = config.resume and any(checkpoints.glob("checkpoint-*"))
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    metrics["train_loss"] = result.training_loss
    metrics["steps"] = result.global_step
    metrics["train_log"] = [
        {k: v for k, v in e.items() if k in ("step", "loss", "eval_loss", "epoch")}
        for e in trainer.state.log_history if "loss" in e or "eval_loss" in e
    ]
    if eval_ds is not None:
        metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]
    final = trainer.model
    if config.lora:
        final.save_pretrained(out / "adapter")
        final = final.merge_and_unload()
    final.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for k, v in list(metrics.items()):
        if isinstance(v, float) and math.isfinite(v):
            metrics[k] = round(v, 4)
    return metrics
