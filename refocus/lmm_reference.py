"""The LMM as a reward reference: the ``Reference`` protocol over a corpus, with each frame's
vision features taken from a precomputed reference store (offline → online) or computed from
the frame shards on first use.

Memory stays bounded at any model size: the vision tower runs over ``frames_per_pass`` frames
at a time (halved on CUDA out-of-memory), and computed or read features are kept in two
least-recently-used caches bounded by bytes — on the host (pinned when CUDA is present) and
on the model's device (``--reference-cache-gb``). A frame evicted from both is computed (or
read) again when next asked for. Whatever a ``FrameVision`` carries (tokens, per-image
processor rows, any further per-frame tensors) is moved, counted and stored generically."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from refocus.data import Corpus
from refocus.lmm import FrameVision, Item, LMMScorer
from refocus.settings import (
    REFERENCE_CACHE_GB,
    REFERENCE_FRAMES_PER_PASS,
    REFERENCE_HOST_CACHE_GB,
)
from stores.cache import ByteLRU
from stores.errors import UserError
from stores.frames import decode_frame
from stores.reference import ReferenceStore
from stores.shards import ShardSet

FrameKey = tuple[str, int, bool]  # (video id, frame, as one of several images)


class FrameSource(Protocol):
    def frames(self, video_id: str, local: list[int], multi: bool) -> list[FrameVision]: ...


def decode_jpeg(data: bytes, where: str = "frame") -> np.ndarray:
    """A stored frame as RGB pixels; one over the pixel cap is a one-line error naming
    ``where`` (rewards need every candidate frame, so none is skipped)."""
    return np.array(decode_frame(data, where))  # writable: torch.from_numpy wants one


def gigabytes(gb: float) -> int:
    return int(gb * (1 << 30))


# ----------------------------------------------------------------------------- tensors

def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (dataclass fields, dicts, lists,
    tuples, nested), everything else kept."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        return type(value)(map_tensors(v, fn) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: map_tensors(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def tensors_of(value: Any) -> Iterator[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_tensors(value, lambda t: found.append(t) or t)  # type: ignore[func-returns-value]
    return iter(found)


def frame_bytes(frame: Any) -> int:
    """Bytes of every tensor a frame's features carry."""
    return sum(t.nbytes for t in tensors_of(frame))


def to_host(frame: FrameVision) -> FrameVision:
    """A compact copy in host memory (pinned when CUDA is present, so copies to the GPU are
    asynchronous): its own storage, never a view keeping a larger tensor alive."""
    pin = torch.cuda.is_available()

    def copy(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t.detach())

    return map_tensors(frame, copy)


def to_device(frame: FrameVision, device: torch.device) -> FrameVision:
    return map_tensors(frame, lambda t: t.to(device, non_blocking=t.is_pinned()))


# ----------------------------------------------------------------------------- vision passes

class VisionPass:
    """The vision tower over many frames, ``frames_per_pass`` at a time. On CUDA
    out-of-memory a pass halves (and stays halved); one frame that does not fit is a
    one-line error naming the model and the frame size."""

    def __init__(self, scorer: LMMScorer, frames_per_pass: int = REFERENCE_FRAMES_PER_PASS):
        if frames_per_pass < 1:
            raise ValueError(f"frames_per_pass must be at least 1 (got {frames_per_pass})")
        self.scorer, self.size = scorer, frames_per_pass

    def chunks(self, images: Sequence[Any], multi: bool) -> Iterator[list[FrameVision]]:
        """Each pass's features, in frame order, as they are computed."""
        start = 0
        while start < len(images):
            chunk = images[start:start + self.size]
            try:
                out = self.scorer.vision(chunk, multi=multi)
            except torch.cuda.OutOfMemoryError:
                if self.size == 1:
                    height, width = np.asarray(chunk[0]).shape[:2]
                    raise UserError(f"{self.scorer.name}: the vision tower runs out of GPU "
                                    f"memory on a single {width}×{height} frame; ingest "
                                    "smaller frames (refocus ingest --size) or use a GPU with "
                                    "more memory") from None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.size = max(1, self.size // 2)
                continue
            start += len(chunk)
            yield out

    def __call__(self, images: Sequence[Any], multi: bool) -> list[FrameVision]:
        return [v for chunk in self.chunks(images, multi) for v in chunk]


# ----------------------------------------------------------------------------- caches

class FrameCache:
    """Per-frame features in two least-recently-used tiers bounded by bytes: the host
    (compact copies) and the model's device (copies of those; on a CPU model, the same)."""

    def __init__(self, device_bytes: int, host_bytes: int) -> None:
        self.device: ByteLRU[FrameKey, FrameVision] = ByteLRU(device_bytes, frame_bytes)
        self.host: ByteLRU[FrameKey, FrameVision] = ByteLRU(host_bytes, frame_bytes)

    def get(self, key: FrameKey, device: torch.device) -> FrameVision | None:
        found = self.device.get(key)
        if found is None:
            kept = self.host.get(key)
            if kept is None:
                return None
            found = to_device(kept, device)
            self.device.put(key, found)
        return found

    def put(self, key: FrameKey, frame: FrameVision, device: torch.device) -> FrameVision:
        """Keep ``frame`` in both tiers (as far as each budget allows); its device copy."""
        kept = to_host(frame)
        self.host.put(key, kept)
        found = to_device(kept, device)
        self.device.put(key, found)
        return found


class CachedFrames:
    """A ``FrameSource`` that keeps what it computes or reads in a ``FrameCache``; a frame
    missing from both tiers is loaded again (``_load``)."""

    def __init__(self, scorer: LMMScorer, cache_gb: float = REFERENCE_CACHE_GB,
                 host_cache_gb: float = REFERENCE_HOST_CACHE_GB) -> None:
        self.scorer = scorer
        self.cache = FrameCache(gigabytes(cache_gb), gigabytes(host_cache_gb))
        self.loaded = 0  # frames computed or read (cache misses)

    def frames(self, video_id: str, local: list[int], multi: bool) -> list[FrameVision]:
        device = self.scorer.device
        got = {i: self.cache.get((video_id, i, multi), device) for i in local}
        missing = sorted(i for i, v in got.items() if v is None)
        if missing:
            for i, v in zip(missing, self._load(video_id, missing, multi), strict=True):
                got[i] = self.cache.put((video_id, i, multi), v, device)
            self.loaded += len(missing)
        return [got[i] for i in local]  # type: ignore[misc]

    def _load(self, video_id: str, local: list[int], multi: bool) -> list[FrameVision]:
        raise NotImplementedError


class ShardFrames(CachedFrames):
    """Frames read from the ingest shards; the features of the frames asked for are computed
    in passes of ``frames_per_pass`` and kept in the byte-bounded caches."""

    def __init__(self, shards: str, scorer: LMMScorer, cache_gb: float = REFERENCE_CACHE_GB,
                 host_cache_gb: float = REFERENCE_HOST_CACHE_GB,
                 frames_per_pass: int = REFERENCE_FRAMES_PER_PASS) -> None:
        super().__init__(scorer, cache_gb, host_cache_gb)
        self.shards = ShardSet(shards)
        self.lookup = self.shards.lookup()
        self.vision = VisionPass(scorer, frames_per_pass)

    def images(self, video_id: str, local: Sequence[int] | None = None) -> list[np.ndarray]:
        """The video's frames (``local``: only those) as RGB pixels."""
        if video_id not in self.lookup:
            raise UserError(f"{self.shards.directory}: no video {video_id!r} in the shards")
        location = self.lookup[video_id]
        where = f"{self.shards.directory / location.shard}: video {video_id!r} frame"
        stored = self.shards.read(video_id, location).frames
        wanted = range(len(stored)) if local is None else local
        for i in wanted:
            if not 0 <= i < len(stored):
                raise UserError(f"{where} {i}: the video has {len(stored)} frames in the "
                                "shards; the feature store and the shards disagree")
        return [decode_jpeg(stored[i], f"{where} {i}") for i in wanted]

    def _load(self, video_id: str, local: list[int], multi: bool) -> list[FrameVision]:
        return self.vision(self.images(video_id, local), multi=multi)


class StoreFrames(CachedFrames):
    """Frames from a reference store written by ``refocus precompute-reference``."""

    def __init__(self, store: ReferenceStore, scorer: LMMScorer,
                 cache_gb: float = REFERENCE_CACHE_GB,
                 host_cache_gb: float = REFERENCE_HOST_CACHE_GB) -> None:
        identity = store.identity()
        if identity.get("model_id") != scorer_identity(scorer):
            raise UserError(f"{store.directory}: features of {identity.get('model_id')!r}, "
                            f"not of {scorer_identity(scorer)!r} (model, presentation and "
                            "weights digest); precompute them for this model and presentation "
                            "into another folder")
        super().__init__(scorer, cache_gb, host_cache_gb)
        self.store = store

    def frames(self, video_id: str, local: list[int], multi: bool) -> list[FrameVision]:
        if not multi:
            raise UserError(f"{self.scorer.name} reads a lone frame differently from one of "
                            "several; budgets of 1 need the frame shards, not a reference store")
        return super().frames(video_id, local, multi)

    def _load(self, video_id: str, local: list[int], multi: bool) -> list[FrameVision]:
        meta, rows = self.store.frames(video_id, local)
        return [frame_from_rows(meta["frame_layout"], r) for r in rows]


# ----------------------------------------------------------------------------- storing

def _numpy_bits(t: torch.Tensor) -> np.ndarray:
    """A tensor's exact bits as a NumPy array (bfloat16, which NumPy lacks, as uint16)."""
    t = t.detach().cpu().contiguous()
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def _tensor_rows(t: torch.Tensor) -> tuple[np.ndarray, dict[str, Any]]:
    bits = _numpy_bits(t)
    return (bits.reshape(1) if t.ndim == 0 else bits), {"dtype": str(t.dtype).removeprefix(
        "torch."), "scalar": t.ndim == 0}


def _from_bits(rows: np.ndarray, spec: dict[str, Any]) -> torch.Tensor:
    t = torch.from_numpy(np.array(rows))  # its own, writable copy
    if spec["dtype"] == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.reshape(()) if spec["scalar"] else t


def frame_rows(frame: FrameVision) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One frame as named arrays of rows — every tensor it carries, in fields, dicts, lists
    or tuples (nested), and every tuple of numbers — with their exact bits, and the layout
    that rebuilds it (``frame_from_rows``)."""
    rows: dict[str, np.ndarray] = {}
    layout = {f.name: _flatten(getattr(frame, f.name), f.name, rows)
              for f in dataclasses.fields(frame) if f.init}
    return rows, layout


def _flatten(value: Any, name: str, rows: dict[str, np.ndarray]) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        rows[name], spec = _tensor_rows(value)
        return {"kind": "tensor", **spec}
    if value is None:
        return {"kind": "none"}
    if isinstance(value, list | tuple) and all(isinstance(v, int | float) and
                                               not isinstance(v, bool) for v in value):
        integers = all(isinstance(v, int) for v in value)
        rows[name] = np.asarray([value], dtype=np.int64 if integers else np.float64)
        return {"kind": "numbers", "type": type(value).__name__}
    if isinstance(value, dict | list | tuple):
        parts = value.items() if isinstance(value, dict) else enumerate(value)
        return {"kind": "dict" if isinstance(value, dict) else type(value).__name__,
                "items": {str(k): _flatten(v, f"{name}.{k}", rows) for k, v in parts}}
    raise ValueError(f"FrameVision {name}: a {type(value).__name__} cannot be stored")


def frame_from_rows(layout: dict[str, Any], rows: dict[str, np.ndarray]) -> FrameVision:
    return FrameVision(**{name: _unflatten(spec, name, rows) for name, spec in layout.items()})


def _unflatten(spec: dict[str, Any], name: str, rows: dict[str, np.ndarray]) -> Any:
    kind = spec["kind"]
    if kind == "tensor":
        return _from_bits(rows[name], spec)
    if kind == "none":
        return None
    if kind == "numbers":
        numbers = rows[name][0].tolist()
        return tuple(numbers) if spec["type"] == "tuple" else numbers
    items = {k: _unflatten(s, f"{name}.{k}", rows) for k, s in spec["items"].items()}
    if kind == "dict":
        return items
    return tuple(items.values()) if kind == "tuple" else list(items.values())


# ----------------------------------------------------------------------------- the reference

def scorer_identity(scorer: LMMScorer) -> str:
    """The model's name, its presentation and a hash of its configuration."""
    config = scorer.model.config.to_json_string(use_diff=False)
    digest = hashlib.sha256(config.encode()).hexdigest()[:16]
    return f"lmm:{scorer.name}:{scorer.present}:{digest}"


class LMMReference:
    """``Reference`` over a corpus: each (question, subset) scored by the LMM."""

    def __init__(self, scorer: LMMScorer, source: FrameSource) -> None:
        self.scorer, self.source = scorer, source
        self.id = scorer_identity(scorer)

    @property
    def forwards(self) -> int:
        """The scorer's language-model forwards so far (``RewardModel`` counts the delta)."""
        return self.scorer.forwards

    @torch.no_grad()
    def logits(self, corpus: Corpus, questions: torch.Tensor, picks: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor:
        items = []
        for q, p, v in zip(questions.tolist(), picks.tolist(), valid.tolist(), strict=True):
            local = sorted(x for x, ok in zip(p, v, strict=True) if ok)
            video_id = corpus.video_ids[int(corpus.video[q])]
            frames = self.source.frames(video_id, local, self.scorer.as_multi(len(local)))
            start = int(corpus.offsets[int(corpus.video[q])])
            times = corpus.frame_time[[start + i for i in local]].tolist()
            items.append(Item(corpus.text[q], corpus.options_text[q], frames, times))
        logits = self.scorer.logits_from_vision(items)
        width = corpus.max_options
        if logits.shape[1] < width:
            logits = torch.nn.functional.pad(logits, (0, width - logits.shape[1]),
                                             value=-torch.inf)
        return logits[:, :width].to(picks.device)
