"""refocus demo: the main job on the embedded default."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows import console
from flows.options import EXIT_OK, add_command, positive_int


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "demo", "the whole method on the bundled synthetic world, with a report",
        "Generate the synthetic grounded video-QA corpus, ingest and embed it with the\n"
        "bundled encoder, train the reader reference and the frame selector, evaluate it\n"
        "against uniform, random, CLIP top-k, BOLT and AKS on the held-out test split, and\n"
        "write a report folder (README.md and PNG plots). About 5 minutes on 2 CPU cores;\n"
        "re-running resumes.\n\n"
        "example:\n"
        "  refocus demo --out runs/demo",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR",
                   help="where everything goes (default: runs/demo)")
    p.add_argument("--videos", type=positive_int, default=None,
                   help="synthetic videos (default: the generator's, 300)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="GRPO steps (default: the trainer's, 600)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pipelines.demo import DemoSettings, run_demo

    settings = DemoSettings()
    if args.videos:
        settings = replace(settings, synth=replace(settings.synth, videos=args.videos))
    if args.steps:
        settings = replace(settings, grpo=replace(settings.grpo, steps=args.steps))
    summary = run_demo(args.out, settings, say=console.out.print)
    acc, rec = summary["accuracy_at_k"], summary["evidence_recall_at_k"]
    out = console.out
    out.print(f"[bold]demo[/] done in {sum(summary['seconds'].values()):.0f} s", markup=True)
    for method in acc:
        recall = f"{100 * rec[method]:5.1f} %" if rec[method] is not None else "  –"
        out.print(f"  {method:<11} accuracy@{DemoSettings().ks[0]} {100 * acc[method]:5.1f} %  "
                  f"evidence recall {recall}")
    out.print(f"  report: {Path(summary['report']) / 'README.md'}")
    return EXIT_OK
