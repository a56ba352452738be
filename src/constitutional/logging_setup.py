"""Terminal logging for the CLI. Library code logs through ``logging``; only the CLI prints."""

from __future__ import annotations

import logging
import os
import warnings

from rich.console import Console
from rich.logging import RichHandler

#: Where diagnostics go. stdout is kept for results (answers, tables) so they can be piped.
err_console = Console(stderr=True)


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    # third-party chatter stays quiet unless asked for
    for name in ("httpx", "httpcore", "openai", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
