"""The reference store: a reference LMM's per-frame vision features, computed once offline
so that training runs only the language model online.

Layout (Zarr v3, one group per ingest shard, so each shard has exactly one writer)::

    reference.zarr/                     attrs: format, version 2, model identity
      shard-000003/                     attrs: meta (how the reader rebuilds a frame)
        rows/<name>     [n_rows, ...]   every frame's rows of one named array, in frame order
        offsets/<name>  [n_frames + 1]  int64: frame f's rows are offsets[f:f+2]
    progress/shard-000003.done.json     video ids and their frame offsets; written last

The named arrays are whatever a frame carries (its vision tokens, per-image processor rows,
its size …), stored with their exact bits: the writer gives raw bits (e.g. bfloat16 as
uint16) and says so in ``meta``. A shard is written as its frames are computed (appended
chunk by chunk), never held whole; one without its done marker is not done and is rewritten
whole on the next run. Reading takes only the requested frames' rows; what the reader keeps
between reads (each open shard's offsets) is bounded by bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from stores.cache import ByteLRU
from stores.errors import UserError
from stores.owned import is_made, output_kind
from stores.shards import write_json_atomic

FORMAT = "refocus-reference"
VERSION = 2  # 1: one float16 token array per shard (lossy for bfloat16 models)
KIND = "reference"  # the marker of a reference folder (stores/owned.py)
READ_CACHE_BYTES = 64 << 20  # open shards' offsets a reader keeps
CHUNK_BYTES = 1 << 21  # bytes per Zarr chunk of rows (about)

Frame = dict[str, np.ndarray]  # one frame: named arrays of rows


def _old_format(directory: Path) -> UserError:
    return UserError(f"{directory}: a reference store in refocus's earlier format (float16 "
                     "features, not the model's exact bits); re-run refocus "
                     "precompute-reference into a new --out folder")


class ReferenceShardWriter:
    """Writes one ingest shard's group, frames appended as they come; ``finish`` writes the
    offsets, the meta and, last, the done marker."""

    def __init__(self, store: ReferenceStore, shard: str) -> None:
        if not is_made(shard) or output_kind(store.directory) != KIND:
            raise ValueError(f"{store.directory}: write {shard!r} only into a reference folder "
                             "claimed with stores.owned.claim (a made shard-NNNNNN name)")
        self.store, self.shard = store, shard
        root = zarr.open_group(str(store.root), mode="a")
        if shard in root:
            # an interrupted write: redo it whole (a group refocus named, in a folder it owns)
            shutil.rmtree(store.root / shard)
        self.group = root.create_group(shard)
        self.rows: dict[str, Any] = {}
        self.offsets: dict[str, list[int]] = {}
        self.videos: list[str] = []
        self.video_offsets = [0]
        self.frames = 0

    def add(self, frames: Sequence[Frame]) -> None:
        """Append frames (each the same names, dtypes and row shapes as the ones before)."""
        if not frames:
            return
        names = sorted(frames[0])
        if self.frames and names != sorted(self.rows):
            raise ValueError(f"{self.shard}: frames carry {names}, earlier ones "
                             f"{sorted(self.rows)}")
        for name in names:
            parts = [f[name] for f in frames]
            data = np.concatenate(parts)
            if name not in self.rows:
                self.rows[name] = self._create(name, data)
                self.offsets[name] = [0]
            array = self.rows[name]
            if data.dtype != array.dtype or data.shape[1:] != array.shape[1:]:
                raise ValueError(f"{self.shard}: {name} rows {data.dtype}{data.shape[1:]} after "
                                 f"{array.dtype}{array.shape[1:]}")
            array.append(data, axis=0)
            ends = self.offsets[name]
            for part in parts:
                ends.append(ends[-1] + len(part))
        self.frames += len(frames)

    def _create(self, name: str, data: np.ndarray) -> Any:
        row = int(np.prod(data.shape[1:], dtype=np.int64)) * data.dtype.itemsize
        chunks = (max(1, CHUNK_BYTES // max(1, row)),) + data.shape[1:]
        return self.group.create_array(f"rows/{name}", shape=(0, *data.shape[1:]),
                                       dtype=data.dtype, chunks=chunks, fill_value=0)

    def end_video(self, video_id: str) -> None:
        self.videos.append(video_id)
        self.video_offsets.append(self.frames)

    def finish(self, meta: Mapping[str, Any]) -> None:
        for name, ends in self.offsets.items():
            data = np.asarray(ends, dtype=np.int64)
            self.group.create_array(f"offsets/{name}", data=data, chunks=data.shape)
        self.group.attrs.update({"meta": json.loads(json.dumps(meta))})
        write_json_atomic(self.store.progress / f"{self.shard}.done.json", {
            "shard": self.shard, "videos": self.videos, "video_offsets": self.video_offsets,
            "frames": self.frames})


@dataclass
class _OpenShard:
    rows: dict[str, Any]  # name → Zarr array (nothing read yet)
    offsets: dict[str, np.ndarray]
    meta: dict[str, Any]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(o.nbytes for o in self.offsets.values())


class ReferenceStore:
    def __init__(self, directory: str | os.PathLike[str],
                 read_cache_bytes: int = READ_CACHE_BYTES) -> None:
        self.directory = Path(directory)
        self.root = self.directory / "reference.zarr"
        self.progress = self.directory / "progress"
        self.open_shards: ByteLRU[str, _OpenShard] = ByteLRU(read_cache_bytes,
                                                             lambda s: s.nbytes)
        self._index: dict[str, tuple[str, int]] | None = None
        self._attrs: dict[str, Any] | None = None

    # ------------------------------------------------------------------ writing
    def open_for_writing(self, identity: dict[str, Any]) -> None:
        """Create the store, or check that an existing one was made by the same model."""
        if self.root.exists():
            before = self.attrs().get("identity")
            if before != json.loads(json.dumps(identity)):
                raise UserError(f"{self.directory}: holds features of another reference "
                                f"model ({(before or {}).get('model')}); choose another --out")
            return
        self.progress.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(self.root), mode="w")
        group.attrs.update({"format": FORMAT, "version": VERSION, "identity": identity})

    def done(self, shard: str) -> bool:
        return (self.progress / f"{shard}.done.json").exists()

    def writer(self, shard: str) -> ReferenceShardWriter:
        return ReferenceShardWriter(self, shard)

    # ------------------------------------------------------------------ reading
    def attrs(self) -> dict[str, Any]:
        """The store's attributes; a store of the earlier format is refused in one line."""
        if self._attrs is None:
            if not self.root.exists():
                raise UserError(f"{self.directory}: no reference store here (refocus "
                                "precompute-reference --out)")
            attrs = dict(zarr.open_group(str(self.root), mode="r").attrs)
            if attrs.get("version") != VERSION:
                raise _old_format(self.directory)
            self._attrs = attrs
        return self._attrs

    def identity(self) -> dict[str, Any]:
        return self.attrs()["identity"]

    def index(self) -> dict[str, tuple[str, int]]:
        """Video id → (shard group, its first frame within the group), finished shards only."""
        if self._index is None:
            self.attrs()
            self._index = {}
            for marker in sorted(self.progress.glob("*.done.json")):
                done = json.loads(marker.read_text())
                for video, start in zip(done["videos"], done["video_offsets"], strict=False):
                    self._index[video] = (done["shard"], start)
        return self._index

    def _open(self, shard: str) -> _OpenShard:
        opened = self.open_shards.get(shard)
        if opened is None:
            group = zarr.open_group(str(self.root / shard), mode="r")
            names = list(group["rows"].array_keys()) if "rows" in group else []
            opened = _OpenShard({n: group[f"rows/{n}"] for n in names},
                                {n: group[f"offsets/{n}"][...] for n in names},
                                dict(group.attrs).get("meta", {}))
            self.open_shards.put(shard, opened)
        return opened

    def frames(self, video_id: str, local: Sequence[int]) -> tuple[dict[str, Any], list[Frame]]:
        """The shard's meta and, per requested frame (a video-local index), its named arrays;
        only those frames' rows are read (one read per run of consecutive frames)."""
        where = self.index().get(video_id)
        if where is None:
            raise UserError(f"{self.directory}: no reference features for video {video_id!r}")
        shard, start = where
        opened = self._open(shard)
        wanted = sorted({start + i for i in local})
        got: dict[int, Frame] = {f: {} for f in wanted}
        for first, last in _runs(wanted):
            for name, rows in opened.rows.items():
                ends = opened.offsets[name]
                block = rows[int(ends[first]):int(ends[last + 1])]
                for f in range(first, last + 1):
                    a, b = ends[f] - ends[first], ends[f + 1] - ends[first]
                    got[f][name] = block[a:b]
        return opened.meta, [got[start + i] for i in local]


def _runs(frames: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted distinct frames as runs of consecutive ones, (first, last) each."""
    runs: list[tuple[int, int]] = []
    for f in frames:
        if runs and f == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], f)
        else:
            runs.append((f, f))
    return runs
