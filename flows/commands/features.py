"""refocus embed and refocus search: frames and questions → CLIP feature store, and
text → frame search over it. (torch and open_clip are imported when a command runs, so that
``refocus --help`` stays quick.)"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flows import console
from flows.options import (
    EXIT_FAILURES,
    EXIT_OK,
    add_command,
    add_runner_option,
    default_of,
    non_negative_int,
    positive_int,
)
from pipelines.settings import SYNTH_ENCODER, EmbedSettings
from stores.features import FeatureStore
from stores.index import FrameIndex, IndexSettings
from stores.owned import check_output_file
from stores.shards import ShardSet, read_questions

DEFAULT_MODEL = SYNTH_ENCODER  # the bundled encoder; real corpora name a real CLIP
DEFAULT_PRETRAINED = None


def _add_encoder_options(p: argparse.ArgumentParser, model_default: str | None,
                         pretrained_default: str | None) -> None:
    p.add_argument("--model", default=model_default, metavar="NAME",
                   help="refocus-synth (the bundled encoder of the synthetic world), or an "
                        "open_clip architecture: a built-in name (ViT-B-32), a JSON config "
                        "file, hf-hub:org/repo or local-dir:/path")
    p.add_argument("--pretrained", default=pretrained_default, metavar="TAG|FILE",
                   help="weights: an open_clip tag (laion2b_s34b_b79k), a weights file, or "
                        "'random'; refocus-synth, hf-hub: and local-dir: carry their own")
    p.add_argument("--device", default=None, help="torch device (default: cuda when present)")


def add_batch_size(p: argparse.ArgumentParser) -> None:
    """--batch-size of the encoder: shared by embed, score and the flows."""
    p.add_argument("--batch-size", type=positive_int,
                   default=default_of(EmbedSettings, "batch_size"), metavar="B",
                   help="frames per encoder forward")


def add_embed(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "embed", "embed frames and questions with CLIP into a Zarr feature store",
        "Embed the frames of finished ingest shards (and the questions of a manifest) with an\n"
        "open_clip model into a Zarr feature store, then build a FAISS frame index. Re-running\n"
        "resumes: finished input shards are skipped.\n\n"
        "examples:\n"
        "  refocus embed --shards data/shards --out data/features     # bundled encoder\n"
        "  refocus embed --shards data/shards --out data/features --model ViT-B-32 \\\n"
        "      --pretrained laion2b_s34b_b79k                          # a real CLIP\n"
        "  refocus embed --shards data/shards --out data/features --model ViT-B-16 \\\n"
        "      --pretrained /models/vit-b-16.safetensors --batch-size 256\n"
        "  refocus embed --shards data/shards --out data/features --model my_arch.json \\\n"
        "      --pretrained my_weights.safetensors --questions qa.jsonl",
    )
    p.add_argument("--shards", required=True, type=Path, metavar="DIR",
                   help="an ingest output folder (refocus ingest --out)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="feature folder")
    _add_encoder_options(p, DEFAULT_MODEL, DEFAULT_PRETRAINED)
    add_batch_size(p)
    p.add_argument("--workers", type=non_negative_int, default=default_of(EmbedSettings, "workers"),
                   metavar="W", help="DataLoader processes decoding and preprocessing JPEGs")
    p.add_argument("--questions", type=Path, nargs="*", metavar="MANIFEST",
                   help="manifests whose questions to embed (default: the questions of the "
                        "ingested manifest)")
    p.add_argument("--no-index", action="store_true", help="do not build the FAISS index")
    p.add_argument("--ivf-threshold", type=positive_int, default=IndexSettings.ivf_threshold,
                   metavar="N", help="use an IVF index above N frames (exact below)")
    add_runner_option(p)
    p.set_defaults(run=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    from pipelines.embed import EmbedSettings, claim_features, plan

    plan(ShardSet(args.shards), args.batch_size)  # a bad --shards fails before the model loads
    claim_features(args.shards, args.out)  # and so does a bad --out
    index = None if args.no_index else IndexSettings(ivf_threshold=args.ivf_threshold)
    settings = EmbedSettings(batch_size=args.batch_size, workers=args.workers, index=index)
    run = _embed_here if args.runner == "local" else _embed_in_flow
    summary, device = run(args, settings)
    _print_summary(summary, device)
    return EXIT_FAILURES if summary.failures else EXIT_OK


def _embed_here(args: argparse.Namespace, settings: Any) -> tuple[Any, str]:
    from pipelines.embed import embed
    from pipelines.encoder import load_encoder

    encoder = load_encoder(args.model, args.pretrained, args.device)
    with console.progress_bar("embed", "frames") as bar:
        task = bar.add_task("embed", total=None, detail="")

        def on_start(todo: int, done: int) -> None:
            bar.update(task, total=todo, detail=f"({done} already done)" if done else "")

        summary = embed(args.shards, args.out, encoder, settings,
                        read_questions(args.questions, args.shards),
                        on_start=on_start, report=lambda n: bar.update(task, advance=n))
    return summary, encoder.device.type


def _embed_in_flow(args: argparse.Namespace, settings: Any) -> tuple[Any, str]:
    from flows.orchestrate import embed_flow
    from flows.runners import run_flow
    from pipelines.embed import EmbedSummary
    from refocus.device import pick_device

    questions = [str(p) for p in args.questions] if args.questions else None
    summary = run_flow(embed_flow, args.runner, args.workers, str(args.shards), str(args.out),
                       args.model, args.pretrained, questions, settings, args.device)
    return EmbedSummary.from_dict(summary), pick_device(args.device).type


def _print_summary(s: Any, device: str) -> None:
    out = console.out
    t = s.timings
    console.headline("embed", f" → {s.out}")
    out.print(f"  frames    {s.frames} in {s.videos} videos (this run: {s.frames_written}, "
              f"{s.shards_written} shards; {s.shards_skipped} already done)")
    out.print(f"  questions {s.questions}")
    out.print(f"  time      {s.seconds:.1f} s, {s.frames_per_second:.1f} frames/s on {device} "
              f"(model {t.get('model', 0):.1f} s, waiting for input {t.get('wait', 0):.1f} s, "
              f"write {t.get('write', 0):.1f} s, index {t.get('index', 0):.1f} s)")
    if s.index:
        out.print(f"  index     {s.index['kind']} over {s.index['frames']} frames")
    if s.failures:
        console.alert(f"failures {len(s.failures)}")
        console.list_failures(s.failures)


def add_search(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "search", "find the frames that best match a text",
        "Search a feature store's frames with a text query, using the store's own encoder.\n\n"
        "examples:\n"
        "  refocus search --store data/features \"a person opening a door\"\n"
        "  refocus search --store data/features \"a red circle\" --k 20 --sheet hits.png",
    )
    p.add_argument("query", help="the text to look for")
    p.add_argument("--store", required=True, type=Path, metavar="DIR",
                   help="feature folder (refocus embed --out)")
    p.add_argument("--k", type=positive_int, default=10, help="how many frames")
    p.add_argument("--sheet", type=Path, metavar="PNG",
                   help="also write a contact sheet of the hits (frames from the shards)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --sheet file (refused otherwise)")
    _add_encoder_options(p, None, None)
    p.set_defaults(run=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from pipelines.encoder import load_encoder, load_encoder_of
    from pipelines.sheet import contact_sheet

    if args.sheet:  # refused before any work
        check_output_file(args.sheet, overwrite=args.overwrite, inputs=[args.store])
    index = FrameIndex(args.store)
    store = index.store
    if args.model:
        encoder = load_encoder(args.model, args.pretrained, args.device)
    else:
        encoder = load_encoder_of(store.encoder, args.device)
    store.check_encoder(encoder.identity)
    hits = index.hits(encoder.encode_texts([args.query])[0], args.k)
    out = console.out
    out.print(f"{'rank':>4}  {'video':<30} {'time (s)':>9}  {'score':>6}")
    for rank, hit in enumerate(hits, start=1):
        out.print(f"{rank:>4}  {hit.video_id:<30} {hit.time:>9.3f}  {hit.score:>6.3f}")
    if args.sheet:
        shards = FeatureStore(args.store).ingest.get("shards")
        path = contact_sheet(hits, shards, args.sheet, title=f"“{args.query}”")
        out.print(f"contact sheet → {path}")
    return EXIT_OK
