"""The live view of a run's matrix, drawn by the driver for every executor: rows are artifacts (matrix rows),
columns are stages, each cell the stage's state and elapsed time.

Executors report what happens (`started`, `finished`, `failed`, `blocked`); the view keeps the times (the driver's
clock, whatever node ran the stage) and redraws on stderr (mergeq.core.progress: silent under --quiet and --json).
Progress bars of stages that run in this process (the local executor) nest inside it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from rich.live import Live
from rich.table import Table

from mergeq.core.progress import quiet, stderr_console
from mergeq.plan import Plan

WAITING, RUNNING, DONE, SKIPPED, FAILED, BLOCKED = "waiting", "running", "done", "skipped", "failed", "blocked"
STYLE = {WAITING: "dim", RUNNING: "bold yellow", DONE: "green", SKIPPED: "cyan", FAILED: "bold red", BLOCKED: "red"}


@dataclass
class Cell:
    state: str = WAITING
    started: float | None = None
    finished: float | None = None
    attempts: int = 0  # starts seen: more than one means the executor retried it (a worker or node died)
    where: str = ""  # the node or process that runs it, when the executor says


class MatrixView:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.cells = {task.id: Cell() for task in plan.tasks}
        self.lock = threading.Lock()
        self.started = time.monotonic()

    # ---------------------------------------------------------------------------------------- events

    def started_task(self, task_id: str, where: str = "") -> None:
        with self.lock:
            cell = self.cells[task_id]
            cell.attempts += 1
            cell.state, cell.started, cell.finished, cell.where = RUNNING, time.monotonic(), None, where

    def finished(self, task_id: str, ran: bool) -> None:
        with self.lock:
            cell = self.cells[task_id]
            cell.state, cell.finished = (DONE if ran else SKIPPED), time.monotonic()
            cell.started = cell.started if cell.started is not None else cell.finished

    def failed(self, task_id: str) -> None:
        with self.lock:
            cell = self.cells[task_id]
            cell.state, cell.finished = FAILED, time.monotonic()

    def blocked(self, task_id: str) -> None:
        with self.lock:
            self.cells[task_id].state = BLOCKED

    def states(self) -> dict[str, str]:
        with self.lock:
            return {task_id: cell.state for task_id, cell in self.cells.items()}

    # ---------------------------------------------------------------------------------------- drawing

    def text(self, task_id: str) -> str:
        cell = self.cells.get(task_id)
        if cell is None:
            return ""
        words = cell.state
        if cell.started is not None:
            words += f" {(cell.finished or time.monotonic()) - cell.started:.0f}s"
        if cell.attempts > 1:
            words += f" (try {cell.attempts})"
        if cell.where and cell.state == RUNNING:
            words += f" @{cell.where}"
        return f"[{STYLE[cell.state]}]{words}[/]"

    def table(self) -> Table:
        with self.lock:
            elapsed = time.monotonic() - self.started
            done = sum(c.state in (DONE, SKIPPED) for c in self.cells.values())
            table = Table(
                title=f"mergeq run: {done}/{len(self.cells)} stages finished, {elapsed:.0f}s", title_justify="left"
            )
            table.add_column("artifact", no_wrap=True)
            for column in self.plan.columns:
                table.add_column(column, no_wrap=True)
            for row in self.plan.rows:
                table.add_row(
                    row or "(model)", *(self.text(f"{row}/{column}" if row else column) for column in self.plan.columns)
                )
            return table

    @contextlib.contextmanager
    def live(self) -> Iterator[MatrixView]:
        """Redraw the view on stderr while the block runs; print it once more, final, at the end."""
        with (
            Live(
                get_renderable=self.table,
                console=stderr_console(),
                refresh_per_second=2,
                transient=False,
                redirect_stdout=False,
            )
            if not quiet()
            else contextlib.nullcontext()
        ):
            yield self
