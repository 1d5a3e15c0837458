"""Progress output for long steps, on stderr so that stdout stays parseable."""

from __future__ import annotations

import contextlib
import time

from rich.console import Console

console = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def step(title: str, timings: dict[str, float] | None = None, key: str | None = None):
    """Show a spinner while a step runs, then one line with its duration."""
    start = time.perf_counter()
    with console.status(f"{title} ..."):
        yield
    elapsed = time.perf_counter() - start
    if timings is not None:
        timings[key or title] = round(elapsed, 3)
    console.print(f"[green]✓[/green] {title} [dim]({elapsed:.1f} s)[/dim]")
