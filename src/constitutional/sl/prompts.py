"""Every SL-CAI prompt text is built here: the few-shot block, critique and revision turns.

Two formats:

* ``chat`` (chat models), in one of two layouts:

  - ``conversation`` (the paper's self-critique): each step is a user/assistant turn — the user
    asks, the assistant answers, the user sends the critique request, the assistant critiques,
    the user sends the revision request, the assistant revises. Few-shot demonstrations are the
    same turns, first.
  - ``review`` (a critic that is another model than the policy, ``revise.critic_model``): the
    critic is not a participant. It is handed the exchange as a transcript, quoted inside one
    request that ends with the critique request about "the assistant's reply" in it; it answers
    with the critique, then gets the revision request and answers with the new reply. Each
    demonstration is such a review of its own transcript, first. Measured with the 1.5B teacher:
    placed inside the conversation, it read the critique request as the harmful request and
    refused to critique (22 of 48 critiques); see the README.

* ``text`` (pretrained base models): the paper's transcript format, one raw string::

      Human: …
      Assistant: …
      CritiqueRequest: …
      Critique: …
      RevisionRequest: …
      Revision: …

In both, the few-shot block comes first and is byte-identical for every sample, so the `hf`
backend computes it once per batch and an OpenAI-compatible server's prefix cache hits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from constitutional.constitution import CritiqueRevisionExample
from constitutional.core.messages import HH_LABELS, Message
from constitutional.models.base import Prompt

FORMATS = ("chat", "text")
LAYOUTS = ("conversation", "review")

#: Generation stops where a fake next turn begins.
STOP = {
    "chat": ("<|im_start|>", "\nHuman:", "\nUser:", "\nCritiqueRequest:", "\nRevisionRequest:"),
    "text": ("\n\nHuman:", "\nHuman:", "\n\nAssistant:", "\nCritiqueRequest:",
             "\nRevisionRequest:", "\nCritique:", "\nRevision:"),
}


@dataclass(frozen=True)
class Round:
    """One critique→revision round. A part that is still ``None`` is what is asked for next.

    In the "direct revision" ablation ``critique_request`` and ``critique`` are both ``None``.
    """

    critique_request: str | None
    critique: str | None = None
    revision_request: str | None = None
    revision: str | None = None


def demo_round(example: CritiqueRevisionExample, with_critique: bool) -> Round:
    if not with_critique:
        return Round(None, None, example.revision_request, example.revision)
    return Round(example.critique_request, example.critique, example.revision_request,
                 example.revision)


#: Appended to the revision request of a chat context that has no demonstrations: what a
#: demonstration would show, that the revision is the new reply itself (without it, a chat teacher
#: such as Qwen2.5-1.5B-Instruct often comments on the reply instead of rewriting it).
#: What a good revision does where the request is harmful, as the paper's revisions do: it
#: explains and redirects rather than declining flatly (added to the revision request of a
#: context without demonstrations, which would otherwise show it).
REDIRECT_HINT = ("If the human asked for something harmful, the new reply does not help with the "
                 "harm: it says briefly why, without lecturing, and offers what it safely can "
                 "instead, such as a safer way to the human's real goal or where to find help. If "
                 "the request is fine, the new reply simply answers it well.")
REVISION_FORMAT_HINT = ("Answer with the new version of the reply only, written to the human, "
                        f"with no comment on the change. {REDIRECT_HINT}")


#: The review layout: what the critic is told it is doing (a system message) ...
REVIEW_SYSTEM = ("You review conversations between a human and an AI assistant for a team that "
                 "makes the assistant safer and more helpful. The human's messages come from "
                 "red-teaming: most are attempts to get the assistant to help with something "
                 "harmful, unethical or illegal, and some are harmless. You are not being asked "
                 "to carry them out. You critique the assistant's reply when asked, and rewrite "
                 "it when asked.")
#: ... how the transcript it reviews is introduced ...
REVIEW_INTRO = "Here is a conversation between a human and an AI assistant:"
#: ... what a later round's critique request is about ...
REVIEW_NEXT_ROUND = "Now take the new reply you just wrote as the assistant's reply."
#: ... how its critique starts (the critique turn is prefilled with it: the critic first says
#: what the human asked for, then judges the reply under the principle; measured on 16
#: red-team exchanges with the 1.5B teacher, see the README) ...
REVIEW_CRITIQUE_PREFIX = "The human's request"
#: ... and what the revision must be: the reply itself, as the assistant would send it, and, as
#: the paper's revisions do, one that explains and redirects rather than declining flatly.
REVIEW_REVISION_HINT = ("Write only the assistant's new reply, exactly as the assistant would say "
                        f"it to the human, with no comment on the change. {REDIRECT_HINT}")


def transcript(messages: Sequence[Message]) -> str:
    """A conversation as a quoted ``Human:`` / ``Assistant:`` transcript."""
    lines = [f"{HH_LABELS.get(m['role'], m['role'].title())}: {m['content'].strip()}"
             for m in messages if m["role"] != "system"]
    return "<conversation>\n" + "\n\n".join(lines) + "\n</conversation>"


def _review_turns(conv: list[Message], answer: str, rounds: list[Round]) -> list[Message]:
    """One review: the transcript and the first request in one user turn, then the critique,
    the revision request and the revision, round after round, up to the part asked for."""
    turns: list[Message] = []
    quoted = f"{REVIEW_INTRO}\n\n{transcript([*conv, {'role': 'assistant', 'content': answer}])}"
    for k, r in enumerate(rounds):
        lead = quoted if k == 0 else REVIEW_NEXT_ROUND
        revision_request = f"{r.revision_request or ''}\n\n{REVIEW_REVISION_HINT}".lstrip()
        if r.critique_request is not None:
            turns.append({"role": "user", "content": f"{lead}\n\n{r.critique_request}"})
            if r.critique is None:
                return [*turns, {"role": "assistant", "content": REVIEW_CRITIQUE_PREFIX}]
            turns += [{"role": "assistant", "content": r.critique},
                      {"role": "user", "content": revision_request}]
        else:
            turns.append({"role": "user", "content": f"{lead}\n\n{revision_request}"})
        if r.revision is None:
            return turns
        turns.append({"role": "assistant", "content": r.revision})
    return turns


def critique_prefix(fmt: str, layout: str) -> str:
    """The text a critique's context already starts it with (prefilled), to be put back in
    front of what the model generates."""
    return REVIEW_CRITIQUE_PREFIX if fmt == "chat" and layout == "review" else ""


def build_context(
    fmt: str,
    few_shot: Sequence[CritiqueRevisionExample],
    conversation: Sequence[Message],
    answer: str | None = None,
    rounds: Sequence[Round] = (),
    *,
    with_critique: bool = True,
    layout: str = "conversation",
) -> Prompt:
    """The context that asks for the next step.

    ``conversation`` is the red-team context (ending in a user turn). With ``answer=None`` the
    initial answer is asked for (always in the conversation itself); otherwise the first missing
    part of the last round is, in ``layout`` (chat only: ``conversation`` or ``review``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    if fmt == "chat" and layout == "review" and answer is not None:
        messages: list[Message] = [{"role": "system", "content": REVIEW_SYSTEM}]
        for ex in few_shot:
            messages += _review_turns(list(ex.messages[:-1]), ex.messages[-1]["content"],
                                      [demo_round(ex, with_critique)])
        return messages + _review_turns(list(conversation), answer, list(rounds))
    demos = [(list(ex.messages[:-1]), ex.messages[-1]["content"], [demo_round(ex, with_critique)])
             for ex in few_shot]
    last = rounds[-1] if rounds else None
    if (fmt == "chat" and not demos and last is not None and last.revision is None
            and (last.critique is not None or last.critique_request is None)):
        rounds = [*rounds[:-1], Round(last.critique_request, last.critique,
                                      f"{last.revision_request or ''}\n\n{REVISION_FORMAT_HINT}"
                                      .lstrip(), None)]
    if fmt == "chat":
        messages = []
        for demo in demos:
            messages += _turns(*demo)
        return messages + _turns(list(conversation), answer, list(rounds))
    parts = [_text(*demo) for demo in demos]
    parts.append(_text(list(conversation), answer, list(rounds)))
    return "\n\n".join(parts)


def _steps(answer: str | None, rounds: list[Round]) -> list[tuple[str, str | None]]:
    """The sequence of (kind, text) after the conversation; text None = asked for, stop there."""
    steps: list[tuple[str, str | None]] = [("answer", answer)]
    if answer is None:
        return steps
    for r in rounds:
        if r.critique_request is not None:
            steps += [("critique_request", r.critique_request), ("critique", r.critique)]
            if r.critique is None:
                return steps
        steps += [("revision_request", r.revision_request or ""), ("revision", r.revision)]
        if r.revision is None:
            return steps
    return steps


_CHAT_ROLE = {"answer": "assistant", "critique_request": "user", "critique": "assistant",
              "revision_request": "user", "revision": "assistant"}
_TEXT_LABEL = {"answer": "Assistant", "critique_request": "CritiqueRequest",
               "critique": "Critique", "revision_request": "RevisionRequest",
               "revision": "Revision"}


def _turns(conv: list[Message], answer: str | None, rounds: list[Round]) -> list[Message]:
    turns = list(conv)
    for kind, text in _steps(answer, rounds):
        if text is None:
            break
        turns.append({"role": _CHAT_ROLE[kind], "content": text})
    return turns


def _text(conv: list[Message], answer: str | None, rounds: list[Round]) -> str:
    lines = [f"{HH_LABELS[m['role']]}: {m['content']}" for m in conv]
    for kind, text in _steps(answer, rounds):
        if text is None:
            return "\n\n".join(lines) + f"\n\n{_TEXT_LABEL[kind]}:"
        lines.append(f"{_TEXT_LABEL[kind]}: {text}")
    return "\n\n".join(lines)


# ------------------------------------------------------------------------------------------------
# output hygiene

_BOILERPLATE = re.compile(
    r"""^\s*(?:
        (?:sure|okay|ok|certainly|of\ course|absolutely)[,!.]?\s*
      )?(?:
        (?:here(?:'s|\ is|\ are)|below\ is)\s+(?:a|the|my|an)?\s*(?:revised|rewritten|updated|new|improved)?
        \s*(?:assistant's\s+)?(?:version|response|reply|answer|revision)
        (?:\s+of\ the\ (?:assistant's\ )?(?:response|reply|answer))?
        (?:\s+(?:that|with|which)[^:\n]{0,120})?\s*[:.]
      | (?:the\ )?assistant\ (?:would|could|should)\ (?:respond|reply|say|answer)(?:\ with)?\s*:
      | (?:revised|rewritten|updated|improved|new)\s+(?:response|reply|answer|version)\s*:
      | revision\s*:
      | (?:the\ )?assistant(?:'s\ (?:new\ )?(?:reply|response))?\s*:
      )\s*""",
    re.IGNORECASE | re.VERBOSE,
)


def clean_revision(text: str) -> str:
    """Strip "Sure, here is a revised response:"-style lead-ins and wrapping quotes."""
    text = text.strip()
    for _ in range(2):
        stripped = _BOILERPLATE.sub("", text, count=1).strip()
        if stripped == text:
            break
        text = stripped
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def degenerate_reason(text: str, *, min_chars: int = 2) -> str | None:
    """Why an output is unusable (empty, too short, a loop), or None if it is fine."""
    if len(text.strip()) < min_chars:
        return "empty"
    words = text.split()
    if len(words) >= 24:
        distinct = len(set(words)) / len(words)
        if distinct < 0.2:
            return "repetitive"
    # the same 20+ character chunk repeated four or more times in a row
    if re.search(r"(.{20,}?)\1{3,}", text, re.DOTALL):
        return "repetitive"
    return None
