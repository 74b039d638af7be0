"""``refocus precompute-reference``: a reference LMM's per-frame vision features for every
frame of the finished ingest shards, into a reference store, one shard at a time (resumable:
finished shards are skipped, an interrupted one is redone)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refocus.lmm import LMMScorer
from refocus.lmm_reference import decode_jpeg, scorer_identity
from stores.owned import Owned, claim
from stores.reference import KIND, ReferenceStore, ShardFeatures
from stores.shards import ShardSet, write_json_atomic


@dataclass(frozen=True)
class PrecomputeSettings:
    frames_per_pass: int = 32  # frames through the vision tower at once


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
    with owned.lock():
        store.open_for_writing({"model": scorer.name, "model_id": scorer_identity(scorer),
                                "shards": str(Path(shards).resolve()), "multi_image": True,
                                "present": scorer.present})
        for marker in shard_set.markers():
            name = Path(marker["shard"]).name.removesuffix(".tar")
            if store.done(name):
                skipped += 1
                continue
            ids, offsets, tokens, token_offsets, sizes = [], [0], [], [0], []
            extra: dict[str, list[np.ndarray]] = {}
            for sample in marker["samples"]:
                tick = time.perf_counter()
                video = sample["video_id"]
                images = [decode_jpeg(f) for f in shard_set.read(video, lookup[video]).frames]
                timings["read"] += time.perf_counter() - tick
                tick = time.perf_counter()
                for start in range(0, len(images), settings.frames_per_pass):
                    chunk = images[start:start + settings.frames_per_pass]
                    for v in scorer.vision(chunk, multi=True):
                        t = v.tokens.float().cpu().numpy()
                        tokens.append(t)
                        token_offsets.append(token_offsets[-1] + len(t))
                        sizes.append(v.size)
                        for k, x in v.extras.items():
                            extra.setdefault(k, []).append(x.cpu().numpy())
                timings["vision"] += time.perf_counter() - tick
                ids.append(sample["video_id"])
                offsets.append(offsets[-1] + len(images))
                frames += len(images)
                if on_video:
                    on_video(sample["video_id"], len(images))
            tick = time.perf_counter()
            hidden = tokens[0].shape[1] if tokens else 0
            store.write_shard(name, ShardFeatures(
                ids, offsets, np.concatenate(tokens) if tokens else np.zeros((0, hidden)),
                np.asarray(token_offsets), np.asarray(sizes).reshape(-1, 2),
                {k: np.concatenate(v) for k, v in extra.items()}))
            timings["write"] += time.perf_counter() - tick
            written += 1
    summary = {"out": str(out), "model": scorer.name, "shards_written": written,
               "shards_skipped": skipped, "frames": frames,
               "seconds": round(time.perf_counter() - started, 2),
               "timings": {k: round(v, 2) for k, v in timings.items()}}
    write_json_atomic(store.directory / "summary.json", summary)
    return summary
