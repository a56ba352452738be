"""The ``hf`` backend's weights as generation sees them (:class:`HFWeights`).

The model that :class:`~constitutional.models.hf.HFModel` scores with is the one it was given
(PPO's and GRPO's policy, being trained). Generation may compute in another dtype
(``generate_dtype``, e.g. bfloat16 on float32 weights): then it runs on a copy of the weights in
that dtype, refreshed whenever the weights change. A trainer says when they change
(:meth:`HFWeights.sync`, as TRL's ``sync_weights`` pushes weights into vLLM) or hands over the
model to generate from (:meth:`HFWeights.use`); updates that bump the parameters' version
counters (``foreach`` optimizer steps, ``load_state_dict``) are seen without it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from constitutional.core.errors import UserError
from constitutional.models.engines import cascade

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


class HFWeights:
    """The model (``model``), the dtype generation computes in (``generate_dtype``) and, when
    that differs from the weights' dtype, the low-precision copy generation runs on
    (``shadow``: an ``HFModel`` over it, built by the facade) and the weights version it holds."""

    def __init__(self, model: Any, generate_dtype: str | torch.dtype | None,
                 device: torch.device) -> None:
        self.model = model
        self.generate_dtype = self._choose_generate_dtype(generate_dtype, device)
        self.shadow: Any = None
        self._shadow_of: Any = None

    def _choose_generate_dtype(self, choice: str | torch.dtype | None,
                               device: torch.device) -> torch.dtype:
        """The dtype generation computes in: the weights' (``auto``), or another, e.g.
        ``bfloat16`` on a CPU that computes in it natively (AVX512-BF16 or AMX: about 1.4-1.6x
        the tokens/s of float32 on this project's CPU, bench/generate.py). Scoring (labels, MC
        evals, log-probabilities) always computes in the weights' dtype.

        Not the default: in bfloat16 a row's logits depend slightly on which rows share its
        batch, enough to flip a sampled token now and then, so a resumed or sharded stage no
        longer reproduces the uninterrupted single-process run record for record (float32
        does). PPO asks for it (its rollout batches are a function of the step alone)."""
        if choice in (None, "auto"):
            return self.dtype
        return resolve_dtype(choice, device)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights themselves (scoring computes in it)."""
        return next(self.model.parameters()).dtype

    @property
    def version(self) -> tuple[int, int, int]:
        """Changes whenever the weights do (see :func:`cascade.weights_version`)."""
        return cascade.weights_version(self.model)

    @property
    def shadowed(self) -> bool:
        """Whether generation computes in another dtype than the weights (on a copy)."""
        return self.generate_dtype != self.dtype

    def sync(self) -> None:
        """Mark the weights as changed: the next generation refreshes the low-precision copy,
        the packed weights and the cached keys and values. Needed after updates that version
        counters do not see (fused optimizers)."""
        setattr(self.model, cascade.SYNC_ATTR, getattr(self.model, cascade.SYNC_ATTR, 0) + 1)

    def use(self, model: Any) -> None:
        """Generate from ``model`` from now on (the policy a trainer has just updated, with the
        same architecture and dtype), and mark its weights as changed (:meth:`sync`)."""
        self.model = model
        self.sync()

    def cast_copy(self) -> Any:
        """A frozen copy of the model with its parameters in ``generate_dtype`` (buffers, such
        as the rotary frequencies, keep their dtype)."""
        model = copy.deepcopy(self.model).requires_grad_(False)
        for p in model.parameters():
            p.data = p.data.to(self.generate_dtype)
        return model

    def keep_shadow(self, shadow: Any, version: tuple[int, int, int]) -> None:
        """Hold ``shadow`` (an ``HFModel`` over :meth:`cast_copy`), taken at ``version``."""
        self.shadow, self._shadow_of = shadow, version

    def refreshed_shadow(self) -> Any:
        """The shadow, its weights copied from the model's first when these changed since."""
        version = self.version
        if self._shadow_of != version:
            with torch.no_grad():
                for src, dst in zip(self.model.parameters(), self.shadow.model.parameters(),
                                    strict=True):
                    dst.copy_(src)
            self._shadow_of = version
        return self.shadow
