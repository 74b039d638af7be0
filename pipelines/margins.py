"""``refocus precompute-margins``: a reference LMM's option logits and margins on many random
frame subsets per question (with and without the evidence), in batched forwards, into a
margin store (stores/margins.py) — the offline half of offline-to-online training.

Resumable and mappable like ingest: ``margins_job`` claims and locks the folder and fixes the
plan (which questions form each chunk) on the first run; ``margins_chunk`` scores one chunk
and writes its file and done marker (what a Prefect task maps; a finished chunk is skipped);
``finish_margins`` writes the summary. ``precompute_margins`` runs them in order.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.learn import load_corpus, reference, reward_inputs, store_shards
from refocus.data import Corpus
from refocus.distill import Scored, draw_subsets
from refocus.reader import margins
from refocus.rewards import Reference, pad_subsets
from refocus.settings import MarginSettings, ReferenceOptions
from stores.errors import UserError
from stores.margins import KIND, Chunk, MarginStore, chunk_name
from stores.owned import Owned, claim
from stores.shards import write_json_atomic


def load_reference(spec: str, corpus: Corpus, store: str | os.PathLike[str],
                   options: ReferenceOptions) -> Reference:
    return reference(spec, corpus, store_shards(store), options.reference_features,
                     options.reference_batch, options.reference_cache_gb, options.present)


def plan_chunks(corpus: Corpus, settings: MarginSettings) -> list[list[str]]:
    """The qids of the scored splits, in corpus order, in chunks."""
    qids = [corpus.qids[q] for q in corpus.rows() if corpus.split[q] in settings.splits]
    n = settings.questions_per_chunk
    return [qids[i:i + n] for i in range(0, len(qids), n)]


def subsets_of(corpus: Corpus, question: int, settings: MarginSettings) -> list[list[int]]:
    """The question's subsets: drawn from a generator of (seed, qid) alone, so a chunk
    redone gives the same subsets whatever else ran."""
    rng = np.random.default_rng([settings.seed, zlib.crc32(corpus.qids[question].encode())])
    return draw_subsets(corpus, question, settings, rng)


@dataclass
class MarginsJob:
    owned: Owned
    store: MarginStore
    reference_id: str
    settings: MarginSettings
    chunks: list[list[str]]  # the plan
    todo: list[int]  # chunks without a done marker when the job began
    started: float


def claim_margins(out: str | os.PathLike[str],
                  inputs: Sequence[str | os.PathLike[str] | None] = ()) -> Owned:
    """``out`` as a margins folder: created, or one precompute-margins made; never a user's
    folder nor one of the inputs."""
    return claim(out, KIND, inputs=inputs)


def margin_inputs(store: str | os.PathLike[str], qa: Sequence[str] | None, spec: str,
                  options: ReferenceOptions) -> list[Any]:
    return [store, *(qa or ()), options.reference_features, *reward_inputs(spec)]


@contextmanager
def margins_job(out: str | os.PathLike[str], corpus: Corpus, reference_id: str,
                settings: MarginSettings, store: str | os.PathLike[str],
                inputs: Sequence[Any] = ()) -> Iterator[MarginsJob]:
    """The folder claimed and locked for the block, the plan fixed (or the first run's
    plan, checked against this reference and these settings)."""
    owned = claim_margins(out, inputs)
    with owned.lock():
        owned.remove_stale("*.tmp")
        margin_store = MarginStore(owned.path)
        chunks = margin_store.open_for_writing(reference_id, settings.plan_dict(),
                                               plan_chunks(corpus, settings),
                                               str(Path(store).resolve()))
        todo = [i for i in range(len(chunks)) if not margin_store.done(i)]
        yield MarginsJob(owned, margin_store, reference_id, settings, chunks, todo,
                         time.perf_counter())


def margins_chunk(out: str | os.PathLike[str], index: int, qids: Sequence[str],
                  corpus: Corpus, ref: Reference, settings: MarginSettings) -> dict[str, Any]:
    """Score one chunk's questions on their subsets and write the chunk; its done marker
    (read back when the chunk was already done)."""
    margin_store = MarginStore(out)
    if margin_store.done(index):
        marker = out_path(out, index)
        return {**json.loads(marker.read_text()), "skipped": True}
    row_of = {qid: i for i, qid in enumerate(corpus.qids)}
    lost = [qid for qid in qids if qid not in row_of]
    if lost:
        raise UserError(f"{out}: the plan of {chunk_name(index)} holds question {lost[0]!r}, "
                        "which the feature store and manifests no longer have; compute the "
                        "margins of this corpus into a new folder")
    rows, subsets = [], []
    for qid in qids:
        for subset in subsets_of(corpus, row_of[qid], settings):
            rows.append(row_of[qid])
            subsets.append(subset)
    logits, margin = score(corpus, ref, rows, subsets, settings.batch)
    k = max((len(s) for s in subsets), default=1)
    frames = np.full((len(subsets), k), -1, dtype=np.int64)
    for i, s in enumerate(subsets):
        frames[i, :len(s)] = s
    chunk = Chunk(np.asarray([corpus.qids[r] for r in rows], dtype=str), frames, logits, margin)
    return {**margin_store.write_chunk(index, chunk), "skipped": False}


def out_path(out: str | os.PathLike[str], index: int) -> Path:
    return Path(out) / f"{chunk_name(index)}.done.json"


@torch.no_grad()
def score(corpus: Corpus, ref: Reference, rows: list[int], subsets: list[list[int]],
          batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Option logits [S, O] and margins [S] of (question row, subset) pairs, ``batch`` pairs
    per call of the reference."""
    logits, margin = [], []
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        picks, valid = pad_subsets(subsets[start:start + batch], corpus.device)
        questions = torch.tensor(part, device=corpus.device)
        z = ref.logits(corpus, questions, picks, valid).float()
        logits.append(z.cpu().numpy())
        margin.append(margins(z, corpus.answer[questions]).cpu().numpy())
    width = corpus.max_options
    if not logits:
        return np.zeros((0, width), np.float32), np.zeros(0, np.float32)
    return np.concatenate(logits).astype(np.float32), np.concatenate(margin).astype(np.float32)


def finish_margins(job: MarginsJob, markers: Sequence[dict[str, Any]],
                   failed: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    written = [m for m in markers if not m.get("skipped")]
    summary = {"out": str(job.owned.path), "reference": job.reference_id,
               "chunks": len(job.chunks), "chunks_written": len(written),
               "chunks_skipped": len(job.chunks) - len(job.todo) + len(markers) - len(written),
               "subsets_written": sum(m["subsets"] for m in written),
               "failed": [{"chunk": name, "error": error} for name, error in failed],
               "missing": job.store.missing(),
               "seconds": round(time.perf_counter() - job.started, 2)}
    write_json_atomic(job.owned.path / "summary.json", summary)
    return summary


def precompute_margins(store: str | os.PathLike[str], qa: Sequence[str] | None,
                       out: str | os.PathLike[str], spec: str,
                       settings: MarginSettings = MarginSettings(),
                       options: ReferenceOptions = ReferenceOptions(),
                       corpus: Corpus | None = None, ref: Reference | None = None,
                       on_chunk: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Every unfinished chunk, in order (``corpus`` and ``ref``: already loaded ones)."""
    inputs = margin_inputs(store, qa, spec, options)
    claim_margins(out, inputs)  # a bad --out is refused before anything loads
    if corpus is None:
        from refocus.device import pick_device

        corpus = load_corpus(store, qa, pick_device(options.device))
    ref = ref or load_reference(spec, corpus, store, options)
    with margins_job(out, corpus, ref.id, settings, store, inputs) as job:
        markers = []
        for done, index in enumerate(job.todo):
            markers.append(margins_chunk(job.owned.path, index, job.chunks[index], corpus, ref,
                                         settings))
            if on_chunk is not None:
                on_chunk(done + 1, len(job.todo))
        return finish_margins(job, markers)


def scored(margin_store: MarginStore, corpus: Corpus) -> Scored:
    """A finished store's subsets as tensors over ``corpus`` (its rows, its option width);
    subsets of questions the corpus lacks are left out."""
    data = margin_store.load()
    row_of = {qid: i for i, qid in enumerate(corpus.qids)}
    keep = np.asarray([q in row_of for q in data.qid.tolist()], dtype=bool)
    questions = torch.tensor([row_of[q] for q in data.qid[keep].tolist()], dtype=torch.long)
    frames = torch.as_tensor(data.frames[keep])
    logits = torch.as_tensor(data.logits[keep])
    width = corpus.max_options
    if logits.shape[1] < width:
        logits = torch.nn.functional.pad(logits, (0, width - logits.shape[1]), value=-torch.inf)
    return Scored(questions, frames.clamp(min=0), frames >= 0, logits[:, :width],
                  torch.as_tensor(data.margin[keep]))
