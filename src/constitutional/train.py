"""The TRL training recipe, written once, and the settings the training stages share.

SFT (:mod:`constitutional.sl.train`), the preference model (:mod:`constitutional.rl.preference`)
and DPO (:mod:`constitutional.rl.dpo`) each describe what is their own in a :class:`TrainJob`
(trainer and arguments classes, datasets, how the model loads, which metrics they report), and
:func:`run_trainer` does the rest, in the order distributed training needs:

1. the training arguments first: they set up the processes, and DeepSpeed ZeRO-3 partitions a
   model only if it is loaded after them;
2. the tokenizer (its EOS doubles as the pad token where it has none) and the model, with LoRA
   adapters if the stage asks for them;
3. the trainer, logging through :func:`log_callback`; the held-out set is evaluated once before
   training by ``eval_on_start`` (see :func:`trainer_args`) and read back with
   :func:`eval_before`;
4. training, from the newest checkpoint under ``OUT/checkpoints`` when ``resume`` is set;
5. ``trainer.save_model`` on every process (it gathers FSDP and ZeRO-3 shards; the main process
   writes), then, with LoRA, the adapters merged into a plain model directory by the main
   process.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import model_validator

from constitutional.core.errors import UserError
from constitutional.core.settings import Field, Settings

log = logging.getLogger("constitutional.train")

# ------------------------------------------------------------------------------------------------
# settings

# Fields whose default differs between stages are declared once as annotated types: a stage
# restates only the default (``epochs: Epochs = 2.0``); type, bounds and help text stay here.
Epochs = Annotated[float, Field(gt=0, description="Training epochs.")]
BatchSize = Annotated[int, Field(ge=1, description="Examples per device batch (the global batch "
                                                   "is this × processes × grad_accum).")]
EvalFraction = Annotated[float, Field(ge=0, lt=1, description="Share of the data held out for "
                                                              "evaluation (0: none).")]


#: The model settings added after runs were made: left out of a stage's fingerprint and of its
#: resume check while at their defaults, so those runs keep both.
MODEL_SETTINGS = ("model_revision", "dtype", "attn_implementation", "trust_remote_code",
                  "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant",
                  "gradient_checkpointing", "bf16", "lora_dropout", "lora_target_modules")

AttnImplementation = Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3",
                             "flex_attention"]
LoraAlpha = Annotated[int | None, Field(ge=1, description="LoRA alpha (default: 2 × the rank).")]
GradientCheckpointing = Annotated[bool, Field(
    description="Recompute activations in the backward pass: less memory, slower (on by "
                "default in SFT, PM and DPO, as TRL's trainers have it; off in PPO and GRPO).")]


class ModelSettings(Settings):
    """How a training stage loads and trains its model, under the names of TRL's
    ``ModelConfig`` (``model_revision``, ``dtype``, ``attn_implementation``,
    ``trust_remote_code``, ``load_in_4bit`` …) and ``TrainingArguments``
    (``gradient_checkpointing``, ``bf16``). Every stage that trains a model has them: SFT
    (``sl_train:``), the PM (``pm:``), DPO (``dpo:``), GRPO/RLOO (``grpo:``) and PPO (``rl:``;
    its policy, reference and value model)."""

    model_revision: str | None = Field(
        None, description="The revision (branch, tag or commit) of a hub model (default: main; "
                          "a local directory has none).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="The dtype the weights are loaded and trained in (auto: the "
                               "checkpoint's). Mixed precision is --bf16.",
        json_schema_extra={"cli": ["--dtype", "--torch-dtype"]})
    attn_implementation: AttnImplementation | None = Field(
        None, description="The attention kernel: eager, sdpa, flash_attention_2 … (default: "
                          "transformers' choice).")
    trust_remote_code: bool = Field(False, description="Run the Python code of the model's "
                                                       "repository (only for code you trust).")
    load_in_4bit: bool = Field(False, description="QLoRA: the base weights in 4 bits "
                                                  "(bitsandbytes, CUDA; needs lora).")
    load_in_8bit: bool = Field(False, description="The base weights in 8 bits (bitsandbytes, "
                                                  "CUDA; needs lora).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="The 4-bit type.")
    use_bnb_nested_quant: bool = Field(False, description="Quantize the 4-bit constants too "
                                                          "(double quantization).")
    gradient_checkpointing: GradientCheckpointing = False
    bf16: bool | None = Field(None, description="bf16 mixed-precision training (default: on "
                                                "GPUs that support it; PPO: off).")

    omit_default = MODEL_SETTINGS

    @model_validator(mode="before")
    @classmethod
    def _torch_dtype(cls, data: Any) -> Any:
        """``torch_dtype``, TRL's and transformers' earlier name, is ``dtype``."""
        if isinstance(data, dict) and "torch_dtype" in data:
            data = dict(data)
            value = data.pop("torch_dtype")
            data.setdefault("dtype", value)
        return data

    @model_validator(mode="after")
    def _check_model(self) -> ModelSettings:
        if self.load_in_4bit and self.load_in_8bit:
            raise UserError("load_in_4bit and load_in_8bit exclude each other",
                            field="load_in_8bit")
        bits = "load_in_4bit" if self.load_in_4bit else "load_in_8bit"
        if (self.load_in_4bit or self.load_in_8bit) and not getattr(self, "lora", False):
            raise UserError(f"{bits} trains LoRA adapters on quantized weights (QLoRA): set "
                            "lora: true" if "lora" in type(self).model_fields else
                            f"{bits}: this stage trains all of its weights, which cannot be "
                            "quantized", field=bits)
        return self

    # -- what the loaders and the trainers get -------------------------------------------------

    def quantization_config(self) -> Any:
        """bitsandbytes' config (as TRL's ``get_quantization_config``), or None; without
        bitsandbytes or a CUDA GPU, one line, exit 2."""
        if not (self.load_in_4bit or self.load_in_8bit):
            return None
        import importlib.util

        import torch

        bits = "load_in_4bit" if self.load_in_4bit else "load_in_8bit"
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(f"{bits} needs bitsandbytes (pip install bitsandbytes)", field=bits)
        if not torch.cuda.is_available():
            raise UserError(f"{bits} needs a CUDA GPU (bitsandbytes)", field=bits)
        from transformers import BitsAndBytesConfig

        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        compute = torch.float32 if self.dtype == "auto" else getattr(torch, self.dtype)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute,
                                  bnb_4bit_quant_type=self.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=self.use_bnb_nested_quant)

    def tokenizer_kwargs(self) -> dict[str, Any]:
        """``AutoTokenizer.from_pretrained``'s keyword arguments."""
        return {"trust_remote_code": self.trust_remote_code,
                **({"revision": self.model_revision} if self.model_revision else {})}

    def check_machine(self) -> None:
        """Stop with one line (exit 2) when this machine cannot honour a model setting: a
        flash-attention kernel whose package is missing, quantization without bitsandbytes or a
        CUDA GPU. A stage calls it first, before it reads data or loads anything."""
        if self.attn_implementation and self.attn_implementation.startswith("flash_attention"):
            import importlib.util

            package = "flash_attn" if self.attn_implementation == "flash_attention_2" \
                else "flash_attn_interface"
            if importlib.util.find_spec(package) is None:
                raise UserError(f"attn_implementation {self.attn_implementation} needs the "
                                f"{package} package (and a CUDA GPU); use sdpa or eager",
                                field="attn_implementation")
        self.quantization_config()

    def load_kwargs(self, *, quantize: bool = True) -> dict[str, Any]:
        """``from_pretrained``'s keyword arguments, as TRL's scripts build them from a
        ``ModelConfig``: revision, dtype, attention, remote code, and (unless not ``quantize``:
        a model trained whole) quantization, placed by ``device_map``, one GPU per process.
        Checks the machine first (:meth:`check_machine`)."""
        import torch

        self.check_machine()
        kwargs: dict[str, Any] = {
            **self.tokenizer_kwargs(),
            "dtype": "auto" if self.dtype == "auto" else getattr(torch, self.dtype)}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        quantization = self.quantization_config() if quantize else None
        if quantization is not None:
            from accelerate import PartialState

            kwargs["quantization_config"] = quantization
            kwargs["device_map"] = {"": PartialState().local_process_index}
        return kwargs

    def mixed_precision(self) -> bool:
        """``bf16`` resolved: unset, on a GPU that supports it."""
        if self.bf16 is not None:
            return self.bf16
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    def prepare_for_training(self, model: Any) -> Any:
        """A loaded model made ready to train: quantized weights prepared for LoRA (PEFT's
        ``prepare_model_for_kbit_training``), gradient checkpointing on when asked (the loops
        that are not a Trainer's call this; TRL's trainers do it from their arguments)."""
        if self.load_in_4bit or self.load_in_8bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        elif self.gradient_checkpointing:
            checkpoint_activations(model)
        return model


def checkpoint_activations(model: Any) -> None:
    """Gradient (activation) checkpointing on ``model``, non-reentrant, under transformers'
    name of the day (``activation_checkpointing_enable`` since v5.2x)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpoint_args(args_class: type, on: bool) -> dict[str, Any]:
    """The arguments that turn gradient checkpointing on or off in ``args_class``, under its
    name (``activation_checkpointing`` in newer transformers, ``gradient_checkpointing``
    before)."""
    fields = getattr(args_class, "__dataclass_fields__", {})
    name = ("activation_checkpointing" if "activation_checkpointing" in fields
            else "gradient_checkpointing")
    return {name: on, **({f"{name}_kwargs": {"use_reentrant": False}} if on else {})}


class LoraSettings(Settings):
    """LoRA adapters (PEFT), merged into a plain model directory at the end; TRL's names."""

    lora: bool = Field(False, description="Train LoRA adapters (merged at the end).")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: LoraAlpha = None
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    lora_target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="The modules that get adapters: all-linear (every linear "
                                  "layer but the output head) or a list of module names "
                                  "(q_proj,v_proj …).",
        json_schema_extra={"cli_type": str})

    @model_validator(mode="before")
    @classmethod
    def _target_modules(cls, data: Any) -> Any:
        """``--lora-target-modules q_proj,v_proj`` (the CLI's one string) is a list."""
        if isinstance(data, dict) and isinstance(data.get("lora_target_modules"), str) \
                and data["lora_target_modules"] != "all-linear":
            data = dict(data)
            data["lora_target_modules"] = [m.strip() for m in
                                           data["lora_target_modules"].split(",") if m.strip()]
        return data

    def peft_config(self, task_type: str = "CAUSAL_LM") -> Any:
        """PEFT's LoRA config (as TRL's ``get_peft_config``), or None without ``lora``."""
        if not self.lora:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha or 2 * self.lora_r,
                          lora_dropout=self.lora_dropout, target_modules=self.lora_target_modules,
                          task_type=task_type, bias="none")


class TrainSettings(ModelSettings):
    """The settings every TRL training stage has (SFT, preference model, DPO)."""

    gradient_checkpointing: GradientCheckpointing = True  # TRL's default for these trainers

    epochs: Epochs = 1.0
    learning_rate: float | None = Field(None, gt=0, description="Peak learning rate (cosine "
                                                                "schedule, 5% warm-up).")
    batch_size: BatchSize = 8
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(1024, ge=1, description="Tokens per training example at most.")
    eval_fraction: EvalFraction = 0.1
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps.")
    logging_steps: int = Field(5, ge=1, description="Log the training loss every N steps.")


class LoraTrainSettings(TrainSettings, LoraSettings):
    """:class:`TrainSettings` and LoRA, for the stages that train a causal language model."""


class TrainRun(Settings):
    """What a run adds to a training stage's settings besides its inputs and output."""

    seed: int = Field(0, description="Seed (model init, data order, sampling).")
    resume: bool = Field(False, description="Continue from the newest checkpoint.")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 … (default: a GPU when "
                                                 "there is one, else the CPU).")

    omit_unset = ("device",)


# ------------------------------------------------------------------------------------------------
# the recipe


@dataclass
class TrainJob:
    """What a stage supplies to :func:`run_trainer`; everything else is the same for all."""

    model: str  # the model spec to train
    out: Path  # the model directory; checkpoints go to OUT/checkpoints
    trainer_class: type
    args_class: type  # TRL's arguments class, built with trainer_args + ``args``
    learning_rate: float
    # tokenizer → (train dataset, held-out dataset or None)
    datasets: Callable[[Any], tuple[Any, Any]]
    # (path, tokenizer, from_pretrained's keyword arguments) → model; loaded after the arguments
    load_model: Callable[[str, Any, dict[str, Any]], Any]
    args: dict[str, Any] = field(default_factory=dict)  # the stage's own arguments
    evaluate: str = "epoch"  # the eval strategy; "no" when there is no held-out set
    # tokenizer → further trainer arguments (a data collator)
    trainer_kwargs: Callable[[Any], dict[str, Any]] = lambda tokenizer: {}
    before: dict[str, str] = field(default_factory=dict)  # metric → key of the eval before
    after: dict[str, str] = field(default_factory=dict)  # metric → key of the eval after
    log_keys: tuple[str, ...] = ("step", "loss", "eval_loss", "epoch")  # kept in train_log


def run_trainer(config: Any, job: TrainJob) -> dict[str, Any]:
    """Train as ``job`` says with ``config``'s :class:`TrainSettings`, ``seed`` and ``resume``
    (and LoRA, for :class:`LoraTrainSettings`); save to ``job.out``; return the metrics:
    ``job.before``, ``train_loss``, ``steps``, ``train_log``, ``job.after`` (the evaluations
    only with a held-out set), floats rounded to 4 digits. Every process runs this."""
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    path = trainable_model_path(job.model)
    checkpoints = job.out / "checkpoints"
    device = getattr(config, "device", None)
    load_kwargs = config.load_kwargs()  # a wrong model setting stops the stage before training
    args = make_args(job.args_class, device, **job.args, **trainer_args(
        output_dir=str(checkpoints), epochs=config.epochs, learning_rate=job.learning_rate,
        batch_size=config.batch_size, grad_accum=config.grad_accum,
        logging_steps=config.logging_steps, save_steps=config.save_steps, seed=config.seed,
        evaluate=job.evaluate, device=device, bf16=config.mixed_precision(),
        gradient_checkpointing=config.gradient_checkpointing, args_class=job.args_class))
    tokenizer = load_pretrained(AutoTokenizer, path, "tokenizer", **config.tokenizer_kwargs())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = job.load_model(path, tokenizer, load_kwargs)
    if config.load_in_4bit or config.load_in_8bit:
        model = config.prepare_for_training(model)
    train_ds, eval_ds = job.datasets(tokenizer)
    lora = config.peft_config() if isinstance(config, LoraTrainSettings) else None
    trainer = job.trainer_class(model=model, args=args, train_dataset=train_ds,
                                eval_dataset=eval_ds, processing_class=tokenizer,
                                peft_config=lora, **job.trainer_kwargs(tokenizer))
    trainer.remove_callback(PrinterCallback)  # the CLI prints the losses; the library logs them
    trainer.add_callback(log_callback())
    resume = last_complete_checkpoint(checkpoints) if config.resume else None
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    metrics: dict[str, Any] = {}
    if eval_ds is not None:
        before = eval_before(trainer)
        metrics.update({name: before.get(key) for name, key in job.before.items()})
    metrics["train_loss"] = result.training_loss
    metrics["steps"] = result.global_step
    metrics["train_log"] = [{k: v for k, v in e.items() if k in job.log_keys}
                            for e in trainer.state.log_history if "loss" in e or "eval_loss" in e]
    if eval_ds is not None:
        after = trainer.evaluate()
        metrics.update({name: after.get(key) for name, key in job.after.items()})
    save_model(trainer, tokenizer, job.out, merge_lora=lora is not None)
    return rounded(metrics)


def save_model(trainer: Any, tokenizer: Any, out: Path, *, merge_lora: bool = False) -> None:
    """Save the trained model to ``out`` as a plain model directory. Every process calls
    ``trainer.save_model``: it gathers FSDP / ZeRO-3 shards, and only the main process writes.
    LoRA adapters are saved to ``out/adapter`` and merged into ``out`` by the main process (DDP
    and ZeRO-2 keep the full weights on every process)."""
    if merge_lora:
        trainer.save_model(str(out / "adapter"))
        if trainer.is_world_process_zero():
            trainer.model.merge_and_unload().save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
    else:
        trainer.save_model(str(out))
    trainer.accelerator.wait_for_everyone()


def causal_lm(path: str, tokenizer: Any, kwargs: dict[str, Any] | None = None) -> Any:
    """A :attr:`TrainJob.load_model` for causal language models: ``from_pretrained`` with
    ``kwargs`` (:meth:`ModelSettings.load_kwargs`; by default float32, bf16 autocast on GPUs
    coming from the training arguments)."""
    import torch
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, path, "model",
                           **(kwargs if kwargs is not None else {"dtype": torch.float32}))


def rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    """Finite floats rounded to 4 digits (the others as they are)."""
    return {k: round(v, 4) if isinstance(v, float) and math.isfinite(v) else v
            for k, v in metrics.items()}


def write_report(file: Path, config: Settings, metrics: dict[str, Any]) -> None:
    """``{"config": ..., "metrics": ...}`` as JSON (the main process calls this)."""
    from constitutional.core.io import atomic_write_text

    atomic_write_text(file, json.dumps({"config": config.to_dict(), "metrics": metrics},
                                       indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------------------
# the pieces


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest ``checkpoint-N`` in ``checkpoints`` that the Trainer finished writing, or None.

    The Trainer writes ``trainer_state.json`` after the weights, the optimizer, the scheduler and
    the random state, so a checkpoint whose state file is missing or unreadable was cut short (a
    kill or a full disk while saving). Resuming from it fails (transformers picks the highest
    number); it is skipped, with a warning, and the next complete one is used."""
    found = []
    for path in checkpoints.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if path.is_dir() and step.isdigit():
            found.append((int(step), path))
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("skipping %s: it was not written to the end (no readable "
                        "trainer_state.json); resuming from an earlier checkpoint", path)
            continue
        return path
    return None


def log_callback() -> Any:
    """A Trainer callback that sends the loss logs to ``logging`` (the CLI decides what reaches
    the terminal), once per step, not once per process."""
    from transformers import TrainerCallback

    class LogCallback(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any,
                   logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if not logs or not state.is_world_process_zero:
                return
            # 4 significant digits: a learning rate of 5e-05 must not read 0.0
            shown = {k: float(f"{v:.4g}") if isinstance(v, float) else v
                     for k, v in logs.items()
                     if k in ("loss", "eval_loss", "learning_rate", "epoch", "grad_norm")}
            if shown:
                log.info("step %d: %s", state.global_step, shown)

    return LogCallback()


def trainer_args(*, output_dir: str, epochs: float, learning_rate: float, batch_size: int,
                 grad_accum: int, logging_steps: int, save_steps: int, seed: int,
                 evaluate: str, device: str | None = None, bf16: bool | None = None,
                 gradient_checkpointing: bool = False, args_class: type | None = None,
                 ) -> dict[str, Any]:
    """The TrainingArguments our three TRL trainers (SFT, reward, DPO) share: cosine schedule
    with 5% warm-up, two kept checkpoints, no reporting or progress bars, bf16 as ``bf16`` says
    (unset: on GPUs that have it), gradient checkpointing when asked, and the CPU when there is
    no GPU or ``device`` is cpu.

    The held-out set is evaluated once before training with ``eval_on_start`` (see
    :func:`eval_before`), inside ``train()``, never by a ``trainer.evaluate()`` call beforehand:
    that call prepares the model for evaluation, which marks it as prepared, and ``train()`` then
    skips the DDP wrapper, so under ``accelerate launch`` every process silently trains its own
    copy on its own shard (no gradient all-reduce), and the main process saves its copy."""
    import torch

    return {
        "output_dir": output_dir, "num_train_epochs": epochs, "learning_rate": learning_rate,
        "per_device_train_batch_size": batch_size, "per_device_eval_batch_size": batch_size,
        "gradient_accumulation_steps": grad_accum, "logging_steps": logging_steps,
        "save_strategy": "steps", "save_steps": save_steps, "save_total_limit": 2,
        "eval_strategy": evaluate, "eval_on_start": evaluate != "no",
        "report_to": "none", "seed": seed, "data_seed": seed, "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05, "dataloader_num_workers": 0, "disable_tqdm": True,
        "bf16": (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if bf16 is None
        else bf16,
        "use_cpu": not torch.cuda.is_available() or device == "cpu",
        **checkpoint_args(args_class, gradient_checkpointing),
    }


def training_device(device: str | None) -> str | None:
    """``device`` checked for training: None or auto (a GPU when there is one, else the CPU),
    cpu, cuda or cuda:N; one this machine lacks is one line, exit 2."""
    if device in (None, "", "auto"):
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N",
                        field="device") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device}: no CUDA GPU is visible here (use cpu, or leave "
                            "device unset)", field="device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device}: there are {torch.cuda.device_count()} CUDA "
                            "GPU(s) here", field="device")
        if dev.index is not None and _world_size() > 1:
            raise UserError(f"device {device}: under accelerate launch each process takes its "
                            "own GPU; set device: cuda (or leave it unset)", field="device")
        return str(dev)
    raise UserError(f"device {device}: training runs on cpu, cuda or cuda:N", field="device")


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def on_device(device: str | None) -> Iterator[str | None]:
    """Within this block, accelerate's process state (made by TRL's arguments or an
    ``Accelerator``) takes ``device`` (checked by :func:`training_device`, and yielded):
    ``cuda:N`` becomes the current CUDA device and accelerate's ``ACCELERATE_TORCH_DEVICE``."""
    import os

    import torch

    device = training_device(device)
    if device is None or device == "cpu" or ":" not in device:
        yield device
        return
    before = os.environ.get("ACCELERATE_TORCH_DEVICE")
    os.environ["ACCELERATE_TORCH_DEVICE"] = device
    try:
        torch.cuda.set_device(torch.device(device))
        yield device
    finally:
        if before is None:
            os.environ.pop("ACCELERATE_TORCH_DEVICE", None)
        else:
            os.environ["ACCELERATE_TORCH_DEVICE"] = before


def make_args(args_class: type, device: str | None, **kwargs: Any) -> Any:
    """``args_class(**kwargs)`` (TRL's TrainingArguments) on ``device`` (see :func:`on_device`);
    with ``cuda:N`` the arguments take that GPU alone (else they take cuda:0, and every GPU
    through DataParallel)."""
    import torch

    with on_device(device) as dev:
        args = args_class(**kwargs)
        if dev is not None and ":" in dev:
            args.__dict__["_setup_devices"] = torch.device(dev)  # a cached_property
            args._n_gpu = 1
    return args


def eval_before(trainer: Any) -> dict[str, Any]:
    """The held-out metrics before training: the step-0 evaluation of ``eval_on_start`` (kept in
    the checkpoint's log history, so a resumed run reports the first launch's figures)."""
    for entry in trainer.state.log_history:
        if entry.get("step") == 0 and any(k.startswith("eval_") for k in entry):
            return entry
    return {}


def trainable_model_path(spec: str) -> str:
    """A local directory for a model spec that can be trained (the built-in model is converted
    once; a hub id is returned as is); an HTTP model is a one-line error."""
    from constitutional.core.errors import UserError
    from constitutional.models import parse_spec

    parsed = parse_spec(spec)
    if parsed.backend != "hf":
        raise UserError(f"cannot finetune {spec!r}: training needs a local or hub model",
                        field="model")
    if parsed.builtin:
        from constitutional.models.builtin import ensure_checkpoint

        return str(ensure_checkpoint(parsed.builtin))
    return parsed.target


def load_pretrained(cls: Any, path: str, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, **kwargs)``; a model or tokenizer that cannot be loaded (a
    missing or unreadable directory, a broken config, truncated weights) is one line, exit 2."""
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise UserError(f"cannot load the {what} from {path!r}: {first}") from err


def check_settings_unchanged(file: Path, now: dict[str, Any],
                             may_change: frozenset[str]) -> None:
    """A resumed run continues the run its checkpoints came from, with the same settings."""
    from constitutional.core.errors import UserError

    if not file.exists():
        return
    try:
        before = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the settings of the run to resume ({err})",
                        file=file) from err
    now = json.loads(json.dumps(now, default=str))
    changed = sorted(k for k in set(before) | set(now)
                     if k not in may_change and before.get(k) != now.get(k))
    if changed:
        k = changed[0]
        raise UserError(f"the checkpoints here were made with {k}={before.get(k)!r}, now "
                        f"{k}={now.get(k)!r}; use a new output directory, or the same "
                        "settings to resume", file=file, field=k)


def process_state(device: str | None = None) -> Any:
    """accelerate's process state: one process, or this one of ``accelerate launch``'s. On a
    machine without CUDA, or with ``device`` cpu, the processes use CPU and gloo (as the
    Trainer's ``use_cpu`` does). A device this machine lacks is one line, exit 2."""
    import torch
    from accelerate import PartialState

    device = training_device(device)
    return PartialState(cpu=not torch.cuda.is_available() or device == "cpu")
