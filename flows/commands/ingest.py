"""refocus ingest: videos → WebDataset frame shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows import console
from flows.options import (
    EXIT_FAILURES,
    EXIT_OK,
    add_command,
    add_network_options,
    add_runner_option,
    default_of,
    network_settings,
    non_negative_float,
    non_negative_int,
    number,
    positive_int,
)
from pipelines.decode import DecodeSettings
from pipelines.ingest import IngestSettings, IngestSummary, VideoDone, ingest
from stores import importers
from stores.shards import FAILURES_FILE


def add_candidate_options(p: argparse.ArgumentParser) -> None:
    """How many candidate frames and how large: shared by ingest and the flows."""
    p.add_argument("--fps", type=non_negative_float, default=default_of(DecodeSettings, "fps"),
                   help="at most this many candidate frames per second (0: no cap)")
    p.add_argument("--max-frames", type=non_negative_int,
                   default=default_of(DecodeSettings, "max_frames"), metavar="N",
                   help="at most N candidates per video, spread over its duration (0: no cap)")
    p.add_argument("--size", type=non_negative_int, default=default_of(DecodeSettings, "size"),
                   metavar="S",
                   help="resize to this short side, keeping the aspect; never upscales (0: keep)")


def add_shard_size(p: argparse.ArgumentParser, text: str) -> None:
    """--shard-size: shared by ingest and the flows."""
    p.add_argument("--shard-size", type=positive_int,
                   default=default_of(IngestSettings, "shard_size"), metavar="V", help=text)


def add(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "ingest",
        "decode videos into WebDataset frame shards",
        (
            "Decode videos into WebDataset shards of candidate frames (JPEG), one sample per\n"
            "video with its exact frame timestamps. Re-running resumes: finished shards are\n"
            "skipped. Broken videos are recorded in the summary and failures.jsonl; the rest\n"
            "of the corpus still lands.\n\n"
            "examples:\n"
            "  refocus ingest videos/ --out data/shards\n"
            "  refocus ingest corpus.jsonl --out data/shards --fps 2 --max-frames 256\n"
            "  refocus ingest clip.mp4 --out exact/ --fps 0 --size 0   # every frame, full size\n"
            "  refocus ingest https://example.org/clip.mp4 --out data/shards --network-timeout 60"
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video files or URLs, folders of videos (recursive), or .jsonl manifests")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    add_candidate_options(p)
    p.add_argument("--jpeg-quality", type=number(int, 1, 100),
                   default=default_of(IngestSettings, "jpeg_quality"), metavar="Q",
                   help="JPEG quality, 1-100")
    p.add_argument("--stream", type=non_negative_int, default=default_of(DecodeSettings, "stream"),
                   metavar="K", help="which video stream of each file to decode (0: the first)")
    p.add_argument("--max-decode-errors", type=non_negative_int,
                   default=default_of(DecodeSettings, "max_decode_errors"), metavar="E",
                   help="tolerate up to E undecodable packets per video (recorded in its metadata)")
    add_shard_size(p, "videos per shard")
    p.add_argument("--workers", type=positive_int, default=default_of(IngestSettings, "workers"),
                   metavar="W", help="worker processes, one shard each at a time")
    p.add_argument("--threads", type=non_negative_int,
                   default=default_of(DecodeSettings, "threads"), metavar="T",
                   help="decoder threads per worker (0: cores / busy workers)")
    p.add_argument("--retry-failed", action="store_true",
                   help="redo finished shards that recorded failed videos")
    add_network_options(p)
    add_runner_option(p)
    p.set_defaults(run=_run_ingest)


def _run_ingest(args: argparse.Namespace) -> int:
    settings = IngestSettings(
        decode=DecodeSettings(
            fps=args.fps or None, max_frames=args.max_frames or None, size=args.size or None,
            stream=args.stream, threads=args.threads, max_decode_errors=args.max_decode_errors,
        ),
        jpeg_quality=args.jpeg_quality, shard_size=args.shard_size, workers=args.workers,
        network=network_settings(args),
    )
    run = _ingest_here if args.runner == "local" else _ingest_in_flow
    summary = run(args, settings)
    _print_ingest_summary(summary)
    return EXIT_FAILURES if summary.failures else EXIT_OK


def _ingest_here(args: argparse.Namespace, settings: IngestSettings) -> IngestSummary:
    manifest = importers.from_inputs(list(args.inputs), settings.network)
    with console.progress_bar("ingest", "videos") as bar:
        task = bar.add_task("ingest", total=None, detail="")
        frames = 0

        def on_start(todo: int, done: int) -> None:
            bar.update(task, total=todo, detail=f"({done} already done)" if done else "")

        def report(event: VideoDone) -> None:
            nonlocal frames
            frames += event.frames
            bar.update(task, advance=1, detail=f"{frames} frames")

        return ingest(manifest, args.out, settings, retry_failed=args.retry_failed,
                      on_start=on_start, report=report, inputs=args.inputs)


def _ingest_in_flow(args: argparse.Namespace, settings: IngestSettings) -> IngestSummary:
    from flows.orchestrate import ingest_flow
    from flows.runners import run_flow

    return IngestSummary.from_dict(run_flow(
        ingest_flow, args.runner, args.workers, [str(i) for i in args.inputs], str(args.out),
        settings, args.retry_failed))


def _print_ingest_summary(s: IngestSummary) -> None:
    out = console.out
    console.headline("ingest", f" → {s.out}")
    out.print(f"  videos   {s.videos} landed, {s.failed} failed")
    out.print(f"  frames   {s.frames} (this run: {s.frames_written})")
    out.print(f"  shards   {s.shards} ({s.shards_written} written, "
              f"{s.shards_skipped} already done)")
    t = s.timings
    out.print(f"  time     {s.seconds:.1f} s, {s.frames_per_second:.1f} frames/s "
              f"(worker time: decode {t.get('decode', 0):.1f} s, encode {t.get('encode', 0):.1f} s,"
              f" write {t.get('write', 0):.1f} s)")
    if s.failures:
        console.alert(f"failures {len(s.failures)}")
        console.list_failures(s.failures, str(Path(s.out) / FAILURES_FILE))
