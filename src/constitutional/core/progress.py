"""Progress bars on stderr (transient, silent when stderr is not a terminal) and chunking."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from constitutional.core.log import err_console

T = TypeVar("T")


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient rich progress bar on stderr (silent when stderr is not a terminal).

    Yields ``advance(n)``.
    """
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=err_console, transient=True,
        disable=not err_console.is_terminal,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
