"""Peak memory of one PPO step with a 152k vocabulary: full-vocabulary log-probabilities (before)
against chunked ones (now), side by side.

A PPO step needs, for every sampled answer token, its log-probability under the policy (twice:
in the rollout and, with gradients, in the update), under the reference, and the entropy of
each answer position. Until 2026-12 ``answer_logprobs`` computed them from the full [B, R, V]
float32 logits, their ``log_softmax`` and its exponent; with Qwen's 151,936-token vocabulary
that is ~10 GB per tensor for 64 answers of 256 tokens, which is what kept a 7B policy off one
80 GB GPU. Now the LM head maps ``LOGPROB_CHUNK_LOGITS // V`` positions at a time and, under autograd,
recomputes each chunk in the backward pass (``rl/ppo/experience.answer_logprobs``).

The two sides run the same PPO step (``PPOTrainer``, one step: generate, score with the PM,
log-probabilities, values, GAE, ``ppo_epochs`` passes of the update) on the same tiny random
Llama whose vocabulary has Qwen2.5's 151,936 entries (hidden size 64, 2 layers: the vocabulary
dominates, as it does for the logits of a 7B model), the same prompts, seed and settings. The
only difference is the log-probability function: "before" is the old one, verbatim, patched in.
Each side runs in a fresh child process; the figure is the peak resident memory (ru_maxrss)
during the step above the resident memory once the models are loaded. The tokenizer is the
built-in SmolLM2's (49,152 entries: the sampled ids above it decode to nothing useful, which
changes no tensor shape); ``--tokenizer DIR`` takes another (e.g. the teacher's, 151,936).

    python bench/ppo_memory.py [--batch 16] [--minibatch 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 151_936  # Qwen2.5's


def old_answer_logprobs(model, ids, mask, positions, Q: int, *, with_entropy: bool = False,
                        chunk: int = 0):
    """``answer_logprobs`` as of a37fd54: full-vocabulary float32 logits and log-softmax."""
    import torch

    R = ids.shape[1] - Q
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=R + 1).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, ids[:, Q:, None]).squeeze(-1)
    if not with_entropy:
        return chosen, None
    entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


def make_models(root: Path, tokenizer_dir: str) -> tuple[Path, Path]:
    """A tiny random Llama policy and a PM (one-label classifier) with a 151,936-token vocab."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    policy, pm = root / "policy", root / "pm"
    LlamaForCausalLM(cfg).save_pretrained(policy)
    tok.save_pretrained(policy)
    cfg.num_labels = 1
    LlamaForSequenceClassification(cfg).save_pretrained(pm)
    tok.save_pretrained(pm)
    return policy, pm


def child(args: argparse.Namespace) -> None:
    """One side: load, then one PPO step; print its peak memory above the loaded baseline."""
    import torch

    from constitutional.rl.ppo import experience, trainer
    from constitutional.rl.ppo.config import PPOConfig

    torch.set_num_threads(os.cpu_count() or 1)
    if args.chunk:
        experience.LOGPROB_CHUNK_LOGITS = args.chunk * VOCAB
    if args.side == "before":
        experience.answer_logprobs = old_answer_logprobs
        trainer.answer_logprobs = old_answer_logprobs
    prompts = [[{"role": "user", "content": f"Question {i}: how do I bake bread?"}]
               for i in range(args.batch)]
    config = PPOConfig(policy=args.policy, pm=args.pm, out=args.out, prompts="unused",
                       steps=1,
                       rollout_batch=args.batch, minibatch=args.minibatch,
                       max_new_tokens=args.max_new_tokens, save_steps=100, seed=0)
    t = trainer.PPOTrainer(config, prompts=prompts)
    base = _rss_now()
    result = t.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = result.log[0]
    print(json.dumps({"side": args.side, "base": base, "peak": peak,
                      "response_len": row["response_len"], "reward_mean": row["reward_mean"],
                      "seconds": result.seconds}))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chunk", type=int, default=None,
                   help="answer positions per chunk (default: experience.LOGPROB_CHUNK_LOGITS // vocab)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: built-in)")
    p.add_argument("--side", choices=["before", "now"], help=argparse.SUPPRESS)
    p.add_argument("--policy", help=argparse.SUPPRESS)
    p.add_argument("--pm", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return child(args)

    from constitutional.models.builtin import ensure_checkpoint
    from constitutional.rl.ppo.experience import LOGPROB_CHUNK_LOGITS

    tokenizer = args.tokenizer or str(ensure_checkpoint("smollm2-135m-instruct"))
    with tempfile.TemporaryDirectory() as tmp:
        policy, pm = make_models(Path(tmp), tokenizer)
        rows = {}
        for side in ("before", "now"):
            cmd = [sys.executable, __file__, "--side", side, "--policy", str(policy),
                   "--pm", str(pm), "--out", str(Path(tmp) / side), "--batch", str(args.batch),
                   "--minibatch", str(args.minibatch), "--max-new-tokens",
                   str(args.max_new_tokens), *(["--chunk", str(args.chunk)] if args.chunk else [])]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"the {side} side failed:\n{proc.stderr[-3000:]}")
            out = proc.stdout
            rows[side] = json.loads(out.strip().splitlines()[-1])
    gib = 2**30
    print(f"One PPO step on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs: a tiny Llama (hidden 64, 2 layers) with a {VOCAB:,}-token "
          f"vocabulary, {args.batch} answers of {args.max_new_tokens} new tokens, minibatch "
          f"{args.minibatch}, 2 PPO epochs, {args.chunk or LOGPROB_CHUNK_LOGITS // VOCAB} answer positions per "
          f"log-probability chunk; the tokenizer of {tokenizer}")
    print(f"{'side':<8} {'answer len':>10} {'loaded':>9} {'peak':>9} {'step peak above loaded':>24}"
          f" {'seconds':>8}")
    for side, r in rows.items():
        print(f"{side:<8} {r['response_len']:>10.1f} {r['base'] / gib:>8.2f}G "
              f"{r['peak'] / gib:>8.2f}G {(r['peak'] - r['base']) / gib:>23.2f}G "
              f"{r['seconds']:>8.1f}")
    before = rows["before"]["peak"] - rows["before"]["base"]
    now = rows["now"]["peak"] - rows["now"]["base"]
    print(f"ratio (before / now) of the step's peak above the loaded models: "
          f"{before / max(now, 1):.1f}x")


if __name__ == "__main__":
    main()
