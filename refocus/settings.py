"""Settings of the learning stages, kept free of torch so the command line can read their
defaults without loading it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

VAL_SPLIT = "val"  # the split whose questions choose a training run's best checkpoint

# refocus eval's statistics (refocus/evaluation.py)
EVAL_RESAMPLES = 1000  # bootstrap resamples per accuracy cell, --resamples
EVAL_LEVEL = 0.95  # the bootstrap interval's coverage
EVAL_SEEDS = (0,)  # the seeds a stochastic selector runs under, --seeds
LMM_CEILING_FRAMES = 64  # the most frames an LMM judge sees for its ceiling, --ceiling-frames

# The reference LMM's per-frame vision features (refocus/lmm_reference.py)
REFERENCE_CACHE_GB = 8.0  # on the model's device (GPU), --reference-cache-gb
REFERENCE_HOST_CACHE_GB = 32.0  # in host memory (pinned when CUDA is present)
REFERENCE_FRAMES_PER_PASS = 32  # frames through the vision tower at once (halved on OOM)


@dataclass(frozen=True)
class ReaderTrainSettings:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    evidence_share: float = 0.5  # subsets built around the evidence
    max_subset: int = 24
    all_frames_every: int = 20  # every n-th step reads whole videos (a smaller batch)
    all_frames_batch: int = 16
    seed: int = 0


@dataclass(frozen=True)
class GRPOSettings:
    steps: int = 600
    questions_per_step: int = 64
    group: int = 8
    budgets: tuple[int, ...] = (4, 8, 16)
    curriculum: str = "cumulative"  # or "stages": only the current stage's budget
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 30
    entropy_coef: float = 1e-3
    grad_clip: float = 1.0
    temperature: float = 1.0
    seed: int = 0
    filter_threshold: float | None = None  # keep questions whose window rewards vary more
    filter_windows: int = 4
    # with a surrogate (refocus train --surrogate): the reward model scores every n-th step,
    # the surrogate the others (1: the reward model every step, as without a surrogate)
    lmm_every: int = 1

    def __post_init__(self) -> None:
        if self.curriculum not in ("cumulative", "stages"):
            raise ValueError(
                f"curriculum must be 'cumulative' or 'stages', not {self.curriculum!r}")
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError("budgets must be positive")
        if self.group < 2:
            raise ValueError(f"group (--group) must be at least 2: the advantage compares the "
                             f"subsets sampled for a question, and one alone learns nothing "
                             f"(got {self.group})")
        if self.lmm_every < 1:
            raise ValueError(f"lmm_every (--lmm-every) must be at least 1: the reward model "
                             f"scores every n-th step (got {self.lmm_every})")
        if not self.temperature > 0:
            raise ValueError(f"temperature (--temperature) must be above 0: the policy samples "
                             f"from logits divided by it (got {self.temperature})")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MarginSettings:
    """Which frame subsets the reference LMM scores offline (refocus precompute-margins)."""

    subsets_per_question: int = 16
    budgets: tuple[int, ...] = (4, 8, 16)  # subset sizes, drawn among these
    evidence_share: float = 0.5  # subsets holding a frame of every evidence span
    splits: tuple[str, ...] = ("train", VAL_SPLIT)  # questions scored (val: held out)
    questions_per_chunk: int = 32  # a chunk: one file, one done marker, one mapped task
    batch: int = 64  # (question, subset) rows per call of the reference
    seed: int = 0

    def __post_init__(self) -> None:
        if self.subsets_per_question < 1 or self.questions_per_chunk < 1 or self.batch < 1:
            raise ValueError("subsets per question, questions per chunk and batch must be "
                             "positive")
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError(f"budgets must be positive (got {self.budgets})")
        if not 0 <= self.evidence_share <= 1:
            raise ValueError(f"evidence share must be in 0..1 (got {self.evidence_share})")

    def plan_dict(self) -> dict[str, Any]:
        """What fixes the stored subsets (not how they are batched)."""
        return {k: v for k, v in asdict(self).items() if k != "batch"}


@dataclass(frozen=True)
class DistillSettings:
    """How the reader learns the LMM's outputs (refocus train-reader --distill)."""

    temperature: float = 1.0  # both distributions softened by it
    margin_weight: float = 0.1  # weight of the margin regression (smooth L1) beside the KL
    held_out_share: float = 0.2  # of the scored questions, when none is in the val split
