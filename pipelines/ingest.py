"""Ingest: videos → WebDataset frame shards, in parallel over shards, resumable.

``ingest()`` fixes the plan (which video goes to which shard) up front and writes it, skips
shards whose done marker exists, and hands the rest to a runner (``pipelines/runners.py``:
by default a process pool, one shard per task; or Prefect tasks).
A worker decodes its shard's videos one by one (``pipelines.decode``), encodes the kept
frames as JPEG, and writes the shard through ``stores.shards.ShardTarWriter``. A video that
fails is recorded in its shard's marker with a one-line reason and the shard goes on.

The parts: ``ingest_job`` (owned folder, plan + folder lock), ``shard_step`` (one shard, one
writer: ``ingest_shard``), ``finish_ingest`` (summary and failure records).
"""

from __future__ import annotations

import functools
import io
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines.decode import DecodeSettings, VideoDecoder, VideoError
from pipelines.runners import Failed, LocalRunner, Runner, Step, ignore, one_line, split
from stores import shards
from stores.errors import UserError
from stores.ids import stable_ids
from stores.manifest import Issue, Manifest, Video, read_manifest, write_manifest
from stores.owned import Owned, claim
from stores.urls import NetworkSettings, is_url


@dataclass(frozen=True)
class IngestSettings:
    """Everything that decides what lands in the shards, plus how many workers do it and
    what network inputs may be read (``network`` changes no byte of the shards)."""

    decode: DecodeSettings = field(default_factory=DecodeSettings)
    jpeg_quality: int = 90
    shard_size: int = 16
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    network: NetworkSettings = field(default_factory=NetworkSettings)

    def __post_init__(self) -> None:
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")

    def output_settings(self) -> dict[str, Any]:
        """The settings that change the shards' bytes (not workers, threads or network)."""
        decode = self.decode.as_dict()
        decode.pop("threads")
        return {**decode, "jpeg_quality": self.jpeg_quality, "shard_size": self.shard_size}


@dataclass(frozen=True)
class VideoDone:
    """Progress event: one video finished (landed with ``frames``, or failed with ``error``)."""

    video_id: str
    frames: int
    error: str | None = None


@dataclass(frozen=True)
class Failure:
    """Something that did not land: a manifest row, a video, or a whole shard."""

    kind: str  # "row", "video" or "shard"
    where: str  # file:line, the video's source, or the shard file
    error: str  # one line
    video_id: str | None = None

    def __str__(self) -> str:
        return f"{self.where}: {self.error}"


@dataclass
class IngestSummary:
    """What an ingest run did. ``failures`` lists bad rows and failed videos, one line each."""

    out: str
    videos: int = 0  # landed, in all finished shards
    frames: int = 0
    failed: int = 0  # videos that failed, in all finished shards
    shards: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    frames_written: int = 0  # by this run
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # decode / encode / write seconds
    failures: list[Failure] = field(default_factory=list)

    @property
    def frames_per_second(self) -> float:
        return self.frames_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "frames_per_second": round(self.frames_per_second, 2)}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> IngestSummary:
        """The summary ``as_dict`` wrote (what a flow returns)."""
        summary = cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})
        summary.failures = [Failure(**f) for f in record.get("failures", [])]
        return summary


def plan_shards(videos: list[Video], shard_size: int,
                planned: list[list[str]] | None = None) -> list[list[str]]:
    """Video ids per shard, append-only: the shards already ``planned`` unchanged, then the
    videos in none of them, in consecutive runs of ``shard_size`` in manifest order. A grown
    corpus gets new shards; a video gone from the inputs keeps its place."""
    old = [list(ids) for ids in planned or []]
    seen = {i for ids in old for i in ids}
    ids = [v.id for v in videos if v.id not in seen]
    return old + [ids[i:i + shard_size] for i in range(0, len(ids), shard_size)]


SHARD_LOCK_WAIT = 30.0  # seconds


def encode_jpeg(rgb: Any, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _video_meta(video: Video, decoder: VideoDecoder, times: list[float],
                settings: IngestSettings) -> dict[str, Any]:
    info = decoder.info
    return {
        "video_id": video.id, "source": video.path, "stream": info.stream, "codec": info.codec,
        "duration": info.duration, "fps": info.fps, "width": info.width, "height": info.height,
        "source_width": info.source_width, "source_height": info.source_height,
        "rotation": info.rotation, "start_time": info.start_time,
        "timestamps": times, "decode_errors": info.decode_errors,
        "settings": settings.output_settings(),
    }


def _ingest_video(
    video: Video, writer: shards.ShardTarWriter, settings: IngestSettings, timings: dict[str, float]
) -> int:
    """Decode, encode and append one video; returns its frame count or raises VideoError."""
    jpegs: list[bytes] = []
    times: list[float] = []
    t_decode = t_encode = 0.0
    mark = time.perf_counter()
    with VideoDecoder(video.path, settings.decode, settings.network) as decoder:
        for candidate in decoder.candidates():
            now = time.perf_counter()
            t_decode += now - mark
            jpegs.append(encode_jpeg(candidate.rgb, settings.jpeg_quality))
            times.append(candidate.time)
            mark = time.perf_counter()
            t_encode += mark - now
        t_decode += time.perf_counter() - mark
        meta = _video_meta(video, decoder, times, settings)
    mark = time.perf_counter()
    writer.add(video.id, meta, jpegs)
    timings["decode"] += t_decode
    timings["encode"] += t_encode
    timings["write"] += time.perf_counter() - mark
    return len(jpegs)


def ingest_shard(
    index: int, videos: list[Video], out: Path, settings: IngestSettings,
    report: Callable[[VideoDone], None],
) -> dict[str, Any]:
    """Write shard ``index`` from ``videos``; returns its done marker. One writer per shard."""
    # The folder lock is ours, so only a dying worker of a killed run can hold this one.
    lock = shards.lock_path(out, index)
    with shards.exclusive_lock(lock, f"shard {index} of {out}", wait=SHARD_LOCK_WAIT):
        done = shards.read_marker(out, index)
        if done is not None:
            return done
        started = time.perf_counter()
        timings = {"decode": 0.0, "encode": 0.0, "write": 0.0}
        failures: list[dict[str, str]] = []
        writer = shards.ShardTarWriter(out, index)
        try:
            for video in videos:
                try:
                    frames = _ingest_video(video, writer, settings, timings)
                    report(VideoDone(video.id, frames))
                except VideoError as e:
                    failures.append({"video_id": video.id, "source": video.path, "error": str(e)})
                    report(VideoDone(video.id, 0, str(e)))
                except Exception as e:  # a decoder or library fault must not sink the shard
                    error = f"unexpected {one_line(e)}"
                    failures.append({"video_id": video.id, "source": video.path, "error": error})
                    report(VideoDone(video.id, 0, error))
            stats = {
                "videos": len(writer.samples), "frames": sum(s.frames for s in writer.samples),
                "failures": failures, "seconds": round(time.perf_counter() - started, 4),
                "timings": {k: round(v, 4) for k, v in timings.items()},
            }
            return writer.commit(stats)
        except BaseException:
            writer.abort()
            raise


def _shard_item(out: Path, settings: IngestSettings, item: tuple[int, list[Video]],
                report: Callable[[VideoDone], None]) -> dict[str, Any]:
    index, videos = item
    return ingest_shard(index, videos, out, settings, report)


# ----------------------------------------------------------------------------- the run

def _with_decoder_threads(settings: IngestSettings, shards_to_do: int) -> IngestSettings:
    """Automatic decoder threads (0) become cores / busy workers: two workers on two cores
    decode faster with one thread each than with two threads each fighting for the cores."""
    if settings.decode.threads:
        return settings
    busy = max(1, min(settings.workers, shards_to_do))
    threads = max(1, (os.cpu_count() or 1) // busy)
    return replace(settings, decode=replace(settings.decode, threads=threads))


def _check_plan(out: Path, settings: dict[str, Any]) -> list[list[str]]:
    """The shards planned by earlier runs in ``out`` (none for a new folder); an ingest made
    with other output settings is refused (its shards would mix two kinds of frames)."""
    existing = shards.read_plan(out)
    if existing is None:
        return []
    if existing.get("settings") != settings:
        changed = sorted(k for k in {*settings, *existing["settings"]}
                         if settings.get(k) != existing["settings"].get(k))
        raise UserError(
            f"{out}: holds an ingest made with other settings ({', '.join(changed)}; see "
            f"{shards.PLAN_FILE}); resume with the same options, or choose another --out"
        )
    return existing["shards"]


def _place(path: str) -> str:
    """Where a video is: its URL, or its local path resolved (links followed)."""
    return path if is_url(path) else os.path.realpath(path)


def _with_stored_ids(stored: Manifest, manifest: Manifest) -> Manifest:
    """``manifest`` with its videos' ids made stable against the ``stored`` corpus
    (``stores.ids.stable_ids``): a video whose place is stored keeps its stored id, a new one
    never takes a stored id; its questions follow their video."""
    places = {v.id: _place(v.path) for v in stored.videos}
    ids = stable_ids(places, [(v.id, _place(v.path)) for v in manifest.videos])
    renamed = {v.id: new for v, new in zip(manifest.videos, ids, strict=True)}
    if all(old == new for old, new in renamed.items()):
        return manifest
    return Manifest([replace(v, id=renamed[v.id]) for v in manifest.videos],
                    [replace(q, video_id=renamed[q.video_id]) for q in manifest.questions],
                    list(manifest.issues))


def _grown_manifest(out: Path, manifest: Manifest) -> Manifest:
    """The corpus as ingested so far (``manifest.jsonl``) grown by ``manifest``, ids kept
    stable (``_with_stored_ids``): a video or question of the inputs replaces the stored one
    of its id, the others are added, and the stored ones gone from the inputs stay (their
    shards and features stay too)."""
    path = out / shards.MANIFEST_FILE
    if not path.exists():
        return manifest
    stored = read_manifest(path)
    if stored.issues:  # refocus wrote it validated: a bad row is damage, not user input
        raise UserError(f"{path}: damaged ({stored.issues[0]}); remove the ingest folder "
                        f"{out} and run ingest again")
    manifest = _with_stored_ids(stored, manifest)
    videos = {v.id: v for v in stored.videos} | {v.id: v for v in manifest.videos}
    questions = {q.qid: q for q in stored.questions} | {q.qid: q for q in manifest.questions}
    return Manifest(list(videos.values()), list(questions.values()), list(manifest.issues))


@dataclass
class IngestJob:
    """A planned ingest whose folder lock is held: the shards still to write and the rest."""

    out: Path
    plan: dict[str, Any]
    issues: list[Issue]
    todo: list[tuple[int, list[Video]]]
    videos_done: int
    settings: IngestSettings
    started: float = field(default_factory=time.perf_counter)


INGEST_KIND = "ingest"  # the marker of an ingest folder (stores/owned.py)
# Temporaries an ingest writes (through a temporary name and a rename): a killed run's are
# removed on the next start, and nothing else is.
INGEST_TEMPORARIES = (
    "shard-??????.tar.tmp", "shard-??????.done.json.tmp",
    *(f"{name}.tmp" for name in (shards.PLAN_FILE, shards.MANIFEST_FILE, shards.VIDEOS_FILE,
                                 shards.FAILURES_FILE, shards.SUMMARY_FILE)),
)


def claim_ingest(manifest: Manifest, out: str | os.PathLike[str],
                 inputs: Iterable[str | os.PathLike[str]] = ()) -> Owned:
    """``out`` as an ingest folder: created, or one an ingest made; never a user's folder,
    nor one holding (or inside) the videos or the given ``inputs``."""
    return claim(out, INGEST_KIND, inputs=[*inputs, *(v.path for v in manifest.videos)])


@contextmanager
def ingest_job(manifest: Manifest, out: str | os.PathLike[str], settings: IngestSettings,
               retry_failed: bool = False,
               inputs: Iterable[str | os.PathLike[str]] = ()) -> Iterator[IngestJob]:
    """Plan an ingest under ``out`` and hold its folder lock while the shards are written
    (by ``ingest``'s pool, or by a flow's mapped tasks); ``finish_ingest`` summarises.
    ``inputs`` (manifests, folders) may not be or hold ``out``, nor the videos."""
    if not manifest.videos:
        raise UserError("no videos to ingest: the inputs hold no usable video rows")
    owned = claim_ingest(manifest, out, inputs)
    out_dir = Path(out)
    with owned.lock():
        planned = _check_plan(out_dir, settings.output_settings())
        for pattern in INGEST_TEMPORARIES:
            owned.remove_stale(pattern)
        manifest = _grown_manifest(out_dir, manifest)
        plan = {"settings": settings.output_settings(),
                "shards": plan_shards(manifest.videos, settings.shard_size, planned)}
        shards.write_plan(out_dir, plan)
        write_manifest(out_dir / shards.MANIFEST_FILE, manifest)
        by_id = {v.id: v for v in manifest.videos}
        todo: list[tuple[int, list[Video]]] = []
        done_videos = 0
        for index, ids in enumerate(plan["shards"]):
            marker = shards.read_marker(out_dir, index)
            if marker is not None and retry_failed and marker.get("failures"):
                # its marker first, so it never looks done without its data
                owned.remove(shards.marker_name(index), shards.shard_name(index))
                marker = None
            if marker is None:
                todo.append((index, [by_id[i] for i in ids]))
            else:
                done_videos += len(ids)
        yield IngestJob(out_dir, plan, list(manifest.issues), todo, done_videos,
                        _with_decoder_threads(settings, len(todo)))


def shard_step(job: IngestJob) -> Step[tuple[int, list[Video]], dict[str, Any]]:
    """A job's per-shard step for a runner: an item is (shard index, its videos), its value
    the shard's done marker; the local runner uses ``settings.workers`` processes."""
    return Step("ingest-shard", functools.partial(_shard_item, job.out, job.settings),
                name=lambda item: shards.shard_name(item[0]),
                title=lambda item: f"ingest {item[0]:06d}", processes=job.settings.workers)


def finish_ingest(job: IngestJob, written: list[dict[str, Any]],
                  failed: list[Failed]) -> IngestSummary:
    """The summary of a job's shards (all of them, this run's and earlier ones), written to
    ``summary.json`` and ``failures.jsonl``; ``failed`` are shards that could not be written."""
    summary = _summarise(job.out, job.plan, job.issues, written, failed)
    summary.shards_skipped = len(job.plan["shards"]) - len(job.todo)
    summary.seconds = round(time.perf_counter() - job.started, 3)
    _write_records(job.out, summary)
    return summary


def ingest(
    manifest: Manifest,
    out: str | os.PathLike[str],
    settings: IngestSettings,
    *,
    retry_failed: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    report: Callable[[VideoDone], None] | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
    runner: Runner | None = None,
) -> IngestSummary:
    """Ingest ``manifest``'s videos into shards under ``out`` and return the summary.

    ``on_start(videos_to_do, videos_already_done)`` is called once the plan is known and
    ``report`` once per finished video (both for progress displays). ``retry_failed`` redoes
    finished shards that recorded failed videos. Manifest issues are carried into the
    summary's failures; they do not stop the run. ``out`` is claimed as an ingest folder
    (``claim_ingest``): a user's folder, or one holding ``inputs`` or the videos, is refused.
    ``runner`` maps the shards (default: ``LocalRunner``, a process pool of
    ``settings.workers``); a shard whose step fails is recorded and the others land.
    """
    with ingest_job(manifest, out, settings, retry_failed, inputs) as job:
        if on_start is not None:
            on_start(sum(len(v) for _, v in job.todo), job.videos_done)
        outcomes = (runner or LocalRunner()).map(shard_step(job), job.todo, report or ignore)
        return finish_ingest(job, *split(outcomes))


def _summarise(out: Path, plan: dict[str, Any], issues: list[Issue],
               written: list[dict[str, Any]], failed: list[Failed]) -> IngestSummary:
    summary = IngestSummary(out=str(out), shards=len(plan["shards"]),
                            shards_written=len(written))
    summary.failures = [
        Failure("row", issue.where, f"{issue.field}: {issue.message}") for issue in issues
    ]
    timings = {"decode": 0.0, "encode": 0.0, "write": 0.0}
    for marker in written:
        summary.frames_written += marker["frames"]
        for k, v in marker.get("timings", {}).items():
            timings[k] = timings.get(k, 0.0) + v
    summary.timings = {k: round(v, 3) for k, v in timings.items()}
    reader = shards.ShardSet(out)
    rows = []
    for marker in reader.markers():
        summary.videos += marker["videos"]
        summary.frames += marker["frames"]
        summary.failed += len(marker["failures"])
        summary.failures.extend(
            Failure("video", f["source"], f["error"], f["video_id"]) for f in marker["failures"]
        )
        rows.extend({"video_id": s["video_id"], "shard": marker["shard"],
                     "position": s["position"], "frames": s["frames"]} for s in marker["samples"])
    summary.failures.extend(Failure("shard", f.name, f.error) for f in failed)
    shards.write_jsonl(out / shards.VIDEOS_FILE, rows)
    return summary


def _write_records(out: Path, summary: IngestSummary) -> None:
    shards.write_jsonl(out / shards.FAILURES_FILE, [asdict(f) for f in summary.failures])
    shards.write_json_atomic(out / shards.SUMMARY_FILE, summary.as_dict())
