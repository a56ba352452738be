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
        if not logs:
            return
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in logs.items()
                 if k in ("loss", "eval_loss", "learning_rate", "epoch", "grad_norm")}
        if shown:
            log.info("step %d: %s", state.global_step, shown)
