"""The reference store: a reference LMM's per-frame vision features, computed once offline
so that training runs only the language model online.

Layout (Zarr v3, one group per ingest shard, so each shard has exactly one writer)::

    reference.zarr/                     attrs: model, model identity, shards folder
      shard-000003/
        tokens        [n_tokens, hidden] float16   every frame's features, in frame order
        token_offsets [n_frames + 1]     int64     frame f's rows: token_offsets[f:f+2]
        size          [n_frames, 2]      int32     (height, width) the processor was given
        extra/<key>   [n_frames, ...]              per-image processor rows (image_grid_thw…)
    progress/shard-000003.done.json     video ids and their frame offsets; written last

A shard without its done marker is not done and is rewritten whole on the next run.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from stores.errors import UserError
from stores.owned import is_made, output_kind
from stores.shards import write_json_atomic

FORMAT = "refocus-reference"
KIND = "reference"  # the marker of a reference folder (stores/owned.py)


@dataclass
class ShardFeatures:
    """What one ingest shard contributes: per video its frames' features."""

    video_ids: list[str]
    video_offsets: list[int]  # [n_videos + 1] in frames
    tokens: np.ndarray  # [n_tokens, hidden]
    token_offsets: np.ndarray  # [n_frames + 1]
    size: np.ndarray  # [n_frames, 2]
    extra: dict[str, np.ndarray]


class ReferenceStore:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.root = self.directory / "reference.zarr"
        self.progress = self.directory / "progress"
        self._groups: dict[str, dict[str, np.ndarray]] = {}
        self._index: dict[str, tuple[str, int]] | None = None

    # ------------------------------------------------------------------ writing
    def open_for_writing(self, identity: dict[str, Any]) -> None:
        """Create the store, or check that an existing one was made by the same model."""
        if self.root.exists():
            before = dict(zarr.open_group(str(self.root), mode="r").attrs).get("identity")
            if before != json.loads(json.dumps(identity)):
                raise UserError(f"{self.directory}: holds features of another reference "
                                f"model ({(before or {}).get('model')}); choose another --out")
            return
        self.progress.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(self.root), mode="w")
        group.attrs.update({"format": FORMAT, "version": 1, "identity": identity})

    def done(self, shard: str) -> bool:
        return (self.progress / f"{shard}.done.json").exists()

    def write_shard(self, shard: str, features: ShardFeatures) -> None:
        if not is_made(shard) or output_kind(self.directory) != KIND:
            raise ValueError(f"{self.directory}: write {shard!r} only into a reference folder "
                             "claimed with stores.owned.claim (a made shard-NNNNNN name)")
        root = zarr.open_group(str(self.root), mode="a")
        if shard in root:
            # an interrupted write: redo it whole (a group refocus named, in a folder it owns)
            shutil.rmtree(self.root / shard)
        group = root.create_group(shard)
        arrays = {"tokens": features.tokens.astype(np.float16),
                  "token_offsets": features.token_offsets.astype(np.int64),
                  "size": features.size.astype(np.int32),
                  **{f"extra/{k}": v for k, v in features.extra.items()}}
        for name, data in arrays.items():
            chunks = (max(1, min(len(data), (1 << 21) // max(1, data[0].nbytes if len(data)
                                                              else 1))),) + data.shape[1:]
            array = group.create_array(name, shape=data.shape, dtype=data.dtype,
                                       chunks=chunks, fill_value=0)
            array[...] = data
        write_json_atomic(self.progress / f"{shard}.done.json", {
            "shard": shard, "videos": features.video_ids, "video_offsets": features.video_offsets,
            "frames": int(len(features.size)), "tokens": int(len(features.tokens))})

    # ------------------------------------------------------------------ reading
    def identity(self) -> dict[str, Any]:
        if not self.root.exists():
            raise UserError(f"{self.directory}: no reference store here (refocus "
                            "precompute-reference --out)")
        return dict(zarr.open_group(str(self.root), mode="r").attrs)["identity"]

    def index(self) -> dict[str, tuple[str, int]]:
        """Video id → (shard group, its first frame within the group), finished shards only."""
        if self._index is None:
            self._index = {}
            for marker in sorted(self.progress.glob("*.done.json")):
                done = json.loads(marker.read_text())
                for video, start in zip(done["videos"], done["video_offsets"], strict=False):
                    self._index[video] = (done["shard"], start)
        return self._index

    def _group(self, shard: str) -> dict[str, np.ndarray]:
        if shard not in self._groups:
            group = zarr.open_group(str(self.root / shard), mode="r")
            arrays = {"tokens": group["tokens"][...], "token_offsets": group["token_offsets"][...],
                      "size": group["size"][...]}
            if "extra" in group:
                for name, array in group["extra"].arrays():
                    arrays[f"extra/{name}"] = array[...]
            self._groups[shard] = arrays
        return self._groups[shard]

    def frames(self, video_id: str, local: list[int]) -> list[dict[str, Any]]:
        """Per requested frame: tokens [n, hidden], size (h, w) and extra rows."""
        where = self.index().get(video_id)
        if where is None:
            raise UserError(f"{self.directory}: no reference features for video {video_id!r}")
        shard, start = where
        g = self._group(shard)
        out = []
        for i in local:
            f = start + i
            a, b = g["token_offsets"][f], g["token_offsets"][f + 1]
            out.append({"tokens": g["tokens"][a:b], "size": tuple(int(x) for x in g["size"][f]),
                        "extra": {k[len("extra/"):]: v[f:f + 1] for k, v in g.items()
                                  if k.startswith("extra/")}})
        return out
