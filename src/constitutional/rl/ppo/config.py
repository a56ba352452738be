"""PPO's settings, declared once (:mod:`constitutional.core.settings`).

:class:`PPOSettings` holds the knobs a run's YAML ``rl:`` section tunes; :class:`PPOConfig` adds
what a run supplies: the models, the prompts, the output directory, the seed, resuming. The CLI's
``rl ppo`` options are these fields, their descriptions the help texts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from constitutional.core.errors import UserError
from constitutional.core.settings import Field
from constitutional.models import BUILTIN_MODEL, SamplingParams
from constitutional.train import LoraAlpha, LoraSettings, ModelSettings


class PPOSettings(ModelSettings, LoraSettings):
    """The tunable settings of PPO (``rl:`` in a run config), the model's
    (:class:`~constitutional.train.ModelSettings`: the policy, the reference and the value model
    load with them; quantization is the policy's alone) and LoRA's."""

    helpful_ratio: float = Field(0.5, ge=0, lt=1, description="Share of helpful prompts.")
    steps: int = Field(20, ge=1, description="PPO steps (rollout batches).")
    rollout_batch: int = Field(16, ge=1, description="Prompts per step (over all processes).")
    minibatch: int = Field(8, ge=1, description="Minibatch size.")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each rollout batch.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    learning_rate: float = Field(1e-6, gt=0, description="The policy's learning rate.")
    value_learning_rate: float | None = Field(
        None, gt=0, description="The value model's learning rate (default: 10 × "
                                "--learning-rate).")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear learning-rate "
                                                   "warm-up.")
    max_new_tokens: int = Field(64, ge=1, description="Answer tokens at most.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    kl_coef: float = Field(0.05, ge=0, description="β, the KL penalty to the reference.")
    adaptive_kl: bool = Field(False, description="Adapt β towards --target-kl.")
    target_kl: float = Field(6.0, gt=0, description="The adaptive controller's target (KL per "
                                                    "answer).")
    kl_horizon: int = Field(10000, ge=1, description="The adaptive controller's horizon, in "
                                                     "samples.")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE's discount γ.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE's λ.")
    cliprange: float = Field(0.2, gt=0, description="Clip range of the policy ratio.")
    cliprange_value: float = Field(0.2, gt=0, description="Clip range of the values, around "
                                                          "the rollout's.")
    vf_coef: float = Field(0.1, ge=0, description="Value loss weight.")
    value_train: Literal["full", "head"] = Field(
        "full", description="The critic: 'full' (a value model started from the PM, all of it "
                            "learning) or 'head' (the PM's backbone frozen, its features "
                            "computed once per rollout, only its scalar head learning: ~1.5x "
                            "the steps/s, but measured worse than a constant baseline, see "
                            "value_explained_var in the log).")
    rollout_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="The dtype rollouts are generated in. auto: bfloat16 on CPUs that "
                            "compute in it natively (AVX512-BF16 or AMX) when the policy is "
                            "float32, else the policy's. The log-probabilities PPO learns from "
                            "are always the policy's own.")
    whiten_advantages: bool = Field(True, description="Whiten the advantages (zero mean, unit "
                                                      "variance over the rollout).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clipping, of the policy's "
                                 "and the value model's gradients apart.")
    lora_alpha: LoraAlpha = 32
    save_steps: int = Field(10, ge=1, description="Checkpoint every N steps.")

    @model_validator(mode="after")
    def _check_together(self) -> PPOSettings:
        if self.minibatch > self.rollout_batch:
            raise UserError(f"minibatch {self.minibatch} is larger than rollout_batch "
                            f"{self.rollout_batch}", field="minibatch")
        if self.temperature == 0:
            raise UserError("PPO needs sampling: temperature must be > 0", field="temperature")
        return self


class PPOConfig(PPOSettings):
    """Settings of ``cai rl ppo``: the tunable settings plus the run's models, prompts, output
    directory and seed."""

    policy: str = Field(BUILTIN_MODEL, description="The SL-CAI policy (directory or spec).")
    pm: str | None = Field(description="The preference model directory (the reward, and the "
                                       "value model's start).")
    prompts: str = Field(description="Red-team prompts (spec).")
    out: str = Field(description="Run directory (the trained policy, logs, checkpoints).")
    helpful: str | None = Field(None, description="Helpful prompts mixed in (spec).")
    limit: int | None = Field(None, ge=1, description="Prompts per source at most.")
    helpful_limit: int | None = Field(None, ge=1, description="Helpful prompts at most "
                                                              "(default: --limit).")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 … (default: a GPU when "
                                                 "there is one, else the CPU).")
    value_model: str | None = Field(None, description="The value model's start (default: the "
                                                      "PM).")
    seed: int = Field(0, description="Seed.")
    resume: bool = Field(True, description="Continue from the newest checkpoint.")

    omit_unset = ("device", "helpful_limit")

    def step_seed(self, step: int) -> int:
        """The seed of ``step``'s sampling and minibatch order."""
        return self.seed * 1_000_003 + step

    def sampling(self, step: int) -> SamplingParams:
        """How ``step``'s answers are sampled (seeded per prompt and step)."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens,
                              seed=self.step_seed(step) % 2**31)
