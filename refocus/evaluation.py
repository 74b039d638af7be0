"""Evaluate selectors: for each method, budget k, question kind and judge, the accuracy of
the judge answering from the chosen frames, and (once, it needs no model) the evidence recall
(share of evidence spans hit by at least one chosen frame, over questions that have spans).
Spans that hold no candidate frame cannot be hit by any selector: they are counted
(``spans_without_frames``) and left out of the recall, neither misses nor hits.

A judge is a reference model (``ModelJudge``: right when its highest option logit is the
answer) or the ideal observer (``IdealObserver``, no model). Each row says which judge scored
it and, for a learned policy, which reference gave its rewards, so that a policy scored by the
model it was trained against is marked (``self_judged``).

Statistics: every accuracy cell carries a 95 % percentile bootstrap interval over its
questions (``ci_low``, ``ci_high``: the questions resampled with replacement, a fixed seed,
``RESAMPLES`` times; one seed for every cell, so cells over the same questions are resampled
alike). A stochastic selector (one with a ``seed``, e.g. random) is run under
each of several seeds: its cell is the mean over the seeds, the bootstrap resamples the
questions' seed-averaged scores, and ``seed_std`` is the standard deviation of the accuracy
across the seeds. ``ceiling`` is the judge's accuracy on the same questions when shown every
candidate frame (for an LMM judge, at most ``LMM_CEILING_FRAMES`` of them, spread uniformly,
fewer when its context holds fewer: every frame of a long video costs too much; the frames
shown on average are ``ceiling_frames``); the ideal observer's ceiling is 1 by its rule."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Protocol

import numpy as np
import torch

from refocus.data import Corpus
from refocus.rewards import Reference, RewardModel, pad_subsets
from refocus.selectors import Selector, uniform_indices
from refocus.settings import EVAL_LEVEL as LEVEL
from refocus.settings import EVAL_RESAMPLES as RESAMPLES
from refocus.settings import EVAL_SEEDS as SEEDS
from refocus.settings import LMM_CEILING_FRAMES
from stores.errors import UserError

ALL = "all"
IDEAL = "ideal"  # the ideal observer's spec, id and label
BOOTSTRAP_SEED = 0  # the resampling's seed: the same questions → the same resamples


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
    ci_low: float | None = None  # the accuracy's bootstrap interval (None: not computed)
    ci_high: float | None = None
    seeds: int = 1  # the seeds the cell averages (1: a deterministic selector)
    seed_std: float | None = None  # the accuracy's standard deviation across those seeds
    ceiling: float | None = None  # the judge's accuracy from every frame, same questions
    ceiling_frames: float | None = None  # the frames it was shown for that, on average

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


# ----------------------------------------------------------------------------- statistics

def bootstrap_interval(scores: Sequence[float], resamples: int = RESAMPLES,
                       level: float = LEVEL, seed: int = BOOTSTRAP_SEED,
                       ) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``scores``: ``resamples`` means of
    as many scores drawn with replacement, their (1 − level)/2 and (1 + level)/2 quantiles."""
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0 or resamples < 1:
        raise ValueError("bootstrap_interval needs scores and at least one resample")
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // x.size)  # bounded memory for long score vectors
    means = np.concatenate([
        x[rng.integers(0, x.size, size=(min(chunk, resamples - start), x.size))].mean(axis=1)
        for start in range(0, resamples, chunk)])
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def seeded(selector: Selector, seeds: Sequence[int]) -> list[Selector]:
    """The selector once per seed when it draws at random (a dataclass with a ``seed``
    field), else the selector alone."""
    stochastic = any(f.name == "seed" for f in fields(selector)) \
        if hasattr(selector, "__dataclass_fields__") else False
    return [replace(selector, seed=s) for s in seeds] if stochastic else [selector]  # type: ignore[type-var]


@dataclass
class AllFrames:
    """Every candidate frame of the question's video (at most ``cap``, spread uniformly):
    the selection behind a judge's all-frames ceiling. ``k`` is ignored."""

    cap: int | None = None
    name: str = "all frames"

    def select(self, corpus: Corpus, questions: list[int], k: int) -> list[list[int]]:
        out = []
        for q in questions:
            n = int(corpus.n_frames[corpus.video[q]])
            out.append(uniform_indices(n, self.cap) if self.cap else list(range(n)))
        return out


def ceiling_cap(judge_id: str, lmm_frames: int | None) -> int | None:
    """The frames a judge is shown at most for its ceiling: every one, except an LMM judge
    (``lmm_frames``; 0 or None: the LMM judge gets no ceiling, see ``ceilings``)."""
    return lmm_frames if judge_id.startswith("lmm:") else None


# ----------------------------------------------------------------------------- the table

@dataclass
class _Tally:
    """What one (selector, k, seed) collects per question kind."""

    judged: dict[tuple[str, str], dict[int, float]]  # (judge id, kind) → question → score
    chance: dict[tuple[str, str], list[float]]
    recall: dict[str, list[float]]
    frames: dict[str, list[int]]
    unseen: dict[str, int]

    @classmethod
    def empty(cls) -> _Tally:
        return cls(defaultdict(dict), defaultdict(list), defaultdict(list), defaultdict(list),
                   defaultdict(int))


@dataclass(frozen=True)
class Statistics:
    """How the cells' uncertainty is measured: the bootstrap (``resamples`` 0: none), the
    seeds a stochastic selector runs under, the LMM judges' ceiling cap (0: no ceiling for
    them; the ideal observer and the reader always get one)."""

    resamples: int = RESAMPLES
    level: float = LEVEL
    seeds: tuple[int, ...] = SEEDS
    ceiling_frames: int = LMM_CEILING_FRAMES

    def as_dict(self) -> dict:
        return {**asdict(self), "bootstrap_seed": BOOTSTRAP_SEED,
                "interval": "percentile bootstrap over questions"}


@torch.no_grad()
def evaluate(corpus: Corpus, questions: list[int], selectors: list[Selector],
             ks: tuple[int, ...], judges: Sequence[Judge] | RewardModel, batch_size: int = 256,
             rewards: Mapping[str, str] | None = None,
             statistics: Statistics = Statistics()) -> list[Row]:
    """Rows per selector, budget, kind (``all`` first) and judge. ``judges``: the judges (a
    ``RewardModel`` alone is its reference as the one judge); ``rewards``: per learned
    selector's name, the id of the reference that gave it its rewards."""
    if isinstance(judges, RewardModel):
        judges = [ModelJudge(judges.reference)]
    rewards = dict(rewards or {})
    names = labels([*(j.id for j in judges), *rewards.values()])
    top = ceilings(corpus, questions, judges, statistics.ceiling_frames, batch_size)
    rows: list[Row] = []
    for selector in selectors:
        trained_on = rewards.get(selector.name)
        runs = seeded(selector, statistics.seeds)
        for k in ks:
            tallies = [_collect(corpus, questions, run, k, judges, batch_size) for run in runs]
            first = tallies[0]
            for category in [ALL, *sorted(c for c in first.frames if c != ALL)]:
                for judge in judges:
                    key = (judge.id, category)
                    if not first.judged[key]:  # e.g. the ideal observer on a kind without spans
                        continue
                    accuracy, low, high, seeds, spread = _accuracy(tallies, key, statistics)
                    rows.append(Row(
                        selector.name, k, category, len(first.frames[category]), accuracy,
                        _pooled_mean([t.recall[category] for t in tallies]),
                        _pooled_mean([t.frames[category] for t in tallies]) or 0.0,
                        first.unseen[category], names[judge.id], len(first.judged[key]),
                        float(np.mean(first.chance[key])),
                        names[trained_on] if trained_on else None, trained_on == judge.id,
                        ci_low=low, ci_high=high, seeds=seeds, seed_std=spread,
                        ceiling=top[key][0] if key in top else None,
                        ceiling_frames=top[key][1] if key in top else None))
    return rows


def _accuracy(tallies: list[_Tally], key: tuple[str, str], statistics: Statistics,
              ) -> tuple[float, float | None, float | None, int, float | None]:
    """Accuracy (mean over seeds), its bootstrap interval over the questions' seed-averaged
    scores, the seeds and the accuracy's standard deviation across them."""
    per_seed = [t.judged[key] for t in tallies]
    averaged = [float(np.mean([s[q] for s in per_seed])) for q in per_seed[0]]
    low = high = None
    if statistics.resamples:
        low, high = bootstrap_interval(averaged, statistics.resamples, statistics.level)
    accuracies = [float(np.mean(list(s.values()))) for s in per_seed]
    spread = float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else None
    return float(np.mean(averaged)), low, high, len(tallies), spread


def _pooled_mean(per_seed: Sequence[Sequence[float]]) -> float | None:
    """The mean of the seeds' values pooled (None when there are none)."""
    pooled = [v for values in per_seed for v in values]
    return float(np.mean(pooled)) if pooled else None


def ceilings(corpus: Corpus, questions: list[int], judges: Sequence[Judge],
             lmm_frames: int | None, batch_size: int,
             ) -> dict[tuple[str, str], tuple[float, float]]:
    """Per (judge id, kind): the judge's accuracy when shown every candidate frame, over the
    questions it scores, and the frames it was shown on average. An LMM judge sees at most
    ``lmm_frames`` (none: no ceiling), halved until its prompt fits its context."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    batch = max(1, batch_size // 8)  # long selections: fewer questions per forward
    for judge in judges:
        lmm = judge.id.startswith("lmm:")
        cap = ceiling_cap(judge.id, lmm_frames)
        if lmm and not cap:
            continue
        while True:
            try:
                tally = _collect(corpus, questions, AllFrames(cap), 0, [judge], batch)
                break
            except UserError:  # e.g. more frames than the LMM's context holds
                if not lmm or not cap or cap == 1:
                    raise
                cap //= 2
        out.update({key: (float(np.mean(list(scores.values()))),
                          float(np.mean(tally.frames[key[1]])))
                    for key, scores in tally.judged.items() if scores})
    return out


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
                    score = per_question[i]
                    if score is not None:
                        tally.judged[(judge_id, category)][question] = score
                        tally.chance[(judge_id, category)].append(
                            1 / n_options(corpus, question))
    return tally


def accuracy_by_judge(table: Sequence[Row], category: str = ALL,
                      ) -> dict[tuple[str, int, str], float]:
    """Accuracy per (method, k, judge label) for one question kind."""
    return {(r.method, r.k, r.judge): r.accuracy for r in table if r.category == category}
