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


def _take_nearest_free(wanted: int, used: set[int], n: int) -> int:
    for step in range(n):
        for candidate in (wanted + step, wanted - step):
            if 0 <= candidate < n and candidate not in used:
                return candidate
    raise ValueError("no free frame")


@dataclass
class Bolt:
    """Inverse transform sampling over question similarity (BOLT): frames at the k evenly
    spaced quantiles of p ∝ normalised similarity ** power."""

    power: float = 8.0
    name: str = "bolt"

    def select(self, corpus: Corpus, questions: list[int], k: int) -> list[list[int]]:
        out = []
        for q in questions:
            s = similarity(corpus, q).astype(np.float64)
            n = len(s)
            if k >= n:
                out.append(list(range(n)))
                continue
            s = (s - s.min()) / max(s.max() - s.min(), 1e-9)
            p = s ** self.power + 1e-6
            cdf = np.cumsum(p) / p.sum()
            used: set[int] = set()
            for i in range(k):
                wanted = int(np.searchsorted(cdf, (i + 0.5) / k))
                used.add(_take_nearest_free(min(wanted, n - 1), used, n))
            out.append(sorted(used))
        return out


@dataclass
class AdaptiveKeyframes:
    """Relevance plus coverage, after AKS (judge and split): the video is split in halves at
    least ``min_depth`` times, each half with its share of the budget (coverage); below that,
    a segment whose best frames stand out (mean of its top-m minus its mean, on similarities
    scaled to [0, 1] per video, above ``threshold``) gives its budget m to its top frames
    (relevance), and any other is split again."""

    threshold: float = 0.3
    min_depth: int = 1
    max_depth: int = 5
    name: str = "aks"

    def _split(self, s: np.ndarray, start: int, end: int, m: int, depth: int) -> list[int]:
        if m <= 0 or end <= start:
            return []
        segment = s[start:end]
        if m >= len(segment):
            return list(range(start, end))
        top = np.argsort(-segment, kind="stable")[:m]
        stands_out = segment[top].mean() - segment.mean() > self.threshold
        if depth >= self.max_depth or (depth >= self.min_depth and (stands_out or m == 1)):
            return sorted(int(start + t) for t in top)
        middle = (start + end) // 2
        left = (m + 1) // 2 if depth % 2 == 0 else m // 2
        return (self._split(s, start, middle, left, depth + 1)
                + self._split(s, middle, end, m - left, depth + 1))

    def select(self, corpus: Corpus, questions: list[int], k: int) -> list[list[int]]:
        out = []
        for q in questions:
            s = similarity(corpus, q).astype(np.float64)
            s = (s - s.min()) / max(s.max() - s.min(), 1e-9)
            chosen = self._split(s, 0, len(s), min(k, len(s)), 0)
            out.append(sorted(set(chosen)))
        return out


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
