"""What the command groups share: the consoles, common options, and :func:`settings_command`,
which turns a stage's settings models into a command's options, so that a setting's type,
default, bounds and help text are declared once, in the model."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.console import Console

from constitutional.core.log import err_console
from constitutional.distributed import RayOptions
from constitutional.models import BUILTIN_MODEL

__all__ = [
    "BUILTIN_MODEL",
    "DeviceOpt",
    "OutOpt",
    "RayOptions",
    "err_console",
    "model_options",
    "of",
    "out",
    "print_line",
    "ray_options",
    "settings_command",
]

out = Console()

OutOpt = Annotated[Path, typer.Option("--out", help="Run directory (resumable).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 … (hf backend).")]


def print_line(text: str) -> None:
    """One plain line of results on stdout (no markup, no wrapping of paths)."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


def model_options(device: str | None) -> dict[str, str]:
    return {"device": device} if device else {}


# ------------------------------------------------------------------------------------------------
# options from settings models


def _cli_type(info: FieldInfo) -> Any:
    """The type typer parses for a field: its own for str/int/float/bool/list[str]; str for
    anything richer (Literal, unions), which the model then validates."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    hint = info.annotation
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    core = [a for a in args if a is not type(None)] if optional else [hint]
    kind = extra.get("cli_type") or (core[0] if len(core) == 1 else str)
    if typing.get_origin(kind) is Literal:
        kind = str
    if typing.get_origin(kind) is list:
        kind = list[typing.get_args(kind)[0]]
        optional = True  # typer's "not given" for a list is None
    return kind | None if optional or extra.get("cli_type") else kind


def _option(name: str, info: FieldInfo, decls: list[str] | None = None,
            only_given: bool = False) -> inspect.Parameter | None:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if extra.get("cli") is False:
        return None
    decls = list(decls or extra.get("cli") or [])
    kind = _cli_type(info)
    if only_given:
        default: Any = None
        kind = kind if typing.get_origin(kind) is list else kind | None
    elif info.is_required():
        default = inspect.Parameter.empty
    elif info.default_factory is not None or typing.get_origin(kind) is list or \
            extra.get("cli_type"):
        default = None
    else:
        default = info.default
    option = typer.Option(*decls, help=info.description,
                          show_default=extra.get("show_default", True),
                          rich_help_panel=extra.get("panel"))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, option])


def settings_command(app: typer.Typer, name: str, *models: type[BaseModel],
                     exclude: tuple[str, ...] = (), names: dict[str, list[str]] | None = None,
                     only_given: bool = False, **command_kwargs: Any) -> Callable:
    """Register ``fn(values, **own_options)`` as ``name`` on ``app``: its options are the fields
    of ``models`` (minus ``exclude`` and fields marked ``cli: False``) followed by ``fn``'s own
    keyword parameters; ``names`` gives fields other option names (``{"out": ["--out"]}``).
    With ``only_given``, every field option defaults to "not given" (for commands that pass
    the values on to one of several models). ``values`` holds the given fields (omitted list options and options left
    unset are left out, so the model's defaults apply)."""

    def register(fn: Callable) -> Callable:
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
        own_names = {p.name for p in own}
        fields: dict[str, inspect.Parameter] = {}
        for model in models:
            for field_name, info in model.model_fields.items():
                if field_name in exclude or field_name in fields or field_name in own_names:
                    continue
                param = _option(field_name, info, (names or {}).get(field_name), only_given)
                if param is not None:
                    fields[field_name] = param

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
            values = {k: v for k, v in values.items()
                      if v is not None or fields[k].default is not None}
            return fn(values, **kwargs)

        required = [p for p in fields.values() if p.default is inspect.Parameter.empty]
        optional = [p for p in fields.values() if p.default is not inspect.Parameter.empty]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        command.__signature__ = inspect.Signature([*required, *optional, *params])
        del command.__wrapped__
        command.__annotations__ = {}
        app.command(name, **command_kwargs)(command)
        return fn

    return register


# ------------------------------------------------------------------------------------------------
# scale-out (the generation commands: `sl revise`, `rl sample`, `rl label`)


def of(model: type[BaseModel], values: dict[str, Any], **more: Any) -> Any:
    """``model`` built from the entries of ``values`` it declares (and ``more``)."""
    return model(**{k: v for k, v in values.items() if k in model.model_fields}, **more)


def ray_options(values: dict[str, Any], device: str | None = None) -> RayOptions | None:
    """The Ray options of a command's values, or None to run in this process."""
    options = of(RayOptions, values, model_options=model_options(device))
    return options if options.on_ray else None
