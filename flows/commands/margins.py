"""refocus precompute-margins: a reference LMM's option logits and margins on many frame
subsets per question, offline (and the options train-reader --distill shares)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows import console
from flows.commands.learn import _ints, _store_options, lmm_options
from flows.options import EXIT_OK, add_command, positive_int
from stores.errors import UserError


def add_margin_options(g: Any) -> None:
    """Which subsets are scored and how they are batched (precompute-margins and
    train-reader --distill)."""
    from refocus.settings import REFERENCE_BATCH, MarginSettings

    d = MarginSettings()
    g.add_argument("--subsets-per-question", type=positive_int, default=d.subsets_per_question,
                   metavar="N", help="frame subsets the LMM scores per question (the first "
                   "half hold the evidence, the others none of it)")
    g.add_argument("--subset-sizes", type=_ints, default=d.budgets, metavar="K,K,...",
                   help="subset sizes, drawn among these")
    g.add_argument("--questions-per-chunk", type=positive_int, default=d.questions_per_chunk,
                   metavar="Q", help="questions per chunk (one file, one resumable step)")
    g.add_argument("--reference-batch", type=positive_int, default=REFERENCE_BATCH, metavar="B",
                   help="(question, subset) pairs per LMM forward; halves itself on GPU "
                        "out-of-memory")
    lmm_options(g)


def margin_settings(args: argparse.Namespace) -> Any:
    from refocus.settings import MarginSettings

    try:
        return MarginSettings(subsets_per_question=args.subsets_per_question,
                              budgets=args.subset_sizes,
                              questions_per_chunk=args.questions_per_chunk)
    except ValueError as e:
        raise UserError(f"margins: {e}") from None


def reference_options(args: argparse.Namespace) -> Any:
    from pipelines.margins import ReferenceOptions

    return ReferenceOptions(reference_features=args.reference_features,
                            reference_batch=args.reference_batch,
                            reference_cache_gb=args.reference_cache_gb, present=args.present,
                            device=args.device)


def distill_from_args(args: argparse.Namespace, settings: Any,
                      log: Callable[[dict], None]) -> dict[str, Any]:
    from pipelines.distill import distill_reader_stage

    return distill_reader_stage(args.store, args.qa, args.out, args.distill, settings,
                                architecture=args.architecture or "generic",
                                margins=args.margins, margin_settings=margin_settings(args),
                                options=reference_options(args), log=log,
                                report_to=args.report_to)


def add_precompute_margins(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "precompute-margins", "score many frame subsets per question with a reference LMM",
        "Score random frame subsets of every train and val question (sizes among\n"
        "--subset-sizes; half holding a frame of every evidence span, half none) with a\n"
        "reference LMM, in batched forwards, and store each subset's frames, option logits\n"
        "and margin with the model's identity — what train-reader --distill learns from.\n"
        "Re-running resumes: finished chunks are skipped. A folder holds one model's\n"
        "margins; another model or other settings are refused.\n\n"
        "example:\n"
        "  refocus precompute-margins --store data/features \\\n"
        "      --reward lmm:Qwen/Qwen2.5-VL-7B-Instruct --reference-features data/reference \\\n"
        "      --out data/margins --subsets-per-question 16",
    )
    _store_options(p)
    p.add_argument("--reward", required=True, metavar="lmm:MODEL",
                   help="the reference LMM (hub id or local folder)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="margins folder")
    add_margin_options(p)
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from pipelines.margins import claim_margins, margin_inputs, precompute_margins

    if args.reward.partition(":")[0] != "lmm" or not args.reward.partition(":")[2]:
        raise UserError(f"--reward {args.reward!r}: expected lmm:MODEL (a Hugging Face "
                        "video-LLM id or folder)")
    options = reference_options(args)
    claim_margins(args.out, margin_inputs(args.store, args.qa, args.reward, options))
    with console.progress_bar("precompute-margins", "chunks") as bar:
        task = bar.add_task("precompute-margins", total=None, detail="")

        def on_chunk(done: int, total: int) -> None:
            bar.update(task, total=total, completed=done)

        summary = precompute_margins(args.store, args.qa, args.out, args.reward,
                                     margin_settings(args), options, on_chunk=on_chunk)
    console.headline(
        "precompute-margins", f" → {args.out}: {summary['subsets_written']} subsets in "
        f"{summary['chunks_written']} chunks written, {summary['chunks_skipped']} skipped "
        f"({summary['seconds']} s)")
    return EXIT_OK
