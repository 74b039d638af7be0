"""WebDataset frame shards: one tar sample per video, written atomically, resumable.

Layout of an ingest folder::

    plan.json                  which videos go to which shard, and the settings (fixed up
                               front; append-only: a grown corpus adds shards at the end)
    manifest.jsonl             the corpus as ingested (videos and questions; grows with it)
    shard-000000.tar           samples: <id>.json, <id>.000000.jpg, <id>.000001.jpg, ...
    shard-000000.done.json     written last: the shard's samples (position, byte range, frames),
                               its failures and timings. A shard without it is not done.
    videos.jsonl               one row per landed video (derived from the markers each run)
    failures.jsonl, summary.json

A shard is written to ``<name>.tmp``, flushed to disk, renamed, and only then is its done
marker written (also through a temporary name), so a reader never sees half a shard and a
re-run after ``kill -9`` redoes exactly the shards without a marker. One writer per shard
is enforced with a lock file (``.locks/``).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stores.errors import UserError
from stores.manifest import Manifest, merge, read_manifest
from stores.owned import exclusive_lock  # noqa: F401  (shared with the ingest stage)

PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.jsonl"
VIDEOS_FILE = "videos.jsonl"
FAILURES_FILE = "failures.jsonl"
SUMMARY_FILE = "summary.json"
FORMAT_VERSION = 1


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def marker_name(index: int) -> str:
    return f"shard-{index:06d}.done.json"


def lock_path(directory: Path, index: int | None = None) -> Path:
    """Lock file of the whole folder (``index=None``) or of one shard, under ``.locks/``."""
    name = "ingest.lock" if index is None else f"shard-{index:06d}.lock"
    return directory / ".locks" / name


def frame_member(index: int) -> str:
    """The extension of frame ``index`` within its sample (``000012.jpg``)."""
    return f"{index:06d}.jpg"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers see all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class SampleLocation:
    """Where a video's sample lies: shard file, position in it, byte range of its members."""

    video_id: str
    shard: str
    position: int
    start: int
    end: int
    frames: int


def _member_bytes(name: str, data: bytes) -> bytes:
    """One tar member (header and data padded to whole blocks), as ``TarFile.addfile``
    writes it. PAX format: a name longer than 100 bytes or not ASCII goes into a PAX ``path``
    record, the only record written (uid, gid, mtime and size fit their fields, so none of
    them gets one); a short ASCII name gives the same bytes as plain USTAR."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return header + data + tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE)


def sample_bytes(key: str, meta: dict[str, Any], frames: Sequence[bytes]) -> bytes:
    """The members of sample ``key``: ``<key>.json`` first, then its frames in order."""
    parts = [_member_bytes(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))]
    for i, jpeg in enumerate(frames):
        if not isinstance(jpeg, (bytes, bytearray, memoryview)):
            raise TypeError(f"sample {key!r}: frame {i} is {type(jpeg).__name__}, not bytes")
        parts.append(_member_bytes(f"{key}.{frame_member(i)}", bytes(jpeg)))
    return b"".join(parts)


class ShardTarWriter:
    """Write one shard. ``add`` appends a whole sample; ``commit`` makes the shard visible.

    Members get fixed metadata (mtime 0, root owner), so the same inputs give the same bytes.
    A sample is built in memory and written at once: one that fails (a frame that is not
    bytes, a full disk) leaves nothing of itself in the shard.
    """

    def __init__(self, directory: Path, index: int) -> None:
        self.directory = directory
        self.index = index
        self.path = directory / shard_name(index)
        self.tmp_path = directory / (shard_name(index) + ".tmp")
        # Held open across add() calls and closed by commit() or abort().
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115
        self._offset = 0
        self.samples: list[SampleLocation] = []

    def add(self, key: str, meta: dict[str, Any], frames: Sequence[bytes]) -> SampleLocation:
        """Append the sample ``key``: ``<key>.json`` first, then its frames in order."""
        data = sample_bytes(key, meta, frames)
        start = self._offset
        try:
            self._file.write(data)
        except BaseException:
            self._file.seek(start)
            self._file.truncate()
            raise
        self._offset = start + len(data)
        location = SampleLocation(
            key, self.path.name, len(self.samples), start, self._offset, len(frames)
        )
        self.samples.append(location)
        return location

    def _finish_archive(self) -> None:
        """The end-of-archive blocks and the padding to a whole record, as ``tarfile``
        writes them on close."""
        end = self._offset + 2 * tarfile.BLOCKSIZE
        self._file.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))

    def commit(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Close, flush to disk, rename into place, then write the done marker (last)."""
        self._finish_archive()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)
        marker = {
            "version": FORMAT_VERSION,
            "shard": self.path.name,
            "bytes": self.path.stat().st_size,
            "samples": [
                {k: getattr(s, k) for k in ("video_id", "position", "start", "end", "frames")}
                for s in self.samples
            ],
            **stats,
        }
        write_json_atomic(self.directory / marker_name(self.index), marker)
        return marker

    def abort(self) -> None:
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)


def read_record(path: Path, problem: Callable[[Any], str | None], remedy: str) -> Any:
    """A JSON file refocus wrote. A damaged one (unreadable, not JSON, or a shape that
    ``problem`` names) is one :class:`UserError` naming the file and ``remedy``."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: damaged ({type(e).__name__}: {reason}); {remedy}") from None
    what = problem(data)
    if what is not None:
        raise UserError(f"{path}: damaged ({what}); {remedy}")
    return data


def _plan_problem(plan: Any) -> str | None:
    if not isinstance(plan, dict) or not isinstance(plan.get("settings"), dict):
        return "not an object with 'settings'"
    shards = plan.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in shards):
        return "'shards' is not a list of lists of video ids"
    return None


SAMPLE_FIELDS = {"video_id": str, "position": int, "start": int, "end": int, "frames": int}


def _marker_problem(marker: Any) -> str | None:
    if not isinstance(marker, dict) or not isinstance(marker.get("shard"), str):
        return "not an object with 'shard'"
    samples = marker.get("samples")
    if not isinstance(samples, list) or not all(
            isinstance(s, dict) and all(isinstance(s.get(k), kind) for k, kind in
                                        SAMPLE_FIELDS.items()) for s in samples):
        return f"'samples' is not a list of objects with {', '.join(SAMPLE_FIELDS)}"
    if not isinstance(marker.get("failures", []), list):
        return "'failures' is not a list"
    return None


def read_plan(directory: Path) -> dict[str, Any] | None:
    path = directory / PLAN_FILE
    if not path.exists():
        return None
    return read_record(path, _plan_problem, f"remove the ingest folder {directory} and run "
                                            "ingest again")


def write_plan(directory: Path, plan: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / PLAN_FILE, {"version": FORMAT_VERSION, **plan})


def read_marker(directory: Path, index: int) -> dict[str, Any] | None:
    path = directory / marker_name(index)
    if not path.exists():
        return None
    return read_record(path, _marker_problem, f"delete it and run the same ingest again "
                                              f"(it rewrites {shard_name(index)})")


@dataclass
class Sample:
    """A video read back from a shard: its metadata and its JPEG frames in time order."""

    meta: dict[str, Any]
    frames: list[bytes]


def _parse_sample(data: bytes, key: str) -> Sample:
    meta: dict[str, Any] | None = None
    frames: dict[int, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            content = tar.extractfile(member)
            if content is None:
                continue
            suffix = member.name[len(key) + 1:]
            if suffix == "json":
                meta = json.loads(content.read())
            elif suffix.endswith(".jpg"):
                frames[int(suffix[:-4])] = content.read()
    if meta is None:
        raise ValueError(f"sample {key!r} has no json member")
    return Sample(meta, [frames[i] for i in sorted(frames)])


class ShardSet:
    """Read access to an ingest folder: finished shards, video lookup, random access."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        plan = read_plan(self.directory)
        if plan is None:
            raise UserError(f"{self.directory}: not an ingest folder (no {PLAN_FILE})")
        self.plan = plan

    def markers(self) -> list[dict[str, Any]]:
        """Done markers of the finished shards, in shard order."""
        out = []
        for index in range(len(self.plan["shards"])):
            marker = read_marker(self.directory, index)
            if marker is not None:
                out.append(marker)
        return out

    def lookup(self) -> dict[str, SampleLocation]:
        """Video id → where its sample lies, for every landed video."""
        out: dict[str, SampleLocation] = {}
        for marker in self.markers():
            for s in marker["samples"]:
                out[s["video_id"]] = SampleLocation(
                    s["video_id"], marker["shard"], s["position"], s["start"], s["end"], s["frames"]
                )
        return out

    def failures(self) -> list[dict[str, Any]]:
        return [f for m in self.markers() for f in m.get("failures", [])]

    def read(self, video_id: str, location: SampleLocation | None = None) -> Sample:
        """One video's sample, read by byte range without scanning the shard."""
        loc = location or self.lookup().get(video_id)
        if loc is None:
            raise UserError(f"{self.directory}: no video {video_id!r} in the finished shards")
        with open(self.directory / loc.shard, "rb") as f:
            f.seek(loc.start)
            data = f.read(loc.end - loc.start)
        return _parse_sample(data, video_id)


# ----------------------------------------------------------------------------- questions

def question_manifests(given: Sequence[str | os.PathLike[str]] | None,
                       shards: str | os.PathLike[str] | None) -> list[Path]:
    """The manifests that hold a stage's questions: the ``given`` ones (--qa, --questions),
    else the manifest ingested into the ``shards`` folder when it has one (a folder ingested
    from bare videos has none, and neither has no folder: then the list is empty)."""
    if given:
        return [Path(p) for p in given]
    if shards is None or not str(shards):
        return []
    ingested = Path(shards) / MANIFEST_FILE
    return [ingested] if ingested.is_file() else []


def read_questions(given: Sequence[str | os.PathLike[str]] | None,
                   shards: str | os.PathLike[str] | None) -> Manifest | None:
    """The :func:`question_manifests` read and merged (None when there are none); a given
    manifest that cannot be read is a one-line error."""
    paths = question_manifests(given, shards)
    return merge([read_manifest(p) for p in paths]) if paths else None
