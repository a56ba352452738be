"""The model interface every stage uses: ``generate`` and ``score``.

In the spirit of lm-evaluation-harness (``generate_until`` / ``loglikelihood``): a backend is
anything that answers these two verbs. Batching, caching and retries live in the backend, so the
CAI stages stay small.

Prompts come in two shapes:

* a **conversation** — a list of ``{"role", "content"}`` messages — rendered with the model's chat
  template. If its last message is from the assistant, that message is a *prefix* the model
  continues (used for answer prefixes such as ``"The answer is: ("``);
* a **raw string**, used verbatim (for pretrained base models).
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Self, TypeAlias

from constitutional.core.errors import UserError
from constitutional.core.messages import ROLES, Conversation, is_message

Prompt: TypeAlias = str | Conversation


@dataclass(frozen=True)
class SamplingParams:
    """How to sample, as one value passed around (like vLLM's ``SamplingParams``).

    ``temperature == 0`` means greedy decoding. ``seed`` makes sampling reproducible *per prompt*:
    the same prompt with the same seed gives the same sample whatever else is in its batch, so
    resumed and sharded runs reproduce single-process runs record for record.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0
    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             "an integer >= 1"),
            ("n", isinstance(self.n, int) and self.n >= 1, "an integer >= 1"),
            ("seed", isinstance(self.seed, int) and self.seed >= 0, "an integer >= 0"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise UserError(f"sampling parameter {name} must be {want}, got {getattr(self, name)!r}")
        if any(not s for s in self.stop):
            raise UserError("sampling parameter stop must not contain an empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass
class ModelStats:
    """Counters a backend keeps; stages report them in their summaries."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    scored_tokens: int = 0  # tokens ``score`` ran through the model (a shared prefix once)
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LanguageModel(ABC):
    """A language model backend. Subclasses implement ``generate`` and ``score``."""

    #: The spec string this model was loaded from (``builtin:…``, a path, ``openai:…``).
    spec: str
    stats: ModelStats

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[str]:
        """Generate ``params.n`` completions per prompt.

        Returns a flat list of ``len(prompts) * params.n`` strings, prompt-major: the samples of
        prompt 0, then those of prompt 1, and so on. Stop strings are not included in the text.
        """

    @abstractmethod
    def score(
        self, contexts: Sequence[Prompt], options: Sequence[str] | Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Log-probability of each option continuation given each context.

        ``options`` is either one list shared by every context (e.g. ``["A", "B"]``) or one list per
        context. Returns ``result[i][j] = log P(options[i][j] | contexts[i])``, summed over the
        option's tokens.
        """

    def close(self) -> None:
        """Release resources (servers, pools, a vLLM engine and its memory). Idempotent; the
        model is not used after it."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class TokenizerPrompts:
    """Prompt rendering for backends that hold a Hugging Face tokenizer (``hf``, ``vllm``): the
    same chat template, the same token ids, the same option continuations in both."""

    spec: str
    tokenizer: Any

    def render(self, prompt: Prompt) -> str:
        """The exact text the model sees for ``prompt`` (chat template applied to conversations)."""
        if isinstance(prompt, str):
            return prompt
        if not self.tokenizer.chat_template:
            raise UserError(
                f"model {self.spec} has no chat template; give it raw text prompts instead"
            )
        cont = prompt[-1]["role"] == "assistant"
        return self.tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
        )

    def encode(self, prompt: Prompt) -> list[int]:
        text = self.render(prompt)
        # chat templates carry their own special tokens; raw text gets the tokenizer's defaults
        return self.tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]

    def _continuation(self, context: Prompt, ctx_ids: list[int], option: str) -> list[int]:
        """Token ids of ``option`` as it continues ``context``.

        Encodes context+option together and takes the tail when the context's tokens are a prefix
        of it (so merges across the boundary are respected); otherwise encodes the option alone.
        """
        full = self.tokenizer(
            self.render(context) + option, add_special_tokens=isinstance(context, str)
        )["input_ids"]
        if full[: len(ctx_ids)] == ctx_ids and len(full) > len(ctx_ids):
            return full[len(ctx_ids) :]
        ids = self.tokenizer(option, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(f"score: option {option!r} encodes to no tokens")
        return ids


# --------------------------------------------------------------------------------------------
# Helpers shared by backends


def validate_prompts(prompts: Sequence[Prompt]) -> None:
    """Raise a :class:`UserError` for a malformed prompt (wrong type, unknown role, no content)."""
    if isinstance(prompts, str | dict):
        raise UserError("prompts must be a list of prompts, not a single prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            continue
        if not isinstance(p, list) or not p:
            raise UserError(f"prompt {i}: expected a string or a non-empty list of messages")
        for j, m in enumerate(p):
            if not is_message(m):
                raise UserError(
                    f"prompt {i}, message {j}: expected {{'role': one of {ROLES}, 'content': str}}"
                )


def normalize_options(
    contexts: Sequence[Prompt], options: Sequence[str] | Sequence[Sequence[str]]
) -> list[list[str]]:
    """Expand a shared option list to one list per context."""
    if len(options) and all(isinstance(o, str) for o in options):
        return [list(options) for _ in contexts]  # type: ignore[arg-type]
    if len(options) != len(contexts):
        raise UserError(f"score: got {len(options)} option lists for {len(contexts)} contexts")
    out = [list(o) for o in options]  # type: ignore[arg-type]
    if any(not o for o in out):
        raise UserError("score: every context needs at least one option")
    return out


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def prompt_key(prompt: Prompt) -> str:
    """A stable text form of a prompt, used to derive per-prompt seeds."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def sample_seed(seed: int, prompt: Prompt, index: int) -> int:
    """The seed of sample ``index`` of ``prompt``: depends only on these, never on the batch."""
    h = hashlib.blake2b(f"{seed}\x00{index}\x00{prompt_key(prompt)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


# --------------------------------------------------------------------------------------------
# Sampling rows, shared by the backends that sample token ids themselves (``hf``, ``vllm``)


@dataclass(frozen=True)
class SampleRow:
    """One sequence a ``generate`` call runs: sample ``sample`` of prompt ``prompt``, drawn with
    ``seed`` (``None``: greedy)."""

    prompt: int
    sample: int
    seed: int | None


def sample_rows(prompts: Sequence[Prompt], params: SamplingParams) -> list[SampleRow]:
    """The rows of a ``generate`` call: one per (prompt, sample index), prompt-major, each
    seeded by :func:`sample_seed` (so a sample depends on its prompt and index alone). Greedy
    samples are identical, so a greedy call runs each prompt once (``per_prompt`` repeats it)."""
    if params.greedy:
        return [SampleRow(i, 0, None) for i in range(len(prompts))]
    return [SampleRow(i, k, sample_seed(params.seed, prompts[i], k))
            for i in range(len(prompts)) for k in range(params.n)]


def per_prompt(outputs: Sequence[Any], params: SamplingParams) -> list[Any]:
    """The outputs of :func:`sample_rows`' rows (in their order) as ``generate`` returns them:
    ``params.n`` per prompt, prompt-major (a greedy row repeated ``n`` times)."""
    if params.greedy:
        return [out for out in outputs for _ in range(params.n)]
    return list(outputs)


def eos_token_ids(eos: int | list[int] | None, tokenizer: Any) -> set[int]:
    """The tokens that end a sample: ``eos`` (a generation config's ``eos_token_id``, one id or
    a list), else the tokenizer's EOS token."""
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def finish_sample(new: Sequence[int], eos_ids: set[int], tokenizer: Any,
                  stop: Sequence[str]) -> tuple[str, list[int], int]:
    """A sample's (text, token ids, generated token count) from the ids a backend generated:
    the text is decoded up to the first EOS token and cut at the first stop string; the ids end
    with that EOS token when the model stopped by itself (stop strings cut the text only); the
    count excludes the EOS token."""
    n_tokens = next((t for t, tok in enumerate(new) if tok in eos_ids), len(new))
    text = tokenizer.decode(list(new[:n_tokens]), skip_special_tokens=True)
    return truncate_at_stop(text, stop), list(new[: n_tokens + 1]), n_tokens
