"""The ``refocus`` command line.

Exit status: 0 everything landed; 1 the run finished but some inputs failed (bad rows,
broken videos — listed in the summary and the run's failures file); 2 the command could
not run (bad arguments, unreadable inputs, an output folder in use); 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flows import console
from pipelines.decode import DecodeSettings
from pipelines.ingest import IngestSettings, IngestSummary, VideoDone, ingest
from refocus import __version__
from stores import importers
from stores.errors import UserError
from stores.manifest import read_manifest, write_manifest
from stores.shards import FAILURES_FILE

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = """\
exit status: 0 all landed · 1 finished, some inputs failed (see the summary) ·
             2 could not run (bad arguments or inputs) · 130 interrupted
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; appends real defaults (not None/False) to help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _number(kind: type, low: float, high: float | None = None) -> Callable[[str], Any]:
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


_positive_int = _number(int, 1)
_non_negative_int = _number(int, 0)
_non_negative_float = _number(float, 0.0)


# ----------------------------------------------------------------------------- ingest

def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest", formatter_class=_Formatter, epilog=EPILOG,
        help="decode videos into WebDataset frame shards",
        description=(
            "Decode videos into WebDataset shards of candidate frames (JPEG), one sample per\n"
            "video with its exact frame timestamps. Re-running resumes: finished shards are\n"
            "skipped. Broken videos are recorded in the summary and failures.jsonl; the rest\n"
            "of the corpus still lands.\n\n"
            "examples:\n"
            "  refocus ingest videos/ --out data/shards\n"
            "  refocus ingest corpus.jsonl --out data/shards --fps 2 --max-frames 256\n"
            "  refocus ingest clip.mp4 --out exact/ --fps 0 --size 0   # every frame, full size"
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video files, folders of videos (recursive), or .jsonl manifests")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--fps", type=_non_negative_float, default=4.0,
                   help="at most this many candidate frames per second (0: no cap)")
    p.add_argument("--max-frames", type=_non_negative_int, default=512, metavar="N",
                   help="at most N candidates per video, spread over its duration (0: no cap)")
    p.add_argument("--size", type=_non_negative_int, default=384, metavar="S",
                   help="resize to this short side, keeping the aspect; never upscales (0: keep)")
    p.add_argument("--jpeg-quality", type=_number(int, 1, 100), default=90, metavar="Q",
                   help="JPEG quality, 1-100")
    p.add_argument("--stream", type=_non_negative_int, default=0, metavar="K",
                   help="which video stream of each file to decode (0: the first)")
    p.add_argument("--max-decode-errors", type=_non_negative_int, default=0, metavar="E",
                   help="tolerate up to E undecodable packets per video (recorded in its metadata)")
    p.add_argument("--shard-size", type=_positive_int, default=16, metavar="V",
                   help="videos per shard")
    p.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1, metavar="W",
                   help="worker processes, one shard each at a time")
    p.add_argument("--threads", type=_non_negative_int, default=0, metavar="T",
                   help="decoder threads per worker (0: cores / busy workers)")
    p.add_argument("--retry-failed", action="store_true",
                   help="redo finished shards that recorded failed videos")
    p.set_defaults(run=_run_ingest)


def _run_ingest(args: argparse.Namespace) -> int:
    settings = IngestSettings(
        decode=DecodeSettings(
            fps=args.fps or None, max_frames=args.max_frames or None, size=args.size or None,
            stream=args.stream, threads=args.threads, max_decode_errors=args.max_decode_errors,
        ),
        jpeg_quality=args.jpeg_quality, shard_size=args.shard_size, workers=args.workers,
    )
    manifest = importers.from_inputs(list(args.inputs))
    with console.progress_bar("ingest", "videos") as bar:
        task = bar.add_task("ingest", total=None, detail="")
        frames = 0

        def on_start(todo: int, done: int) -> None:
            bar.update(task, total=todo, detail=f"({done} already done)" if done else "")

        def report(event: VideoDone) -> None:
            nonlocal frames
            frames += event.frames
            bar.update(task, advance=1, detail=f"{frames} frames")

        summary = ingest(manifest, args.out, settings, retry_failed=args.retry_failed,
                         on_start=on_start, report=report)
    _print_ingest_summary(summary)
    return EXIT_FAILURES if summary.failures else EXIT_OK


def _print_ingest_summary(s: IngestSummary) -> None:
    out = console.out
    out.print(f"[bold]ingest[/] → {s.out}", markup=True)
    out.print(f"  videos   {s.videos} landed, {s.failed} failed")
    out.print(f"  frames   {s.frames} (this run: {s.frames_written})")
    out.print(f"  shards   {s.shards} ({s.shards_written} written, "
              f"{s.shards_skipped} already done)")
    t = s.timings
    out.print(f"  time     {s.seconds:.1f} s, {s.frames_per_second:.1f} frames/s "
              f"(worker time: decode {t.get('decode', 0):.1f} s, encode {t.get('encode', 0):.1f} s,"
              f" write {t.get('write', 0):.1f} s)")
    if s.failures:
        out.print(f"  [red]failures {len(s.failures)}[/]", markup=True)
        console.list_failures(s.failures, str(Path(s.out) / FAILURES_FILE))


# ----------------------------------------------------------------------------- manifests

def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import", formatter_class=_Formatter, epilog=EPILOG,
        help="convert annotations (NExT-QA, NExT-GQA, a video folder) into a manifest",
        description=(
            "Convert annotation files into a refocus manifest (JSONL), validating every row.\n\n"
            "examples:\n"
            "  refocus import nextqa val.csv --videos NExTVideo/ -o nextqa_val.jsonl\n"
            "  refocus import nextgqa val.csv gsub_val.json --videos NExTVideo/ -o gqa.jsonl\n"
            "  refocus import folder my_videos/ -o corpus.jsonl"
        ),
    )
    fmt = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    q = fmt.add_parser("nextqa", formatter_class=_Formatter, help="NExT-QA CSV")
    q.add_argument("csv", type=Path)
    g = fmt.add_parser("nextgqa", formatter_class=_Formatter,
                       help="NExT-GQA CSV + evidence JSON (gsub_*.json)")
    g.add_argument("csv", type=Path)
    g.add_argument("evidence", type=Path)
    for parser in (q, g):
        parser.add_argument("--videos", type=Path, metavar="DIR",
                            help="folder holding the videos (searched recursively by id)")
        parser.add_argument("--split",
                            help="split name for every row (default: from the file name)")
    f = fmt.add_parser("folder", formatter_class=_Formatter, help="every video under a folder")
    f.add_argument("folder", type=Path)
    for parser in (q, g, f):
        parser.add_argument("-o", "--out", type=Path, required=True, metavar="FILE",
                            help="manifest to write (.jsonl)")
    p.set_defaults(run=_run_import)


def _run_import(args: argparse.Namespace) -> int:
    if args.format == "nextqa":
        manifest = importers.import_nextqa(args.csv, args.videos, args.split)
    elif args.format == "nextgqa":
        manifest = importers.import_nextgqa(args.csv, args.evidence, args.videos, args.split)
    else:
        manifest = importers.import_folder(args.folder)
    write_manifest(args.out, manifest)
    console.out.print(f"[bold]import[/] → {args.out}: {len(manifest.videos)} videos, "
                      f"{len(manifest.questions)} questions, {len(manifest.issues)} rows left out",
                      markup=True)
    console.list_failures(manifest.issues)
    return EXIT_FAILURES if manifest.issues else EXIT_OK


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", formatter_class=_Formatter, epilog=EPILOG,
        help="check manifests and list every bad row",
        description="Check manifests row by row; print one line per problem (file:line: field).",
    )
    p.add_argument("manifests", nargs="+", type=Path, metavar="MANIFEST")
    p.set_defaults(run=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    failed = False
    for path in args.manifests:
        manifest = read_manifest(path)
        console.out.print(f"{path}: {len(manifest.videos)} videos, {len(manifest.questions)} "
                          f"questions, {len(manifest.issues)} problems")
        for issue in manifest.issues:
            console.out.print(f"  {issue}")
        failed = failed or bool(manifest.issues)
    return EXIT_FAILURES if failed else EXIT_OK


# ----------------------------------------------------------------------------- main

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_ingest, _add_import, _add_validate,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refocus", formatter_class=_Formatter, epilog=EPILOG,
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
