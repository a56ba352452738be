"""The ``hf`` backend's generation (:class:`HFGenerator`): token ids in, samples out.

* **On CPU, generation runs through our engine** (:mod:`constitutional.models.engines.cascade`,
  option ``engine``; ``auto`` picks it on CPU for Llama-type models): cascade attention reads the
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
* **Prefill runs a few rows at a time** (``max_prefill_tokens``): generation prefills its
  prompts into the preallocated cache in such chunks before decoding all rows together.
* Sampling is *per-row seeded* (:class:`SeededSampler`): the sample does not depend on which
  other prompts share the batch.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import Any

import torch

from constitutional.core.errors import UserError
from constitutional.models.base import (
    ModelStats,
    SampleRow,
    SamplingParams,
    finish_sample,
)
from constitutional.models.engines import cascade, guard
from constitutional.models.hf_batching import Batch, Batcher, repeated, shared_prefix_len
from constitutional.models.hf_weights import HFWeights


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


Sample = tuple[str, list[int]]


class HFGenerator:
    """Generates for rows of token ids with ``weights.model``: chooses the engine (``engine``:
    ``cascade`` or ``generate``, after the guard's version gate and self-check), and holds the
    cascade engine's state between calls (``kv_store``: finished rows' keys and values;
    ``prefix``: the last call's shared prefix, with the weights version it was computed at)."""

    def __init__(self, weights: HFWeights, batcher: Batcher, *, tokenizer: Any,
                 stats: ModelStats, eos_ids: set[int], engine: str, kv_reuse_gib: float) -> None:
        self.weights, self.batcher, self.tokenizer = weights, batcher, tokenizer
        self.stats, self.eos_ids = stats, eos_ids
        self.device = batcher.device
        self._choose_engine(engine)
        self.kv_store = cascade.KVStore(int(kv_reuse_gib * 2**30))
        self.prefix: tuple[Any, cascade.Prefix] | None = None

    @property
    def model(self) -> Any:
        return self.weights.model

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
        self.onednn = (cascade.OneDNNWeights()
                       if self.internals and cascade.OneDNNWeights.usable(self.model) else None)
        want = engine == "cascade" or (
            engine == "auto" and self.device.type == "cpu" and cascade.supported(self.model))
        self.engine = "generate"
        if want and why is not None:
            guard.warn_once(why)
        elif want:
            failed = cascade.self_check(self.model, self.fast_linears())
            if failed is None:
                self.engine = "cascade"
            else:
                self.internals, self.onednn = False, None
                guard.warn_once(f"its self-check failed on {guard.versions_text()} ({failed})")

    def fast_linears(self) -> Any:
        """On CPU in float32, the linear layers run through oneDNN within the block (see
        :class:`cascade.OneDNNWeights`); generation uses it, for its decoding steps."""
        return self.onednn(self.model) if self.onednn else contextlib.nullcontext()

    def generate(self, encoded: list[list[int]], rows: list[SampleRow], params: SamplingParams,
                 ) -> list[Sample]:
        """One (text, token ids) per row of ``rows`` (``encoded[row.prompt]`` continued)."""
        seqs = [encoded[row.prompt] for row in rows]
        out: list[Sample | None] = [None] * len(rows)
        if self.engine == "cascade":
            self._generate_cascade(seqs, rows, params, out)
        else:
            self._generate_hf(encoded, seqs, rows, params, out)
        return out  # type: ignore[return-value]

    def _finish(self, out: list[Sample | None], b: int, new: list[int],
                params: SamplingParams) -> None:
        text, ids, n_tokens = finish_sample(new, self.eos_ids, self.tokenizer, params.stop)
        self.stats.generated_tokens += n_tokens
        out[b] = (text, ids)

    def _generate_cascade(self, seqs: list[list[int]], rows: list[SampleRow],
                          params: SamplingParams, out: list[Sample | None]) -> None:
        """Generation through :class:`cascade.CascadeEngine` (the CPU default)."""
        version = cascade.weights_version(self.model)
        self.kv_store.check(version)
        batcher = self.batcher
        engine = cascade.CascadeEngine(self.model, eos_ids=self.eos_ids, pad_id=batcher.pad_id,
                                       max_prefill_tokens=batcher.max_prefill_tokens,
                                       store=self.kv_store)
        with cascade.attention_switched(self.model), self.fast_linears():
            # the shared prefix: the previous call's when every row extends it (the same
            # few-shot block), else the longest common prefix of this call's rows
            old = self.prefix[1].tokens if self.prefix and self.prefix[0] == version else None
            if not old or not all(len(s) > len(old) and tuple(s[: len(old)]) == old
                                  for s in seqs):
                shared = (min(shared_prefix_len(seqs), min(len(s) for s in seqs) - 1)
                          if len(seqs) > 1 else 0)
                tokens = tuple(seqs[0][:shared]) if shared >= batcher.min_shared_prefix else ()
                self.prefix = (version, engine.prefix_kv(tokens))
                self.stats.prompt_tokens += len(tokens)
            prefix = self.prefix[1]
            shared = len(prefix.tokens)
            for batch in batcher.batches([len(s) - shared for s in seqs], params.max_new_tokens):

                def sampler(order: list[int], batch: list[int] = batch) -> SeededSampler:
                    return SeededSampler([rows[batch[o]].seed for o in order],  # type: ignore[misc]
                                         params.temperature, params.top_p)

                stop = None
                if params.stop:
                    crit = StopOnStrings(params.stop, self.tokenizer, 0)
                    stop = lambda generated, crit=crit: crit(generated, None)
                news = engine.generate([seqs[b] for b in batch], prefix, params.max_new_tokens,
                                       None if params.greedy else sampler, stop)
                for b, new in zip(batch, news, strict=True):
                    self._finish(out, b, new, params)
        self.stats.forward_passes += engine.forward_passes
        self.stats.prompt_tokens += engine.prefilled_tokens + len(rows)

    def _generate_hf(self, encoded: list[list[int]], seqs: list[list[int]],
                     rows: list[SampleRow], params: SamplingParams,
                     out: list[Sample | None]) -> None:
        """Generation through ``model.generate`` into a preallocated cache."""
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.batcher.pad_id,
            eos_token_id=sorted(self.eos_ids),
            disable_compile=True,  # static caches would trigger torch.compile on GPUs, per shape
        )
        caches: dict[tuple[int, ...], Any] = {}
        if self.internals:
            self.batcher.seed_prefix(encoded, caches)  # the prompts', not the rows' (samples)
        for batch in self.batcher.batches([len(s) for s in seqs], params.max_new_tokens):
            if self.internals:
                laid = self.batcher.layout([seqs[b] for b in batch], caches, repeat=False)
                cache = self._static_cache(laid, laid.ids.shape[1] + params.max_new_tokens)
            else:  # transformers' stock path: its own cache, no shared prefix
                laid, cache = self.batcher.plain([seqs[b] for b in batch]), None
            ids, mask = laid.ids, laid.mask
            processors = LogitsProcessorList()
            if not params.greedy:
                seeds = [rows[b].seed for b in batch]
                processors.append(SeededSampler(seeds, params.temperature, params.top_p))  # type: ignore[arg-type]
            stopping = StoppingCriteriaList()
            if params.stop:
                stopping.append(StopOnStrings(params.stop, self.tokenizer, ids.shape[1]))
            generated = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=cache,
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=stopping,
            )
            self.stats.forward_passes += generated.shape[1] - ids.shape[1]
            self.stats.prompt_tokens += int(mask.sum()) - laid.shared * (len(batch) - 1)
            for b, new in zip(batch, generated[:, ids.shape[1] :].tolist(), strict=True):
                self._finish(out, b, new, params)

    def _static_cache(self, batch: Batch, max_len: int) -> Any:
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
        per = max(1, self.batcher.max_prefill_tokens // width)
        if per < rows and width - 1 > batch.shared:
            self._prefill_chunks(batch, cache, per)
        return cache

    def _prefill_chunks(self, batch: Batch, cache: Any, per: int) -> None:
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
                    else repeated(batch.prefix_cache, r1 - r0))
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
