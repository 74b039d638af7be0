"""refocus train-vlm: the embedded video-LLM (refocus-synth-vlm) trained on the synthetic world."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from flows import console
from flows.options import EXIT_OK, add_command, non_negative_float, positive_int


def add_train_vlm(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "train-vlm", "train the small video-LLM of the synthetic world",
        "Train refocus-synth-vlm: a LLaVA whose CLIP vision tower is the bundled encoder\n"
        "(frozen) and whose projector and small Qwen2 language model learn to answer the\n"
        "synthetic world's questions from frames, read at the answer letter as the LMM\n"
        "reward reads it. Stages: the projector onto word embeddings; \"Pick X.\";\n"
        "questions over each frame's class token; questions over every token. The command\n"
        "makes its own corpus (synth + ingest with the default settings), runs the vision\n"
        "tower once over every frame, trains from that cache (resumable: run it again to\n"
        "continue), then measures the saved model on the validation split through the\n"
        "scorer. DIR/model is the model; to ship it, copy it\n"
        "to pipelines/assets/refocus-synth-vlm.\n\n"
        "example:\n"
        "  refocus train-vlm --out my_vlm --minutes 25",
    )
    from pipelines.vlm_settings import VLMSettings

    d = VLMSettings()

    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--videos", type=positive_int, default=d.videos, metavar="N",
                   help="synthetic videos to train on")
    p.add_argument("--seed", type=positive_int, default=d.seed, metavar="S")
    p.add_argument("--steps", type=positive_int, default=d.steps, metavar="N")
    p.add_argument("--minutes", type=non_negative_float, default=d.minutes,
                   help="stop training after this long (the model is still saved and measured)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, metavar="B")
    p.add_argument("--threads", type=positive_int, default=d.threads, metavar="T",
                   help="torch threads")
    p.add_argument("--workers", type=positive_int, default=d.workers, metavar="W",
                   help="synth and ingest processes")
    p.set_defaults(run=_run_train_vlm)


def _run_train_vlm(args: argparse.Namespace) -> int:
    from pipelines.vlm import VLMSettings, train_vlm

    settings = VLMSettings(videos=args.videos, seed=args.seed, steps=args.steps,
                           minutes=args.minutes, batch_size=args.batch_size,
                           threads=args.threads, workers=args.workers)
    command = "refocus " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["train-vlm"] else ""
    report = train_vlm(args.out, settings, say=console.out.print, command=command)
    console.headline("train-vlm", f" → {args.out / 'model'} ({report['steps']} steps, "
                     f"{report['seconds']:.0f} s)")
    for mode, row in report["validation"].items():
        console.out.print(f"  val accuracy, {mode:<18} {row['accuracy']:.3f}")
    return EXIT_OK
