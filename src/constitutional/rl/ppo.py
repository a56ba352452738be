"""``cai rl train --algo ppo``: PPO of the SL-CAI policy against the preference model.

TRL removed its PPOTrainer, so this is ours. It reads top to bottom, one PPO step at a time:

1. **Experience** (OpenRLHF's split): take the next ``rollout_batch`` prompts (red-team and
   helpful, mixed), sample one answer each with the policy through the model layer (batched,
   seeded per prompt and step), score the answers with the PM, and compute, over the sampled
   tokens, the policy's and the reference's log-probabilities and the value model's values.
2. **Rewards**: the PM score at the last token of the answer, minus ``β · (log π − log π_ref)``
   at every token (β from ``kl_coef``; optionally adapted towards ``target_kl``, as in Ziegler et
   al.). Then **GAE** (γ, λ) gives advantages and returns; advantages are whitened.
3. **Learning**: ``ppo_epochs`` passes over the batch in shuffled minibatches, with the clipped
   surrogate loss, the clipped value loss (``vf_coef``), gradient accumulation over
   ``grad_accum`` minibatches, and gradient-norm clipping.

Models: the policy starts from ``policy`` (full finetuning, or LoRA adapters); the reference is
a frozen copy of it (with LoRA, the policy with its adapters disabled); the value model starts from
the PM (a scalar head read at every token). Rewards come from a :class:`Rewarder`, normally the PM.

Each step appends one JSON line to ``OUT/ppo_log.jsonl`` (and TensorBoard scalars under
``OUT/tb`` when tensorboard is installed): reward mean/std, PM score, KL, β, entropy, clip
fraction, policy and value loss, response length, and the seconds spent generating, scoring
and updating.

**Exact resume.** Every ``save_steps`` steps, ``OUT/checkpoints/step-N`` gets the policy and
value weights (safetensors), the optimizer and scheduler state (tensors as safetensors, the rest
as JSON), β, the step and the RNG state. The data position and all sampling are functions of
(seed, step), so a run killed and resumed from a checkpoint follows the same curve as an
uninterrupted run with the same seed. Nothing here uses pickle.

Distribution: under ``accelerate launch`` each process takes its share of every rollout batch
and gradients are averaged by accelerate (DDP); logged statistics are gathered over processes.
Advantages are whitened with the statistics of the whole rollout, and each minibatch's token
means are taken over the tokens of all processes (a process's sum is divided by the global token
count, then DDP's gradient average is undone by the process count), so with one minibatch per
epoch N processes compute the same update as one. With several minibatches each process draws
its share of a minibatch from its own rows: the same size and statistics, other rows than one
process would draw.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from constitutional.errors import UserError
from constitutional.store import JsonlStore, atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

Message = dict[str, str]
LOG_FILE = "ppo_log.jsonl"


class Rewarder(Protocol):
    """Anything that scores answers: ``score_answers(prompts, answers) -> [float]``."""

    def score_answers(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str],
                      ) -> list[float]: ...


@dataclass
class PPOConfig:
    policy: str  # the SL-CAI model (spec or directory)
    pm: str | None  # the preference model directory (reward, and the value model's start)
    prompts: str  # red-team prompts (spec)
    out: str
    helpful: str | None = None  # benign prompts mixed in (spec)
    helpful_ratio: float = 0.5  # share of helpful prompts in the mix
    limit: int | None = None  # prompts per source at most
    value_model: str | None = None  # default: the PM
    steps: int = 20  # PPO steps (rollout batches)
    rollout_batch: int = 16  # prompts per step (over all processes)
    minibatch: int = 8
    ppo_epochs: int = 2
    grad_accum: int = 1
    learning_rate: float = 1e-6
    value_learning_rate: float | None = None  # default: 10 × learning_rate
    warmup_steps: int = 0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    kl_coef: float = 0.05  # β
    adaptive_kl: bool = False
    target_kl: float = 6.0  # per-answer KL the adaptive controller aims for
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    value_train: str = "full"  # full: the whole value model learns; head: only its scalar head
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    save_steps: int = 10
    seed: int = 0
    resume: bool = True

    def validate(self) -> None:
        positive_ints = ("steps", "rollout_batch", "minibatch", "ppo_epochs", "grad_accum",
                         "max_new_tokens", "save_steps", "kl_horizon")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"must be an integer >= 1, got {value!r}", field=name)
        for name in ("learning_rate", "cliprange", "cliprange_value", "max_grad_norm",
                     "target_kl"):
            if not getattr(self, name) > 0:
                raise UserError("must be positive", field=name)
        for name in ("kl_coef", "vf_coef", "temperature"):
            if getattr(self, name) < 0:
                raise UserError("must be >= 0", field=name)
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError("must be in [0, 1]", field=name)
        if not 0 <= self.helpful_ratio < 1:
            raise UserError("must be in [0, 1)", field="helpful_ratio")
        if self.minibatch > self.rollout_batch:
            raise UserError(f"minibatch {self.minibatch} is larger than rollout_batch "
                            f"{self.rollout_batch}", field="minibatch")
        if self.temperature == 0:
            raise UserError("PPO needs sampling: temperature must be > 0", field="temperature")
        if self.value_train not in ("full", "head"):
            raise UserError(f"must be full or head, got {self.value_train!r}",
                            field="value_train")


# ------------------------------------------------------------------------------------------------
# the pure pieces: rewards, GAE, losses (tested directly)


def kl_penalised_rewards(score, logprobs, ref_logprobs, mask, kl_coef: float):
    """Per-token rewards: −β·(log π − log π_ref) at every answer token, plus the PM score at the
    last one. Shapes [B, T] (``score`` [B]); returns (rewards, per-token KL)."""
    import torch

    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards = rewards + torch.zeros_like(rewards).scatter(1, last[:, None], score[:, None])
    return rewards * mask, kl


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over answer tokens (right-padded by ``mask``)."""
    import torch

    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0.0)
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_mean(x, mask, denom=None):
    """The mean of ``x`` over ``mask``; ``denom`` replaces the local token count (distributed
    training divides by the count over all processes)."""
    return (x * mask).sum() / (mask.sum().clamp(min=1) if denom is None else denom)


def whiten(x, mask, eps: float = 1e-8, all_sum=None):
    """Zero mean, unit variance over the masked entries; ``all_sum`` sums a tensor over the
    processes, so that all of them use the statistics of the whole batch."""
    import torch

    all_sum = all_sum or (lambda t: t)
    n, total = all_sum(torch.stack([mask.sum(), (x * mask).sum()]).double())
    mean = (total / n.clamp(min=1)).to(x.dtype)
    var = (all_sum(((x - mean) ** 2 * mask).sum().double()) / n.clamp(min=1)).to(x.dtype)
    return (x - mean) * (var + eps).rsqrt() * mask


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


class AdaptiveKL:
    """Ziegler et al.'s controller: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon)."""

    def __init__(self, beta: float, target: float, horizon: int) -> None:
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.beta *= 1 + error * n / self.horizon


# ------------------------------------------------------------------------------------------------
# models


class ValueHead:
    """Per-token values from a one-label sequence classifier (the PM): its scalar head applied
    at every position of its backbone's last hidden state."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.backbone = getattr(model, model.base_model_prefix)
        self.head = getattr(model, "score", None) or model.classifier

    def hidden(self, input_ids, attention_mask, position_ids):
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False).last_hidden_state

    def __call__(self, input_ids, attention_mask, position_ids):
        return self.head(self.hidden(input_ids, attention_mask, position_ids)).squeeze(-1).float()


# ------------------------------------------------------------------------------------------------
# batches of token ids


@dataclass
class Rollout:
    """One step's experience; tensors are [B, Q + R] (ids) or [B, R] (per answer token)."""

    prompts: list[list[Message]]
    answers: list[str]
    input_ids: Any
    attention_mask: Any
    position_ids: Any
    query_width: int
    response_mask: Any
    logprobs: Any
    ref_logprobs: Any
    values: Any
    scores: Any
    rewards: Any
    kl: Any
    advantages: Any
    returns: Any
    entropy: Any
    value_hidden: Any = None  # the value backbone's features, when only the head learns


def pack(queries: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int, device):
    """Left-pad the queries to a common width Q and right-pad the answers to R, so answer token
    ``j`` of every row sits at column ``Q + j`` and is predicted by the logits at ``Q + j − 1``."""
    import torch

    Q = max(len(q) for q in queries)
    R = max(1, max(len(r) for r in responses))
    B = len(queries)
    ids = torch.full((B, Q + R), pad_id, dtype=torch.long)
    mask = torch.zeros((B, Q + R), dtype=torch.long)
    rmask = torch.zeros((B, R), dtype=torch.float)
    for b, (q, r) in enumerate(zip(queries, responses, strict=True)):
        ids[b, Q - len(q) : Q] = torch.tensor(q, dtype=torch.long)
        mask[b, Q - len(q) : Q] = 1
        if r:
            ids[b, Q : Q + len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, Q : Q + len(r)] = 1
            rmask[b, : len(r)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device), Q, rmask.to(device)


def answer_logprobs(model, ids, mask, positions, Q: int, *, with_entropy: bool = False):
    """Log-probabilities of the answer tokens (and the entropy of each answer position)."""
    import torch

    R = ids.shape[1] - Q
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=R + 1).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, ids[:, Q:, None]).squeeze(-1)
    if not with_entropy:
        return chosen, None
    entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


# ------------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON; no pickle)


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


# ------------------------------------------------------------------------------------------------
# the trainer


@dataclass
class PPOResult:
    out_dir: Path
    steps: int
    log: list[dict[str, Any]]
    seconds: float


class PPOTrainer:
    """PPO with a KL penalty to a frozen reference, GAE and a value model (see module doc)."""

    def __init__(self, config: PPOConfig, *, rewarder: Rewarder | None = None,
                 prompts: Sequence[Sequence[Message]] | None = None,
                 accelerator: Any = None) -> None:
        import torch
        from accelerate import Accelerator
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        from constitutional.models.hf import HFModel
        from constitutional.training import trainable_model_path

        config.validate()
        self.config = config
        self.out = Path(config.out)
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        acc = self.accelerator
        if config.rollout_batch % acc.num_processes:
            raise UserError(f"rollout_batch {config.rollout_batch} must divide over "
                            f"{acc.num_processes} processes", field="rollout_batch")
        torch.manual_seed(config.seed)
        policy_dir = trainable_model_path(config.policy)
        self.tokenizer = AutoTokenizer.from_pretrained(policy_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
        _no_dropout(policy)
        self.ref = None
        if config.lora:
            from peft import LoraConfig, get_peft_model

            policy = get_peft_model(policy, LoraConfig(
                r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                target_modules="all-linear", task_type="CAUSAL_LM"))
        else:
            self.ref = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
            self.ref.requires_grad_(False).eval().to(acc.device)
        value_spec = config.value_model or config.pm
        if value_spec is None:
            raise UserError("PPO needs a value model: give --pm (or value_model)", field="pm")
        value = AutoModelForSequenceClassification.from_pretrained(
            trainable_model_path(value_spec), num_labels=1, dtype=torch.float32)
        _no_dropout(value)
        if value.config.vocab_size != policy.config.vocab_size:
            raise UserError("the value model must share the policy's tokenizer (it reads the "
                            "policy's tokens)", field="value_model")
        if config.value_train == "head":  # the PM's features stay fixed; only the head learns
            value.requires_grad_(False)
            ValueHead(value).head.requires_grad_(True)
        if rewarder is None:
            if config.pm is None:
                raise UserError("PPO needs a reward: give --pm", field="pm")
            from constitutional.rl.preference import load_pm

            rewarder = load_pm(config.pm, device=str(acc.device))
        self.rewarder = rewarder
        vlr = config.value_learning_rate or 10 * config.learning_rate
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([
            {"params": params, "lr": config.learning_rate},
            {"params": [p for p in value.parameters() if p.requires_grad], "lr": vlr},
        ], weight_decay=0.0)
        warm = config.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.policy, self.value, self.optimizer = acc.prepare(policy, value, optimizer)
        self.scheduler = scheduler
        self.value_head = ValueHead(acc.unwrap_model(self.value))
        self.generator = HFModel(policy_dir, spec=config.policy, model=acc.unwrap_model(
            self.policy), tokenizer=self.tokenizer, device=str(acc.device))
        self.kl_ctl = AdaptiveKL(config.kl_coef, config.target_kl, config.kl_horizon)
        self.prompts = list(prompts) if prompts is not None else self._load_prompts()
        if not self.prompts:
            raise UserError("no prompts to train on", field="prompts")
        self.step = 0
        self.tb = _tensorboard(self.out / "tb") if acc.is_main_process else None

    # -- data --------------------------------------------------------------------------------

    def _load_prompts(self) -> list[list[Message]]:
        from constitutional.sources import load_prompts

        c = self.config
        red = [p.messages for p in load_prompts(c.prompts, limit=c.limit, seed=c.seed,
                                                split="train")]
        helpful: list[list[Message]] = []
        if c.helpful and c.helpful_ratio > 0:
            want = round(len(red) * c.helpful_ratio / (1 - c.helpful_ratio))
            helpful = [p.messages for p in load_prompts(c.helpful, limit=min(want, c.limit or want),
                                                        seed=c.seed, split="train")]
        return red + helpful

    def batch_prompts(self, step: int) -> list[list[Message]]:
        """This process's prompts for ``step``: epoch-wise permutations seeded by (seed, epoch),
        so the data position is a function of the step alone."""
        c, n = self.config, len(self.prompts)
        idx = []
        for k in range(step * c.rollout_batch, (step + 1) * c.rollout_batch):
            epoch, pos = divmod(k, n)
            perm = list(range(n))
            random.Random(c.seed * 7919 + epoch).shuffle(perm)
            idx.append(perm[pos])
        acc = self.accelerator
        share = c.rollout_batch // acc.num_processes
        mine = idx[acc.process_index * share : (acc.process_index + 1) * share]
        return [self.prompts[i] for i in mine]

    # -- experience ----------------------------------------------------------------------------

    def make_experience(self, step: int) -> tuple[Rollout, dict[str, float]]:
        import torch

        from constitutional.models import SamplingParams

        c, dev = self.config, self.accelerator.device
        prompts = self.batch_prompts(step)
        t0 = time.perf_counter()
        params = SamplingParams(temperature=c.temperature, top_p=c.top_p,
                                max_new_tokens=c.max_new_tokens,
                                seed=(c.seed * 1_000_003 + step) % 2**31)
        self.generator.model = self.accelerator.unwrap_model(self.policy)
        samples = self._sample(prompts, params)
        answers = [text for text, _ in samples]
        queries = [self.generator.encode(p) for p in prompts]
        ids, mask, positions, Q, rmask = pack(queries, [r for _, r in samples],
                                              self.tokenizer.pad_token_id, dev)
        t1 = time.perf_counter()
        scores = torch.tensor(self.rewarder.score_answers(prompts, answers), dtype=torch.float,
                              device=dev)
        with torch.no_grad():
            policy = self.accelerator.unwrap_model(self.policy)
            logprobs, entropy = answer_logprobs(policy, ids, mask, positions, Q,
                                                with_entropy=True)
            if self.ref is not None:
                ref_logprobs, _ = answer_logprobs(self.ref, ids, mask, positions, Q)
            else:
                with policy.disable_adapter():
                    ref_logprobs, _ = answer_logprobs(policy, ids, mask, positions, Q)
            value_hidden = self.value_head.hidden(ids, mask, positions)[:, Q - 1 : -1]
            values = self.value_head.head(value_hidden).squeeze(-1).float() * rmask
            rewards, kl = kl_penalised_rewards(scores, logprobs, ref_logprobs, rmask,
                                               self.kl_ctl.beta)
            advantages, returns = gae(rewards, values, rmask, c.gamma, c.lam)
            if c.whiten_advantages:
                advantages = whiten(advantages, rmask, all_sum=self._all_sum)
        t2 = time.perf_counter()
        rollout = Rollout(prompts, answers, ids, mask, positions, Q, rmask, logprobs * rmask,
                          ref_logprobs * rmask, values, scores, rewards, kl, advantages, returns,
                          entropy, value_hidden if c.value_train == "head" else None)
        return rollout, {"time_generate": t1 - t0, "time_score": t2 - t1}

    def _sample(self, prompts: Sequence[Sequence[Message]], params: Any,
                ) -> list[tuple[str, list[int]]]:
        """One answer per prompt, in one batched call. Sampling is seeded per (prompt, sample
        index), so a prompt that occurs c times in the batch is asked for c samples (n = c),
        and its k-th occurrence gets sample k (else the copies would be identical)."""
        from collections import Counter
        from dataclasses import replace

        keys = [json.dumps(p, sort_keys=True) for p in prompts]
        counts = Counter(keys)
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        samples: dict[str, list[tuple[str, list[int]]]] = {}
        for c in sorted(set(counts.values())):  # usually one call: every prompt once
            uniq = [k for k in counts if counts[k] == c]
            out = self.generator.generate_with_ids([prompts[first[k]] for k in uniq],
                                                   replace(params, n=c))
            for j, k in enumerate(uniq):
                samples[k] = out[j * c : (j + 1) * c]
        taken: Counter[str] = Counter()
        result = []
        for k in keys:
            result.append(samples[k][taken[k]])
            taken[k] += 1
        return result

    # -- learning ------------------------------------------------------------------------------

    def learn(self, r: Rollout, step: int) -> dict[str, float]:
        import torch

        c, acc = self.config, self.accelerator
        B = r.input_ids.shape[0]
        mb = max(1, c.minibatch // acc.num_processes)
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clip_frac": [],
                                         "approx_kl": []}
        self.policy.train()
        self.value.train()
        n_micro = 0
        for _ in range(c.ppo_epochs):
            order = torch.randperm(B, generator=g).tolist()
            for start in range(0, B, mb):
                i = torch.tensor(order[start : start + mb], device=r.input_ids.device)
                ids, mask, pos = r.input_ids[i], r.attention_mask[i], r.position_ids[i]
                rmask = r.response_mask[i]
                logprobs, _ = answer_logprobs(self.policy, ids, mask, pos, r.query_width)
                if r.value_hidden is not None:  # value_train="head": no backbone pass
                    values = self.value_head.head(r.value_hidden[i]).squeeze(-1).float()
                else:
                    values = ValueHead(acc.unwrap_model(self.value))(ids, mask, pos) \
                        if acc.num_processes == 1 else self._ddp_values(ids, mask, pos)
                    values = values[:, r.query_width - 1 : -1]
                # token means over the minibatch's tokens on all processes; × processes undoes
                # DDP's gradient average, so the update is the one-process update
                tokens = self._all_sum(rmask.sum().detach()).clamp(min=1)
                pg_loss, vf_loss, clip_frac = ppo_losses(
                    logprobs, r.logprobs[i], r.advantages[i], values, r.values[i], r.returns[i],
                    rmask, c.cliprange, c.cliprange_value, denom=tokens)
                loss = (pg_loss + c.vf_coef * vf_loss) * acc.num_processes / c.grad_accum
                acc.backward(loss)
                n_micro += 1
                if n_micro % c.grad_accum == 0:
                    self._optimizer_step()
                approx_kl = masked_mean(0.5 * (logprobs - r.logprobs[i]) ** 2, rmask, tokens)
                for k, v in (("policy_loss", pg_loss), ("value_loss", vf_loss),
                             ("clip_frac", clip_frac), ("approx_kl", approx_kl)):
                    stats[k].append(v.detach())
        if n_micro % c.grad_accum:
            self._optimizer_step()
        self.policy.eval()
        self.value.eval()
        # each process holds its share of every minibatch mean: the sum over processes is the mean
        means = self._all_sum(torch.stack([torch.stack(v).mean() for v in stats.values()]))
        return dict(zip(stats, means.tolist(), strict=True))

    def _all_sum(self, t):
        """``t`` summed over the processes (itself on one process)."""
        return self.accelerator.reduce(t, "sum") if self.accelerator.num_processes > 1 else t

    def _ddp_values(self, ids, mask, pos):
        """Values through the DDP-wrapped value model (so its gradients are all-reduced)."""
        hidden = self.value(input_ids=ids, attention_mask=mask, position_ids=pos,
                            output_hidden_states=True, use_cache=False).hidden_states[-1]
        return self.value_head.head(hidden).squeeze(-1).float()

    def _optimizer_step(self) -> None:
        acc = self.accelerator
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        acc.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- the loop ------------------------------------------------------------------------------

    def train(self, on_step: Callable[[dict[str, Any]], None] | None = None) -> PPOResult:
        c, acc = self.config, self.accelerator
        t_start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        if c.resume:
            self.load_latest()
        log_store = JsonlStore(self.out / LOG_FILE) if acc.is_main_process else None
        if acc.is_main_process:
            atomic_write_text(self.out / "ppo.config.json",
                              json.dumps(asdict(c), indent=2, default=str) + "\n")
        while self.step < c.steps:
            step = self.step
            rollout, times = self.make_experience(step)
            t0 = time.perf_counter()
            learn = self.learn(rollout, step)
            times["time_update"] = time.perf_counter() - t0
            row = self._step_stats(rollout, learn, times, step)
            if c.adaptive_kl:
                self.kl_ctl.update(row["kl"], c.rollout_batch)
            self.step = step + 1
            if log_store is not None:
                log_store.append([{"id": f"step-{step + 1}", **row}])
                if self.tb is not None:
                    for k, v in row.items():
                        if isinstance(v, int | float) and k != "step":
                            self.tb.add_scalar(f"ppo/{k}", v, step + 1)
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
        return PPOResult(self.out, self.step, rows, time.perf_counter() - t_start)

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
            "policy_loss": learn["policy_loss"],
            "value_loss": learn["value_loss"],
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
                "scheduler": self.scheduler.state_dict(), "python_rng": _py_rng_state()}
        atomic_write_text(tmp / "trainer_state.json", json.dumps(meta, default=str))
        if final.exists():
            import shutil

            shutil.rmtree(final)
        tmp.rename(final)
        log.info("checkpoint %s", final)

    def load_latest(self) -> bool:
        import torch
        from safetensors.torch import load_file, load_model

        ckpts = sorted((p for p in (self.out / "checkpoints").glob("step-*")
                        if p.is_dir() and not p.name.endswith(".tmp")
                        and (p / "trainer_state.json").exists()),
                       key=lambda p: int(p.name.split("-")[1]))
        if not ckpts:
            return False
        path = ckpts[-1]
        policy = self.accelerator.unwrap_model(self.policy)
        if self.config.lora:
            policy.load_state_dict(load_file(str(path / "policy.safetensors")), strict=False)
        else:
            load_model(policy, str(path / "policy.safetensors"))
        load_model(self.accelerator.unwrap_model(self.value), str(path / "value.safetensors"))
        _load_optimizer(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer")
                        else self.optimizer, path)
        meta = json.loads((path / "trainer_state.json").read_text())
        self.scheduler.load_state_dict(meta["scheduler"])
        self.kl_ctl.beta = meta["kl_coef"]
        self.step = meta["step"]
        torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_rng"])
        _set_py_rng_state(meta["python_rng"])
        log.info("resumed from %s (step %d)", path, self.step)
        return True


def _py_rng_state() -> list[Any]:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _set_py_rng_state(value: list[Any]) -> None:
    random.setstate((value[0], tuple(value[1]), value[2]))


def _no_dropout(model: Any) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(path))


def ppo_train(config: PPOConfig, *, rewarder: Rewarder | None = None,
              prompts: Sequence[Sequence[Message]] | None = None,
              on_step: Callable[[dict[str, Any]], None] | None = None) -> PPOResult:
    """Run PPO (resuming from the newest checkpoint in ``config.out`` when ``resume``)."""
    trainer = PPOTrainer(config, rewarder=rewarder, prompts=prompts)
    result = trainer.train(on_step=on_step)
    if result.log and math.isnan(result.log[-1]["reward_mean"]):
        log.warning("reward became NaN; lower the learning rate")
    return result
