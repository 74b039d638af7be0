"""Embed: frame shards → CLIP embeddings in the feature store (+ questions, + FAISS index).

reader → mapper → writer, each testable alone:

* **plan** — from the ingest markers, the rows of every landed video (in plan order) and, per
  input shard, fixed batches of at most ``batch_size`` consecutive rows that never cross a
  shard boundary, so a row's embedding never depends on what else was pending (a resumed run
  writes the same bytes as an uninterrupted one);
* **reader** (``FrameBatches``, in DataLoader worker processes) — reads a batch's frames from
  the shards by byte range, decodes the JPEGs and preprocesses them; batches are dealt to the
  workers in turn, so JPEG work overlaps the model;
* **mapper** — the model forward in the main process (CUDA with autocast when present);
* **writer** — when all batches of an input shard are in, its rows go to Zarr and its done
  marker is written. A re-run skips shards with markers.

The reader and mapper are a runner's step (``pipelines/runners.py``): the local runner runs
one DataLoader over every shard; another runner (Prefect tasks) computes a shard per task
without DataLoader processes. Either way this process is the one writer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.encoder import Encoder, format_question, load_encoder_of
from pipelines.runners import Done, LocalRunner, Runner, Step, ignore
from pipelines.settings import EmbedSettings
from pipelines.workers import dataloader_worker_init
from stores import frames
from stores import shards as shard_files
from stores.errors import UserError
from stores.features import PROGRESS_DIR, STORE_DIR, FeatureWriter, Layout
from stores.index import build_index
from stores.manifest import Manifest, Question
from stores.owned import Owned, claim
from stores.shards import SampleLocation, ShardSet


@dataclass(frozen=True)
class FrameBatch:
    """Rows [start, stop) of the store, all from input shard ``shard``."""

    shard: int
    start: int
    stop: int


@dataclass
class ShardPlan:
    """One input shard: its videos' rows and frame rows in the store, and its batches."""

    index: int
    videos: slice
    rows: slice
    batches: list[FrameBatch]


@dataclass
class EmbedPlan:
    layout: Layout
    locations: list[SampleLocation]  # per video row
    shards: list[ShardPlan]


def plan(shard_set: ShardSet, batch_size: int) -> EmbedPlan:
    """Rows and batches for every landed video of a finished ingest."""
    n_shards = len(shard_set.plan["shards"])
    markers = shard_set.markers()
    if len(markers) < n_shards:
        raise UserError(f"{shard_set.directory}: ingest is unfinished ({len(markers)} of "
                        f"{n_shards} shards done); run the same refocus ingest again first")
    locations: list[SampleLocation] = []
    shard_plans: list[ShardPlan] = []
    row = 0
    for index, marker in enumerate(markers):
        first_video, first_row = len(locations), row
        for s in marker["samples"]:
            locations.append(SampleLocation(s["video_id"], marker["shard"], s["position"],
                                            s["start"], s["end"], s["frames"]))
            row += s["frames"]
        batches = [FrameBatch(index, start, min(start + batch_size, row))
                   for start in range(first_row, row, batch_size)]
        shard_plans.append(ShardPlan(index, slice(first_video, len(locations)),
                                     slice(first_row, row), batches))
    layout = Layout([loc.video_id for loc in locations], [loc.frames for loc in locations])
    if layout.n_frames == 0:
        raise UserError(f"{shard_set.directory}: no frames to embed (no video landed)")
    return EmbedPlan(layout, locations, shard_plans)


# ----------------------------------------------------------------------------- reader

class FrameError(Exception):
    """One frame of a shard could not be decoded; its row is left a zero vector."""


def decode_frame(data: bytes) -> Image.Image:
    """A shard's JPEG as RGB, or FrameError (unreadable, or over
    ``stores.frames.MAX_FRAME_PIXELS``: a decompression bomb fails its frame, not the run)."""
    try:
        return frames.decode_frame(data)
    except frames.FrameTooLarge as e:
        raise FrameError(str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise FrameError(f"unreadable JPEG ({type(e).__name__}: {e})".splitlines()[0]) from None


@dataclass
class LoadedBatch:
    batch: FrameBatch
    pixels: torch.Tensor  # [good rows, 3, H, W]: the rows of ``good`` only
    good: np.ndarray  # [rows] bool: the frame decoded (else its row stays a zero vector)
    time: np.ndarray  # [rows] timestamps
    duration: dict[int, float]  # video row → duration, for videos that start in this batch
    seconds: dict[str, float]  # read / decode / preprocess
    failures: list[str] = field(default_factory=list)  # one line per frame not decoded


class FrameBatches(IterableDataset):
    """Yields preprocessed batches; worker w of W takes batches w, w+W, ..."""

    def __init__(self, shards_dir: Path, embed_plan: EmbedPlan, batches: list[FrameBatch],
                 preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        self.shards_dir = shards_dir
        self.locations = embed_plan.locations
        self.offsets = embed_plan.layout.offsets
        self.batches = batches
        self.preprocess = preprocess

    def __iter__(self) -> Iterator[LoadedBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = ShardSet(self.shards_dir)
        cache: tuple[int, Any] | None = None  # the last video read: batches often share one
        for batch in self.batches[worker::workers]:
            seconds = {"read": 0.0, "decode": 0.0, "preprocess": 0.0}
            pixels, good, times, durations, failures = [], [], [], {}, []
            video = int(np.searchsorted(self.offsets, batch.start, side="right") - 1)
            row = batch.start
            while row < batch.stop:
                t0 = time.perf_counter()
                if cache is None or cache[0] != video:
                    cache = (video, reader.read(self.locations[video].video_id,
                                                self.locations[video]))
                sample = cache[1]
                t1 = time.perf_counter()
                seconds["read"] += t1 - t0
                first = row - int(self.offsets[video])
                last = min(batch.stop, int(self.offsets[video + 1])) - int(self.offsets[video])
                if first == 0:
                    durations[video] = float(sample.meta.get("duration") or np.nan)
                for i in range(first, last):
                    t1 = time.perf_counter()
                    try:
                        image = decode_frame(sample.frames[i])
                    except FrameError as e:
                        good.append(False)
                        failures.append(f"video {self.locations[video].video_id} frame {i} "
                                        f"({self.locations[video].shard}): {e}")
                        continue
                    t2 = time.perf_counter()
                    pixels.append(self.preprocess(image))
                    good.append(True)
                    seconds["decode"] += t2 - t1
                    seconds["preprocess"] += time.perf_counter() - t2
                times.extend(sample.meta["timestamps"][first:last])
                row += last - first
                video += 1
            yield LoadedBatch(batch, torch.stack(pixels) if pixels else torch.zeros(0),
                              np.asarray(good, dtype=bool), np.asarray(times), durations,
                              seconds, failures)


def _keep(item: LoadedBatch) -> LoadedBatch:  # DataLoader collate: batches come ready-made
    return item


# ----------------------------------------------------------------------------- the run

@dataclass
class EmbedSummary:
    out: str
    frames: int = 0  # in the store
    videos: int = 0
    questions: int = 0
    frames_written: int = 0  # by this run
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    index: dict[str, Any] | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def frames_per_second(self) -> float:
        return self.frames_written / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "frames_per_second": round(self.frames_per_second, 2)}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> EmbedSummary:
        """The summary ``as_dict`` wrote (what a flow returns)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


@dataclass
class _ShardBuffer:
    plan: ShardPlan
    embedding: np.ndarray
    time: np.ndarray
    duration: np.ndarray
    pending: int
    failures: list[str] = field(default_factory=list)


@dataclass
class ShardFeatures:
    """One input shard's computed rows, on their way to the writer."""

    plan: ShardPlan
    embedding: np.ndarray
    time: np.ndarray
    duration: np.ndarray
    failures: list[str] = field(default_factory=list)  # frames that could not be decoded


@dataclass
class EmbedJob:
    """A planned embedding whose folder lock is held: the writer and the shards to do."""

    shards_dir: Path
    out: Path
    plan: EmbedPlan
    writer: FeatureWriter
    todo: list[ShardPlan]
    started: float = field(default_factory=time.perf_counter)

    def write(self, shard: ShardFeatures) -> None:
        """The one writer: a shard's rows into Zarr, then its done marker."""
        self.writer.write_shard(shard.plan.index, shard.plan.rows, shard.embedding, shard.time,
                                shard.plan.videos, shard.duration,
                                {"frames": len(shard.time), "failures": shard.failures})

    def failures(self) -> list[str]:
        """The frames of every written shard that could not be decoded (from the markers,
        so a re-run still reports them)."""
        found: list[str] = []
        for shard in self.plan.shards:
            marker = self.out / PROGRESS_DIR / f"shard-{shard.index:06d}.done.json"
            if marker.exists():
                found += json.loads(marker.read_text(encoding="utf-8")).get("failures", [])
        return found


FEATURES_KIND = "features"  # the marker of a feature folder (stores/owned.py)


def claim_features(shards_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> Owned:
    """``out`` as a feature folder: created, or one an embed made; never a user's folder,
    nor the shards folder, inside it or holding it."""
    return claim(out, FEATURES_KIND, inputs=[shards_dir])


@contextmanager
def embed_job(shards_dir: str | os.PathLike[str], out: str | os.PathLike[str],
              identity: dict[str, Any], batch_size: int) -> Iterator[EmbedJob]:
    """Plan the store for a finished ingest and hold the feature folder's lock while the
    shards' features are computed (by ``embed``, or by a flow's mapped tasks). ``out`` is
    claimed as a feature folder: never a user's folder, nor the shards or inside them."""
    source = ShardSet(shards_dir)
    embed_plan = plan(source, batch_size)
    owned = claim_features(shards_dir, out)
    out_dir = Path(out)
    ingest_info = {"shards": str(Path(shards_dir).resolve()), "settings": source.plan["settings"]}
    with owned.lock():
        # chunk writes a killed run left half-done (never renamed), inside the store it made
        owned.remove_stale("*.partial", under=STORE_DIR)
        writer = FeatureWriter(out_dir, embed_plan.layout, identity, ingest_info)
        todo = [s for s in embed_plan.shards if not writer.done(s.index)]
        yield EmbedJob(Path(shards_dir), out_dir, embed_plan, writer, todo)


def finish_embed(job: EmbedJob, encoder: Encoder, settings: EmbedSettings,
                 questions: Manifest | None, written: list[ShardPlan],
                 timings: dict[str, float]) -> EmbedSummary:
    """Questions, the FAISS index and the summary, once every shard is written."""
    summary = EmbedSummary(out=str(job.out))
    summary.shards_written = len(written)
    summary.shards_skipped = len(job.plan.shards) - len(job.todo)
    summary.frames_written = sum(s.rows.stop - s.rows.start for s in written)
    missing = [s.index for s in job.plan.shards if not job.writer.done(s.index)]
    summary.failures = job.failures()
    summary.failures += [f"input shard {i}: its features were not written" for i in missing]
    if questions is not None:
        summary.questions, failures = _embed_questions(questions, job.plan, encoder, job.writer)
        summary.failures += failures
    summary.frames = job.plan.layout.n_frames
    summary.videos = len(job.plan.layout.video_ids)
    timings = dict(timings)
    if settings.index is not None and summary.frames and not missing:
        t0 = time.perf_counter()
        summary.index = build_index(job.out, settings.index)
        timings["index"] = time.perf_counter() - t0
    summary.timings = {k: round(v, 3) for k, v in timings.items()}
    summary.seconds = round(time.perf_counter() - job.started, 3)
    shard_files.write_json_atomic(job.out / "summary.json", summary.as_dict())
    return summary


def embed(
    shards_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    encoder: Encoder,
    settings: EmbedSettings,
    questions: Manifest | None = None,
    *,
    on_start: Callable[[int, int], None] | None = None,
    report: Callable[[int], None] | None = None,
    runner: Runner | None = None,
) -> EmbedSummary:
    """Embed the frames of a finished ingest (and ``questions``) into the store at ``out``.

    ``on_start(frames_to_do, frames_done)`` and ``report(frames)`` feed a progress display.
    ``runner`` computes the shards' features (default: ``LocalRunner``, one DataLoader of
    ``settings.workers`` processes over every shard); this process writes each as it comes.
    """
    with embed_job(shards_dir, out, encoder.identity, settings.batch_size) as job:
        rows_todo = sum(s.rows.stop - s.rows.start for s in job.todo)
        if on_start is not None:
            on_start(rows_todo, job.plan.layout.n_frames - rows_todo)
        started, timings = time.perf_counter(), {}
        written: list[ShardPlan] = []
        step = shard_step(job, encoder, settings.workers, timings)
        for outcome in (runner or LocalRunner()).map(step, job.todo, report or ignore):
            if isinstance(outcome, Done):  # else its task failed: reported as not written
                job.write(outcome.value)
                written.append(outcome.value.plan)
        timings = timings or {"tasks": time.perf_counter() - started}  # no per-stage times
        return finish_embed(job, encoder, settings, questions, written, timings)


class _Portable:
    """An encoder that goes to another process as its identity and device (loaded there
    once) and stays itself in this one, so that a shard's task need not carry a model."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return _portable, (json.dumps(self.encoder.identity, sort_keys=True),
                           str(self.encoder.device))


@functools.lru_cache(maxsize=2)
def _portable(identity: str, device: str) -> _Portable:
    return _Portable(load_encoder_of(json.loads(identity), device))


def _one_shard(shards_dir: str, embed_plan: EmbedPlan, encoder: _Portable, shard: ShardPlan,
               report: Callable[[int], None]) -> ShardFeatures:
    # No DataLoader processes: a runner's tasks are the parallelism here (and Dask workers
    # are daemonic, so they may not start any).
    [features] = compute_shards(Path(shards_dir), embed_plan, [shard], encoder.encoder, 0, {},
                                report)
    return features


def _all_shards(job: EmbedJob, encoder: Encoder, workers: int, timings: dict[str, float],
                todo: list[ShardPlan],
                report: Callable[[int], None]) -> Iterator[tuple[ShardPlan, ShardFeatures]]:
    for features in compute_shards(job.shards_dir, job.plan, todo, encoder, workers, timings,
                                   report):
        yield features.plan, features


def shard_step(job: EmbedJob, encoder: Encoder, workers: int,
               timings: dict[str, float]) -> Step[ShardPlan, ShardFeatures]:
    """A job's per-shard step for a runner (an input shard's features); the local runner
    runs one DataLoader of ``workers`` processes over all of them, its seconds per stage
    added to ``timings``."""
    return Step("embed-shard",
                functools.partial(_one_shard, str(job.shards_dir), job.plan, _Portable(encoder)),
                name=lambda shard: shard_files.shard_name(shard.index),
                title=lambda shard: f"embed {shard.index:06d}",
                many=functools.partial(_all_shards, job, encoder, workers, timings))


def compute_shards(shards_dir: Path, embed_plan: EmbedPlan, todo: list[ShardPlan],
                   encoder: Encoder, workers: int, timings: dict[str, float],
                   report: Callable[[int], None] = lambda n: None) -> Iterator[ShardFeatures]:
    """Embed the frames of ``todo``'s shards, yielding each shard as it is finished (the
    caller writes it before asking for the next); adds the per-stage seconds to ``timings``.
    ``workers`` DataLoader processes read and preprocess."""
    for key in ("read", "decode", "preprocess", "wait", "model", "write"):
        timings.setdefault(key, 0.0)
    buffers: dict[int, _ShardBuffer] = {}
    for shard in todo:
        n = shard.rows.stop - shard.rows.start
        buffer = _ShardBuffer(
            shard, np.zeros((n, encoder.dim), np.float16), np.zeros(n),
            np.full(shard.videos.stop - shard.videos.start, np.nan), len(shard.batches))
        if shard.batches:
            buffers[shard.index] = buffer
        else:  # every video of the shard failed to ingest: done with zero rows
            yield ShardFeatures(shard, buffer.embedding, buffer.time, buffer.duration)
    batches = [b for s in todo for b in s.batches]
    if not batches:
        return
    dataset = FrameBatches(shards_dir, embed_plan, batches, encoder.preprocess)
    workers = min(workers, len(batches))
    loader = DataLoader(dataset, batch_size=None, collate_fn=_keep, num_workers=workers,
                        pin_memory=encoder.device.type == "cuda",
                        worker_init_fn=dataloader_worker_init(),
                        prefetch_factor=4 if workers else None)
    mark = time.perf_counter()
    for item in loader:
        now = time.perf_counter()
        timings["wait"] += now - mark
        for k, v in item.seconds.items():
            timings[k] += v
        buffer = buffers[item.batch.shard]
        local = np.arange(item.batch.start, item.batch.stop)[item.good] - buffer.plan.rows.start
        if len(local):
            buffer.embedding[local] = encoder.encode_images(item.pixels)
        mark = time.perf_counter()
        timings["model"] += mark - now
        buffer.time[item.batch.start - buffer.plan.rows.start:
                    item.batch.stop - buffer.plan.rows.start] = item.time
        buffer.failures += item.failures
        for video, duration in item.duration.items():
            buffer.duration[video - buffer.plan.videos.start] = duration
        buffer.pending -= 1
        if buffer.pending == 0:
            yield ShardFeatures(buffer.plan, buffer.embedding, buffer.time, buffer.duration,
                                buffer.failures)
            del buffers[item.batch.shard]
        report(item.batch.stop - item.batch.start)
        done = time.perf_counter()
        timings["write"] += done - mark
        mark = done


def _questions_digest(questions: list[Question], identity: dict[str, Any]) -> str:
    payload = json.dumps([[q.qid, q.video_id, q.question, list(q.options), q.answer]
                          for q in questions] + [identity.get("weights_sha256"), "text"])
    return hashlib.sha256(payload.encode()).hexdigest()


def _embed_questions(manifest: Manifest, embed_plan: EmbedPlan, encoder: Encoder,
                     writer: FeatureWriter, batch_size: int = 256) -> tuple[int, list[str]]:
    rows = {vid: i for i, vid in enumerate(embed_plan.layout.video_ids)}
    usable = [q for q in manifest.questions if q.video_id in rows]
    failures = [f"question {q.qid}: video {q.video_id!r} is not in the shards (it failed "
                "to ingest, or was never ingested)" for q in manifest.questions
                if q.video_id not in rows]
    digest = _questions_digest(usable, encoder.identity)
    if writer.questions_done(digest):
        return len(usable), failures

    def encode(texts: list[str]) -> np.ndarray:
        parts = [encoder.encode_texts(texts[i:i + batch_size])
                 for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)

    options = [o for q in usable for o in q.options]
    writer.write_questions(
        qids=[q.qid for q in usable],
        video=np.array([rows[q.video_id] for q in usable], dtype=np.int32),
        answer=np.array([q.answer for q in usable], dtype=np.int16),
        embedding=encode([format_question(q.question, q.options) for q in usable]),
        text_embedding=encode([q.question for q in usable]),
        option_offsets=np.concatenate([[0], np.cumsum([len(q.options) for q in usable])]),
        option_embedding=encode(options),
        digest=digest,
    )
    return len(usable), failures
