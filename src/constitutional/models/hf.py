"""The transformers backend: real batching on CPU or CUDA.

* Prompts are tokenized once, sorted by length and cut into batches bounded by a token budget
  (``rows × (longest prompt + max_new_tokens) ≤ max_batch_tokens``), left-padded, and run through
  ``model.generate``. There is no loop over single sequences.
* Sampling is *per-row seeded*: a logits processor adds Gumbel noise drawn from a generator seeded
  by (seed, prompt, sample index), and decoding takes the argmax. ``argmax(logits / T + Gumbel)``
  is an exact sample from ``softmax(logits / T)``, and it does not depend on which other prompts
  share the batch — so resumed or sharded runs reproduce a single-process run.
* ``score`` reads option log-probabilities. When every option of a context is one token, all of
  them are read from one forward pass over the context (``logits_to_keep=1``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from constitutional.errors import UserError
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


class SeededSampler:
    """A logits processor that turns greedy decoding into per-row seeded sampling.

    For each row it applies temperature and nucleus (top-p) filtering, then adds Gumbel noise from
    that row's own generator. The generate loop's argmax is then a sample from the filtered
    distribution. Each row draws one noise vector per step, so its samples depend only on its seed.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_scores, idx = scores.sort(dim=-1, descending=True)
            cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            # drop a token when the mass before it already reaches top_p (keep at least one)
            drop = (cum - sorted_scores.softmax(dim=-1)) >= self.top_p
            drop[..., 0] = False
            scores = scores.scatter(-1, idx, sorted_scores.masked_fill(drop, float("-inf")))
        vocab = scores.shape[-1]
        uniform = torch.stack(
            [torch.rand(vocab, generator=g, dtype=torch.float64) for g in self.generators]
        ).to(scores.device)
        gumbel = -torch.log(-torch.log(uniform.clamp_(1e-20, 1.0 - 1e-16))).float()
        return scores + gumbel


class HFModel(LanguageModel):
    """A causal LM loaded with transformers from a local directory or a hub id."""

    def __init__(
        self,
        name_or_path: str | Path,
        *,
        spec: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        trust_remote_code: bool = False,
        max_batch_tokens: int = 32768,
        max_batch_size: int = 64,
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = spec or str(name_or_path)
        self.device = resolve_device(device)
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
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
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id: int = self.tokenizer.pad_token_id

    # ----------------------------------------------------------------------------------------
    # Prompt rendering

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

    # ----------------------------------------------------------------------------------------
    # Batching

    def _batches(self, lengths: Sequence[int], extra: int) -> Iterator[list[int]]:
        """Indices sorted by length, cut so that rows × (longest + extra) ≤ the token budget."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        batch: list[int] = []
        for i in order:
            longest = max(lengths[i], *(lengths[j] for j in batch)) if batch else lengths[i]
            if batch and (
                (len(batch) + 1) * (longest + extra) > self.max_batch_tokens
                or len(batch) >= self.max_batch_size
            ):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _left_pad(self, seqs: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # ----------------------------------------------------------------------------------------
    # generate

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[str]:
        from transformers import GenerationConfig, LogitsProcessorList

        validate_prompts(prompts)
        t0 = time.perf_counter()
        encoded = [self.encode(p) for p in prompts]
        # one row per (prompt, sample); greedy samples are identical, so compute them once
        samples = 1 if params.greedy else params.n
        rows = [(i, k) for i in range(len(prompts)) for k in range(samples)]
        texts: dict[tuple[int, int], str] = {}
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
            stop_strings=list(params.stop) or None,
        )
        for batch in self._batches([len(encoded[i]) for i, _ in rows], params.max_new_tokens):
            batch_rows = [rows[b] for b in batch]
            ids, mask = self._left_pad([encoded[i] for i, _ in batch_rows])
            processors = LogitsProcessorList()
            if not params.greedy:
                seeds = [sample_seed(params.seed, prompts[i], k) for i, k in batch_rows]
                processors.append(SeededSampler(seeds, params.temperature, params.top_p))
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=processors,
                tokenizer=self.tokenizer if params.stop else None,
            )
            self.stats.forward_passes += out.shape[1] - ids.shape[1]
            self.stats.prompt_tokens += int(mask.sum())
            for row, new in zip(batch_rows, out[:, ids.shape[1] :].tolist(), strict=True):
                n_tokens = next(
                    (t for t, tok in enumerate(new) if tok in self.eos_ids), len(new)
                )
                self.stats.generated_tokens += n_tokens
                text = self.tokenizer.decode(new[:n_tokens], skip_special_tokens=True)
                texts[row] = truncate_at_stop(text, params.stop)
        self.stats.requests += len(prompts)
        self.stats.seconds += time.perf_counter() - t0
        return [texts[(i, k if samples > 1 else 0)] for i in range(len(prompts)) for k in range(params.n)]

    # ----------------------------------------------------------------------------------------
    # score

    @torch.inference_mode()
    def score(
        self, contexts: Sequence[Prompt], options: Sequence[str] | Sequence[Sequence[str]]
    ) -> list[list[float]]:
        validate_prompts(contexts)
        opts = normalize_options(contexts, options)
        t0 = time.perf_counter()
        ctx_ids = [self.encode(c) for c in contexts]
        conts = [
            [self._continuation(c, ids, o) for o in os]
            for c, ids, os in zip(contexts, ctx_ids, opts, strict=True)
        ]
        result: list[list[float]] = [[0.0] * len(o) for o in opts]

        # Fast path: every option of the context is a single token -> one pass over the context.
        single = [i for i, cs in enumerate(conts) if all(len(c) == 1 for c in cs)]
        for batch in self._batches([len(ctx_ids[i]) for i in single], 0):
            idx = [single[b] for b in batch]
            ids, mask = self._left_pad([ctx_ids[i] for i in idx])
            logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
            logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
            self.stats.forward_passes += 1
            for r, i in enumerate(idx):
                result[i] = [float(logp[r, c[0]]) for c in conts[i]]

        # General path: one row per (context, option), continuation tokens at the end.
        fast = set(single)
        multi = [(i, j) for i, cs in enumerate(conts) if i not in fast for j in range(len(cs))]
        seqs = [ctx_ids[i] + conts[i][j] for i, j in multi]
        vocab = self.model.config.get_text_config().vocab_size
        for batch in self._batches([len(s) for s in seqs], 0):
            # also bound the logits tensor (rows × kept positions × vocab) to ~1 GiB of fp32
            keep = max(len(conts[i][j]) for i, j in (multi[b] for b in batch)) + 1
            rows_per_chunk = max(1, (1 << 28) // (keep * vocab))
            for start in range(0, len(batch), rows_per_chunk):
                chunk = batch[start : start + rows_per_chunk]
                ids, mask = self._left_pad([seqs[b] for b in chunk])
                logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
                logp = torch.log_softmax(logits.float(), dim=-1)
                self.stats.forward_passes += 1
                for r, b in enumerate(chunk):
                    i, j = multi[b]
                    cont = conts[i][j]
                    # logits at kept position p predict the token at p + 1
                    pos = torch.arange(keep - 1 - len(cont), keep - 1)
                    tok = torch.tensor(cont)
                    result[i][j] = float(logp[r, pos, tok].sum())
        self.stats.requests += len(contexts)
        self.stats.seconds += time.perf_counter() - t0
        return result
