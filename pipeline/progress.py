"""Progress of long runs: a rich bar on a terminal, plain timestamped lines when output goes to a file or a pipe
(a log then reads as it goes instead of getting every bar frame at the end)."""

from __future__ import annotations

import math
import time
from types import TracebackType
from typing import Any

from rich.console import Console

__all__ = ["ProgressReporter"]


class ProgressReporter:
    """Count `completed` of `total` items; extra fields (e.g. diverged=3) are shown with the count.

    On a terminal: a rich bar (description, bar, M/N, fields, elapsed, ETA). Otherwise one line per `every` items
    (default: about 20 lines per run) and one at the end: `scoring: 500/10000 files (5%), 12 s, eta 228 s`.
    """

    def __init__(self, description: str, total: int, *, unit: str = "", completed: int = 0,
                 console: Console | None = None, every: int | None = None, enabled: bool = True,
                 **fields: Any) -> None:
        self.description, self.total, self.unit = description, int(total), unit
        self.completed, self.start_completed = int(completed), int(completed)
        self.console = console or Console()
        self.fields = dict(fields)
        self.enabled = enabled and self.total > 0
        self.every = max(1, every or math.ceil(max(self.total - self.completed, 1) / 20))
        self._next_line = self.completed + self.every
        self._start = time.perf_counter()
        self._bar: Any = None
        self._task: Any = None
        if self.enabled and self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
            if unit:
                columns.append(TextColumn(unit))
            columns += [TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn()]
            self._bar = Progress(*columns, console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task(description, total=self.total, completed=self.completed,
                                            info=self._info())

    def _info(self) -> str:
        return "  ".join(f"{k} {v}" for k, v in self.fields.items())

    def advance(self, n: int = 1, **fields: Any) -> None:
        """Count `n` more items done; `fields` replace the shown extra values."""
        if not self.enabled:
            return
        self.completed += int(n)
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, info=self._info())
        elif self.completed >= self._next_line or self.completed >= self.total:
            self._next_line = self.completed + self.every
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self._start
        done_now = self.completed - self.start_completed
        left = self.total - self.completed
        eta = f", eta {elapsed / done_now * left:.0f} s" if done_now and left > 0 else ""
        unit = f" {self.unit}" if self.unit else ""
        extra = f", {self._info()}" if self.fields else ""
        pct = 100 * self.completed / self.total
        self.console.print(f"{self.description}: {self.completed}/{self.total}{unit} ({pct:.0f}%){extra}, "
                           f"{elapsed:.0f} s{eta}", highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        """Stop the bar (on a terminal; plain lines need no closing)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
