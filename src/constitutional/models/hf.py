"""The transformers backend: real batching on CPU or CUDA.

* Prompts are tokenized once, sorted by length and cut into batches bounded by a token budget
  (``rows × (longest prompt + max_new_tokens) ≤ max_batch_tokens``), left-padded, and run through
  ``model.generate``. There is no loop over single sequences.
* Sampling is *per-row seeded*: a logits processor draws one uniform number per row and step from
  a generator seeded by (seed, prompt, sample index) and samples by inverse CDF; decoding then
  takes the argmax. The sample is exact, and it does not depend on which other prompts share the
  batch — so resumed or sharded runs reproduce a single-process run.
* ``score`` reads option log-probabilities. When every option of a context is one token, all of
  them are read from one forward pass over the context (``logits_to_keep=1``).
* **Shared prefixes** (a few-shot block in front of every prompt) are computed once: when the rows
  of a batch share at least ``min_shared_prefix`` leading tokens, their KV cache is computed for
  one row, repeated across the batch, and only the per-row suffixes run through the model. Rows
  are laid out as ``[prefix][padding][suffix]``; position ids come from the attention mask, so the
  result equals the unshared computation.
  The prefix shared by all of a call's prompts is computed before batching, so every batch,
  one-row batches included, reuses it.
* **On CPU, generation runs through our engine** (:mod:`constitutional.models.engines.cascade`, option
  ``engine``; ``auto`` picks it on CPU for Llama-type models): cascade attention reads the
  shared prefix's keys once per step for all rows, rows sit ragged in their own buffers, and
  each finished row's keys and values are kept (``kv_reuse_gib``, 2 GiB) so that a next call
  whose context extends it (a critique after an answer, a revision after a critique) prefills
  only its new tokens. Finished rows leave the batch. Otherwise (GPUs, other models,
  ``engine="generate"``) generation goes through ``model.generate`` as below.
* **``model.generate`` writes into a preallocated KV cache** (transformers' ``StaticCache``, sized
  prompt + ``max_new_tokens``, with the shared prefix copied into every row once). The default
  ``DynamicCache`` concatenates each new token onto the whole cache, copying every row's
  ~1,000-token few-shot context at every step of every layer: that copy was 70% of the time of a
  revise step on CPU.
* **Prefill runs a few rows at a time** (``max_prefill_tokens``, rows × width per pass; 4,096 on
  CPU, one pass on GPUs): scoring batches are cut to it, and generation prefills its prompts into
  the preallocated cache in such chunks before decoding all rows together. On CPU a small pass
  keeps its working set in the processor's caches and is about twice as fast per row.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
from constitutional.models.engines import cascade, guard

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


@dataclass
class _Batch:
    """A laid-out batch: full ids and mask, the ids still to run, and the shared-prefix cache."""

    ids: torch.Tensor  # [rows, shared + width]
    mask: torch.Tensor  # same shape
    new_ids: torch.Tensor  # the part not covered by ``cache``
    cache: Any  # a KV cache of the shared prefix, repeated per row, or None
    shared: int  # length of the shared prefix (0 when not shared)
    prefix_cache: Any = None  # the shared prefix's one-row KV cache (when ``cache`` is None)


def _shared_prefix_len(seqs: Sequence[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        tok = first[i]
        if any(s[i] != tok for s in seqs[1:]):
            return i
    return n


def _repeated(cache: Any, rows: int) -> Any:
    """A copy of a one-row KV cache, repeated ``rows`` times."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(rows)
    return out


class StopOnStrings:
    """A stopping criterion: a row is finished once its generated text contains a stop string.

    transformers' own ``stop_strings`` rebuilds a vocabulary-sized table on every ``generate``
    call (seconds for a 49k vocabulary), so we check the decoded tail of each row instead: a few
    tokens per row and step, enough to cover the longest stop string.
    """

    def __init__(self, stops: Sequence[str], tokenizer: Any, prompt_width: int) -> None:
        self.stops = list(stops)
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.window = max(len(s) for s in self.stops) + 2  # tokens are at least one character

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        start = max(self.prompt_width, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:].tolist(), skip_special_tokens=False)
        done = [any(s in t for s in self.stops) for t in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class SeededSampler:
    """A logits processor that turns greedy decoding into per-row seeded sampling.

    For each row it applies temperature and nucleus (top-p) filtering, draws one uniform number
    from that row's own generator, and picks the token where it falls in the cumulative
    distribution (inverse-CDF sampling, exact; with top-p the distribution is laid out from the
    most likely token down, without it in vocabulary order). Every other score is set to -inf, so the generate
    loop's argmax returns the sampled token. Each row draws one number per step, so its samples
    depend only on its seed, never on the rest of the batch.
    """

    TOP_K_FIRST = 512

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def subset(self, rows: Sequence[int]) -> SeededSampler:
        """The sampler of ``rows`` only (their generators go on where they were)."""
        out = copy.copy(self)
        out.generators = [self.generators[r] for r in rows]
        return out

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            # the nucleus is almost always within the top few hundred tokens: sort those, and
            # the whole vocabulary only when their mass falls short of top_p (same result)
            k = min(self.TOP_K_FIRST, probs.shape[-1])
            sorted_probs, idx = probs.topk(k, dim=-1)
            if bool((sorted_probs.sum(dim=-1) < self.top_p).any()):
                sorted_probs, idx = probs.sort(dim=-1, descending=True)
            # drop a token when the mass before it already reaches top_p (keep at least one)
            drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= self.top_p
            drop[..., 0] = False
            ids = idx
            cand = sorted_probs.masked_fill(drop, 0.0)
        else:
            ids, cand = None, probs
        cdf = cand.double().cumsum(dim=-1)
        u = torch.tensor([float(torch.rand(1, generator=g, dtype=torch.float64)) for g in
                          self.generators], dtype=torch.float64, device=cdf.device)
        pos = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True)
        pos = pos.clamp_(max=cdf.shape[-1] - 1)
        # never land on a zero-probability token through rounding at the top of the CDF
        zero = cand.gather(-1, pos) <= 0
        if zero.any():
            pos = torch.where(zero, cand.argmax(dim=-1, keepdim=True), pos)
        choice = pos if ids is None else ids.gather(-1, pos)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, choice, 0.0)


class HFModel(TokenizerPrompts, LanguageModel):
    """A causal LM loaded with transformers from a local directory or a hub id."""

    #: ``score`` reads all options of a batch in one pass when the batch's context cache,
    #: repeated once per option, holds at most this many token positions
    SCORE_REPEAT_TOKENS = 16384

    def __init__(
        self,
        name_or_path: str | Path,
        *,
        spec: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        trust_remote_code: bool = False,
        max_batch_tokens: int | None = None,
        max_batch_size: int = 64,
        kv_cache_gib: float = 4.0,
        max_prefill_tokens: int | None = None,
        min_shared_prefix: int = 32,
        engine: str = "auto",
        kv_reuse_gib: float = 2.0,
        generate_dtype: str | torch.dtype | None = "auto",
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = spec or str(name_or_path)
        self.device = resolve_device(device)
        self.max_batch_size = max_batch_size
        self.min_shared_prefix = min_shared_prefix
        self.stats = ModelStats()
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(
                str(name_or_path), trust_remote_code=trust_remote_code
            )
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                str(name_or_path),
                dtype=resolve_dtype(dtype, self.device),
                trust_remote_code=trust_remote_code,
            )
        self.tokenizer = tokenizer
        self.model = model.to(self.device).eval()
        # the batch budget: rows × (prompt + new tokens) ≤ max_batch_tokens; by default as many
        # tokens as fit in ``kv_cache_gib`` of KV cache for this model (~93k tokens for the
        # built-in 135M model in float32, ~33k for an 8B Llama in bfloat16)
        self.max_batch_tokens = max_batch_tokens or max(
            2048, int(kv_cache_gib * 2**30 // self._kv_bytes_per_token()))
        # prefill (scoring, and the prompt pass of generation) runs at most this many tokens
        # (rows × width) per forward pass; on CPU small passes are faster per row, on GPUs
        # one big pass is
        self.max_prefill_tokens = max_prefill_tokens or (
            4096 if self.device.type == "cpu" else self.max_batch_tokens)
        # scoring passes on CPU: 1,024 tokens (one long context, or a few short ones) per pass
        # ran faster per token than 4,096 for both `eval mc` (32 paper MC rows: 17.7 s vs
        # 20.4 s) and `rl label` (24 pairs: 25.8 s vs 29.0 s) on this project's 2-core CPU
        self.score_prefill_tokens = max_prefill_tokens or (
            1024 if self.device.type == "cpu" else self.max_batch_tokens)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._choose_engine(engine)
        self.kv_store = cascade.KVStore(int(kv_reuse_gib * 2**30))
        self._prefix: cascade.Prefix | None = None
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id: int = self.tokenizer.pad_token_id
        self._engine_args = {"max_batch_tokens": max_batch_tokens,
                             "max_batch_size": max_batch_size, "kv_cache_gib": kv_cache_gib,
                             "max_prefill_tokens": max_prefill_tokens,
                             "min_shared_prefix": min_shared_prefix, "kv_reuse_gib": kv_reuse_gib}
        self.generate_dtype = self._choose_generate_dtype(generate_dtype)
        self._shadow: HFModel | None = None

    def _choose_generate_dtype(self, choice: str | torch.dtype | None) -> torch.dtype:
        """The dtype generation computes in: the weights' (``auto``), or another, e.g.
        ``bfloat16`` on a CPU that computes in it natively (AVX512-BF16 or AMX: about 1.4-1.6x
        the tokens/s of float32 on this project's CPU, bench/generate.py). Scoring (labels, MC
        evals, log-probabilities) always computes in the weights' dtype.

        Not the default: in bfloat16 a row's logits depend slightly on which rows share its
        batch, enough to flip a sampled token now and then, so a resumed or sharded stage no
        longer reproduces the uninterrupted single-process run record for record (float32
        does). PPO asks for it (its rollout batches are a function of the step alone)."""
        if choice in (None, "auto"):
            return next(self.model.parameters()).dtype
        return resolve_dtype(choice, self.device)

    def sync_weights(self) -> None:
        """Mark the model's weights as changed (as TRL's ``sync_weights`` for vLLM): the next
        generation refreshes the low-precision copy, the packed weights and the cached keys and
        values. Needed after updates that version counters do not see (fused optimizers)."""
        setattr(self.model, cascade.SYNC_ATTR, getattr(self.model, cascade.SYNC_ATTR, 0) + 1)

    def prepare_generation(self) -> torch.dtype:
        """Decide now, on the present weights, how generation computes, and return the dtype it
        computes in: the low-precision copy is built and the fast engine's self-check runs on it
        (which, in bfloat16, can pass on some weights and fail on others). A trainer calls this
        once, before it loads a checkpoint, so that a resumed run samples as the uninterrupted
        run did; later weight changes (:meth:`sync_weights`) refresh the copy, never the choice."""
        self._generator()
        return self.generate_dtype

    def _generator(self) -> HFModel:
        """The model that generates: this one, or a copy of it in ``generate_dtype`` (only its
        parameters cast; buffers such as the rotary frequencies keep their dtype), refreshed
        whenever this model's weights change (PPO's policy between rollouts)."""
        if self.generate_dtype == next(self.model.parameters()).dtype:
            return self
        version = cascade.weights_version(self.model)
        if self._shadow is None:
            model = copy.deepcopy(self.model).requires_grad_(False)
            for p in model.parameters():
                p.data = p.data.to(self.generate_dtype)
            shadow = HFModel(self.spec, spec=self.spec, device=str(self.device), model=model,
                             tokenizer=self.tokenizer, generate_dtype=self.generate_dtype,
                             **self._engine_args)
            if shadow.engine != self.engine:  # its self-check failed in that dtype
                self.generate_dtype = next(self.model.parameters()).dtype
                return self
            shadow.stats = self.stats
            self._shadow, self._shadow_of = shadow, version
        elif self._shadow_of != version:
            with torch.no_grad():
                for src, dst in zip(self.model.parameters(), self._shadow.model.parameters(),
                                    strict=True):
                    dst.copy_(src)
            self._shadow_of = version
        return self._shadow

    def _choose_engine(self, engine: str) -> None:
        """The generation engine: the cascade engine (models.engines.cascade) on CPU for the
        models it supports, else ``model.generate`` into a preallocated cache."""
        if engine not in ("auto", "cascade", "generate"):
            raise UserError(f"unknown engine {engine!r}; choose auto, cascade or generate",
                            field="engine")
        if engine == "cascade" and not cascade.supported(self.model):
            raise UserError(f"the cascade engine does not support model type "
                            f"{self.model.config.model_type!r}", field="engine")
        # private internals (the engine, oneDNN linears, StaticCache surgery) only on tested
        # versions, and the engine only after its self-check (see models.engines.guard)
        self.internals, why = guard.internals_allowed()
        self._onednn = (cascade.OneDNNWeights()
                        if self.internals and cascade.OneDNNWeights.usable(self.model) else None)
        want = engine == "cascade" or (
            engine == "auto" and self.device.type == "cpu" and cascade.supported(self.model))
        self.engine = "generate"
        if want and why is not None:
            guard.warn_once(why)
        elif want:
            failed = cascade.self_check(self.model, self._fast_linears())
            if failed is None:
                self.engine = "cascade"
            else:
                self.internals, self._onednn = False, None
                guard.warn_once(f"its self-check failed on {guard.versions_text()} ({failed})")

    def _kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token of one row: layers × (keys + values) × KV heads × head dim."""
        layers, heads, head_dim = cascade.kv_shape(self.model)
        size = next(self.model.parameters()).element_size()
        return max(1, layers * 2 * heads * head_dim * size)

    # ----------------------------------------------------------------------------------------
    # Batching

    def _batches(self, lengths: Sequence[int], extra: int,
                 budget: int | None = None) -> Iterator[list[int]]:
        """Indices sorted by length, cut so that rows × (longest + extra) ≤ the token budget
        (``max_batch_tokens`` unless given).

        Greedy filling can leave a last batch of a few rows, which costs as many decoding steps
        as a full one; so the rows are re-cut into as many batches of near-equal size, used when
        every one of them fits the budget (else the greedy batches are)."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])

        def fits(rows: list[int]) -> bool:
            longest = max(lengths[j] for j in rows)
            return len(rows) <= self.max_batch_size and (
                len(rows) == 1 or len(rows) * (longest + extra) <= (budget or self.max_batch_tokens))

        greedy: list[list[int]] = []
        for i in order:
            if greedy and fits([*greedy[-1], i]):
                greedy[-1].append(i)
            else:
                greedy.append([i])
        k = len(greedy)
        if k <= 1:
            yield from greedy
            return
        size, extra_rows = divmod(len(order), k)
        even, start = [], 0
        for b in range(k):
            end = start + size + (b < extra_rows)
            even.append(order[start:end])
            start = end
        yield from (even if all(fits(b) for b in even) else greedy)

    def _left_pad(self, seqs: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _layout(self, seqs: Sequence[list[int]], caches: dict[tuple[int, ...], Any],
                repeat: bool = True, keep: int = 1) -> _Batch:
        """Lay out a batch, splitting off a shared prefix whose KV cache is computed once.

        ``caches`` maps prefixes to their single-row KV cache and is reused across the batches of
        one call. With ``repeat`` the prefix cache is copied per row (``cache``); without, the
        one-row cache is left in ``prefix_cache`` for the caller to place. Every row keeps at
        least ``keep`` tokens of its own (the positions whose logits are read).
        """
        # reuse the prefix cached by an earlier batch of this call when every row extends it
        prefix = next(
            (p for p in caches
             if all(len(s) >= len(p) + keep and tuple(s[: len(p)]) == p for s in seqs)),
            None,
        )
        if prefix is None:
            prefix = self._cache_common_prefix(seqs, caches, keep)
            if prefix is None:
                ids, mask = self._left_pad(seqs)
                return _Batch(ids, mask, ids, None, 0)
        shared = len(prefix)
        cache = _repeated(caches[prefix], len(seqs)) if repeat else None
        suffix_ids, suffix_mask = self._left_pad([s[shared:] for s in seqs])
        prefix_ids = torch.tensor([prefix] * len(seqs), dtype=torch.long, device=self.device)
        ids = torch.cat([prefix_ids, suffix_ids], dim=1)
        mask = torch.cat([torch.ones_like(prefix_ids), suffix_mask], dim=1)
        return _Batch(ids, mask, suffix_ids, cache, shared,
                      None if repeat else caches[prefix])

    def _seed_prefix(self, seqs: Sequence[list[int]], caches: dict[tuple[int, ...], Any],
                     keep: int = 1) -> None:
        """Compute the KV cache of the prefix shared by all of a call's sequences up front, so
        that every batch reuses it, one-row batches included."""
        if not caches:
            self._cache_common_prefix(seqs, caches, keep)

    def _cache_common_prefix(self, seqs: Sequence[list[int]], caches: dict[tuple[int, ...], Any],
                             keep: int = 1) -> tuple[int, ...] | None:
        """The prefix all of ``seqs`` share (each keeps at least one token of its own), with its
        one-row KV cache put in ``caches`` (replacing any other: a call has one few-shot block);
        None when it is shorter than ``min_shared_prefix``."""
        if len(seqs) < 2:
            return None
        shared = min(_shared_prefix_len(seqs), min(len(s) for s in seqs) - keep)
        if shared < self.min_shared_prefix:
            return None
        prefix = tuple(seqs[0][:shared])
        caches.clear()
        out = self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True,
                         logits_to_keep=1)
        caches[prefix] = out.past_key_values
        self.stats.forward_passes += 1
        return prefix

    def _static_cache(self, batch: _Batch, max_len: int) -> Any:
        """A preallocated KV cache for generating from ``batch`` (``max_len`` positions per row).

        The shared prefix's keys and values are copied into every row. When the rows are longer
        than the prefill budget allows in one pass, every position but the last is prefilled
        here, a few rows at a time (see :meth:`_prefill_chunks`); ``generate`` then starts at the
        last position."""
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=max_len)
        rows, width = batch.ids.shape
        if batch.prefix_cache is not None:
            for layer, src in zip(cache.layers, batch.prefix_cache.layers, strict=True):
                k, v = src.keys, src.values  # [1, kv heads, shared, head dim]
                layer.lazy_initialization(k.expand(rows, *k.shape[1:]),
                                          v.expand(rows, *v.shape[1:]))
                layer.keys[:, :, : batch.shared] = k
                layer.values[:, :, : batch.shared] = v
                layer.cumulative_length.fill_(batch.shared)
        per = max(1, self.max_prefill_tokens // width)
        if per < rows and width - 1 > batch.shared:
            self._prefill_chunks(batch, cache, per)
        return cache

    def _prefill_chunks(self, batch: _Batch, cache: Any, per: int) -> None:
        """Run positions ``shared … width-2`` of every row into ``cache``, ``per`` rows per
        forward pass. On CPU a prefill pass is much faster per row in small batches (the keys,
        values and activations of a few rows stay in the processor's caches): scoring 32
        label questions of ~1,260 tokens took 84 s in one batch and 38 s three rows at a time."""
        from transformers import DynamicCache

        rows, width = batch.ids.shape
        stop = width - 1
        positions = (batch.mask.cumsum(-1) - 1).clamp(min=0)
        for r0 in range(0, rows, per):
            r1 = min(rows, r0 + per)
            part = (DynamicCache() if batch.prefix_cache is None
                    else _repeated(batch.prefix_cache, r1 - r0))
            self.model(input_ids=batch.ids[r0:r1, batch.shared : stop],
                       attention_mask=batch.mask[r0:r1, :stop],
                       position_ids=positions[r0:r1, batch.shared : stop],
                       past_key_values=part, use_cache=True, logits_to_keep=1)
            self.stats.forward_passes += 1
            for layer, src in zip(cache.layers, part.layers, strict=True):
                if not layer.is_initialized:
                    k, v = src.keys, src.values
                    layer.lazy_initialization(k[:1].expand(rows, *k.shape[1:]),
                                              v[:1].expand(rows, *v.shape[1:]))
                layer.keys[r0:r1, :, :stop] = src.keys
                layer.values[r0:r1, :, :stop] = src.values
        for layer in cache.layers:
            layer.cumulative_length.fill_(stop)

    def _forward(self, batch: _Batch, keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions of every row."""
        kwargs: dict[str, Any] = {}
        if batch.cache is not None:
            positions = (batch.mask.cumsum(-1) - 1).clamp(min=0)
            kwargs = {"past_key_values": batch.cache, "position_ids": positions[:, batch.shared :]}
        out = self.model(input_ids=batch.new_ids, attention_mask=batch.mask, logits_to_keep=keep,
                         use_cache=batch.cache is not None, **kwargs)
        self.stats.forward_passes += 1
        return out.logits

    # ----------------------------------------------------------------------------------------
    # generate

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[str]:
        return [text for text, _ in self.generate_with_ids(prompts, params)]

    def generate_with_ids(self, prompts: Sequence[Prompt], params: SamplingParams,
                          ) -> list[tuple[str, list[int]]]:
        """Like :meth:`generate`, with each sample's generated token ids (ending with the EOS
        token when the model stopped by itself; stop strings cut the text only). RL uses the
        ids, so the tokens it learns from are exactly the ones that were sampled."""
        # outside inference mode: the copy's parameters keep their version counters
        return self._generator()._generate_with_ids(prompts, params)

    @torch.inference_mode()
    def _generate_with_ids(self, prompts: Sequence[Prompt], params: SamplingParams,
                           ) -> list[tuple[str, list[int]]]:
        from transformers import GenerationConfig

        validate_prompts(prompts)
        t0 = time.perf_counter()
        encoded = [self.encode(p) for p in prompts]
        # one row per (prompt, sample); greedy samples are identical, so compute them once
        samples = 1 if params.greedy else params.n
        rows = [(i, k) for i in range(len(prompts)) for k in range(samples)]
        texts: dict[tuple[int, int], tuple[str, list[int]]] = {}
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
            disable_compile=True,  # static caches would trigger torch.compile on GPUs, per shape
        )
        if self.engine == "cascade":
            self._generate_cascade(prompts, encoded, rows, params, texts)
        else:
            self._generate_hf(prompts, encoded, rows, params, config, texts)
        self.stats.requests += len(prompts)
        self.stats.seconds += time.perf_counter() - t0
        return [texts[(i, k if samples > 1 else 0)] for i in range(len(prompts)) for k in range(params.n)]

    def _finish_row(self, texts: dict[tuple[int, int], tuple[str, list[int]]],
                    row: tuple[int, int], new: list[int], params: SamplingParams) -> None:
        n_tokens = next((t for t, tok in enumerate(new) if tok in self.eos_ids), len(new))
        self.stats.generated_tokens += n_tokens
        text = self.tokenizer.decode(new[:n_tokens], skip_special_tokens=True)
        texts[row] = (truncate_at_stop(text, params.stop),
                      new[: n_tokens + 1] if n_tokens < len(new) else new)

    def _generate_cascade(self, prompts: Sequence[Prompt], encoded: list[list[int]],
                          rows: list[tuple[int, int]], params: SamplingParams,
                          texts: dict[tuple[int, int], tuple[str, list[int]]]) -> None:
        """Generation through :class:`cascade.CascadeEngine` (the CPU default)."""
        version = cascade.weights_version(self.model)
        self.kv_store.check(version)
        seqs = [encoded[i] for i, _ in rows]
        engine = cascade.CascadeEngine(self.model, eos_ids=self.eos_ids, pad_id=self.pad_id,
                                       max_prefill_tokens=self.max_prefill_tokens,
                                       store=self.kv_store)
        with cascade.attention_switched(self.model), self._fast_linears():
            # the shared prefix: the previous call's when every row extends it (the same
            # few-shot block), else the longest common prefix of this call's rows
            old = self._prefix[1].tokens if self._prefix and self._prefix[0] == version else None
            if not old or not all(len(s) > len(old) and tuple(s[: len(old)]) == old
                                  for s in seqs):
                shared = (min(_shared_prefix_len(seqs), min(len(s) for s in seqs) - 1)
                          if len(seqs) > 1 else 0)
                tokens = tuple(seqs[0][:shared]) if shared >= self.min_shared_prefix else ()
                self._prefix = (version, engine.prefix_kv(tokens))
                self.stats.prompt_tokens += len(tokens)
            prefix = self._prefix[1]
            shared = len(prefix.tokens)
            for batch in self._batches([len(seqs[b]) - shared for b in range(len(rows))],
                                       params.max_new_tokens):
                batch_rows = [rows[b] for b in batch]

                def sampler(order: list[int], batch_rows: list[tuple[int, int]] = batch_rows
                            ) -> SeededSampler:
                    return SeededSampler([sample_seed(params.seed, prompts[batch_rows[o][0]],
                                                      batch_rows[o][1]) for o in order],
                                         params.temperature, params.top_p)

                stop = None
                if params.stop:
                    crit = StopOnStrings(params.stop, self.tokenizer, 0)
                    stop = lambda generated, crit=crit: crit(generated, None)
                out = engine.generate([seqs[b] for b in batch], prefix, params.max_new_tokens,
                                      None if params.greedy else sampler, stop)
                for row, new in zip(batch_rows, out, strict=True):
                    self._finish_row(texts, row, new, params)
        self.stats.forward_passes += engine.forward_passes
        self.stats.prompt_tokens += engine.prefilled_tokens + len(rows)

    def _generate_hf(self, prompts: Sequence[Prompt], encoded: list[list[int]],
                     rows: list[tuple[int, int]], params: SamplingParams, config: Any,
                     texts: dict[tuple[int, int], tuple[str, list[int]]]) -> None:
        """Generation through ``model.generate`` into a preallocated cache."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        caches: dict[tuple[int, ...], Any] = {}
        if self.internals:
            self._seed_prefix(encoded, caches)
        for batch in self._batches([len(encoded[i]) for i, _ in rows], params.max_new_tokens):
            batch_rows = [rows[b] for b in batch]
            if self.internals:
                laid = self._layout([encoded[i] for i, _ in batch_rows], caches, repeat=False)
                ids, mask = laid.ids, laid.mask
                cache = self._static_cache(laid, ids.shape[1] + params.max_new_tokens)
            else:  # transformers' stock path: its own cache, no shared prefix
                ids, mask = self._left_pad([encoded[i] for i, _ in batch_rows])
                laid, cache = _Batch(ids, mask, ids, None, 0), None
            processors = LogitsProcessorList()
            if not params.greedy:
                seeds = [sample_seed(params.seed, prompts[i], k) for i, k in batch_rows]
                processors.append(SeededSampler(seeds, params.temperature, params.top_p))
            stopping = StoppingCriteriaList()
            if params.stop:
                stopping.append(StopOnStrings(params.stop, self.tokenizer, ids.shape[1]))
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=cache,
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=stopping,
            )
            self.stats.forward_passes += out.shape[1] - ids.shape[1]
            self.stats.prompt_tokens += int(mask.sum()) - laid.shared * (len(batch_rows) - 1)
            for row, new in zip(batch_rows, out[:, ids.shape[1] :].tolist(), strict=True):
                self._finish_row(texts, row, new, params)

    # ----------------------------------------------------------------------------------------
    # score

    @torch.inference_mode()
    def score(
        self, contexts: Sequence[Prompt], options: Sequence[str] | Sequence[Sequence[str]]
    ) -> list[list[float]]:
        # scoring is prefill only: MKL, not oneDNN, which was slower for prefill-sized products
        # on this project's CPU (a 576x1536 layer at 1,024 rows: 189 vs 116 GFLOP/s; 16 paper
        # MC rows: 11.2 s vs 16.4 s)
        return self._score(contexts, options)

    def _fast_linears(self) -> Any:
        """On CPU in float32, the linear layers run through oneDNN within the block (see
        :class:`cascade.OneDNNWeights`); generation uses it, for its decoding steps."""
        return self._onednn(self.model) if self._onednn else contextlib.nullcontext()

    def _score(
        self, contexts: Sequence[Prompt], options: Sequence[str] | Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Each context is computed **once**; every option is read as its continuation.

        The options' common leading tokens (" (" of " (A)", " (B)") are appended to the context,
        and the first pass reads their log-probabilities and each option's next token from the
        last positions. Options longer than that are finished from the context's KV cache (all
        options in one pass from the cache repeated per option, or one option at a time when
        that would exceed ``SCORE_REPEAT_TOKENS``), so no option recomputes the context.
        Contexts that share a long prefix (a call's few-shot block; the two letterings of a
        ``--debias`` question) compute it once (see :meth:`_score_batches`)."""
        validate_prompts(contexts)
        opts = normalize_options(contexts, options)
        t0 = time.perf_counter()
        ctx_ids = [self.encode(c) for c in contexts]
        conts = [
            [self._continuation(c, ids, o) for o in os]
            for c, ids, os in zip(contexts, ctx_ids, opts, strict=True)
        ]
        # extended context = context + the options' common tokens (each option keeps one)
        common = [min(_shared_prefix_len(cs), min(len(c) for c in cs) - 1) for cs in conts]
        ext = [ids + cs[0][:n] for ids, cs, n in zip(ctx_ids, conts, common, strict=True)]
        rests = [[c[n:] for c in cs] for cs, n in zip(conts, common, strict=True)]
        result: list[list[float]] = [[0.0] * len(o) for o in opts]
        caches: dict[tuple[int, ...], Any] = {}
        self._seed_prefix(ext, caches, keep=max(common) + 1)
        self.stats.scored_tokens += sum(len(p) for p in caches)
        prefixes: set[tuple[int, ...]] = set(caches)  # prefixes counted in scored_tokens
        for idx, batch_caches in self._score_batches(ext, caches, max(common) + 1):
            prefixes.update(batch_caches)
            self._score_batch(idx, ext, common, rests, batch_caches, result, prefixes)
        self.stats.requests += len(contexts)
        self.stats.seconds += time.perf_counter() - t0
        return result

    def _score_batches(self, ext: list[list[int]], caches: dict[tuple[int, ...], Any],
                       keep: int) -> Iterator[tuple[list[int], dict[tuple[int, ...], Any]]]:
        """Batches of context indices, each with the prefix caches :meth:`_layout` may use.

        Contexts that share a long prefix with a neighbour (in token order) beyond the call's
        shared prefix (the two letterings of a ``--debias`` question: their conversation) form
        a group; the group's prefix is computed once, on top of the call's prefix cache when
        there is one. The other contexts are cut by length as usual."""
        budget = self.score_prefill_tokens
        base = max((len(p) for p in caches), default=0)  # the call's shared prefix
        order = sorted(range(len(ext)), key=lambda i: ext[i])
        groups: list[list[int]] = [order[:1]]
        for a, b in itertools.pairwise(order):
            more = _shared_prefix_len([ext[a], ext[b]]) - base
            if more >= self.min_shared_prefix and more >= (len(ext[b]) - base) // 2:
                groups[-1].append(b)
            else:
                groups.append([b])
        singles = sorted(g[0] for g in groups if len(g) == 1)
        for batch in self._batches([len(ext[i]) - base for i in singles], 0, budget):
            yield [singles[b] for b in batch], caches
        for g in groups:
            if len(g) < 2:
                continue
            seqs = [ext[i] for i in g]
            shared = min(_shared_prefix_len(seqs), min(len(s) for s in seqs) - keep)
            group_cache = self._extend_prefix(tuple(seqs[0][:shared]), caches)
            for batch in self._batches([len(s) - shared for s in seqs], 0, budget):
                yield [g[b] for b in batch], group_cache

    def _extend_prefix(self, prefix: tuple[int, ...], caches: dict[tuple[int, ...], Any],
                       ) -> dict[tuple[int, ...], Any]:
        """``{prefix: its one-row KV cache}``, computed from the longest cached prefix of it."""
        from transformers import DynamicCache

        base = max((p for p in caches if len(p) <= len(prefix) and prefix[: len(p)] == p),
                   key=len, default=())
        cache = copy.deepcopy(caches[base]) if base else DynamicCache()
        new = prefix[len(base):]
        if new:
            self.model(input_ids=torch.tensor([new], device=self.device),
                       position_ids=torch.arange(len(base), len(prefix),
                                                 device=self.device)[None],
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
            self.stats.forward_passes += 1
            self.stats.scored_tokens += len(new)
        return {prefix: cache}

    def _score_batch(self, idx: list[int], ext: list[list[int]], common: list[int],
                     rests: list[list[list[int]]], caches: dict[tuple[int, ...], Any],
                     result: list[list[float]], prefixes: set[tuple[int, ...]]) -> None:
        from transformers import DynamicCache

        keep = max(common[i] for i in idx) + 1
        more = max(len(r) for i in idx for r in rests[i]) > 1  # an option needs another pass
        batch = self._layout([ext[i] for i in idx], caches, keep=keep)
        prefix = tuple(ext[idx[0]][: batch.shared])
        if prefix not in prefixes:
            prefixes.add(prefix)
            self.stats.scored_tokens += len(prefix)
        self.stats.scored_tokens += int(batch.mask[:, batch.shared :].sum())
        if more and batch.cache is None:
            batch.cache = DynamicCache()
        logits = self._forward(batch, keep=keep)
        logp = torch.log_softmax(logits.float(), dim=-1)  # [rows, keep, vocab]
        # kept position p (of ``keep``) predicts the token at the extended context's p + 1
        for r, i in enumerate(idx):
            n = common[i]
            tokens = ext[i][len(ext[i]) - n:] if n else []
            head = float(logp[r, torch.arange(keep - 1 - n, keep - 1),
                              torch.tensor(tokens, dtype=torch.long)].sum()) if n else 0.0
            last = logp[r, keep - 1]
            for j, rest in enumerate(rests[i]):
                result[i][j] = head + float(last[rest[0]])
        if not more:
            return
        # the options' remaining tokens, from the cached context: every (row, option) in one
        # pass when the context's cache, repeated per option, stays within the budget (it is
        # not needed after); else one option index at a time, cropping the cache back after each
        ctx_len = batch.mask.sum(-1)
        n_opts = max(len(rests[i]) for i in idx)
        if n_opts * batch.ids.numel() <= self.SCORE_REPEAT_TOKENS:
            batch.cache.batch_repeat_interleave(n_opts)
            pairs = [(r, j) for r in range(len(idx)) for j in range(n_opts)]
            self._continue(batch.mask.repeat_interleave(n_opts, 0),
                           ctx_len.repeat_interleave(n_opts), batch.cache, pairs, idx, rests,
                           result, crop=False)
            return
        for j in range(n_opts):
            self._continue(batch.mask, ctx_len, batch.cache, [(r, j) for r in range(len(idx))],
                           idx, rests, result, crop=True)

    def _continue(self, ctx_mask: torch.Tensor, ctx_len: torch.Tensor, cache: Any,
                  pairs: list[tuple[int, int]], idx: list[int], rests: list[list[list[int]]],
                  result: list[list[float]], crop: bool) -> None:
        """One pass over option tokens after their contexts: cache row k continues with the
        remaining tokens (all but the last) of option ``pairs[k] = (row, option)``; adds the
        log-probabilities of the tokens after the first to ``result``."""
        feed = [rests[idx[r]][j][:-1] if j < len(rests[idx[r]]) else [] for r, j in pairs]
        steps = max(len(f) for f in feed)
        if steps == 0:
            return
        ids = torch.full((len(pairs), steps), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), steps), dtype=torch.long)
        for k, f in enumerate(feed):
            ids[k, : len(f)] = torch.tensor(f, dtype=torch.long)
            mask[k, : len(f)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.stats.scored_tokens += int(mask.sum())
        out = self.model(input_ids=ids, attention_mask=torch.cat([ctx_mask, mask], dim=1),
                         position_ids=ctx_len[:, None] + torch.arange(steps, device=self.device),
                         past_key_values=cache, use_cache=True)
        self.stats.forward_passes += 1
        if crop:
            cache.crop(-steps)  # back to the context (negative: tokens to drop)
        lp = torch.log_softmax(out.logits.float(), dim=-1)
        for k, ((r, j), f) in enumerate(zip(pairs, feed, strict=True)):
            if f:
                tok = torch.tensor(rests[idx[r]][j][1:], dtype=torch.long)
                result[idx[r]][j] += float(lp[k, torch.arange(len(f)), tok].sum())
