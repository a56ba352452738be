"""The guard around code that leans on private internals of torch and transformers.

The CPU engine (:mod:`constitutional.models.engines.cascade`: its own attention function and KV cache,
PyTorch's CPU flash kernel, oneDNN's ``mkldnn_linear``) and the preallocated-cache path of
:mod:`constitutional.models.hf_generate` (``StaticCache`` layer internals) use APIs that a new release of
torch or transformers may change without notice; transformers 5.24 did, and every fresh install
crashed. So they run only

1. on the torch and transformers versions they were tested with (:data:`TESTED`, major.minor),
   or anywhere when ``CAI_ENGINE_UNTESTED=1`` (``make test-latest`` sets it, so that the drift
   canary exercises the engine on the newest releases); and
2. after a self-check at load (:class:`constitutional.models.hf_generate.HFGenerator`): a tiny forward
   through the engine must give the stock forward's logits.

Otherwise the backend uses transformers' stock ``generate`` and prints **one** warning line
naming the versions. Results are the same; only the speed differs.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version

log = logging.getLogger(__name__)

#: The releases (major.minor) the engine was tested with: the lock's versions.
TESTED: dict[str, tuple[str, ...]] = {"torch": ("2.13",), "transformers": ("5.23",)}
#: Set to 1 to use the engine on untested versions too (the self-check still applies).
ENV_UNTESTED = "CAI_ENGINE_UNTESTED"

_warned: set[str] = set()


def installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _minor(v: str) -> str:
    return ".".join(v.split("+")[0].split(".")[:2])


def untested() -> list[str]:
    """The installed versions outside :data:`TESTED`, e.g. ``["transformers 5.24.0"]``."""
    return [f"{pkg} {installed(pkg)}" for pkg, ok in TESTED.items()
            if _minor(installed(pkg)) not in ok]


def tested_text() -> str:
    return " and ".join(f"{pkg} {'/'.join(v)}" for pkg, v in TESTED.items())


def versions_text() -> str:
    return ", ".join(f"{pkg} {installed(pkg)}" for pkg in TESTED)


def internals_allowed() -> tuple[bool, str | None]:
    """Whether the private-internals paths may run here, and why not."""
    if os.environ.get(ENV_UNTESTED, "") in ("1", "true", "yes"):
        return True, None
    bad = untested()
    if bad:
        return False, (f"it is tested with {tested_text()}, found {', '.join(bad)} "
                       f"(set {ENV_UNTESTED}=1 to try it)")
    return True, None


def warn_once(reason: str) -> None:
    """One warning line per distinct reason and process."""
    if reason not in _warned:
        _warned.add(reason)
        log.warning("the fast CPU engine is off: %s; using transformers' stock generate "
                    "(same results, slower)", reason)
