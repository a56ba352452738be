"""The CPU generation engine (models.engines.cascade): cascade attention, ragged rows, KV reuse.

Equality with ``model.generate`` is checked on a tiny Llama with peaked weights
(``initializer_range=0.6``): on a near-uniform random model, float rounding from the other
attention arithmetic can flip a near-tie, which says nothing about the engine.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import make_tiny_llama

from constitutional.models import SamplingParams
from constitutional.models.engines import cascade
from constitutional.models.hf import HFModel

FEW_SHOT = "".join(f"Example {i}: a question about topic {i} and a careful answer.\n"
                   for i in range(10))
PROMPTS = [
    [{"role": "system", "content": FEW_SHOT}, {"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": FEW_SHOT},
     {"role": "user", "content": "Name a colour. " * 5}],
    [{"role": "system", "content": FEW_SHOT},
     {"role": "user", "content": "Write a long story about a dragon. " * 4}],
    [{"role": "system", "content": FEW_SHOT}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "more " * 9}],
]


@pytest.fixture(scope="module")
def peaked_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir):
    return make_tiny_llama(tmp_path_factory.mktemp("peaked") / "model", tiny_model_dir,
                           initializer_range=0.6)


@pytest.fixture()
def peaked(peaked_dir) -> HFModel:
    return HFModel(peaked_dir)


def both(model: HFModel, prompts, params: SamplingParams) -> tuple[list, list]:
    """(cascade engine, model.generate) outputs with ids, from fresh KV stores."""
    model.engine, model.kv_store = "cascade", cascade.KVStore(2**30)
    got = model.generate_with_ids(prompts, params)
    model.engine = "generate"
    try:
        want = model.generate_with_ids(prompts, params)
    finally:
        model.engine = "cascade"
    return got, want


def test_cascade_is_the_cpu_default_for_llama(tiny: HFModel) -> None:
    assert tiny.engine == "cascade"
    assert cascade.supported(tiny.model)


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=20),
    SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7, n=2),
], ids=["greedy", "seeded-sampling"])
def test_engine_equals_model_generate(peaked: HFModel, params: SamplingParams) -> None:
    peaked.max_batch_tokens = 400  # several batches of different widths
    got, want = both(peaked, PROMPTS, params)
    assert got == want
    assert len({text for text, _ in got}) > 1  # not a degenerate model


def test_prefill_in_small_chunks_changes_nothing(peaked: HFModel) -> None:
    """Rows are prefilled a chunk at a time (rows × tokens ≤ max_prefill_tokens), each chunk
    padded only to its own longest row; the outputs equal one pass over all rows."""
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=2)
    peaked.kv_store = cascade.KVStore(0)
    before = peaked.stats.forward_passes
    one = peaked.generate(PROMPTS, params)
    one_passes = peaked.stats.forward_passes - before
    peaked.max_prefill_tokens, peaked.generation.prefix = 40, None  # the prefix is computed again too
    before = peaked.stats.forward_passes
    assert peaked.generate(PROMPTS, params) == one
    assert peaked.stats.forward_passes - before >= one_passes + 2  # more prefill passes


def test_finished_rows_leave_the_batch_and_change_nothing(peaked: HFModel) -> None:
    """Stop strings end rows at different steps: the engine drops them from the batch (a
    quarter at a time) and every row still equals ``model.generate``'s."""
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=3, n=4, stop=("e",))
    got, want = both(peaked, PROMPTS, params)
    # texts only: for a row cut by a stop string, model.generate pads the ids with the pad
    # token (here the EOS token), which was never sampled; the engine returns the sampled ids
    assert [text for text, _ in got] == [text for text, _ in want]
    lengths = {len(ids) for _, ids in got}
    assert len(lengths) > 2 and min(lengths) < 24  # rows really stopped early, at various steps


def test_kv_reuse_across_calls(peaked: HFModel, peaked_dir) -> None:
    """A call whose contexts extend the previous call's contexts and outputs (SL-CAI's critique
    after an answer) reuses their keys and values and prefills only the new tokens; the result
    equals a computation from scratch."""
    first = peaked.generate(PROMPTS, SamplingParams(max_new_tokens=16))
    follow = [p + [{"role": "assistant", "content": a},
                   {"role": "user", "content": "Critique that answer briefly."}]
              for p, a in zip(PROMPTS, first, strict=True)]
    params = SamplingParams(max_new_tokens=16, temperature=0.8, seed=1)
    hits, before = peaked.kv_store.hits, peaked.stats.prompt_tokens
    reused = peaked.generate(follow, params)
    assert peaked.kv_store.hits - hits > 4 * 20  # at least the answers' tokens came from the store
    prefilled = peaked.stats.prompt_tokens - before

    fresh = HFModel(peaked_dir, kv_reuse_gib=0)
    fresh.generate(PROMPTS, SamplingParams(max_new_tokens=16))
    before = fresh.stats.prompt_tokens
    assert fresh.generate(follow, params) == reused
    assert fresh.kv_store.hits == 0
    assert prefilled < fresh.stats.prompt_tokens - before


def test_kv_store_is_dropped_when_the_weights_change(peaked: HFModel) -> None:
    """PPO trains the model that generates: stale keys and values must not be reused."""
    first = peaked.generate(PROMPTS, SamplingParams(max_new_tokens=8))
    assert peaked.kv_store.entries
    with torch.no_grad():
        for p in peaked.model.parameters():
            p.mul_(1.5)
    follow = [p + [{"role": "assistant", "content": a}, {"role": "user", "content": "Why?"}]
              for p, a in zip(PROMPTS, first, strict=True)]
    hits = peaked.kv_store.hits
    got = peaked.generate(follow, SamplingParams(max_new_tokens=8))
    assert peaked.kv_store.hits == hits  # nothing reused
    peaked.engine = "generate"
    assert got == peaked.generate(follow, SamplingParams(max_new_tokens=8))


def test_kv_store_keeps_to_its_byte_budget() -> None:
    store = cascade.KVStore(max_bytes=1000)
    import numpy as np

    def entry(tokens: list[int], nbytes: int) -> cascade._Entry:
        return cascade._Entry(np.asarray(tokens), None, 0, [], nbytes)

    store.add(entry([1, 2, 3], 400))
    store.add(entry([1, 2, 3, 4, 5], 400))  # extends the first, which is dropped
    assert len(store.entries) == 1 and store.nbytes == 400
    store.add(entry([7, 8], 400))
    store.add(entry([9, 9], 400))  # over budget: the oldest goes
    assert store.nbytes <= 1000 and len(store.entries) == 2
    found, n = store.lookup(np.asarray([9, 9, 1]), 0)
    assert found is not None and n == 2
    assert store.lookup(np.asarray([5, 5]), 0) == (None, 0)


@pytest.mark.parametrize("q", [1, 5])
def test_cascade_attention_equals_plain_attention(q: int) -> None:
    """Prefix keys held once + each row's own ragged keys = SDPA over the concatenation."""
    torch.manual_seed(0)
    rows, heads, kv_heads, dim, p_len, cap = 3, 6, 2, 16, 11, 9
    query = torch.randn(rows, heads, q, dim)
    key, value = torch.randn(rows, kv_heads, cap, dim), torch.randn(rows, kv_heads, cap, dim)
    pk, pv = torch.randn(kv_heads, p_len, dim), torch.randn(kv_heads, p_len, dim)
    cols = torch.tensor([[2], [4], [0]]) + torch.arange(q)[None, :]  # each row's query columns
    cache = cascade.RaggedCache([key], [value], [(pk, pv)]).at(slice(None), cols)
    # the pass writes its own tokens' keys and values, and attends up to its last column
    key, value = cache.update(torch.randn(rows, kv_heads, q, dim),
                              torch.randn(rows, kv_heads, q, dim), 0)
    cap = key.shape[2]
    assert cap == int(cols.max()) + 1

    class Layer:
        layer_idx = 0

    got, _ = cascade.cascade_attention(Layer(), query, key, value, None, scaling=0.25,
                                       cascade=cache)
    full_k = torch.cat([pk.expand(rows, -1, -1, -1), key], 2).repeat_interleave(heads // kv_heads, 1)
    full_v = torch.cat([pv.expand(rows, -1, -1, -1), value], 2).repeat_interleave(heads // kv_heads, 1)
    seen = torch.arange(cap)[None, None, :] <= cols[:, :, None]  # [rows, q, cap]
    mask = torch.cat([torch.ones(rows, q, p_len, dtype=torch.bool), seen], -1)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(query, full_k, full_v,
                                                            attn_mask=mask, scale=0.25)
    assert torch.allclose(got, want.transpose(1, 2), atol=1e-5)
    assert not math.isnan(float(got.sum()))


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_other_supported_architectures(tmp_path, tiny_model_dir, model_type: str) -> None:
    """The engine's other model types give model.generate's output too."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        initializer_range=0.6, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, use_sliding_window=False, sliding_window=None)
    torch.manual_seed(0)
    model = HFModel(tiny_model_dir, model=AutoModelForCausalLM.from_config(config), tokenizer=tok)
    assert model.engine == "cascade"
    got, want = both(model, PROMPTS, SamplingParams(max_new_tokens=12))
    assert got == want
