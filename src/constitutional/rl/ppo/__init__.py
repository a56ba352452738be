"""``cai rl ppo``: PPO of the SL-CAI policy against the preference model (the paper's RL-CAI).

TRL removed its PPOTrainer, so this is ours, split as in OpenRLHF; each step:

1. **Experience** (:mod:`.experience`): the step's prompts, one sampled answer each, the PM's
   scores, the policy's and the reference's log-probabilities and the values; rewards with a KL
   penalty (β from ``kl_coef``, optionally adaptive), GAE advantages and returns.
2. **Learning** (:mod:`.trainer`): ``ppo_epochs`` passes of clipped policy and value losses over
   shuffled minibatches; the log, checkpoints and exact resume.

The settings (:mod:`.config`) are declared once: :class:`PPOSettings` is a run's ``rl:`` section,
:class:`PPOConfig` adds what a run supplies.

Distribution: under ``accelerate launch`` each process takes its share of every rollout batch
and gradients are averaged by accelerate (DDP); logged statistics are gathered over processes.
Advantages are whitened with the statistics of the whole rollout, and each minibatch's token
means are taken over the tokens of all processes, so with one minibatch per epoch N processes
compute the same update as one. With several minibatches each process draws its share of a
minibatch from its own rows: the same size and statistics, other rows than one process would
draw.
"""

from constitutional.rl.ppo.config import PPOConfig, PPOSettings
from constitutional.rl.ppo.experience import (
    AdaptiveKL,
    ExperienceMaker,
    Rewarder,
    Rollout,
    ValueHead,
    answer_logprobs,
    explained_variance,
    gae,
    kl_penalised_rewards,
    pack,
    whiten,
)
from constitutional.rl.ppo.trainer import (
    LOG_FILE,
    PPOResult,
    PPOTrainer,
    masked_mean,
    ppo_losses,
    ppo_train,
)

__all__ = [
    "LOG_FILE",
    "AdaptiveKL",
    "ExperienceMaker",
    "PPOConfig",
    "PPOResult",
    "PPOSettings",
    "PPOTrainer",
    "Rewarder",
    "Rollout",
    "ValueHead",
    "answer_logprobs",
    "explained_variance",
    "gae",
    "kl_penalised_rewards",
    "masked_mean",
    "pack",
    "ppo_losses",
    "ppo_train",
    "whiten",
]
