"""``refocus precompute-reference``: a reference LMM's per-frame vision features for every
frame of the finished ingest shards, into a reference store, one shard at a time (resumable:
finished shards are skipped, an interrupted one is redone). Each pass of the vision tower is
written as it is computed, with the model's exact bits (bfloat16 stays bfloat16), so memory
holds one video's decoded frames and one pass's features, never a shard's."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refocus.lmm import FrameVision, LMMScorer
from refocus.lmm_reference import VisionPass, decode_jpeg, frame_rows, scorer_identity
from refocus.settings import REFERENCE_FRAMES_PER_PASS
from stores.owned import Owned, claim
from stores.reference import KIND, ReferenceShardWriter, ReferenceStore
from stores.shards import ShardSet, write_json_atomic


@dataclass(frozen=True)
class PrecomputeSettings:
    frames_per_pass: int = REFERENCE_FRAMES_PER_PASS  # frames through the vision tower at once


def claim_reference(shards: str | os.PathLike[str], out: str | os.PathLike[str]) -> Owned:
    """``out`` as a reference folder: created, or one precompute-reference made; never a
    user's folder, nor the shards folder, inside it or holding it."""
    return claim(out, KIND, inputs=[shards])


def precompute_reference(shards: str | os.PathLike[str], out: str | os.PathLike[str],
                         scorer: LMMScorer, settings: PrecomputeSettings = PrecomputeSettings(),
                         on_video: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    shard_set = ShardSet(shards)
    owned = claim_reference(shards, out)
    store = ReferenceStore(out)
    timings = {"read": 0.0, "vision": 0.0, "write": 0.0}
    written = skipped = frames = 0
    lookup = shard_set.lookup()
    vision = VisionPass(scorer, settings.frames_per_pass)
    with owned.lock():
        store.open_for_writing({"model": scorer.name, "model_id": scorer_identity(scorer),
                                "shards": str(Path(shards).resolve()), "multi_image": True,
                                "present": scorer.present})
        for marker in shard_set.markers():
            name = Path(marker["shard"]).name.removesuffix(".tar")
            if store.done(name):
                skipped += 1
                continue
            writer = store.writer(name)
            layout: dict[str, Any] | None = None
            for sample in marker["samples"]:
                tick = time.perf_counter()
                video = sample["video_id"]
                images = [decode_jpeg(f) for f in shard_set.read(video, lookup[video]).frames]
                timings["read"] += time.perf_counter() - tick
                tick = time.perf_counter()
                for chunk in vision.chunks(images, multi=True):  # written as computed
                    timings["vision"] += time.perf_counter() - tick
                    tick = time.perf_counter()
                    layout = _write_chunk(writer, chunk, layout)
                    timings["write"] += time.perf_counter() - tick
                    tick = time.perf_counter()
                writer.end_video(video)
                frames += len(images)
                if on_video:
                    on_video(video, len(images))
            writer.finish({"frame_layout": layout})
            written += 1
    summary = {"out": str(out), "model": scorer.name, "shards_written": written,
               "shards_skipped": skipped, "frames": frames,
               "frames_per_pass": vision.size,  # after any halving on out-of-memory
               "seconds": round(time.perf_counter() - started, 2),
               "timings": {k: round(v, 2) for k, v in timings.items()}}
    write_json_atomic(store.directory / "summary.json", summary)
    return summary


def _write_chunk(writer: ReferenceShardWriter, chunk: list[FrameVision],
                 layout: dict[str, Any] | None) -> dict[str, Any] | None:
    """Append one pass's frames, with their exact bits; every frame of a shard is laid out
    alike (the layout of the first)."""
    rows = []
    for frame in chunk:
        arrays, this = frame_rows(frame)
        if layout is None:
            layout = this
        elif this != layout:
            raise ValueError(f"frames laid out differently in one shard: {this} after {layout}")
        rows.append(arrays)
    writer.add(rows)
    return layout
