"""Rewards: a reference model answers the question from the chosen frames; the reward is
r = tanh((z_right − max z_wrong) / 2) from its option logits (ReFoCUS).

Every reference implements one method, ``logits(corpus, questions, picks, valid)`` — a batch of
(question, options, answer, frame subset) → option logits — and has an ``id`` that names it
and its weights. ``RewardModel`` adds the margin, the reward and a cache keyed by
(qid, sorted frame subset, reference id), so a subset is scored once.

``RewardModel`` is also the one place that counts what the reference is asked: every call to
``Reference.logits`` goes through it and adds to its ``RewardCounts`` (subsets sent, calls,
model forwards, cache hits, seconds). A reference that batches internally (the LMM) reports
its own tally of model forwards as ``forwards``; for any other, one call is one forward.

A cheap **surrogate** (e.g. a reader distilled on the LMM's margins) can stand in for the
reward model: ``margins(..., fallback=surrogate)`` takes the reward model's cached margin for
every subset it has already scored (free, and the truth) and asks the surrogate for the rest,
storing nothing in the reward model's cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

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


@dataclass
class RewardCounts:
    """What a reference was asked: (question, subset) rows sent to it, calls of its
    ``logits``, model forwards (batches), rows answered from the cache instead, seconds."""

    subsets: int = 0
    calls: int = 0
    forwards: int = 0
    hits: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def minus(self, before: RewardCounts) -> RewardCounts:
        return RewardCounts(**{f.name: getattr(self, f.name) - getattr(before, f.name)
                               for f in fields(self)})

    def copy(self) -> RewardCounts:
        return RewardCounts(**asdict(self))


class RewardModel:
    """A reference with margins, rewards and (optionally) a cache; it counts every row it
    sends to the reference — scoring (``counts``) and judging (``judge_counts``, the
    ``answers`` of validation and evaluation) apart."""

    def __init__(self, reference: Reference, cache: RewardCache | None = None) -> None:
        self.reference = reference
        if cache is not None and cache.reference_id != reference.id:
            raise ValueError(f"reward cache is for {cache.reference_id}, not {reference.id}")
        self.cache = cache
        self.counts = RewardCounts()
        self.judge_counts = RewardCounts()

    @property
    def id(self) -> str:
        return self.reference.id

    def _logits(self, corpus: Corpus, questions: torch.Tensor, picks: torch.Tensor,
                valid: torch.Tensor, counts: RewardCounts) -> torch.Tensor:
        """The reference's logits, counted: the one way rows reach the reference."""
        forwards = getattr(self.reference, "forwards", None)
        started = time.perf_counter()
        logits = self.reference.logits(corpus, questions, picks, valid)
        counts.seconds += time.perf_counter() - started
        counts.subsets += len(questions)
        counts.calls += 1
        after = getattr(self.reference, "forwards", None)
        counts.forwards += after - forwards if isinstance(forwards, int) and \
            isinstance(after, int) else 1
        return logits

    @torch.no_grad()
    def margins(self, corpus: Corpus, questions: torch.Tensor, picks: torch.Tensor,
                valid: torch.Tensor, fallback: RewardModel | None = None) -> torch.Tensor:
        """Margin per row; rows already in the cache are not scored again. With
        ``fallback`` (a surrogate), the rows the cache lacks are scored by it instead and
        are not stored in this cache (their values are the surrogate's, not this model's)."""
        if self.cache is None:
            if fallback is not None:
                raise ValueError("a surrogate stands in for a reward model with a cache only")
            logits = self._logits(corpus, questions, picks, valid, self.counts)
            return margins(logits, corpus.answer[questions])
        keys = [subset_key(corpus.qids[int(q)], p, v)
                for q, p, v in zip(questions.tolist(), picks, valid, strict=True)]
        first_row: dict[Key, int] = {}
        for i, key in enumerate(keys):  # each new subset once, even if a batch repeats it
            if key not in self.cache.margins:
                first_row.setdefault(key, i)
        missing = list(first_row.values())
        self.cache.hits += len(keys) - len(missing)
        self.counts.hits += len(keys) - len(missing)
        found: dict[Key, float] = {}
        if missing:
            rows = torch.tensor(missing, device=picks.device)
            if fallback is None:
                self.cache.misses += len(missing)
                logits = self._logits(corpus, questions[rows], picks[rows], valid[rows],
                                      self.counts)
                computed = margins(logits, corpus.answer[questions[rows]])
            else:
                computed = fallback.margins(corpus, questions[rows], picks[rows], valid[rows])
            found = {keys[i]: value for i, value in zip(missing, computed.tolist(), strict=True)}
            if fallback is None:
                self.cache.margins.update(found)
        known = self.cache.margins
        return torch.tensor([known[key] if key in known else found[key] for key in keys],
                            device=picks.device)

    def rewards(self, corpus: Corpus, questions: torch.Tensor, picks: torch.Tensor,
                valid: torch.Tensor, fallback: RewardModel | None = None) -> torch.Tensor:
        return reward(self.margins(corpus, questions, picks, valid, fallback))

    @torch.no_grad()
    def answers(self, corpus: Corpus, questions: torch.Tensor, picks: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """The reference's chosen option per row (counted in ``judge_counts``)."""
        return self._logits(corpus, questions, picks, valid, self.judge_counts).argmax(dim=1)


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

