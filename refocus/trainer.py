"""GRPO training of the frame-selection policy (ReFoCUS), one readable step at a time.

Each step: draw a batch of training questions; sample a group of N frame subsets per question
from the policy (no gradient); score them with the reference (reward r = tanh(margin / 2));
normalise within each group, A = (r − mean) / std; recompute the log-probabilities of the
sampled subsets in one teacher-forced pass and minimise −Σ_t A·log π(f_t | q, f_<t) −
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
    sample_seconds: float = 0.0
    reward_seconds: float = 0.0
    cache_hits: int = 0
    reward_from: str = "reward"
    reward_counts: RewardCounts = field(default_factory=RewardCounts)  # this step's
    surrogate_counts: RewardCounts = field(default_factory=RewardCounts)


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


class GRPOTrainer:
    def __init__(self, corpus: Corpus, reward_model: RewardModel, settings: GRPOSettings,
                 policy_config: PolicyConfig | None = None,
                 surrogate: RewardModel | None = None) -> None:
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
        self.generator = torch.Generator(device=corpus.device).manual_seed(s.seed + self.rank)
        self.rng = np.random.default_rng(s.seed)  # alike on every rank: the same global batch
        self.step_count = 0
        self.questions = corpus.rows("train")
        if not self.questions:
            raise ValueError("no training questions (split 'train')")
        self.filter_stats: dict[str, Any] = {}
        if s.filter_threshold is not None:
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
        loss, entropy = self.update(rollout)
        done = time.perf_counter()
        grouped = rollout.rewards.view(-1, s.group)
        stats = torch.stack([rollout.rewards.mean(), grouped.std(1, unbiased=False).mean(),
                             rollout.advantage.abs().mean(), entropy, loss])
        if self.world > 1:  # the whole batch's means (the shares are equal)
            dist.all_reduce(stats)
            stats /= self.world
        reward, reward_std, advantage_abs, entropy_mean, loss_value = stats.tolist()
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
            reward_forwards=reward_forwards, surrogate_subsets=surrogate_subsets)

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
        grouped = rewards.view(-1, s.group)
        advantage = (grouped - grouped.mean(1, keepdim=True)) / (
            grouped.std(1, keepdim=True, unbiased=False) + 1e-6)
        counts = self.reward_model.counts.minus(before)
        return Rollout(k, questions, sample.picks, sample.mask, rewards, advantage.flatten(),
                       sample_seconds=sampled - started,
                       reward_seconds=time.perf_counter() - sampled,
                       cache_hits=counts.hits, reward_from=source, reward_counts=counts,
                       surrogate_counts=surrogate.counts.minus(surrogate_before)
                       if surrogate else RewardCounts())

    def update(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """3. Teacher-forced log-probabilities of the rollout's subsets, the policy-gradient
        loss with an entropy bonus, one optimizer step (gradients averaged over the ranks
        first). Returns this rank's (loss, mean entropy)."""
        s, policy = self.settings, self.policy
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step_count)
        batch = self.corpus.frames_of(rollout.questions)
        policy.train()
        with self._autocast():
            ctx = policy.encode(batch.question_embedding, batch.question_text, batch.frames,
                                batch.times, batch.valid).repeat(s.group)
            log_probs, entropy = policy.log_probs(ctx, rollout.picks, temperature=s.temperature)
        steps_taken = rollout.mask.float().sum(1).clamp_min(1)
        pg = -(rollout.advantage * log_probs.float().sum(1)).mean()
        mean_entropy = (entropy.float().sum(1) / steps_taken).mean()
        loss = pg - s.entropy_coef * mean_entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            self._average_gradients()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), s.grad_clip)
        self.optimizer.step()
        self.step_count += 1
        return loss.detach(), mean_entropy.detach()

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
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON-able values that restore this trainer exactly."""
        tensors = {f"policy.{k}": v.detach().cpu().contiguous()
                   for k, v in self.policy.state_dict().items()}
        optimizer = self.optimizer.state_dict()
        for index, entry in optimizer["state"].items():
            for name, value in entry.items():
                tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu()
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
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.policy.load_state_dict({k[len("policy."):]: v for k, v in tensors.items()
                                     if k.startswith("policy.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.to(self.corpus.device) \
                    if name != "step" else value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})
        own = "generator" if self.rank == 0 else f"generator.rank{self.rank}"
        if own in tensors:  # (a rank the saved run did not have keeps its fresh generator)
            self.generator.set_state(tensors[own])
        self.rng.bit_generator.state = meta["numpy_rng"]
        self.step_count = int(meta["step"])
        self.questions = list(meta["questions"])
        self.filter_stats = dict(meta.get("filter", {}))
