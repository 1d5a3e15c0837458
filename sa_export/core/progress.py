"""Progress output for long steps, on stderr so that stdout stays parseable."""

from __future__ import annotations

import contextlib
import time

from rich.console import Console

from sa_export.core.signals import raise_if_terminated

console = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def step(title: str, timings: dict[str, float] | None = None, key: str | None = None):
    """Show a spinner while a step runs, then one line with its duration."""
    start = time.perf_counter()
    with console.status(f"{title} ..."):
        yield
    raise_if_terminated()
    elapsed = time.perf_counter() - start
    if timings is not None:
        timings[key or title] = round(elapsed, 3)
    console.print(f"[green]✓[/green] {title} [dim]({elapsed:.1f} s)[/dim]")


@contextlib.contextmanager
def progress_bar(title: str, unit: str = "step"):
    """A progress bar; yields ``advance(done, total)`` for the work loop to call."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    start = time.perf_counter()
    columns = (TextColumn(title), BarColumn(), MofNCompleteColumn(), TextColumn(unit + "s"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(title, total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield advance
    console.print(f"[green]✓[/green] {title} [dim]({time.perf_counter() - start:.1f} s)[/dim]")
