"""One stderr console for logs and progress; stdout is left for machine-readable output."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True, highlight=False)


def log(msg: str) -> None:
    console.print(f"[dim]bdclean[/dim] {msg}")


def progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
