"""refocus precompute-reference: a reference LMM's vision features, offline, once per frame."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows import console
from flows.commands.learn import PRESENT_HELP
from flows.options import EXIT_OK, add_command, positive_int


def add_precompute_reference(sub: argparse._SubParsersAction) -> None:
    from refocus.settings import REFERENCE_FRAMES_PER_PASS

    p = add_command(
        sub, "precompute-reference", "run a reference LMM's vision tower over every frame, once",
        "Run the vision tower (and projector) of a Hugging Face video-LLM over every frame of\n"
        "the finished ingest shards, in batched passes (GPU when present), and store the\n"
        "per-frame features in a reference store. Training with --reward lmm:MODEL\n"
        "--reference-features DIR then runs only the language model online. Re-running\n"
        "resumes: finished shards are skipped.\n\n"
        "examples:\n"
        "  refocus precompute-reference --model Qwen/Qwen2.5-VL-7B-Instruct \\\n"
        "      --shards data/shards --out data/reference\n"
        "  refocus precompute-reference --model /models/llava-onevision-qwen2-0.5b-ov-hf \\\n"
        "      --shards data/shards --out data/reference-llava --frames-per-pass 64",
    )
    p.add_argument("--model", required=True, metavar="ID|DIR",
                   help="Hugging Face hub id or local folder of an image-text-to-text model")
    p.add_argument("--shards", required=True, type=Path, metavar="DIR",
                   help="ingest folder (refocus ingest --out)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="reference folder")
    p.add_argument("--device", help="torch device (default: cuda when present)")
    p.add_argument("--present", metavar="video|images", help=PRESENT_HELP)
    p.add_argument("--frames-per-pass", type=positive_int, default=REFERENCE_FRAMES_PER_PASS,
                   metavar="N", help="frames through the vision tower at once (halved on GPU "
                   "out-of-memory)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from pipelines.reference import PrecomputeSettings, claim_reference, precompute_reference
    from pipelines.vlm import load_lmm
    from stores.shards import ShardSet

    shards = ShardSet(args.shards)
    total = sum(len(m["samples"]) for m in shards.markers())
    claim_reference(args.shards, args.out)  # a bad --out fails before the model loads
    scorer = load_lmm(args.model, device=args.device, present=args.present)
    with console.progress_bar("precompute-reference", "videos") as bar:
        task = bar.add_task("precompute-reference", total=total, detail="")

        def on_video(video_id: str, frames: int) -> None:
            bar.update(task, advance=1, detail=f"{video_id} ({frames} frames)")

        summary = precompute_reference(args.shards, args.out, scorer,
                                       PrecomputeSettings(args.frames_per_pass), on_video)
    console.headline(
        "precompute-reference", f" → {args.out}: {summary['frames']} frames, "
        f"{summary['shards_written']} shards written, {summary['shards_skipped']} skipped "
        f"({summary['seconds']} s; vision {summary['timings']['vision']} s)")
    return EXIT_OK
