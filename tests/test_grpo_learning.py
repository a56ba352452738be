"""GRPO and RLOO (TRL's trainers, driven by ``grpo_train``) learn the two built-in rewards on a
tiny policy: a preference model trained by ``cai rl pm``'s code, and the constitution as a live
judge (a feedback model asked ``rl label``'s question against the starting policy's greedy
answer).

Both rewards are real models that prefer one kind of answer, trained here on the tiny policy's
own answers (on-policy), so that they score the distribution they will be asked about:

* the PM prefers answers with more of the policy's most likely first token (the PM word); it is
  trained with :func:`~constitutional.rl.preference.pm_train` on pairs labelled by that count,
  pairs with equal counts labelled 0.5, so it learns to ignore everything else;
* the judge is a tiny random-init Llama finetuned to answer the feedback question (built by our
  own :class:`~constitutional.rl.feedback.FeedbackScorer`, no demonstrations) with the letter of
  the option that contains the judge word (a token the policy samples often but its greedy
  answers never contain, so the reference does not have it), and 50/50 when neither or both do.

Then GRPO and RLOO must raise the reward clearly, with the KL to the starting policy bounded;
the word's count is logged beside the reward (weight 0), and must rise too: the policy learns
what the reward prefers, not the reward's noise.

Measured before: a tiny PM trained to prefer one token on answers that were not the policy's
kept random preferences larger than that token's effect (score sd 3.6 over answers without the
token, +2.1 to +3.2 for adding it), and 24 GRPO steps did not raise its score beyond the noise.
Trained on-policy with 0.5 labels for equal pairs, the PM here scores held-out answers without
the word -4.30 ± 0.02 and with it 3.65.

About 2.5 minutes on two cores (the answers and the PM 20 s, the judge 19 s, each of the four
runs 22-32 s), 5-7 minutes when the cores are shared with another test run: marked slow.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpo_rewards
import pytest
import torch
from tiny_models import make_tiny_llama

from constitutional.rl.grpo import GRPOConfig, grpo_train

pytestmark = pytest.mark.slow

# prompts of one shape, so that the tiny policy has a similar first-token distribution on each
PROMPTS = [[{"role": "user", "content": f"Say something about item {i}"}] for i in range(10)]
# the policy's seed: its first-token distribution has a token that is not its greedy choice
# and is still sampled often (15% of the answers; seed 0's best such token, in 7%, was learnt
# too slowly by GRPO against the judge: its count went from 0.12 to 0.25 in 16 steps at lr 1e-4)
POLICY_SEED = 2
NEW_TOKENS = 16
SAMPLES = 24  # on-policy answers per prompt to train the PM and the judge on
HELD_OUT = 16  # answers per prompt to check them on
WORD_COUNT = "grpo_rewards:word_count"


@dataclass
class Answers:
    """The tiny policy, its sampled answers (per prompt), its greedy answers (the judge's
    references) and the two words."""

    policy: Path
    train: list[list[str]]
    held: list[list[str]]
    references: list[str]
    pm_word: str
    judge_word: str


@pytest.fixture(scope="module")
def answers(tmp_path_factory, builtin_dir) -> Answers:
    from constitutional.models import SamplingParams, load_model
    from constitutional.rl.rewards import prompt_key, reference_answers

    root = tmp_path_factory.mktemp("grpo_learning")
    policy = make_tiny_llama(root / "policy", builtin_dir, initializer_range=0.6,
                             seed=POLICY_SEED)
    lm = load_model(str(policy))
    train = lm.generate_with_ids(PROMPTS, SamplingParams(temperature=1.0, seed=1, n=SAMPLES,
                                                         max_new_tokens=NEW_TOKENS))
    held = lm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=2, n=HELD_OUT,
                                               max_new_tokens=NEW_TOKENS))
    # the references exactly as grpo_train makes them (greedy, the same seed)
    refs = reference_answers(str(policy), PROMPTS, NEW_TOKENS, root / "references.jsonl")
    references = [refs[prompt_key(p)] for p in PROMPTS]
    with torch.no_grad():
        first = lm.model(torch.tensor([lm.encode(PROMPTS[0])])).logits[0, -1].softmax(-1)
    pm_word = lm.tokenizer.decode([int(first.argmax())])
    # the judge word: the token in most sampled answers that no reference contains
    seen = Counter(t for _, ids in train for t in set(ids))
    words = (lm.tokenizer.decode([t]) for t, _ in seen.most_common())
    judge_word = next(w for w in words if w.strip() and not any(w in r for r in references))
    texts = [text for text, _ in train]
    print(f"PM word {pm_word!r} in {share(pm_word, texts):.0%} of the sampled answers, "
          f"judge word {judge_word!r} in {share(judge_word, texts):.0%}")
    return Answers(policy, [texts[i * SAMPLES:(i + 1) * SAMPLES] for i in range(len(PROMPTS))],
                   [held[i * HELD_OUT:(i + 1) * HELD_OUT] for i in range(len(PROMPTS))],
                   references, pm_word, judge_word)


def share(word: str, texts: list[str]) -> float:
    return sum(word in t for t in texts) / len(texts)


# ------------------------------------------------------------------------------------------------
# the preference model


@dataclass
class TrainedPM:
    path: Path
    heldout_accuracy: float  # pm_train's own held-out pairs
    with_word: float  # mean score of held-out answers with the word
    without_word: float  # ... without it
    sd_without: float  # sd of the scores of held-out answers without the word


@pytest.fixture(scope="module")
def pm(answers, tmp_path_factory, builtin_dir) -> TrainedPM:
    """A tiny PM trained by ``pm_train`` on pairs of the policy's own answers to the same
    prompt: the answer with more of the PM word preferred (p = 1), equal counts p = 0.5 (as many
    as the decided pairs)."""
    from constitutional.rl.preference import PMConfig, load_pm, pm_train

    root = tmp_path_factory.mktemp("pm")
    word = answers.pm_word
    rng = random.Random(0)
    rows = []
    for prompt, group in zip(PROMPTS, answers.train, strict=True):
        decided, equal = [], []
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                if a.count(word) == b.count(word):
                    equal.append((a, b, 0.5))
                else:
                    decided.append((a, b, 1.0) if a.count(word) > b.count(word) else (b, a, 1.0))
        rng.shuffle(equal)
        rows += [{"prompt": prompt, "chosen": a, "rejected": b, "score": p}
                 for a, b, p in decided + equal[:len(decided)]]
    labels = root / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = make_tiny_llama(root / "base", builtin_dir, seed=1)
    t0 = time.perf_counter()
    result = pm_train(PMConfig(labels=str(labels), model=str(base), out=str(root / "pm"),
                               epochs=3, learning_rate=2e-3, batch_size=32, max_length=128,
                               save_steps=10_000))
    scorer = load_pm(str(root / "pm"))
    prompts = [p for p, g in zip(PROMPTS, answers.held, strict=True) for _ in g]
    held = [a for g in answers.held for a in g]
    scores = scorer.score_answers(prompts, held)
    with_word = [s for s, a in zip(scores, held, strict=True) if word in a]
    without = [s for s, a in zip(scores, held, strict=True) if word not in a]
    trained = TrainedPM(root / "pm", result.metrics["eval_accuracy"], statistics.mean(with_word),
                        statistics.mean(without), statistics.pstdev(without))
    print(f"PM word {word!r}: {len(rows)} pairs, held-out accuracy "
          f"{result.metrics['eval_accuracy_before']} → {trained.heldout_accuracy}; held-out "
          f"answers: with the word {trained.with_word:.2f} ({len(with_word)}), without "
          f"{trained.without_word:.2f} ± {trained.sd_without:.2f} ({len(without)}); "
          f"{result.metrics['steps']} steps, {time.perf_counter() - t0:.0f} s")
    return trained


# ------------------------------------------------------------------------------------------------
# the judge


@dataclass
class TrainedJudge:
    path: Path
    with_word: float  # mean judge reward of held-out answers with the word
    without_word: float  # ... without it
    sd_without: float


def judge_label(path: Path):
    from constitutional.rl.label import LabelConfig

    # no demonstrations: the judge was trained on exactly the question it is asked
    return LabelConfig(feedback_model=str(path), few_shot=0, seed=0)


@pytest.fixture(scope="module")
def judge(answers, tmp_path_factory, builtin_dir) -> TrainedJudge:
    """A tiny random-init Llama finetuned to answer the feedback question with the letter of the
    option that has the judge word (50/50 when neither has it).

    The questions are our own (``FeedbackScorer.questions``, a principle drawn from the default
    constitution, both orders), about the policy's answers against another of its answers or the
    reference. The loop is a plain torch loop on the two letters' logits after the answer prefix:
    exactly what the judge reads, with the 50/50 target as a soft label; 300 steps take 16 s.
    ``cai sl train`` (TRL's SFTTrainer, rows ``The answer is: (A)``, which tokenise exactly as
    the judge's prompt plus the letter) computes the logits of the whole 49k vocabulary at every
    position of these ~140-token questions: 10 s a step on two cores (15 steps in 157 s), so the
    same 300 steps would take 50 minutes."""
    from transformers import AutoModelForCausalLM

    from constitutional.models import load_model
    from constitutional.rl import prompts as P
    from constitutional.rl.feedback import FeedbackScorer
    from constitutional.rl.label import resolve_constitution
    from constitutional.rl.rewards import JudgeReward, prompt_key

    root = tmp_path_factory.mktemp("judge")
    word = answers.judge_word
    base = make_tiny_llama(root / "judge", builtin_dir, seed=2, initializer_range=0.02)
    lm = load_model(str(base))
    label = judge_label(base)
    constitution = resolve_constitution(label)
    scorer = FeedbackScorer(lm, label.prompt_format)
    rng = random.Random(0)

    def question_rows(n: int) -> list[tuple[list[int], float]]:
        """``n`` comparisons, each in both orders: (token ids, P(option A is preferred))."""
        rows = []
        for _ in range(n):
            i = rng.randrange(len(PROMPTS))
            group = answers.train[i]
            has = [a for a in group if word in a]
            lacks = [a for a in group if word not in a]
            other = answers.references[i] if rng.random() < 0.5 else rng.choice(lacks)
            a, p = (rng.choice(has), 1.0) if has and rng.random() < 0.5 else (rng.choice(lacks),
                                                                              0.5)
            if rng.random() < 0.5:
                a, other, p = other, a, 1 - p
            principle = constitution.sample_feedback(rng, 1)[0]
            for q in scorer.questions(0, 0, PROMPTS[i], principle.text, a, other):
                ids = lm.encode(P.answer_prompt([], q.text, scorer.mode))
                rows.append((ids, p if q.order == "ab" else 1 - p))
        return rows

    rows = question_rows(1200)
    context = P.answer_prompt([], "?", scorer.mode)
    letters = []
    for letter in P.LETTERS:  # the letters' token ids as the score verb reads them
        full = lm.tokenizer(lm.render(context) + letter, add_special_tokens=False)["input_ids"]
        assert full[:-1] == lm.encode(context)
        letters.append(full[-1])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    pad = lm.tokenizer.pad_token_id
    order: list[int] = []
    t0 = time.perf_counter()
    for step in range(300):
        if not order:
            order = list(range(len(rows)))
            rng.shuffle(order)
        batch, order = [rows[i] for i in order[:16]], order[16:]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (seq, _) in enumerate(batch):  # left-padded: every question ends at the end
            ids[r, width - len(seq):] = torch.tensor(seq)
            mask[r, width - len(seq):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = model.model(input_ids=ids, attention_mask=mask,
                             position_ids=positions).last_hidden_state[:, -1]
        logp = model.lm_head(hidden)[:, letters].log_softmax(-1)
        p = torch.tensor([q for _, q in batch])
        loss = -(p * logp[:, 0] + (1 - p) * logp[:, 1]).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    seconds = time.perf_counter() - t0
    out = root / "trained"
    model.save_pretrained(out, safe_serialization=True)
    lm.tokenizer.save_pretrained(out)
    # the judge as grpo_train builds it, on held-out answers against the references
    refs = {prompt_key(p): r for p, r in zip(PROMPTS, answers.references, strict=True)}
    reward = JudgeReward(load_model(str(out)), judge_label(out), refs)
    prompts = [p for p, g in zip(PROMPTS, answers.held, strict=True) for _ in g]
    held = [a for g in answers.held for a in g]
    got = reward.score_answers(prompts, held)
    with_word = [g for g, a in zip(got, held, strict=True) if word in a]
    without = [g for g, a in zip(got, held, strict=True) if word not in a]
    trained = TrainedJudge(out, statistics.mean(with_word), statistics.mean(without),
                           statistics.pstdev(without))
    print(f"judge word {word!r} ({len(rows)} questions, 300 steps, {seconds:.0f} s, last loss "
          f"{loss.item():.3f}): held-out answers against the "
          f"reference: with the word {trained.with_word:.3f} ({len(with_word)}), without "
          f"{trained.without_word:.3f} ± {trained.sd_without:.4f} ({len(without)})")
    return trained


# ------------------------------------------------------------------------------------------------
# the tests


def config(answers: Answers, out: Path, **kw) -> GRPOConfig:
    base = {"policy": str(answers.policy), "prompts": "unused", "out": str(out), "steps": 12,
            "prompts_per_step": 4, "group_size": 4, "learning_rate": 3e-4,
            "max_new_tokens": NEW_TOKENS, "beta": 0.01, "save_steps": 100, "seed": 0}
    base.update(kw)
    return GRPOConfig(**base)


def means(log: list[dict], key: str) -> tuple[float, float]:
    """The mean of the first 3 steps and of the last 4."""
    values = [r[key] for r in log]
    return sum(values[:3]) / 3, sum(values[-4:]) / 4


def report(algo: str, log: list[dict], key: str) -> tuple[float, float, float, float, float]:
    early, late = means(log, key)
    w_early, w_late = means(log, "reward/word_count")
    kl = max(r["kl"] for r in log)
    print(f"{algo} {key}: {early:.3f} → {late:.3f} {[round(r[key], 3) for r in log]}; word "
          f"count {w_early:.2f} → {w_late:.2f}; KL max {kl:.3f}")
    return early, late, w_early, w_late, kl


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_the_pm_reward_is_learned_with_bounded_kl(answers, pm, tmp_path, algo):
    """Measured (seed 0, 12 steps of 4 prompts × 4 answers, lr 3e-4): the PM's reward rises
    from -2.49 (first 3 steps) to 2.93 (last 4) with GRPO and from -2.31 to 2.93 with RLOO (the
    PM separates the word by 7.95); the word's count goes 0.23 → 1.00 and 0.27 → 1.06; KL at most
    0.18 and 0.26. At lr 1e-4 the rise was 3.3 and 3.2."""
    assert pm.heldout_accuracy > 0.9
    assert pm.with_word - pm.without_word > 3 * pm.sd_without
    grpo_rewards.WORD["value"] = answers.pm_word
    result = grpo_train(config(answers, tmp_path / "run", algo=algo, pm=str(pm.path),
                               reward=f"pm=1,{WORD_COUNT}=0"), prompts=PROMPTS * 2)
    early, late, w_early, w_late, kl = report(algo, result.log, "reward/pm")
    assert [r["step"] for r in result.log] == list(range(1, 13))
    assert late > early + 0.4 * (pm.with_word - pm.without_word)
    assert w_late > w_early + 0.3
    assert kl < 1


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_the_judge_reward_is_learned_with_bounded_kl(answers, judge, tmp_path, algo):
    """Measured (seed 0, 12 steps of 4 prompts × 4 answers, lr 3e-4): the judge's reward, P(the
    answer is preferred over the greedy reference), rises from 0.604 (first 3 steps) to 0.844
    (last 4) with GRPO and from 0.625 to 0.909 with RLOO; the word's count goes 0.21 → 0.70 and
    0.25 → 0.81; KL at most 0.24 and 0.47. The judge on held-out answers: 0.991 with the word,
    0.504 ± 0.043 without (one answer at 0.999, the others within 0.03 of 0.5).

    At lr 1e-4 it rose by only 0.04 (GRPO) and 0.10 (RLOO): the reward moves within [0.5, 1],
    RLOO's advantages are not normalised, and GRPO's per-group scaling turns the judge's
    near-0.5 noise in groups without the word into full-size advantages."""
    assert judge.with_word > 0.9 and abs(judge.without_word - 0.5) < 0.05
    grpo_rewards.WORD["value"] = answers.judge_word
    result = grpo_train(config(answers, tmp_path / "run", algo=algo,
                               feedback_model=str(judge.path),
                               reward=f"judge=1,{WORD_COUNT}=0"),
                        label=judge_label(judge.path), prompts=PROMPTS * 2)
    early, late, w_early, w_late, kl = report(algo, result.log, "reward/judge")
    refs = [json.loads(x)["answer"] for x in
            (tmp_path / "run" / "references.jsonl").read_text().splitlines()]
    assert sorted(refs) == sorted(answers.references)  # the judge's references: greedy answers
    assert late > early + 0.15
    assert w_late > w_early + 0.3
    assert kl < 1
