"""Progress on stderr with rich, when stderr is a terminal; nothing otherwise (pipes, logs, CI)."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress as RichBar, SpinnerColumn, TextColumn,
                           TimeElapsedColumn)

from ..progress import QUIET, Progress


class TerminalProgress(Progress):
    """Each step is a live line (spinner, or a bar with bytes when ``total`` is known) that becomes a
    ``✓ description (seconds)`` line when it ends; a step that raises leaves no line (its error follows)."""

    def __init__(self, console: Console):
        self.console = console

    @contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total:
            columns += [BarColumn(), DownloadColumn()]
        columns.append(TimeElapsedColumn())
        start = time.monotonic()
        with RichBar(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total or None)
            yield lambda completed: bar.update(task, completed=completed)
        self.console.print(f"[green]✓[/green] {description} ({time.monotonic() - start:.1f} s)", highlight=False)


def stderr_progress() -> Progress:
    """A :class:`TerminalProgress` on stderr if stderr is a terminal, else :data:`exitless.progress.QUIET`."""
    if not sys.stderr.isatty():
        return QUIET
    return TerminalProgress(Console(file=sys.stderr))
