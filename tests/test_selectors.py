"""Baseline selectors and the evaluation table, against direct computations."""

import numpy as np
import pytest
import torch
from toy import ToyReference, toy_corpus

from refocus.evaluation import evaluate
from refocus.rewards import RewardModel
from refocus.selectors import (
    BASELINES,
    AdaptiveKeyframes,
    Bolt,
    Random,
    TopK,
    Uniform,
    similarity,
    uniform_indices,
)


@pytest.fixture(scope="module")
def toy():
    return toy_corpus(videos=12, frames=20)


@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize("k", [1, 4, 7, 20, 30])
def test_every_selector_returns_k_distinct_sorted_frames(toy, name, k):
    corpus, _ = toy
    picks = BASELINES[name]().select(corpus, list(range(12)), k)
    for chosen in picks:
        assert chosen == sorted(set(chosen))
        assert len(chosen) == min(k, 20) and all(0 <= p < 20 for p in chosen)


def test_uniform_spreads_evenly():
    assert uniform_indices(100, 4) == [12, 37, 62, 87]
    assert uniform_indices(3, 5) == [0, 1, 2]


def test_top_k_is_the_brute_force_top_k(toy):
    corpus, targets = toy
    for q in range(12):
        video = int(corpus.video[q])
        frames = corpus.frame_embedding[corpus.offsets[video]:corpus.offsets[video + 1]]
        f = frames.numpy() / np.linalg.norm(frames.numpy(), axis=1, keepdims=True)
        text = corpus.question_text[q].numpy()
        scores = f @ (text / np.linalg.norm(text))
        np.testing.assert_allclose(similarity(corpus, q), scores, atol=1e-5)
        assert TopK().select(corpus, [q], 3)[0] == sorted(np.argsort(-scores)[:3].tolist())


def test_random_is_reproducible_and_varies_by_question(toy):
    corpus, _ = toy
    a = Random(seed=1).select(corpus, [0, 1, 2], 4)
    assert a == Random(seed=1).select(corpus, [0, 1, 2], 4)
    assert a != Random(seed=2).select(corpus, [0, 1, 2], 4)
    assert len({tuple(x) for x in a}) > 1


def test_bolt_follows_the_similarity_quantiles(toy):
    corpus, _ = toy
    s = similarity(corpus, 0).astype(np.float64)
    s = (s - s.min()) / (s.max() - s.min())
    p = s ** 8 + 1e-6
    cdf = np.cumsum(p) / p.sum()
    wanted = [int(np.searchsorted(cdf, (i + 0.5) / 2)) for i in range(2)]
    picks = Bolt().select(corpus, [0], 2)[0]
    assert all(w in picks for w in wanted if wanted.count(w) == 1)
    # with a flat power the quantiles are uniform
    assert Bolt(power=0.0).select(corpus, [0], 4)[0] == uniform_indices(20, 4)


def test_aks_covers_both_halves_and_picks_the_best_in_each(toy):
    corpus, _ = toy
    s = similarity(corpus, 0)
    picks = AdaptiveKeyframes().select(corpus, [0], 2)[0]
    assert picks == [int(np.argmax(s[:10])), 10 + int(np.argmax(s[10:]))]


def test_evaluation_counts_accuracy_and_evidence_recall(toy):
    corpus, targets = toy
    corpus.evidence = [[(corpus.frame_time[corpus.offsets[q] + targets[q][0]].item(),) * 2]
                       for q in range(12)]
    corpus._evidence_frames.clear()
    rows = evaluate(corpus, list(range(12)), [Uniform(), TopK()], (4,),
                    RewardModel(ToyReference(targets)))
    for row in (r for r in rows if r.category == "all"):
        selector = Uniform() if row.method == "uniform" else TopK()
        picks = selector.select(corpus, list(range(12)), 4)
        hits = [targets[q][0] in p for q, p in enumerate(picks)]
        assert row.accuracy == pytest.approx(np.mean(hits))
        assert row.evidence_recall == pytest.approx(np.mean(hits))  # one span: the asked frame
        assert row.questions == 12 and row.mean_frames == 4
    kinds = {r.category for r in rows}
    assert kinds == {"all", "a", "b"}
    assert torch.is_tensor(corpus.answer)
