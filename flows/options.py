"""Shared pieces of the command line: help formatting, option types, exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

from stores.errors import UserError
from stores.urls import MAX_DOWNLOAD_MB, SCHEMES, TIMEOUT, NetworkSettings

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = """\
exit status: 0 all landed · 1 finished, some inputs failed (see the summary) ·
             2 could not run (bad arguments or inputs) · 130 interrupted
"""


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; appends real defaults (not None/False) to help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


def number(kind: type, low: float, high: float | None = None) -> Callable[[str], Any]:
    """An argparse type: ``kind`` (int or float) within [low, high]."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}")
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {text}")
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    return parse


def default_of(settings: type, name: str) -> Any:
    """The default of field ``name`` of the settings dataclass ``settings`` (its factory's
    value when it has one): where every flag that sets a settings field reads its default,
    so the value is declared once, in the dataclass."""
    for f in dataclasses.fields(settings):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{settings.__name__}.{name} has no default")
    raise ValueError(f"{settings.__name__} has no field {name!r}")


positive_int = number(int, 1)
non_negative_int = number(int, 0)
non_negative_float = number(float, 0.0)


def add_command(sub: argparse._SubParsersAction, name: str, summary: str, description: str,
                ) -> argparse.ArgumentParser:
    """A subcommand with the shared formatter and the exit-status epilog."""
    return sub.add_parser(name, formatter_class=Formatter, epilog=EPILOG, help=summary,
                          description=description)


positive_float = number(float, 1e-3)


def add_network_options(p: argparse.ArgumentParser) -> None:
    """Which video URLs may be read, and how long and how much: shared by every command
    that decodes the videos it is given (ingest, score, the flows)."""
    g = p.add_argument_group("video URLs")
    g.add_argument("--allow-scheme", action="append", metavar="SCHEME",
                   help=f"also read URLs of this scheme (repeatable; always: "
                        f"{', '.join(SCHEMES)}), e.g. rtmp")
    g.add_argument("--allow-private-hosts", action="store_true",
                   help="read URLs on loopback, private and link-local addresses (refused "
                        "by default: a manifest must not make refocus call internal hosts)")
    g.add_argument("--network-timeout", type=positive_float, default=TIMEOUT, metavar="S",
                   help="seconds to wait for a connection or for each read of a URL")
    g.add_argument("--max-download-mb", type=positive_float, default=MAX_DOWNLOAD_MB,
                   metavar="MB", help="refuse or stop a video URL larger than this")


def network_settings(args: argparse.Namespace) -> NetworkSettings:
    """The settings ``add_network_options`` parsed."""
    try:
        return NetworkSettings(
            schemes=(*SCHEMES, *(args.allow_scheme or ())),
            allow_private_hosts=args.allow_private_hosts, timeout=args.network_timeout,
            max_download_mb=args.max_download_mb)
    except ValueError as e:
        raise UserError(f"--allow-scheme: {e}") from None


RUNNERS = ("local", "prefect", "dask")


def add_runner_option(p: argparse.ArgumentParser) -> None:
    """Where a stage's shards run: shared by ingest, embed and score."""
    p.add_argument("--runner", choices=RUNNERS, default="local",
                   help="local: this process and its worker processes; prefect: a Prefect "
                        "flow, each shard a task on --workers threads (Prefect's temporary "
                        "server unless PREFECT_API_URL is set; records under --out); dask: "
                        "the same tasks on a local Dask cluster of --workers processes")
