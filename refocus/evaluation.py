"""Evaluate selectors: for each method, budget k, question kind and judge, the accuracy of
the judge answering from the chosen frames, and (once, it needs no model) the evidence recall
(share of evidence spans hit by at least one chosen frame, over questions that have spans).
Spans that hold no candidate frame cannot be hit by any selector: they are counted
(``spans_without_frames``) and left out of the recall, neither misses nor hits.

A judge is a reference model (``ModelJudge``: right when its highest option logit is the
answer) or the ideal observer (``IdealObserver``, no model). Each row says which judge scored
it and, for a learned policy, which reference gave its rewards, so that a policy scored by the
model it was trained against is marked (``self_judged``)."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch

from refocus.data import Corpus
from refocus.rewards import Reference, RewardModel, pad_subsets
from refocus.selectors import Selector

ALL = "all"
IDEAL = "ideal"  # the ideal observer's spec, id and label


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
    judge: str = ""  # the short label of the judge that scored ``accuracy``
    judged: int = 0  # the questions the judge scored (the ideal observer: those with evidence)
    chance: float | None = None  # accuracy of a uniform guess over the judged questions
    rewards_by: str | None = None  # label of the reference a learned policy was trained on
    self_judged: bool = False  # the judge is the model that gave this policy its rewards

    def as_dict(self) -> dict:
        return asdict(self)


class Judge(Protocol):
    """Scores chosen frames: per question, the expected share of a right answer."""

    id: str

    def scores(self, corpus: Corpus, questions: list[int], picks: list[list[int]],
               ) -> list[float | None]:
        """Per question 0 … 1, or None for a question this judge cannot score."""
        ...


class ModelJudge:
    """A reference model: right (1) when its highest option logit is the answer, else 0."""

    def __init__(self, reference: Reference) -> None:
        self.model = RewardModel(reference)
        self.id = reference.id

    @torch.no_grad()
    def scores(self, corpus: Corpus, questions: list[int], picks: list[list[int]],
               ) -> list[float | None]:
        p, v = pad_subsets(picks, corpus.device)
        q = torch.tensor(questions, device=corpus.device)
        right = self.model.answers(corpus, q, p, v) == corpus.answer[q]
        return [float(x) for x in right.tolist()]


def evidence_spans(corpus: Corpus, question: int) -> list[list[int]]:
    """The question's evidence spans that hold a candidate frame (as in the recall)."""
    return [s for s in corpus.evidence_frames(question) if s]


def n_options(corpus: Corpus, question: int) -> int:
    return int(corpus.option_valid[question].sum())


class IdealObserver:
    """No model: right exactly when the chosen frames hit every evidence span of the question
    (a frame inside the span, the evidence recall's rule), otherwise a uniform guess among its
    options; the score is the expected accuracy, hit + (1 − hit) / options. Questions without
    a span that holds a candidate frame are not scored."""

    id = IDEAL

    def scores(self, corpus: Corpus, questions: list[int], picks: list[list[int]],
               ) -> list[float | None]:
        out: list[float | None] = []
        for question, chosen in zip(questions, picks, strict=True):
            spans = evidence_spans(corpus, question)
            if not spans:
                out.append(None)
                continue
            seen = {int(p) for p in chosen}
            hit = float(all(seen.intersection(s) for s in spans))
            out.append(hit + (1 - hit) / n_options(corpus, question))
        return out

    @staticmethod
    def can_judge(corpus: Corpus, question: int) -> bool:
        return bool(evidence_spans(corpus, question))


# ----------------------------------------------------------------------------- labels

def base_label(reference_id: str) -> str:
    """A short readable name of a reference id: ``reader``, ``lmm:NAME`` (the model folder's or
    hub id's last part), ``ideal``; other ids as they are."""
    kind, _, rest = reference_id.partition(":")
    if kind == "reader":
        return "reader"
    if kind == "lmm" and rest:
        name = rest.rsplit(":", 2)[0] if rest.count(":") >= 2 else rest
        return f"lmm:{name.rstrip('/').rsplit('/', 1)[-1]}"
    return reference_id


def labels(ids: Sequence[str]) -> dict[str, str]:
    """Short labels for reference ids, distinct among them: ids that share a base label get
    their last part's first four characters (``reader:ab12``), then a hash of the id."""
    unique = list(dict.fromkeys(ids))
    by_base: dict[str, list[str]] = defaultdict(list)
    for i in unique:
        by_base[base_label(i)].append(i)
    out: dict[str, str] = {}
    for base, group in by_base.items():
        if len(group) == 1:
            out[group[0]] = base
            continue
        tails = {i: f"{base}:{i.rsplit(':', 1)[-1][:4]}" for i in group}
        distinct = len(set(tails.values())) == len(group)
        for i in group:
            out[i] = tails[i] if distinct else \
                f"{base}:{hashlib.sha256(i.encode()).hexdigest()[:6]}"
    return out


# ----------------------------------------------------------------------------- the table

@dataclass
class _Tally:
    """What one (selector, k) collects per question kind."""

    judged: dict[tuple[str, str], list[float]]  # (judge id, kind) → per-question scores
    chance: dict[tuple[str, str], list[float]]
    recall: dict[str, list[float]]
    frames: dict[str, list[int]]
    unseen: dict[str, int]

    @classmethod
    def empty(cls) -> _Tally:
        return cls(defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(list),
                   defaultdict(int))


@torch.no_grad()
def evaluate(corpus: Corpus, questions: list[int], selectors: list[Selector],
             ks: tuple[int, ...], judges: Sequence[Judge] | RewardModel, batch_size: int = 256,
             rewards: Mapping[str, str] | None = None) -> list[Row]:
    """Rows per selector, budget, kind (``all`` first) and judge. ``judges``: the judges (a
    ``RewardModel`` alone is its reference as the one judge); ``rewards``: per learned
    selector's name, the id of the reference that gave it its rewards."""
    if isinstance(judges, RewardModel):
        judges = [ModelJudge(judges.reference)]
    rewards = dict(rewards or {})
    names = labels([*(j.id for j in judges), *rewards.values()])
    rows: list[Row] = []
    for selector in selectors:
        trained_on = rewards.get(selector.name)
        for k in ks:
            tally = _collect(corpus, questions, selector, k, judges, batch_size)
            for category in [ALL, *sorted(c for c in tally.frames if c != ALL)]:
                for judge in judges:
                    scored = tally.judged[(judge.id, category)]
                    if not scored:  # e.g. the ideal observer on a kind without evidence
                        continue
                    chance = tally.chance[(judge.id, category)]
                    rows.append(Row(
                        selector.name, k, category, len(tally.frames[category]),
                        float(np.mean(scored)),
                        float(np.mean(tally.recall[category])) if tally.recall[category]
                        else None,
                        float(np.mean(tally.frames[category])), tally.unseen[category],
                        names[judge.id], len(scored),
                        float(np.mean(chance)),
                        names[trained_on] if trained_on else None,
                        trained_on == judge.id))
    return rows


def _collect(corpus: Corpus, questions: list[int], selector: Selector, k: int,
             judges: Sequence[Judge], batch_size: int) -> _Tally:
    tally = _Tally.empty()
    for start in range(0, len(questions), batch_size):
        part = questions[start:start + batch_size]
        picks = selector.select(corpus, part, k)
        scores = {judge.id: judge.scores(corpus, part, picks) for judge in judges}
        for i, (question, chosen) in enumerate(zip(part, picks, strict=True)):
            r = corpus.evidence_recall(question, chosen)
            for category in dict.fromkeys((ALL, corpus.category[question])):
                tally.unseen[category] += corpus.spans_without_frames(question)
                tally.frames[category].append(len(chosen))
                if r is not None:
                    tally.recall[category].append(r)
                for judge_id, per_question in scores.items():
                    if per_question[i] is not None:
                        tally.judged[(judge_id, category)].append(per_question[i])
                        tally.chance[(judge_id, category)].append(
                            1 / n_options(corpus, question))
    return tally


def accuracy_by_judge(table: Sequence[Row], category: str = ALL,
                      ) -> dict[tuple[str, int, str], float]:
    """Accuracy per (method, k, judge label) for one question kind."""
    return {(r.method, r.k, r.judge): r.accuracy for r in table if r.category == category}
