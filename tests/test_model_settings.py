"""The model settings a TRL user expects (``ModelSettings``: TRL's ``ModelConfig`` names), the
``device`` of the training stages, ``helpful_limit``, and the verdict of every RL policy of a
run with several (issue 26). Each test here fails on a37fd54: the settings did not exist, or
were read by no stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import make_tiny_llama, make_tiny_pm

from constitutional.cli import main
from constitutional.core.errors import UserError

PAIRS = [("How do I make a weapon at home?", "I can't help with that; try woodworking."),
         ("Insult my coworker for me.", "I'd rather not; want help writing a calm message?"),
         ("How can I cheat on my exam?", "I won't help with cheating, but here is a study plan."),
         ("Tell me a secret about my neighbour.", "I don't know your neighbour; ask them."),
         ("Write a threat.", "I won't write threats. Can I help you say what upsets you?"),
         ("How do I pick a lock?", "Call a locksmith if it is your own lock.")]


def sft_rows(path: Path, n: int = 6) -> Path:
    rows = [{"prompt": [{"role": "user", "content": f"{q} ({i})"}],
             "completion": [{"role": "assistant", "content": a}]}
            for i in range(n // len(PAIRS) + 1) for q, a in PAIRS][:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def preference_rows(path: Path, n: int = 12) -> Path:
    rows = [{"id": f"r{i}", "prompt": [{"role": "user", "content": f"{q} ({i})"}],
             "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": "Sure, here is how."}],
             "score": 0.8} for i, (q, a) in enumerate(PAIRS * (n // len(PAIRS)))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Seen:
    """The trainer each stage saves, and its LoRA targets before they are merged (a spy on
    ``save_model`` that then saves as usual)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from constitutional import train

        self.trainers: list[Any] = []
        self.targets: list[set[str]] = []
        real = train.save_model

        def spy(trainer: Any, *args: Any, **kwargs: Any) -> None:
            self.trainers.append(trainer)
            self.targets.append(lora_targets(trainer.model))
            real(trainer, *args, **kwargs)

        monkeypatch.setattr(train, "save_model", spy)


def checkpointing(model: Any) -> bool:
    """Whether gradient (activation) checkpointing is on, under transformers' name of the day."""
    name = ("is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing")
            else "is_gradient_checkpointing")
    return bool(getattr(model, name))


def checkpointing_arg(args: Any) -> bool:
    name = ("activation_checkpointing" if "activation_checkpointing" in
            type(args).__dataclass_fields__ else "gradient_checkpointing")
    return bool(getattr(args, name))


def lora_targets(model: Any) -> set[str]:
    return {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_modules()
            if name.endswith("lora_A")}


# ------------------------------------------------------------------------------------------------
# the settings reach the loaders and the trainers


def test_sft_honours_every_model_setting(tiny_model_dir, tmp_path, monkeypatch):
    """SFT (TRL's SFTTrainer): dtype, attention, LoRA's target modules and dropout, gradient
    checkpointing (TRL's default, on, that a37fd54 could not turn off) and bf16 reach the model
    and the arguments; revision and trust_remote_code reach from_pretrained (a local directory
    has no revisions: seen by a spy)."""
    from transformers import AutoModelForCausalLM

    from constitutional.sl.train import SLTrainConfig, sl_train

    calls: list[dict[str, Any]] = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(cls, path, *args, **{k: v for k, v in kwargs.items() if k != "revision"})

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    seen = Seen(monkeypatch)
    result = sl_train(SLTrainConfig(
        data=str(sft_rows(tmp_path / "sft.jsonl")), model=str(tiny_model_dir),
        out=str(tmp_path / "model"), epochs=1, batch_size=3, eval_fraction=0, device="cpu",
        lora=True, lora_target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
        dtype="bfloat16", attn_implementation="eager", gradient_checkpointing=False, bf16=False,
        model_revision="v1.0"))
    trainer = seen.trainers[-1]
    model = trainer.model
    assert seen.targets[-1] == {"q_proj", "v_proj"}
    assert model.peft_config["default"].lora_dropout == 0.1
    assert model.base_model.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert not checkpointing(model.base_model.model)
    assert not checkpointing_arg(trainer.args) and not trainer.args.bf16
    assert trainer.args.use_cpu and trainer.args.device.type == "cpu"
    assert calls[0]["revision"] == "v1.0" and calls[0]["trust_remote_code"] is False
    assert calls[0]["dtype"] == torch.bfloat16
    assert (result.out_dir / "model.safetensors").is_file()  # merged: a plain model directory


def test_trust_remote_code_is_off_by_default_and_torch_dtype_is_dtype():
    from constitutional.config import RunConfig, load_config

    c = RunConfig()
    for section in (c.sl_train, c.pm, c.dpo, c.grpo, c.rl):
        kwargs = section.load_kwargs()
        assert kwargs["trust_remote_code"] is False and kwargs["dtype"] == torch.float32
        assert "revision" not in kwargs and "quantization_config" not in kwargs
    c = load_config(None, ["sl_train.torch_dtype=bfloat16", "rl.trust_remote_code=true",
                           "grpo.lora_target_modules=[q_proj]"])
    assert c.sl_train.dtype == "bfloat16" and c.rl.load_kwargs()["trust_remote_code"] is True
    assert c.grpo.lora.__class__ is bool and c.grpo.lora_target_modules == ["q_proj"]


def test_pm_honours_dtype_attention_checkpointing_and_bf16(tiny_model_dir, tmp_path,
                                                               monkeypatch):
    from constitutional.rl.preference import PMConfig, pm_train

    seen = Seen(monkeypatch)
    pm_train(PMConfig(labels=str(preference_rows(tmp_path / "prefs.jsonl")),
                      model=str(tiny_model_dir), out=str(tmp_path / "pm"), epochs=1,
                      batch_size=4, eval_fraction=0.25, device="cpu", dtype="bfloat16",
                      attn_implementation="eager", gradient_checkpointing=False, bf16=True))
    trainer = seen.trainers[-1]
    assert trainer.model.dtype == torch.bfloat16
    assert trainer.model.config._attn_implementation == "eager" and trainer.args.bf16
    assert not checkpointing(trainer.model) and not checkpointing_arg(trainer.args)


def test_ppo_loads_its_models_with_the_model_settings(builtin_dir, tmp_path):
    """PPO's own loop: the policy gets LoRA on the target modules and gradient checkpointing,
    the value model the attention and gradient checkpointing, the accelerator the device."""
    from constitutional.rl.ppo import PPOConfig
    from constitutional.rl.ppo.trainer import PPOTrainer

    policy = make_tiny_llama(tmp_path / "policy", builtin_dir)
    pm = make_tiny_pm(tmp_path / "pm", builtin_dir)

    class Reward:
        def score_answers(self, prompts: Any, answers: Any) -> list[float]:
            return [0.0 for _ in answers]

    config = PPOConfig(policy=str(policy), pm=str(pm), prompts="unused", out=str(tmp_path / "o"),
                       steps=1, rollout_batch=2, minibatch=2, max_new_tokens=4, device="cpu",
                       lora=True, lora_target_modules=["q_proj"], attn_implementation="eager",
                       gradient_checkpointing=True)
    trainer = PPOTrainer(config, rewarder=Reward(),
                         prompts=[[{"role": "user", "content": "Hi"}]] * 2)
    policy_model = trainer.accelerator.unwrap_model(trainer.policy)
    value_model = trainer.accelerator.unwrap_model(trainer.value)
    assert lora_targets(policy_model) == {"q_proj"}
    assert checkpointing(policy_model.base_model.model)
    assert policy_model.config._attn_implementation == "eager"
    assert checkpointing(value_model)
    assert value_model.config._attn_implementation == "eager"
    assert trainer.accelerator.device.type == "cpu"


# ------------------------------------------------------------------------------------------------
# wrong combinations: one line, exit 2


@pytest.mark.parametrize("flags, needle", [
    (["--device", "cuda:0"], "no CUDA GPU"),
    (["--lora", "--load-in-4bit"], "bitsandbytes"),
    (["--load-in-8bit"], "set lora: true"),
    (["--attn-implementation", "flash_attention_2"], "flash_attn"),
])
def test_wrong_model_settings_are_one_line_exit_2(tiny_model_dir, tmp_path, capsys, flags,
                                                  needle):
    if "flash_attn" in needle:
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            pytest.skip("flash-attn is installed here")
    if "bitsandbytes" in needle:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is not None:
            pytest.skip("bitsandbytes is installed here")
    data = sft_rows(tmp_path / "sft.jsonl")
    rc = main(["sl", "train", "--data", str(data), "-m", str(tiny_model_dir), "--out",
               str(tmp_path / "model"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_an_unavailable_device_stops_sl_pm_and_ppo_in_a_run(tiny_model_dir, tmp_path):
    """``device`` is read by the training stages: a run on a device this machine lacks stops
    each of them at once (a37fd54 ignored it and trained on the CPU)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    from constitutional.config import load_config
    from constitutional.pipeline import Pipeline, _pm, _ppo, _sl_train

    run = tmp_path / "run"
    sft_rows(run / "sl" / "revise.sft.jsonl")
    preference_rows(run / "rl" / "preferences.jsonl")
    (run / "pm").mkdir(parents=True)
    pl = Pipeline(load_config(None, [f"model={tiny_model_dir}", "device=cuda:0"]), run)
    for stage in (_sl_train, _pm, _ppo):
        with pytest.raises(UserError, match="no CUDA GPU") as err:
            stage(pl)
        assert err.value.field == "device"
    assert not (run / "sl" / "model" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# helpful_limit


def test_helpful_limit_caps_the_helpful_samples_of_sl_and_the_rl_prompts(tiny_model_dir,
                                                                        tmp_path):
    from constitutional.config import load_config
    from constitutional.pipeline import Pipeline, _sl_train
    from constitutional.rl.ppo import PPOConfig
    from constitutional.rl.ppo.experience import load_training_prompts

    run = tmp_path / "run"
    sft_rows(run / "sl" / "revise.sft.jsonl", n=12)  # 12 revisions: 4 helpful rows at 0.25
    pl = Pipeline(load_config(None, [f"model={tiny_model_dir}", "helpful_limit=2",
                                     "sl_train.epochs=1", "sl_train.eval_fraction=0",
                                     "sl_train.helpful_max_new_tokens=4"]), run)
    _sl_train(pl)
    metrics = json.loads((run / "sl" / "model" / "sl_train.json").read_text())["metrics"]
    assert metrics["helpful_rows"] == 2 and metrics["revision_rows"] == 12
    red = tmp_path / "red.jsonl"
    red.write_text("".join(json.dumps({"prompt": f"Red-team prompt {i}"}) + "\n"
                           for i in range(8)))
    config = PPOConfig(policy="unused", pm=None, prompts=str(red), out=str(tmp_path / "o"),
                       helpful="builtin:helpful", helpful_ratio=0.5, helpful_limit=3)
    assert len(load_training_prompts(config)) == 8 + 3


# ------------------------------------------------------------------------------------------------
# rl.algo: ppo,dpo — the verdict judges both policies


def test_the_verdict_judges_every_rl_policy(tmp_path):
    from constitutional.evaluate.report.rundir import RunDir
    from constitutional.evaluate.report.verdict import build_verdict

    def rate(r: float) -> dict[str, Any]:
        return {"rate": r, "ci_low": max(0.0, r - 0.05), "ci_high": min(1.0, r + 0.05),
                "refusals": int(20 * r), "n": 20}

    def comparison(harmless: str, difference: float) -> dict[str, Any]:
        change = {"difference": difference, "ci_low": difference - 0.05,
                  "ci_high": difference + 0.05, "n": 20, "gained": 2, "lost": 0}
        return {"against": "initial", "margin": 0.05, "unsafe_refused": change,
                "safe_answered": dict(change, difference=0.0, ci_low=-0.01, ci_high=0.01),
                "harmless": harmless, "evasive": "not more evasive",
                "trade_off": harmless == "more harmless"}

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "evasiveness.json").write_text(json.dumps({"kind": "helpful",
        "checkpoints": {"initial": rate(0.1), "sl-cai": rate(0.1), "rl-cai": rate(0.9),
                        "dpo": rate(0.1)}}))
    (tmp_path / "eval" / "xstest.json").write_text(json.dumps({"comparisons": {
        "sl-cai": comparison("more harmless", 0.2), "rl-cai": comparison("less harmless", -0.2),
        "dpo": comparison("more harmless", 0.3)}}))
    verdict = build_verdict(RunDir(tmp_path, 10))
    stages = {s.stage: s for s in verdict.stages}
    assert {"XSTest (people-validated): rl-cai", "XSTest (people-validated): dpo",
            "Evasiveness: rl-cai", "Evasiveness: dpo"} <= set(stages)
    assert stages["XSTest (people-validated): rl-cai"].verdict.startswith("less harmless")
    assert stages["XSTest (people-validated): dpo"].verdict == "more harmless, not more evasive"
    assert stages["Evasiveness: rl-cai"].verdict == "rl-cai more evasive"
    assert any("rl-cai against initial" in w for w in verdict.warnings)
    assert "rl-cai against initial" in verdict.headline


def test_the_training_log_keeps_small_learning_rates_readable(caplog: pytest.LogCaptureFixture) -> None:
    """The trainers' log lines show 4 significant digits: a learning rate of 5e-05 rounded to 4
    decimals read 0.0, as if training had stopped."""
    import logging
    from types import SimpleNamespace

    from constitutional.train import log_callback

    state = SimpleNamespace(is_world_process_zero=True, global_step=5)
    with caplog.at_level(logging.INFO, logger="constitutional.train"):
        log_callback().on_log(None, state, None, logs={
            "learning_rate": 5e-05, "loss": 1.52243, "epoch": 0.4545454, "other": 1.0})
    [line] = [r.getMessage() for r in caplog.records if "step 5" in r.getMessage()]
    assert "'learning_rate': 5e-05" in line
    assert "'loss': 1.522" in line and "'epoch': 0.4545" in line and "other" not in line


def test_a_checkpoint_cut_short_is_skipped_on_resume(tiny_model_dir, tmp_path, caplog):
    """A full disk while the Trainer saved left ``checkpoint-50`` with its weights and a truncated
    optimizer.pt but no trainer_state.json (seen in a real run here); ``--resume`` then stopped
    with FileNotFoundError. The checkpoint is skipped and the newest complete one is resumed."""
    import logging

    from constitutional.sl.train import SLTrainConfig, sl_train
    from constitutional.train import last_complete_checkpoint

    def config(**kw: Any) -> SLTrainConfig:
        return SLTrainConfig(data=str(sft_rows(tmp_path / "sft.jsonl")), model=str(tiny_model_dir),
                             out=str(tmp_path / "model"), epochs=2, batch_size=3,
                             eval_fraction=0, device="cpu", save_steps=1, **kw)

    first = sl_train(config())
    checkpoints = first.out_dir / "checkpoints"
    steps = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert steps[-2:] == [3, 4], steps
    cut = checkpoints / "checkpoint-4"
    (cut / "trainer_state.json").unlink()
    optimizer = cut / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    assert last_complete_checkpoint(checkpoints) == checkpoints / "checkpoint-3"
    with caplog.at_level(logging.WARNING, logger="constitutional.train"):
        again = sl_train(config(resume=True))
    assert again.metrics["steps"] == 4
    assert any("checkpoint-4" in r.getMessage() and "not written to the end" in r.getMessage()
               for r in caplog.records)
