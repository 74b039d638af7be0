"""Rewards: a reference model answers the question from the chosen frames; the reward is
r = tanh((z_right − max z_wrong) / 2) from its option logits (ReFoCUS).

Every reference implements one method, ``logits(corpus, questions, picks, valid)`` — a batch of
(question, options, answer, frame subset) → option logits — and has an ``id`` that names it
and its weights. ``RewardModel`` adds the margin, the reward and a cache keyed by
(qid, sorted frame subset, reference id), so a subset is scored once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import torch

from refocus.data import Corpus
from refocus.reader import AnyReader, margins, read


class Reference(Protocol):
    """A frozen model that answers multiple-choice questions from chosen frames."""

    id: str

    def logits(self, corpus: Corpus, questions: torch.Tensor, picks: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor:
        """[B] question rows, [B, k] local frame indices (and which are real) → [B, O]."""
        ...


class ReaderReference:
    """The ``reader`` network over cached CLIP features."""

    def __init__(self, reader: AnyReader, id: str) -> None:
        self.reader = reader.eval()
        self.id = id

    @torch.no_grad()
    def logits(self, corpus: Corpus, questions: torch.Tensor, picks: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor:
        return read(self.reader, corpus, questions, picks, valid)


def reward(margin: torch.Tensor) -> torch.Tensor:
    return torch.tanh(margin / 2)


Key = tuple[str, tuple[int, ...]]


class RewardCache:
    """Margins of (qid, sorted frame subset) for one reference id."""

    def __init__(self, reference_id: str, entries: Iterable[tuple[Key, float]] = ()) -> None:
        self.reference_id = reference_id
        self.margins: dict[Key, float] = dict(entries)
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.margins)

    def items(self) -> Iterator[tuple[Key, float]]:
        return iter(self.margins.items())


def subset_key(qid: str, picks: torch.Tensor, valid: torch.Tensor) -> Key:
    return qid, tuple(sorted(int(p) for p, v in zip(picks.tolist(), valid.tolist(), strict=True)
                             if v))


class RewardModel:
    """A reference with margins, rewards and (optionally) a cache."""

    def __init__(self, reference: Reference, cache: RewardCache | None = None) -> None:
        self.reference = reference
        if cache is not None and cache.reference_id != reference.id:
            raise ValueError(f"reward cache is for {cache.reference_id}, not {reference.id}")
        self.cache = cache

    @torch.no_grad()
    def margins(self, corpus: Corpus, questions: torch.Tensor, picks: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """Margin per row; rows already in the cache are not scored again."""
        if self.cache is None:
            logits = self.reference.logits(corpus, questions, picks, valid)
            return margins(logits, corpus.answer[questions])
        keys = [subset_key(corpus.qids[int(q)], p, v)
                for q, p, v in zip(questions.tolist(), picks, valid, strict=True)]
        out = torch.empty(len(keys), device=picks.device)
        first_row: dict[Key, int] = {}
        for i, key in enumerate(keys):  # each new subset once, even if a batch repeats it
            if key not in self.cache.margins:
                first_row.setdefault(key, i)
        missing = list(first_row.values())
        self.cache.hits += len(keys) - len(missing)
        self.cache.misses += len(missing)
        if missing:
            rows = torch.tensor(missing, device=picks.device)
            logits = self.reference.logits(corpus, questions[rows], picks[rows], valid[rows])
            computed = margins(logits, corpus.answer[questions[rows]])
            for i, value in zip(missing, computed.tolist(), strict=True):
                self.cache.margins[keys[i]] = value
        for i, key in enumerate(keys):
            out[i] = self.cache.margins[key]
        return out

    def rewards(self, corpus: Corpus, questions: torch.Tensor, picks: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        return reward(self.margins(corpus, questions, picks, valid))

    @torch.no_grad()
    def answers(self, corpus: Corpus, questions: torch.Tensor, picks: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """The reference's chosen option per row."""
        return self.reference.logits(corpus, questions, picks, valid).argmax(dim=1)


def pad_subsets(subsets: list[list[int]], device: torch.device | str = "cpu",
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged lists of local frame indices → picks [B, k] and valid [B, k]."""
    k = max(1, max((len(s) for s in subsets), default=1))
    picks = torch.zeros(len(subsets), k, dtype=torch.long)
    valid = torch.zeros(len(subsets), k, dtype=torch.bool)
    for i, s in enumerate(subsets):
        picks[i, :len(s)] = torch.tensor(sorted(s), dtype=torch.long)
        valid[i, :len(s)] = True
    return picks.to(device), valid.to(device)

