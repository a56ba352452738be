"""``--executor ray``: ``sl revise``, ``rl sample``, ``rl label`` and the eval stage's answers
on Ray actors.

We do not schedule anything ourselves; Ray does. What this module adds is the bookkeeping that
keeps a distributed run identical to a single-process one and safe to kill:

1. The inputs (prompts, or pairs) are split into ``num_shards`` shards by a stable hash of their
   ids (:func:`constitutional.distributed.shard_of`). The shard count is pinned in
   ``<out>/shards/<stage>/shards.config.json``.
2. Each Ray actor loads one model backend, once, and runs whole shards. A shard is the
   **unchanged stage function** (:func:`~constitutional.sl.revise.revise`,
   :func:`~constitutional.rl.sample.sample`, :func:`~constitutional.rl.label.label`) on the
   shard's inputs, writing into ``<out>/shards/<stage>/<i>/``, so a shard resumes record by
   record like any run. The actor returns the shard's finished records.
3. The driver appends them to the stage's record file in ``<out>`` (the same file a
   single-process run writes), then marks the shard done by writing ``<i>.done`` atomically.
   A re-run skips done shards.
4. When every shard is done, the stage function runs once more in ``<out>`` with nothing left to
   compute: it writes the final outputs (``revise.traces.jsonl``, ``pairs.jsonl``,
   ``labels.jsonl`` …) in input order, with the same code as a single-process run. Sampling is
   seeded per prompt and principles per record, so the records are the same as well.

Failures: an actor that dies (a crashed or killed process, a lost node) is restarted by Ray and
its shard re-run (``retries`` times, Ray's ``max_restarts``/``max_task_retries``); a shard that
still fails is re-submitted to a fresh actor, up to ``retries`` times. A re-run of a shard resumes
from its own record file when the run directory is on a filesystem the actor can see (always on
one machine; on a cluster, put ``--out`` on shared storage to keep partial shards).

A hook for tests: ``CAI_RAY_MODEL_HOOK=/path/to/file.py:function`` (forwarded to the actors like
every ``CAI_*`` variable) wraps each shard's model; the tests inject crashes with it
(``tests/ray_faults.py``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional.core.errors import UserError
from constitutional.core.io import JsonlStore, RunDir, atomic_write_text
from constitutional.distributed import RayOptions, shard_of
from constitutional.models import LanguageModel, load_model, parse_spec

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
HOOK_ENV = "CAI_RAY_MODEL_HOOK"
#: Environment variables the actors get from the driver when set there (never API keys).
FORWARD_ENV_PREFIXES = ("HF_HUB_", "HF_HOME", "HF_DATASETS_", "TRANSFORMERS_", "CAI_",
                        "TOKENIZERS_")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'constitutional-ai[ray]'"
                        ) from None
    return ray


# ------------------------------------------------------------------------------------------------
# what runs in an actor


def _run_revise(lm: LanguageModel, items: Sequence[Any], config: Any, out: Path) -> dict[str, Any]:
    from constitutional.sl.revise import STEPS_FILE, revise

    result = revise(config.replace(out=str(out)), model=lm, show_progress=False, prompts=items)
    s = result.summary
    return {"items": s["prompts"], "computed": sum(s["steps_computed"].values()),
            "resumed": s["steps_resumed"], "summary": s,
            "records": JsonlStore(out / STEPS_FILE).records()}


def _run_sample(lm: LanguageModel, items: Sequence[Any], config: Any, out: Path) -> dict[str, Any]:
    from constitutional.rl.sample import RECORDS, sample

    result = sample(items, config, out, model=lm)
    return {"items": result.pairs, "computed": result.generated,
            "resumed": result.pairs - result.generated, "stats": result.stats,
            "records": JsonlStore(out / RECORDS).records()}


def _run_label(lm: LanguageModel, items: Sequence[Any], config: Any, out: Path) -> dict[str, Any]:
    from constitutional.rl.label import RECORDS, label

    result = label(items, config, out, model=lm)
    return {"items": result.pairs, "computed": result.labelled,
            "resumed": result.pairs - result.labelled, "stats": result.stats,
            "records": JsonlStore(out / RECORDS).records()}


def _run_answer(lm: LanguageModel, items: Sequence[Any], config: Any, out: Path) -> dict[str, Any]:
    from constitutional.evaluate.answers import RECORDS, answer_rows

    before = lm.stats.to_dict()
    answered = answer_rows(lm, items, config, out)
    stats = {k: v - before[k] for k, v in lm.stats.to_dict().items()
             if isinstance(v, int | float) and not isinstance(v, bool)}
    return {"items": len(items), "computed": answered, "resumed": len(items) - answered,
            "stats": stats, "records": JsonlStore(out / RECORDS).records()}


_SHARD_RUNNERS: dict[str, Callable[[LanguageModel, Sequence[Any], Any, Path], dict[str, Any]]] = {
    "revise": _run_revise, "sample": _run_sample, "label": _run_label, "answer": _run_answer,
}


def _model_hook(lm: LanguageModel, index: int, shard_dir: Path) -> LanguageModel:
    """The model a shard runs with: ``$CAI_RAY_MODEL_HOOK`` (``/path/to/file.py:function``)
    may wrap it, e.g. to inject faults in tests (see ``tests/ray_faults.py``)."""
    hook = os.environ.get(HOOK_ENV, "")
    if not hook:
        return lm
    import importlib.util

    file, _, name = hook.rpartition(":")
    spec = importlib.util.spec_from_file_location("cai_ray_model_hook", file)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot load {file!r}", field=HOOK_ENV)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)(lm, index, shard_dir)


class ShardWorker:
    """A Ray actor: one model backend, loaded once, running whole shards."""

    def __init__(self, spec: str, model_options: dict[str, Any], threads: int) -> None:
        import torch

        from constitutional.core.log import setup_logging

        setup_logging(quiet=True)  # warnings and errors only; no progress bars in the logs
        torch.set_num_threads(threads)
        self.lm = load_model(spec, **model_options)

    def run(self, stage: str, index: int, items: Sequence[Any], config: Any,
            shard_dir: str) -> dict[str, Any]:
        out = Path(shard_dir)
        lm = self.lm
        lm = _model_hook(lm, index, out)
        t0 = time.perf_counter()
        result = _SHARD_RUNNERS[stage](lm, items, config, out)
        result["seconds"] = round(time.perf_counter() - t0, 3)
        result["pid"] = os.getpid()
        return result


# ------------------------------------------------------------------------------------------------
# the driver


@dataclass
class ShardedRun:
    """What the driver did: per-shard results of this call, and the Ray set-up."""

    num_shards: int
    actors: int  # 0 when every shard was already done
    shards_run: list[int]
    shards_skipped: list[int]
    shard_retries: int
    results: dict[int, dict[str, Any]]  # this call's shard results (records dropped)
    seconds: float

    @property
    def computed(self) -> int:
        return sum(r["computed"] for r in self.results.values())

    def stats(self) -> dict[str, Any]:
        """The backends' counters, summed over this call's shards."""
        total: Counter[str] = Counter()
        for r in self.results.values():
            for k, v in (r.get("stats") or {}).items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    total[k] += v
        return dict(total)

    def executor(self) -> dict[str, Any]:
        return {"kind": "ray", "shards": self.num_shards, "actors": self.actors,
                "shards_run": len(self.shards_run), "shards_skipped": len(self.shards_skipped),
                "shard_retries": self.shard_retries}


def _resolve_shards(shards_dir: Path, options: RayOptions) -> int | None:
    """The pinned shard count, checked against ``options.num_shards`` (None if not pinned)."""
    file = shards_dir / "shards.config.json"
    if not file.is_file():
        return options.num_shards
    pinned = json.loads(file.read_text(encoding="utf-8"))["num_shards"]
    if options.num_shards is not None and options.num_shards != pinned:
        raise UserError(f"this run directory was made with num_shards={pinned}, now "
                        f"num_shards={options.num_shards}; use a new --out, or the same settings "
                        "to resume", file=file, field="num_shards")
    return pinned


def _env_vars(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.startswith(FORWARD_ENV_PREFIXES) and "TOKEN" not in k.removeprefix("TOKENIZERS_")}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false"})
    return env


def _connect_error(address: str, err: BaseException) -> str:
    text = f"{err} {err.__cause__ or ''}"
    why = (str(err).strip() or type(err).__name__).splitlines()[0]
    if "auth" in text.lower():
        why = ("the cluster wants its authentication token: set RAY_AUTH_MODE=token and put the "
               "token (`ray get-auth-token` on the head node) in ~/.ray/auth_token or "
               "$RAY_AUTH_TOKEN")
    return f"cannot connect to the Ray cluster at {address}: {why}"


def local_ray_kwargs(cpus: int) -> dict[str, Any]:
    """``ray.init`` arguments for a new local Ray of ``cpus`` CPUs: no dashboard, and no metrics
    unless ``$RAY_enable_metrics_collection`` asks for them. Nothing reads a dashboard-less local
    Ray's metrics, and Ray 2.60's exporter outlives ``ray.shutdown()`` once one process has started
    and stopped Ray a few times (measured: 23 exports in 35 s, each to an agent that is gone, after
    the 7th shutdown; none after a single one): it kept running into the interpreter's exit."""
    kwargs: dict[str, Any] = {"address": "local", "num_cpus": cpus, "include_dashboard": False}
    if "RAY_enable_metrics_collection" not in os.environ:
        kwargs["_system_config"] = {"enable_metrics_collection": False}
    return kwargs


class _Cluster:
    """Connects to Ray (or starts a local one) and shuts down only what it started."""

    def __init__(self, options: RayOptions, local_actors: int | None) -> None:
        self.ray = _ray()
        self.started = False
        address = options.address or os.environ.get("RAY_ADDRESS") or None
        if not self.ray.is_initialized():
            kwargs: dict[str, Any] = {"logging_level": logging.WARNING,
                                      "configure_logging": False}
            if address:
                log.info("connecting to the Ray cluster at %s", address)
                try:
                    self.ray.init(address=address, **kwargs)
                except Exception as err:  # ConnectionError, RuntimeError, AuthenticationError …
                    raise UserError(_connect_error(address, err)) from err
            else:
                cpus = (local_actors or max(1, (os.cpu_count() or 1) // options.cpus_per_actor)
                        ) * options.cpus_per_actor
                log.info("starting a local Ray with %d CPUs", cpus)
                self.ray.init(**local_ray_kwargs(cpus), **kwargs)
            self.started = True

    def resources(self) -> dict[str, float]:
        return dict(self.ray.cluster_resources())

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def run_sharded(stage: str, spec: str, config: Any, items: Sequence[Any],
                ids: Sequence[str], out: str | Path, options: RayOptions,
                records_file: str, name: str | None = None) -> ShardedRun:
    """Run ``stage`` over ``items`` (with record ids ``ids``) in shards on Ray actors, merging
    each finished shard's records into ``out/records_file``. The caller then writes the final
    outputs (see the module docstring). ``name`` names the shards' directory (default: the
    stage), for a stage that runs more than once in one directory."""
    parse_spec(spec)  # a bad model spec is one line here, not an actor failure
    t0 = time.perf_counter()
    run = RunDir(out)
    shards_dir = run.path / SHARDS_DIR / (name or stage)
    num_shards = _resolve_shards(shards_dir, options)
    cluster: _Cluster | None = None
    try:
        if num_shards is None:  # the default needs the cluster's size
            cluster = _Cluster(options, options.num_actors)
            num_shards = options.num_actors or _default_actors(cluster.resources(), options)
        RunDir(shards_dir).pin_config("shards", {"num_shards": num_shards})
        shards: list[list[Any]] = [[] for _ in range(num_shards)]
        for rid, item in zip(ids, items, strict=True):
            shards[shard_of(rid, num_shards)].append(item)
        todo = [i for i, s in enumerate(shards) if s and not (shards_dir / f"{i}.done").exists()]
        skipped = [i for i, s in enumerate(shards) if s and i not in todo]
        if skipped:
            log.info("%s: %d of %d shards already done", stage, len(skipped), num_shards)
        done = ShardedRun(num_shards, 0, todo, skipped, 0, {}, 0.0)
        if todo:
            cluster = cluster or _Cluster(options, options.num_actors)
            _dispatch(cluster, stage, spec, config, shards, todo, shards_dir,
                      JsonlStore(run / records_file), options, done)
    finally:
        if cluster is not None:
            cluster.close()
    log.info("%s: all %d shards done; writing the outputs in %s", stage, num_shards, run.path)
    done.seconds = time.perf_counter() - t0
    return done


def _default_actors(resources: dict[str, float], options: RayOptions) -> int:
    gpus = _gpus_per_actor(resources, options)
    if gpus:
        return max(1, int(resources.get("GPU", 0) // gpus))
    return max(1, int(resources.get("CPU", 1) // options.cpus_per_actor))


def _gpus_per_actor(resources: dict[str, float], options: RayOptions) -> float:
    if options.gpus_per_actor is not None:
        return options.gpus_per_actor
    return 1.0 if resources.get("GPU", 0) >= 1 else 0.0


def _dispatch(cluster: _Cluster, stage: str, spec: str, config: Any, shards: list[list[Any]],
              todo: list[int], shards_dir: Path, store: JsonlStore, options: RayOptions,
              done: ShardedRun) -> None:
    """Run the ``todo`` shards on a pool of actors, merging each as it finishes."""
    from constitutional.core.progress import progress

    ray = cluster.ray
    resources = cluster.resources()
    gpus = _gpus_per_actor(resources, options)
    wanted = options.num_actors or _default_actors(resources, options)
    n_actors = min(wanted, len(todo))
    worker = ray.remote(ShardWorker).options(
        num_cpus=options.cpus_per_actor, num_gpus=gpus, max_restarts=options.retries,
        max_task_retries=options.retries,
        runtime_env={"env_vars": _env_vars(options.cpus_per_actor)},
    )

    def new_actor() -> Any:
        return worker.remote(spec, dict(options.model_options), options.cpus_per_actor)

    actors = [new_actor() for _ in range(n_actors)]
    done.actors = n_actors
    log.info("%s: %d shards on %d Ray actors (%d CPU%s%s each)", stage, len(todo), n_actors,
             options.cpus_per_actor, "s" if options.cpus_per_actor > 1 else "",
             f", {gpus:g} GPU" if gpus else "")
    queue = list(todo)
    attempts: Counter[int] = Counter()
    running: dict[Any, tuple[int, int]] = {}  # future -> (shard, actor slot)

    def submit(slot: int) -> None:
        i = queue.pop(0)
        future = actors[slot].run.remote(stage, i, shards[i], config, str(shards_dir / str(i)))
        running[future] = (i, slot)

    with progress(f"{stage} shards", len(todo)) as advance:
        for slot in range(n_actors):
            submit(slot)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            future = ready[0]
            i, slot = running.pop(future)
            try:
                result = ray.get(future)
            except Exception as err:  # a Ray failure of any kind: retry the shard
                cause = getattr(err, "cause", None)
                if isinstance(cause, UserError):  # bad input: the same on every attempt
                    raise cause from None
                if isinstance(err, UserError):
                    raise
                attempts[i] += 1
                done.shard_retries += 1
                if attempts[i] > options.retries:
                    first = (str(err).strip() or type(err).__name__).splitlines()[0]
                    raise UserError(f"{stage} shard {i} failed ({attempts[i]} attempts on fresh "
                                    f"actors); last error: {first}") from err
                log.warning("%s shard %d failed (%s); retrying on a fresh actor", stage, i,
                            type(err).__name__)
                ray.kill(actors[slot], no_restart=True)
                actors[slot] = new_actor()
                queue.insert(0, i)
                submit(slot)
                continue
            store.append(result.pop("records"))  # fsynced before the shard is marked done
            atomic_write_text(shards_dir / f"{i}.done", json.dumps(result, indent=2) + "\n")
            done.results[i] = result
            log.info("%s shard %d done: %d records (%d computed, %d resumed) in %.1fs", stage, i,
                     result["items"], result["computed"], result["resumed"], result["seconds"])
            advance(1)
            if queue:
                submit(slot)


# ------------------------------------------------------------------------------------------------
# the stages


def ray_revise(config: Any, options: RayOptions) -> Any:
    """``sl revise`` on Ray: the same outputs as :func:`~constitutional.sl.revise.revise`."""
    from constitutional.constitution import load_constitution
    from constitutional.prompts.sources import load_prompts
    from constitutional.sl.revise import STEPS_FILE, SUMMARY_FILE, choose_few_shot, revise

    constitution = load_constitution(config.constitution)
    if config.tags:
        constitution = constitution.filter(tags=config.tags)
    choose_few_shot(constitution, config.few_shot, config.seed)  # validates the count
    prompts = load_prompts(config.prompts, field=config.field, limit=config.limit,
                           seed=config.prompt_seed, split=config.split)
    prompts = [p for p in prompts if p.messages and p.messages[-1]["role"] == "user"]
    if not prompts:
        raise UserError("no prompts that end in a user turn", file=config.prompts)
    RunDir(config.out).pin_config("revise", config.pinned())
    sharded = run_sharded("revise", config.model, config, prompts, [p.id for p in prompts],
                          config.out, options, STEPS_FILE)
    t0 = time.perf_counter()
    result = revise(config, show_progress=False, prompts=prompts)  # nothing left to compute
    s = result.summary
    computed: Counter[str] = Counter()
    generated, gen_seconds = 0, 0.0
    for r in sharded.results.values():
        computed.update(r["summary"]["steps_computed"])
        generated += r["summary"]["generated_tokens"]
        gen_seconds += r["summary"]["generation_seconds"]
    s.update({
        "steps_computed": dict(computed),
        "steps_resumed": s["steps_resumed"] - sum(computed.values()),
        "generated_tokens": generated,
        "generation_seconds": round(gen_seconds, 2),  # summed over the actors
        "tokens_per_second": round(generated / gen_seconds, 1) if gen_seconds else None,
        "wall_seconds": round(sharded.seconds + time.perf_counter() - t0, 2),
        "executor": sharded.executor(),
    })
    atomic_write_text(Path(config.out) / SUMMARY_FILE, json.dumps(s, indent=2,
                                                                  ensure_ascii=False) + "\n")
    return result


def ray_sample(prompts: Sequence[Any], config: Any, out: str | Path,
               options: RayOptions) -> Any:
    """``rl sample`` on Ray: the same ``pairs.jsonl`` as :func:`~constitutional.rl.sample.sample`."""
    from constitutional.rl.sample import RECORDS, STAGE, sample

    if config.chunk_size < 1:
        raise UserError(f"must be at least 1, got {config.chunk_size}", field="chunk_size")
    config.sampling()  # validates the sampling values
    if not prompts:
        raise UserError("no prompts to answer")
    RunDir(out).pin_config(STAGE, config.pinned())
    # shard by prompt id: prompts that share a pair id share a prompt id, so one shard has both
    sharded = run_sharded("sample", config.model, config, prompts, [p.id for p in prompts], out,
                          options, RECORDS)
    result = sample(prompts, config, out)  # nothing left to compute: writes pairs.jsonl
    result.generated = sharded.computed
    result.seconds = sharded.seconds + result.seconds
    result.stats = {**sharded.stats(), "executor": sharded.executor()}
    return result


def ray_label(pairs: Sequence[dict[str, Any]], config: Any, out: str | Path,
              options: RayOptions) -> Any:
    """``rl label`` on Ray: the same outputs as :func:`~constitutional.rl.label.label`."""
    from constitutional.rl.label import RECORDS, STAGE, SUMMARY, label, resolve_constitution

    if not pairs:
        raise UserError("no pairs to label")
    constitution = resolve_constitution(config)
    RunDir(out).pin_config(STAGE, config.pinned(constitution))
    sharded = run_sharded("label", config.feedback_model, config, pairs,
                          [p["id"] for p in pairs], out, options, RECORDS)
    result = label(pairs, config, out, constitution=constitution)  # writes the outputs
    result.labelled = sharded.computed
    result.seconds = sharded.seconds + result.seconds
    result.stats = sharded.stats()
    summary_file = Path(out) / SUMMARY
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    summary.update({"seconds_this_call": result.seconds, "model_stats_this_call": result.stats,
                    "executor": sharded.executor()})
    atomic_write_text(summary_file, json.dumps(summary, indent=2) + "\n")
    return result


def ray_answer(rows: Sequence[dict[str, Any]], spec: str, config: Any, out: str | Path,
               options: RayOptions, name: str, records: str | None = None) -> ShardedRun:
    """The eval stage's answers of one checkpoint (``spec``) on Ray: the same records in
    ``out/<records>`` (default ``answers.records.jsonl``) as
    :func:`~constitutional.evaluate.answers.answer_rows` in this process; shards under
    ``out/shards/answer-<name>``."""
    from constitutional.evaluate.answers import RECORDS

    return run_sharded("answer", spec, config, rows, [r["id"] for r in rows], out, options,
                       records or RECORDS, name=f"answer-{name}")
