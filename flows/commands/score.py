"""refocus score: a trained policy picks the frames of a new corpus."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows import console
from flows.commands.features import add_batch_size
from flows.options import (
    EXIT_FAILURES,
    EXIT_OK,
    add_command,
    add_network_options,
    add_runner_option,
    default_of,
    network_settings,
    non_negative_int,
    positive_int,
)
from pipelines.settings import EXPORTS, EmbedSettings, ScoreSettings


def add_score(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "score", "pick k frames per question of a new corpus with a trained policy",
        "Batch-score a new corpus: ingest its videos with the candidate settings the policy\n"
        "was trained on, embed them with the policy's encoder (both skip what is already\n"
        "done in --out), and let the policy choose k frames per question. Writes\n"
        "selections.jsonl and selections.parquet (qid, video_id, frame_indices, timestamps in\n"
        "time order, probabilities) and, with --export, the chosen frames themselves for a\n"
        "downstream video-LLM. Benchmark annotations (Video-MME, LongVideoBench, MLVU,\n"
        "NExT-QA) become manifests with 'refocus import' first.\n\n"
        "examples:\n"
        "  refocus score corpus.jsonl --policy runs/policy --out scored/  # its largest k\n"
        "  refocus import videomme test.parquet --videos videos/ -o vmme.jsonl\n"
        "  refocus score vmme.jsonl --policy runs/policy --k 16 --out vmme/ --export jpeg\n"
        "  refocus score videos/ qa.jsonl --policy runs/policy --out s/ --export webdataset\n"
        "  refocus score corpus.jsonl --policy me/refocus-synth --out scored/  # a Hub model",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".jsonl manifests with questions, plus video files or folders they "
                        "refer to")
    p.add_argument("--policy", required=True, metavar="RUN|ORG/NAME",
                   help="a refocus train --out folder (or a policy folder, or an export-policy "
                        "folder), or a Hugging Face model id (from the Hub, or with "
                        "HF_HUB_OFFLINE=1 from its cache)")
    p.add_argument("--k", type=positive_int, default=None,
                   help="frames per question (default: the largest budget the policy was "
                        "trained on, as its run records it)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--export", choices=EXPORTS, default=default_of(ScoreSettings, "export"),
                   help="also copy the chosen frames out: a JPEG folder per question, or "
                        "WebDataset shards with one sample per question")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="encoder (default: the one the policy's training store was embedded "
                        "with, as recorded there)")
    p.add_argument("--pretrained", default=None, metavar="TAG|FILE", help="its weights")
    p.add_argument("--workers", type=positive_int,
                   default=default_of(ScoreSettings, "ingest_workers"), metavar="W",
                   help="ingest worker processes")
    p.add_argument("--embed-workers", type=non_negative_int,
                   default=default_of(EmbedSettings, "workers"), metavar="W",
                   help="DataLoader processes for embedding")
    add_batch_size(p)
    p.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    add_network_options(p)
    add_runner_option(p)
    p.set_defaults(run=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from pipelines.embed import EmbedSettings
    from pipelines.hub import resolve_policy
    from pipelines.score import ScoreSettings, score
    from stores import importers

    policy = resolve_policy(args.policy)  # a path as given, or a Hub model's cached snapshot
    settings = ScoreSettings(
        k=args.k, export=args.export, ingest_workers=args.workers,
        embed=EmbedSettings(batch_size=args.batch_size, workers=args.embed_workers, index=None),
        model=args.model, pretrained=args.pretrained, device=args.device,
        network=network_settings(args))
    if args.runner == "local":
        manifest = importers.from_inputs(list(args.inputs), settings.network)
        with console.err.status("scoring …") as status:
            summary = score(manifest, policy, args.out, settings,
                            say=lambda line: status.update(line), inputs=args.inputs)
    else:
        from flows.orchestrate import score_flow
        from flows.runners import run_flow

        summary = run_flow(score_flow, args.runner, args.workers, [str(i) for i in args.inputs],
                           str(policy), str(args.out), settings)
    print_score_summary(summary)
    return EXIT_FAILURES if summary["failures"] else EXIT_OK


def print_score_summary(s: dict) -> None:
    out = console.out
    console.headline("score", f" → {s['out']}")
    out.print(f"  policy     {s['policy']} (k = {s['k']})")
    out.print(f"  questions  {s['questions']} scored over {s['videos']} videos")
    out.print(f"  selections {s['selections']['jsonl']}, {s['selections']['parquet']}")
    if s["frames_exported"]:
        out.print(f"  exported   {s['frames_exported']} frames")
    times = ", ".join(f"{k} {v:.1f} s" for k, v in s["seconds"].items())
    out.print(f"  time       {s['total_seconds']:.1f} s ({times})")
    if s["failures"]:
        console.alert(f"failures {len(s['failures'])}")
        console.list_failures(s["failures"], str(Path(s["out"]) / "failures.jsonl"))
