"""Learning from experience: the PPO update, the training loop, its log and its checkpoints.

**Learning**: ``ppo_epochs`` passes over the rollout in shuffled minibatches, with the clipped
surrogate loss, the clipped value loss (``vf_coef``), gradient accumulation over ``grad_accum``
minibatches, and gradient-norm clipping.

**Models**: the policy starts from ``policy`` (full finetuning, or LoRA adapters); the reference
is a frozen copy of it (with LoRA, the policy with its adapters disabled); the value model starts
from the PM (a scalar head read at every token). Rewards come from a :class:`Rewarder`, normally
the PM.

**Log**: each step appends one JSON line to ``OUT/ppo_log.jsonl`` (and TensorBoard scalars under
``OUT/tb`` when tensorboard is installed): reward mean/std, PM score, KL, β, entropy, clip
fraction, policy and value loss, response length, and the seconds spent generating, scoring and
updating.

**Exact resume**: every ``save_steps`` steps, ``OUT/checkpoints/step-N`` gets the policy and
value weights (safetensors), the optimizer and scheduler state (tensors as safetensors, the rest
as JSON), β, the step and the RNG state. The data position and all sampling are functions of
(seed, step), so a run killed and resumed from a checkpoint follows the same curve as an
uninterrupted run with the same seed. Nothing here uses pickle.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional.core.errors import UserError
from constitutional.core.io import JsonlStore, atomic_write_text, read_jsonl
from constitutional.core.stats import critic_explained_variance
from constitutional.rl.ppo.config import PPOConfig
from constitutional.rl.ppo.experience import (
    AdaptiveKL,
    ExperienceMaker,
    Message,
    Rewarder,
    Rollout,
    ValueHead,
    answer_logprobs,
    explained_variance,
    load_training_prompts,
    sample_answers,
    step_prompts,
)
from constitutional.train import check_settings_unchanged

#: The settings of a PPO run, written beside its checkpoints and compared on resume.
CONFIG_FILE = "ppo.config.json"
#: Settings that a resumed run may change.
RESUME_MAY_CHANGE = frozenset({"resume", "out"})

log = logging.getLogger(__name__)

LOG_FILE = "ppo_log.jsonl"


# ------------------------------------------------------------------------------------------------
# the losses (tested directly)


def masked_mean(x, mask, denom=None):
    """The mean of ``x`` over ``mask``; ``denom`` replaces the local token count (distributed
    training divides by the count over all processes)."""
    return (x * mask).sum() / (mask.sum().clamp(min=1) if denom is None else denom)


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask,
               cliprange: float, cliprange_value: float, denom=None):
    """The clipped surrogate (policy) loss, the clipped value loss, and the clip fraction, as
    token means (over ``denom`` tokens when given)."""
    import torch

    ratio = torch.exp(logprobs - old_logprobs)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask, denom)
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask,
                                denom)
    clip_frac = masked_mean((pg2 > pg1).float(), mask, denom)
    return pg_loss, vf_loss, clip_frac


# ------------------------------------------------------------------------------------------------
# the models and their optimizer


def _load_policy(config: PPOConfig, device: Any) -> tuple[str, Any, Any, Any]:
    """The policy's directory, its tokenizer, the policy (with LoRA adapters when ``lora``) and
    the frozen reference (None with LoRA: the policy with its adapters disabled)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from constitutional.train import load_pretrained, trainable_model_path

    policy_dir = trainable_model_path(config.policy)
    tokenizer = load_pretrained(AutoTokenizer, policy_dir, "policy's tokenizer",
                                **config.tokenizer_kwargs())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = load_pretrained(AutoModelForCausalLM, policy_dir, "policy", **config.load_kwargs())
    _no_dropout(policy)
    policy = config.prepare_for_training(policy)  # quantized weights, gradient checkpointing
    ref = None
    if config.lora:
        from peft import get_peft_model

        policy = get_peft_model(policy, config.peft_config())
    else:
        ref = load_pretrained(AutoModelForCausalLM, policy_dir, "reference policy",
                              **config.load_kwargs())
        ref.requires_grad_(False).eval().to(device)
    return policy_dir, tokenizer, policy, ref


def rollout_dtype(choice: str, device: Any) -> str:
    """``rollout_dtype`` resolved: ``auto`` is bfloat16 on a CPU that computes in it natively
    (rollouts ~1.5x faster; their batches are a function of the step, so a resumed run still
    reproduces them), else the policy's dtype."""
    if choice != "auto":
        return choice
    from constitutional.models.builtin import cpu_bf16

    return "bfloat16" if str(device).startswith("cpu") and cpu_bf16() else "auto"


def _load_value(config: PPOConfig, policy: Any, dtype: str) -> Any:
    """The value model: a one-label sequence classifier from ``value_model`` or the PM
    (``dtype``: the rollouts', from :func:`rollout_dtype`)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from constitutional.train import load_pretrained, trainable_model_path

    value_spec = config.value_model or config.pm
    if value_spec is None:
        raise UserError("PPO needs a value model: give --pm (or value_model)", field="pm")
    value = load_pretrained(AutoModelForSequenceClassification, trainable_model_path(value_spec),
                            "value model", num_labels=1, **config.load_kwargs(quantize=False))
    _no_dropout(value)
    if config.gradient_checkpointing and config.value_train == "full":
        from constitutional.train import checkpoint_activations

        checkpoint_activations(value)
    if value.config.vocab_size != policy.config.vocab_size:
        raise UserError("the value model must share the policy's tokenizer (it reads the "
                        "policy's tokens)", field="value_model")
    if config.value_train == "head":  # the PM's features stay fixed; only the head learns
        value.requires_grad_(False)
        ValueHead(value).head.requires_grad_(True)
        if dtype == "bfloat16":
            # a frozen backbone only gives the critic its features, once per rollout: it runs
            # with the rollouts' dtype; the head, and so the values, stay float32
            ValueHead(value).backbone.to(torch.bfloat16)
    return value


def _accelerator(config: PPOConfig) -> Any:
    """The Accelerator on ``config.device`` (one this machine lacks is one line, exit 2), with
    bf16 autocast when ``bf16`` is true, none when false (an earlier stage's choice in this
    process is dropped), and accelerate's (``accelerate launch --mixed_precision``) when unset."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from constitutional.train import on_device

    precision = None if config.bf16 is None else "bf16" if config.bf16 else "no"
    if precision is not None:
        AcceleratorState._reset_state()  # keeps the process state (its device and group)
    with on_device(config.device) as device:
        return Accelerator(cpu=not torch.cuda.is_available() or device == "cpu",
                           **({"mixed_precision": precision} if precision else {}))


def _load_rewarder(config: PPOConfig, device: Any) -> Rewarder:
    if config.pm is None:
        raise UserError("PPO needs a reward: give --pm", field="pm")
    from constitutional.rl.preference import load_pm

    return load_pm(config.pm, device=str(device))


class NotFinite(UserError):
    """A PPO step whose reward, loss or gradient is NaN or infinite: training stops there, before
    that step reaches a checkpoint, so the newest checkpoint is the last good one."""

    def __init__(self, step: int, what: str, checkpoint: Path | None) -> None:
        where = (f"the last good checkpoint, {checkpoint}, is kept and a new run resumes from it"
                 if checkpoint else "no checkpoint was saved before it")
        super().__init__(f"PPO step {step}: {what} is NaN or infinite, so training stopped; "
                         f"{where} (lower the learning rate or check the reward)")


def _optimizer(config: PPOConfig, policy: Any, value: Any) -> tuple[Any, Any]:
    """AdamW over the trainable weights of both models (the value model at its own learning
    rate), and a linear warm-up schedule."""
    import torch

    vlr = config.value_learning_rate or 10 * config.learning_rate
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": params, "lr": config.learning_rate},
        {"params": [p for p in value.parameters() if p.requires_grad], "lr": vlr},
    ], weight_decay=0.0)
    warm = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return optimizer, scheduler


def _no_dropout(model: Any) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ------------------------------------------------------------------------------------------------
# the trainer


@dataclass
class PPOResult:
    out_dir: Path
    steps: int
    log: list[dict[str, Any]]
    seconds: float


class PPOTrainer:
    """PPO with a KL penalty to a frozen reference, GAE and a value model. Under ``accelerate
    launch`` (see the package doc) a minibatch's token means are over the tokens of all
    processes: a process's sum is divided by the global token count, and DDP's gradient average
    is undone by the process count."""

    def __init__(self, config: PPOConfig, *, rewarder: Rewarder | None = None,
                 prompts: Sequence[Sequence[Message]] | None = None,
                 accelerator: Any = None) -> None:
        import torch

        from constitutional.models.hf import HFModel

        self.config = config
        self.out = Path(config.out)
        self.accelerator = accelerator or _accelerator(config)
        acc = self.accelerator
        if config.rollout_batch % acc.num_processes:
            raise UserError(f"rollout_batch {config.rollout_batch} must divide over "
                            f"{acc.num_processes} processes", field="rollout_batch")
        torch.manual_seed(config.seed)
        policy_dir, self.tokenizer, policy, self.ref = _load_policy(config, acc.device)
        dtype = rollout_dtype(config.rollout_dtype, acc.device)
        value = _load_value(config, policy, dtype)
        self.rewarder = rewarder if rewarder is not None else _load_rewarder(config, acc.device)
        optimizer, self.scheduler = _optimizer(config, policy, value)
        if config.value_train == "head":
            # only the head learns, called directly (not through a DDP forward): no DDP wrapper;
            # its gradients are averaged over the processes in _optimizer_step
            self.policy, self.optimizer = acc.prepare(policy, optimizer)
            self.value = value.to(acc.device)
        else:
            self.policy, self.value, self.optimizer = acc.prepare(policy, value, optimizer)
        self.value_head = ValueHead(acc.unwrap_model(self.value))
        self.generator = HFModel(policy_dir, spec=config.policy, model=acc.unwrap_model(
            self.policy), tokenizer=self.tokenizer, device=str(acc.device),
            generate_dtype=dtype)
        # how rollouts compute is decided here, on the starting weights, before any checkpoint
        # is loaded: the bf16 engine's self-check can pass on some weights and fail on others,
        # and a resumed run must sample as the uninterrupted one did
        self.rollout_dtype = str(self.generator.prepare_generation()).removeprefix("torch.")
        self.kl_ctl = AdaptiveKL(config.kl_coef, config.target_kl, config.kl_horizon)
        self.experience = ExperienceMaker(
            config, generator=self.generator, tokenizer=self.tokenizer, ref=self.ref,
            value_head=self.value_head, rewarder=self.rewarder, kl_ctl=self.kl_ctl,
            device=acc.device, all_sum=self._all_sum)
        self.prompts = list(prompts) if prompts is not None else load_training_prompts(config)
        if not self.prompts:
            raise UserError("no prompts to train on", field="prompts")
        self.step = 0
        self.tb = _tensorboard(self.out / "tb") if acc.is_main_process else None

    # -- experience ----------------------------------------------------------------------------

    def batch_prompts(self, step: int) -> list[list[Message]]:
        """This process's prompts for ``step`` (a function of the step alone)."""
        acc = self.accelerator
        return step_prompts(self.prompts, step, self.config, acc.process_index,
                            acc.num_processes)

    def make_experience(self, step: int) -> tuple[Rollout, dict[str, float]]:
        prompts = self.batch_prompts(step)
        return self.experience.make(prompts, step, self.accelerator.unwrap_model(self.policy))

    def _sample(self, prompts: Sequence[Sequence[Message]], params: Any,
                ) -> list[tuple[str, list[int]]]:
        return sample_answers(self.generator, prompts, params)

    # -- learning ------------------------------------------------------------------------------

    def learn(self, r: Rollout, step: int) -> dict[str, float]:
        import torch

        c, acc = self.config, self.accelerator
        B = r.input_ids.shape[0]
        mb = max(1, c.minibatch // acc.num_processes)
        g = torch.Generator().manual_seed(c.step_seed(step))
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_frac": [],
                                         "approx_kl": []}
        self.policy.train()
        self.value.train()
        n_micro = 0
        norms: list[dict[str, float]] = []
        for _ in range(c.ppo_epochs):
            order = torch.randperm(B, generator=g).tolist()
            for start in range(0, B, mb):
                i = torch.tensor(order[start : start + mb], device=r.input_ids.device)
                for k, v in self._minibatch_step(r, i).items():
                    stats[k].append(v)
                n_micro += 1
                if n_micro % c.grad_accum == 0:
                    norms.append(self._optimizer_step(step))
        if n_micro % c.grad_accum:
            norms.append(self._optimizer_step(step))
        self.policy.eval()
        self.value.eval()
        # each process holds its share of every minibatch mean: the sum over processes is the mean
        means = self._all_sum(torch.stack([torch.stack(v).mean() for v in stats.values()]))
        out = dict(zip(stats, means.tolist(), strict=True))
        # the gradients' norms before clipping (all-reduced already: the same on every process)
        for name in ("policy", "value"):
            out[f"{name}_grad_norm"] = sum(n[name] for n in norms) / len(norms)
        return out

    def _minibatch_step(self, r: Rollout, i: Any) -> dict[str, Any]:
        """Back-propagate the PPO loss of the rollout's rows ``i``; their statistics."""
        c, acc = self.config, self.accelerator
        ids, mask, pos = r.input_ids[i], r.attention_mask[i], r.position_ids[i]
        rmask = r.response_mask[i]
        logprobs, _ = answer_logprobs(self.policy, ids, mask, pos, r.query_width)
        if r.value_hidden is not None:  # value_train="head": no backbone pass
            values = self.value_head.head(r.value_hidden[i]).squeeze(-1).float()
        else:
            values = ValueHead(acc.unwrap_model(self.value))(ids, mask, pos) \
                if acc.num_processes == 1 else self._ddp_values(ids, mask, pos)
            values = values[:, r.query_width - 1 : -1]
        # token means over the minibatch's tokens on all processes; × processes undoes DDP's
        # gradient average, so the update is the one-process update
        tokens = self._all_sum(rmask.sum().detach()).clamp(min=1)
        pg_loss, vf_loss, clip_frac = ppo_losses(
            logprobs, r.logprobs[i], r.advantages[i], values, r.values[i], r.returns[i], rmask,
            c.cliprange, c.cliprange_value, denom=tokens)
        loss = (pg_loss + c.vf_coef * vf_loss) * acc.num_processes / c.grad_accum
        acc.backward(loss)
        approx_kl = masked_mean(0.5 * (logprobs - r.logprobs[i]) ** 2, rmask, tokens)
        return {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                "clip_frac": clip_frac.detach(), "approx_kl": approx_kl.detach()}

    def _all_sum(self, t):
        """``t`` summed over the processes (itself on one process)."""
        return self.accelerator.reduce(t, "sum") if self.accelerator.num_processes > 1 else t

    def _ddp_values(self, ids, mask, pos):
        """Values through the DDP-wrapped value model (so its gradients are all-reduced)."""
        hidden = self.value(input_ids=ids, attention_mask=mask, position_ids=pos,
                            output_hidden_states=True, use_cache=False).hidden_states[-1]
        return self.value_head.head(hidden).squeeze(-1).float()

    def _optimizer_step(self, step: int) -> dict[str, float]:
        """Clip the policy's and the critic's gradients, each to ``max_grad_norm``; refuse a
        non-finite one (before it reaches the weights); step. Their norms before clipping."""
        acc = self.accelerator
        if self.config.value_train == "head" and acc.num_processes > 1:
            for p in self.value_head.head.parameters():  # what DDP does for the policy
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, "mean")
        # the policy's and the critic's gradients are clipped apart (as OpenRLHF's two
        # optimizers do): a badly fit critic's large gradient does not shrink the policy's step
        norms = {}
        for name, group in zip(("policy", "value"), self.optimizer.param_groups, strict=True):
            norm = float(acc.clip_grad_norm_(group["params"], self.config.max_grad_norm))
            if not math.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise NotFinite(step + 1, f"the {name} model's gradient",
                                self._latest_checkpoint())
            norms[name] = norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms

    # -- the loop ------------------------------------------------------------------------------

    def train(self, on_step: Callable[[dict[str, Any]], None] | None = None) -> PPOResult:
        c, acc = self.config, self.accelerator
        t_start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        if c.resume and self._latest_checkpoint() is not None:
            self._check_settings_unchanged()
            self.load_latest()
        log_store = JsonlStore(self.out / LOG_FILE) if acc.is_main_process else None
        if acc.is_main_process:
            atomic_write_text(self.out / CONFIG_FILE, json.dumps(c.to_dict(), indent=2) + "\n")
        while self.step < c.steps:
            step = self.step
            rollout, times = self.make_experience(step)
            t0 = time.perf_counter()
            learn = self.learn(rollout, step)
            times["time_update"] = time.perf_counter() - t0
            row = self._step_stats(rollout, learn, times, step)
            bad = [k for k in ("reward_mean", "kl", "policy_loss", "value_loss")
                   if not math.isfinite(row[k])]
            if bad:
                raise NotFinite(step + 1, bad[0], self._latest_checkpoint())
            if c.adaptive_kl:
                self.kl_ctl.update(row["kl"], c.rollout_batch)
            self.step = step + 1
            if log_store is not None:
                self._log_step(log_store, row)
            if on_step:
                on_step(row)
            if self.step % c.save_steps == 0 or self.step == c.steps:
                self.save_checkpoint()
        if acc.is_main_process:
            self.save_model(self.out)
        if self.tb is not None:
            self.tb.flush()
        rows = sorted(read_jsonl(self.out / LOG_FILE), key=lambda r: r["step"]) \
            if (self.out / LOG_FILE).exists() else []
        rows = list({r["step"]: r for r in rows}.values())
        if acc.is_main_process:
            _warn_on_the_critic(rows)
        return PPOResult(self.out, self.step, rows, time.perf_counter() - t_start)

    def _log_step(self, log_store: JsonlStore, row: dict[str, Any]) -> None:
        """One line of ``ppo_log.jsonl`` (and TensorBoard scalars)."""
        log_store.append([{"id": f"step-{row['step']}", **row}])
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(f"ppo/{k}", v, row["step"])

    def _step_stats(self, r: Rollout, learn: dict[str, float], times: dict[str, float],
                    step: int) -> dict[str, Any]:
        import torch

        acc = self.accelerator
        total_reward = r.rewards.sum(1)
        kl = r.kl.sum(1)
        lengths = r.response_mask.sum(1)
        ent = (r.entropy * r.response_mask).sum(1) / lengths.clamp(min=1)
        g = acc.gather_for_metrics
        reward_all, kl_all, scores_all = g(total_reward), g(kl), g(r.scores)
        len_all, ent_all = g(lengths), g(ent)
        elapsed = sum(times.values())
        return {
            "step": step + 1,
            "reward_mean": reward_all.mean().item(),
            "reward_std": reward_all.std().item() if reward_all.numel() > 1 else 0.0,
            "score_mean": scores_all.mean().item(),
            "kl": kl_all.mean().item(),
            "kl_coef": self.kl_ctl.beta,
            "entropy": ent_all.mean().item(),
            "clip_frac": learn["clip_frac"],
            "approx_kl": learn["approx_kl"],
            "policy_grad_norm": learn["policy_grad_norm"],
            "value_grad_norm": learn["value_grad_norm"],
            "policy_loss": learn["policy_loss"],
            "value_loss": learn["value_loss"],
            "value_explained_var": explained_variance(r.values, r.returns, r.response_mask,
                                                      self._all_sum),
            "response_len": len_all.float().mean().item(),
            "learning_rate": self.scheduler.get_last_lr()[0],
            **{k: round(v, 4) for k, v in times.items()},
            "samples_per_s": self.config.rollout_batch / max(elapsed, 1e-9),
            "sample": {"prompt": r.prompts[0][-1]["content"][:200], "answer": r.answers[0][:300]}
            if acc.is_main_process else None,
            **({"max_score": torch.max(scores_all).item()} if scores_all.numel() else {}),
        }

    # -- saving and resuming ---------------------------------------------------------------------

    def save_model(self, path: Path) -> None:
        policy = self.accelerator.unwrap_model(self.policy)
        if self.config.lora:
            policy.save_pretrained(path / "adapter")
            policy = policy.merge_and_unload()
        policy.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        if self.config.lora:  # merging is destructive: re-wrap for any further training
            self.policy = policy

    def save_checkpoint(self) -> None:
        import torch
        from safetensors.torch import save_file, save_model

        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        final = self.out / "checkpoints" / f"step-{self.step}"
        tmp = final.with_name(final.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        policy = acc.unwrap_model(self.policy)
        if self.config.lora:
            save_file({k: v.contiguous() for k, v in policy.state_dict().items() if "lora_" in k},
                      str(tmp / "policy.safetensors"))
        else:  # save_model handles tied weights (embeddings / LM head)
            save_model(policy, str(tmp / "policy.safetensors"))
        save_model(acc.unwrap_model(self.value), str(tmp / "value.safetensors"))
        _save_optimizer(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer")
                        else self.optimizer, tmp)
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        meta = {"step": self.step, "kl_coef": self.kl_ctl.beta,
                "rollout_dtype": self.rollout_dtype,
                "scheduler": self.scheduler.state_dict(), "python_rng": _py_rng_state()}
        atomic_write_text(tmp / "trainer_state.json", json.dumps(meta, default=str))
        if final.exists():
            import shutil

            shutil.rmtree(final)
        tmp.rename(final)
        log.info("checkpoint %s", final)

    def _latest_checkpoint(self) -> Path | None:
        ckpts = sorted((p for p in (self.out / "checkpoints").glob("step-*")
                        if p.is_dir() and not p.name.endswith(".tmp")
                        and (p / "trainer_state.json").exists()),
                       key=lambda p: int(p.name.split("-")[1]))
        return ckpts[-1] if ckpts else None

    def _check_settings_unchanged(self) -> None:
        """A resumed run continues the run its checkpoints came from, with the same settings (as
        every other stage's run directory; ``resume`` itself and the output path may differ)."""
        check_settings_unchanged(self.out / CONFIG_FILE, self.config.to_dict(),
                                 RESUME_MAY_CHANGE)

    def load_latest(self) -> bool:
        import torch
        from safetensors.torch import load_file, load_model

        path = self._latest_checkpoint()
        if path is None:
            return False
        policy = self.accelerator.unwrap_model(self.policy)
        if self.config.lora:
            weights = path / "policy.safetensors"
            got = policy.load_state_dict(load_file(str(weights)), strict=False)
            # Only the adapters are saved, so the base weights are "missing" by design; an
            # adapter key that is missing or unexpected means these are not this run's adapters.
            missing = [k for k in got.missing_keys if "lora_" in k]
            if got.unexpected_keys or missing:
                bad = (got.unexpected_keys or missing)[0]
                raise UserError(f"the checkpoint's LoRA adapters do not fit the model "
                                f"({len(got.unexpected_keys)} unexpected, {len(missing)} missing "
                                f"keys, e.g. {bad}); use a new output directory",
                                file=weights)
        else:
            load_model(policy, str(path / "policy.safetensors"))
        load_model(self.accelerator.unwrap_model(self.value), str(path / "value.safetensors"))
        _load_optimizer(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer")
                        else self.optimizer, path)
        meta = json.loads((path / "trainer_state.json").read_text())
        self.scheduler.load_state_dict(meta["scheduler"])
        self.kl_ctl.beta = meta["kl_coef"]
        self.step = meta["step"]
        self.generator.sync_weights()  # the low-precision copy takes the loaded weights
        if meta.get("rollout_dtype", self.rollout_dtype) != self.rollout_dtype:
            log.warning("the checkpoint's rollouts were generated in %s, this run's are in %s "
                        "(another machine or library version?): the resumed curve will differ",
                        meta["rollout_dtype"], self.rollout_dtype)
        torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_rng"])
        _set_py_rng_state(meta["python_rng"])
        log.info("resumed from %s (step %d)", path, self.step)
        return True


def _warn_on_the_critic(rows: list[dict[str, Any]]) -> None:
    """One warning line when the critic, over the last steps, is no better than a constant
    baseline (the report's verdict says the same)."""
    tail = critic_explained_variance(r.get("value_explained_var") for r in rows)
    if tail is not None and tail[0] <= 0:
        log.warning("PPO's critic is no better than a constant baseline: explained variance of "
                    "the returns %.2f over the last %d steps (0 is a constant); its advantages "
                    "carry its noise", *tail)


# ------------------------------------------------------------------------------------------------
# checkpoint files (safetensors + JSON; no pickle) and the TensorBoard writer


def _save_optimizer(opt, path: Path) -> None:
    from safetensors.torch import save_file

    state = opt.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, s in state["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in s.items():
            if hasattr(v, "shape"):
                tensors[f"{pid}.{k}"] = v.contiguous()
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    save_file(tensors, str(path / "optimizer.safetensors"))
    atomic_write_text(path / "optimizer.json", json.dumps(meta))


def _load_optimizer(opt, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "optimizer.safetensors"))
    meta = json.loads((path / "optimizer.json").read_text())
    state = {int(pid): {k: tensors[f"{pid}.{k}"] if v == "tensor" else v for k, v in s.items()}
             for pid, s in meta["state"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _py_rng_state() -> list[Any]:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _set_py_rng_state(value: list[Any]) -> None:
    random.setstate((value[0], tuple(value[1]), value[2]))


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(path))


# ------------------------------------------------------------------------------------------------


def ppo_train(config: PPOConfig, *, rewarder: Rewarder | None = None,
              prompts: Sequence[Sequence[Message]] | None = None,
              on_step: Callable[[dict[str, Any]], None] | None = None) -> PPOResult:
    """Run PPO (resuming from the newest checkpoint in ``config.out`` when ``resume``)."""
    trainer = PPOTrainer(config, rewarder=rewarder, prompts=prompts)
    return trainer.train(on_step=on_step)
