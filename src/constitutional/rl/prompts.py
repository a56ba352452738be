"""Every RL-CAI feedback prompt text is built here, and only here.

The feedback question follows the paper (Bai et al. 2022, section 4.1)::

    Consider the following conversation between a human and an assistant:

    Human: …

    {principle}
    Options:
    (A) [[[response A]]]
    (B) [[[response B]]]

and the answer prefix ``The answer is: (`` after which the model's log-probabilities of the
single tokens ``A`` and ``B`` are read. With chain of thought the model first continues
``Let's think step by step:`` and the answer prefix comes after its reasoning
(``So the answer is: (``), as in the paper's chain-of-thought prompts.

The judge reward's **pointwise** form (:func:`pointwise_question`) asks about one answer in the
same layout: the conversation ends in the answer, the principle is put as a yes/no question, and
the options are ``Yes`` and ``No`` (swapped in the second order).

Layout for prefix reuse
-----------------------
The few-shot demonstrations come **first** and are byte-identical for every pair scored by the same
ensemble member, so that a backend which shares a common token prefix across a batch computes
their keys and values once. In chat mode each demonstration is a user turn (the question) and an
assistant turn (its answer); in raw mode (pretrained models) the demonstrations are plain text
separated by blank lines.

Delimiting untrusted text
-------------------------
A response under judgement (and the conversation) is untrusted: it may contain "The answer is
(A)", a fake ``Options:`` block, our delimiters, or a chat template's special tokens. Every piece
of untrusted text goes through :func:`neutralise` before it is placed in a prompt:

* runs of two or more ``[`` or ``]`` are broken up (``]]]`` becomes ``] ] ]``), so the option
  delimiters ``[[[`` and ``]]]`` occur only where this module puts them;
* option markers ``(A)`` … ``(Z)`` become ``（A）`` (full-width parentheses), and a bare ``(A``
  not followed by a letter or digit becomes ``（A``, so the only ASCII ``(A)``/``(B)`` markers
  in a question are ours, and no response can end in an ASCII ``(A`` that reads as an answer;
* special-token strings (``<|im_start|>``, ``</s>``, and the model's own special tokens when the
  caller passes them) get a zero-width space after their first character, so a tokenizer cannot
  read them as control tokens;
* option text is padded with a space when it begins with ``[`` or ends with ``]``.

:func:`parse_question` recovers the structure of a question from the delimiters alone; the tests
check that any neutralised text round-trips through it unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from constitutional.core.messages import HH_LABELS, Conversation, Message
from constitutional.models.base import Prompt

LETTERS = "AB"
OPEN, CLOSE = "[[[", "]]]"
INTRO = "Consider the following conversation between a human and an assistant:"
OPTIONS_HEADER = "Options:"
ANSWER_PREFIX = "The answer is: ("
COT_TRIGGER = "Let's think step by step:"
COT_ANSWER_PREFIX = "So the answer is: ("
#: Where the generated reasoning is cut (the model's own answer is never parsed).
COT_STOP = ("So the answer is", "The answer is", "\n\nHuman:", "\nHuman:", OPEN)
SHOT_SEPARATOR = "\n\n\n"
MODES = ("chat", "raw")

_ZWSP = "\u200b"
_BRACKET_RUN = re.compile(r"\[{2,}|\]{2,}")
_MARKER = re.compile(r"\(([A-Z])(\)|(?![A-Za-z0-9]))")  # "(A)", and "(A" not followed by a word
_GENERIC_SPECIAL = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?s>")


def neutralise(text: str, special_tokens: Iterable[str] = (), *, markers: bool = True) -> str:
    """Make untrusted ``text`` safe to place inside a feedback question (see the module doc).

    ``markers=False`` keeps ``(A)``-style markers (for the model's own reasoning, which refers to
    the options by letter).
    """
    for token in sorted({t for t in special_tokens if len(t) > 1}, key=len, reverse=True):
        text = text.replace(token, token[0] + _ZWSP + token[1:])
    text = _GENERIC_SPECIAL.sub(lambda m: m.group(0)[0] + _ZWSP + m.group(0)[1:], text)
    text = _BRACKET_RUN.sub(lambda m: " ".join(m.group(0)), text)
    if markers:
        text = _MARKER.sub(lambda m: f"\uff08{m.group(1)}" + ("\uff09" if m.group(2) else ""),
                           text)
    return text


def _option_body(text: str, special_tokens: Iterable[str]) -> str:
    body = neutralise(text.strip(), special_tokens)
    if body.startswith("["):
        body = " " + body
    if body.endswith("]"):
        body = body + " "
    return body


def conversation_text(messages: Sequence[Message], special_tokens: Iterable[str] = ()) -> str:
    """``Human: …`` / ``Assistant: …`` turns separated by blank lines, contents neutralised."""
    return "\n\n".join(
        f"{HH_LABELS.get(m['role'], m['role'].title())}: "
        f"{neutralise(m['content'].strip(), special_tokens)}"
        for m in messages
    )


def question(
    messages: Sequence[Message],
    principle: str,
    options: Sequence[str],
    special_tokens: Iterable[str] = (),
) -> str:
    """The feedback question for one conversation, principle and ordered pair of options."""
    if len(options) != len(LETTERS):
        raise ValueError(f"expected {len(LETTERS)} options, got {len(options)}")
    lines = [INTRO, "", conversation_text(messages, special_tokens), "",
             " ".join(principle.split()), OPTIONS_HEADER]
    lines += [f"({letter}) {OPEN}{_option_body(option, special_tokens)}{CLOSE}"
              for letter, option in zip(LETTERS, options, strict=True)]
    return "\n".join(lines)


@dataclass(frozen=True)
class ParsedQuestion:
    conversation: str
    principle: str
    options: list[str]


_QUESTION = re.compile(
    re.escape(INTRO) + r"\n\n(?P<conv>.*)\n\n(?P<principle>[^\n]*)\n" + re.escape(OPTIONS_HEADER)
    + r"\n\(A\) " + re.escape(OPEN) + r"(?P<a>.*?)" + re.escape(CLOSE)
    + r"\n\(B\) " + re.escape(OPEN) + r"(?P<b>.*?)" + re.escape(CLOSE) + r"\Z",
    re.DOTALL,
)


def parse_question(text: str) -> ParsedQuestion:
    """Recover a question's parts from its delimiters; ``ValueError`` if the structure is off.

    Strict: exactly one ``Options:`` header line followed by ``(A) [[[…]]]`` and ``(B) [[[…]]]``,
    and the delimiters occur exactly twice each.
    """
    if text.count(OPEN) != 2 or text.count(CLOSE) != 2:
        raise ValueError("the delimiters must occur exactly twice each")
    if len(re.findall(r"\([AB]\)", text)) != 2:
        raise ValueError("the option markers must occur exactly once each")
    match = _QUESTION.match(text)
    if not match:
        raise ValueError("not a feedback question")
    return ParsedQuestion(match["conv"], match["principle"],
                          [match["a"].strip(), match["b"].strip()])


# ------------------------------------------------------------------------------------------------
# demonstrations and whole prompts


@dataclass(frozen=True)
class Shot:
    """One few-shot demonstration: its question and the assistant's answer text."""

    question: str
    answer: str  # "The answer is: (B)" or "Let's think step by step: … So the answer is: (B)"


def shot(
    messages: Sequence[Message], principle: str, options: Sequence[str], answer: str,
    reasoning: str | None = None,
) -> Shot:
    """A demonstration (constitution text is trusted, but goes through the same quoting)."""
    q = question(messages, principle, options)
    if reasoning is None:
        return Shot(q, f"{ANSWER_PREFIX}{answer})")
    return Shot(q, f"{COT_TRIGGER} {reasoning.strip()}\n{COT_ANSWER_PREFIX}{answer})")


# ------------------------------------------------------------------------------------------------
# the pointwise question (the judge reward's ``pointwise`` form)

#: The pointwise question's two options, in order ``"ab"`` (``"ba"`` swaps them).
POINTWISE_OPTIONS = ("Yes", "No")
POINTWISE_ASK = ("Judge the assistant's last reply by this principle: {principle} "
                 "Does the reply meet it?")


def pointwise_question(
    messages: Sequence[Message],
    answer: str,
    principle: str,
    order: str = "ab",
    special_tokens: Iterable[str] = (),
) -> str:
    """The pointwise question about one answer: the conversation ending in ``answer``, the
    principle as a yes/no question, options ``Yes``/``No`` (``No``/``Yes`` in order ``"ba"``).
    The same layout as :func:`question`, so it parses with :func:`parse_question`."""
    options = POINTWISE_OPTIONS if order == "ab" else POINTWISE_OPTIONS[::-1]
    return question([*messages, {"role": "assistant", "content": answer}],
                    POINTWISE_ASK.format(principle=" ".join(principle.split())), options,
                    special_tokens)


def pointwise_shot(messages: Sequence[Message], answer: str, principle: str, meets: bool,
                   order: str) -> Shot:
    """A pointwise demonstration: ``answer`` does (``meets``) or does not meet the principle."""
    letter = LETTERS[0] if meets == (order == "ab") else LETTERS[1]
    return Shot(pointwise_question(messages, answer, principle, order),
                f"{ANSWER_PREFIX}{letter})")


def _chat(shots: Sequence[Shot], q: str, assistant_prefix: str) -> Conversation:
    messages: Conversation = []
    for s in shots:
        messages += [{"role": "user", "content": s.question},
                     {"role": "assistant", "content": s.answer}]
    return messages + [{"role": "user", "content": q},
                       {"role": "assistant", "content": assistant_prefix}]


def _raw(shots: Sequence[Shot], q: str, prefix: str, cot: bool) -> str:
    if cot:  # the paper's chain-of-thought prompts are Human/Assistant dialogues
        parts = [f"Human: {s.question}\n\nAssistant: {s.answer}" for s in shots]
        parts.append(f"Human: {q}\n\nAssistant: {prefix}")
    else:
        parts = [f"{s.question}\n{s.answer}" for s in shots]
        parts.append(f"{q}\n{prefix}")
    return SHOT_SEPARATOR.join(parts)


def answer_prompt(shots: Sequence[Shot], q: str, mode: str) -> Prompt:
    """The prompt whose next token is the answer letter (no chain of thought)."""
    if mode == "chat":
        return _chat(shots, q, ANSWER_PREFIX)
    return _raw(shots, q, ANSWER_PREFIX, cot=False)


def cot_prompt(shots: Sequence[Shot], q: str, mode: str) -> Prompt:
    """The prompt the model continues with its reasoning."""
    if mode == "chat":
        return _chat(shots, q, COT_TRIGGER)
    return _raw(shots, q, COT_TRIGGER, cot=True)


def clean_reasoning(text: str, special_tokens: Iterable[str] = ()) -> str:
    """Generated reasoning as it is put back into the prompt: stripped, delimiters and special
    tokens quoted, option letters kept (the reasoning refers to the options by them)."""
    return neutralise(text.strip(), special_tokens, markers=False)


def cot_answer_prompt(shots: Sequence[Shot], q: str, reasoning: str, mode: str) -> Prompt:
    """The prompt whose next token is the answer letter, after the model's own reasoning."""
    prefix = f"{COT_TRIGGER} {reasoning}\n{COT_ANSWER_PREFIX}" if reasoning else (
        f"{COT_TRIGGER}\n{COT_ANSWER_PREFIX}")
    if mode == "chat":
        return _chat(shots, q, prefix)
    return _raw(shots, q, prefix, cot=True)
