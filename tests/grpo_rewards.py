"""A reward function named as ``module:function`` by the GRPO tests (TRL's reward signature)."""

from __future__ import annotations

#: the word rewarded; set by the test before training
WORD = {"value": ""}


def word_count(prompts, completions, **kwargs):
    """How often each answer contains the word."""
    return [float(c[0]["content"].count(WORD["value"])) for c in completions]


#: what ``record`` was given, call by call
SEEN: list[tuple[list, list]] = []


def record(prompts, completions, **kwargs):
    """Keeps what TRL passed, rewards nothing."""
    SEEN.append((list(prompts), [c[0]["content"] for c in completions]))
    return [0.0] * len(completions)


not_callable = 3
