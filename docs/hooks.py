"""The documentation site's mkdocs hooks (``hooks:`` in mkdocs.yml), and the generator of the
configuration reference.

``docs/reference/config.md`` holds the page's prose and a marker; at build time the marker is
replaced by one table per YAML section of ``cai run``'s config, read from the settings models
themselves (:class:`constitutional.config.RunConfig` and the sections it is composed of): every
field's key, type, bounds, default and help text. Nothing is copied by hand, so the reference
cannot drift from the code. ``tests/test_docs.py`` loads this file by path (mkdocs is not needed
for that) and checks that every field is rendered.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = "<!-- config-reference -->"
REFERENCE_PAGE = "reference/config.md"

_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """``(dotted path, model)`` of ``model`` and of every section nested in it, depth first, in
    declaration order; the top level's path is ``""``."""
    out = [(prefix, model)]
    for name, info in model.model_fields.items():
        if _is_section(info.annotation):
            out += sections(info.annotation, f"{prefix}{name}.")
    return out


def type_name(annotation: Any) -> str:
    """A short, readable name of a field's type: ``int or null``, ``one of `a`, `b```."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{_value(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    if isinstance(annotation, type):
        return "section" if _is_section(annotation) else annotation.__name__
    return str(annotation).replace("typing.", "")


def bounds(info: FieldInfo) -> str:
    """The numeric bounds of a field, ``≥ 1, < 1``, or ``""``."""
    parts = []
    for meta in info.metadata:
        for attr, sign in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {_value(value)}")
    return ", ".join(parts)


def _value(value: Any) -> str:
    """A value as it is written in the YAML file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def default(info: FieldInfo) -> str:
    """A field's default as written in YAML (a factory is called), or ``(required)``."""
    if info.default_factory is not None:
        return _value(info.default_factory())
    if info.default is PydanticUndefined:
        return "(required)"
    return _value(info.default)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _doc(model: type[BaseModel]) -> str:
    """The first paragraph of a settings model's docstring, its own or an ancestor's."""
    doc = inspect.getdoc(model) or ""
    return " ".join(doc.split("\n\n")[0].split())


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, type, default, description)`` of every field of ``model`` that is not itself a
    section."""
    out = []
    for name, info in model.model_fields.items():
        if _is_section(info.annotation):
            continue
        kind = type_name(info.annotation)
        if b := bounds(info):
            kind = f"{kind}, {b}"
        out.append((f"{prefix}{name}", kind, default(info), info.description or ""))
    return out


def reference_markdown(model: type[BaseModel] | None = None) -> str:
    """The configuration reference: a table of the top-level keys, then one heading and table
    per section (nested sections under their dotted path)."""
    if model is None:
        from constitutional.config import RunConfig

        model = RunConfig
    parts = []
    for path, section in sections(model):
        key = path.rstrip(".")
        if key:
            depth = key.count(".") + 2
            parts.append(f"{'#' * depth} `{key}:` {{#{key.replace('.', '-')}}}\n")
        else:
            parts.append("## Top level {#top-level}\n")
        if doc := _doc(section):
            parts.append(_cell(doc) + "\n")
        table = ["| key | type | default | description |", "|---|---|---|---|"]
        for k, kind, value, text in rows(section, path):
            table.append(f"| `{k}` | {_cell(kind)} | `{_cell(value)}` | {_cell(text)} |")
        subs = [f"{path}{n}" for n, i in section.model_fields.items()
                if _is_section(i.annotation)]
        if subs:
            table.append("")
            table.append("Sections inside it: " + ", ".join(
                f"[`{s}:`](#{s.replace('.', '-')})" for s in subs) + ".")
        parts.append("\n".join(table) + "\n")
    return "\n".join(parts)


# -- mkdocs hooks -----------------------------------------------------------------------------


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Fill the configuration reference's marker with the generated tables."""
    if page.file.src_uri != REFERENCE_PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{REFERENCE_PAGE} lost its marker {MARKER}: the configuration "
                          "reference would not be generated")
    return markdown.replace(MARKER, reference_markdown())
