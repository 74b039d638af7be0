"""refocus import and refocus validate: annotations → manifests, and their checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows import console
from flows.options import EXIT_FAILURES, EXIT_OK, Formatter, add_command
from stores import importers
from stores.manifest import read_manifest, write_manifest


def add_import(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "import",
        "convert annotations (NExT-QA, NExT-GQA, a video folder) into a manifest",
        (
            "Convert annotation files into a refocus manifest (JSONL), validating every row.\n\n"
            "examples:\n"
            "  refocus import nextqa val.csv --videos NExTVideo/ -o nextqa_val.jsonl\n"
            "  refocus import nextgqa val.csv gsub_val.json --videos NExTVideo/ -o gqa.jsonl\n"
            "  refocus import folder my_videos/ -o corpus.jsonl"
        ),
    )
    fmt = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    q = fmt.add_parser("nextqa", formatter_class=Formatter, help="NExT-QA CSV")
    q.add_argument("csv", type=Path)
    g = fmt.add_parser("nextgqa", formatter_class=Formatter,
                       help="NExT-GQA CSV + evidence JSON (gsub_*.json)")
    g.add_argument("csv", type=Path)
    g.add_argument("evidence", type=Path)
    for parser in (q, g):
        parser.add_argument("--videos", type=Path, metavar="DIR",
                            help="folder holding the videos (searched recursively by id)")
        parser.add_argument("--split",
                            help="split name for every row (default: from the file name)")
    f = fmt.add_parser("folder", formatter_class=Formatter, help="every video under a folder")
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


def add_validate(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "validate",
        "check manifests and list every bad row",
        "Check manifests row by row; print one line per problem (file:line: field).",
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
