"""Settings of the learning stages, kept free of torch so the command line can read their
defaults without loading it: each default is declared here once, and the flags read it."""

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
REFERENCE_BATCH = 8  # (question, subset) pairs per forward (halved on OOM), --reference-batch
REFERENCE_HOST_CACHE_GB = 32.0  # in host memory (pinned when CUDA is present)
REFERENCE_FRAMES_PER_PASS = 32  # frames through the vision tower at once (halved on OOM)

# The paper's budget stages (4 → 8 → 16 → 32 frames): the GRPO curriculum and the subset sizes
# the reference scores offline, so a surrogate distilled on those margins has seen every size
# the policy trains on
BUDGETS = (4, 8, 16, 32)
# The data filter's statistic across temporal windows: the reference's margin (the correct
# option's logit minus the best other one; the paper's) or the reward tanh(margin / 2)
FILTER_STATISTICS = ("margin", "reward")
# The GRPO objective's choices (GRPOSettings.loss_norm, .scale_rewards; refocus train flags)
LOSS_NORMS = ("pick", "sequence", "constant")
SCALE_REWARDS = ("group", "none")
# Where training metrics also stream besides metrics.jsonl (pipelines/reporting.py), --report-to
REPORT_TO = ("none", "tensorboard", "wandb")


@dataclass(frozen=True)
class PolicyConfig:
    """The frame-selection policy's shape (refocus/policy.py); ``dim`` is the CLIP model's."""

    dim: int  # input embedding size (the CLIP model's)
    hidden: int = 64  # its width, refocus train --hidden
    layers: int = 2  # frame encoder
    decoder_layers: int = 1
    heads: int = 4
    time_features: int = 16
    initial_scale: float = 10.0  # pointer logit scale at initialisation
    max_scale: float = 50.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunSettings:
    """What a training run does besides the GRPO settings themselves."""

    eval_every: int = 50
    checkpoint_every: int = 100
    hidden: int = PolicyConfig.hidden
    layers: int = PolicyConfig.layers
    device: str | None = None
    reference_features: str | None = None  # a precompute-reference folder (lmm rewards)
    reference_batch: int = REFERENCE_BATCH  # (question, subset) pairs per LMM forward
    reference_cache_gb: float = REFERENCE_CACHE_GB  # the LMM's frame features on its device
    present: str | None = None  # how the LMM is shown frames (None: its family's default)
    val_split: str = VAL_SPLIT  # the questions the best checkpoint is chosen on
    # a reference spec (e.g. reader:PATH) scoring the steps the reward model does not
    # (GRPOSettings.lmm_every); its identity goes into run.json on its own
    surrogate: str | None = None
    report_to: str = REPORT_TO[0]  # also stream the metrics rows to: tensorboard or wandb


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
    budgets: tuple[int, ...] = BUDGETS
    curriculum: str = "cumulative"  # or "stages": only the current stage's budget
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 30
    entropy_coef: float = 1e-3
    grad_clip: float = 1.0
    temperature: float = 1.0
    seed: int = 0
    # the data filter (off when None): keep a question when the variance, across
    # ``filter_windows`` equal temporal windows, of ``filter_statistic`` (scored on a few
    # frames spread inside each window) is above the threshold. On the margin scale (logits)
    # the paper's 0.2 is a standard deviation of about 0.45 logits across the windows
    filter_threshold: float | None = None
    filter_windows: int = 4
    filter_statistic: str = "margin"  # or "reward" (tanh(margin / 2), at most 1 in size)
    # with a surrogate (refocus train --surrogate): the reward model scores every n-th step,
    # the surrogate the others (1: the reward model every step, as without a surrogate)
    lmm_every: int = 1
    # the objective (refocus/trainer.py): how the per-pick terms are averaged — pick: over all
    # real picks of the batch (DAPO); sequence: per subset, then over subsets (GRPO);
    # constant: summed per subset and divided by max(budgets) (Dr. GRPO) — how advantages are
    # scaled (group: by the group's reward std, clamped below at std_floor; none: centred
    # only), whether groups whose reward std is below std_floor leave the loss, and how many
    # optimizer steps each rollout feeds (above 1: PPO's ratio and clipping at clip_eps), with
    # a KL penalty (k3 estimator) to the initial policy when kl_coef > 0
    loss_norm: str = "pick"
    scale_rewards: str = "group"
    std_floor: float = 0.01  # in reward units (tanh(margin / 2), in −1..1)
    drop_zero_variance: bool = False
    updates_per_rollout: int = 1
    clip_eps: float = 0.2
    kl_coef: float = 0.0

    def __post_init__(self) -> None:
        self._check_objective()
        if self.curriculum not in ("cumulative", "stages"):
            raise ValueError(
                f"curriculum must be 'cumulative' or 'stages', not {self.curriculum!r}")
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError("budgets must be positive")
        if self.filter_statistic not in FILTER_STATISTICS:
            raise ValueError(f"filter statistic (--filter-statistic) must be one of "
                             f"{', '.join(FILTER_STATISTICS)}, not {self.filter_statistic!r}")
        if self.filter_windows < 2:
            raise ValueError(f"filter windows must be at least 2: the filter compares the "
                             f"windows of a video (got {self.filter_windows})")
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

    def _check_objective(self) -> None:
        if self.loss_norm not in LOSS_NORMS:
            raise ValueError(f"loss_norm (--loss-norm) must be one of {', '.join(LOSS_NORMS)}, "
                             f"not {self.loss_norm!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards (--scale-rewards) must be one of "
                             f"{', '.join(SCALE_REWARDS)}, not {self.scale_rewards!r}")
        if not self.std_floor > 0:
            raise ValueError(f"std_floor (--std-floor) must be above 0: the group's reward std "
                             f"is clamped below at it (got {self.std_floor})")
        if self.updates_per_rollout < 1:
            raise ValueError(f"updates_per_rollout (--updates-per-rollout) must be at least 1 "
                             f"(got {self.updates_per_rollout})")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps (--clip-eps) must be in (0, 1): the ratio is clipped "
                             f"to 1 ± it (got {self.clip_eps})")
        if not self.kl_coef >= 0:
            raise ValueError(f"kl_coef (--kl-coef) must be 0 or more (got {self.kl_coef})")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MarginSettings:
    """Which frame subsets the reference LMM scores offline (refocus precompute-margins)."""

    subsets_per_question: int = 16
    budgets: tuple[int, ...] = BUDGETS  # subset sizes, drawn among these
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


@dataclass(frozen=True)
class ReferenceOptions:
    """How the reference LMM is run (nothing here changes its outputs)."""

    reference_features: str | None = None  # a precompute-reference folder
    reference_batch: int = REFERENCE_BATCH  # (question, subset) pairs per LMM forward
    reference_cache_gb: float = REFERENCE_CACHE_GB
    present: str | None = None  # how the LMM is shown frames (None: its family's default)
    device: str | None = None
