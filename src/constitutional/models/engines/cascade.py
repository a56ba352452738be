"""A generation engine for the transformers backend on CPU: cascade attention over the shared
prefix, ragged per-row KV buffers, and per-row KV reuse across calls.

The three ideas, each aimed at a cost that profiling showed on CPU:

* **Cascade attention.** Every row of a call starts with the same few-shot block. Plain batched
  attention reads that block's keys and values once *per row* at every decoding step (for 32
  rows of a ~1,000-token block, about 1.5 GB per step, half of the step's time). Here the block's
  keys and values are held once, and each step's queries of all rows attend to them in one
  matrix product; only the rows' own tokens are read per row. The two parts share one softmax,
  so the result is ordinary attention over ``[prefix][row]``.
* **Ragged rows.** Each row's own tokens sit left-aligned in a preallocated buffer; a row writes
  its next token at its own column, so rows of different lengths need no padding in front and a
  prefill can start each row at a different column.
* **KV reuse across calls.** SL-CAI asks for a critique of an answer the model just wrote, then
  a revision of the critique it just wrote: each call's context extends the previous call's
  context plus its output. The keys and values of every finished row (prompt and generated
  tokens) are kept, keyed by their token ids; the next call looks up the longest common token
  prefix and prefills only the rest (the new request, ~40 tokens instead of ~250). Entries are
  dropped when the model's weights change (PPO trains the model that generates) and evicted
  oldest first beyond a byte budget.

Only the models whose attention code is the transformers Llama pattern (keys and values through
``Cache.update``, keyword arguments passed through to the attention function) use it; any other
model uses ``model.generate``. Results equal the ``model.generate`` path up to float rounding.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ATTENTION = "cai_cascade"
# model types whose attention follows transformers' Llama code (checked by the tests for llama)
SUPPORTED = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def supported(model: Any) -> bool:
    """Whether ``model`` can use the engine: a supported type, no sliding-window layers."""
    config = model.config
    windowed = getattr(config, "use_sliding_window", False) or (
        config.model_type != "llama" and getattr(config, "sliding_window", None))
    return config.model_type in SUPPORTED and not windowed


# ------------------------------------------------------------------------------------------------
# Attention


def cascade_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None,
                      dropout: float = 0.0, cascade: RaggedCache | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over ``[shared prefix][row's own tokens]``.

    ``query`` is [rows, heads, q, dim]; ``key``/``value`` are the rows' own buffers
    [rows, kv heads, cap, dim]. ``cascade`` holds the prefix (the same for every row, always
    visible) and the pass's additive masks, computed once per pass rather than per layer. Without
    ``cascade`` (any other forward pass of the model) this is transformers' SDPA attention.

    * Decoding (one query per row): the queries of all rows attend to the prefix's keys in one
      matrix product, reading them once, and to their own keys per row; the two parts share
      one softmax (a common maximum and denominator).
    * Prefill (several queries per row): PyTorch's fused CPU attention kernel over the rows' own
      keys, and once over the prefix for the queries of all rows together; the two results are
      merged by their log-sum-exp (no copies of the prefix or of the key/value heads).
    """
    if cascade is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    rows, heads, q, dim = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(dim)
    prefix = cascade.prefix[module.layer_idx] if cascade.prefix is not None else None
    group = heads // kv_heads  # query head h reads kv head h // group (as repeat_kv lays out)
    if q > 1:
        # fused attention (PyTorch's CPU flash kernel, which also returns the log-sum-exp) over
        # the rows' own keys, the query heads of a group folded into the query axis; then over
        # the prefix, the queries of all rows folded into one sequence; merged by log-sum-exp
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        qf = query.reshape(rows, kv_heads, group * q, dim)
        out, lse = flash(qf, key, value, attn_mask=cascade.folded_bias(group), scale=scale)
        if prefix is not None:
            pk, pv = prefix
            qp = qf.transpose(0, 1).reshape(1, kv_heads, rows * group * q, dim)
            out_p, lse_p = flash(qp, pk[None], pv[None], scale=scale)
            out_p = out_p[0].view(kv_heads, rows, group * q, dim).transpose(0, 1)
            lse_p = lse_p[0].view(kv_heads, rows, group * q).transpose(0, 1)
            both = torch.logaddexp(lse, lse_p)  # float32 (the kernel's log-sum-exp)
            out = (out * (lse - both).exp()[..., None]
                   + out_p * (lse_p - both).exp()[..., None]).to(query.dtype)
        out = out.reshape(rows, kv_heads, group, q, dim).reshape(rows, heads, q, dim)
        return out.transpose(1, 2).contiguous(), None
    qg = query.reshape(rows, kv_heads, group, dim) * scale
    # scores and softmax in float32 (as SDPA accumulates), products in the model's dtype;
    # in float32 the casts are no-ops
    own = torch.matmul(qg, key.transpose(-1, -2)).float() + cascade.bias  # [rows, kvh, group, cap]
    if prefix is None:
        out = torch.matmul(torch.softmax(own, dim=-1).to(value.dtype), value)
    else:
        pk, pv = prefix  # [kv heads, P, dim]
        flat = qg.transpose(0, 1).reshape(kv_heads, rows * group, dim)
        shared = torch.matmul(flat, pk.transpose(-1, -2)).float()  # [kv heads, rows*group, P]
        top = torch.maximum(own.amax(dim=-1),
                            shared.amax(dim=-1).view(kv_heads, rows, group).transpose(0, 1))
        e_own = (own - top[..., None]).exp_()
        e_shared = (shared - top.transpose(0, 1).reshape(kv_heads, rows * group, 1)).exp_()
        denom = e_own.sum(dim=-1) + e_shared.sum(dim=-1).view(kv_heads, rows, group).transpose(0, 1)
        out = torch.matmul(e_own.to(value.dtype), value).float() + torch.matmul(
            e_shared.to(pv.dtype), pv).float().view(kv_heads, rows, group, dim).transpose(0, 1)
        out = out / denom[..., None]
    return out.to(query.dtype).reshape(rows, 1, heads, dim), None


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION, cascade_attention)
        _registered = True


class attention_switched:
    """Within the block the model uses :func:`cascade_attention` (SDPA when no cascade is
    given); the previous implementation is restored after."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __enter__(self) -> None:
        _register()
        self.before = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTENTION)

    def __exit__(self, *exc: object) -> None:
        self.model.set_attn_implementation(self.before)


class OneDNNWeights:
    """The model's linear layers run through oneDNN with prepacked weights while generating.

    PyTorch's default CPU matrix product for float32 (MKL) ran a decoding step's linear layers at
    ~90 GFLOP/s on this project's AMD machine; oneDNN's ``mkldnn_linear`` on weights packed once
    runs them 1.5-2x faster (32 rows: 0.39 -> 0.24 ms for a 576x1536 layer, 24 -> 12 ms for the
    49k-token output layer). The packed copies cost one more copy of the weights in memory and
    are rebuilt when the weights change. The results differ from MKL's by float rounding only.
    """

    def __init__(self) -> None:
        self.version: Any = None
        self.packed: dict[torch.nn.Linear, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @staticmethod
    def usable(model: Any) -> bool:
        p = next(model.parameters())
        return (p.device.type == "cpu" and p.dtype == torch.float32
                and torch.backends.mkldnn.is_available())

    def __call__(self, model: Any) -> _Swapped:
        version = weights_version(model)
        if version != self.version:
            self.packed = {m: (m.weight.detach().to_mkldnn(),
                               None if m.bias is None else m.bias.detach().to_mkldnn())
                           for m in model.modules() if type(m) is torch.nn.Linear}
            self.version = version
        return _Swapped(self.packed)


class _Swapped:
    def __init__(self, packed: dict[torch.nn.Linear, tuple[torch.Tensor, torch.Tensor | None]]
                 ) -> None:
        self.packed = packed

    def __enter__(self) -> None:
        for module, (weight, bias) in self.packed.items():
            def forward(x: torch.Tensor, weight: torch.Tensor = weight,
                        bias: torch.Tensor | None = bias) -> torch.Tensor:
                return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), weight,
                                                  bias).to_dense()
            module.forward = forward

    def __exit__(self, *exc: object) -> None:
        for module in self.packed:
            del module.forward


# ------------------------------------------------------------------------------------------------
# The cache the model writes into


class RaggedCache:
    """Per-row KV buffers [rows, kv heads, cap, dim] per layer, plus the shared prefix's keys and
    values [kv heads, P, dim] per layer. A forward pass covers the rows ``rows`` (a slice) and
    writes its tokens' keys and values at the columns ``cols`` [rows, q]; transformers calls
    :meth:`update` from every attention layer, which returns the buffers up to the pass's last
    column."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                 prefix: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        self.keys, self.values, self.prefix = keys, values, prefix
        self.rows: slice = slice(None)
        self.cols: torch.Tensor | None = None
        self._ridx: torch.Tensor | None = None

    def at(self, rows: slice, cols: torch.Tensor) -> RaggedCache:
        """Set up a pass over ``rows`` writing columns ``cols`` [rows, q]: each query sees the
        row's columns up to its own (plus the whole prefix)."""
        self.rows, self.cols = rows, cols
        self._ridx = torch.arange(cols.shape[0], device=cols.device)[:, None]
        # attention reads the buffers only up to the last column written so far
        self.limit = int(cols.max()) + 1
        seen = (torch.arange(self.limit, device=cols.device)[None, None, None, :]
                <= cols[:, None, :, None])
        dtype = self.keys[0].dtype
        self.bias = torch.zeros(seen.shape, dtype=dtype, device=cols.device).masked_fill_(
            ~seen, float("-inf"))  # [rows, 1, q, cap]
        self._folded: torch.Tensor | None = None
        return self

    def folded_bias(self, group: int) -> torch.Tensor:
        """The pass's additive mask with each query repeated ``group`` times (the query heads of
        a group folded into the query axis), made once per pass."""
        if self._folded is None:
            b = self.bias  # [rows, 1, q, limit]
            rows, _, q, limit = b.shape
            self._folded = b[:, :, None].expand(rows, 1, group, q, limit).reshape(
                rows, 1, group * q, limit)
        return self._folded

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               cache_kwargs: Any = None, *args: Any, **kwargs: Any,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        # transformers passes more arguments from release to release (5.24 added ``kwargs=``);
        # none of them changes what this cache does
        k_buf, v_buf = self.keys[layer_idx][self.rows], self.values[layer_idx][self.rows]
        k_buf[self._ridx, :, self.cols] = key.transpose(1, 2)
        v_buf[self._ridx, :, self.cols] = value.transpose(1, 2)
        return k_buf[:, :, : self.limit], v_buf[:, :, : self.limit]

    def get_seq_length(self, layer_idx: int = 0, *args: Any, **kwargs: Any) -> int:
        return 0  # positions are always passed explicitly


# ------------------------------------------------------------------------------------------------
# KV reuse across calls


@dataclass
class _Entry:
    tokens: np.ndarray  # the tokens whose keys and values are known
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None  # absolute positions [0, start)
    start: int
    own: list[tuple[torch.Tensor, torch.Tensor]]  # absolute positions [start, len(tokens))
    nbytes: int

    def kv(self, layer: int, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of absolute positions [a, b), [kv heads, b - a, dim]."""
        parts = []
        if a < self.start:
            assert self.prefix is not None
            pk, pv = self.prefix[layer]
            parts.append((pk[:, a : min(b, self.start)], pv[:, a : min(b, self.start)]))
        if b > self.start:
            ok, ov = self.own[layer]
            lo = max(a, self.start) - self.start
            parts.append((ok[:, lo : b - self.start], ov[:, lo : b - self.start]))
        if len(parts) == 1:
            return parts[0]
        return (torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1))


def _common(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class KVStore:
    """Keys and values of recently finished rows, keyed by their token ids (see module doc)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, _Entry] = OrderedDict()
        self.nbytes = 0
        self.version: Any = None
        self._next = 0
        self.hits = 0  # tokens whose keys and values were reused

    def check(self, version: Any) -> None:
        """Drop everything when the model's weights changed since the entries were made."""
        if version != self.version:
            self.clear()
            self.version = version

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    def lookup(self, tokens: np.ndarray, at_least: int) -> tuple[_Entry | None, int]:
        """The entry sharing the longest token prefix with ``tokens`` (longer than
        ``at_least``), and that prefix's length."""
        best, best_len = None, at_least
        for key, e in self.entries.items():
            n = _common(e.tokens, tokens)
            if n > best_len:
                best, best_len = key, n
        if best is None:
            return None, 0
        self.entries.move_to_end(best)
        return self.entries[best], best_len

    def add(self, entry: _Entry) -> None:
        if self.max_bytes <= 0 or entry.nbytes > self.max_bytes:
            return
        # an entry that the new one extends is of no further use
        for key in [k for k, e in self.entries.items()
                    if len(e.tokens) <= len(entry.tokens)
                    and _common(e.tokens, entry.tokens) == len(e.tokens)]:
            self.nbytes -= self.entries.pop(key).nbytes
        self.entries[self._next] = entry
        self._next += 1
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes and self.entries:
            self.nbytes -= self.entries.popitem(last=False)[1].nbytes


# ------------------------------------------------------------------------------------------------
# The engine


def kv_shape(model: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder's KV cache."""
    c = model.config.get_text_config()
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, kv_heads, dim


#: The model attribute that :meth:`HFModel.sync_weights` (and ``load_policy``) counts up.
SYNC_ATTR = "_cai_weights_synced"


def weights_version(model: Any) -> tuple[int, int, int]:
    """Changes whenever a parameter is modified in place by an op that bumps its version counter
    (``foreach`` optimizer steps, ``load_state_dict``), and whenever the weights are marked
    changed (:meth:`HFModel.sync_weights`): a fused optimizer (``torch.optim.AdamW(fused=True)``,
    the Trainer's default ``adamw_torch_fused``) updates them without bumping the counters."""
    return (id(model), sum(p._version for p in model.parameters()),
            getattr(model, SYNC_ATTR, 0))


@dataclass
class Prefix:
    """A call's shared prefix: its tokens and per-layer keys and values [kv heads, P, dim]."""

    tokens: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None


class CascadeEngine:
    """Generates for rows of token ids that share ``prefix``; see the module doc."""

    def __init__(self, model: Any, *, eos_ids: set[int], pad_id: int, max_prefill_tokens: int,
                 store: KVStore) -> None:
        self.model = model
        self.eos_ids = sorted(eos_ids)
        self.pad_id = pad_id
        self.max_prefill_tokens = max_prefill_tokens
        self.store = store
        self.forward_passes = 0
        self.prefilled_tokens = 0

    def prefix_kv(self, tokens: Sequence[int]) -> Prefix:
        """Compute the keys and values of a shared prefix (one row, one pass)."""
        if not tokens:
            return Prefix((), None)
        out = self.model(input_ids=torch.tensor([list(tokens)], device=self.model.device),
                         use_cache=True, logits_to_keep=1)
        self.forward_passes += 1
        kv = [(layer.keys[0], layer.values[0]) for layer in out.past_key_values.layers]
        return Prefix(tuple(tokens), kv)

    def _new_buffers(self, rows: int, cap: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        layers, kv_heads, dim = kv_shape(self.model)
        p = next(self.model.parameters())
        shape = (rows, kv_heads, cap, dim)
        return ([torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(layers)],
                [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(layers)])

    def _plan(self, seqs: Sequence[list[int]], p_len: int) -> tuple[Any, ...]:
        """How the rows are laid out and prefilled: the buffer order (rows sorted by what they
        still have to prefill, so that each prefill chunk is a contiguous slice of the
        buffers), their own and full token ids, the stored keys and values each reuses, the
        tokens each still prefills, and the prefill chunks ([lo, hi) buffer rows)."""
        own = [np.asarray(s[p_len:], dtype=np.int64) for s in seqs]
        full = [np.asarray(s, dtype=np.int64) for s in seqs]
        # keys and values already known: reuse up to all but the last token of each row
        reuse: list[tuple[_Entry | None, int]] = []
        for f in full:
            entry, n = self.store.lookup(f[:-1], p_len) if self.store.entries else (None, 0)
            reuse.append((entry, n - p_len if entry is not None else 0))
        todo = [len(o) - 1 - c for o, (_, c) in zip(own, reuse, strict=True)]
        order = sorted(range(len(seqs)), key=lambda r: todo[r])
        own, full = [own[r] for r in order], [full[r] for r in order]
        reuse, todo = [reuse[r] for r in order], [todo[r] for r in order]
        chunks: list[tuple[int, int]] = []
        for i in range(len(seqs)):
            if todo[i] == 0:
                continue
            # a chunk is padded to its longest row: keep that waste small
            if chunks and (i + 1 - chunks[-1][0]) * todo[i] <= self.max_prefill_tokens \
                    and todo[i] <= 1.25 * todo[chunks[-1][0]] + 8:
                chunks[-1] = (chunks[-1][0], i + 1)
            else:
                chunks.append((i, i + 1))
        return order, own, full, reuse, todo, chunks

    def _prefill(self, cache: RaggedCache, chunks: list[tuple[int, int]], own: list[Any],
                 reuse: list[tuple[Any, int]], todo: list[int], arange: torch.Tensor,
                 p_len: int) -> None:
        """Prefill every row's own tokens but the last, a chunk of similar lengths at a time."""
        device = self.model.device
        for lo, hi in chunks:
            width = todo[hi - 1]
            ids = torch.full((hi - lo, width), self.pad_id, dtype=torch.long)
            for i in range(lo, hi):
                c = reuse[i][1]
                ids[i - lo, : todo[i]] = torch.from_numpy(own[i][c : c + todo[i]])
            start = torch.tensor([reuse[i][1] for i in range(lo, hi)], device=device)
            cols = start[:, None] + torch.arange(width, device=device)[None, :]
            mask = arange[None, None, None, :] <= cols[:, None, :, None]
            self.model(input_ids=ids.to(device), attention_mask=mask, position_ids=cols + p_len,
                       past_key_values=cache.at(slice(lo, hi), cols), use_cache=True,
                       logits_to_keep=1, cascade=cache)
            self.forward_passes += 1
            self.prefilled_tokens += sum(todo[lo:hi])

    def generate(self, seqs: Sequence[list[int]], prefix: Prefix, max_new_tokens: int,
                 sampler: Callable[[list[int]], Callable[[Any, torch.Tensor], torch.Tensor]] | None,
                 stop: Callable[[torch.Tensor], torch.Tensor] | None) -> list[list[int]]:
        """Generated token ids per row (up to and including EOS, or ``max_new_tokens``).

        Every sequence starts with ``prefix.tokens`` and has at least one token of its own.
        ``sampler``, given the order in which the rows are laid out (indices into ``seqs``),
        returns a function from scores [rows, vocab] (in that order) to scores whose argmax is the
        next token; ``stop`` maps the generated ids [rows, t] to rows finished by a stop
        string."""
        device = self.model.device
        p_len = len(prefix.tokens)
        rows = len(seqs)
        order, own, full, reuse, todo, chunks = self._plan(seqs, p_len)
        pad_cols = max((reuse[i][1] + todo[hi - 1] for lo, hi in chunks for i in range(lo, hi)),
                       default=0)
        cap = max(pad_cols, max(len(o) for o in own) + max_new_tokens)
        keys, values = self._new_buffers(rows, cap)
        cache = RaggedCache(keys, values, prefix.kv)
        for i, (entry, c) in enumerate(reuse):
            if entry is None:
                continue
            for layer in range(len(keys)):
                k, v = entry.kv(layer, p_len, p_len + c)
                keys[layer][i, :, :c] = k
                values[layer][i, :, :c] = v
            self.store.hits += c
        arange = torch.arange(cap, device=device)
        self._prefill(cache, chunks, own, reuse, todo, arange, p_len)
        return self._decode(cache, prefix, own, full, order, arange, max_new_tokens, sampler,
                            stop)

    def _decode(self, cache: RaggedCache, prefix: Prefix, own: list[Any], full: list[Any],
                order: list[int], arange: torch.Tensor, max_new_tokens: int, sampler: Any,
                stop: Any) -> list[list[int]]:
        """Decode all rows together, each at its own column, and cut each row after its EOS or
        stop, in the callers' order."""
        device = self.model.device
        p_len = len(prefix.tokens)
        rows = len(own)
        keys, values = cache.keys, cache.values
        # decode all rows together, each at its own column; once a quarter of the rows have
        # finished, they are dropped from the batch (their keys and values kept first)
        pick = sampler(order) if sampler is not None else None
        live = list(range(rows))  # the buffer rows still decoding, in buffer order
        col = torch.tensor([len(o) - 1 for o in own], device=device)
        cur = torch.tensor([int(o[-1]) for o in own], device=device)
        eos = torch.tensor(self.eos_ids, device=device)
        gen = torch.full((rows, max_new_tokens), self.pad_id, dtype=torch.long)
        fed = [0] * rows  # decoding steps each row took part in
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        everything = slice(None)

        def keep(local: int, i: int) -> None:
            """Store buffer row ``local`` (sequence ``order[i]``) for later calls."""
            n_own = len(own[i]) - 1 + fed[i]  # columns with keys and values
            tokens = np.concatenate([full[i], gen[i, : fed[i] - 1].numpy()])
            kv = [(keys[layer][local, :, :n_own].clone(), values[layer][local, :, :n_own].clone())
                  for layer in range(len(keys))]
            nbytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
            self.store.add(_Entry(tokens, prefix.kv, p_len, kv, nbytes))

        for t in range(max_new_tokens):
            for r, d in zip(live, done.tolist(), strict=True):
                fed[r] += not d
            logits = self.model(input_ids=cur[:, None],
                                attention_mask=arange[None, None, None, :] <= col[:, None, None, None],
                                position_ids=(col + p_len)[:, None],
                                past_key_values=cache.at(everything, col[:, None]),
                                use_cache=True, logits_to_keep=1, cascade=cache).logits[:, -1]
            self.forward_passes += 1
            scores = logits.float()
            if pick is not None:
                scores = pick(None, scores)
            nxt = torch.where(done, self.pad_id, scores.argmax(dim=-1))
            gen[live, t] = nxt.cpu()
            done = done | torch.isin(nxt, eos)
            if stop is not None:
                done = done | stop(gen[live, : t + 1]).to(device)
            if bool(done.all()):
                break
            n_done = int(done.sum())
            if n_done * 4 >= len(live):
                for local in done.nonzero().flatten().tolist():
                    keep(local, live[local])
                stay = (~done).nonzero().flatten()
                keys = [k.index_select(0, stay) for k in keys]
                values = [v.index_select(0, stay) for v in values]
                cache = RaggedCache(keys, values, prefix.kv)
                live = [live[j] for j in stay.tolist()]
                col, nxt, done = col[stay], nxt[stay], done[stay]
                if pick is not None:
                    pick = pick.subset(stay.tolist())
            col = col + 1
            cur = nxt
        for local, i in enumerate(live):
            keep(local, i)
        generated = gen.tolist()
        counts = fed
        # cut each row after its EOS (the EOS is kept) or at its stop, in the callers' order
        result: list[list[int]] = [[] for _ in range(rows)]
        for i, r in enumerate(order):
            row = generated[i]
            n = next((t for t, tok in enumerate(row) if tok in self.eos_ids), None)
            result[r] = row[: n + 1] if n is not None else row[: counts[i]]
        return result


# ------------------------------------------------------------------------------------------------
# The self-check at load (see models.engines.guard)


class _Recorder:
    """A "sampler" that records the scores of each decoding step and changes nothing."""

    def __init__(self, order: list[int], steps: list[tuple[list[int], torch.Tensor]]) -> None:
        self.order, self.steps = order, steps

    def __call__(self, _ids: Any, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append((list(self.order), scores.detach().float().clone()))
        return scores

    def subset(self, rows: Sequence[int]) -> _Recorder:
        return _Recorder([self.order[r] for r in rows], self.steps)


def self_check(model: Any, linears: Any) -> str | None:
    """None when a tiny forward through the engine gives the stock forward's logits, else a
    one-line reason.

    Two rows of random tokens sharing a 6-token prefix, prefilled and decoded for two steps
    (so both attention paths, the prefix, the ragged buffers and ``linears``, the oneDNN
    context, are exercised); each step's logits must equal those of a plain forward pass of the
    model over the same tokens, within float rounding of the model's dtype."""
    try:
        vocab = model.config.get_text_config().vocab_size
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (12,), generator=gen).tolist()
        rows = [ids[:9], ids[:12]]
        steps: list[tuple[list[int], torch.Tensor]] = []
        engine = CascadeEngine(model, eos_ids={-1}, pad_id=0, max_prefill_tokens=4096,
                               store=KVStore(0))
        with torch.inference_mode(), attention_switched(model), linears:
            prefix = engine.prefix_kv(ids[:6])
            out = engine.generate(rows, prefix, 2, lambda order: _Recorder(order, steps), None)
        if len(steps) != 2:
            return f"expected 2 decoding steps, saw {len(steps)}"
        p = next(model.parameters())
        tol = 1e-3 if p.dtype == torch.float32 else 5e-2
        worst = 0.0
        with torch.inference_mode():
            for step, (order, scores) in enumerate(steps):
                for pos, r in enumerate(order):
                    seq = rows[r] + out[r][:step]
                    want = model(input_ids=torch.tensor([seq], device=p.device)).logits[0, -1]
                    want = want.float()
                    err = float((scores[pos] - want).abs().max()) / max(1.0, float(
                        want.abs().max()))
                    worst = max(worst, err)
        if not worst <= tol:
            return f"its logits differ from the stock forward by {worst:.2g} (tolerance {tol})"
        return None
    except Exception as err:  # noqa: BLE001 -- any failure of private internals: no engine
        text = " ".join(f"{type(err).__name__}: {err}".split())
        return text[:200]
