"""GRPO training of the frame-selection policy (ReFoCUS), one readable step at a time.

Each step: draw a batch of training questions; sample a group of N frame subsets per question
from the policy (no gradient); score them with the reference (reward r = tanh(margin / 2));
normalise within each group, A = (r − mean) / max(std, floor); recompute the log-probabilities
in one teacher-forced pass and minimise −A·log π(f_t | q, f_<t), averaged over the picks, −
β·entropy. The budget k follows a curriculum (e.g. 4 → 8 → 16), each stage an equal share of
the steps; by default each step draws k from the stages reached so far (``cumulative``), which
keeps the policy good at small budgets — with the paper's plain stages, accuracy at k = 4 fell
while the later stages trained k = 8 and 16. AdamW with warm-up and cosine decay, gradient
clipping, autocast on CUDA.

With a **surrogate** (``surrogate=``, a cheap reference such as a reader distilled on the
reward model's margins) and ``settings.lmm_every = n``, the reward model (e.g. the LMM) scores
every n-th step (steps 0, n, 2n, …) and fills its cache; on the other steps the surrogate
scores, except that every subset already in the reward model's cache takes the cached value
(free, and the truth). Whole steps, not a share of the groups of each step: each LMM step
then sends a full batch of subsets to the LMM (its forwards stay batched), and with n = 1
training is exactly training on the reward model alone. Each step's metrics say which model
scored it and how many subsets each was sent (``RewardModel`` counts them).

**The objective** (``GRPOSettings``; refocus train --loss-norm, --scale-rewards, --std-floor,
--drop-zero-variance, --updates-per-rollout, --clip-eps, --kl-coef):

* advantages: A = (r − mean) / max(std, std_floor) within each group (``scale_rewards=group``)
  or A = r − mean (``none``, Dr. GRPO). The floor (0.01 by default, in reward units) keeps
  rewards that differ by rounding (2e-6) from becoming advantages of order 1. A group whose
  std is below the floor is *flat*; its share is logged every step (``zero_variance``), and
  with ``drop_zero_variance`` its subsets leave the loss (numerator and denominator);
* averaging (``loss_norm``) of every per-pick term (policy gradient, entropy, KL):
  ``pick`` — over all real picks of the batch (DAPO's token-level mean; the default: the
  gradient's scale does not grow with k), ``sequence`` — per subset, then over subsets
  (GRPO), ``constant`` — summed per subset and divided by max(budgets), then over subsets
  (Dr. GRPO);
* ``updates_per_rollout = N``: N optimizer steps on each rollout (the whole batch each time, at
  the step's learning rate). The old log-probabilities are those of the first update's
  teacher-forced pass, made with the rollout's weights; there the ratio is exactly 1, and the
  clipped objective's value and gradient are those of A·log π, which is what the first
  update computes (so N = 1 is the plain policy-gradient step). Later updates use
  r = exp(log π − log π_old) and PPO's min(r·A, clip(r, 1 − ε, 1 + ε)·A) per pick, and log the
  share of picks on the clipped side (``clip_fraction``) and the k3 estimate of KL(old ‖ new)
  (``approx_kl``), both averaged over those updates;
* ``kl_coef > 0``: + kl_coef · k3(π_ref / π) per pick, π_ref the frozen initial policy (kept,
  and saved in ``state()``, only then; ``kl_to_initial`` logged).

The trainer holds no files: ``state()`` returns tensors and JSON-able values that restore it
exactly (weights, optimizer, step, random generators), and the caller writes them.

Several processes (``torchrun``): when a ``torch.distributed`` process group is up, every rank
draws the same global batch of ``questions_per_step`` questions (the numpy generator is seeded
alike on all ranks) and keeps its own share, ``questions[rank::world]``; each rank samples with
its own torch generator (seed + rank), scores its share, and after ``backward`` the gradients
are averaged over the ranks by one all-reduce, so every rank takes the same optimizer step and
the weights stay identical (same seed, same initial weights). With equal shares the averaged
gradient is the gradient of the whole batch in one process. Outside a process group nothing of
this runs: one process trains exactly as before.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from refocus.data import Corpus
from refocus.policy import FrameSelector, PolicyConfig
from refocus.rewards import RewardCounts, RewardModel, pad_subsets, reward
from refocus.selectors import Learned, uniform_indices
from refocus.settings import FILTER_STATISTICS, GRPOSettings
from stores.checkpoints import Checkpoint


@dataclass
class StepMetrics:
    step: int
    budget: int
    reward: float
    reward_std: float
    advantage_abs: float
    entropy: float
    loss: float
    lr: float
    seconds: float
    sample_seconds: float = 0.0  # drawing the group's subsets
    reward_seconds: float = 0.0  # the reference (cache misses only)
    update_seconds: float = 0.0  # teacher-forced pass, backward, optimizer
    cache_hits: int = 0
    reward_from: str = "reward"  # which model scored the step: "reward" or "surrogate"
    reward_subsets: int = 0  # subsets the reward model scored (its cache misses)
    reward_forwards: int = 0  # the reward model's forwards (batches)
    surrogate_subsets: int = 0  # subsets the surrogate scored
    zero_variance: float = 0.0  # share of groups whose reward std is below the floor
    clip_fraction: float = 0.0  # picks on the clipped side, updates after the first
    approx_kl: float = 0.0  # k3 KL(rollout policy ‖ updated policy), same updates
    kl_to_initial: float = 0.0  # k3 KL to the initial policy (with kl_coef > 0)
    grad_norm: float = 0.0  # the first update's gradient norm before clipping
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    """One step's sampled subsets and their advantages, for this rank's questions."""

    budget: int
    questions: torch.Tensor  # [B] corpus rows
    picks: torch.Tensor  # [B·N, k] local frame indices, N = group, rows grouped by question
    mask: torch.Tensor  # [B·N, k] real picks
    rewards: torch.Tensor  # [B·N]
    advantage: torch.Tensor  # [B·N] normalised within each question's group
    kept: torch.Tensor | None = None  # [B·N] bool: in the loss (None: all)
    flat: torch.Tensor | None = None  # [B] bool: the group's reward std is below the floor
    sample_seconds: float = 0.0
    reward_seconds: float = 0.0
    cache_hits: int = 0
    reward_from: str = "reward"
    reward_counts: RewardCounts = field(default_factory=RewardCounts)  # this step's
    surrogate_counts: RewardCounts = field(default_factory=RewardCounts)


# ----------------------------------------------------------------------------- the objective

def group_advantages(rewards: torch.Tensor, scale: str, floor: float,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of rewards [G, N] (a row per question's group of subsets) and which groups
    are flat [G] (reward std below ``floor``): r − mean, divided by max(std, floor) when
    ``scale`` is "group" (population std, as the group is the whole sample)."""
    centred = rewards - rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True, unbiased=False)
    if scale == "group":
        centred = centred / std.clamp_min(floor)
    return centred, std.squeeze(1) < floor


def clipped_surrogate(log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                      advantage: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-pick objective (to maximise) min(r·A, clip(r, 1 − ε, 1 + ε)·A) with
    r = exp(log π − log π_old), log-probs [B, k] and advantages [B]; and which picks lie on
    the clipped side (no gradient: r above 1 + ε with A > 0, below 1 − ε with A < 0)."""
    ratio = (log_probs - old_log_probs).exp()
    a = advantage[:, None]
    objective = torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
    clipped = ((ratio > 1 + eps) & (a > 0)) | ((ratio < 1 - eps) & (a < 0))
    return objective, clipped


def k3(log_probs: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(π ‖ π_other) per pick drawn from π: e^d − d − 1 with
    d = log π_other − log π (never negative, unbiased; GRPO's KL term)."""
    d = other - log_probs
    return d.exp() - d - 1


@dataclass
class PickMean:
    """Averages per-pick terms [B·N, k] over the real picks of the subsets in the loss, as
    ``loss_norm`` says (module docstring). Under several processes the denominator is the
    whole batch's count over the number of ranks (their gradients are averaged)."""

    norm: str
    weight: torch.Tensor  # [B·N, k] float: 1 for a real pick of a subset in the loss
    per_subset: torch.Tensor  # [B·N]: its picks (sequence) or max(budgets) (constant)
    denominator: torch.Tensor  # picks (pick) or subsets (sequence, constant) in the loss

    @classmethod
    def of(cls, norm: str, mask: torch.Tensor, kept: torch.Tensor | None, max_budget: int,
           world: int = 1) -> PickMean:
        weight = (mask if kept is None else mask & kept[:, None]).float()
        if norm == "pick":
            count = weight.sum()
        else:
            count = weight.new_tensor(len(weight)) if kept is None else kept.float().sum()
        if world > 1:
            dist.all_reduce(count)
            count = count / world
        per_subset = (mask.float().sum(1).clamp_min(1) if norm == "sequence"
                      else weight.new_full((len(weight),), float(max_budget)))
        return cls(norm, weight, per_subset, count)

    @property
    def empty(self) -> bool:
        """No pick of the whole batch is in the loss (every group dropped)."""
        return not bool(self.denominator > 0)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        denominator = self.denominator.clamp_min(1e-12)
        if self.norm == "pick":
            return (values * self.weight).sum() / denominator
        return ((values * self.weight).sum(1) / self.per_subset).sum() / denominator

    def share(self, flags: torch.Tensor) -> torch.Tensor:
        """The share of this rank's picks in the loss where ``flags`` holds (or its mean,
        for values)."""
        return (flags.float() * self.weight).sum() / self.weight.sum().clamp_min(1)


@dataclass
class UpdateStats:
    """What one rollout's updates report (this rank's)."""

    loss: torch.Tensor  # the first update's
    entropy: torch.Tensor  # the first update's mean entropy, averaged as the loss
    kl_to_initial: torch.Tensor  # the first update's mean k3 to the initial policy
    clip_fraction: torch.Tensor  # mean over the updates after the first (0 without)
    approx_kl: torch.Tensor
    grad_norm: torch.Tensor  # the first update's, before clipping (0 when it took none)


@dataclass
class Objective:
    """One update's loss and what it is made of (all but the loss detached)."""

    loss: torch.Tensor
    entropy: torch.Tensor  # averaged as the loss averages
    kl_to_initial: torch.Tensor  # 0 without a reference policy
    clip_fraction: torch.Tensor  # share of the picks on the clipped side (0: first update)
    approx_kl: torch.Tensor  # k3 KL(π_old ‖ π) (0: first update)


def objective(log_probs: torch.Tensor, entropy: torch.Tensor, advantage: torch.Tensor,
              mean: PickMean, settings: GRPOSettings, old: torch.Tensor | None = None,
              reference: torch.Tensor | None = None) -> Objective:
    """The loss of one update from the current policy's teacher-forced log-probabilities and
    entropies [B·N, k] and the advantages [B·N]: −mean(A·log π) on the first update (``old``
    None: the ratio is exactly 1 there, and this is the clipped objective's gradient), else
    −mean(min(r·A, clip(r, 1 − ε, 1 + ε)·A)); − β·mean(entropy); + kl_coef·mean(k3 to the
    reference policy's log-probs) when given. Every mean as ``mean`` averages."""
    zero = log_probs.new_zeros(())
    if old is None:
        gain, clip_fraction, approx_kl = advantage[:, None] * log_probs, zero, zero
    else:
        gain, outside = clipped_surrogate(log_probs, old, advantage, settings.clip_eps)
        clip_fraction = mean.share(outside)
        approx_kl = mean.share(k3(old, log_probs.detach()))
    mean_entropy = mean(entropy)
    loss = -mean(gain) - settings.entropy_coef * mean_entropy
    kl = zero
    if reference is not None:
        kl = mean(k3(log_probs, reference))
        loss = loss + settings.kl_coef * kl
    return Objective(loss, mean_entropy.detach(), kl.detach(), clip_fraction, approx_kl)


def _mean_of(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.stack(values).mean().to(device) if values else torch.zeros((), device=device)


# ----------------------------------------------------------------------------- several processes

@dataclass(frozen=True)
class DistEnv:
    """This process's place in a ``torchrun`` launch, read from RANK, LOCAL_RANK and
    WORLD_SIZE (one process when they are unset). Plain Python: reading it loads nothing."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> DistEnv:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0")) if world > 1 else 0
        return cls(rank, int(environ.get("LOCAL_RANK", rank)) if world > 1 else 0, world)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the one process that writes files and reports."""
        return self.rank == 0


def rank_and_world() -> tuple[int, int]:
    """(rank, number of ranks) of the running ``torch.distributed`` job; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def process_group(env: DistEnv, device: torch.device) -> Iterator[None]:
    """Join the launch's process group for the duration — NCCL on CUDA, else gloo — and leave
    it afterwards. Nothing for one process, or when the caller has joined one already."""
    if not env.distributed or (dist.is_available() and dist.is_initialized()):
        yield
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)  # so "cuda" (e.g. an LMM reference) means this rank's GPU
    dist.init_process_group("nccl" if cuda else "gloo", rank=env.rank,
                            world_size=env.world_size, device_id=device if cuda else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def window_subsets(corpus: Corpus, question: int, windows: int, k: int) -> list[list[int]]:
    """The filter's subsets of a question: k frames spread evenly inside each of ``windows``
    equal temporal windows of its video (local frame indices)."""
    n = int(corpus.n_frames[corpus.video[question]])
    subsets = []
    for w in range(windows):
        lo, hi = w * n // windows, max(w * n // windows + 1, (w + 1) * n // windows)
        subsets.append([lo + i for i in uniform_indices(hi - lo, k)])
    return subsets


def window_filter(corpus: Corpus, questions: list[int], reward_model: RewardModel,
                  windows: int, k: int, threshold: float, statistic: str = "margin",
                  ) -> tuple[list[int], np.ndarray]:
    """The paper's data filter: score k frames spread evenly inside each of ``windows`` equal
    temporal windows; keep the questions whose ``statistic`` varies across the windows
    (population variance > threshold). ``margin`` (the paper's): the reference's margin, the
    correct option's logit minus the best other one, so a threshold of 0.2 keeps a question
    whose margin moves by a standard deviation above √0.2 ≈ 0.45 logits from window to window
    (the evidence is in some windows and not in others); ``reward``: tanh(margin / 2), which
    saturates, so the same threshold asks for far more (a spread of ±0.45 in a reward bounded
    by 1). Returns the kept questions and every question's variance."""
    if statistic not in FILTER_STATISTICS:
        raise ValueError(f"filter statistic must be one of {', '.join(FILTER_STATISTICS)}, "
                         f"not {statistic!r}")
    variances = np.zeros(len(questions))
    for start in range(0, len(questions), 128):
        part = questions[start:start + 128]
        subsets = [s for q in part for s in window_subsets(corpus, q, windows, k)]
        rows = torch.tensor([q for q in part for _ in range(windows)], device=corpus.device)
        picks, valid = pad_subsets(subsets, corpus.device)
        values = reward_model.margins(corpus, rows, picks, valid).double()
        if statistic == "reward":
            values = reward(values)
        variances[start:start + len(part)] = values.view(len(part), windows).var(
            dim=1, unbiased=False).cpu().numpy()
    kept = [q for q, v in zip(questions, variances, strict=True) if v > threshold]
    return kept, variances


def validation_score(validation: dict[str, float]) -> float:
    """What the best policy is chosen by: the mean accuracy over the validated budgets."""
    values = [v for k, v in validation.items() if k.startswith("accuracy@")]
    return float(np.mean(values)) if values else 0.0


class GRPOTrainer:
    def __init__(self, corpus: Corpus, reward_model: RewardModel, settings: GRPOSettings,
                 policy_config: PolicyConfig | None = None,
                 surrogate: RewardModel | None = None,
                 state: Checkpoint | None = None) -> None:
        """``state``: what ``state()`` returned (or a checkpoint read back), to resume from
        (the data filter is then not run again: the saved questions are the filtered ones)."""
        self.corpus = corpus
        self.reward_model = reward_model
        self.surrogate = surrogate
        self.settings = s = settings
        if surrogate is not None and reward_model.cache is None:
            raise ValueError("a surrogate needs the reward model's cache (its subsets are "
                             "reused on the surrogate's steps)")
        if surrogate is None and s.lmm_every != 1:
            raise ValueError(f"lmm_every {s.lmm_every} without a surrogate: the reward model "
                             "would score every step anyway")
        self.rank, self.world = rank_and_world()
        if s.questions_per_step % self.world:
            raise ValueError(f"questions_per_step ({s.questions_per_step}) must split evenly "
                             f"over the {self.world} processes")
        torch.manual_seed(s.seed)  # the same initial weights on every rank
        config = policy_config or PolicyConfig(dim=corpus.frame_embedding.shape[1])
        self.policy = FrameSelector(config).to(corpus.device)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=s.lr,
                                           weight_decay=s.weight_decay)
        # the frozen initial policy of the KL penalty (only with one; saved in state())
        self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval() \
            if s.kl_coef > 0 else None
        self.generator = torch.Generator(device=corpus.device).manual_seed(s.seed + self.rank)
        self.rng = np.random.default_rng(s.seed)  # alike on every rank: the same global batch
        self.step_count = 0
        self.questions = corpus.rows("train")
        if not self.questions:
            raise ValueError("no training questions (split 'train')")
        self.filter_stats: dict[str, Any] = {}
        # the best policy on validation so far (``keep_if_best``)
        self.best: dict[str, Any] = {"score": -1.0, "step": 0, "validation": {}}
        self.best_weights = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        if state is not None:  # a resumed run: its filtered questions come with it
            self.load_state(state)
        elif s.filter_threshold is not None:
            self.questions = self._filter(s.filter_threshold)

    def _filter(self, threshold: float) -> list[int]:
        """The data filter over the training questions (``window_filter`` at the smallest
        budget); its statistics go into ``filter_stats`` (and the checkpoint)."""
        s = self.settings
        kept, variances = window_filter(self.corpus, self.questions, self.reward_model,
                                        s.filter_windows, min(s.budgets), threshold,
                                        s.filter_statistic)
        self.filter_stats = {"before": len(self.questions), "after": len(kept),
                             "mean_variance": float(variances.mean()),
                             "statistic": s.filter_statistic, "threshold": threshold,
                             "windows": s.filter_windows}
        if not kept:
            raise ValueError(f"the data filter ({s.filter_statistic} variance across "
                             f"{s.filter_windows} windows > {threshold}) kept no question "
                             f"(mean variance {variances.mean():.3g}); lower the threshold")
        return kept

    # ------------------------------------------------------------------ schedule
    def stage(self, step: int | None = None) -> int:
        step = self.step_count if step is None else step
        stages = len(self.settings.budgets)
        return min(stages - 1, step * stages // max(1, self.settings.steps))

    def budget(self) -> int:
        """This step's k. ``stages`` (the paper): the current stage's budget. ``cumulative``
        (default): a budget drawn from the stages reached so far, so that growing the budget
        does not unlearn the small ones."""
        budgets = self.settings.budgets[:self.stage() + 1]
        if self.settings.curriculum == "stages" or len(budgets) == 1:
            return budgets[-1]
        return int(self.rng.choice(budgets))

    def reward_from(self, step: int | None = None) -> str:
        """Which model scores a step: the reward model every ``lmm_every``-th step (and
        always without a surrogate), else the surrogate."""
        step = self.step_count if step is None else step
        if self.surrogate is None or step % self.settings.lmm_every == 0:
            return "reward"
        return "surrogate"

    def learning_rate(self, step: int) -> float:
        s = self.settings
        warm = min(1.0, (step + 1) / max(1, s.warmup))
        return s.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, s.steps))))

    # ------------------------------------------------------------------ one step
    def step(self) -> StepMetrics:
        s = self.settings
        started = time.perf_counter()
        lr = self.learning_rate(self.step_count)
        rollout = self.rollout()
        rewarded = time.perf_counter()
        update = self.update(rollout)
        done = time.perf_counter()
        grouped = rollout.rewards.view(-1, s.group)
        flat = rollout.flat if rollout.flat is not None else torch.zeros(len(grouped))
        stats = torch.stack([
            rollout.rewards.mean(), grouped.std(1, unbiased=False).mean(),
            rollout.advantage.abs().mean(), update.entropy, update.loss,
            flat.float().mean().to(update.loss.device), update.clip_fraction, update.approx_kl,
            update.kl_to_initial, update.grad_norm])
        if self.world > 1:  # the whole batch's means (the shares are equal)
            dist.all_reduce(stats)
            stats /= self.world
        (reward, reward_std, advantage_abs, entropy_mean, loss_value, zero_variance,
         clip_fraction, approx_kl, kl_to_initial, grad_norm) = stats.tolist()
        counts = [rollout.cache_hits, rollout.reward_counts.subsets,
                  rollout.reward_counts.forwards, rollout.surrogate_counts.subsets]
        if self.world > 1:  # the whole batch's counts
            summed = torch.tensor(counts, dtype=torch.long, device=self.corpus.device)
            dist.all_reduce(summed)
            counts = summed.tolist()
        hits, reward_subsets, reward_forwards, surrogate_subsets = counts
        return StepMetrics(
            step=self.step_count, budget=rollout.budget, reward=reward, reward_std=reward_std,
            advantage_abs=advantage_abs, entropy=entropy_mean, loss=loss_value, lr=lr,
            seconds=done - started, sample_seconds=rollout.sample_seconds,
            reward_seconds=rollout.reward_seconds, update_seconds=done - rewarded,
            cache_hits=hits, reward_from=rollout.reward_from, reward_subsets=reward_subsets,
            reward_forwards=reward_forwards, surrogate_subsets=surrogate_subsets,
            zero_variance=zero_variance, clip_fraction=clip_fraction, approx_kl=approx_kl,
            kl_to_initial=kl_to_initial, grad_norm=grad_norm)

    def _autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=self.corpus.device.type == "cuda")

    def rollout(self) -> Rollout:
        """This step's budget and batch (this rank's share of it); a group of subsets sampled
        per question (no gradient); their rewards and advantages within each group."""
        s, corpus, policy = self.settings, self.corpus, self.policy
        started = time.perf_counter()
        k = self.budget()
        drawn = self.rng.choice(self.questions, s.questions_per_step)
        questions = torch.as_tensor(drawn[self.rank::self.world], device=corpus.device)
        batch = corpus.frames_of(questions)

        # 1. sample a group of subsets per question (no gradient)
        policy.eval()
        with torch.no_grad(), self._autocast():
            ctx = policy.encode(batch.question_embedding, batch.question_text, batch.frames,
                                batch.times, batch.valid).repeat(s.group)
            sample = policy.sample(ctx, k, temperature=s.temperature, generator=self.generator,
                                   with_entropy=False)
        rows = questions.repeat_interleave(s.group)
        sampled = time.perf_counter()

        # 2. rewards from the reference (or the surrogate, on its steps), advantages within
        # each group
        source = self.reward_from()
        surrogate = self.surrogate if source == "surrogate" else None
        before = self.reward_model.counts.copy()
        surrogate_before = surrogate.counts.copy() if surrogate else RewardCounts()
        rewards = self.reward_model.rewards(corpus, rows, sample.picks, sample.mask, surrogate)
        advantage, flat = group_advantages(rewards.view(-1, s.group), s.scale_rewards,
                                           s.std_floor)
        kept = (~flat).repeat_interleave(s.group) if s.drop_zero_variance else None
        counts = self.reward_model.counts.minus(before)
        return Rollout(k, questions, sample.picks, sample.mask, rewards, advantage.flatten(),
                       kept, flat, sample_seconds=sampled - started,
                       reward_seconds=time.perf_counter() - sampled,
                       cache_hits=counts.hits, reward_from=source, reward_counts=counts,
                       surrogate_counts=surrogate.counts.minus(surrogate_before)
                       if surrogate else RewardCounts())

    def update(self, rollout: Rollout) -> UpdateStats:
        """3. ``updates_per_rollout`` optimizer steps on the rollout's subsets (module
        docstring), each: teacher-forced log-probabilities, the loss, backward, gradients
        averaged over the ranks, clipping, a step (none when no pick is in the loss)."""
        s = self.settings
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step_count)
        batch = self.corpus.frames_of(rollout.questions)
        mean = PickMean.of(s.loss_norm, rollout.mask, rollout.kept, max(s.budgets), self.world)
        reference = None
        if self.reference is not None:
            with torch.no_grad():
                reference, _ = self._log_probs(self.reference, batch, rollout.picks)
        self.policy.train()
        terms: list[Objective] = []
        norms = []
        old = None
        for _ in range(s.updates_per_rollout):
            log_probs, entropy = self._log_probs(self.policy, batch, rollout.picks)
            terms.append(objective(log_probs, entropy, rollout.advantage, mean, s, old,
                                   reference))
            old = log_probs.detach() if old is None else old  # the rollout's weights
            if not mean.empty:  # (every group dropped: nothing to learn from this rollout)
                norms.append(self._optimize(terms[-1].loss))
        self.step_count += 1
        first, later = terms[0], terms[1:]
        device = first.loss.device
        return UpdateStats(first.loss.detach(), first.entropy, first.kl_to_initial.to(device),
                           _mean_of([t.clip_fraction for t in later], device),
                           _mean_of([t.approx_kl for t in later], device),
                           _mean_of(norms[:1], device))

    def _log_probs(self, policy: FrameSelector, batch: Any, picks: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log π and entropy of the picks [B·N, k] (float32)."""
        s = self.settings
        with self._autocast():
            ctx = policy.encode(batch.question_embedding, batch.question_text, batch.frames,
                                batch.times, batch.valid).repeat(s.group)
            log_probs, entropy = policy.log_probs(ctx, picks, temperature=s.temperature)
        return log_probs.float(), entropy.float()

    def _optimize(self, loss: torch.Tensor) -> torch.Tensor:
        """One optimizer step on ``loss``; returns the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            self._average_gradients()
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        return norm.detach()

    def _average_gradients(self) -> None:
        """Mean of the ranks' gradients, in one all-reduce of all of them flattened (the same
        single collective on every rank, whatever the batch)."""
        params = list(self.policy.parameters())
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in params])
        dist.all_reduce(flat)  # a sum: gloo has no average
        flat /= self.world
        for p, grad in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad = grad.view_as(p)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, questions: list[int], ks: tuple[int, ...]) -> dict[str, float]:
        """Greedy selections: the reference's accuracy and the evidence recall per budget."""
        selector = Learned(self.policy)
        out: dict[str, float] = {}
        for k in ks:
            picks = selector.select(self.corpus, questions, k)
            p, v = pad_subsets(picks, self.corpus.device)
            q = torch.tensor(questions, device=self.corpus.device)
            answers = self.reward_model.answers(self.corpus, q, p, v)
            out[f"accuracy@{k}"] = float((answers == self.corpus.answer[q]).float().mean())
            recalls = [self.corpus.evidence_recall(qq, pp) for qq, pp in zip(questions, picks,
                                                                             strict=True)]
            recalls = [r for r in recalls if r is not None]
            out[f"evidence_recall@{k}"] = float(np.mean(recalls)) if recalls else float("nan")
        self.policy.train()
        return out

    # ------------------------------------------------------------------ state
    def keep_if_best(self, validation: dict[str, float]) -> bool:
        """Keep the policy as the best one when its validation score (``validation_score``)
        beats the best so far."""
        score = validation_score(validation)
        if score <= self.best["score"]:
            return False
        self.best = {"score": score, "step": self.step_count, "validation": validation}
        self.best_weights = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        return True

    def state(self) -> Checkpoint:
        """The whole checkpoint: tensors (weights, optimizer moments, generators, the best
        policy as ``best.*``), JSON-able values (step, settings, numpy generator, questions,
        the best policy's record) and the reward model's cache, which restore this trainer
        exactly."""
        tensors = {f"policy.{k}": v.detach().cpu().contiguous()
                   for k, v in self.policy.state_dict().items()}
        optimizer = self.optimizer.state_dict()
        for index, entry in optimizer["state"].items():
            for name, value in entry.items():
                tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu()
        if self.reference is not None:
            tensors.update({f"reference.{k}": v.detach().cpu().contiguous()
                            for k, v in self.reference.state_dict().items()})
        tensors["generator"] = self.generator.get_state()
        if self.world > 1:  # every rank's sampling generator (a collective: call on all ranks)
            states: list[Any] = [None] * self.world
            dist.all_gather_object(states, self.generator.get_state())
            tensors.update({f"generator.rank{r}": states[r] for r in range(1, self.world)})
        meta = {
            "step": self.step_count,
            "settings": self.settings.as_dict(),
            "policy_config": self.policy.config.as_dict(),
            "optimizer_groups": optimizer["param_groups"],
            "numpy_rng": self.rng.bit_generator.state,
            "questions": self.questions,
            "filter": self.filter_stats,
            "best": self.best,
        }
        tensors.update({f"best.{k}": v.detach().cpu().contiguous()
                        for k, v in self.best_weights.items()})
        cache = self.reward_model.cache
        return Checkpoint(tensors, meta, list(cache.items()) if cache is not None else [])

    def load_state(self, state: Checkpoint) -> None:
        tensors, meta = state.tensors, state.meta
        self.policy.load_state_dict({k[len("policy."):]: v for k, v in tensors.items()
                                     if k.startswith("policy.")})
        if self.reference is not None:
            saved = {k[len("reference."):]: v for k, v in tensors.items()
                     if k.startswith("reference.")}
            if not saved:
                raise ValueError("the checkpoint holds no reference policy for the KL penalty")
            self.reference.load_state_dict(saved)
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                moments.setdefault(int(index), {})[name] = value.to(self.corpus.device) \
                    if name != "step" else value
        self.optimizer.load_state_dict({"state": moments,
                                        "param_groups": meta["optimizer_groups"]})
        own = "generator" if self.rank == 0 else f"generator.rank{self.rank}"
        if own in tensors:  # (a rank the saved run did not have keeps its fresh generator)
            self.generator.set_state(tensors[own])
        self.rng.bit_generator.state = meta["numpy_rng"]
        self.step_count = int(meta["step"])
        self.questions = list(meta["questions"])
        self.filter_stats = dict(meta.get("filter", {}))
        best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
        if "best" in meta and best:
            self.best, self.best_weights = dict(meta["best"]), best
        if self.reward_model.cache is not None:
            self.reward_model.cache.margins.update(state.cache)
