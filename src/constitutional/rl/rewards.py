"""The rewards of online RL (``rl.reward``): the preference model, the constitution as a live
judge, and any Python callable, combined with weights.

Each reward is a callable with TRL's ``reward_funcs`` signature, ``f(prompts, completions,
**kwargs) -> list[float]`` (conversational prompts and completions, as TRL passes them), so TRL's
``GRPOTrainer`` and ``RLOOTrainer`` call it, weight it (``reward_weights``) and log it as
``rewards/<name>/mean`` themselves. Each also has ``score_answers(prompts, answers)``, the
:class:`~constitutional.rl.ppo.Rewarder` protocol, so the same objects can score PPO's rollouts.

* ``pm``: the trained preference model's score of the answer (the paper's RL-CAI).
* ``judge``: the constitution as the reward (d-RLAIF, Lee et al. 2023). The feedback model is
  asked ``rl label``'s question, with the same :class:`~constitutional.rl.feedback.FeedbackScorer`,
  demonstrations, principles and both orders, comparing the sampled answer with a **reference
  answer** to the same prompt: the starting policy's greedy answer, generated once per prompt
  before training. The reward is P(sampled answer preferred), in [0, 1], averaged over
  ``principles`` principles and both orders. The principles are drawn per step and prompt
  (seeded), so every answer in one GRPO/RLOO group is judged under the same principle and their
  group-relative advantages compare like with like.

  The **pointwise** form (``grpo.judge_form: pointwise``) asks instead whether the answer meets
  the principle, options ``Yes``/``No`` in both orders, after pointwise demonstrations drawn
  from the constitution's feedback examples (the preferred reply is a ``Yes``, the other a
  ``No``); the reward is P(Yes) and no reference answer is needed. Pairwise is the default:
  the constitution's principles are comparative ("which reply is safer …"), pairwise uses them
  as written, as the labeller does, and ``bench/judge_form.py`` measures the two forms on
  answers that people ranked (figures in the README).
* ``module:function``: any importable callable with TRL's reward signature.

A judge whose feedback model is the policy's own starting checkpoint is that checkpoint's frozen
weights, loaded separately, not the weights being trained: the log says so.
"""

from __future__ import annotations

import importlib
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

from constitutional.core.errors import UserError
from constitutional.core.io import stable_hash
from constitutional.core.messages import Message

log = logging.getLogger(__name__)

BUILT_IN = ("pm", "judge")
#: ``grpo.judge_form``: the judge reward's question
JudgeForm = Literal["pairwise", "pointwise"]
JUDGE_FORMS: tuple[str, ...] = get_args(JudgeForm)


def parse_rewards(value: Any) -> dict[str, float]:
    """``rl.reward`` as ``{name: weight}``: a name (``judge``), names with weights
    (``pm=0.5,judge=1``), or a mapping. Names are ``pm``, ``judge`` or ``module:function``."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        out: dict[str, Any] = {}
        for part in parts:
            name, _, weight = part.partition("=")
            out[name.strip()] = weight.strip() if weight else 1.0
        value = out
    if not isinstance(value, dict) or not value:
        raise ValueError("expected a reward name (pm, judge or module:function), names with "
                         "weights (pm=0.5,judge=1) or a mapping of them")
    rewards: dict[str, float] = {}
    for name, weight in value.items():
        name = str(name).strip()
        if name not in BUILT_IN and (":" not in name or not all(name.split(":", 1))):
            raise ValueError(f"unknown reward {name!r}: use pm, judge or module:function")
        try:
            rewards[name] = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"the weight of {name!r} must be a number, got {weight!r}") from None
    return rewards


def answer_text(completion: Any) -> str:
    """A completion's text, conversational (``[{"role": "assistant", ...}]``) or plain."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def _conversation(prompt: Any) -> list[Message]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


class _Reward(ABC):
    """TRL's reward signature on top of ``score_answers``."""

    __name__ = "reward"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 **kwargs: Any) -> list[float]:
        state = kwargs.get("trainer_state")
        self.step = int(getattr(state, "global_step", 0) or 0)
        return self.score_answers([_conversation(p) for p in prompts],
                                  [answer_text(c) for c in completions])

    @abstractmethod
    def score_answers(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str],
                      ) -> list[float]: ...


class PMReward(_Reward):
    """The preference model's score of each answer."""

    __name__ = "pm"

    def __init__(self, path: str, device: str | None = None) -> None:
        from constitutional.rl.preference import load_pm

        self.pm = load_pm(path, device=device)

    def score_answers(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str],
                      ) -> list[float]:
        return self.pm.score_answers(prompts, answers)


class JudgeReward(_Reward):
    """The constitution as the reward: P(answer preferred over the reference answer) by the
    feedback model, asked ``rl label``'s question (see the module docstring)."""

    __name__ = "judge"

    def __init__(self, lm: Any, label: Any, references: dict[str, str] | None = None, *,
                 form: str = "pairwise") -> None:
        from constitutional.rl.feedback import (
            ORDERS,
            FeedbackScorer,
            few_shot_block,
            pointwise_shot_block,
        )
        from constitutional.rl.label import resolve_constitution

        if form not in JUDGE_FORMS:
            raise UserError(f"unknown judge form {form!r}: use {' or '.join(JUDGE_FORMS)}",
                            field="judge_form")
        self.label = label
        self.form = form
        self.constitution = resolve_constitution(label)
        self.scorer = FeedbackScorer(lm, label.prompt_format)
        if form == "pairwise":
            self.shots = [few_shot_block(self.constitution, label.few_shot, k, label.seed,
                                         False)[0] for k in range(label.principles)]
        else:
            self.shots = [pointwise_shot_block(self.constitution, label.few_shot, k, label.seed)
                          for k in range(label.principles)]
        self.orders = ORDERS if label.both_orders else ORDERS[:1]
        self.references = references or {}
        self.step = 0
        self.calls = 0

    def reference(self, prompt: Sequence[Message]) -> str:
        key = prompt_key(prompt)
        if key not in self.references:
            raise UserError("the judge has no reference answer for a prompt it was asked about",
                            field="reward")
        return self.references[key]

    def score_answers(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str],
                      ) -> list[float]:
        from constitutional.rl.feedback import ensemble

        self.calls += 1
        cfg = self.label
        totals: list[list[float]] = [[] for _ in answers]
        for k in range(cfg.principles):
            questions = []
            for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
                rng = random.Random(stable_hash("judge", cfg.seed, self.step, list(prompt)))
                principle = self.constitution.sample_feedback(rng, cfg.principles)[k]
                if self.form == "pointwise":
                    questions += self.scorer.pointwise_questions(
                        i, k, list(prompt), principle.text, answer, self.orders)
                else:
                    questions += self.scorer.questions(i, k, list(prompt), principle.text,
                                                       answer, self.reference(prompt),
                                                       self.orders)
            # one score call per member: every question after the same demonstrations
            self.scorer.score(questions, self.shots[k])
            for q in questions:
                totals[q.item].append(q.p_response_a)
        return [ensemble(t) for t in totals]


def prompt_key(prompt: Sequence[Message]) -> str:
    return stable_hash("prompt", [{"role": m["role"], "content": m["content"]} for m in prompt])


def load_callable(name: str) -> Callable[..., list[float]]:
    """``module:function`` (a callable attribute, dotted for nested ones), imported."""
    module_name, _, attr = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise UserError(f"cannot import the reward {name!r}: {err}", field="reward") from err
    if not callable(obj):
        raise UserError(f"the reward {name!r} is not callable", field="reward")
    return obj


def reference_answers(policy: str, prompts: Sequence[Sequence[Message]], max_new_tokens: int,
                      store_file: Any, seed: int = 0) -> dict[str, str]:
    """The starting policy's greedy answer to each prompt (the judge's reference), kept in
    ``store_file`` (JSONL) so that a resumed run reuses them."""
    from constitutional.core.io import JsonlStore
    from constitutional.models import SamplingParams, load_model

    store = JsonlStore(store_file)
    unique = {prompt_key(p): list(p) for p in prompts}
    todo = [(k, p) for k, p in unique.items() if k not in store]
    if todo:
        log.info("judge: the reference answers of %d prompts, by the starting policy", len(todo))
        lm = load_model(policy)
        answers = lm.generate([p for _, p in todo],
                              SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                                             seed=seed))
        store.append({"id": k, "prompt": p, "answer": a}
                     for (k, p), a in zip(todo, answers, strict=True))
        del lm
    return {r["id"]: r["answer"] for r in store.records() if r["id"] in unique}


def build_rewards(names: dict[str, float], *, pm: str | None, judge: Callable[[], JudgeReward],
                  device: str | None = None) -> list[Callable[..., list[float]]]:
    """The reward functions, in ``names``' order (TRL applies the weights); ``judge`` builds the judge
    (only when it is asked for: it loads the feedback model)."""
    funcs: list[Callable[..., list[float]]] = []
    for name in names:
        if name == "pm":
            if not pm:
                raise UserError("the pm reward needs a preference model (--pm)", field="pm")
            funcs.append(PMReward(pm, device))
        elif name == "judge":
            funcs.append(judge())
        else:
            funcs.append(load_callable(name))
    return funcs
