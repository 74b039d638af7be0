"""refocus import and refocus validate: annotations → manifests, and their checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows import console
from flows.options import EXIT_FAILURES, EXIT_OK, Formatter, add_command
from stores import importers
from stores.manifest import read_manifest, write_manifest
from stores.owned import check_output_file


def add_import(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "import",
        "convert annotations (NExT-QA, NExT-GQA, Video-MME, LongVideoBench, MLVU, a video "
        "folder) into a manifest",
        (
            "Convert annotation files into a refocus manifest (JSONL), validating every row.\n\n"
            "examples:\n"
            "  refocus import nextqa val.csv --videos NExTVideo/ -o nextqa_val.jsonl\n"
            "  refocus import nextgqa val.csv gsub_val.json --videos NExTVideo/ -o gqa.jsonl\n"
            "  refocus import videomme videomme/test-00000-of-00001.parquet --videos data/ "
            "-o videomme.jsonl\n"
            "  refocus import longvideobench lvb_val.json --videos videos/ -o lvb_val.jsonl\n"
            "  refocus import mlvu MLVU/json/*.json --videos MLVU/video/ -o mlvu_dev.jsonl\n"
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
    v = fmt.add_parser(
        "videomme", formatter_class=Formatter,
        help="Video-MME questions (.parquet, .json or .jsonl)",
        description=(
            "Video-MME (lmms-lab/Video-MME): videos are <videoID>.mp4; options lose their "
            "'A. ' prefix.\n\nexample:\n  refocus import videomme "
            "videomme/test-00000-of-00001.parquet --videos data/ -o videomme.jsonl"
        ),
    )
    v.add_argument("file", type=Path, metavar="FILE")
    lvb = fmt.add_parser(
        "longvideobench", formatter_class=Formatter,
        help="LongVideoBench questions (lvb_val.json)",
        description=(
            "LongVideoBench (longvideobench/LongVideoBench): videos are <videos>/<video_path>."
            "\n\nexample:\n  refocus import longvideobench lvb_val.json --videos videos/ "
            "-o lvb_val.jsonl"
        ),
    )
    lvb.add_argument("file", type=Path, metavar="FILE")
    m = fmt.add_parser(
        "mlvu", formatter_class=Formatter,
        help="MLVU dev questions, one JSON file per task (1_plotQA.json, ...)",
        description=(
            "MLVU dev set (MLVU/MVLU): question ids are <video>_<question_type>_<index in "
            "file>;\nopen-ended task files (no candidates) are reported and left out.\n\n"
            "example:\n  refocus import mlvu MLVU/json/*.json --videos MLVU/video/ "
            "-o mlvu_dev.jsonl"
        ),
    )
    m.add_argument("files", nargs="+", type=Path, metavar="FILE")
    for parser, videos_default, split_default in (
        (q, "", "from the file name"),
        (g, "", "from the file name"),
        (v, "; default: videos/ beside FILE", "from the file name, else test"),
        (lvb, "; default: videos/ beside FILE", "from the file name"),
        (m, "; default: videos/ beside the first FILE", "from the file name, else dev"),
    ):
        parser.add_argument("--videos", type=Path, metavar="DIR",
                            help=f"folder holding the videos (searched recursively by id"
                                 f"{videos_default})")
        parser.add_argument("--split",
                            help=f"split name for every row (default: {split_default})")
    f = fmt.add_parser("folder", formatter_class=Formatter, help="every video under a folder")
    f.add_argument("folder", type=Path)
    for parser in (q, g, v, lvb, m, f):
        parser.add_argument("-o", "--out", type=Path, required=True, metavar="FILE",
                            help="manifest to write (.jsonl); an existing file is refused")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace FILE when it exists")
    p.set_defaults(run=_run_import)


ANNOTATIONS = ("csv", "evidence", "file", "files")  # the annotation arguments of the formats


def _annotation_files(args: argparse.Namespace) -> list[Path]:
    found: list[Path] = []
    for name in ANNOTATIONS:
        value = getattr(args, name, None)
        found += value if isinstance(value, list) else [value] if value else []
    return found


def _run_import(args: argparse.Namespace) -> int:
    check_output_file(args.out, overwrite=args.overwrite, inputs=_annotation_files(args))
    if args.format == "nextqa":
        manifest = importers.import_nextqa(args.csv, args.videos, args.split)
    elif args.format == "nextgqa":
        manifest = importers.import_nextgqa(args.csv, args.evidence, args.videos, args.split)
    elif args.format == "videomme":
        manifest = importers.import_videomme(args.file, args.videos, args.split)
    elif args.format == "longvideobench":
        manifest = importers.import_longvideobench(args.file, args.videos, args.split)
    elif args.format == "mlvu":
        manifest = importers.import_mlvu(args.files, args.videos, args.split)
    else:
        manifest = importers.import_folder(args.folder)
    write_manifest(args.out, manifest)
    console.headline("import", f" → {args.out}: {len(manifest.videos)} videos, "
                     f"{len(manifest.questions)} questions, {len(manifest.issues)} rows left out")
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
