"""``cai rl grpo`` and ``cai rl rloo``: critic-free online RL of the SL-CAI policy through TRL's
own ``GRPOTrainer`` and ``RLOOTrainer``, against ``rl.reward`` (:mod:`constitutional.rl.rewards`:
the PM, the constitution as a live judge, a Python callable, or a weighted mix).

Nothing of the algorithms is ours: TRL samples ``group_size`` answers per prompt, scores them
with our reward functions (it weights them and logs each one), computes the group-relative
advantages (GRPO: the group's mean and standard deviation; RLOO: the leave-one-out mean), and
takes the clipped policy-gradient step with a KL penalty ``beta`` to the starting (SL-CAI)
policy. What is ours is the settings, declared once (:class:`GRPOSettings`, the ``grpo:``
section of a run, shared by both algorithms), and the run directory:

* one **step** is one rollout: ``prompts_per_step`` prompts × ``group_size`` answers, then
  ``iterations`` optimizer steps on them (TRL's ``num_iterations``), over all processes;
* ``OUT/<algo>_log.jsonl``: one row per step with the columns of PPO's log (``reward_mean``,
  ``reward_std``, ``kl``, ``entropy``, ``response_len``) and each reward component
  (``reward/pm``, ``reward/judge``, ...), rewritten from the trainer's state at the end, so a
  resumed run has each step once;
* ``OUT/checkpoints``: TRL's checkpoints (model, optimizer, scheduler, RNG states); ``resume``
  continues from the newest, and refuses if the settings differ from those the checkpoints were
  made with (``OUT/<algo>.config.json``);
* ``OUT/references.jsonl``: the judge's reference answers (see :mod:`~constitutional.rl.rewards`);
* ``OUT``: the trained policy, a plain model directory (LoRA adapters merged), and
  ``OUT/<algo>.json`` (settings and metrics).

Generation: TRL's vLLM path (``use_vllm``, colocated) when vLLM is installed and a GPU is present,
else TRL's own ``generate``. Under ``accelerate launch`` each process takes its share of every
step's answers; TRL gathers the rewards before it computes the advantages.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, model_validator

from constitutional.core.errors import UserError
from constitutional.core.messages import Message
from constitutional.core.settings import Field
from constitutional.models import BUILTIN_MODEL
from constitutional.rl.rewards import JudgeForm, parse_rewards
from constitutional.train import (
    LoraAlpha,
    LoraSettings,
    ModelSettings,
    TrainRun,
    check_settings_unchanged,
    last_complete_checkpoint,
)

log = logging.getLogger(__name__)

ALGOS = ("grpo", "rloo")
#: Settings that a resumed run may change.
RESUME_MAY_CHANGE = frozenset({"resume", "out"})


#: ``rl.reward`` (and ``--reward``): declared once, read by the run config and ``cai rl grpo``.
RewardSetting = Annotated[
    dict[str, float], BeforeValidator(parse_rewards),
    Field(description="The reward of grpo and rloo: pm (the preference model), judge (the "
                      "feedback model asked the constitution's question against a reference "
                      "answer), or module:function (TRL's reward signature); several with "
                      "weights: pm=0.5,judge=1.",
          json_schema_extra={"cli_type": str})]


class GRPOSettings(ModelSettings, LoraSettings):
    """``grpo:``: the settings of GRPO and RLOO (TRL's trainers), one step = one rollout; the
    model's (:class:`~constitutional.train.ModelSettings`) and LoRA's."""

    steps: int = Field(20, ge=1, description="Steps (rollouts).")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per step (over all processes).")
    group_size: int = Field(4, ge=2, description="Answers sampled per prompt (TRL's "
                                                 "num_generations).")
    beta: float = Field(0.05, ge=0, description="β: the KL penalty to the starting (SL-CAI) "
                                                "policy.")
    epsilon: float = Field(0.2, gt=0, description="ε: the clip range of the policy ratio.")
    learning_rate: float = Field(1e-6, gt=0, description="The policy's learning rate "
                                                         "(constant).")
    iterations: int = Field(1, ge=1, description="Optimizer steps per rollout (TRL's "
                                                 "num_iterations).")
    max_new_tokens: int = Field(64, ge=1, description="Answer tokens at most.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    helpful_ratio: float = Field(0.5, ge=0, lt=1, description="Share of helpful prompts.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clipping.")
    lora_alpha: LoraAlpha = 32
    save_steps: int = Field(10, ge=1, description="Checkpoint every N steps.")
    generation: Literal["auto", "cai", "trl"] = Field(
        "auto", description="Who samples the answers: auto (TRL's vLLM path when vLLM is "
                            "installed and a GPU is present, else cai's), cai (our CPU engine, "
                            "seeded per prompt, step and sample, so the answers do not depend "
                            "on the process layout; not with LoRA) or trl (TRL's generate).")
    judge_form: JudgeForm = Field(
        "pairwise", description="The judge reward's question: pairwise (the sampled answer "
                                "against the starting policy's greedy answer, both orders) or "
                                "pointwise (does the answer meet the principle: yes or no, "
                                "both orders).")
    rollout_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="The dtype cai's engine samples in (auto: bfloat16 on CPUs that "
                            "compute in it natively, else the policy's); the log-probabilities "
                            "learnt from are always the policy's own.")


class GRPOConfig(TrainRun, GRPOSettings):
    """Settings of ``cai rl grpo`` / ``cai rl rloo``: the tunable ones, the reward, and the run's
    models, prompts and output."""

    algo: Literal["grpo", "rloo"] = Field("grpo", description="grpo or rloo.",
                                          json_schema_extra={"cli": False})
    reward: RewardSetting = Field(default_factory=lambda: {"pm": 1.0})
    policy: str = Field(BUILTIN_MODEL, description="The SL-CAI policy (directory or spec).")
    pm: str | None = Field(None, description="The preference model directory (the pm reward).")
    feedback_model: str | None = Field(None, description="The judge's feedback model (default: "
                                                         "the policy's starting checkpoint).")
    constitution: str = Field("default", description="The judge's constitution.")
    prompts: str = Field(description="Red-team prompts (spec).")
    helpful: str | None = Field(None, description="Helpful prompts mixed in (spec).")
    limit: int | None = Field(None, ge=1, description="Prompts per source at most.")
    helpful_limit: int | None = Field(None, ge=1, description="Helpful prompts at most "
                                                              "(default: --limit).")
    out: str = Field(description="Run directory (the trained policy, log, checkpoints).")
    resume: bool = Field(True, description="Continue from the newest checkpoint.")

    omit_unset = ("device", "helpful_limit")

    @model_validator(mode="after")
    def _check(self) -> GRPOConfig:
        if "judge" in self.reward and self.feedback_model is None:
            self.feedback_model = self.policy
        return self

    @property
    def log_file(self) -> str:
        return f"{self.algo}_log.jsonl"


@dataclass
class GRPOResult:
    out_dir: Path
    log: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------


def _trl(algo: str) -> tuple[type, type]:
    if algo == "grpo":
        from trl import GRPOConfig as Args
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Args
        from trl import RLOOTrainer as Trainer
    return Trainer, Args


def _use_vllm() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def generator(config: GRPOConfig) -> str:
    """``generation`` resolved: ``vllm`` (TRL's), ``cai`` or ``trl``."""
    if config.generation == "auto":
        return "vllm" if _use_vllm() else ("trl" if config.lora else "cai")
    if config.generation == "cai" and config.lora:
        raise UserError("generation: cai does not sample from LoRA adapters yet; use trl or "
                        "auto", field="generation")
    return config.generation


def _with_our_engine(Trainer: type, config: GRPOConfig, path: str) -> type:
    """``Trainer`` sampling through our engine (:class:`~constitutional.models.hf.HFModel` on
    the policy being trained): TRL's ``_generate`` hands us its conversational prompts, and
    ``_generate_single_turn`` returns our token ids where TRL's tokenisation of each prompt is
    ours (else TRL's own generation runs, and the log says so once)."""
    from dataclasses import replace

    from constitutional.models import SamplingParams
    from constitutional.rl.ppo.experience import sample_answers
    from constitutional.rl.ppo.trainer import rollout_dtype

    grpo = config.algo == "grpo"

    class WithOurEngine(Trainer):  # type: ignore[misc, valid-type]
        _cai_prompts: Sequence[Any] = ()
        _cai_engine: Any = None
        _cai_fallback = False
        _cai_synced = -1

        def _generate(self, prompts: list, *args: Any, **kwargs: Any) -> Any:
            self._cai_prompts = list(prompts)
            return super()._generate(prompts, *args, **kwargs)

        def train(self, *args: Any, **kwargs: Any) -> Any:
            # how rollouts compute is decided on the starting weights, before a checkpoint is
            # loaded: the bf16 engine's self-check can pass on some weights and fail on others,
            # and a resumed run must sample as the uninterrupted one did
            self._cai_engine_for(self.accelerator.unwrap_model(self.model)).prepare_generation()
            return super().train(*args, **kwargs)

        def _cai_engine_for(self, model: Any) -> Any:
            from constitutional.models.hf import HFModel

            if self._cai_engine is None or self._cai_engine.model is not model:
                was_training = model.training  # the engine sets eval mode
                self._cai_engine = HFModel(path, spec=config.policy, model=model,
                                           tokenizer=self.processing_class,
                                           device=str(self.accelerator.device),
                                           generate_dtype=rollout_dtype(
                                               config.rollout_dtype, self.accelerator.device))
                model.train(was_training)
            return self._cai_engine

        def _cai_generate(self, prompt_ids: list[list[int]]) -> list[list[int]] | None:
            model = self.accelerator.unwrap_model(self.model)
            was_training = model.training
            engine, prompts = self._cai_engine_for(model), self._cai_prompts
            if self._cai_synced != self.state.global_step:  # the optimizer moved the weights
                engine.sync_weights()  # (TRL's fused AdamW leaves version counters unchanged)
                self._cai_synced = self.state.global_step
            if len(prompts) != len(prompt_ids) or any(
                    engine.encode(p) != list(ids) for p, ids in zip(prompts, prompt_ids,
                                                                     strict=True)):
                model.train(was_training)
                if not self._cai_fallback:
                    log.warning("generation: TRL's prompt tokens are not ours; TRL's generate "
                                "samples instead")
                    self._cai_fallback = True
                return None
            step = self.state.global_step // config.iterations
            params = SamplingParams(temperature=config.temperature, top_p=config.top_p,
                                    max_new_tokens=config.max_new_tokens,
                                    seed=(config.seed * 1_000_003 + step) % 2**31)
            model.eval()
            try:
                out = sample_answers(engine, prompts, replace(params, n=1))
            finally:
                model.train(was_training)
            return [ids for _, ids in out]

        def _generate_single_turn(self, prompt_ids: Any, *args: Any, **kwargs: Any) -> Any:
            ours = self._cai_generate(prompt_ids)
            if ours is None:
                return super()._generate_single_turn(prompt_ids, *args, **kwargs)
            return (ours, None) if grpo else ours

    WithOurEngine.__name__ = f"{Trainer.__name__}WithOurEngine"
    return WithOurEngine


def trl_args(config: GRPOConfig, num_processes: int, reward_weights: list[float]) -> Any:
    """TRL's arguments for ``config``: one rollout of ``prompts_per_step × group_size`` answers
    per step over all processes, ``iterations`` optimizer steps on it."""
    import torch

    _, Args = _trl(config.algo)
    answers = config.prompts_per_step * config.group_size
    if answers % num_processes:
        raise UserError(f"{config.prompts_per_step} prompts × {config.group_size} answers per "
                        f"step do not split over {num_processes} processes",
                        field="prompts_per_step")
    from constitutional.train import checkpoint_args, make_args

    gpu = torch.cuda.is_available()
    vllm = generator(config) == "vllm"
    return make_args(
        Args, config.device,
        output_dir=str(Path(config.out) / "checkpoints"),
        use_cpu=not gpu or config.device == "cpu", bf16=config.mixed_precision(),
        **checkpoint_args(Args, config.gradient_checkpointing),
        per_device_train_batch_size=answers // num_processes, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=config.iterations,
        num_generations=config.group_size, max_completion_length=config.max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, top_k=0, beta=config.beta,
        epsilon=config.epsilon, learning_rate=config.learning_rate,
        lr_scheduler_type="constant", max_grad_norm=config.max_grad_norm,
        max_steps=config.steps * config.iterations, logging_steps=1,
        save_strategy="steps", save_steps=config.save_steps * config.iterations,
        save_total_limit=2, report_to="none", disable_tqdm=True, seed=config.seed,
        data_seed=config.seed, reward_weights=reward_weights, disable_dropout=True,
        use_vllm=vllm,
        **({"vllm_mode": "colocate"} if vllm else {}))


def log_row(entry: dict[str, Any], iterations: int, names: Sequence[str]) -> dict[str, Any]:
    """One of TRL's log entries as a row of our log (PPO's column names where they exist)."""
    row: dict[str, Any] = {"step": -(-int(entry["step"]) // iterations)}
    for ours, theirs in (("reward_mean", "reward"), ("reward_std", "reward_std"), ("kl", "kl"),
                         ("entropy", "entropy"), ("response_len", "completions/mean_length"),
                         ("clip_frac", "clip_ratio/region_mean"), ("loss", "loss"),
                         ("grad_norm", "grad_norm")):
        if theirs in entry:
            row[ours] = entry[theirs]
    for name in names:
        key = f"rewards/{name}/mean"
        if key in entry:
            row[f"reward/{name}"] = entry[key]
    return row


def grpo_train(config: GRPOConfig, *, label: Any = None,
               prompts: Sequence[Sequence[Message]] | None = None,
               on_step: Callable[[dict[str, Any]], None] | None = None) -> GRPOResult:
    """Train ``config.policy`` with TRL's GRPO or RLOO against ``config.reward``; save the policy
    to ``config.out``. ``label`` (``rl label``'s settings) shapes the judge's question; by default
    ``rl label``'s defaults with the config's feedback model, constitution and seed."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from constitutional.core.io import atomic_write_jsonl, atomic_write_text
    from constitutional.rl.label import LabelConfig
    from constitutional.rl.ppo.experience import load_training_prompts
    from constitutional.rl.rewards import JudgeReward, build_rewards, reference_answers
    from constitutional.train import (
        causal_lm,
        load_pretrained,
        process_state,
        save_model,
        trainable_model_path,
        write_report,
    )

    t0 = time.perf_counter()
    out = Path(config.out)
    state = process_state(config.device)
    checkpoints = out / "checkpoints"
    settings_file = out / f"{config.algo}.config.json"
    resume = last_complete_checkpoint(checkpoints) if config.resume else None
    if resume:
        check_settings_unchanged(settings_file, config.to_dict(), RESUME_MAY_CHANGE)
    prompts = ([list(p) for p in prompts] if prompts is not None
               else load_training_prompts(config))
    if not prompts:
        raise UserError("no prompts to train on", field="prompts")
    args = trl_args(config, state.num_processes, list(config.reward.values()))
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(settings_file, json.dumps(config.to_dict(), indent=2, default=str)
                          + "\n")
    path = trainable_model_path(config.policy)

    def judge() -> JudgeReward:
        from constitutional.models import load_model

        feedback = config.feedback_model or config.policy
        if feedback == config.policy:
            log.info("judge: the feedback model is the policy's starting checkpoint (frozen "
                     "weights, loaded separately from those being trained)")
        lm = load_model(feedback)
        shape = label if label is not None else LabelConfig(
            feedback_model=feedback, constitution=config.constitution, seed=config.seed)
        if config.judge_form == "pointwise":
            return JudgeReward(lm, shape, form="pointwise")
        if state.is_main_process:
            reference_answers(config.policy, prompts, config.max_new_tokens,
                              out / "references.jsonl", seed=config.seed)
        state.wait_for_everyone()
        from constitutional.core.io import JsonlStore

        refs = {r["id"]: r["answer"] for r in JsonlStore(out / "references.jsonl").records()}
        return JudgeReward(lm, shape, refs)

    rewards = build_rewards(config.reward, pm=config.pm, judge=judge,
                                     device=str(state.device))
    names = list(config.reward)
    shown = [n if n in ("pm", "judge") else getattr(f, "__name__", type(f).__name__)
             for n, f in zip(names, rewards, strict=True)]
    tokenizer = load_pretrained(AutoTokenizer, path, "policy's tokenizer",
                                **config.tokenizer_kwargs())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = causal_lm(path, tokenizer, config.load_kwargs())
    if config.load_in_4bit or config.load_in_8bit:
        model = config.prepare_for_training(model)
    rows: list[dict[str, Any]] = []

    class StepLog(TrainerCallback):
        def on_log(self, _args: Any, st: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kw: Any) -> None:
            if not logs or "reward" not in logs or not st.is_world_process_zero:
                return
            row = log_row({**logs, "step": st.global_step}, config.iterations, shown)
            rows.append(row)
            if on_step is not None:
                on_step(row)

    Trainer, _ = _trl(config.algo)
    engine = generator(config)
    if engine == "cai":
        Trainer = _with_our_engine(Trainer, config, path)
    trainer = Trainer(model=model, reward_funcs=rewards, args=args,
                      train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                      processing_class=tokenizer, peft_config=config.peft_config(),
                      callbacks=[StepLog()])
    trainer.remove_callback(PrinterCallback)
    log.info("%s: %d steps of %d prompts × %d answers, reward %s, sampled by %s", config.algo,
             config.steps, config.prompts_per_step, config.group_size,
             " + ".join(f"{w:g}×{n}" for n, w in config.reward.items()), engine)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    history = [log_row(e, config.iterations, shown) for e in trainer.state.log_history
               if "reward" in e]
    last = {}
    for row in history:  # one row per step: the last log of each
        last[row["step"]] = row
    history = [last[s] for s in sorted(last)]
    save_model(trainer, tokenizer, out, merge_lora=config.lora)
    seconds = time.perf_counter() - t0
    metrics = {"steps": len(history), "reward_first": history[0].get("reward_mean")
               if history else None, "reward_last": history[-1].get("reward_mean")
               if history else None, "kl_last": history[-1].get("kl") if history else None,
               "wall_seconds": round(seconds, 2)}
    if state.is_main_process:
        atomic_write_jsonl(out / config.log_file, history)
        write_report(out / f"{config.algo}.json", config, metrics)
    return GRPOResult(out, history, seconds, metrics)
