"""The ``refocus`` command line.

Exit status: 0 everything landed; 1 the run finished but some inputs failed (bad rows,
broken videos — listed in the summary and the run's failures file); 2 the command could
not run (bad arguments, unreadable inputs, an output folder in use); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from flows import console
from flows.commands import demo, features, flow, ingest, learn, manifests, reference, score, synth
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
    learn.add_train, learn.add_eval, reference.add_precompute_reference, score.add_score,
    flow.add_flow, flow.add_serve, demo.add_demo,
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        console.error(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.error("interrupted; run the same command again to resume")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
