"""Terminal logging for the CLI. Library code logs through ``logging``; only the CLI prints."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from rich.console import Console
from rich.logging import RichHandler

#: Where diagnostics go. stdout is kept for results (answers, tables) so they can be piped.
err_console = Console(stderr=True)


class _StderrHandler(logging.StreamHandler):
    """A plain handler on whatever ``sys.stderr`` is when a record is written, not the stream of
    the moment it was made: a program (or a test) that swaps stderr and closes the old one would
    otherwise get "--- Logging error --- … I/O operation on closed file" from library logs."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    # on a terminal, rich; in a pipe or a log file, one plain line per record (rich would wrap
    # a long warning over several lines at 80 columns)
    handler: logging.Handler = (
        RichHandler(console=err_console, show_path=False, show_time=False)
        if err_console.is_terminal else _StderrHandler())
    if not err_console.is_terminal:
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
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
