"""Rich progress bars on stderr; silent when the user asked for --quiet or --json."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mergeq.core import faults  # inert unless MERGEQ_FAULT is set (kill tests hold a run at a unit of work)

QUIET_ENV = "MERGEQ_QUIET"


_console: Console | None = None


def stderr_console() -> Console:
    """The one stderr console: log lines print above a live display, and a progress bar opened while another live
    display runs (the run's matrix view) nests inside it."""
    global _console
    if _console is None:
        _console = Console(stderr=True)
    return _console


def quiet() -> bool:
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


@contextlib.contextmanager
def progress_bar() -> Iterator[Progress]:
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        disable=quiet(),
        transient=False,
    )
    with bar:
        yield bar


def track(items: Iterable, description: str, total: int | None = None) -> Iterator:
    """Iterate over `items` with a progress bar named `description`."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar() as bar:
        task = bar.add_task(description, total=total)
        for number, item in enumerate(items, 1):
            faults.progress(f"{description} {number}/{total or '?'}")
            yield item
            bar.advance(task)
