"""The feature store: CLIP embeddings of a corpus's frames and questions in Zarr v3.

Layout of a feature folder (``refocus embed --out DIR``)::

    features.zarr/                  a plain Zarr v3 group (any Zarr reader opens it)
        frames/embedding            [n_frames, dim] float16, L2-normalised, CSR by video
        frames/time                 [n_frames] float64, presentation time in seconds
        frames/video                [n_frames] int32, the video row of each frame
        videos/id                   [n_videos] string
        videos/offsets              [n_videos + 1] int64: video v has rows offsets[v]:offsets[v+1]
        videos/duration             [n_videos] float64
        questions/qid, /video, /answer, /embedding      [n_questions] (embedding: [n, dim] f16,
                                    the question with its lettered options, one template)
        questions/text_embedding    [n_questions, dim] float16: the question's text alone
        questions/option_offsets    [n_questions + 1] int64 into options/embedding
        options/embedding           [n_options, dim] float16 (each option's own text)
        attributes: format, encoder identity, ingest settings and source, counts
    progress/shard-NNNNNN.done.json one per input shard whose frames are written
    progress/questions.done.json
    index/                          the FAISS frame index (stores/index.py)
    summary.json

Rows follow the ingest plan's order of landed videos, so the layout is fixed before any
embedding is computed. The store grows with its corpus: when the ingest plan gains shards
(new videos), the arrays are resized and the new videos' rows appended after the old ones;
the old rows, their chunk files (but the one chunk the old and new rows share) and their
done markers are never rewritten, so frame rows (and FAISS ids) of old videos stay put.
Writes go through one process only (the folder lock refuses a second) and Zarr writes every
chunk file atomically (temporary file, then rename), so a boundary chunk shared by two input
shards is always whole: a kill leaves either its old or its new bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from stores.errors import UserError
from stores.shards import write_json_atomic

FORMAT_VERSION = 1
STORE_DIR = "features.zarr"
PROGRESS_DIR = "progress"
CHUNK_BYTES = 2 << 20  # ~2 MiB chunks: cheap partial rewrites at shard boundaries, fast reads


RANDOM_WEIGHTS = "random"
# What must match for two encoders to give the same features (paths may differ).
IDENTITY_KEYS = ("config_sha256", "weights_sha256", "dim", "preprocess", "text_template")


def same_encoder(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same architecture config, weights bytes, dim, preprocessing and text template?
    Randomly initialised weights are never the same twice."""
    if RANDOM_WEIGHTS in (a.get("weights_sha256"), b.get("weights_sha256")):
        return False
    return all(a.get(k) == b.get(k) for k in IDENTITY_KEYS)


VIDEO_CHUNK_ROWS = 4096  # per-video arrays: few files however often a corpus grows


def chunk_rows(dim: int) -> int:
    return max(256, CHUNK_BYTES // (2 * dim))


@dataclass(frozen=True)
class Layout:
    """Where every video's frames go, decided from the ingest markers before embedding."""

    video_ids: list[str]
    frame_counts: list[int]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.frame_counts, dtype=np.int64)])

    @property
    def n_frames(self) -> int:
        return int(sum(self.frame_counts))


@dataclass
class Features:
    """A whole store in memory (what the trainer reads)."""

    frame_embedding: np.ndarray  # [n_frames, dim] float16
    frame_time: np.ndarray  # [n_frames] float64
    frame_video: np.ndarray  # [n_frames] int32
    video_ids: list[str]
    offsets: np.ndarray  # [n_videos + 1] int64
    duration: np.ndarray  # [n_videos]
    qids: list[str]
    question_video: np.ndarray  # [n_questions] int32
    answer: np.ndarray  # [n_questions] int16
    question_embedding: np.ndarray  # [n_questions, dim] float16 (question + options)
    question_text_embedding: np.ndarray  # [n_questions, dim] float16 (question alone)
    option_offsets: np.ndarray  # [n_questions + 1] int64
    option_embedding: np.ndarray  # [n_options, dim] float16


def read_array(array: zarr.Array, folder: Path) -> np.ndarray:
    """A whole array into memory. For the uncompressed, row-chunked arrays this store writes,
    each chunk file is the raw little-endian bytes of its rows: they are read straight into
    the result (one copy, as ``np.load`` does) instead of through Zarr's codec pipeline (three
    to five times slower). Any other array is read by Zarr itself."""
    meta = array.metadata
    grid = getattr(meta, "chunk_grid", None)
    plain = (
        getattr(meta, "zarr_format", 2) == 3 and array.compressors == () and array.filters == ()
        and str(getattr(array.serializer, "endian", "")).endswith("little")
        and getattr(meta.chunk_key_encoding, "separator", None) == "/"
        and hasattr(grid, "chunk_shape") and array.ndim >= 1
        and tuple(grid.chunk_shape[1:]) == tuple(array.shape[1:]) and array.dtype.kind in "fiu"
    )
    if not plain:
        return array[...]
    out = np.empty(array.shape, dtype=array.dtype.newbyteorder("<"))
    rows = grid.chunk_shape[0]
    trailing = ["0"] * (array.ndim - 1)
    for index, start in enumerate(range(0, array.shape[0], rows)):
        part = out[start:start + rows]
        path = folder.joinpath("c", str(index), *trailing)
        try:
            with open(path, "rb") as f:
                got = f.readinto(memoryview(part).cast("B"))
        except FileNotFoundError:  # a chunk never written holds the fill value
            part[...] = array.fill_value
            continue
        if got != part.nbytes:
            raise UserError(f"{path}: chunk file is {got} bytes, expected {part.nbytes}")
    return out


def _progress(directory: Path) -> Path:
    return directory / PROGRESS_DIR


class FeatureWriter:
    """Creates the store for a layout, or reopens it to resume, and writes it shard by shard.

    Reopening checks that the layout and the encoder are the ones the store was made for.
    """

    def __init__(self, directory: str | os.PathLike[str], layout: Layout,
                 encoder: dict[str, Any], ingest: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / STORE_DIR
        self.layout = layout
        dim = int(encoder["dim"])
        if (self.path / "zarr.json").exists():
            self.group = zarr.open_group(self.path, mode="r+")
            self._check_same(encoder, ingest)
        else:
            self.group = self._create(dim, encoder, ingest)
        _progress(self.directory).mkdir(parents=True, exist_ok=True)

    def _create(self, dim: int, encoder: dict[str, Any], ingest: dict[str, Any]) -> zarr.Group:
        layout = self.layout
        tmp = self.directory / (STORE_DIR + ".tmp")
        group = zarr.open_group(tmp, mode="w")
        n, v = layout.n_frames, len(layout.video_ids)
        rows = chunk_rows(dim)
        group.create_array("frames/embedding", shape=(n, dim), chunks=(rows, dim),
                           dtype="float16", compressors=None, fill_value=0)
        group.create_array("frames/time", shape=(n,), chunks=(rows * 8,), dtype="float64",
                           compressors=None, fill_value=np.nan)
        video = group.create_array("frames/video", shape=(n,), chunks=(rows * 8,),
                                   dtype="int32", compressors=None)
        video[:] = np.repeat(np.arange(v, dtype=np.int32), layout.frame_counts)
        per_video = (VIDEO_CHUNK_ROWS,)
        group.create_array("videos/id", shape=(v,), chunks=per_video, dtype=str)[:] = np.array(
            layout.video_ids, dtype=object)
        group.create_array("videos/offsets", shape=(v + 1,), chunks=per_video,
                           dtype="int64")[:] = layout.offsets
        group.create_array("videos/duration", shape=(v,), chunks=per_video, dtype="float64",
                           fill_value=np.nan)
        group.attrs.update({
            "format": "refocus-features", "version": FORMAT_VERSION, "encoder": encoder,
            "ingest": ingest, "n_frames": n, "n_videos": v, "dim": dim,
        })
        os.replace(tmp, self.path)  # the store appears whole, with its layout, or not at all
        return zarr.open_group(self.path, mode="r+")

    def _check_same(self, encoder: dict[str, Any], ingest: dict[str, Any]) -> None:
        """Reopen for the same layout, or for one that grew (more videos after the same
        ones: the store is extended); any other layout is refused."""
        from_store = FeatureStore(self.directory)
        from_store.check_encoder(encoder)
        old = len(from_store.video_ids)
        grown = (from_store.video_ids == self.layout.video_ids[:old]
                 and np.array_equal(from_store.offsets, self.layout.offsets[:old + 1]))
        if not grown:
            raise UserError(f"{self.directory}: holds features of other videos than these "
                            "shards; choose another --out")
        if old < len(self.layout.video_ids) or self.group.attrs.get("n_videos") != old:
            self._extend(old)  # (again, when an extension was killed before its end)

    def _extend(self, old_videos: int) -> None:
        """Grow every array to the layout and append the new videos' rows (ids, offsets,
        frame → video). ``videos/offsets`` is written last: until then the store reads as
        its old self, and a killed extension is simply redone."""
        layout, group = self.layout, self.group
        n, v = layout.n_frames, len(layout.video_ids)
        offsets = layout.offsets
        first = int(offsets[old_videos])
        for name in ("frames/embedding", "frames/time", "frames/video"):
            group[name].resize((n, *group[name].shape[1:]))
        if n > first:
            group["frames/video"][first:] = np.repeat(
                np.arange(old_videos, v, dtype=np.int32), layout.frame_counts[old_videos:])
        group["videos/duration"].resize((v,))
        group["videos/id"].resize((v,))
        if v > old_videos:
            group["videos/id"][old_videos:] = np.array(layout.video_ids[old_videos:],
                                                       dtype=object)
        group["videos/offsets"].resize((v + 1,))
        group["videos/offsets"][old_videos + 1:] = offsets[old_videos + 1:]
        group.attrs.update({"n_frames": n, "n_videos": v})

    def done(self, shard: int) -> bool:
        return (_progress(self.directory) / f"shard-{shard:06d}.done.json").exists()

    def write_shard(self, shard: int, rows: slice, embedding: np.ndarray, time: np.ndarray,
                    videos: slice, duration: np.ndarray, stats: dict[str, Any]) -> None:
        """Write one input shard's frames (rows) and videos, then its done marker."""
        self.group["frames/embedding"][rows] = embedding.astype(np.float16, copy=False)
        self.group["frames/time"][rows] = time
        self.group["videos/duration"][videos] = duration
        write_json_atomic(_progress(self.directory) / f"shard-{shard:06d}.done.json",
                          {"shard": shard, "rows": [rows.start, rows.stop], **stats})

    def questions_done(self, digest: str) -> bool:
        """Whether the questions of ``digest`` are written; a missing or damaged marker
        says no, and they are written again (which replaces it)."""
        try:
            record = json.loads(
                (_progress(self.directory) / "questions.done.json").read_bytes())
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and record.get("digest") == digest

    def write_questions(self, qids: list[str], video: np.ndarray, answer: np.ndarray,
                        embedding: np.ndarray, text_embedding: np.ndarray,
                        option_offsets: np.ndarray, option_embedding: np.ndarray,
                        digest: str) -> None:
        """Write all questions at once (they are few), replacing any earlier set."""
        (_progress(self.directory) / "questions.done.json").unlink(missing_ok=True)
        dim = self.group.attrs["dim"]
        arrays = {
            "questions/qid": (np.array(qids, dtype=object), str),
            "questions/video": (video.astype(np.int32), "int32"),
            "questions/answer": (answer.astype(np.int16), "int16"),
            "questions/embedding": (embedding.reshape(-1, dim).astype(np.float16), "float16"),
            "questions/text_embedding": (text_embedding.reshape(-1, dim).astype(np.float16),
                                         "float16"),
            "questions/option_offsets": (option_offsets.astype(np.int64), "int64"),
            "options/embedding": (option_embedding.reshape(-1, dim).astype(np.float16),
                                  "float16"),
        }
        for name, (values, dtype) in arrays.items():
            array = self.group.create_array(name, shape=values.shape, dtype=dtype,
                                            overwrite=True, compressors=None)
            if values.size:
                array[...] = values
        self.group.attrs["n_questions"] = len(qids)
        write_json_atomic(_progress(self.directory) / "questions.done.json",
                          {"digest": digest, "questions": len(qids)})


def _describe(identity: dict[str, Any]) -> str:
    weights = str(identity.get("weights_sha256"))
    return (f"{identity.get('model')} with weights {identity.get('pretrained')} "
            f"(sha256 {weights[:12]})")


class FeatureStore:
    """Read access: everything into memory, one video's slice, one question's embedding."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        path = self.directory / STORE_DIR
        if not (path / "zarr.json").exists():
            raise UserError(f"{self.directory}: no feature store here (no {STORE_DIR}); "
                            "run refocus embed first")
        self.group = zarr.open_group(path, mode="r")
        attrs = self.group.attrs
        if attrs.get("format") != "refocus-features":
            raise UserError(f"{path}: not a refocus feature store")
        self.encoder: dict[str, Any] = dict(attrs["encoder"])
        self.ingest: dict[str, Any] = dict(attrs.get("ingest", {}))
        self.dim = int(attrs["dim"])
        self.offsets = self.group["videos/offsets"][:]
        # an extension killed before its offsets were written reads as the store before it
        n_videos = len(self.offsets) - 1
        self.video_ids: list[str] = [str(v) for v in self.group["videos/id"][:n_videos]]
        self._video_row = {vid: i for i, vid in enumerate(self.video_ids)}
        self._qid_row: dict[str, int] | None = None

    @property
    def n_frames(self) -> int:
        return int(self.offsets[-1])

    def check_encoder(self, identity: dict[str, Any]) -> None:
        """Refuse, with one line, an encoder other than the one these features came from."""
        if not same_encoder(identity, self.encoder):
            raise UserError(
                f"{self.directory}: features were made by {_describe(self.encoder)}, not by "
                f"{_describe(identity)}; use the same encoder, or another feature folder"
            )

    def video_row(self, video_id: str) -> int:
        if video_id not in self._video_row:
            raise UserError(f"{self.directory}: no video {video_id!r} in the feature store")
        return self._video_row[video_id]

    def video(self, video_id: str) -> tuple[np.ndarray, np.ndarray]:
        """One video's frame embeddings [n, dim] (float16) and timestamps [n]."""
        row = self.video_row(video_id)
        rows = slice(int(self.offsets[row]), int(self.offsets[row + 1]))
        return self.group["frames/embedding"][rows], self.group["frames/time"][rows]

    def _qids(self) -> dict[str, int]:
        if self._qid_row is None:
            qids = self.group["questions/qid"][:] if "questions" in self.group else []
            self._qid_row = {str(q): i for i, q in enumerate(qids)}
        return self._qid_row

    def question(self, qid: str) -> np.ndarray:
        """One question's embedding [dim] (float16)."""
        row = self._qids().get(qid)
        if row is None:
            raise UserError(f"{self.directory}: no question {qid!r} in the feature store")
        return self.group["questions/embedding"][row]

    def array(self, name: str) -> np.ndarray:
        """One array of the store, whole, into memory (fast path: ``read_array``)."""
        return read_array(self.group[name], self.directory / STORE_DIR / name)

    def load(self) -> Features:
        """Every array into memory."""
        g = self.group
        has_questions = "questions" in g
        empty = np.zeros((0, self.dim), np.float16)
        read = self.array
        return Features(
            frame_embedding=read("frames/embedding"),
            frame_time=read("frames/time"),
            frame_video=read("frames/video"),
            video_ids=self.video_ids,
            offsets=self.offsets,
            duration=g["videos/duration"][...],
            qids=[str(q) for q in g["questions/qid"][...]] if has_questions else [],
            question_video=g["questions/video"][...] if has_questions else np.zeros(0, np.int32),
            answer=g["questions/answer"][...] if has_questions else np.zeros(0, np.int16),
            question_embedding=read("questions/embedding") if has_questions else empty,
            question_text_embedding=read("questions/text_embedding") if has_questions else empty,
            option_offsets=g["questions/option_offsets"][...] if has_questions
            else np.zeros(1, np.int64),
            option_embedding=read("options/embedding") if has_questions else empty,
        )
