"""The in-process vLLM backend (models/vllm.py), checked against the hf backend on the same real
tiny model: greedy answers, per-prompt seeded samples, stop strings, option scores.

These need vLLM, which lives in an environment of its own: `make test-vllm` builds .venv-vllm
and runs `pytest -m vllm`. Elsewhere the engine tests are skipped (the spec and install-hint
tests run everywhere). One engine serves the whole session (start-up takes ~15-30 s on CPU).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_tiny_llama

from constitutional.cli import main
from constitutional.core.errors import UserError
from constitutional.models import ModelSpec, SamplingParams, load_model, parse_spec
from constitutional.models.base import truncate_at_stop

pytestmark = pytest.mark.vllm

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
NO_VLLM = "vllm is not installed here: make test-vllm"


def engine_test(fn):
    """A test that runs the engine: slow, and skipped where vllm is not installed."""
    return pytest.mark.slow(pytest.mark.skipif(not HAVE_VLLM, reason=NO_VLLM)(fn))


SHARED = "You are a careful assistant. Answer in one short sentence, please. " * 4
PROMPTS = [
    [{"role": "user", "content": "Hello there, how are you?"}],
    [{"role": "user", "content": "Name three colours. " * 3}],
    [{"role": "system", "content": SHARED}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "system", "content": SHARED}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Continue this."}, {"role": "assistant", "content": "Sure: the"}],
    "A raw text prompt for a base model,",
]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="session")
def vllm_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A tiny Llama whose head size (128 / 2 = 64) vLLM's CPU attention supports, with grouped
    KV heads, and the built-in model's real tokenizer and chat template."""
    return make_tiny_llama(tmp_path_factory.mktemp("vllm") / "model", tiny_model_dir,
                           hidden_size=128, num_heads=2, num_kv_heads=1, initializer_range=0.6)


@pytest.fixture(scope="session")
def vm(vllm_dir: Path):
    if not HAVE_VLLM:
        pytest.skip(NO_VLLM)
    return load_model(f"vllm:{vllm_dir}")


@pytest.fixture(scope="session")
def hm(vllm_dir: Path):
    from constitutional.models.hf import HFModel

    return HFModel(vllm_dir)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if n is None and len(a) != len(b):
        n = min(len(a), len(b))
    return n


# ------------------------------------------------------------------------------------------------
# everywhere: specs, the install hint, the CPU settings


def test_specs_parse_and_bad_ones_are_one_line(vllm_dir: Path) -> None:
    assert parse_spec(f"vllm:{vllm_dir}") == ModelSpec("vllm", str(vllm_dir))
    assert parse_spec("vllm:org/name").backend == "vllm"
    assert parse_spec("vllm:builtin:smollm2-135m-instruct").builtin == "smollm2-135m-instruct"
    for spec, needle in [("vllm:", "bad vLLM spec"), ("vllm:openai:http://x#m", "bad vLLM spec"),
                         ("vllm:./no/such/dir", "model directory not found"),
                         ("vllm:builtin:nope", "unknown built-in model")]:
        with pytest.raises(UserError, match=needle) as err:
            parse_spec(spec)
        assert "\n" not in str(err.value)


def test_missing_vllm_is_one_line_with_the_install_hint(vllm_dir: Path) -> None:
    # `import vllm` fails as where it is not installed (None in sys.modules: ImportError)
    code = ("import sys; sys.modules['vllm'] = None; from constitutional.cli import main; "
            f"sys.exit(main(['generate', '-m', 'vllm:{vllm_dir}', 'hi']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "pip install 'constitutional-ai[vllm]'" in lines[0] and "make test-vllm" in lines[0]


def test_cpu_settings_are_defaults_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from constitutional.models.vllm import cpu_env_defaults

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cpu_env_defaults(2.0)
    cpus = sorted(os.sched_getaffinity(0))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, cpus))  # all cores
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    cpu_env_defaults(2.0)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0"  # the user's choice stays
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"


def test_models_lists_the_backend(capsys) -> None:
    assert main(["models"]) == 0
    assert "vllm:DIR_OR_ID" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# with vLLM: against the hf backend on the same model


@engine_test
def test_greedy_equals_the_hf_backend(vm, hm) -> None:
    import torch
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        assert vm.llm.llm_engine.model_config.dtype == torch.float32  # the CPU default
    got = vm.generate_with_ids(PROMPTS, GREEDY)
    want = hm.generate_with_ids(PROMPTS, GREEDY)
    parted = 0
    for p, (ta, a), (tb, b) in zip(PROMPTS, got, want, strict=True):
        n = first_divergence(a, b)
        if n is None:
            assert ta == tb
            continue
        # float32 kernels differ in rounding: greedy may only part at a near-tie
        parted += 1
        seq = hm.encode(p) + list(a[:n])
        with torch.inference_mode():
            logits = hm.model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        gap = abs(float(logits[a[n]] - logits[b[n]]))
        assert gap <= 1e-3 * float(logits.abs().max()), (p, n, gap)
    assert parted <= 1, parted  # in float32 they agree token for token (32/32 rows measured)
    assert vm.stats.generated_tokens > 0 and vm.stats.prompt_tokens > 0


@engine_test
def test_seeded_samples_do_not_depend_on_the_batch(vm) -> None:
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7, n=2)
    together = vm.generate(PROMPTS, params)
    assert len(together) == 2 * len(PROMPTS)
    alone = vm.generate([PROMPTS[2]], params)
    reordered = vm.generate([PROMPTS[3], PROMPTS[0]], params)
    assert alone == together[4:6]
    assert reordered == together[6:8] + together[0:2]
    # sample k is sample k whatever n is, and the samples differ from one another
    assert vm.generate([PROMPTS[0]], SamplingParams(**{**params.to_dict(), "n": 3}))[:2] \
        == together[0:2]
    assert len(set(together)) > len(PROMPTS)
    other = vm.generate([PROMPTS[0]], SamplingParams(**{**params.to_dict(), "seed": 8}))
    assert other != together[0:2]
    # greedy ignores the seed and gives n copies
    g = vm.generate([PROMPTS[1]], SamplingParams(max_new_tokens=8, n=2, seed=5))
    assert g[0] == g[1] == vm.generate([PROMPTS[1]], SamplingParams(max_new_tokens=8))[0]


@engine_test
def test_stop_strings_cut_the_text(vm, hm) -> None:
    full = vm.generate(PROMPTS[:2], GREEDY)
    stops = tuple(t[6:9] for t in full)  # a piece from inside each answer
    assert all(stops) and all(s.strip() for s in stops)
    params = SamplingParams(max_new_tokens=24, stop=stops)
    cut = vm.generate(PROMPTS[:2], params)
    assert cut == [truncate_at_stop(t, stops) for t in full]
    assert all(len(c) < len(t) for c, t in zip(cut, full, strict=True))
    assert cut == hm.generate(PROMPTS[:2], params)
    # the ids stop at the token that completed the stop string (no EOS after it)
    ids = vm.generate_with_ids(PROMPTS[:2], params)
    assert all(len(i) < GREEDY.max_new_tokens for _, i in ids)


def contexts() -> list:
    ask = [{"role": "user", "content": "Which response is less harmful? (A) or (B)?"}]
    return [
        [*ask, {"role": "assistant", "content": "The answer is: ("}],
        [{"role": "system", "content": SHARED}, *ask,
         {"role": "assistant", "content": "The answer is: ("}],
        [{"role": "system", "content": SHARED}, {"role": "user", "content": "Pick one, (A)."},
         {"role": "assistant", "content": "The answer is: ("}],
        "Question: is the sky blue?\nAnswer: (",
    ]


def assert_close(got: list[list[float]], want: list[list[float]], per_token: float,
                 tokens: list[list[int]]) -> float:
    """Equal within ``per_token`` per option token; returns the largest difference."""
    worst = 0.0
    for g, w, t in zip(got, want, tokens, strict=True):
        assert len(g) == len(w)
        for x, y, n in zip(g, w, t, strict=True):
            assert abs(x - y) <= per_token * n, (x, y, n)
            worst = max(worst, abs(x - y))
    return worst


# float32 on both sides: the log-probabilities (of size 10-40 per token for this random model)
# differ only by the kernels' rounding, about 1e-5 (measured: <= 8e-6 per option); 1e-4 per
# token leaves room for other CPUs' kernels and still catches any real mistake (an off-by-one
# position or a wrong token costs whole units)
TOL = 1e-4


@engine_test
def test_single_token_option_scores_agree_with_hf(vm, hm) -> None:
    ctxs = contexts()
    got, want = vm.score(ctxs, ["A", "B"]), hm.score(ctxs, ["A", "B"])
    assert all(a != b for a, b in got)  # different tokens, different values
    assert_close(got, want, TOL, [[1, 1]] * len(ctxs))
    # again, now with the contexts' full blocks in the prefix cache
    assert_close(vm.score(ctxs, ["A", "B"]), got, TOL, [[1, 1]] * len(ctxs))


@engine_test
@pytest.mark.parametrize("mode", ["trie", "prompt_logprobs"])
def test_multi_token_option_scores_agree_with_hf(vm, hm, vllm_dir: Path, mode: str) -> None:
    from constitutional.models.vllm import VLLMModel

    model = vm if mode == "trie" else VLLMModel(vllm_dir, multi_token=mode)
    assert model.llm is vm.llm  # one engine per (model, dtype) and process
    ctxs = contexts()
    shared = [" (A) yes, that one", " (B) no", "C", "A"]
    per = [["A) is less harmful", "B) is less harmful"], ["B", "A) yes"],
           ["A", "B", "C) neither of them"], [" yes", " no, not at all"]]
    for options in (shared, per):
        got, want = model.score(ctxs, options), hm.score(ctxs, options)
        opts = [options] * len(ctxs) if isinstance(options[0], str) else options
        tokens = [[len(hm._continuation(c, hm.encode(c), o)) for o in os]
                  for c, os in zip(ctxs, opts, strict=True)]
        assert max(max(t) for t in tokens) >= 4
        assert_close(got, want, TOL, tokens)


@engine_test
def test_wrong_device_is_one_line(vllm_dir: Path) -> None:
    from vllm.platforms import current_platform

    other = "cuda" if current_platform.is_cpu() else "cpu"
    with pytest.raises(UserError, match=f"this vLLM runs on .*, not '{other}'"):
        load_model(f"vllm:{vllm_dir}", device=other)


@engine_test
def test_cai_generate_runs_on_vllm(vm, vllm_dir: Path, capsys) -> None:
    rc = main(["generate", "-m", f"vllm:{vllm_dir}", "--max-new-tokens", "8", "Hello there"])
    assert rc == 0
    want = vm.generate([[{"role": "user", "content": "Hello there"}]],
                       SamplingParams(max_new_tokens=8))[0]
    assert capsys.readouterr().out.strip() == want.strip()


@engine_test
def test_run_backend_auto_loads_vllm_for_a_large_stage_only(vm, vllm_dir: Path) -> None:
    """`backend: auto` in `cai run`: a stage that generates past the start-up threshold gets
    the vllm backend, a small one the hf backend (the engine is the session's, reused)."""
    from constitutional.config import RunConfig
    from constitutional.models import VLLM_MIN_TOKENS
    from constitutional.models.hf import HFModel
    from constitutional.models.vllm import VLLMModel
    from constitutional.pipeline import _model

    big = _model(str(vllm_dir), RunConfig(), tokens=VLLM_MIN_TOKENS["float32"])
    assert isinstance(big, VLLMModel) and big.llm is vm.llm
    assert isinstance(_model(str(vllm_dir), RunConfig(), tokens=100), HFModel)
    assert isinstance(_model(str(vllm_dir), RunConfig(backend="hf"), tokens=10**9), HFModel)


@engine_test
def test_seeded_samples_of_long_prompts_that_fill_several_prefill_steps(vm) -> None:
    """Seeded requests whose prompts do not fit one scheduler step: vLLM-CPU's chunked prefill
    crashed the engine on them ("CPU Generator does not use offset"), so the backend turns it
    off on CPU; the samples still do not depend on the batch."""
    long = [[{"role": "user", "content": f"Story {i}: " + "the cat sat on the mat. " * 150}]
            for i in range(12)]  # ~12 x 1,000 tokens: more than one step's token budget
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
    together = vm.generate(long, params)
    assert len(together) == 12 and all(isinstance(t, str) for t in together)
    assert vm.generate(long[5:6], params) == together[5:6]
