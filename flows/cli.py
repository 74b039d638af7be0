"""The ``refocus`` command line.

Exit status: 0 everything landed; 1 the run finished but some inputs failed (bad rows,
broken videos — listed in the summary and the run's failures file); 2 the command could
not run (bad arguments, unreadable inputs, an output folder in use); 130 interrupted.

An error nobody foresaw (a bug, or an input refocus does not handle yet) is one line too:
its type and message, and the log file that holds the traceback — under ``$REFOCUS_LOG_DIR``,
else ``$XDG_STATE_HOME/refocus/logs``, else ``~/.local/state/refocus/logs`` (the system's
temporary folder when none of them can be written). It exits 2, never 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from flows import console
from flows.commands import (
    demo,
    features,
    flow,
    hub,
    ingest,
    learn,
    lmm_budget,
    manifests,
    margins,
    reference,
    score,
    synth,
    vlm,
)
from flows.config import add_config_option, apply_config, leaves, write_resolved
from flows.options import (  # noqa: F401  (exit codes are part of this module's interface)
    EPILOG,
    EXIT_FAILURES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Formatter,
)
from refocus import __version__
from stores.errors import UserError

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    ingest.add, manifests.add_import, manifests.add_validate, features.add_embed,
    features.add_search, synth.add_synth, synth.add_train_encoder, learn.add_train_reader,
    learn.add_train, learn.add_eval, reference.add_precompute_reference,
    margins.add_precompute_margins, score.add_score, hub.add_export_policy,
    flow.add_flow, flow.add_serve, demo.add_demo, lmm_budget.add_lmm_budget,
    vlm.add_train_vlm,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refocus", formatter_class=Formatter, epilog=EPILOG,
        description=(
            "refocus: learn which frames of a video a video-LLM should see for a question,\n"
            "and pick them at corpus scale. Run 'refocus COMMAND --help' for each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"refocus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for command in leaves(parser):
        add_config_option(command)
    return parser


LOG_DIR_ENV = "REFOCUS_LOG_DIR"  # where tracebacks of unexpected errors go
MAX_SHOWN = 300  # characters of an unexpected error's message printed on the terminal


def log_dir() -> Path:
    """``$REFOCUS_LOG_DIR``, else ``$XDG_STATE_HOME/refocus/logs``, else the XDG default."""
    chosen = os.environ.get(LOG_DIR_ENV)
    if chosen:
        return Path(chosen).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "refocus" / "logs"


def save_traceback(command: str, argv: Sequence[str]) -> Path:
    """Write the exception being handled, with the command line, to a new log file."""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{command}.log"
    text = f"refocus {__version__}: {' '.join(argv)}\n\n{traceback.format_exc()}"
    for folder in (log_dir(), Path(tempfile.gettempdir()) / "refocus-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
            return folder / name
        except OSError:
            continue
    raise OSError("no writable log folder")


def unexpected(error: Exception, command: str, argv: Sequence[str]) -> str:
    """The one line for an error nobody foresaw; its traceback goes to a log file."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > MAX_SHOWN:
        first = first[:MAX_SHOWN] + "…"
    message = type(error).__name__ + (f": {first}" if first else "")
    try:
        where = f"traceback in {save_traceback(command, argv)}"
    except OSError as e:
        where = f"traceback not saved ({e}); set {LOG_DIR_ENV} to a writable folder"
    return f"{message}; {where}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        apply_config(parser, argv)  # --config FILE: its values become the defaults
    except UserError as e:
        console.error(str(e))
        return EXIT_USAGE
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
        if status in (EXIT_OK, EXIT_FAILURES):
            write_resolved(parser, argv, args)
        return status
    except UserError as e:
        console.error(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.error("interrupted; run the same command again to resume")
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001  (the catch-all: one line, traceback to a log)
        console.error(unexpected(e, args.command, argv))
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
