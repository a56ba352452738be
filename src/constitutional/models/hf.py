"""The transformers backend: real batching on CPU or CUDA.

:class:`HFModel` is the backend's face (``generate``, ``generate_with_ids``, ``score``, and for
trainers ``load_policy``, ``sync_weights`` and ``prepare_generation``); the work is done by its
parts, one module each:

* :class:`~constitutional.models.hf_weights.HFWeights` (``weights``): the model, and the copy of
  it in ``generate_dtype`` that generation runs on when that differs from the weights' dtype,
  refreshed when the weights change;
* :class:`~constitutional.models.hf_batching.Batcher` (``batcher``): the token budgets, batches
  cut by length, and a shared prefix's KV cache computed once (generation and scoring);
* :class:`~constitutional.models.hf_generate.HFGenerator` (``generation``): the engine (the
  cascade engine on CPU, else ``model.generate`` into a preallocated cache), per-row seeded
  sampling and stop strings;
* :class:`~constitutional.models.hf_score.HFScorer` (``scorer``): option log-probabilities, each
  context computed once.

* Prompts are tokenized once, sorted by length and cut into batches bounded by a token budget
  (``rows × (longest prompt + max_new_tokens) ≤ max_batch_tokens``), left-padded, and run
  together. There is no loop over single sequences.
* Sampling is *per-row seeded*: a logits processor draws one uniform number per row and step from
  a generator seeded by (seed, prompt, sample index) and samples by inverse CDF; decoding then
  takes the argmax. The sample is exact, and it does not depend on which other prompts share the
  batch — so resumed or sharded runs reproduce a single-process run.
* **Shared prefixes** (a few-shot block in front of every prompt) are computed once, before
  batching, so every batch, one-row batches included, reuses it.
* **Prefill runs a few rows at a time** (``max_prefill_tokens``, rows × width per pass; 4,096 on
  CPU, one pass on GPUs; scoring: ``score_prefill_tokens``). On CPU a small pass keeps its
  working set in the processor's caches and is about twice as fast per row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from constitutional.models.base import (
    LanguageModel,
    ModelStats,
    Prompt,
    SamplingParams,
    TokenizerPrompts,
    eos_token_ids,
    normalize_options,
    per_prompt,
    sample_rows,
    validate_prompts,
)
from constitutional.models.engines import cascade
from constitutional.models.hf_batching import Batcher
from constitutional.models.hf_batching import shared_prefix_len as _shared_prefix_len
from constitutional.models.hf_generate import HFGenerator, SeededSampler, StopOnStrings
from constitutional.models.hf_score import HFScorer
from constitutional.models.hf_weights import DTYPES, HFWeights, resolve_device, resolve_dtype

__all__ = ["DTYPES", "HFModel", "SeededSampler", "StopOnStrings", "_shared_prefix_len",
           "resolve_device", "resolve_dtype"]


def _part(part: str, name: str, doc: str) -> property:
    """An attribute of the part ``part``, read and set through the facade."""
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value), doc=doc)


class HFModel(TokenizerPrompts, LanguageModel):
    """A causal LM loaded with transformers from a local directory or a hub id."""

    engine = _part("generation", "engine", "The generation engine: cascade or generate.")
    kv_store = _part("generation", "kv_store", "The cascade engine's finished rows' KV.")
    generate_dtype = _part("weights", "generate_dtype", "The dtype generation computes in.")
    max_batch_tokens = _part("batcher", "max_batch_tokens", "rows × (longest + new) per batch.")
    max_batch_size = _part("batcher", "max_batch_size", "Rows per batch.")
    min_shared_prefix = _part("batcher", "min_shared_prefix", "The shortest prefix shared.")
    max_prefill_tokens = _part("batcher", "max_prefill_tokens", "rows × width per prefill.")
    score_prefill_tokens = _part("batcher", "score_prefill_tokens", "The same, in scoring.")

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
        self._stats = ModelStats()
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
        self.weights = HFWeights(model.to(self.device).eval(), generate_dtype, self.device)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id: int = self.tokenizer.pad_token_id
        self.eos_ids = eos_token_ids(self.model.generation_config.eos_token_id, self.tokenizer)
        # the batch budget: rows × (prompt + new tokens) ≤ max_batch_tokens; by default as many
        # tokens as fit in ``kv_cache_gib`` of KV cache for this model (~93k tokens for the
        # built-in 135M model in float32, ~33k for an 8B Llama in bfloat16)
        batch_tokens = max_batch_tokens or max(
            2048, int(kv_cache_gib * 2**30 // self._kv_bytes_per_token()))
        cpu = self.device.type == "cpu"
        self.batcher = Batcher(
            self.weights, device=self.device, stats=self._stats, pad_id=self.pad_id,
            max_batch_tokens=batch_tokens, max_batch_size=max_batch_size,
            min_shared_prefix=min_shared_prefix,
            # prefill (the prompt pass of generation) runs at most this many tokens (rows ×
            # width) per forward pass; on CPU small passes are faster per row, on GPUs one
            # big pass is
            max_prefill_tokens=max_prefill_tokens or (4096 if cpu else batch_tokens),
            # scoring passes on CPU: 1,024 tokens (one long context, or a few short ones) per
            # pass ran faster per token than 4,096 for both `eval mc` (32 paper MC rows: 17.7 s
            # vs 20.4 s) and `rl label` (24 pairs: 25.8 s vs 29.0 s) on this project's 2-core CPU
            score_prefill_tokens=max_prefill_tokens or (1024 if cpu else batch_tokens))
        self.generation = HFGenerator(self.weights, self.batcher, tokenizer=self.tokenizer,
                                      stats=self._stats, eos_ids=self.eos_ids, engine=engine,
                                      kv_reuse_gib=kv_reuse_gib)
        self.scorer = HFScorer(self.weights, self.batcher, stats=self._stats)
        self._engine_args = {"max_batch_tokens": max_batch_tokens,
                             "max_batch_size": max_batch_size, "kv_cache_gib": kv_cache_gib,
                             "max_prefill_tokens": max_prefill_tokens,
                             "min_shared_prefix": min_shared_prefix, "kv_reuse_gib": kv_reuse_gib}

    @property
    def model(self) -> Any:
        """The model (its weights' dtype): scoring uses it, generation too or its low-precision
        copy. To generate from another one (a trainer's policy): :meth:`load_policy`."""
        return self.weights.model

    @property
    def stats(self) -> ModelStats:  # type: ignore[override]
        return self._stats

    @stats.setter
    def stats(self, stats: ModelStats) -> None:
        """Count into ``stats`` (a generation copy counts into its model's)."""
        self._stats = self.batcher.stats = self.generation.stats = self.scorer.stats = stats

    # ----------------------------------------------------------------------------------------
    # weights

    def load_policy(self, policy: Any) -> None:
        """Generate from ``policy`` from now on: a trainer's model after its update (PPO's
        rollouts), of this model's architecture and dtype. Marks its weights changed as
        :meth:`sync_weights` does, so nothing computed from older weights is used."""
        self.weights.use(policy)

    def sync_weights(self) -> None:
        """Mark the model's weights as changed (as TRL's ``sync_weights`` for vLLM): the next
        generation refreshes the low-precision copy, the packed weights and the cached keys and
        values. Needed after updates that version counters do not see (fused optimizers)."""
        self.weights.sync()

    def prepare_generation(self) -> torch.dtype:
        """Decide now, on the present weights, how generation computes, and return the dtype it
        computes in: the low-precision copy is built and the fast engine's self-check runs on it
        (which, in bfloat16, can pass on some weights and fail on others). A trainer calls this
        once, before it loads a checkpoint, so that a resumed run samples as the uninterrupted
        run did; later weight changes (:meth:`sync_weights`) refresh the copy, never the choice."""
        self._generator()
        return self.generate_dtype

    def _generator(self) -> HFModel:
        """The model that generates: this one, or one over a copy of its weights in
        ``generate_dtype``, refreshed whenever the weights change (PPO's policy between
        rollouts)."""
        weights = self.weights
        if not weights.shadowed:
            return self
        if weights.shadow is None:
            version = weights.version
            shadow = HFModel(self.spec, spec=self.spec, device=str(self.device),
                             model=weights.cast_copy(), tokenizer=self.tokenizer,
                             generate_dtype=self.generate_dtype, **self._engine_args)
            if shadow.engine != self.engine:  # its self-check failed in that dtype
                weights.generate_dtype = weights.dtype
                return self
            shadow.stats = self.stats
            weights.keep_shadow(shadow, version)
            return shadow
        return weights.refreshed_shadow()

    def _kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token of one row: layers × (keys + values) × KV heads × head dim."""
        layers, heads, head_dim = cascade.kv_shape(self.model)
        size = next(self.model.parameters()).element_size()
        return max(1, layers * 2 * heads * head_dim * size)

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
        validate_prompts(prompts)
        t0 = time.perf_counter()
        encoded = [self.encode(p) for p in prompts]
        samples = self.generation.generate(encoded, sample_rows(prompts, params), params)
        self.stats.requests += len(prompts)
        self.stats.seconds += time.perf_counter() - t0
        return per_prompt(samples, params)

    # ----------------------------------------------------------------------------------------
    # score

    @torch.inference_mode()
    def score(
        self, contexts: Sequence[Prompt], options: Sequence[str] | Sequence[Sequence[str]]
    ) -> list[list[float]]:
        # scoring is prefill only: MKL, not oneDNN, which was slower for prefill-sized products
        # on this project's CPU (a 576x1536 layer at 1,024 rows: 189 vs 116 GFLOP/s; 16 paper
        # MC rows: 11.2 s vs 16.4 s)
        validate_prompts(contexts)
        opts = normalize_options(contexts, options)
        t0 = time.perf_counter()
        ctx_ids = [self.encode(c) for c in contexts]
        conts = [
            [self._continuation(c, ids, o) for o in os]
            for c, ids, os in zip(contexts, ctx_ids, opts, strict=True)
        ]
        result = self.scorer.score(ctx_ids, conts)
        self.stats.requests += len(contexts)
        self.stats.seconds += time.perf_counter() - t0
        return result
