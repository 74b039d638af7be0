"""FAISS index over a feature store's frame embeddings (inner product = cosine similarity).

Brought up to date after all of a store's frames are written, from ``frames/embedding``;
saved under ``index/`` beside the store. When the store grew (``stores/features.py``), the new
rows are added to the saved index rather than the index rebuilt: the old ids and vectors stay
as they are, an IVF index keeps its trained lists (no re-training on every scheduled run), and
the work is the new rows only. It is rebuilt from scratch when the store grew past
``ivf_threshold`` (flat → IVF), when an IVF index would want more than twice its lists, or when
the settings or the encoder differ. Either way an id is a frame row, so old ids keep mapping to
the same frames. Ids are the 64-bit frame rows of the store, which map back to
(video, frame within the video, timestamp) through ``frames/video``, ``videos/offsets`` and
``frames/time``. Exact inner product (``IndexFlatIP``) up to ``ivf_threshold`` frames, an
inverted file (``IndexIVFFlat``, ``nlist ≈ 4·√n``, trained on a fixed sample) beyond. On a
machine with faiss-gpu and a GPU the index is built and searched on the GPU and saved as a
CPU index, so the same files serve both.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from stores.errors import UserError
from stores.features import FeatureStore
from stores.shards import write_json_atomic

INDEX_DIR = "index"
INDEX_FILE = "frames.faiss"
INFO_FILE = "index.json"


@dataclass(frozen=True)
class IndexSettings:
    ivf_threshold: int = 200_000  # frames; more than this gets an IVF index
    nlist: int | None = None  # IVF lists (None: about 4·√n)
    nprobe: int = 16  # IVF lists searched per query
    train_sample: int = 256  # training points per IVF list
    gpu: bool | None = None  # None: when faiss-gpu and a GPU are present


@dataclass(frozen=True)
class Hit:
    """One search result: where the frame is and how similar it is."""

    row: int  # frame row in the store
    video_id: str
    frame: int  # index of the frame within its video
    time: float  # seconds
    score: float  # inner product with the query (cosine, for normalised vectors)


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _on_gpu(index: faiss.Index) -> faiss.Index:
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, index)


def _kind(n: int, settings: IndexSettings) -> tuple[str, int]:
    """The index the settings want for ``n`` frames: ("flat", 0) or ("ivf", lists)."""
    if n <= settings.ivf_threshold:
        return "flat", 0
    return "ivf", settings.nlist or max(1, int(4 * math.sqrt(n)))


def _saved(folder: Path, store: FeatureStore, settings: IndexSettings,
           n: int) -> tuple[faiss.Index, dict[str, Any]] | None:
    """The saved index and its description when the new rows can be added to it: same
    settings and encoder, the kind the settings want for ``n`` frames, and at most ``n``
    vectors (it may hold fewer than its description says, when a run was killed between
    writing the two; its own count is what counts)."""
    try:
        info = json.loads((folder / INFO_FILE).read_text())
        index = faiss.read_index(str(folder / INDEX_FILE))
    except (OSError, ValueError, RuntimeError):
        return None
    kind, nlist = _kind(n, settings)
    fits = (info.get("settings") == asdict(settings) and info.get("dim") == store.dim
            and info.get("encoder_sha256") == store.encoder.get("weights_sha256")
            and info.get("kind") == kind and index.ntotal <= n
            and (kind == "flat" or nlist <= 2 * int(info.get("nlist", 0))))
    return (index, info) if fits else None


def _new_index(vectors: np.ndarray, settings: IndexSettings, use_gpu: bool) -> faiss.Index:
    """A trained, empty index of the kind the settings want for these vectors."""
    n, dim = vectors.shape
    kind, nlist = _kind(n, settings)
    if kind == "flat":
        index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        return _on_gpu(index) if use_gpu else index
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    if use_gpu:
        index = _on_gpu(index)
    sample = min(n, settings.train_sample * nlist)
    rows = np.sort(np.random.default_rng(0).choice(n, size=sample, replace=False))
    index.train(vectors[rows])
    return index


def build_index(directory: str | os.PathLike[str], settings: IndexSettings | None = None,
                ) -> dict[str, Any]:
    """Bring the frame index of the store in ``directory`` up to date (build it, add the rows
    it lacks, or leave it) and save it; returns its description (``added``: the rows this
    call added, ``built``: whether it was built from scratch)."""
    settings = settings or IndexSettings()
    store = FeatureStore(directory)
    embedding = store.group["frames/embedding"]
    n, dim = store.n_frames, store.dim
    if n == 0:
        raise UserError(f"{directory}: the store has no frames to index")
    folder = Path(directory) / INDEX_DIR
    use_gpu = gpu_available() if settings.gpu is None else settings.gpu
    saved = _saved(folder, store, settings, n)
    if saved is not None and saved[0].ntotal == saved[1].get("frames") == n:
        return {**saved[1], "added": 0, "built": False}  # up to date: not rewritten
    first = 0 if saved is None else saved[0].ntotal
    vectors = np.ascontiguousarray(embedding[first:n], dtype=np.float32)
    if saved is None:
        index = _new_index(vectors, settings, use_gpu)
        kind, nlist = _kind(n, settings)
    else:
        index = _on_gpu(saved[0]) if use_gpu else saved[0]
        kind, nlist = saved[1]["kind"], int(saved[1]["nlist"])  # the lists it was trained with
    index.add_with_ids(vectors, np.arange(first, n, dtype=np.int64))
    if use_gpu:
        index = faiss.index_gpu_to_cpu(index)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (INDEX_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, folder / INDEX_FILE)
    info = {"kind": kind, "frames": n, "dim": dim, "nlist": nlist, "nprobe": settings.nprobe,
            "gpu": use_gpu, "encoder_sha256": store.encoder.get("weights_sha256"),
            "settings": asdict(settings)}
    write_json_atomic(folder / INFO_FILE, info)
    return {**info, "added": n - first, "built": saved is None}


class FrameIndex:
    """A saved frame index with the store it points into."""

    def __init__(self, directory: str | os.PathLike[str], gpu: bool | None = None) -> None:
        self.directory = Path(directory)
        folder = self.directory / INDEX_DIR
        if not (folder / INDEX_FILE).exists():
            raise UserError(f"{self.directory}: no frame index (index/{INDEX_FILE}); "
                            "run refocus embed to build it")
        self.info = json.loads((folder / INFO_FILE).read_text())
        self.store = FeatureStore(self.directory)
        if self.info["frames"] != self.store.n_frames:
            raise UserError(f"{self.directory}: the index holds {self.info['frames']} frames but "
                            f"the store {self.store.n_frames}; rebuild it (refocus embed)")
        index = faiss.read_index(str(folder / INDEX_FILE))
        if self.info["kind"] == "ivf":
            faiss.extract_index_ivf(index).nprobe = self.info["nprobe"]
        self.index = _on_gpu(index) if (gpu_available() if gpu is None else gpu) else index
        self._frame_time = self.store.group["frames/time"][...]
        self._frame_video = self.store.group["frames/video"][...]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: scores [q, k] and frame rows [q, k] (-1 where fewer)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        return self.index.search(queries, k)

    def hits(self, query: np.ndarray, k: int) -> list[Hit]:
        """One query's top-k as hits that name video, frame and timestamp."""
        scores, rows = self.search(query, k)
        out = []
        for score, row in zip(scores[0], rows[0], strict=True):
            if row < 0:
                continue
            video = int(self._frame_video[row])
            out.append(Hit(int(row), self.store.video_ids[video],
                           int(row - self.store.offsets[video]), float(self._frame_time[row]),
                           float(score)))
        return out
