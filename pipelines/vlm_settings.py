"""The settings of ``refocus train-vlm`` (torch-free, so ``refocus --help`` stays fast)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TextSettings:
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    intermediate: int = 288
    max_positions: int = 4096
    init_std: float = 0.1  # the language model's matrices (0.02 sat at chance for 1000+ steps)


@dataclass(frozen=True)
class VLMSettings:
    """Everything ``refocus train-vlm`` decides."""

    videos: int = 180  # synthetic videos of the training corpus
    duration: tuple[float, float] | None = None  # their length range (None: synth's default)
    seed: int = 4242  # the corpus' seed (not the demo's 0) and the training draws'
    steps: int = 2500  # the "Pick X." and class-token steps included
    minutes: float = 28.0  # stop early (and still finish) when training runs this long
    batch_size: int = 32
    micro_batch: int = 8  # examples per forward, sorted by length (less padding)
    lr: float = 1e-3  # at 2e-3 (4e-3) "Pick X." took 800 (1000+) steps; 1e-3: ~200
    weight_decay: float = 0.01
    warmup: int = 30
    text: TextSettings = TextSettings()
    pick_steps: int = 300  # text-only "Pick X." steps first (letters link to options)
    pick_share: float = 0.1  # of each later batch
    evidence_until: float = 0.3  # evidence frames only before this share of the later steps
    # single-frame grounding examples ("which shape…" of one frame showing one event): this
    # share of a batch at first, falling to a fifth of it by ground_until of the later steps
    ground_share: float = 0.5
    ground_until: float = 0.5
    fresh_share: float = 0.75  # of question examples: a fresh question of the video's plan
    # stage 1, before any question: the projector alone learns to put each frame's class
    # token on the word embeddings of what it shows (colour + shape; "frame" when empty)
    align_steps: int = 200
    align_frames: int = 128  # frames per alignment step
    # stage 2: after the "Pick X." steps, this many steps show each frame as its class token
    # alone (short sequences: the language model learns the questions fast), then every token
    class_steps: int = 1700
    max_frames: int = 6  # of a random or evidence + random subset
    eval_every: int = 100
    eval_questions: int = 128  # validation questions measured during training
    checkpoint_every: int = 50
    workers: int = 2  # synth and ingest processes
    threads: int = 2  # torch threads

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
