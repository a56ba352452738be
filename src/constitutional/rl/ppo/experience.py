"""Making experience (OpenRLHF's split): one PPO step's rollout, ready to learn from.

Take the step's ``rollout_batch`` prompts (red-team and helpful, mixed), sample one answer each
with the policy through the model layer (batched, seeded per prompt and step), score the answers
with the reward (normally the PM), and compute, over the sampled tokens, the policy's and the
reference's log-probabilities and the value model's values. The **rewards** are the score at the
last token of the answer minus ``β · (log π − log π_ref)`` at every token (β from ``kl_coef``,
optionally adapted towards ``target_kl`` as in Ziegler et al.); **GAE** (γ, λ) gives the
advantages and returns, and the advantages are whitened over the whole rollout.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from constitutional.rl.ppo.config import PPOConfig

Message = dict[str, str]


class Rewarder(Protocol):
    """Anything that scores answers: ``score_answers(prompts, answers) -> [float]``."""

    def score_answers(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str],
                      ) -> list[float]: ...


# ------------------------------------------------------------------------------------------------
# the pure pieces: rewards, GAE, whitening (tested directly)


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


def whiten(x, mask, eps: float = 1e-8, all_sum=None):
    """Zero mean, unit variance over the masked entries; ``all_sum`` sums a tensor over the
    processes, so that all of them use the statistics of the whole batch."""
    import torch

    all_sum = all_sum or (lambda t: t)
    n, total = all_sum(torch.stack([mask.sum(), (x * mask).sum()]).double())
    mean = (total / n.clamp(min=1)).to(x.dtype)
    var = (all_sum(((x - mean) ** 2 * mask).sum().double()) / n.clamp(min=1)).to(x.dtype)
    return (x - mean) * (var + eps).rsqrt() * mask


def explained_variance(values, returns, mask, all_sum=None) -> float | None:
    """1 − Var(returns − values) / Var(returns) over the masked entries (of all processes):
    1 is a perfect critic, 0 one no better than a constant, below 0 a harmful one (the
    diagnostic of Stable-Baselines3 and of TRL's old PPO). None where the returns do not vary."""
    import torch

    all_sum = all_sum or (lambda t: t)
    m = mask.double()
    r, d = returns.double() * m, (returns - values).double() * m
    n, sr, sr2, sd, sd2 = all_sum(torch.stack([m.sum(), r.sum(), (r * r).sum(), d.sum(),
                                                (d * d).sum()])).tolist()
    if n < 2:
        return None
    var_r = sr2 / n - (sr / n) ** 2
    var_d = sd2 / n - (sd / n) ** 2
    return 1.0 - var_d / var_r if var_r > 1e-12 else None


class AdaptiveKL:
    """Ziegler et al.'s controller: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon)."""

    def __init__(self, beta: float, target: float, horizon: int) -> None:
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.beta *= 1 + error * n / self.horizon


# ------------------------------------------------------------------------------------------------
# the value model, and batches of token ids


class ValueHead:
    """Per-token values from a one-label sequence classifier (the PM): its scalar head applied
    at every position of its backbone's last hidden state."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.backbone = getattr(model, model.base_model_prefix)
        self.head = getattr(model, "score", None) or model.classifier

    def hidden(self, input_ids, attention_mask, position_ids):
        """The backbone's last hidden state, in float32 (the head's dtype) whatever the
        backbone's dtype (a frozen backbone may run in bfloat16)."""
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False).last_hidden_state.float()

    def __call__(self, input_ids, attention_mask, position_ids):
        return self.head(self.hidden(input_ids, attention_mask, position_ids)).squeeze(-1).float()


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


#: Logits that exist at once in :func:`answer_logprobs` (64 MiB in float32): a chunk holds
#: ``LOGPROB_CHUNK_LOGITS // vocabulary`` answer positions (110 with a 152k vocabulary).
LOGPROB_CHUNK_LOGITS = 2**24


def answer_logprobs(model, ids, mask, positions, Q: int, *, with_entropy: bool = False,
                    chunk: int | None = None):
    """Log-probabilities of the answer tokens (and the entropy of each answer position).

    The model runs once for its last hidden states (``logits_to_keep=1``: no logits for the
    answer); the LM head then maps ``chunk`` answer positions at a time to float32 logits, whose
    log-sum-exp gives the sampled tokens' log-probabilities. Under autograd each chunk is
    recomputed in the backward pass (activation checkpointing), so at no time do the logits of
    more than ``chunk`` positions (default: :data:`LOGPROB_CHUNK_LOGITS` logits) exist: the full-vocabulary
    [B, R, V] float32 tensors (logits, log-softmax, its exponent: ~10 GB each for 64 rows of
    256 tokens with a 152k vocabulary) are never built."""
    import torch

    R = ids.shape[1] - Q
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, Q - 1 : -1]  # the states that predict answer tokens
    head = _unwrap(model).get_output_embeddings()
    B = hidden.shape[0]
    flat, targets = hidden.reshape(B * R, -1), ids[:, Q:].reshape(B * R)
    chunk = chunk or max(1, LOGPROB_CHUNK_LOGITS // head.out_features)
    chosen, entropy = [], []
    for start in range(0, B * R, chunk):
        h, t = flat[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            from torch.utils.checkpoint import checkpoint

            chosen.append(checkpoint(_chosen_logprobs, head, h, t, use_reentrant=False))
            if with_entropy:
                with torch.no_grad():
                    entropy.append(_logprobs_and_entropy(head, h, t)[1])
        else:
            c, e = _logprobs_and_entropy(head, h, t) if with_entropy else (
                _chosen_logprobs(head, h, t), None)
            chosen.append(c)
            entropy.append(e)
    chosen_t = torch.cat(chosen).view(B, R)
    return chosen_t, torch.cat(entropy).view(B, R) if with_entropy else None


def _chosen_logprobs(head, h, targets):
    """log p(target) for each row of hidden states ``h``: float32 logits − their log-sum-exp."""
    logits = head(h).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _logprobs_and_entropy(head, h, targets):
    """log p(target) and the entropy −Σ p log p = lse − Σ p·logit, with two vocabulary-wide
    tensors alive at most (no autograd)."""
    logits = head(h).float()
    lse = logits.logsumexp(-1)
    chosen = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    p = (logits - lse[:, None]).exp_()
    return chosen, lse - p.mul_(logits).sum(-1)


def _unwrap(model):
    """The causal LM inside DDP / PEFT wrappers (whose LM head maps hidden states to logits)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    get_base = getattr(model, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else model


# ------------------------------------------------------------------------------------------------
# prompts and answers


def load_training_prompts(config: PPOConfig) -> list[list[Message]]:
    """The red-team prompts, then helpful ones in ``helpful_ratio`` of the mix."""
    from constitutional.prompts.sources import load_prompts

    c = config
    red = [p.messages for p in load_prompts(c.prompts, limit=c.limit, seed=c.seed,
                                            split="train")]
    helpful: list[list[Message]] = []
    if c.helpful and c.helpful_ratio > 0:
        want = round(len(red) * c.helpful_ratio / (1 - c.helpful_ratio))
        cap = c.helpful_limit or c.limit or want
        helpful = [p.messages for p in load_prompts(c.helpful, limit=min(want, cap),
                                                    seed=c.seed, split="train")]
    return red + helpful


def step_prompts(prompts: Sequence[list[Message]], step: int, config: PPOConfig,
                 process_index: int = 0, num_processes: int = 1) -> list[list[Message]]:
    """A process's prompts for ``step``: epoch-wise permutations seeded by (seed, epoch), so
    the data position is a function of the step alone."""
    c, n = config, len(prompts)
    idx = []
    for k in range(step * c.rollout_batch, (step + 1) * c.rollout_batch):
        epoch, pos = divmod(k, n)
        perm = list(range(n))
        random.Random(c.seed * 7919 + epoch).shuffle(perm)
        idx.append(perm[pos])
    share = c.rollout_batch // num_processes
    mine = idx[process_index * share : (process_index + 1) * share]
    return [prompts[i] for i in mine]


def sample_answers(generator: Any, prompts: Sequence[Sequence[Message]], params: Any,
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
        out = generator.generate_with_ids([prompts[first[k]] for k in uniq], replace(params, n=c))
        for j, k in enumerate(uniq):
            samples[k] = out[j * c : (j + 1) * c]
    taken: Counter[str] = Counter()
    result = []
    for k in keys:
        result.append(samples[k][taken[k]])
        taken[k] += 1
    return result


# ------------------------------------------------------------------------------------------------
# a step's experience


class ExperienceMaker:
    """Turns a step's prompts into a :class:`Rollout`: answers from the policy (through
    ``generator``), scores from ``rewarder``, log-probabilities of the policy and the reference
    (``ref``, or with LoRA the policy with its adapters disabled), values, rewards and GAE.
    ``all_sum`` sums a tensor over the processes (for whitening)."""

    def __init__(self, config: PPOConfig, *, generator: Any, tokenizer: Any, ref: Any,
                 value_head: ValueHead, rewarder: Rewarder, kl_ctl: AdaptiveKL, device: Any,
                 all_sum: Callable[[Any], Any]) -> None:
        self.config, self.generator, self.tokenizer, self.ref = config, generator, tokenizer, ref
        self.value_head, self.rewarder, self.kl_ctl = value_head, rewarder, kl_ctl
        self.device, self.all_sum = device, all_sum

    def make(self, prompts: list[list[Message]], step: int, policy: Any,
             ) -> tuple[Rollout, dict[str, float]]:
        """``step``'s rollout from the (unwrapped) ``policy``, and the seconds spent generating
        and scoring."""
        import torch

        t0 = time.perf_counter()
        params = self.config.sampling(step)
        self.generator.load_policy(policy)
        samples = sample_answers(self.generator, prompts, params)
        answers = [text for text, _ in samples]
        queries = [self.generator.encode(p) for p in prompts]
        ids, mask, positions, Q, rmask = pack(queries, [r for _, r in samples],
                                              self.tokenizer.pad_token_id, self.device)
        t1 = time.perf_counter()
        scores = torch.tensor(self.rewarder.score_answers(prompts, answers), dtype=torch.float,
                              device=self.device)
        with torch.no_grad():
            rollout = self._score_tokens(policy, prompts, answers, ids, mask, positions, Q,
                                         rmask, scores)
        t2 = time.perf_counter()
        return rollout, {"time_generate": t1 - t0, "time_score": t2 - t1}

    def _score_tokens(self, policy, prompts, answers, ids, mask, positions, Q: int, rmask,
                      scores) -> Rollout:
        """Log-probabilities, values, rewards, advantages and returns of the answer tokens."""
        c = self.config
        logprobs, entropy = answer_logprobs(policy, ids, mask, positions, Q, with_entropy=True)
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
            advantages = whiten(advantages, rmask, all_sum=self.all_sum)
        return Rollout(prompts, answers, ids, mask, positions, Q, rmask, logprobs * rmask,
                       ref_logprobs * rmask, values, scores, rewards, kl, advantages, returns,
                       entropy, value_hidden if c.value_train == "head" else None)
