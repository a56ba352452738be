"""RL-CAI: answer pairs from the policy, AI preference labels from a feedback model.

* :mod:`.sample` — ``cai rl sample``: two answers per prompt → the pairs dataset;
* :mod:`.label` — ``cai rl label``: soft (A)/(B) preference labels read from log-probabilities,
  principle ensembles, both orders, chain of thought with clamping;
* :mod:`.feedback` — the feedback model's P(A) for one question (used by ``label`` and by the Elo
  judge of :mod:`constitutional.evaluate.elo`);
* :mod:`.prompts` — every feedback prompt text;
* :mod:`.ppo`, :mod:`.grpo`, :mod:`.dpo` — RL of the SL-CAI policy: our PPO, TRL's GRPO and
  RLOO, TRL's DPO; :mod:`.rewards` — the online rewards (PM, the constitution as a judge,
  callables).
"""
