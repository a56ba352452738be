"""Settings are declared once: as fields of a pydantic model, with type, default, bounds and help.

The CLI builds its options from these fields (:mod:`constitutional.cli.options`), ``cai run``'s
YAML sections are these models (:mod:`constitutional.config`), and the library takes them as its
configs. A wrong value is a :class:`~constitutional.core.errors.UserError` naming the setting, so
every entry point reports it in one line.

Conventions:

* a stage's tunable settings form ``<Stage>Settings`` (a section of the run's YAML); its library
  config ``<Stage>Config`` adds what a run supplies (inputs, output directory, seed, resume);
* ``Field(description=...)`` is the CLI's help text; ``json_schema_extra={"cli": [...]}`` gives
  other option names (``--out``, ``-m``); ``{"cli": False}`` keeps a field out of the CLI;
* checks across fields live in an ``@model_validator(mode="after")`` that raises
  :class:`UserError` with ``field=``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from constitutional.core.errors import UserError

__all__ = ["CLI_HIDDEN", "Field", "Settings", "user_error", "with_defaults"]

S = TypeVar("S", bound="Settings")

CLI_HIDDEN: dict[str, Any] = {"cli": False}


_EXPECTED = {"int": "int", "float": "float", "bool": "bool", "string": "str", "list": "a list",
             "tuple": "a list", "dict": "a mapping of settings",
             "model": "a mapping of settings"}


def _message(error: dict[str, Any]) -> str:
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    given = error.get("input")
    if kind == "extra_forbidden":
        return "unknown setting"
    if kind == "missing":
        return "missing"
    bounds = {"greater_than_equal": "at least {ge}", "greater_than": "greater than {gt}",
              "less_than_equal": "at most {le}", "less_than": "less than {lt}"}
    if kind in bounds:
        return f"must be {bounds[kind].format(**ctx)}, got {given!r}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected', '')}, got {given!r}"
    base = kind.split("_")[0]
    if base in _EXPECTED and kind.endswith(("_type", "_parsing", "_from_float")):
        return f"expected {_EXPECTED[base]}, got {given!r}"
    msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return msg if kind == "value_error" else f"{msg[:1].lower()}{msg[1:]}, got {given!r}"


def user_error(err: ValidationError, prefix: str = "") -> UserError:
    """The first problem of a pydantic ``ValidationError`` as a one-line :class:`UserError`."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if not isinstance(p, int))
    return UserError(_message(first), field=f"{prefix}{loc}" if loc else prefix.rstrip(".")
                     or None)


_DEPTH: ContextVar[int] = ContextVar("settings_depth", default=0)


@contextmanager
def validation_errors() -> Iterator[None]:
    """Within this block, constructing settings raises pydantic's ``ValidationError`` (with
    every error's full location) instead of a :class:`UserError`, for callers that report
    locations themselves (the YAML config names the file and line)."""
    token = _DEPTH.set(_DEPTH.get() + 1)
    try:
        yield
    finally:
        _DEPTH.reset(token)


class Settings(BaseModel):
    """Base of every settings model: unknown keys are errors, values are checked on assignment
    too, and a bad value is a one-line :class:`UserError` instead of pydantic's report."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              validate_default=False, arbitrary_types_allowed=True)

    #: fields that may also be given by position, in this order (``LabelConfig("model")``)
    positional: ClassVar[tuple[str, ...]] = ()
    #: fields added after runs were made: left out of :meth:`settings_dump` while unset (None),
    #: so that those runs keep their record ids and stage fingerprints
    omit_unset: ClassVar[tuple[str, ...]] = ()
    #: the same for fields added with a default other than None: left out of
    #: :meth:`settings_dump` and :meth:`to_dict` while at their default
    omit_default: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **data: Any) -> None:
        if len(args) > len(self.positional):
            raise TypeError(f"{type(self).__name__} takes at most {len(self.positional)} "
                            f"positional argument(s) ({', '.join(self.positional)})")
        data.update(zip(self.positional, args, strict=False))
        # pydantic calls this for nested sections too: only the outermost call turns the
        # errors into a UserError, so that nested ones keep their full location
        depth = _DEPTH.get()
        token = _DEPTH.set(depth + 1)
        try:
            super().__init__(**data)
        except ValidationError as err:
            if depth:
                raise
            raise user_error(err) from None
        finally:
            _DEPTH.reset(token)

    def __setattr__(self, name: str, value: Any) -> None:
        before = self.__dict__.get(name)
        try:
            super().__setattr__(name, value)
        except (ValidationError, UserError) as err:
            if name in self.__dict__:  # a check across fields rejected it after it was set
                self.__dict__[name] = before
            raise user_error(err) if isinstance(err, ValidationError) else err from None

    def settings_dump(self) -> dict[str, Any]:
        """``model_dump()`` without the :attr:`omit_unset` fields that are None."""
        d = self._without_defaults(self.model_dump())
        for name in self.omit_unset:
            if d.get(name) is None:
                d.pop(name, None)
        return d

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), for JSON and YAML; without the :attr:`omit_default`
        fields at their default (so a resumed run's settings compare equal to an older run's)."""
        return self._without_defaults(self.model_dump(mode="json"))

    def _without_defaults(self, d: dict[str, Any]) -> dict[str, Any]:
        for name in self.omit_default:
            info = type(self).model_fields.get(name)
            if info is not None and getattr(self, name) == info.get_default(
                    call_default_factory=True):
                d.pop(name, None)
        return d

    def replace(self, **changes: Any) -> Any:
        """A validated copy with ``changes`` applied."""
        return type(self)(**{**self.model_dump(), **changes})


def with_defaults(base: type[S], name: str, doc: str | None = None, **defaults: Any) -> type[S]:
    """A subclass of ``base`` whose listed fields have other defaults; type, bounds and help text
    stay declared once, in ``base``."""
    fields: dict[str, Any] = {}
    for key, value in defaults.items():
        info = base.model_fields[key]
        fields[key] = (info.annotation, FieldInfo.merge_field_infos(info, default=value))
    return create_model(name, __base__=base, __doc__=doc or base.__doc__, **fields)
