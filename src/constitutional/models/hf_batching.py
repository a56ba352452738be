"""The ``hf`` backend's batching (:class:`Batcher`), shared by generation and scoring.

Rows are sorted by length and cut into batches bounded by a token budget
(``rows × (longest + extra) ≤ max_batch_tokens``), left-padded. When the rows of a batch share
at least ``min_shared_prefix`` leading tokens (a few-shot block), the prefix's KV cache is
computed once for one row, and the rows are laid out as ``[prefix][padding][suffix]`` so that
only the suffixes run through the model; position ids come from the attention mask, so the
result equals the unshared computation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from constitutional.models.base import ModelStats
from constitutional.models.hf_weights import HFWeights


@dataclass
class Batch:
    """A laid-out batch: full ids and mask, the ids still to run, and the shared-prefix cache."""

    ids: torch.Tensor  # [rows, shared + width]
    mask: torch.Tensor  # same shape
    new_ids: torch.Tensor  # the part not covered by ``cache``
    cache: Any  # a KV cache of the shared prefix, repeated per row, or None
    shared: int  # length of the shared prefix (0 when not shared)
    prefix_cache: Any = None  # the shared prefix's one-row KV cache (when ``cache`` is None)


def shared_prefix_len(seqs: Sequence[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        tok = first[i]
        if any(s[i] != tok for s in seqs[1:]):
            return i
    return n


def repeated(cache: Any, rows: int) -> Any:
    """A copy of a one-row KV cache, repeated ``rows`` times."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(rows)
    return out


class Batcher:
    """Cuts rows into batches within the token budgets and lays them out, computing a shared
    prefix's KV cache once (with ``weights.model``; counted in ``stats``).

    * ``max_batch_tokens``, ``max_batch_size``: rows × (longest + extra) and rows per batch;
    * ``max_prefill_tokens``: rows × width per prefill pass of generation;
    * ``score_prefill_tokens``: the same, for scoring;
    * ``min_shared_prefix``: the shortest prefix worth computing once.
    """

    def __init__(self, weights: HFWeights, *, device: torch.device, stats: ModelStats,
                 pad_id: int, max_batch_tokens: int, max_batch_size: int,
                 min_shared_prefix: int, max_prefill_tokens: int,
                 score_prefill_tokens: int) -> None:
        self.weights, self.device, self.stats, self.pad_id = weights, device, stats, pad_id
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.min_shared_prefix = min_shared_prefix
        self.max_prefill_tokens = max_prefill_tokens
        self.score_prefill_tokens = score_prefill_tokens

    def batches(self, lengths: Sequence[int], extra: int,
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

    def left_pad(self, seqs: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def plain(self, seqs: Sequence[list[int]]) -> Batch:
        """``seqs`` left-padded, with no shared prefix."""
        ids, mask = self.left_pad(seqs)
        return Batch(ids, mask, ids, None, 0)

    def layout(self, seqs: Sequence[list[int]], caches: dict[tuple[int, ...], Any],
               repeat: bool = True, keep: int = 1) -> Batch:
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
            prefix = self.cache_common_prefix(seqs, caches, keep)
            if prefix is None:
                return self.plain(seqs)
        shared = len(prefix)
        cache = repeated(caches[prefix], len(seqs)) if repeat else None
        suffix_ids, suffix_mask = self.left_pad([s[shared:] for s in seqs])
        prefix_ids = torch.tensor([prefix] * len(seqs), dtype=torch.long, device=self.device)
        ids = torch.cat([prefix_ids, suffix_ids], dim=1)
        mask = torch.cat([torch.ones_like(prefix_ids), suffix_mask], dim=1)
        return Batch(ids, mask, suffix_ids, cache, shared, None if repeat else caches[prefix])

    def seed_prefix(self, seqs: Sequence[list[int]], caches: dict[tuple[int, ...], Any],
                    keep: int = 1) -> None:
        """Compute the KV cache of the prefix shared by all of a call's sequences up front, so
        that every batch reuses it, one-row batches included."""
        if not caches:
            self.cache_common_prefix(seqs, caches, keep)

    def cache_common_prefix(self, seqs: Sequence[list[int]], caches: dict[tuple[int, ...], Any],
                            keep: int = 1) -> tuple[int, ...] | None:
        """The prefix all of ``seqs`` share (each keeps at least one token of its own), with its
        one-row KV cache put in ``caches`` (replacing any other: a call has one few-shot block);
        None when it is shorter than ``min_shared_prefix``."""
        if len(seqs) < 2:
            return None
        shared = min(shared_prefix_len(seqs), min(len(s) for s in seqs) - keep)
        if shared < self.min_shared_prefix:
            return None
        prefix = tuple(seqs[0][:shared])
        caches.clear()
        out = self.weights.model(input_ids=torch.tensor([prefix], device=self.device),
                                 use_cache=True, logits_to_keep=1)
        caches[prefix] = out.past_key_values
        self.stats.forward_passes += 1
        return prefix
