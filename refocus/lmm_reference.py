"""The LMM as a reward reference: the ``Reference`` protocol over a corpus, with each frame's
vision features taken from a precomputed reference store (offline → online) or computed from
the frame shards on first use and kept (vision once per frame either way)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Protocol

import numpy as np
import torch

from refocus.data import Corpus
from refocus.lmm import FrameVision, Item, LMMScorer
from stores.errors import UserError
from stores.frames import decode_frame
from stores.reference import ReferenceStore
from stores.shards import ShardSet


class FrameSource(Protocol):
    def frames(self, video_id: str, local: list[int], multi: bool) -> list[FrameVision]: ...


def decode_jpeg(data: bytes, where: str = "frame") -> np.ndarray:
    """A stored frame as RGB pixels; one over the pixel cap is a one-line error naming
    ``where`` (rewards need every candidate frame, so none is skipped)."""
    return np.asarray(decode_frame(data, where))


class ShardFrames:
    """Frames read from the ingest shards; a video's features are computed for all its
    frames at its first use and kept for the ``keep`` most recent videos."""

    def __init__(self, shards: str, scorer: LMMScorer, keep: int = 64) -> None:
        self.shards, self.scorer, self.keep = ShardSet(shards), scorer, keep
        self.lookup = self.shards.lookup()
        self.cache: OrderedDict[tuple[str, bool], list[FrameVision]] = OrderedDict()
        self.vision_calls = 0

    def images(self, video_id: str) -> list[np.ndarray]:
        if video_id not in self.lookup:
            raise UserError(f"{self.shards.directory}: no video {video_id!r} in the shards")
        location = self.lookup[video_id]
        where = f"{self.shards.directory / location.shard}: video {video_id!r} frame"
        return [decode_jpeg(f, f"{where} {i}")
                for i, f in enumerate(self.shards.read(video_id, location).frames)]

    def frames(self, video_id: str, local: list[int], multi: bool) -> list[FrameVision]:
        key = (video_id, multi)
        if key not in self.cache:
            images = self.images(video_id)
            self.vision_calls += 1
            if multi:
                self.cache[key] = self.scorer.vision(images, multi=True)
            else:  # lone frames (LLaVA-OneVision tiles them): only those asked for
                self.cache[key] = [None] * len(images)  # type: ignore[list-item]
            if len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        cached = self.cache[key]
        missing = [i for i in local if cached[i] is None]
        if missing:
            images = self.images(video_id)
            for i, v in zip(missing, self.scorer.vision([images[i] for i in missing],
                                                        multi=False), strict=True):
                cached[i] = v
        return [cached[i] for i in local]


class StoreFrames:
    """Frames from a reference store written by ``refocus precompute-reference``."""

    def __init__(self, store: ReferenceStore, scorer: LMMScorer) -> None:
        identity = store.identity()
        if identity.get("model_id") != scorer_identity(scorer):
            raise UserError(f"{store.directory}: features of {identity.get('model')!r}, not of "
                            f"{scorer.name!r}")
        self.store, self.scorer = store, scorer

    def frames(self, video_id: str, local: list[int], multi: bool) -> list[FrameVision]:
        if not multi:
            raise UserError(f"{self.scorer.name} reads a lone frame differently from one of "
                            "several; budgets of 1 need the frame shards, not a reference store")
        return [FrameVision(torch.from_numpy(f["tokens"]),
                            {k: torch.from_numpy(v) for k, v in f["extra"].items()}, f["size"])
                for f in self.store.frames(video_id, local)]


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
