"""Our YAML format for constitutions (``data/constitutions/default.yaml`` is the reference)::

    name: my-constitution
    description: one line
    critique_revision:
      - id: harm-general          # stable id, unique within the list
        tags: [harm]              # optional; lets a user keep a subset (Constitution.filter)
        weight: 1.0               # optional; relative sampling weight (0 = never sampled)
        critique: Point out …
        revision: Rewrite …
    feedback:
      - id: fb-harm
        tags: [harm]
        text: Which response …
    few_shot:
      critique_revision:
        - id: ex-1
          principle: harm-general  # or critique_request: / revision_request: written out
          conversation: [{user: "…"}, {assistant: "…"}]
          critique: …
          revision: …
      feedback:
        - {conversation: [{user: "…"}], options: ["…", "…"], answer: A}
      chain_of_thought:
        - {conversation: […], options: […], reasoning: "…", answer: B}

Each entry of a list is validated on its own by a pydantic model below: its keys, required fields,
values, and checks across its fields (an answer within its options, a few-shot example's
``principle`` among the principles it is given as validation context). :func:`parse_constitution`
checks the document around the entries: its keys, unique ids, at least one principle. An error is
one :class:`~constitutional.core.errors.UserError` naming the file, the YAML line of the entry (or
of the offending key or message), the entry (``feedback #3 'fb-x'``) and the field; pydantic's
error is translated by :func:`_entry_error`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from constitutional.core.errors import UserError
from constitutional.core.io import line_of_entry, load_yaml, read_utf8
from constitutional.core.messages import parse_hh_transcript

from .model import (
    LETTERS,
    ChainOfThoughtExample,
    Constitution,
    CritiquePrinciple,
    CritiqueRevisionExample,
    FeedbackExample,
    FeedbackPrinciple,
)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "system": "system"}

# ------------------------------------------------------------------------------------------------
# value checks: a bad value is reported at its key's line; an absent or null one ("missing") at
# the entry's line, in the words of the entry model's ``missing``


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid", message)


def _missing() -> PydanticCustomError:
    return PydanticCustomError("missing", "missing")


def _text(value: Any) -> str:
    if value is None:
        raise _missing()
    if not isinstance(value, str):
        raise _invalid(f"expected text, got {type(value).__name__}")
    if not value.strip():
        raise PydanticCustomError("empty", "is empty")
    return value.strip()


def _id(value: Any) -> str:
    if value is None:
        raise _missing()
    if not _ID.match(str(value)):
        raise _invalid(f"bad id {str(value)!r} (letters, digits, _ . : - only)")
    return str(value)


def _tags(value: Any) -> tuple[str, ...]:
    value = [value] if isinstance(value, str) else [] if value is None else value
    if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
        raise _invalid("expected a list of tag names")
    return tuple(dict.fromkeys(t.strip() for t in value))


def _weight(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _invalid(f"expected a number >= 0, got {value!r}")
    return float(value)


def _options(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) < 2 or not all(
        isinstance(o, str) and o.strip() for o in value
    ):
        raise _invalid("expected a list of at least two option texts")
    if len(value) > len(LETTERS):
        raise _invalid(f"at most {len(LETTERS)} options")
    return [o.strip() for o in value]


class _Message(BaseModel):
    """``{role: user, content: …}`` or ``{user: …}`` (``human`` is the user)."""

    role: str
    content: str

    @model_validator(mode="before")
    @classmethod
    def _one_message(cls, item: Any) -> dict[str, str]:
        if isinstance(item, Mapping) and "role" in item:
            role, content = str(item.get("role")).lower(), item.get("content")
        elif isinstance(item, Mapping) and len(item) == 1:
            role, content = str(next(iter(item))).lower(), next(iter(item.values()))
        else:
            raise _invalid("each message is {role: …, content: …} or {user: …}")
        if role not in _ROLES or not isinstance(content, str) or not content.strip():
            raise _invalid("each message needs a role (user/assistant/system) and text")
        return {"role": _ROLES[role], "content": content.strip()}


def _conversation(value: Any) -> Any:
    """A list of messages, or a ``Human:``/``Assistant:`` transcript (taken as it parses)."""
    if value is None:
        raise _missing()
    if isinstance(value, str):
        try:
            return [_Message.model_construct(**m) for m in parse_hh_transcript(value)]
        except ValueError as err:
            raise _invalid(f"bad Human:/Assistant: transcript: {err}") from None
    if not isinstance(value, list) or not value:
        raise _invalid("expected a list of messages")
    return value


Text = Annotated[str, BeforeValidator(_text)]
Id = Annotated[str, BeforeValidator(_id)]
Tags = Annotated[tuple[str, ...], BeforeValidator(_tags)]
Weight = Annotated[float, BeforeValidator(_weight)]
Options = Annotated[list[str], BeforeValidator(_options)]
Conversation = Annotated[list[_Message], BeforeValidator(_conversation)]

# ------------------------------------------------------------------------------------------------
# the entries


class _Schema(BaseModel):
    """An entry of one of the lists; it builds a ``target`` of :mod:`.model` (same field names)."""

    model_config = ConfigDict(extra="forbid")

    target: ClassVar[type]
    #: The id of an entry that gives none, formatted with its index ("" = the id is required).
    default_id: ClassVar[str] = ""
    #: What to say when a field is absent or null (else "missing"), or empty ("… (empty)").
    missing: ClassVar[dict[str, str]] = {"id": "missing (every principle needs a stable id)"}

    @classmethod
    def keys(cls) -> list[str]:
        return [f.alias or name for name, f in cls.model_fields.items()]

    def build(self) -> Any:
        return self.target(**self.model_dump())


class _CritiquePrinciple(_Schema):
    target = CritiquePrinciple
    id: Id
    critique: Text
    revision: Text
    tags: Tags = ()
    weight: Weight = 1.0


class _FeedbackPrinciple(_Schema):
    target = FeedbackPrinciple
    id: Id
    text: Text
    tags: Tags = ()
    weight: Weight = 1.0


class _Example(_Schema):
    """A few-shot demonstration. Validated with ``context={"principles": {id: principle}}``, the
    principles of the kind it demonstrates, which ``principle`` must name."""

    #: The role of the conversation's last turn, and what that turn is.
    ends_with: ClassVar[tuple[str, str]] = ("user", "the user turn that the options answer")

    id: Id
    principle: str | None = None
    messages: Conversation = Field(alias="conversation")

    @field_validator("principle", mode="before")
    @classmethod
    def _known(cls, ref: Any, info: ValidationInfo) -> str | None:
        if ref is not None and str(ref) not in info.context["principles"]:
            raise _invalid(f"unknown principle id {ref!r}")
        return None if ref is None else str(ref)

    @field_validator("messages")
    @classmethod
    def _last_turn(cls, messages: list[_Message]) -> list[_Message]:
        if messages[-1].role != cls.ends_with[0]:
            raise _invalid(f"must end with {cls.ends_with[1]}")
        return messages

    @field_validator("answer", mode="before", check_fields=False)
    @classmethod
    def _letter(cls, answer: Any, info: ValidationInfo) -> str:
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise _missing()
        letters = LETTERS[: len(info.data.get("options", LETTERS))]
        letter = str(answer).strip().strip("()").upper()
        if len(letter) != 1 or letter not in letters:
            raise _invalid(f"expected one of {', '.join(letters)}, got {answer!r}")
        return letter


class _CritiqueRevisionExample(_Example):
    target = CritiqueRevisionExample
    default_id = "critique-example-{}"
    ends_with = ("assistant", "the assistant response being critiqued")
    missing = {**_Schema.missing,
               "critique_request": "missing (give critique_request or principle)",
               "revision_request": "missing (give revision_request or principle)",
               "critique": "few-shot example has no critique",
               "revision": "few-shot example has no revision (its answer)"}

    critique_request: str = Field(default=None, validate_default=True)
    critique: Text
    revision_request: str = Field(default=None, validate_default=True)
    revision: Text

    @field_validator("critique_request", "revision_request", mode="before")
    @classmethod
    def _request(cls, value: Any, info: ValidationInfo) -> str:
        """Written out, or else the named principle's."""
        ref = info.data.get("principle")
        blank = value is None or (isinstance(value, str) and not value.strip())
        if ref is None or not blank:
            return _text(value)
        principle = info.context["principles"][ref]
        return principle.critique if info.field_name == "critique_request" else principle.revision


class _FeedbackExample(_Example):
    target = FeedbackExample
    default_id = "feedback-example-{}"
    missing = {**_Schema.missing, "options": "expected a list of at least two option texts",
               "answer": "few-shot example has no answer"}

    options: Options
    answer: str


class _ChainOfThoughtExample(_Example):
    target = ChainOfThoughtExample
    default_id = "cot-example-{}"
    missing = {**_FeedbackExample.missing,
               "reasoning": "chain-of-thought example has no reasoning"}

    options: Options
    reasoning: Text
    answer: str


# ------------------------------------------------------------------------------------------------
# the document


@dataclass(frozen=True)
class _Entry:
    """Where an entry sits, for error messages: file, a label like ``feedback #3 'fb-x'``, data."""

    file: str
    label: str
    data: Mapping[str, Any]

    def line(self, loc: Sequence[Any] = ()) -> int | None:
        """The entry's line, or that of the key (and list item) that ``loc`` leads to."""
        node, line = self.data, line_of_entry(self.data)
        for part in loc:
            if isinstance(node, Mapping) and part in node:
                line, node = line_of_entry(node, part), node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
                line = line_of_entry(node) or line
            else:
                break
        return line

    def error(self, message: str, fld: str | None = None, loc: Sequence[Any] = ()) -> UserError:
        return UserError(f"{self.label}: {message}", file=self.file, line=self.line(loc),
                         field=fld)


def _entry_error(schema: type[_Schema], entry: _Entry, err: ValidationError) -> UserError:
    """Pydantic's first problem (an unknown key before any other) as our one line."""
    unknown = ("extra_forbidden", "invalid_key")  # the latter: a key that is not a string
    first = min(err.errors(), key=lambda e: e["type"] not in unknown)
    kind, loc = first["type"], first["loc"]
    fld = str(loc[0]) if loc else None
    if kind in unknown:
        return entry.error(f"unknown field (expected: {', '.join(schema.keys())})", fld, loc)
    if kind == "missing":
        return entry.error(schema.missing.get(fld or "", "missing"), fld)
    if kind == "empty" and fld in schema.missing:
        return entry.error(f"{schema.missing[fld]} (empty)", fld, loc)
    return entry.error(first["msg"], fld, loc)


def _check_keys(entry: _Entry, allowed: Sequence[str]) -> None:
    for key in entry.data:
        if key not in allowed:
            raise entry.error(f"unknown field (expected: {', '.join(allowed)})", str(key), (key,))


def _entries(data: Mapping[str, Any], key: str, file: str, prefix: str = "") -> list[_Entry]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError("expected a list", file=file, line=line_of_entry(data, key),
                        field=prefix + key)
    out = []
    for i, item in enumerate(value, 1):
        if not isinstance(item, Mapping):
            raise UserError(f"entry #{i} is not a mapping", file=file,
                            line=line_of_entry(data, key), field=prefix + key)
        name = f" {item['id']!r}" if item.get("id") is not None else ""
        out.append(_Entry(file, f"{prefix}{key} #{i}{name}", item))
    return out


def _build_list(data: Mapping[str, Any], key: str, file: str, schema: type[_Schema],
                principles: Mapping[str, Any] | None = None, prefix: str = "") -> list[Any]:
    """The entries under ``key``, validated by ``schema``, with unique ids."""
    items, first = [], {}
    for i, entry in enumerate(_entries(data, key, file, prefix)):
        given = dict(entry.data)
        if schema.default_id:
            given.setdefault("id", schema.default_id.format(i))
        try:
            item = schema.model_validate(given, context={"principles": principles or {}}).build()
        except ValidationError as err:
            raise _entry_error(schema, entry, err) from None
        if item.id in first:
            raise entry.error(f"duplicate id {item.id!r} (first on line {first[item.id].line()})",
                              "id", ("id",))
        first[item.id] = entry
        items.append(item)
    return items


_TOP = ("name", "description", "version", "critique_revision", "feedback", "few_shot")
_FEW_SHOT = ("critique_revision", "feedback", "chain_of_thought")


def parse_constitution(data: Any, file: str, *, default_name: str = "") -> Constitution:
    """Validate a loaded YAML document (from :func:`~constitutional.core.io.load_yaml`)."""
    if not isinstance(data, Mapping):
        raise UserError("expected a mapping with critique_revision and feedback lists",
                        file=file, line=1)
    top = _Entry(file, "constitution", data)
    _check_keys(top, _TOP)
    critiques = _build_list(data, "critique_revision", file, _CritiquePrinciple)
    feedback = _build_list(data, "feedback", file, _FeedbackPrinciple)
    if not critiques and not feedback:
        raise UserError(
            "constitution has no principles (critique_revision and feedback are both empty)",
            file=file, line=line_of_entry(data, "critique_revision") or 1,
            field="critique_revision",
        )
    few = data.get("few_shot") or {}
    if not isinstance(few, Mapping):
        raise top.error("expected a mapping with critique_revision/feedback/chain_of_thought",
                        "few_shot", ("few_shot",))
    _check_keys(_Entry(file, "few_shot", few), _FEW_SHOT)
    by_id = {p.id: p for p in critiques}
    fb_by_id = {p.id: p for p in feedback}
    examples = [
        _build_list(few, "critique_revision", file, _CritiqueRevisionExample, by_id, "few_shot."),
        _build_list(few, "feedback", file, _FeedbackExample, fb_by_id, "few_shot."),
        _build_list(few, "chain_of_thought", file, _ChainOfThoughtExample, fb_by_id, "few_shot."),
    ]
    name = data.get("name", default_name)
    description = data.get("description", "")
    for key, value in (("name", name), ("description", description)):
        if not isinstance(value, str):
            raise top.error("expected text", key, (key,))
    return Constitution(
        name=name or default_name, description=" ".join(description.split()),
        critiques=critiques, feedback=feedback, critique_examples=examples[0],
        feedback_examples=examples[1], cot_examples=examples[2], source=file, origin="yaml",
    )


def load_yaml_file(path: Path) -> Constitution:
    """A constitution in our YAML format."""
    data = load_yaml(read_utf8(path), path)
    return parse_constitution(data, str(path), default_name=path.stem)
