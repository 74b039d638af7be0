"""``refocus train-reader --distill lmm:MODEL``: a reader trained on a reference LMM's stored
option logits and margins (pipelines/margins.py computes them, into OUT/margins unless
``--margins`` names a finished margins folder) instead of on the ground-truth answers, with
its margin error against held-out LMM margins before (at init) and after training."""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines import reporting
from pipelines.learn import (
    check_splits,
    kept_report,
    load_corpus,
    reader_identity,
    reader_report,
    reward_inputs,
    save_reader,
)
from pipelines.margins import ReferenceOptions, precompute_margins, scored
from refocus.data import Corpus
from refocus.device import pick_device
from refocus.distill import Scored, distill_reader, margin_error
from refocus.reader import build_reader, default_config
from refocus.settings import VAL_SPLIT, DistillSettings, MarginSettings, ReaderTrainSettings
from stores.errors import UserError
from stores.margins import MarginStore
from stores.owned import claim

MARGINS_FOLDER = "margins"  # OUT/margins when no --margins is given


def check_source(margin_store: MarginStore, spec: str, present: str | None) -> str:
    """The stored reference identity, refused in one line unless it is ``spec``'s model (and
    presentation, when one is asked for)."""
    stored = margin_store.reference()
    target = spec.partition(":")[2]
    name, _, rest = stored.removeprefix("lmm:").rpartition(":")[0].rpartition(":")
    shown = rest
    if not stored.startswith("lmm:") or name != target or (present and shown != present):
        raise UserError(f"--margins {margin_store.directory}: holds margins of {stored}, not of "
                        f"{spec}{' shown as ' + present if present else ''}; distill from "
                        "margins of that model (or leave --margins out to compute them)")
    return stored


def held_out_questions(corpus: Corpus, data: Scored, share: float) -> tuple[set[int], str]:
    """The questions whose margins are kept out of training: the validation split's, else a
    fixed share of the scored questions (by a hash of the qid)."""
    scored_rows = set(data.questions.tolist())
    val = {q for q in scored_rows if corpus.split[q] == VAL_SPLIT}
    if val:
        return val, VAL_SPLIT
    cut = int(share * 1000)
    held = {q for q in scored_rows if zlib.crc32(corpus.qids[q].encode()) % 1000 < cut}
    return held, f"{share:.0%} of the questions"


def distill_reader_stage(store: str | os.PathLike[str], qa: Sequence[str] | None,
                         out: str | os.PathLike[str], spec: str,
                         settings: ReaderTrainSettings = ReaderTrainSettings(),
                         distill: DistillSettings = DistillSettings(),
                         architecture: str = "generic",
                         margins: str | os.PathLike[str] | None = None,
                         margin_settings: MarginSettings = MarginSettings(),
                         options: ReferenceOptions = ReferenceOptions(),
                         log: Callable[[dict], None] | None = None,
                         report_to: str = reporting.NO_REPORT) -> dict[str, Any]:
    """Distil ``spec``'s stored outputs into a reader folder ``out``; its report (a reader
    already there, distilled the same way from the same margins, is kept). ``report_to`` also
    streams the log rows (pipelines/reporting.py)."""
    reporting.require(report_to)
    if spec.partition(":")[0] != "lmm" or not spec.partition(":")[2]:
        raise UserError(f"--distill {spec!r}: expected lmm:MODEL (a Hugging Face video-LLM id "
                        "or folder)")
    owned = claim(out, "reader", inputs=[store, *(qa or ()), margins, options.reference_features,
                                         *reward_inputs(spec)])
    with owned.lock(), reporting.reporter(
            report_to, owned, {**reader_identity(store, qa, settings, architecture),
                               "distill": spec}) as reporter:
        log = reporting.teed(log, reporter)
        corpus = load_corpus(store, qa, pick_device(options.device))
        check_splits(corpus, store, qa)
        if margins is None:
            margins = owned.path / MARGINS_FOLDER
            precompute_margins(store, qa, margins, spec, margin_settings, options, corpus=corpus)
        margin_store = MarginStore(margins)
        source = check_source(margin_store, spec, options.present)
        identity = {**reader_identity(store, qa, settings, architecture),
                    "distilled_from": source, "margins": str(Path(margins).resolve()),
                    "distill": distill.__dict__}
        kept = kept_report(owned, identity)
        if kept is not None:
            return kept
        data = scored(margin_store, corpus)
        held, held_name = held_out_questions(corpus, data, distill.held_out_share)
        train = data.of_questions(set(data.questions.tolist()) - held)
        test = data.of_questions(held)
        if not len(train) or not len(test):
            raise UserError(f"{margins}: {len(train)} subsets to train on and {len(test)} held "
                            "out; score more questions (a val split, or more train questions)")
        config = default_config(corpus, architecture)
        torch.manual_seed(settings.seed)  # the same start as distill_reader's
        before = margin_error(build_reader(config).to(corpus.device), corpus, test)
        started = time.perf_counter()
        reader = distill_reader(corpus, train, settings, distill, config, log)
        seconds = time.perf_counter() - started
        split = VAL_SPLIT if corpus.rows(VAL_SPLIT) else "train"
        report = {"split": split, **reader_report(reader, corpus, split),
                  "train_seconds": round(seconds, 1), "distilled_from": source,
                  "train_subsets": len(train),
                  "margin_error": {"held_out": held_name, "subsets": len(test),
                                   "before": before,
                                   "after": margin_error(reader, corpus, test)}}
        save_reader(owned, reader, store, identity, report)
    return report
