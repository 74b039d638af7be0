"""refocus synth and refocus train-encoder: the embedded default world and its encoder."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows import console
from flows.options import (
    EXIT_OK,
    add_command,
    default_of,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from pipelines.settings import TrainSettings


def add_synth(sub: argparse._SubParsersAction) -> None:
    from pipelines.synth import SynthSettings

    d = SynthSettings()
    p = add_command(
        sub, "synth", "generate the synthetic grounded video-QA corpus",
        "Write real H.264 videos with short coloured-shape events among distractors, and a\n"
        "manifest of questions that need specific moments (colour, shape, first, last, count,\n"
        "after), with evidence spans and a train/val/test split by video. The same seed gives\n"
        "the same corpus; every knob that makes the task easier or harder is an option.\n\n"
        "examples:\n"
        "  refocus synth --out data/synth\n"
        "  refocus synth --out data/hard --seed 7 --duration-range 40 80 --events 4 7 \\\n"
        "      --event-seconds 0.5 0.75 --distractors 6",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="corpus folder")
    p.add_argument("--videos", type=positive_int, default=d.videos, metavar="N")
    p.add_argument("--seed", type=non_negative_int, default=d.seed, metavar="S")
    p.add_argument("--duration-range", type=non_negative_float, nargs=2, default=d.duration,
                   metavar=("A", "B"), help="video length in seconds, drawn per video")
    p.add_argument("--events", type=positive_int, nargs=2, default=d.events,
                   metavar=("A", "B"), help="events per video")
    p.add_argument("--event-seconds", type=non_negative_float, nargs=2,
                   default=d.event_seconds, metavar=("A", "B"), help="how long an event shows")
    p.add_argument("--fps", type=positive_int, default=d.fps, help="frames per second")
    p.add_argument("--frame-size", type=positive_int, default=d.frame_size, metavar="PX",
                   help="square frame side in pixels")
    p.add_argument("--distractors", type=non_negative_int, default=d.distractors, metavar="N",
                   help="grey blobs moving through every frame")
    p.add_argument("--background-speed", type=non_negative_float, default=d.background_speed,
                   metavar="X", help="how fast the background drifts (0: still)")
    p.add_argument("--questions-per-video", type=positive_int, default=d.questions_per_video,
                   metavar="Q")
    p.add_argument("--split", type=non_negative_float, nargs=3, default=d.split,
                   metavar=("TRAIN", "VAL", "TEST"), help="fractions of videos per split")
    p.add_argument("--workers", type=positive_int, default=d.workers, metavar="W")
    p.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from pipelines.synth import SynthSettings, generate

    try:
        settings = SynthSettings(
            videos=args.videos, seed=args.seed, duration=tuple(args.duration_range),
            events=tuple(args.events), event_seconds=tuple(args.event_seconds), fps=args.fps,
            frame_size=args.frame_size, distractors=args.distractors,
            background_speed=args.background_speed,
            questions_per_video=args.questions_per_video, split=tuple(args.split),
            workers=args.workers)
    except ValueError as e:
        from stores.errors import UserError

        raise UserError(f"synth settings: {e}") from None
    with console.progress_bar("synth", "videos") as bar:
        task = bar.add_task("synth", total=settings.videos, detail="")
        summary = generate(args.out, settings, report=lambda n: bar.update(task, advance=n))
    out = console.out
    console.headline("synth", f" → {summary.out}")
    splits = ", ".join(f"{k} {v}" for k, v in summary.splits.items())
    out.print(f"  videos    {summary.videos} ({splits}), {summary.questions} questions, "
              f"{summary.seconds:.1f} s")
    out.print("  chance that k evenly spaced frames see all the evidence:")
    out.print(f"    {'kind':<8} {'questions':>9} {'k=4':>6} {'k=8':>6} {'k=16':>6}")
    for kind, row in summary.report.items():
        out.print(f"    {kind:<8} {row['questions']:>9} {row['k4']:>6.2f} {row['k8']:>6.2f} "
                  f"{row['k16']:>6.2f}")
    out.print(f"  manifest  {Path(summary.out) / 'manifest.jsonl'}")
    return EXIT_OK


def add_train_encoder(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "train-encoder", "train the small CLIP encoder of the synthetic world",
        "Train the small open_clip model that refocus ships (refocus-synth) on frames and\n"
        "captions of the synthetic world, then measure it zero-shot on held-out videos.\n"
        "The bundled one was made with the defaults; to replace it, train into a new\n"
        "folder and copy its three refocus-synth.* files into pipelines/assets.\n\n"
        "example:\n"
        "  refocus train-encoder --out my_encoder --minutes 25",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--minutes", type=non_negative_float,
                   default=default_of(TrainSettings, "minutes"),
                   help="training time budget")
    p.add_argument("--seed", type=non_negative_int, default=default_of(TrainSettings, "seed"))
    p.add_argument("--batch-size", type=positive_int,
                   default=default_of(TrainSettings, "batch_size"))
    p.set_defaults(run=_run_train_encoder)


def _run_train_encoder(args: argparse.Namespace) -> int:
    from pipelines.train_encoder import train

    settings = TrainSettings(minutes=args.minutes, seed=args.seed, batch_size=args.batch_size)
    meta = train(args.out, settings, log=console.out.print)
    held = meta["held_out"]
    console.headline("train-encoder", f" → {args.out} ({meta['steps']} steps, "
                     f"{meta['seconds']} s)")
    console.out.print(f"  colour × shape top-1 (held out): {held['colour_shape_top1']:.3f}")
    console.out.print(f"  shape vs no-shape balanced accuracy: "
                      f"{held['shape_vs_none_balanced_accuracy']:.3f}")
    console.out.print(f"  weights sha256 {meta['weights_sha256']}")
    return EXIT_OK
