"""The ``hf`` backend's scoring (:class:`HFScorer`): log-probabilities of option continuations.

Each context is computed **once**; every option is read as its continuation. When every option
of a context is one token, all of them are read from one forward pass over the context
(``logits_to_keep=1``). Prefill runs a few rows at a time (``score_prefill_tokens``: on CPU a
small pass keeps its working set in the processor's caches and is about twice as fast per row).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any

import torch

from constitutional.models.base import ModelStats
from constitutional.models.hf_batching import Batch, Batcher, shared_prefix_len
from constitutional.models.hf_weights import HFWeights


class HFScorer:
    """Scores token-id continuations of token-id contexts with ``weights.model`` (always in the
    weights' own dtype), batched and prefix-shared by ``batcher``."""

    #: ``score`` reads all options of a batch in one pass when the batch's context cache,
    #: repeated once per option, holds at most this many token positions
    SCORE_REPEAT_TOKENS = 16384

    def __init__(self, weights: HFWeights, batcher: Batcher, *, stats: ModelStats) -> None:
        self.weights, self.batcher, self.stats = weights, batcher, stats
        self.device = batcher.device

    @property
    def model(self) -> Any:
        return self.weights.model

    def score(self, ctx_ids: list[list[int]], conts: list[list[list[int]]],
              ) -> list[list[float]]:
        """``result[i][j]``: log P(``conts[i][j]`` | ``ctx_ids[i]``).

        The options' common leading tokens (" (" of " (A)", " (B)") are appended to the context,
        and the first pass reads their log-probabilities and each option's next token from the
        last positions. Options longer than that are finished from the context's KV cache (all
        options in one pass from the cache repeated per option, or one option at a time when
        that would exceed ``SCORE_REPEAT_TOKENS``), so no option recomputes the context.
        Contexts that share a long prefix (a call's few-shot block; the two letterings of a
        ``--debias`` question) compute it once (see :meth:`_score_batches`)."""
        # extended context = context + the options' common tokens (each option keeps one)
        common = [min(shared_prefix_len(cs), min(len(c) for c in cs) - 1) for cs in conts]
        ext = [ids + cs[0][:n] for ids, cs, n in zip(ctx_ids, conts, common, strict=True)]
        rests = [[c[n:] for c in cs] for cs, n in zip(conts, common, strict=True)]
        result: list[list[float]] = [[0.0] * len(cs) for cs in conts]
        caches: dict[tuple[int, ...], Any] = {}
        self.batcher.seed_prefix(ext, caches, keep=max(common) + 1)
        self.stats.scored_tokens += sum(len(p) for p in caches)
        prefixes: set[tuple[int, ...]] = set(caches)  # prefixes counted in scored_tokens
        for idx, batch_caches in self._score_batches(ext, caches, max(common) + 1):
            prefixes.update(batch_caches)
            self._score_batch(idx, ext, common, rests, batch_caches, result, prefixes)
        return result

    def _score_batches(self, ext: list[list[int]], caches: dict[tuple[int, ...], Any],
                       keep: int) -> Iterator[tuple[list[int], dict[tuple[int, ...], Any]]]:
        """Batches of context indices, each with the prefix caches ``Batcher.layout`` may use.

        Contexts that share a long prefix with a neighbour (in token order) beyond the call's
        shared prefix (the two letterings of a ``--debias`` question: their conversation) form
        a group; the group's prefix is computed once, on top of the call's prefix cache when
        there is one. The other contexts are cut by length as usual."""
        batcher = self.batcher
        budget = batcher.score_prefill_tokens
        base = max((len(p) for p in caches), default=0)  # the call's shared prefix
        order = sorted(range(len(ext)), key=lambda i: ext[i])
        groups: list[list[int]] = [order[:1]]
        for a, b in itertools.pairwise(order):
            more = shared_prefix_len([ext[a], ext[b]]) - base
            if more >= batcher.min_shared_prefix and more >= (len(ext[b]) - base) // 2:
                groups[-1].append(b)
            else:
                groups.append([b])
        singles = sorted(g[0] for g in groups if len(g) == 1)
        for batch in batcher.batches([len(ext[i]) - base for i in singles], 0, budget):
            yield [singles[b] for b in batch], caches
        for g in groups:
            if len(g) < 2:
                continue
            seqs = [ext[i] for i in g]
            shared = min(shared_prefix_len(seqs), min(len(s) for s in seqs) - keep)
            group_cache = self._extend_prefix(tuple(seqs[0][:shared]), caches)
            for batch in batcher.batches([len(s) - shared for s in seqs], 0, budget):
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

    def _forward(self, batch: Batch, keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions of every row."""
        kwargs: dict[str, Any] = {}
        if batch.cache is not None:
            positions = (batch.mask.cumsum(-1) - 1).clamp(min=0)
            kwargs = {"past_key_values": batch.cache, "position_ids": positions[:, batch.shared :]}
        out = self.model(input_ids=batch.new_ids, attention_mask=batch.mask, logits_to_keep=keep,
                         use_cache=batch.cache is not None, **kwargs)
        self.stats.forward_passes += 1
        return out.logits

    def _score_batch(self, idx: list[int], ext: list[list[int]], common: list[int],
                     rests: list[list[list[int]]], caches: dict[tuple[int, ...], Any],
                     result: list[list[float]], prefixes: set[tuple[int, ...]]) -> None:
        from transformers import DynamicCache

        keep = max(common[i] for i in idx) + 1
        more = max(len(r) for i in idx for r in rests[i]) > 1  # an option needs another pass
        batch = self.batcher.layout([ext[i] for i in idx], caches, keep=keep)
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
        ids = torch.full((len(pairs), steps), self.batcher.pad_id, dtype=torch.long)
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
