"""`backend: auto | hf | vllm`: which backend a generating stage of `cai run` loads."""

from __future__ import annotations

import pytest

from constitutional import models
from constitutional.config import RunConfig
from constitutional.core.errors import UserError
from constitutional.models import VLLM_MIN_TOKENS, choose_backend
from constitutional.models.hf import HFModel
from constitutional.pipeline import _model

SPEC = "builtin:smollm2-135m-instruct"


@pytest.mark.parametrize("installed", [True, False])
def test_auto_picks_vllm_only_when_installed_and_the_stage_repays_its_start_up(
        monkeypatch, installed):
    monkeypatch.setattr(models, "vllm_installed", lambda: installed)
    for dtype, threshold in VLLM_MIN_TOKENS.items():
        assert choose_backend(SPEC, "auto", tokens=threshold - 1, dtype=dtype) == SPEC
        big = choose_backend(SPEC, "auto", tokens=threshold, dtype=dtype)
        assert big == (f"vllm:{SPEC}" if installed else SPEC)
    assert VLLM_MIN_TOKENS["bfloat16"] < VLLM_MIN_TOKENS["float32"]  # vLLM gains more in bf16


def test_explicit_backends_and_specs_that_name_one(monkeypatch):
    monkeypatch.setattr(models, "vllm_installed", lambda: True)
    assert choose_backend(SPEC, "hf", tokens=10**9) == SPEC
    assert choose_backend("runs/sl/model", "vllm", tokens=1) == "vllm:runs/sl/model"
    for named in ("openai:http://127.0.0.1:8000/v1#m", "vllm:runs/x", "hf:runs/x"):
        assert choose_backend(named, "vllm", tokens=10**9) == named
        assert choose_backend(named, "auto", tokens=10**9) == named
    with pytest.raises(UserError, match="unknown backend 'gpu'"):
        choose_backend(SPEC, "gpu", tokens=1)
    with pytest.raises(Exception, match="backend"):
        RunConfig(backend="gpu")


def test_a_small_stage_loads_the_hf_backend_in_the_chosen_generate_dtype(tiny_model_dir):
    lm = _model(str(tiny_model_dir), RunConfig(generate_dtype="bfloat16"), tokens=100)
    assert isinstance(lm, HFModel)
    assert str(lm.generate_dtype) == "torch.bfloat16"
    assert str(_model(str(tiny_model_dir), RunConfig(), tokens=100).generate_dtype) == \
        "torch.float32"
