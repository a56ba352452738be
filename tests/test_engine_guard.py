"""The guard around the CPU engine (models.engines.guard): tested versions only, a self-check at load,
and a fallback to transformers' stock generate with one warning line."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from tiny_models import make_tiny_llama

from constitutional.models import SamplingParams
from constitutional.models.engines import cascade, guard
from constitutional.models.hf import HFModel

PROMPTS = [[{"role": "user", "content": "Hello there, how are you?"}],
           [{"role": "user", "content": "Name three colours. " * 3}]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def peaked_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir):
    return make_tiny_llama(tmp_path_factory.mktemp("peaked") / "model", tiny_model_dir,
                           initializer_range=0.6)


CANARY = os.environ.get(guard.ENV_UNTESTED) == "1"  # `make test-latest`: newest releases


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(guard, "_warned", set())


def fake_version(monkeypatch: pytest.MonkeyPatch, package: str, version: str) -> None:
    real = guard.installed
    monkeypatch.setattr(guard, "installed",
                        lambda p: version if p == package else real(p))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and r.name.startswith("constitutional")]


@pytest.mark.skipif(CANARY, reason="the drift canary runs the newest releases on purpose")
def test_versions_in_use_are_the_tested_ones() -> None:
    # the lock installs the tested versions: a fresh `make test` runs the engine itself
    assert guard.untested() == []


def test_self_check_passes_and_the_engine_runs(peaked_dir, caplog) -> None:
    model = HFModel(peaked_dir)
    assert cascade.self_check(model.model, model.generation.fast_linears()) is None
    assert model.engine == "cascade" and model.generation.internals and model.generation.onednn is not None
    assert warnings_of(caplog) == []


def test_untested_version_falls_back_with_one_warning(peaked_dir, monkeypatch, caplog) -> None:
    monkeypatch.delenv(guard.ENV_UNTESTED, raising=False)
    fake_version(monkeypatch, "transformers", "5.99.0")
    stock = HFModel(peaked_dir)
    again = HFModel(peaked_dir)
    assert stock.engine == again.engine == "generate"
    assert not stock.generation.internals and stock.generation.onednn is None
    lines = warnings_of(caplog)
    assert len(lines) == 1, lines  # once per process, not per model
    assert "transformers 5.99.0" in lines[0] and "5.23" in lines[0]
    # the stock path answers, and equals the engine's greedy output on the same model
    got = stock.generate(PROMPTS, GREEDY)
    monkeypatch.undo()
    assert got == HFModel(peaked_dir).generate(PROMPTS, GREEDY)


def test_env_lets_the_canary_run_the_engine_on_untested_versions(peaked_dir,
                                                                  monkeypatch) -> None:
    monkeypatch.delenv(guard.ENV_UNTESTED, raising=False)
    fake_version(monkeypatch, "torch", "2.99.0")
    assert HFModel(peaked_dir).engine == "generate"
    monkeypatch.setenv(guard.ENV_UNTESTED, "1")
    assert HFModel(peaked_dir).engine == "cascade"


def test_a_crashing_engine_fails_its_self_check(peaked_dir, monkeypatch, caplog) -> None:
    def broken(self, *args, **kwargs):  # what transformers 5.24 did to the old cache class
        raise TypeError("RaggedCache.update() got an unexpected keyword argument 'kwargs'")

    monkeypatch.setenv(guard.ENV_UNTESTED, "1")  # past the version gate, to the self-check
    monkeypatch.setattr(cascade.CascadeEngine, "generate", broken)
    model = HFModel(peaked_dir)
    assert model.engine == "generate" and not model.generation.internals
    (line,) = warnings_of(caplog)
    assert "self-check failed" in line and "unexpected keyword argument" in line
    assert model.generate(PROMPTS[:1], GREEDY)[0]  # still answers


def test_wrong_numbers_fail_the_self_check(peaked_dir, monkeypatch) -> None:
    real = cascade.RaggedCache.update

    def corrupt(self, key, value, layer_idx, *args, **kwargs):
        return real(self, key, value * 1.5, layer_idx, *args, **kwargs)

    model = HFModel(peaked_dir)
    monkeypatch.setattr(cascade.RaggedCache, "update", corrupt)
    reason = cascade.self_check(model.model, model.generation.fast_linears())
    assert reason is not None and "differ from the stock forward" in reason


def test_cache_accepts_the_arguments_transformers_adds() -> None:
    keys = [torch.zeros(1, 2, 4, 8)]
    values = [torch.zeros(1, 2, 4, 8)]
    cache = cascade.RaggedCache(keys, values, None).at(slice(0, 1), torch.tensor([[0]]))
    k, _v = cache.update(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8), 0,
                        {"cache_position": None}, kwargs={"anything": 1}, extra=True)
    assert k.shape == (1, 2, 1, 8) and float(k.sum()) == 16.0
    assert cache.get_seq_length(0, "more") == 0


def test_bfloat16_runs_the_engine_and_agrees_with_stock_generate(peaked_dir, caplog) -> None:
    # the engine used to crash in bf16 on its prefix path (float32 log-sum-exp merge and
    # float32 masks reached o_proj: "expected m1 and m2 to have the same dtype"), so the
    # self-check turned it off; now it passes and its answers are the stock path's
    shared = "You are a careful assistant. Answer in one short sentence, please. " * 4
    prompts = [[{"role": "system", "content": shared}, *p] for p in PROMPTS] + PROMPTS
    fast = HFModel(peaked_dir, dtype="bfloat16")
    assert next(fast.model.parameters()).dtype == torch.bfloat16
    assert cascade.self_check(fast.model, fast.generation.fast_linears()) is None
    assert fast.engine == "cascade" and warnings_of(caplog) == []
    stock = HFModel(peaked_dir, dtype="bfloat16", engine="generate")
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop=())
    got = fast.generate_with_ids(prompts, params)
    want = stock.generate_with_ids(prompts, params)
    # the two paths round differently in bf16 (fused vs. unfused attention, bf16 products),
    # so greedy may part where two tokens are a near-tie; everywhere else they must agree
    # (this random model's top logits sit close together: 18.625 vs 18.625 at one first token)
    for p, (_, a), (_, b) in zip(prompts, got, want, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if n is None:
            assert a == b
            continue
        seq = stock.encode(p) + list(a[:n])
        with torch.inference_mode():
            logits = stock.model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        gap = float(logits[a[n]] - logits[b[n]]).__abs__()
        assert gap <= 0.02 * float(logits.abs().max()), (n, gap)  # a near-tie, within bf16
