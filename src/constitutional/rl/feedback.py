"""The feedback model's answer to the RL-CAI question, as P(A): one implementation, used by
``cai rl label`` (:mod:`constitutional.rl.label`) and by the Elo judge
(:class:`constitutional.evaluate.elo.FeedbackJudge`).

* **The question** (:func:`constitutional.rl.prompts.question`): a conversation, a principle and
  the two responses as options (A) and (B), in order ``"ab"`` (response_a is (A)) and, for both
  orders, swapped (``"ba"``). :meth:`FeedbackScorer.questions` builds them.
* **The demonstrations** before it: :func:`few_shot_block`, drawn (seeded) once per ensemble
  member ``k`` and the same for every comparison, so that their prefix can be shared; and the
  ``k`` principles of a comparison, :func:`pair_principles`, seeded by its conversation.
* **The answer**: :meth:`FeedbackScorer.score` reads the log-probabilities ``a`` and ``b`` of the
  next tokens ``A`` and ``B`` after the answer prefix with the model's ``score`` verb (one
  forward pass per question), optionally after the model's own chain-of-thought reasoning. All
  the questions given to one call go to ``score`` in batches of ``batch_size`` (by default all in
  one), each after the same demonstrations, so a backend that shares a common prefix across a
  batch computes them once.
* **The probabilities**: P(A) = exp(a) / (exp(a) + exp(b)) (:func:`option_probability`); the
  probability that response_a is preferred is P(A) in order ``"ab"`` and 1 − P(A) in ``"ba"``
  (:func:`prob_response_a`); a comparison's is the mean of those over its principles and orders
  (:func:`ensemble`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from constitutional.constitution import Constitution
from constitutional.core.errors import UserError
from constitutional.core.io import stable_hash
from constitutional.core.messages import Message
from constitutional.models import LanguageModel, SamplingParams
from constitutional.models.base import Prompt
from constitutional.rl import prompts as P

ORDERS = ("ab", "ba")


# ------------------------------------------------------------------------------------------------
# the maths (pure functions)


def option_probability(logprob_a: float, logprob_b: float) -> float:
    """P(A) = exp(a) / (exp(a) + exp(b)), computed stably (0.5 when both are -inf)."""
    if logprob_a == logprob_b:
        return 0.5
    m = max(logprob_a, logprob_b)
    ea, eb = math.exp(logprob_a - m), math.exp(logprob_b - m)
    return ea / (ea + eb)


def prob_response_a(p_first: float, order: str) -> float:
    """The probability that response_a is preferred, from P(option A) in ``order``."""
    return p_first if order == "ab" else 1.0 - p_first


def ensemble(probabilities: Sequence[float]) -> float:
    """The mean of per-principle, per-order probabilities (the soft label, the judge's P)."""
    if not probabilities:
        raise ValueError("nothing to average")
    return sum(probabilities) / len(probabilities)


# ------------------------------------------------------------------------------------------------
# the model, the demonstrations and the principles


def special_tokens(lm: LanguageModel) -> list[str]:
    """The model's special-token strings, to be quoted inside untrusted text."""
    tok = getattr(lm, "tokenizer", None)
    if tok is None:
        return []
    found = set(getattr(tok, "all_special_tokens", []) or [])
    found |= {str(t) for t in (getattr(tok, "added_tokens_decoder", {}) or {}).values()}
    return sorted(t for t in found if len(t) > 1)


def resolve_format(lm: LanguageModel, prompt_format: str) -> str:
    """``chat`` or ``raw``: ``auto`` is chat when the model has a chat template (or no
    tokenizer, as behind an API)."""
    if prompt_format != "auto":
        return prompt_format
    tok = getattr(lm, "tokenizer", None)
    return "chat" if tok is None or getattr(tok, "chat_template", None) else "raw"


def _examples(constitution: Constitution, n: int, cot: bool) -> list[Any]:
    """The constitution's feedback (or chain-of-thought) demonstrations, at least ``n`` of them."""
    examples = constitution.cot_examples if cot else constitution.feedback_examples
    if n > len(examples):
        what = "chain-of-thought" if cot else "feedback"
        raise UserError(f"asked for {n} demonstrations but constitution {constitution.name!r} "
                        f"has {len(examples)} {what} demonstrations", field="few_shot")
    return examples


def few_shot_block(constitution: Constitution, n: int, k: int, seed: int,
                   cot: bool) -> tuple[list[P.Shot], list[str]]:
    """Member ``k``'s demonstrations: ``n`` drawn (seeded) from the constitution, each with its
    own sampled principle. The same for every pair, so their prefix can be shared."""
    if n == 0:
        return [], []
    examples = _examples(constitution, n, cot)
    rng = random.Random(stable_hash("few-shot", seed, k, cot))
    chosen = rng.sample(examples, n)
    shots, ids = [], []
    for example in chosen:
        principle = constitution.sample_feedback(rng, 1)[0]
        reasoning = getattr(example, "reasoning", None) if cot else None
        shots.append(P.shot(example.messages, principle.text, example.options[:2],
                            example.answer, reasoning))
        ids.append(f"{example.id}:{principle.id}")
    return shots, ids


def pointwise_shot_block(constitution: Constitution, n: int, k: int, seed: int) -> list[P.Shot]:
    """Member ``k``'s pointwise demonstrations: ``n`` feedback examples drawn (seeded), each
    shown with its preferred reply (answer ``Yes``) or the other one (``No``), a coin each, in
    a seeded order, under its own sampled principle."""
    if n == 0:
        return []
    examples = _examples(constitution, n, False)
    rng = random.Random(stable_hash("few-shot-pointwise", seed, k))
    shots = []
    for example in rng.sample(examples, n):
        principle = constitution.sample_feedback(rng, 1)[0]
        preferred = example.answer_index
        meets = rng.random() < 0.5
        other = next(o for j, o in enumerate(example.options) if j != preferred)
        reply = example.options[preferred] if meets else other
        shots.append(P.pointwise_shot(example.messages, reply, principle.text, meets,
                                      rng.choice(ORDERS)))
    return shots


def pair_principles(constitution: Constitution, messages: list[Message], k: int,
                    seed: int) -> list[Any]:
    """The ``k`` principles of a pair, seeded by its conversation (so its swap gets the same)."""
    rng = random.Random(stable_hash("principles", seed, messages))
    return constitution.sample_feedback(rng, k)


# ------------------------------------------------------------------------------------------------
# asking


@dataclass
class Question:
    """One question put to the feedback model: comparison ``item`` of the caller's batch, under
    the principle of ensemble member ``k``, with the responses in ``order``; ``cot`` and
    ``logprobs`` (of the letters A and B) are filled in by :meth:`FeedbackScorer.score`."""

    item: int
    k: int
    order: str
    text: str
    cot: str | None = None
    logprobs: tuple[float, float] = (0.0, 0.0)

    @property
    def p_first(self) -> float:
        """P(A)."""
        return option_probability(*self.logprobs)

    @property
    def p_response_a(self) -> float:
        """The probability that response_a is preferred."""
        return prob_response_a(self.p_first, self.order)


@dataclass(frozen=True)
class ChainOfThought:
    """How the model reasons before it answers (``Let's think step by step:``)."""

    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0

    def params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                              stop=P.COT_STOP, seed=self.seed)


class FeedbackScorer:
    """A feedback model asked the (A)/(B) question: builds the questions and reads P(A)."""

    def __init__(self, lm: LanguageModel, prompt_format: str = "auto") -> None:
        self.lm = lm
        self.mode = resolve_format(lm, prompt_format)
        self.special = special_tokens(lm)

    def questions(self, item: int, k: int, messages: Sequence[Message], principle: str,
                  response_a: str, response_b: str,
                  orders: Sequence[str] = ORDERS) -> list[Question]:
        """The questions about one comparison under one principle, one per order."""
        out = []
        for order in orders:
            options = (response_a, response_b) if order == "ab" else (response_b, response_a)
            out.append(Question(item, k, order,
                                P.question(messages, principle, options, self.special)))
        return out

    def pointwise_questions(self, item: int, k: int, messages: Sequence[Message],
                            principle: str, answer: str,
                            orders: Sequence[str] = ORDERS) -> list[Question]:
        """The pointwise questions about one answer under one principle, one per order; their
        ``p_response_a`` is P(the answer meets the principle) (``Yes`` is option A in ``"ab"``)."""
        return [Question(item, k, order, P.pointwise_question(messages, answer, principle, order,
                                                              self.special))
                for order in orders]

    def score(self, questions: Sequence[Question], shots: Sequence[P.Shot], *,
              cot: ChainOfThought | None = None, batch_size: int | None = None) -> None:
        """Ask every question after ``shots``; fill in its ``logprobs`` (and ``cot``).

        With ``cot`` the reasoning of all the questions is generated in one call first. The
        answers are scored ``batch_size`` questions per ``score`` call (default: all in one)."""
        contexts: list[Prompt]
        if cot is not None:
            reasoning = self.lm.generate([P.cot_prompt(shots, q.text, self.mode)
                                          for q in questions], cot.params())
            for q, text in zip(questions, reasoning, strict=True):
                q.cot = P.clean_reasoning(text, self.special)
            contexts = [P.cot_answer_prompt(shots, q.text, q.cot or "", self.mode)
                        for q in questions]
        else:
            contexts = [P.answer_prompt(shots, q.text, self.mode) for q in questions]
        size = batch_size or max(len(contexts), 1)
        for start in range(0, len(contexts), size):
            scores = self.lm.score(contexts[start : start + size], list(P.LETTERS))
            for q, (a, b) in zip(questions[start : start + size], scores, strict=True):
                q.logprobs = (a, b)
