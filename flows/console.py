"""Terminal output shared by the commands: progress bars, summaries, one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

MAX_LISTED = 20  # failures printed in full; the rest are in the run's failures file


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", markup=True)


def list_failures(lines: Sequence[object], where_all: str | None = None) -> None:
    for line in lines[:MAX_LISTED]:
        out.print(f"  [red]✗[/] {line}", markup=True)
    if len(lines) > MAX_LISTED:
        rest = f"… and {len(lines) - MAX_LISTED} more"
        out.print(f"  {rest}" + (f" (all in {where_all})" if where_all else ""))


@contextmanager
def progress_bar(description: str, unit: str) -> Iterator[Progress]:
    """A progress bar on stderr; hidden when stderr is not a terminal."""
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn(unit), TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, disable=not sys.stderr.isatty(), transient=False) as bar:
        yield bar
