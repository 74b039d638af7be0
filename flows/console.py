"""Terminal output shared by the commands: progress bars, summaries, one-line errors.

Everything printed is literal: paths, ids and messages may hold ``[bold]`` or ``[/]`` and
print as they are. Styling goes through :func:`headline`, :func:`alert` and :func:`error`,
which style their fixed words and never parse the text they are given."""

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
from rich.text import Text

out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)

MAX_LISTED = 20  # failures printed in full; the rest are in the run's failures file


def headline(command: str, rest: str) -> None:
    """``command`` in bold, then ``rest`` as it is (a summary's first line)."""
    out.print(Text.assemble((command, "bold"), rest))


def alert(text: str) -> None:
    """An indented line in red (failure counts)."""
    out.print(Text.assemble("  ", (text, "red")))


def error(message: str) -> None:
    err.print(Text.assemble(("error:", "bold red"), " ", message))


def list_failures(lines: Sequence[object], where_all: str | None = None) -> None:
    for line in lines[:MAX_LISTED]:
        out.print(Text.assemble("  ", ("✗", "red"), " ", str(line)))
    if len(lines) > MAX_LISTED:
        rest = f"… and {len(lines) - MAX_LISTED} more"
        out.print(f"  {rest}" + (f" (all in {where_all})" if where_all else ""))


@contextmanager
def progress_bar(description: str, unit: str) -> Iterator[Progress]:
    """A progress bar on stderr; hidden when stderr is not a terminal. ``description`` is a
    fixed word (styled); the ``detail`` field is printed as it is (it holds ids)."""
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn(unit, markup=False), TextColumn("{task.fields[detail]}", markup=False),
        TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, disable=not sys.stderr.isatty(), transient=False) as bar:
        yield bar
