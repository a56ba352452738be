"""Where the toolkit keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path


def cai_home() -> Path:
    """The cache root: ``$CAI_HOME``, default ``~/.cache/constitutional``."""
    return Path(os.environ.get("CAI_HOME") or Path.home() / ".cache" / "constitutional")
