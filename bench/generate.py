"""Generation throughput: our batched `hf` backend vs a naive one-at-a-time loop vs llama.cpp.

Same built-in model (SmolLM2-135M-Instruct), same 32 chat prompts, 64 new tokens each, greedy.
Prints tokens/s for each and the ratios. Timings are printed, never asserted.

    python bench/generate.py [--prompts 32] [--new-tokens 64] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = [
    "how rainbows form", "why the sky is blue", "how to boil an egg", "what a hash map is",
    "the rules of chess", "how vaccines work", "what inflation means", "how to write a haiku",
    "why cats purr", "how a bicycle stays upright", "what photosynthesis is", "how to tie a tie",
    "the water cycle", "what a prime number is", "how to start running", "what DNA does",
    "how airplanes fly", "why leaves change colour", "how to make bread", "what gravity is",
    "how a compiler works", "the French Revolution", "how to save money", "what a black hole is",
    "how tides work", "what recursion is", "how to learn a language", "why we sleep",
    "how batteries store energy", "what the internet is", "how to plant tomatoes", "what a volcano is",
]


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} in a short paragraph."}]
            for i in range(n)]


def bench_hf_batched(model, chats, new_tokens: int) -> tuple[int, float]:
    from constitutional.models import SamplingParams

    before = model.stats.generated_tokens
    t0 = time.perf_counter()
    model.generate(chats, SamplingParams(max_new_tokens=new_tokens))
    return model.stats.generated_tokens - before, time.perf_counter() - t0


def bench_naive_loop(model, chats, new_tokens: int) -> tuple[int, float]:
    """What peer scripts do: tokenize one prompt, call model.generate, decode, next prompt."""
    tok, hf = model.tokenizer, model.model
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for chat in chats:
            ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
            out = hf.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)
            new = out[0, ids["input_ids"].shape[1]:].tolist()
            tokens += next((i for i, t in enumerate(new) if t in model.eos_ids), len(new))
            tok.decode(new, skip_special_tokens=True)
    return tokens, time.perf_counter() - t0


def bench_llama_cpp(chats, new_tokens: int, threads: int) -> tuple[int, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from constitutional.models.builtin import gguf_path

    llm = Llama(model_path=str(gguf_path("smollm2-135m-instruct")), n_ctx=2048, n_threads=threads,
                n_batch=512, verbose=False)
    tokens = 0
    t0 = time.perf_counter()
    for chat in chats:
        out = llm.create_chat_completion(messages=chat, max_tokens=new_tokens, temperature=0.0)
        tokens += out["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    from constitutional.models import load_model

    threads = torch.get_num_threads()
    print(f"model: builtin:smollm2-135m-instruct · {args.prompts} chat prompts · "
          f"{args.new_tokens} new tokens · greedy · dtype {args.dtype}")
    print(f"machine: {platform.processor() or platform.machine()} · torch {torch.__version__} · "
          f"{threads} threads\n")
    model = load_model("builtin:smollm2-135m-instruct", dtype=args.dtype)
    chats = prompts(args.prompts)
    bench_hf_batched(model, chats[:2], 4)  # warm-up

    rows = []
    n, s = bench_hf_batched(model, chats, args.new_tokens)
    rows.append(("hf batched (ours)", n, s))
    n, s = bench_naive_loop(model, chats, args.new_tokens)
    rows.append(("naive loop, one prompt at a time", n, s))
    llama = bench_llama_cpp(chats, args.new_tokens, threads)
    if llama:
        rows.append((f"llama.cpp (llama-cpp-python, Q4_1 GGUF, {threads} threads)", *llama))

    print(f"{'engine':<58}{'tokens':>8}{'seconds':>10}{'tok/s':>10}")
    for name, n, s in rows:
        print(f"{name:<58}{n:>8}{s:>10.2f}{n / s:>10.1f}")
    ours = rows[0][1] / rows[0][2]
    print(f"\nratio ours / naive loop: {ours / (rows[1][1] / rows[1][2]):.2f}x  (goal >= 5x)")
    if llama:
        print(f"ratio ours / llama.cpp:  {ours / (rows[2][1] / rows[2][2]):.2f}x  (goal >= 1x)")
    else:
        print("llama.cpp: llama-cpp-python not installed (make install-test builds it)")


if __name__ == "__main__":
    main()
