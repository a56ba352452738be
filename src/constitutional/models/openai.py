"""The OpenAI-compatible HTTP backend (vLLM, SGLang, llama.cpp server, ``transformers serve``, …).

It uses the official ``openai`` SDK with the SDK's own retries switched off, so that retries are
ours to count and report:

* at most ``max_concurrency`` requests are in flight (a thread pool over the SDK's sync client);
* 429, 5xx, time-outs, dropped connections and malformed bodies are retried with exponential
  backoff and jitter (``Retry-After`` is honoured); ``stats.retries`` counts them;
* a 4xx other than 429 is the caller's mistake and becomes a one-line :class:`UserError`.

Generation uses ``chat/completions`` for conversations and ``completions`` for raw text.

``score`` reads log-probabilities in one of two ways (``score_mode``):

* ``"top_logprobs"`` (default): one request per context asking for one token and its top-k
  alternatives; each option's log-probability is read from that list. Options must be single
  tokens (as "A"/"B" after "The answer is: (" are). An option missing from the top-k gets the
  smallest listed value — an upper bound — and is counted in ``stats.errors``.
* ``"echo"``: ``completions`` with ``echo=True`` returns the log-probability of every prompt token;
  the option's tokens are summed. Works for multi-token options on servers that implement echo
  correctly (vLLM). llama-cpp-python's echo log-probabilities are shifted by one position
  (seen with 0.3.36), so do not use echo there.

The API key is read from ``$OPENAI_API_KEY`` (or the variable named by ``api_key_env``) and is
never logged or shown in ``repr``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai

from constitutional.core.errors import UserError
from constitutional.models.base import (
    LanguageModel,
    ModelStats,
    Prompt,
    SamplingParams,
    normalize_options,
    sample_seed,
    truncate_at_stop,
    validate_prompts,
)

log = logging.getLogger(__name__)

SCORE_MODES = ("top_logprobs", "echo")


class MalformedResponse(Exception):
    """The server answered 2xx with a body that is not the expected JSON object."""


_RETRYABLE = (
    openai.RateLimitError,
    openai.InternalServerError,
    openai.APITimeoutError,
    openai.APIConnectionError,
    openai.APIResponseValidationError,
    MalformedResponse,
    json.JSONDecodeError,  # a truncated or non-JSON body
)


class OpenAIModel(LanguageModel):
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        spec: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_concurrency: int = 16,
        score_mode: str = "top_logprobs",
        top_logprobs: int = 20,
        check: bool = True,
    ) -> None:
        if score_mode not in SCORE_MODES:
            raise UserError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        self.spec = spec or f"openai:{base_url}#{model}"
        self.base_url = base_url
        self.model = model
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_concurrency = max_concurrency
        self.score_mode = score_mode
        self.top_logprobs = top_logprobs
        self.stats = ModelStats()
        self._lock = threading.Lock()
        self.client = openai.OpenAI(
            base_url=base_url,
            api_key=os.environ.get(api_key_env) or "EMPTY",  # local servers accept any key
            timeout=timeout,
            max_retries=0,  # retries are ours, so that we can count them
        )
        if check:
            self._check_reachable()

    def __repr__(self) -> str:  # never include the key
        return f"OpenAIModel({self.base_url!r}, {self.model!r})"

    # ----------------------------------------------------------------------------------------
    # requests

    def _check_reachable(self) -> None:
        try:
            self.client.with_options(timeout=10.0).models.list()
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            raise UserError(
                f"cannot reach the OpenAI-compatible server at {self.base_url} "
                f"({type(err).__name__}); is it running?"
            ) from err
        except openai.AuthenticationError as err:
            raise UserError(
                f"the server at {self.base_url} rejected the API key; set $OPENAI_API_KEY"
            ) from err
        except openai.APIStatusError:
            pass  # some servers have no /models; generation will tell

    def _count(self, key: str, retry: bool) -> None:
        with self._lock:
            self.stats.errors[key] = self.stats.errors.get(key, 0) + 1
            if retry:
                self.stats.retries += 1

    def _request(self, fn: Callable[..., Any], check: Callable[[Any], None], **kwargs: Any) -> Any:
        """Call ``fn`` with retries; ``check`` raises :class:`MalformedResponse` on a bad body."""
        delay = self.backoff
        for attempt in range(self.max_retries + 1):
            try:
                resp = fn(model=self.model, **kwargs)
                check(resp)
                with self._lock:
                    self.stats.requests += 1
                    usage = getattr(resp, "usage", None)
                    if usage is not None:
                        self.stats.prompt_tokens += usage.prompt_tokens or 0
                        self.stats.generated_tokens += usage.completion_tokens or 0
                return resp
            except openai.APIStatusError as err:
                if not isinstance(err, openai.RateLimitError | openai.InternalServerError):
                    raise UserError(
                        f"{self.base_url} rejected the request ({err.status_code}): "
                        f"{_first_line(err.message)}"
                    ) from err
                last: Exception = err
            except _RETRYABLE as err:
                last = err
            self._count(type(last).__name__, retry=attempt < self.max_retries)
            if attempt == self.max_retries:
                break
            wait = min(delay, self.max_backoff) * (1 + 0.25 * random.random())
            retry_after = _retry_after(last)
            if retry_after is not None:
                wait = min(max(wait, retry_after), self.max_backoff)
            log.debug("retrying after %s (attempt %d, %.2fs)", type(last).__name__, attempt + 1, wait)
            time.sleep(wait)
            delay *= 2
        raise UserError(
            f"{self.base_url}: request failed after {self.max_retries} retries "
            f"({type(last).__name__}: {_first_line(str(last))})"
        ) from last

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if len(items) <= 1 or self.max_concurrency <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    # ----------------------------------------------------------------------------------------
    # generate

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[str]:
        validate_prompts(prompts)
        t0 = time.perf_counter()
        samples = 1 if params.greedy else params.n
        jobs = [(i, k) for i in range(len(prompts)) for k in range(samples)]

        def run(job: tuple[int, int]) -> str:
            i, k = job
            prompt = prompts[i]
            common: dict[str, Any] = {
                "temperature": params.temperature,
                "max_tokens": params.max_new_tokens,
            }
            if params.top_p < 1.0:
                common["top_p"] = params.top_p
            if params.stop:
                common["stop"] = list(params.stop[:4])  # the API takes at most 4; we trim all
            if not params.greedy:
                common["seed"] = sample_seed(params.seed, prompt, k) & 0x7FFF_FFFF
            if isinstance(prompt, str):
                resp = self._request(
                    self.client.completions.create, _check_completion, prompt=prompt, **common
                )
                text = resp.choices[0].text or ""
            else:
                resp = self._request(
                    self.client.chat.completions.create, _check_chat, messages=prompt, **common
                )
                text = resp.choices[0].message.content or ""
            return truncate_at_stop(text, params.stop)

        texts = dict(zip(jobs, self._map(run, jobs), strict=True))
        with self._lock:
            self.stats.seconds += time.perf_counter() - t0
        return [texts[(i, k if samples > 1 else 0)] for i in range(len(prompts)) for k in range(params.n)]

    # ----------------------------------------------------------------------------------------
    # score

    def score(
        self, contexts: Sequence[Prompt], options: Sequence[str] | Sequence[Sequence[str]]
    ) -> list[list[float]]:
        validate_prompts(contexts)
        opts = normalize_options(contexts, options)
        t0 = time.perf_counter()
        if self.score_mode == "echo":
            if any(not isinstance(c, str) for c in contexts):
                raise UserError("score_mode 'echo' needs raw-text contexts, not conversations")
            jobs = [(i, j) for i, os_ in enumerate(opts) for j in range(len(os_))]
            values = self._map(lambda job: self._echo_logprob(contexts[job[0]], opts[job[0]][job[1]]), jobs)
            result: list[list[float]] = [[0.0] * len(o) for o in opts]
            for (i, j), v in zip(jobs, values, strict=True):
                result[i][j] = v
        else:
            result = self._map(lambda i: self._top_logprobs(contexts[i], opts[i]), range(len(contexts)))
        with self._lock:
            self.stats.seconds += time.perf_counter() - t0
        return result

    def _top_logprobs(self, context: Prompt, options: list[str]) -> list[float]:
        if isinstance(context, str):
            resp = self._request(
                self.client.completions.create, _check_completion_logprobs,
                prompt=context, max_tokens=1, temperature=0.0, logprobs=self.top_logprobs,
            )
            top: dict[str, float] = dict(resp.choices[0].logprobs.top_logprobs[0])
        else:
            extra = {}
            if context[-1]["role"] == "assistant":  # continue an answer prefix (vLLM, SGLang)
                extra = {"continue_final_message": True, "add_generation_prompt": False}
            resp = self._request(
                self.client.chat.completions.create, _check_chat_logprobs,
                messages=context, max_tokens=1, temperature=0.0, logprobs=True,
                top_logprobs=self.top_logprobs, extra_body=extra or None,
            )
            top = {t.token: t.logprob for t in resp.choices[0].logprobs.content[0].top_logprobs}
        floor = min(top.values())
        values = []
        for option in options:
            if option in top:
                values.append(float(top[option]))
            else:
                self._count("option_not_in_top_logprobs", retry=False)
                values.append(float(floor))
        return values

    def _echo_logprob(self, context: str, option: str) -> float:
        resp = self._request(
            self.client.completions.create, _check_completion_logprobs,
            prompt=context + option, max_tokens=1, temperature=0.0, echo=True, logprobs=1,
        )
        lp = resp.choices[0].logprobs
        end = len(context) + len(option)
        total = 0.0
        for offset, value in zip(lp.text_offset, lp.token_logprobs, strict=False):
            if len(context) <= offset < end and value is not None:
                total += value
        return total


# ------------------------------------------------------------------------------------------------
# response checks: the SDK hands back a plain string or a half-filled object for a non-JSON body


def _check_chat(resp: Any) -> None:
    if not getattr(resp, "choices", None) or getattr(resp.choices[0], "message", None) is None:
        raise MalformedResponse("chat completion without choices")


def _check_completion(resp: Any) -> None:
    if not getattr(resp, "choices", None) or not hasattr(resp.choices[0], "text"):
        raise MalformedResponse("completion without choices")


def _check_chat_logprobs(resp: Any) -> None:
    _check_chat(resp)
    lp = resp.choices[0].logprobs
    if lp is None or not lp.content or not lp.content[0].top_logprobs:
        raise UserError("the server returned no logprobs for chat completions; "
                        "use raw-text contexts (completions) or another server")


def _check_completion_logprobs(resp: Any) -> None:
    _check_completion(resp)
    lp = resp.choices[0].logprobs
    if lp is None or not lp.top_logprobs and not lp.token_logprobs:
        raise UserError("the server returned no logprobs for completions")


def _retry_after(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _first_line(text: str) -> str:
    text = (text or "").strip()
    return text.splitlines()[0][:300] if text else ""
