"""The TRL training recipe, written once, and the settings the training stages share.

SFT (:mod:`constitutional.sl.train`), the preference model (:mod:`constitutional.rl.preference`)
and DPO (:mod:`constitutional.rl.dpo`) each describe what is their own in a :class:`TrainJob`
(trainer and arguments classes, datasets, how the model loads, which metrics they report), and
:func:`run_trainer` does the rest, in the order distributed training needs:

1. the training arguments first: they set up the processes, and DeepSpeed ZeRO-3 partitions a
   model only if it is loaded after them;
2. the tokenizer (its EOS doubles as the pad token where it has none) and the model, with LoRA
   adapters if the stage asks for them;
3. the trainer, logging through :func:`log_callback`; the held-out set is evaluated once before
   training by ``eval_on_start`` (see :func:`trainer_args`) and read back with
   :func:`eval_before`;
4. training, from the newest checkpoint under ``OUT/checkpoints`` when ``resume`` is set;
5. ``trainer.save_model`` on every process (it gathers FSDP and ZeRO-3 shards; the main process
   writes), then, with LoRA, the adapters merged into a plain model directory by the main
   process.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from constitutional.core.settings import Field, Settings

log = logging.getLogger("constitutional.train")

# ------------------------------------------------------------------------------------------------
# settings

# Fields whose default differs between stages are declared once as annotated types: a stage
# restates only the default (``epochs: Epochs = 2.0``); type, bounds and help text stay here.
Epochs = Annotated[float, Field(gt=0, description="Training epochs.")]
BatchSize = Annotated[int, Field(ge=1, description="Examples per device batch (the global batch "
                                                   "is this × processes × grad_accum).")]
EvalFraction = Annotated[float, Field(ge=0, lt=1, description="Share of the data held out for "
                                                              "evaluation (0: none).")]


class TrainSettings(Settings):
    """The settings every TRL training stage has (SFT, preference model, DPO)."""

    epochs: Epochs = 1.0
    learning_rate: float | None = Field(None, gt=0, description="Peak learning rate (cosine "
                                                                "schedule, 5% warm-up).")
    batch_size: BatchSize = 8
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(1024, ge=1, description="Tokens per training example at most.")
    eval_fraction: EvalFraction = 0.1
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps.")
    logging_steps: int = Field(5, ge=1, description="Log the training loss every N steps.")


class LoraTrainSettings(TrainSettings):
    """:class:`TrainSettings` and LoRA, for the stages that train a causal language model."""

    lora: bool = Field(False, description="Train LoRA adapters (merged at the end).")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA alpha (default: 2 × the "
                                                           "rank).")

    def peft_config(self) -> Any:
        """PEFT's LoRA config on every linear layer, or None without ``lora``."""
        if not self.lora:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha or 2 * self.lora_r,
                          lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


class TrainRun(Settings):
    """What a run adds to a training stage's settings besides its inputs and output."""

    seed: int = Field(0, description="Seed (model init, data order, sampling).")
    resume: bool = Field(False, description="Continue from the newest checkpoint.")


# ------------------------------------------------------------------------------------------------
# the recipe


@dataclass
class TrainJob:
    """What a stage supplies to :func:`run_trainer`; everything else is the same for all."""

    model: str  # the model spec to train
    out: Path  # the model directory; checkpoints go to OUT/checkpoints
    trainer_class: type
    args_class: type  # TRL's arguments class, built with trainer_args + ``args``
    learning_rate: float
    # tokenizer → (train dataset, held-out dataset or None)
    datasets: Callable[[Any], tuple[Any, Any]]
    # (path, tokenizer) → model; loaded after the arguments
    load_model: Callable[[str, Any], Any]
    args: dict[str, Any] = field(default_factory=dict)  # the stage's own arguments
    evaluate: str = "epoch"  # the eval strategy; "no" when there is no held-out set
    # tokenizer → further trainer arguments (a data collator)
    trainer_kwargs: Callable[[Any], dict[str, Any]] = lambda tokenizer: {}
    before: dict[str, str] = field(default_factory=dict)  # metric → key of the eval before
    after: dict[str, str] = field(default_factory=dict)  # metric → key of the eval after
    log_keys: tuple[str, ...] = ("step", "loss", "eval_loss", "epoch")  # kept in train_log


def run_trainer(config: Any, job: TrainJob) -> dict[str, Any]:
    """Train as ``job`` says with ``config``'s :class:`TrainSettings`, ``seed`` and ``resume``
    (and LoRA, for :class:`LoraTrainSettings`); save to ``job.out``; return the metrics:
    ``job.before``, ``train_loss``, ``steps``, ``train_log``, ``job.after`` (the evaluations
    only with a held-out set), floats rounded to 4 digits. Every process runs this."""
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    path = trainable_model_path(job.model)
    checkpoints = job.out / "checkpoints"
    args = job.args_class(**job.args, **trainer_args(
        output_dir=str(checkpoints), epochs=config.epochs, learning_rate=job.learning_rate,
        batch_size=config.batch_size, grad_accum=config.grad_accum,
        logging_steps=config.logging_steps, save_steps=config.save_steps, seed=config.seed,
        evaluate=job.evaluate))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = job.load_model(path, tokenizer)
    train_ds, eval_ds = job.datasets(tokenizer)
    lora = config.peft_config() if isinstance(config, LoraTrainSettings) else None
    trainer = job.trainer_class(model=model, args=args, train_dataset=train_ds,
                                eval_dataset=eval_ds, processing_class=tokenizer,
                                peft_config=lora, **job.trainer_kwargs(tokenizer))
    trainer.remove_callback(PrinterCallback)  # the CLI prints the losses; the library logs them
    trainer.add_callback(log_callback())
    resume = config.resume and any(checkpoints.glob("checkpoint-*"))
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    metrics: dict[str, Any] = {}
    if eval_ds is not None:
        before = eval_before(trainer)
        metrics.update({name: before.get(key) for name, key in job.before.items()})
    metrics["train_loss"] = result.training_loss
    metrics["steps"] = result.global_step
    metrics["train_log"] = [{k: v for k, v in e.items() if k in job.log_keys}
                            for e in trainer.state.log_history if "loss" in e or "eval_loss" in e]
    if eval_ds is not None:
        after = trainer.evaluate()
        metrics.update({name: after.get(key) for name, key in job.after.items()})
    save_model(trainer, tokenizer, job.out, merge_lora=lora is not None)
    return rounded(metrics)


def save_model(trainer: Any, tokenizer: Any, out: Path, *, merge_lora: bool = False) -> None:
    """Save the trained model to ``out`` as a plain model directory. Every process calls
    ``trainer.save_model``: it gathers FSDP / ZeRO-3 shards, and only the main process writes.
    LoRA adapters are saved to ``out/adapter`` and merged into ``out`` by the main process (DDP
    and ZeRO-2 keep the full weights on every process)."""
    if merge_lora:
        trainer.save_model(str(out / "adapter"))
        if trainer.is_world_process_zero():
            trainer.model.merge_and_unload().save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
    else:
        trainer.save_model(str(out))
    trainer.accelerator.wait_for_everyone()


def causal_lm(path: str, tokenizer: Any) -> Any:
    """A :attr:`TrainJob.load_model` for causal language models, in float32 (bf16 autocast on
    GPUs comes from the training arguments)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    """Finite floats rounded to 4 digits (the others as they are)."""
    return {k: round(v, 4) if isinstance(v, float) and math.isfinite(v) else v
            for k, v in metrics.items()}


def write_report(file: Path, config: Settings, metrics: dict[str, Any]) -> None:
    """``{"config": ..., "metrics": ...}`` as JSON (the main process calls this)."""
    from constitutional.core.io import atomic_write_text

    atomic_write_text(file, json.dumps({"config": config.to_dict(), "metrics": metrics},
                                       indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------------------
# the pieces


def log_callback() -> Any:
    """A Trainer callback that sends the loss logs to ``logging`` (the CLI decides what reaches
    the terminal), once per step, not once per process."""
    from transformers import TrainerCallback

    class LogCallback(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any,
                   logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if not logs or not state.is_world_process_zero:
                return
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in logs.items()
                     if k in ("loss", "eval_loss", "learning_rate", "epoch", "grad_norm")}
            if shown:
                log.info("step %d: %s", state.global_step, shown)

    return LogCallback()


def trainer_args(*, output_dir: str, epochs: float, learning_rate: float, batch_size: int,
                 grad_accum: int, logging_steps: int, save_steps: int, seed: int,
                 evaluate: str) -> dict[str, Any]:
    """The TrainingArguments our three TRL trainers (SFT, reward, DPO) share: cosine schedule
    with 5% warm-up, two kept checkpoints, no reporting or progress bars, bf16 on GPUs that have
    it, and the CPU when there is no GPU.

    The held-out set is evaluated once before training with ``eval_on_start`` (see
    :func:`eval_before`), inside ``train()``, never by a ``trainer.evaluate()`` call beforehand:
    that call prepares the model for evaluation, which marks it as prepared, and ``train()`` then
    skips the DDP wrapper, so under ``accelerate launch`` every process silently trains its own
    copy on its own shard (no gradient all-reduce), and the main process saves its copy."""
    import torch

    return {
        "output_dir": output_dir, "num_train_epochs": epochs, "learning_rate": learning_rate,
        "per_device_train_batch_size": batch_size, "per_device_eval_batch_size": batch_size,
        "gradient_accumulation_steps": grad_accum, "logging_steps": logging_steps,
        "save_strategy": "steps", "save_steps": save_steps, "save_total_limit": 2,
        "eval_strategy": evaluate, "eval_on_start": evaluate != "no",
        "report_to": "none", "seed": seed, "data_seed": seed, "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05, "dataloader_num_workers": 0, "disable_tqdm": True,
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "use_cpu": not torch.cuda.is_available(),
    }


def eval_before(trainer: Any) -> dict[str, Any]:
    """The held-out metrics before training: the step-0 evaluation of ``eval_on_start`` (kept in
    the checkpoint's log history, so a resumed run reports the first launch's figures)."""
    for entry in trainer.state.log_history:
        if entry.get("step") == 0 and any(k.startswith("eval_") for k in entry):
            return entry
    return {}


def trainable_model_path(spec: str) -> str:
    """A local directory for a model spec that can be trained (the built-in model is converted
    once; a hub id is returned as is); an HTTP model is a one-line error."""
    from constitutional.core.errors import UserError
    from constitutional.models import parse_spec

    parsed = parse_spec(spec)
    if parsed.backend != "hf":
        raise UserError(f"cannot finetune {spec!r}: training needs a local or hub model",
                        field="model")
    if parsed.builtin:
        from constitutional.models.builtin import ensure_checkpoint

        return str(ensure_checkpoint(parsed.builtin))
    return parsed.target


def load_pretrained(cls: Any, path: str, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, **kwargs)``; a model or tokenizer that cannot be loaded (a
    missing or unreadable directory, a broken config, truncated weights) is one line, exit 2."""
    from safetensors import SafetensorError

    from constitutional.core.errors import UserError

    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise UserError(f"cannot load the {what} from {path!r}: {first}") from err


def check_settings_unchanged(file: Path, now: dict[str, Any],
                             may_change: frozenset[str]) -> None:
    """A resumed run continues the run its checkpoints came from, with the same settings."""
    from constitutional.core.errors import UserError

    if not file.exists():
        return
    try:
        before = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the settings of the run to resume ({err})",
                        file=file) from err
    now = json.loads(json.dumps(now, default=str))
    changed = sorted(k for k in set(before) | set(now)
                     if k not in may_change and before.get(k) != now.get(k))
    if changed:
        k = changed[0]
        raise UserError(f"the checkpoints here were made with {k}={before.get(k)!r}, now "
                        f"{k}={now.get(k)!r}; use a new output directory, or the same "
                        "settings to resume", file=file, field=k)


def process_state() -> Any:
    """accelerate's process state: one process, or this one of ``accelerate launch``'s. On a
    machine without CUDA the processes use CPU and gloo (as the Trainer's ``use_cpu`` does)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
