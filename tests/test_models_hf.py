"""The transformers backend on a real tiny Llama (random init, real tokenizer)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from constitutional.core.errors import UserError
from constitutional.models import SamplingParams
from constitutional.models.hf import HFModel, _shared_prefix_len

PROMPTS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour. " * 5}],
    [{"role": "user", "content": "Write a long story about a dragon who learns to cook. " * 3}],
    "Raw text prompt for a base model:",
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "multi-turn context " * 8}],
]


def direct_logprob(model: HFModel, context, option: str) -> float:
    """log P(option | context) from one unbatched forward pass and a plain log-softmax."""
    ctx = model.encode(context)
    full = model.tokenizer(model.render(context) + option,
                           add_special_tokens=isinstance(context, str))["input_ids"]
    cont = full[len(ctx):] if full[: len(ctx)] == ctx else model.tokenizer(
        option, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model.model(ids).logits[0].float(), dim=-1)
    return sum(float(logp[len(ctx) + t - 1, tok]) for t, tok in enumerate(cont))


def test_batched_greedy_equals_unbatched(tiny: HFModel) -> None:
    params = SamplingParams(max_new_tokens=24)
    one_by_one = [tiny.generate([p], params)[0] for p in PROMPTS]
    budget, tiny.max_batch_tokens = tiny.max_batch_tokens, 200  # several batches, other widths
    try:
        batched = tiny.generate(PROMPTS, params)
    finally:
        tiny.max_batch_tokens = budget
    assert batched == one_by_one
    assert all(isinstance(t, str) and t for t in batched)


def test_batches_respect_token_budget(tiny: HFModel) -> None:
    lengths = [5, 50, 7, 300, 20, 21, 3]
    budget, tiny.max_batch_tokens = tiny.max_batch_tokens, 400
    try:
        batches = list(tiny.batcher.batches(lengths, extra=40))
    finally:
        tiny.max_batch_tokens = budget
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * (max(lengths[i] for i in b) + 40) <= 400
        widths = [lengths[i] for i in b]
        assert widths == sorted(widths)  # sorted by length


def test_batches_are_balanced_rather_than_leaving_a_small_remainder(tiny: HFModel) -> None:
    # 32 rows of ~1,000 tokens (+64 new) against a budget that fits 28 per batch: greedy
    # filling gives 28 + 4 (the 4 cost as many decoding steps as the 28); we cut 16 + 16
    lengths = [1000 + i for i in range(32)]
    budget, tiny.max_batch_tokens = tiny.max_batch_tokens, 28 * 1100
    try:
        batches = list(tiny.batcher.batches(lengths, extra=64))
    finally:
        tiny.max_batch_tokens = budget
    assert [len(b) for b in batches] == [16, 16]
    assert [i for b in batches for i in b] == list(range(32))


def test_default_batch_budget_follows_the_kv_cache_size(tiny: HFModel) -> None:
    c = tiny.model.config
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * (
        c.hidden_size // c.num_attention_heads) * 4  # float32
    assert tiny._kv_bytes_per_token() == per_token
    assert tiny.max_batch_tokens == max(2048, 4 * 2**30 // per_token)


def test_score_matches_direct_log_softmax(tiny: HFModel) -> None:
    contexts = [
        [{"role": "user", "content": "Which is better?"},
         {"role": "assistant", "content": "The answer is: ("}],
        "Question: pick one. The answer is: (",
    ]
    single = tiny.score(contexts, ["A", "B"])  # single-token options: one pass per context
    multi = tiny.score(contexts, [" a longer option", " another, longer option text"])
    for i, ctx in enumerate(contexts):
        for j, opt in enumerate(["A", "B"]):
            assert single[i][j] == pytest.approx(direct_logprob(tiny, ctx, opt), abs=1e-4)
        for j, opt in enumerate([" a longer option", " another, longer option text"]):
            assert multi[i][j] == pytest.approx(direct_logprob(tiny, ctx, opt), abs=1e-4)
    assert all(v < 0 for row in single + multi for v in row)


def test_score_single_token_options_cost_one_pass(tiny: HFModel) -> None:
    contexts = [f"Context number {i}. The answer is: (" for i in range(6)]
    before = tiny.stats.forward_passes
    tiny.score(contexts, ["A", "B"])
    assert tiny.stats.forward_passes - before == 1  # all six contexts, both options, one batch


def test_score_per_context_options(tiny: HFModel) -> None:
    out = tiny.score(["x", "y"], [["A", "B", "C"], [" yes"]])
    assert [len(r) for r in out] == [3, 1]
    with pytest.raises(UserError):
        tiny.score(["x", "y"], [["A"]])


def test_stop_strings_cut_the_output(tiny: HFModel) -> None:
    prompt = [PROMPTS[0]]
    free = tiny.generate(prompt, SamplingParams(max_new_tokens=40))[0]
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop and stop in free
    before = tiny.stats.generated_tokens
    stopped = tiny.generate(prompt, SamplingParams(max_new_tokens=40, stop=(stop,)))[0]
    assert stopped == free[: free.index(stop)]
    assert tiny.stats.generated_tokens - before < 40  # generation really stopped early


def test_seed_makes_sampling_reproducible(tiny: HFModel) -> None:
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=7, n=2)
    a = tiny.generate(PROMPTS, params)
    b = tiny.generate(PROMPTS, params)
    assert a == b
    assert len(a) == len(PROMPTS) * 2
    assert a[0] != a[1]  # two samples of one prompt differ
    assert tiny.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=16, seed=8, n=2)) != a
    # a prompt's samples do not depend on what else is in the batch (resume/sharding safety)
    alone = tiny.generate([PROMPTS[2]], params)
    assert alone == a[4:6]


def test_tiny_top_p_is_greedy(tiny: HFModel) -> None:
    greedy = tiny.generate(PROMPTS[:2], SamplingParams(max_new_tokens=12))
    nucleus = tiny.generate(PROMPTS[:2], SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=12))
    assert nucleus == greedy


def test_sampling_follows_the_softmax(tiny: HFModel) -> None:
    """Seeded inverse-CDF sampling: the empirical frequency of the top token matches its probability."""
    context = "The first token:"
    ids = torch.tensor([tiny.encode(context)])
    with torch.no_grad():
        logits = tiny.model(ids).logits[0, -1].float()
    lo, hi = 1e-3, 10.0  # bisect the temperature that puts about half the mass on the top token
    for _ in range(60):
        temperature = math.sqrt(lo * hi)
        if float(torch.softmax(logits / temperature, dim=-1).max()) > 0.5:
            lo = temperature
        else:
            hi = temperature
    top_p, top_id = torch.softmax(logits / temperature, dim=-1).max(dim=0)
    n = 400
    samples = tiny.generate([context], SamplingParams(temperature=temperature, max_new_tokens=1, n=n, seed=1))
    top_text = tiny.tokenizer.decode([int(top_id)], skip_special_tokens=True)
    freq = sum(s == top_text for s in samples) / n
    p = float(top_p)
    assert 0.05 < p < 0.95, "pick a temperature that gives an informative test"
    assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0}, {"n": 0},
     {"seed": -3}, {"stop": ("",)}, {"temperature": float("nan")}],
)
def test_bad_sampling_values(kwargs: dict) -> None:
    with pytest.raises(UserError, match="sampling parameter"):
        SamplingParams(**kwargs)


def test_bad_prompts(tiny: HFModel) -> None:
    with pytest.raises(UserError):
        tiny.generate("not a list", SamplingParams())
    with pytest.raises(UserError, match="message 0"):
        tiny.generate([[{"role": "robot", "content": "x"}]], SamplingParams())


def test_model_without_chat_template(tiny_model_dir, tmp_path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    model = HFModel(tiny_model_dir, tokenizer=tok)
    assert model.generate(["raw text works"], SamplingParams(max_new_tokens=3))
    with pytest.raises(UserError, match="no chat template"):
        model.generate([[{"role": "user", "content": "hi"}]], SamplingParams())


FEW_SHOT = "".join(
    f"Example {i}: a question about topic {i} and a careful, helpful answer to it.\n" for i in range(12)
)


def test_shared_prefix_is_computed_once_and_changes_nothing(tiny: HFModel) -> None:
    prompts = [FEW_SHOT + f"Now the real question number {i}{'?' * i}" for i in range(6)]
    contexts = [p + " The answer is: (" for p in prompts]
    params = SamplingParams(max_new_tokens=10)
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, seed=4)
    tiny.min_shared_prefix = 10**9  # sharing off: the reference computation
    try:
        ref_gen, ref_sample = tiny.generate(prompts, params), tiny.generate(prompts, sampled)
        ref_score = tiny.score(contexts, ["A", "B"])
        ref_multi = tiny.score(contexts, [" one option", " another longer option"])
    finally:
        tiny.min_shared_prefix = 32
    before = tiny.stats.forward_passes
    score = tiny.score(contexts, ["A", "B"])
    assert tiny.stats.forward_passes - before == 2  # the prefix once, then all suffixes at once
    assert tiny.generate(prompts, params) == ref_gen
    assert tiny.generate(prompts, sampled) == ref_sample
    for got, want in zip(score + tiny.score(contexts, [" one option", " another longer option"]),
                         ref_score + ref_multi, strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_shared_prefix_is_reused_across_batches(tiny: HFModel) -> None:
    contexts = [FEW_SHOT + f"Question {i} " * (1 + i % 3) + "The answer is: (" for i in range(8)]
    tiny.min_shared_prefix = 10**9
    try:
        ref = tiny.score(contexts, ["A", "B"])
    finally:
        tiny.min_shared_prefix = 32
    tiny.max_batch_size = 3
    before = tiny.stats.forward_passes
    try:
        got = tiny.score(contexts, ["A", "B"])
    finally:
        tiny.max_batch_size = 64
    assert tiny.stats.forward_passes - before == 1 + 3  # one prefix pass, three batches
    for g, w in zip(got, ref, strict=True):
        assert g == pytest.approx(w, abs=1e-4)


def test_chunked_prefill_changes_nothing(tiny: HFModel) -> None:
    """With a small prefill budget, ``model.generate`` generation (the engine on GPUs) prefills
    the prompts a few rows per pass into its preallocated cache, and scoring runs a few rows per
    pass; both equal one big pass."""
    tiny.engine = "generate"
    prompts = [FEW_SHOT + f"Now the real question number {i}{'?' * i}" for i in range(7)]
    contexts = [p + " The answer is: (" for p in prompts]
    greedy = SamplingParams(max_new_tokens=10)
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, seed=4)
    before = tiny.stats.forward_passes
    ref = (tiny.generate(prompts, greedy), tiny.generate(prompts, sampled),
           tiny.score(contexts, ["A", "B"]))
    ref_passes = tiny.stats.forward_passes - before
    width = max(len(tiny.encode(p)) for p in prompts)
    budget, tiny.max_prefill_tokens = tiny.max_prefill_tokens, 2 * width  # 2 rows per pass
    encoded = [tiny.encode(c) for c in contexts]
    shared = min(_shared_prefix_len(encoded), min(map(len, encoded)) - 1)
    own = max(len(e) for e in encoded) - shared  # scoring budgets the tokens after the prefix
    score_budget, tiny.score_prefill_tokens = tiny.score_prefill_tokens, 2 * own
    before = tiny.stats.forward_passes
    try:
        got = (tiny.generate(prompts, greedy), tiny.generate(prompts, sampled),
               tiny.score(contexts, ["A", "B"]))
    finally:
        tiny.max_prefill_tokens, tiny.engine = budget, "cascade"
        tiny.score_prefill_tokens = score_budget
    passes = tiny.stats.forward_passes - before
    # generation: 4 prefill passes (2 + 2 + 2 + 1 rows) per call, twice; scoring: 3 or 4
    # batches instead of 1 (the contexts are a little longer than the prompts)
    assert passes - ref_passes >= 2 * 4 + 2
    assert got[0] == ref[0] and got[1] == ref[1]
    for g, w in zip(got[2], ref[2], strict=True):
        assert g == pytest.approx(w, abs=1e-4)


def test_bf16_generation_copy_equals_a_bf16_model_and_follows_weight_updates(tiny_model_dir):
    """generate_dtype="bfloat16" on float32 weights generates with a bf16 copy: token for token
    what the model loaded in bf16 generates, scoring stays float32, and the copy follows
    in-place weight updates (PPO's policy between rollouts)."""
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    mixed = HFModel(tiny_model_dir, generate_dtype="bfloat16")
    pure = HFModel(tiny_model_dir, dtype="bfloat16")
    fp32 = HFModel(tiny_model_dir)
    assert next(mixed.model.parameters()).dtype == torch.float32
    before = mixed.generate_with_ids(PROMPTS, params)
    assert before == pure.generate_with_ids(PROMPTS, params)
    assert mixed.stats.generated_tokens > 0  # the copy counts into this model's stats
    assert mixed.score(PROMPTS[:2], ["a", "b"]) == fp32.score(PROMPTS[:2], ["a", "b"])

    with torch.no_grad():  # an optimizer step, in place: the next call must see it
        for p in mixed.model.parameters():
            p.add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=torch.float32)).reshape(p.shape))
    assert mixed.generate_with_ids(PROMPTS, params) != before
    copy = mixed.weights.shadow.model
    for src, dst in zip(mixed.model.parameters(), copy.parameters(), strict=True):
        assert torch.equal(dst, src.to(torch.bfloat16))
    assert copy.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers keep their dtype


def test_a_fused_optimizer_step_is_seen_after_sync_weights(tiny_model_dir):
    """A fused AdamW step (the Trainer's default optimizer, so GRPO's and RLOO's) updates the
    weights without bumping their version counters: the bf16 copy that generates stays stale
    until ``sync_weights`` marks the weights changed (as TRL does for vLLM)."""
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    lm = HFModel(tiny_model_dir, generate_dtype="bfloat16")
    before = lm.generate_with_ids(PROMPTS, params)
    optimizer = torch.optim.AdamW(lm.model.parameters(), lr=0.05, fused=True)
    lm.model.train()
    out = lm.model(torch.tensor([lm.encode(PROMPTS[0])]))
    out.logits.float().logsumexp(-1).mean().backward()
    optimizer.step()
    lm.model.eval()
    assert lm.generate_with_ids(PROMPTS, params) == before  # stale: the counters did not move
    lm.sync_weights()
    after = lm.generate_with_ids(PROMPTS, params)
    assert after != before
    for src, dst in zip(lm.model.parameters(), lm.weights.shadow.model.parameters(), strict=True):
        assert torch.equal(dst, src.detach().to(torch.bfloat16))


def test_load_policy_swaps_the_model_that_generates(tiny_model_dir):
    """A trainer hands over the model to generate from with ``load_policy`` (``model`` cannot be
    assigned): generation then equals a model loaded on those weights, bf16 copy included."""
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    lm = HFModel(tiny_model_dir, generate_dtype="bfloat16")
    before = lm.generate_with_ids(PROMPTS, params)
    policy = copy.deepcopy(lm.model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=torch.float32)).reshape(p.shape))
    with pytest.raises(AttributeError):
        lm.model = policy
    lm.load_policy(policy)
    assert lm.model is policy
    got = lm.generate_with_ids(PROMPTS, params)
    fresh = HFModel(tiny_model_dir, model=copy.deepcopy(policy), generate_dtype="bfloat16")
    assert got == fresh.generate_with_ids(PROMPTS, params) and got != before
    for src, dst in zip(policy.parameters(), lm.weights.shadow.model.parameters(), strict=True):
        assert torch.equal(dst, src.to(torch.bfloat16))
