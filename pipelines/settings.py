"""The settings of the embedding and scoring stages, kept free of torch so the command line
can read their defaults without loading it: each default is declared here once, and the flags
(flows/commands) and the flows (flows/orchestrate.py) read it. Ingest's settings live beside
their code (pipelines/decode.py, pipelines/ingest.py), which loads no torch either."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from stores.index import IndexSettings
from stores.urls import NetworkSettings

SYNTH_ENCODER = "refocus-synth"  # the encoder shipped with refocus, for the synthetic world


@dataclass(frozen=True)
class EmbedSettings:
    batch_size: int = 64
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    index: IndexSettings | None = field(default_factory=IndexSettings)  # None: no index

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 or more, got {self.workers}")


EXPORTS = ("none", "jpeg", "webdataset")  # refocus score --export


@dataclass(frozen=True)
class ScoreSettings:
    k: int | None = None  # None: the largest budget the policy was trained on (trained_k)
    export: str = "none"  # none | jpeg | webdataset
    ingest_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    embed: EmbedSettings = field(default_factory=lambda: EmbedSettings(index=None))
    model: str | None = None  # the encoder; default: the one the policy was trained with
    pretrained: str | None = None
    device: str | None = None
    questions_per_batch: int = 64
    export_shard_size: int = 256  # questions per WebDataset shard
    network: NetworkSettings = field(default_factory=NetworkSettings)  # video URLs

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.export not in EXPORTS:
            raise ValueError(f"export must be one of {', '.join(EXPORTS)}, got {self.export!r}")


@dataclass(frozen=True)
class TrainSettings:
    """How ``refocus train-encoder`` trains the synthetic world's CLIP model."""

    minutes: float = 25.0
    batch_size: int = 256
    draw_workers: int = 1  # processes drawing fresh frames while the model trains
    none_share: float = 0.2  # frames with no shape
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 200
    seed: int = 0
    frame_size: int = 160
    distractors: tuple[int, int] = (1, 5)
    eval_videos: int = 30  # held-out videos measured at the end
