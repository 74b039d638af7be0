"""Evaluate selectors: for each method, budget k and question kind, the accuracy of the
reference answering from the chosen frames and the evidence recall (share of evidence spans
hit by at least one chosen frame, over questions that have spans). Spans that hold no candidate
frame cannot be hit by any selector: they are counted (``spans_without_frames``) and left out
of the recall, neither misses nor hits."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import torch

from refocus.data import Corpus
from refocus.rewards import RewardModel, pad_subsets
from refocus.selectors import Selector

ALL = "all"


@dataclass(frozen=True)
class Row:
    method: str
    k: int
    category: str
    questions: int
    accuracy: float
    evidence_recall: float | None  # None when no question of the row has spans
    mean_frames: float
    spans_without_frames: int = 0  # evidence spans with no candidate frame (not in the recall)

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(corpus: Corpus, questions: list[int], selectors: list[Selector],
             ks: tuple[int, ...], reward_model: RewardModel, batch_size: int = 256,
             ) -> list[Row]:
    rows: list[Row] = []
    for selector in selectors:
        for k in ks:
            correct: dict[str, list[float]] = defaultdict(list)
            recall: dict[str, list[float]] = defaultdict(list)
            frames: dict[str, list[int]] = defaultdict(list)
            unseen: dict[str, int] = defaultdict(int)
            for start in range(0, len(questions), batch_size):
                part = questions[start:start + batch_size]
                picks = selector.select(corpus, part, k)
                p, v = pad_subsets(picks, corpus.device)
                q = torch.tensor(part, device=corpus.device)
                right = (reward_model.answers(corpus, q, p, v) == corpus.answer[q]).tolist()
                for question, ok, chosen in zip(part, right, picks, strict=True):
                    r = corpus.evidence_recall(question, chosen)
                    for category in dict.fromkeys((ALL, corpus.category[question])):
                        unseen[category] += corpus.spans_without_frames(question)
                        correct[category].append(float(ok))
                        frames[category].append(len(chosen))
                        if r is not None:
                            recall[category].append(r)
            for category in [ALL, *sorted(c for c in correct if c != ALL)]:
                rows.append(Row(
                    selector.name, k, category, len(correct[category]),
                    float(np.mean(correct[category])),
                    float(np.mean(recall[category])) if recall[category] else None,
                    float(np.mean(frames[category])), unseen[category]))
    return rows
