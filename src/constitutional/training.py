"""Small pieces shared by the training stages (SFT, preference model, RL)."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("constitutional.train")


class LogCallback(TrainerCallback):
    """Send the Trainer's loss logs to ``logging`` (the CLI decides what reaches the terminal)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not logs or not state.is_world_process_zero:  # one log line per step, not per process
            return
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in logs.items()
                 if k in ("loss", "eval_loss", "learning_rate", "epoch", "grad_norm")}
        if shown:
            log.info("step %d: %s", state.global_step, shown)


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
        "save_strategy": "steps", "save_steps": save_steps, "save_total_limit": 2, "eval_strategy": evaluate,
        "eval_on_start": evaluate != "no",
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
    from constitutional.errors import UserError
    from constitutional.models import parse_spec

    parsed = parse_spec(spec)
    if parsed.backend != "hf":
        raise UserError(f"cannot finetune {spec!r}: training needs a local or hub model",
                        field="model")
    if parsed.builtin:
        from constitutional.models.builtin import ensure_checkpoint

        return str(ensure_checkpoint(parsed.builtin))
    return parsed.target


def process_state() -> Any:
    """accelerate's process state: one process, or this one of ``accelerate launch``'s. On a
    machine without CUDA the processes use CPU and gloo (as the Trainer's ``use_cpu`` does)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
