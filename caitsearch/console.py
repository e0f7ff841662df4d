"""Terminal output for every stage: the two consoles, log lines, and the one progress-bar factory.

Results go to stdout (`say`), everything else to stderr (`log`, progress), so `--json` output stays
one clean document. Text is printed without markup interpretation: a user's path such as
`runs/[bold]x` is shown as typed, never read as rich markup (error lines and tables too). Progress is a rich bar on a terminal
and, where stderr is a file or a pipe (CI, `nohup`), one plain line per task every
`CAITSEARCH_PROGRESS_SECONDS` (default 120) plus one when a task finishes, so long work is never
silent in a log.
"""
from __future__ import annotations

import os
import time
from typing import Iterable, Optional, Sequence

from rich.console import Console
from rich.markup import escape
from rich.text import Text

err = Console(stderr=True)
out = Console(soft_wrap=True)

__all__ = ["Progress", "Task", "err", "escape", "log", "log_error", "out", "print_table", "say"]


def log(message: str) -> None:
    """One line on stderr, printed literally."""
    err.print(message, markup=False, highlight=False, soft_wrap=True)


def say(message: str) -> None:
    """One line of results on stdout, printed literally."""
    out.print(message, markup=False, highlight=False, soft_wrap=True)


def log_error(message: str, prefix: str = "error") -> None:
    """One line on stderr: a red `prefix:` and `message` printed literally, line breaks folded, so
    an error is always exactly one line however it was worded."""
    text = " ".join(message.split())
    err.print(Text.assemble((f"{prefix}: ", "red"), text) if prefix else Text(text), highlight=False, soft_wrap=True)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A right-aligned results table on stdout; the title and every cell are shown literally."""
    from rich.table import Table

    table = Table(title=Text(title))
    for column in columns:
        table.add_column(Text(column), justify="right")
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))
    out.print(table)


def _every_seconds() -> float:
    try:
        return max(1.0, float(os.environ.get("CAITSEARCH_PROGRESS_SECONDS", "120")))
    except ValueError:
        return 120.0


class Task:
    """One progress line: `done` of `total` steps, a description and a short free-text `info`."""

    def __init__(self, owner: "Progress", description: str, total: Optional[float], completed: float) -> None:
        self.owner, self.description, self.total, self.completed, self.info = owner, description, total, completed, ""
        self.started = time.monotonic()
        self.first = completed
        self._rich_id = None
        self._last_line = time.monotonic()
        self._finished = False

    def update(self, completed: Optional[float] = None, advance: float = 0.0, description: Optional[str] = None,
               info: Optional[str] = None, total: Optional[float] = None) -> None:
        if completed is not None:
            self.completed = completed
        self.completed += advance
        if description is not None:
            self.description = description
        if info is not None:
            self.info = info
        if total is not None:
            self.total = total
        self.owner._refresh(self)

    def advance(self, steps: float = 1.0) -> None:
        self.update(advance=steps)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        text = f"{self.description}: {self.completed:g}"
        if self.total:
            text += f"/{self.total:g}"
            rate = (self.completed - self.first) / elapsed if elapsed > 0 else 0.0
            if 0 < rate and self.completed < self.total:
                text += f", about {_duration((self.total - self.completed) / rate)} left"
        text += f" ({_duration(elapsed)} elapsed)"
        return text + (f" {self.info}" if self.info else "")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Progress of long work on stderr: `with Progress(enabled) as p: t = p.task("train", 100)`.

    A rich bar on a terminal; elsewhere a plain line per task every few minutes and at the end.
    Disabled (`enabled=False`, e.g. under `--json`), it prints nothing.
    """

    def __init__(self, enabled: bool = True, console: Optional[Console] = None) -> None:
        self.console = console or err
        self.enabled = enabled
        self.tasks: list[Task] = []
        self._rich = None
        if enabled and self.console.is_terminal:
            from rich.progress import (
                BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      console=self.console, transient=False)
        self._every = _every_seconds()

    def __enter__(self) -> "Progress":
        if self._rich is not None:
            self._rich.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            if exc[0] is not None:  # an error or Ctrl-C: clear the bar, so its one line stands alone
                self._rich.live.transient = True
            self._rich.__exit__(*exc)
        elif self.enabled and exc[0] is None:
            for task in self.tasks:
                self._finish(task)

    def task(self, description: str, total: Optional[float] = None, completed: float = 0.0) -> Task:
        task = Task(self, description, total, completed)
        self.tasks.append(task)
        if self._rich is not None:
            task._rich_id = self._rich.add_task(escape(description), total=total, completed=completed, info="")
        return task

    def _refresh(self, task: Task) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(task._rich_id, completed=task.completed, description=escape(task.description),
                              info=escape(task.info), total=task.total)
            return
        if task.total is not None and task.completed >= task.total:
            self._finish(task)
        elif time.monotonic() - task._last_line >= self._every:
            task._last_line = time.monotonic()
            log(task.line())

    def _finish(self, task: Task) -> None:
        if not task._finished and (task.completed > task.first or task.total == 0):
            task._finished = True
            log(task.line())
