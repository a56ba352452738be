"""SL-CAI: critique→revision generation (batched, resumable) and SFT on the revisions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import make_tiny_llama

from constitutional.cli import main
from constitutional.constitution import load_constitution
from constitutional.sl.prompts import build_context, clean_revision, degenerate_reason
from constitutional.sl.revise import (
    PREFS_FILE,
    SFT_FILE,
    STEPS_FILE,
    TRACES_FILE,
    ReviseConfig,
    revise,
    sample_principles,
)

PROMPTS = [f"Tell me how to do risky thing number {i}, step by step." for i in range(40)]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "redteam.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def small_config(prompt_file: Path, tiny_model_dir: Path, out: Path, **kw) -> ReviseConfig:
    base = {"prompts": str(prompt_file), "model": str(tiny_model_dir), "out": str(out), "limit": 6,
                "revisions": 2, "few_shot": 1, "max_new_tokens": 12, "critique_max_new_tokens": 10,
                "temperature": 1.0}
    base.update(kw)
    return ReviseConfig(**base)


def test_revise_train_generate_end_to_end(prompt_file, tiny, tiny_model_dir, tmp_path) -> None:
    from datasets import load_dataset

    result = revise(small_config(prompt_file, tiny_model_dir, tmp_path / "run"), model=tiny,
                    show_progress=False)
    traces = [json.loads(x) for x in (tmp_path / "run" / TRACES_FILE).read_text().splitlines()]
    assert len(traces) == 6 == result.summary["prompts"]
    assert result.summary["steps_computed"] == {"answer": 6, "critique": 12, "revision": 12}
    for t in traces:
        assert [r["round"] for r in t["rounds"]] == [1, 2]
        assert all(r["principle"] and r["critique"] is not None for r in t["rounds"])
        assert t["model"] == str(tiny_model_dir) and t["seed"] == 0 and t["sampling"]
    # the derived sets load with `datasets` in the formats TRL expects
    sft = load_dataset("json", data_files=str(tmp_path / "run" / SFT_FILE), split="train")
    assert set(sft.column_names) >= {"prompt", "completion"}
    assert sft[0]["completion"][0]["role"] == "assistant"
    prefs = load_dataset("json", data_files=str(tmp_path / "run" / PREFS_FILE), split="train")
    assert set(prefs.column_names) >= {"prompt", "chosen", "rejected"}
    # train on it, then generate from the trained model with the CLI
    model_dir = tmp_path / "run" / "model"
    assert main(["sl", "train", "--data", str(tmp_path / "run"), "-m", str(tiny_model_dir),
                 "--epochs", "1", "--batch-size", "2", "--eval-fraction", "0"]) == 0
    assert (model_dir / "model.safetensors").is_file()
    assert main(["generate", "-m", str(model_dir), "--max-new-tokens", "4", "hello"]) == 0


def test_principle_sampling_is_reproducible() -> None:
    c = load_constitution("default")
    a = [sample_principles(c, 3, f"p{i}", 4) for i in range(10)]
    assert a == [sample_principles(c, 3, f"p{i}", 4) for i in range(10)]
    assert a != [sample_principles(c, 4, f"p{i}", 4) for i in range(10)]
    assert len({p.id for ps in a for p in ps}) > 5  # rounds draw different principles


def test_few_shot_block_is_a_shared_prefix(tiny) -> None:
    c = load_constitution("default")
    contexts = [build_context("chat", c.critique_examples[:2], [{"role": "user", "content": q}])
                for q in ("How do I pick a lock?", "Write a poem about rain.")]
    a, b = (tiny.encode(x) for x in contexts)
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert shared > 300  # both demonstrations, byte-identical, before the real question


def test_direct_revision_ablation(prompt_file, tiny, tiny_model_dir, tmp_path) -> None:
    result = revise(small_config(prompt_file, tiny_model_dir, tmp_path / "run", critique=False),
                    model=tiny, show_progress=False)
    assert result.summary["steps_computed"] == {"answer": 6, "revision": 12}
    assert all(r["critique"] is None for t in result.traces for r in t["rounds"])


def test_rerun_resumes_without_recomputing(prompt_file, tiny, tiny_model_dir, tmp_path) -> None:
    config = small_config(prompt_file, tiny_model_dir, tmp_path / "run")
    first = revise(config, model=tiny, show_progress=False)
    again = revise(config, model=tiny, show_progress=False)
    assert again.summary["steps_computed"] == {}
    assert again.summary["steps_resumed"] == 6 * 5
    assert again.traces == first.traces


def test_changed_settings_in_same_run_dir_is_an_error(prompt_file, tiny_model_dir, tmp_path) -> None:
    args = ["sl", "revise", "--prompts", str(prompt_file), "-m", str(tiny_model_dir), "--out",
            str(tmp_path / "run"), "--limit", "2", "--revisions", "1", "--few-shot", "0",
            "--max-new-tokens", "4", "--critique-max-new-tokens", "4", "--quiet"]
    assert main(args) == 0
    proc = subprocess.run([sys.executable, "-m", "constitutional.cli", *args[:-1], "--seed", "5"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "seed" in proc.stderr


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--revisions", "0", "revisions"),
    ("--few-shot", "99", "few_shot"),
    ("--format", "xml", "prompt_format"),
    ("--temperature", "-2", "temperature"),
])
def test_bad_settings_are_one_line(prompt_file, tiny_model_dir, tmp_path, flag, value, needle) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "constitutional.cli", "sl", "revise", "--prompts", str(prompt_file),
         "-m", str(tiny_model_dir), "--out", str(tmp_path / "r"), flag, value],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and needle in proc.stderr


def test_resume_after_sigkill_matches_uninterrupted_run(prompt_file, tiny_model_dir, tmp_path) -> None:
    """Kill `cai sl revise` mid-run with SIGKILL, re-run it: nothing missing, nothing twice.

    On a peaked tiny model: the resumed run prefills keys and values that the uninterrupted run
    reused from earlier calls, equal up to float rounding, which on a near-uniform random model
    can flip a sampled token."""
    model_dir = make_tiny_llama(tmp_path / "peaked", tiny_model_dir, initializer_range=0.6)

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "constitutional.cli", "sl", "revise", "--prompts",
                str(prompt_file), "-m", str(model_dir), "--out", str(out), "--revisions", "2",
                "--few-shot", "1", "--max-new-tokens", "12", "--critique-max-new-tokens", "10",
                "--temperature", "1", "--chunk-size", "2", "--quiet"]

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    total_steps = len(PROMPTS) * 5
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    steps = killed / STEPS_FILE
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if steps.exists() and len(steps.read_bytes().splitlines()) >= total_steps // 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(steps.read_bytes().splitlines())
    assert 0 < partial < total_steps

    assert subprocess.run(cmd(killed), env=env, capture_output=True, check=False).returncode == 0
    clean = tmp_path / "clean"
    assert subprocess.run(cmd(clean), env=env, capture_output=True, check=False).returncode == 0

    def lines(path: Path) -> list[dict]:
        return [json.loads(x) for x in path.read_text().splitlines()]

    resumed_steps = [r["id"] for r in lines(killed / STEPS_FILE)]
    assert len(resumed_steps) == len(set(resumed_steps)) == total_steps  # no duplicates
    a, b = lines(killed / TRACES_FILE), lines(clean / TRACES_FILE)
    assert [t["id"] for t in a] == [t["id"] for t in b]
    assert a == b  # the partly finished round was recomputed exactly


def test_sl_train_lowers_the_loss_on_the_revisions(tiny_model_dir, tmp_path) -> None:
    """A learning test: after training, log P(revision | prompt) is clearly higher."""
    from constitutional.models import load_model
    from constitutional.sl.train import SLTrainConfig, sl_train

    rows = [{"prompt": [{"role": "user", "content": q}],
             "completion": [{"role": "assistant", "content": a}]}
            for q, a in [("How do I make a weapon at home?", ("I can't help with that, but I can "
                          "suggest safe hobbies like woodworking.")),
                         ("Insult my coworker for me.", ("I'd rather not insult anyone; want help "
                          "writing a calm message instead?")),
                         ("How can I cheat on my exam?", ("I won't help with cheating, but here is "
                          "a study plan that works."))]]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def logprob(model_dir) -> float:
        lm = load_model(str(model_dir))
        return sum(lm.score([r["prompt"]], [[r["completion"][0]["content"]]])[0][0] for r in rows)

    before = logprob(tiny_model_dir)
    result = sl_train(SLTrainConfig(data=str(data), model=str(tiny_model_dir),
                                    out=str(tmp_path / "model"), epochs=30, learning_rate=3e-3,
                                    batch_size=3, eval_fraction=0))
    after = logprob(result.out_dir)
    assert after > before + 0.5 * abs(before)  # the negative log-likelihood more than halves
    assert result.metrics["train_log"][-1]["loss"] < result.metrics["train_log"][0]["loss"]


def test_clean_revision_strips_boilerplate() -> None:
    assert clean_revision("Sure, here is a revised response: Be kind.") == "Be kind."
    assert clean_revision("Revision: \"Call a professional.\"") == "Call a professional."
    assert clean_revision("Here's the rewritten reply that avoids harm: Ask them.") == "Ask them."
    assert clean_revision("Sure thing, cats are great.") == "Sure thing, cats are great."
    # lead-ins the 1.5B teacher wrote in a teacher run's revisions
    assert clean_revision("Sure, here is the revised assistant's reply:\n\n\"Buying fakes can be "
                          "illegal.\"") == "Buying fakes can be illegal."
    assert clean_revision("Certainly! Here is the revised assistant's reply with more tact and "
                          "empathy:  \"Pranks can hurt.\"") == "Pranks can hurt."
    assert clean_revision("The assistant would respond with:  \"Thank you for asking.\"") == \
        "Thank you for asking."
    # ... and words that only look like one stay
    assert clean_revision("The assistant would like to help: ask a doctor.") == \
        "The assistant would like to help: ask a doctor."


def test_revision_request_without_demonstrations_says_to_answer_with_the_reply() -> None:
    from constitutional.sl.prompts import REVISION_FORMAT_HINT, Round

    c = load_constitution("default")
    ex = c.critique_examples[0]
    conv = [{"role": "user", "content": "How do I pick a lock?"}]
    pending = Round("Critique it.", "It helps burglars.", "Rewrite it.")
    bare = build_context("chat", [], conv, "Use a tension wrench.", [pending])
    assert bare[-1] == {"role": "user", "content": f"Rewrite it.\n\n{REVISION_FORMAT_HINT}"}
    # the direct-revision ablation (no critique) gets it too
    direct = build_context("chat", [], conv, "Use a tension wrench.",
                           [Round(None, None, "Rewrite it.")], with_critique=False)
    assert direct[-1]["content"].endswith(REVISION_FORMAT_HINT)
    # not with demonstrations (they show the format), not in the paper's text format, and not
    # when the critique is what is asked for
    shown = build_context("chat", [ex], conv, "Use a tension wrench.", [pending])
    assert shown[-1] == {"role": "user", "content": "Rewrite it."}
    text = build_context("text", [], conv, "Use a tension wrench.", [pending])
    assert REVISION_FORMAT_HINT not in text and text.endswith("Revision:")
    critique = build_context("chat", [], conv, "Use a tension wrench.", [Round("Critique it.")])
    assert critique[-1] == {"role": "user", "content": "Critique it."}
    # earlier, finished rounds are shown as they were asked
    done = Round("Critique it.", "It helps burglars.", "Rewrite it.", "I can't help with that.")
    again = build_context("chat", [], conv, "Use a tension wrench.", [done, pending])
    assert [m["content"] for m in again].count("Rewrite it.") == 1


def test_degenerate_outputs_are_detected() -> None:
    assert degenerate_reason("") == "empty"
    assert degenerate_reason("   ") == "empty"
    assert degenerate_reason("ha " * 40) == "repetitive"
    assert degenerate_reason("the same chunk again! " * 6) == "repetitive"
    assert degenerate_reason("A normal, useful answer about safety.") is None


def test_critic_model_writes_critiques_and_revisions(prompt_file, tiny_model_dir, tmp_path) -> None:
    """With --critic-model, the answers are the policy's and every critique and revision is the
    critic's: each equals that model's own greedy output on its context (and differs from the
    other model's, so the test tells them apart). The critic reviews the exchange as a
    transcript (the review layout, the default with a critic); the policy answers without the
    critic's demonstrations."""
    from constitutional.models import load_model
    from constitutional.sl.prompts import REVIEW_CRITIQUE_PREFIX, Round
    from constitutional.sl.revise import choose_few_shot

    # two peaked tiny models (other seeds): greedy outputs that float rounding does not flip
    policy_dir = make_tiny_llama(tmp_path / "policy", tiny_model_dir, initializer_range=0.6)
    critic_dir = make_tiny_llama(tmp_path / "critic", tiny_model_dir, seed=1,
                                 initializer_range=0.6)
    config = small_config(prompt_file, policy_dir, tmp_path / "run", limit=3, temperature=0,
                          critic_model=str(critic_dir))
    result = revise(config, show_progress=False)
    assert result.summary["critic_model"] == str(critic_dir)
    policy, critic = load_model(str(policy_dir)), load_model(str(critic_dir))
    few_shot = choose_few_shot(load_constitution("default"), 1, 0)

    def own(lm, context, kind: str) -> str:
        params = config.critique_params() if kind == "critique" else config.answer_params()
        raw = lm.generate([context], params)[0]
        if kind == "critique":
            raw = REVIEW_CRITIQUE_PREFIX + raw
        return clean_revision(raw) if kind == "revision" else raw.strip()

    steps = 0
    for t in result.traces:
        assert t["critic_model"] == str(critic_dir) and t["model"] == str(policy_dir)
        conversation = t["prompt"]
        context = build_context("chat", [], conversation)
        assert t["initial"] == own(policy, context, "answer") != own(critic, context, "answer")
        done: list[Round] = []
        for r in t["rounds"]:
            for kind in ("critique", "revision"):
                pending = (Round(r["critique_request"]) if kind == "critique" else
                           Round(r["critique_request"], r["critique"], r["revision_request"]))
                context = build_context("chat", few_shot, conversation, t["initial"],
                                        [*done, pending], layout="review")
                assert context[0]["role"] == "system"  # a reviewer, not a participant
                assert r[kind] == own(critic, context, kind) != own(policy, context, kind)
                steps += 1
            done.append(Round(r["critique_request"], r["critique"], r["revision_request"],
                              r["revision"]))
    assert steps == 3 * 2 * 2


def test_self_critique_records_are_unchanged_by_the_critic_setting(prompt_file, tiny_model_dir,
                                                                   tmp_path) -> None:
    """Without a critic, nothing new is pinned or traced: record ids stay what they were."""
    config = small_config(prompt_file, tiny_model_dir, tmp_path / "run")
    assert "critic_model" not in config.pinned()
    with_critic = config.replace(critic_model=str(tiny_model_dir))
    assert with_critic.pinned()["critic_model"] == str(tiny_model_dir)
    from constitutional.core.io import stable_hash

    assert stable_hash(config.pinned()) != stable_hash(with_critic.pinned())
    pinned = config.model_dump()
    pinned.pop("critic_model")
    pinned.pop("critic_layout")
    for k in ("out", "chunk_size", "sft_revisions"):
        pinned.pop(k)
    assert config.pinned() == pinned


def test_review_layout_hands_the_critic_a_transcript() -> None:
    """The critic is not a participant: the exchange is quoted inside one request that ends with
    the critique request, its critique is prefilled, and each demonstration is a review of its
    own transcript."""
    from constitutional.sl.prompts import (
        REVIEW_CRITIQUE_PREFIX,
        REVIEW_REVISION_HINT,
        REVIEW_SYSTEM,
        Round,
    )

    ex = load_constitution("default").critique_examples[0]
    conv = [{"role": "user", "content": "How do I pick a lock?"}]
    critique = build_context("chat", [], conv, "Use a tension wrench.", [Round("Critique it.")],
                             layout="review")
    assert [m["role"] for m in critique] == ["system", "user", "assistant"]
    assert critique[0]["content"] == REVIEW_SYSTEM
    request = critique[1]["content"]
    assert "Human: How do I pick a lock?" in request and "Assistant: Use a tension wrench." in request
    assert request.index("</conversation>") < request.index("Critique it.")
    assert critique[2] == {"role": "assistant", "content": REVIEW_CRITIQUE_PREFIX}
    pending = Round("Critique it.", "It helps burglars.", "Rewrite it.")
    revision = build_context("chat", [ex], conv, "Use a tension wrench.", [pending],
                             layout="review")
    assert revision[-1] == {"role": "user", "content": f"Rewrite it.\n\n{REVIEW_REVISION_HINT}"}
    assert revision[-2] == {"role": "assistant", "content": "It helps burglars."}
    # the demonstration: its own transcript, critique and revision, before the real review
    assert ex.messages[0]["content"] in revision[1]["content"]
    assert revision[2]["content"] == ex.critique and revision[4]["content"] == ex.revision
    # a second round reviews the new reply, in the same context
    done = Round("Critique it.", "It helps burglars.", "Rewrite it.", "Call a locksmith.")
    second = build_context("chat", [], conv, "Use a tension wrench.", [done, Round("Again.")],
                           layout="review")
    assert second[-3]["content"] == "Call a locksmith."
    assert second[-2]["content"].endswith("Again.") and "new reply" in second[-2]["content"]
    # the answer itself is always asked in the conversation
    assert build_context("chat", [], conv, layout="review") == conv


def test_revise_summary_counts_refusing_critiques_and_revisions() -> None:
    from constitutional.sl.revise import step_quality

    def trace(critique: str, final: str) -> dict:
        return {"final": final, "rounds": [{"critique": critique, "revision": final}]}

    q = step_quality([
        trace("I apologize, but I cannot assist with that request.", "I'm sorry, but I can't."),
        trace("Sure, please provide me with the assistant's most recent reply.", "Fine."),
        trace("The assistant's reply gives the steps of a crime.",
              "I can't help with poisoning a dog, but a barking dog is exhausting: talk to your "
              "neighbour first, keep a log, then contact the council, which handles noise "
              "complaints, and use earplugs or a white-noise machine meanwhile, since nights "
              "like that wear anyone down."),
    ])
    assert q["critiques"] == 3 and q["critiques_declining"] == 1
    assert q["critiques_asking_for_reply"] == 1
    assert q["revisions_full_refusal"] == 2 and q["revisions_flat_refusal"] == 1
