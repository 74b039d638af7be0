"""Frame selectors behind one interface: given questions, pick k of each video's candidate
frames, returned in time order. Baselines (uniform, random, CLIP top-k, BOLT, AKS-like) and
the learned policy share it, so every method is evaluated the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from refocus.data import Corpus
from refocus.policy import FrameSelector


class Selector(Protocol):
    name: str

    def select(self, corpus: Corpus, questions: list[int], k: int) -> list[list[int]]:
        """Per question, k local frame indices (fewer when the video is shorter), sorted."""
        ...


def _frames(corpus: Corpus, question: int) -> torch.Tensor:
    video = int(corpus.video[question])
    return corpus.frame_embedding[corpus.offsets[video]:corpus.offsets[video + 1]]


def similarity(corpus: Corpus, question: int) -> np.ndarray:
    """Cosine of every candidate frame with the question's text."""
    f = F.normalize(_frames(corpus, question), dim=-1)
    q = F.normalize(corpus.question_text[question], dim=-1)
    return (f @ q).cpu().numpy()


def uniform_indices(n: int, k: int) -> list[int]:
    if k >= n:
        return list(range(n))
    return sorted({int((i + 0.5) * n / k) for i in range(k)})


@dataclass
class Uniform:
    name: str = "uniform"

    def select(self, corpus: Corpus, questions: list[int], k: int) -> list[list[int]]:
        return [uniform_indices(int(corpus.n_frames[corpus.video[q]]), k) for q in questions]


@dataclass
class Random:
    seed: int = 0
    name: str = "random"

    def select(self, corpus: Corpus, questions: list[int], k: int) -> list[list[int]]:
        out = []
        for q in questions:
            n = int(corpus.n_frames[corpus.video[q]])
            rng = np.random.default_rng([self.seed, q, k])
            out.append(sorted(rng.choice(n, min(k, n), replace=False).tolist()))
        return out


@dataclass
class TopK:
    """The k frames most similar to the question (CLIP)."""

    name: str = "clip-top-k"

    def select(self, corpus: Corpus, questions: list[int], k: int) -> list[list[int]]:
        return [sorted(np.argsort(-similarity(corpus, q), kind="stable")[:k].tolist())
                for q in questions]


def _unit_range(s: np.ndarray) -> np.ndarray:
    """Scores scaled to [0, 1] (all zeros when they are all equal)."""
    s = s.astype(np.float64)
    return (s - s.min()) / max(float(s.max() - s.min()), 1e-12)


@dataclass
class Bolt:
    """Inverse transform sampling over question similarity (BOLT, Liu et al. 2025): the
    similarities scaled to [0, 1] and raised to ``power`` make a distribution over the frames;
    the frames at its k evenly spaced quantile levels (i + ½) / k are chosen. A frame reached
    by several levels is chosen once, as BOLT has it: the released code keeps the repeated
    index (the video-LLM sees the same frame again, nothing new), so a sharp distribution
    spends several of its k picks on its peak and the selection holds fewer distinct frames;
    no neighbouring frame is put in their place (which would turn the peak into a contiguous
    window). (Its levels are linspace(1/k, 1 − 1/k, k), which puts both of k = 2's on the
    median; the midpoints here are the symmetric version.)"""

    power: float = 8.0
    name: str = "bolt"

    def pick(self, scores: np.ndarray, k: int) -> list[int]:
        """The distinct frames at the k quantile levels, sorted (all frames when k ≥ n)."""
        n = len(scores)
        if k >= n:
            return list(range(n))
        p = _unit_range(scores) ** self.power
        if p.sum() <= 0:  # all alike: no frame is more relevant than another
            p = np.ones(n)
        cdf = np.cumsum(p) / p.sum()
        levels = (np.arange(k) + 0.5) / k
        return sorted({min(int(i), n - 1) for i in np.searchsorted(cdf, levels)})

    def select(self, corpus: Corpus, questions: list[int], k: int) -> list[list[int]]:
        return [self.pick(similarity(corpus, q), k) for q in questions]


@dataclass
class AdaptiveKeyframes:
    """Adaptive Keyframe Sampling (AKS, Tang et al. 2025), judge and split as the authors'
    released frame_select.py does it. Similarities are scaled to [0, 1] per video. Starting
    from the whole video with the whole budget k, a segment at depth d holds the budget
    m = k / 2^d. Judge: when the mean of the segment's top k scores (k the whole budget, at
    every depth, as released) exceeds the segment's mean by more than ``threshold``, relevance
    dominates and the segment gives its m frames to its top m scores (TOP). Split: otherwise
    it is cut in halves at its middle, each with half the budget (BIN: coverage), down to
    ``max_depth`` levels; a segment that cannot be split further keeps its top m. Budgets that
    do not halve evenly alternate the larger half between left and right, and a segment with a
    single frame of budget is not split (the released code would give its halves 0 frames)."""

    threshold: float = 0.8  # the released t1
    max_depth: int = 5  # the released all_depth
    name: str = "aks"

    def _split(self, s: np.ndarray, start: int, end: int, m: int, k: int,
               depth: int) -> list[int]:
        segment = s[start:end]
        if m <= 0 or end <= start:
            return []
        if m >= len(segment):
            return list(range(start, end))
        order = np.argsort(-segment, kind="stable")
        relevant = segment[order[:k]].mean() - segment.mean() > self.threshold
        if relevant or depth >= self.max_depth or m == 1:
            return sorted(int(start + t) for t in order[:m])
        middle = start + (end - start) // 2
        left = (m + 1) // 2 if depth % 2 == 0 else m // 2
        return (self._split(s, start, middle, left, k, depth + 1)
                + self._split(s, middle, end, m - left, k, depth + 1))

    def pick(self, scores: np.ndarray, k: int) -> list[int]:
        """k frames of a video by judge and split over its frame scores, sorted."""
        s = _unit_range(scores)
        return sorted(set(self._split(s, 0, len(s), min(k, len(s)), k, 0)))

    def select(self, corpus: Corpus, questions: list[int], k: int) -> list[list[int]]:
        return [self.pick(similarity(corpus, q), k) for q in questions]


@dataclass
class Learned:
    """The trained policy, decoding greedily."""

    policy: FrameSelector
    name: str = "refocus"
    batch_size: int = 64

    def select(self, corpus: Corpus, questions: list[int], k: int) -> list[list[int]]:
        return [picks for picks, _ in self.select_scored(corpus, questions, k)]

    @torch.no_grad()
    def select_scored(self, corpus: Corpus, questions: list[int], k: int,
                      ) -> list[tuple[list[int], list[float]]]:
        """Per question, the picks in time order with the policy's probability of each pick
        at the step it was chosen."""
        self.policy.eval()
        out: list[tuple[list[int], list[float]]] = []
        for i in range(0, len(questions), self.batch_size):
            part = questions[i:i + self.batch_size]
            batch = corpus.frames_of(part)
            ctx = self.policy.encode(batch.question_embedding, batch.question_text, batch.frames,
                                     batch.times, batch.valid)
            selection = self.policy.sample(ctx, k, greedy=True, with_entropy=False)
            picks, log_probs = selection.in_time_order(batch.times)
            real = selection.mask.sum(dim=1).tolist()
            for p, lp, n in zip(picks.tolist(), log_probs.exp().tolist(), real, strict=True):
                out.append((p[:n], lp[:n]))
        return out


BASELINES = {"uniform": Uniform, "random": Random, "clip-top-k": TopK, "bolt": Bolt,
             "aks": AdaptiveKeyframes}
